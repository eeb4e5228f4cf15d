"""A persistent XLA compilation cache for gptjax's programs.

Every ``gptjax pretrain``, ``finetune``, ``generate`` or ``chat`` compiles its programs afresh:
the train step, evaluation, prefill and the decoding loop (GPT-2 124M on CPU: ~13 s before
the first token at batch 1). jax can keep compiled programs on disk and load them in a later
process instead (its persistent compilation cache); ``enable`` points it at
``$GPTJAX_CACHE/xla`` (default ``~/.cache/gptjax/xla``, beside the prepared datasets), so a
resumed run, a second chat or a rerun with the same shapes skips those compiles. jax keys each
entry by the program, the devices, jax's version and the compiler flags, so a changed model or
machine compiles again; only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (default 1 s) to compile are written.

A cache the user chose wins: ``JAX_COMPILATION_CACHE_DIR`` (or
``jax.config.update("jax_compilation_cache_dir", ...)``) is left as it is, and
``JAX_ENABLE_COMPILATION_CACHE=false`` turns caching off. jax treats the cache as trusted code:
keep it in a folder only you can write to (the default is in your home directory).
"""

from __future__ import annotations

from pathlib import Path

import jax

from gptjax import storage


def enable() -> str | None:
    """Points jax's persistent compilation cache at ``$GPTJAX_CACHE/xla`` unless a cache folder
    is set already or caching is off; returns the folder in use (None: no cache). A
    ``gs://`` ``$GPTJAX_CACHE`` gets no compilation cache (it is per machine)."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    root = storage.cache_home()
    if storage.is_remote(root):
        return None
    folder = Path(root).expanduser() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)
