"""Exports: a model alone, without optimizer state, in gptjax's format.

An export directory holds ``config.json``, the tokenizer files, ``export.json`` (where it came
from) and ``checkpoints/STEP/`` with the parameters only (``gptjax/checkpoint.py`` reads it like
a training workdir). ``export`` writes one from a training workdir; ``gptjax/hf.py`` writes one
from a Hugging Face model (``gptjax import``) and reads ``plain_params`` to write Hugging Face
format (``gptjax export --format hf``). LoRA adapters are always merged first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from gptjax import lora, storage
from gptjax.checkpoint import (
    Checkpointer,
    UnreadableCheckpoint,
    handlers,
    load_params,
    quiet_orbax,
    unreadable,
)
from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.model import abstract_params
from gptjax.workdir import checkpoint_dir, read_config, write_export_info, write_workdir

EXPORT_DTYPES = ("float32", "bfloat16")


def plain_params(workdir: str | Path, step: int | None = None) -> tuple[Any, Config, Any, int]:
    """``(params, config, tokenizer, step)`` of ``workdir``'s latest (or given) checkpoint as
    host (numpy) arrays, with LoRA adapters merged into their weights (``gptjax/lora.py``), so
    that the result is a plain model. Single-process: the parameters pass through host memory.
    """
    reader = Checkpointer(workdir, read_only=True)
    try:
        step = reader.latest_step() if step is None else step
        if step is None:
            raise GptjaxError(f"{workdir} has no checkpoint to export; train one first")
        config, tokenizer = reader.read_saved(step)
    except UnreadableCheckpoint as e:
        raise unreadable(reader, step, e) from None
    finally:
        reader.close()
    abstract = nn.meta.unbox(abstract_params(config.model))["params"]
    params = load_params(workdir, abstract, step)  # numpy: no sharding given
    if config.model.lora_rank:  # a plain model again: the adapters folded into their weights
        params, config = lora.merge(params, config.model), lora.without_lora(config)
    return params, config, tokenizer, step


def write_export(out: Path, params, config: Config, tokenizer, step: int, info: dict) -> Path:
    """Writes an export (parameters only, with config and tokenizer) into the new directory
    ``out``; returns its checkpoint directory. ``params`` are host (numpy) arrays."""
    write_workdir(out, config, tokenizer)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(checkpoint_dir(out), options=options, item_handlers=handlers())
    with _numpy_saved_in_place(), manager as writer:
        writer.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                config=ocp.args.JsonSave(config.to_dict()),
                tokenizer=ocp.args.JsonSave(tokenizer.to_state()),
            ),
        )
    write_export_info(out, info)
    return checkpoint_dir(out) / str(step)


@contextlib.contextmanager
def _numpy_saved_in_place():
    """Orbax (0.12) copies every numpy array before writing it, in case the caller changes it
    during an asynchronous save; this save is synchronous and the arrays are ours, so the copy
    would only double the peak memory of an import (benchmarks/hf_import.py measured it)."""
    default = ocp.type_handlers.get_type_handler(np.ndarray)
    no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    with quiet_orbax("Type handler registry type"):  # "... overriding": that is the point
        ocp.type_handlers.register_type_handler(np.ndarray, no_copy, override=True)
    try:
        yield
    finally:
        with quiet_orbax("Type handler registry type"):
            ocp.type_handlers.register_type_handler(np.ndarray, default, override=True)


def export(
    workdir: str | Path, out: str | Path, *, dtype: str = "float32", step: int | None = None
) -> Path:
    """Writes the parameters of ``workdir``'s latest (or given) checkpoint, without optimizer
    state and optionally cast to bfloat16, with its config and tokenizer, to ``out``.

    LoRA adapters are merged into their weights (``plain_params``). ``out`` then reads like a
    workdir: ``load_params(out, ...)``, ``gptjax.load(out)`` and ``gptjax generate --workdir
    OUT`` work on it. Returns the checkpoint directory written.
    """
    if dtype not in EXPORT_DTYPES:
        raise GptjaxError(f"export dtype={dtype!r} is not one of {EXPORT_DTYPES}")
    out = storage.absolute(out)
    if checkpoint_dir(out).exists() and any(checkpoint_dir(out).iterdir()):
        raise GptjaxError(f"{out} already holds checkpoints; export to a new directory")
    lora_rank = read_config(workdir).model.lora_rank
    params, config, tokenizer, step = plain_params(workdir, step)
    params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    source = str(checkpoint_dir(workdir) / str(step))
    info = {"source": source, "dtype": dtype, "merged_lora_rank": lora_rank}
    return write_export(out, params, config, tokenizer, step, info)
