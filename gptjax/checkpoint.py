"""Orbax checkpoints under ``WORKDIR/checkpoints/<step>/``.

A checkpoint is self-describing and holds no pickles. Its items:

* ``params``     — the model parameters (restorable alone, e.g. for generation or export);
* ``train``      — ``{"step", "opt_state", "rng"}``, the rest of the ``TrainState``;
* ``data``       — the grain data-iterator state (JSON);
* ``config``     — the resolved config (JSON);
* ``tokenizer``  — the SentencePiece model, base64 in JSON.

Arrays are restored straight into the shardings of an abstract target, so a checkpoint written
on one mesh restores onto another without gathering the state on one host.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax.config import Config
from gptjax.tokenizer import Tokenizer


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


class Checkpointer:
    """Saves and restores training states; saves are asynchronous (``wait`` finalises)."""

    def __init__(
        self, workdir: str | Path, *, max_to_keep: int | None = 3, read_only: bool = False
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, *, data_state: dict, config: Config, tokenizer: Tokenizer) -> None:
        step = int(jax.device_get(state.step))
        rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(rest),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
                tokenizer=ocp.args.JsonSave(_tokenizer_json(tokenizer)),
            ),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, data_state)`` into the shapes and shardings of ``abstract_state``
        (a ``TrainState`` of ``jax.ShapeDtypeStruct`` with ``sharding`` set)."""
        step = self.latest_step() if step is None else step
        rest = {
            "step": abstract_state.step,
            "opt_state": abstract_state.opt_state,
            "rng": abstract_state.rng,
        }
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train=ocp.args.StandardRestore(rest),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = abstract_state.replace(params=out.params, **out.train)
        return state, out.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _tokenizer_json(tokenizer: Tokenizer) -> dict[str, str]:
    return {"sentencepiece_model_base64": base64.b64encode(tokenizer.to_bytes()).decode()}


def restore_params(workdir: str | Path, abstract_params, step: int | None = None):
    """Restores only the parameters of the latest (or given) checkpoint of ``workdir``."""
    manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(
            f"workdir {workdir} has no checkpoint; run `gptjax pretrain --workdir {workdir}` first"
        )
    out = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    manager.close()
    return out.params
