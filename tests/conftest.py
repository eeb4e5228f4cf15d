"""Test setup: 8 fake CPU devices (set before jax is imported), one persistent XLA compilation
cache for the whole session (this process and every `python -m gptjax` subprocess a test starts
share it, so each distinct program compiles once), and a per-session data cache."""

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


@pytest.fixture(autouse=True, scope="session")
def _gptjax_cache(tmp_path_factory):
    """Keeps materialised datasets and tokenizers out of the user's ~/.cache."""
    if "GPTJAX_CACHE" not in os.environ:
        os.environ["GPTJAX_CACHE"] = str(tmp_path_factory.mktemp("gptjax_cache"))
    yield
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
