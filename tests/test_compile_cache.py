"""compile_cache.enable: gptjax's compiled programs go to ``$GPTJAX_CACHE/xla`` and a second
process loads them instead of compiling; a cache folder the user chose, caching turned off, or a
``gs://`` GPTJAX_CACHE is left alone."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from gptjax import compile_cache

# Enables the cache, compiles one function and prints: the cache folder, the result, and how
# many programs (that function's and jnp.ones') were loaded from the persistent cache.
SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    from gptjax import compile_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **_: hits.append(name) if name.endswith("/cache_hits") else None
    )
    folder = compile_cache.enable()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(folder, float(f(jnp.ones((64, 64)))), len(hits))
    """
)


def _run(gptjax_cache) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(
        GPTJAX_CACHE=str(gptjax_cache),
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # jax's default skips quick compiles
    )
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    folder, value, hits = _run(tmp_path)
    assert folder == str(tmp_path / "xla") and hits == "0"
    assert any(name.startswith("jit_") for name in os.listdir(folder)), os.listdir(folder)
    again = _run(tmp_path)
    assert again[:2] == [folder, value] and int(again[2]) >= 1  # loaded, and computes the same


@pytest.fixture
def no_cache_dir():
    """This process's cache folder (the suite's, from conftest) unset for a test, then back."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_what_the_user_chose_is_left_alone(tmp_path, monkeypatch, no_cache_dir):
    monkeypatch.setenv("GPTJAX_CACHE", "gs://a-bucket/cache")  # per machine: no cache there
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path))
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable() == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable() == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
