"""Test setup: 8 fake CPU devices (set before jax is imported) and a per-session data cache."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _gptjax_cache(tmp_path_factory):
    """Keeps materialised datasets and tokenizers out of the user's ~/.cache."""
    if "GPTJAX_CACHE" not in os.environ:
        os.environ["GPTJAX_CACHE"] = str(tmp_path_factory.mktemp("gptjax_cache"))
    yield
