"""Test setup: 8 fake CPU devices (set before jax is imported), one persistent XLA compilation
cache for the whole run (this process, the pytest-xdist workers and every `python -m gptjax`
subprocess a test starts share it, so each distinct program compiles once), a per-session data
cache, one tiny pretrained workdir for the whole run, and the slowest modules handed out first."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="gptjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A tiny model pretrained for 60 steps through the CLI, as the README's smoke run: made
    once per suite run and shared by every pytest-xdist worker (the first to ask trains it under
    a file lock, the others wait and read it). Tests only read it; a test that writes into a
    workdir trains its own."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above each worker's own
    workdir, done = root / "tiny-pretrained", root / "tiny-pretrained.done"
    with FileLock(str(root / "tiny-pretrained.lock")):
        if not done.is_file():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt would resume
            args = ["--config", "experiments/tiny.py", "--workdir", str(workdir)]
            args += ["--train.steps=60", "--eval.every_steps=30"]
            result = subprocess.run(
                [sys.executable, "-m", "gptjax", "pretrain", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            done.touch()
    return workdir
