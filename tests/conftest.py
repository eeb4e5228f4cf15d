"""Test setup: 8 fake CPU devices (set before jax is imported), one persistent XLA compilation
cache for the whole run (this process, the pytest-xdist workers and every `python -m gptjax`
subprocess a test starts share it, so each distinct program compiles once), a per-session data
cache, and the slowest modules handed out first."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="gptjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

# pyproject.toml runs the suite on 2 pytest-xdist workers, a module at a time (`--dist
# loadfile`): a worker that waits on its subprocesses (training runs, a coordinator, a notebook
# kernel) leaves the cores to the other. Modules are handed out in collection order, so the
# longest go first and the short ones fill in at the end.
SLOWEST_FIRST = (  # seconds per module, summed over its tests, on 2 cores with 2 workers
    "test_checkpoint.py",  # 300: signal, kill and two-process resume runs
    "test_multihost.py",  # 210: 7 training processes
    "test_notebooks.py",  # 195: three notebooks
    "test_sharding.py",  # 160: every mesh layout against one device
    "test_gcs.py",  # 105: training runs against the GCS emulator
    "test_hf.py",  # 95: transformers parity, fine-tuning imported models
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module


def pytest_unconfigure(config):
    if _XLA_CACHE:  # the process that made it: the xdist controller, or pytest without -n
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _gptjax_cache(tmp_path_factory):
    """Keeps materialised datasets and tokenizers out of the user's ~/.cache."""
    if "GPTJAX_CACHE" not in os.environ:
        os.environ["GPTJAX_CACHE"] = str(tmp_path_factory.mktemp("gptjax_cache"))
