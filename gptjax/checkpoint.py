"""Orbax checkpoints under ``WORKDIR/checkpoints/<step>/``: save, resume, restore onto another
mesh or host count, export.

A checkpoint is self-describing and holds no pickles. Its items:

* ``params``     — the model parameters (restorable alone, e.g. for generation or export);
* ``train``      — ``{"step", "opt_state", "rng"}``, the rest of the ``TrainState``;
* ``data``       — the grain data-iterator state, ``{"next_index": N}``: N global batches were
  drawn. Batches are cut from one global sample order before each process takes its rows
  (``gptjax/data.py``), so N means the same for any process count or mesh, and a resumed run
  continues the global sample order exactly;
* ``config``     — the resolved config (JSON);
* ``tokenizer``  — the tokenizer's JSON state (``Tokenizer.to_state``).

An export (``gptjax/exports.py``) has the same layout with ``params``, ``config`` and
``tokenizer`` only, plus a workdir's ``config.json`` and tokenizer files
(``gptjax/workdir.py``), so ``load_params`` and ``gptjax.load`` read an export directory and a
training workdir alike.

The arrays are the *logical* train state: a pmap run saves one replica, so jit and pmap
checkpoints are interchangeable. Arrays are restored straight into the shardings of an abstract
target (each process reads only its shards), so a checkpoint written on one mesh or host count
restores onto another without gathering the state on one host.

Orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only
once every item is complete, so a run killed mid-save leaves no step that looks complete; such
leftovers are deleted when the next run opens the directory (tests/test_checkpoint.py checks
both). On ``gs://`` (no renames) it writes ``<step>/`` in place and ``<step>/commit_success.txt``
last; a step without that marker is not listed and is deleted the same way (tests/test_gcs.py
kills a run on gs:// and resumes it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as policies

from gptjax import storage
from gptjax.config import CheckpointConfig, Config
from gptjax.errors import GptjaxError
from gptjax.metrics import Log
from gptjax.model import abstract_params
from gptjax.sharding import PMAP_AXIS
from gptjax.tokenizer import Tokenizer
from gptjax.workdir import (
    checkpoint_dir,
    tokenizer_from_state,
)

UNREADABLE_DIR = "checkpoints-unreadable"  # where fallback moves checkpoints it cannot read

# What a checkpoint fixes besides its array shapes (which are always checked). A change to one
# of these keeps every array restorable but changes what the run means, above all what the data
# position (a count of global batches) points at; it needs checkpoint.allow_reshape=true.
_MODEL_FIXED = "vocab_size vocab_multiple num_layers num_heads num_kv_heads embed_dim mlp_dim"
_MODEL_FIXED += " max_len position norm activation tie_embeddings use_bias qkv_bias scan_layers"
FIXED_FIELDS = tuple(f"model.{k}" for k in _MODEL_FIXED.split()) + (
    "train.batch_size",
    "train.seed",
    "data.source",
    "data.val_fraction",
    "data.text_field",
    "data.tfds_train_split",
)


class UnreadableCheckpoint(Exception):
    """A checkpoint step whose files are missing, truncated or otherwise unreadable."""


# What reading a missing, truncated or corrupt checkpoint raises: TensorStore's ValueError
# (OUT_OF_RANGE, NOT_FOUND, DATA_LOSS), json's JSONDecodeError (a ValueError), KeyError for a
# missing item, OSError from the filesystem.
_READ_ERRORS = (ValueError, KeyError, OSError)


@contextlib.contextmanager
def _reading():
    """Turns the errors of reading a damaged checkpoint into ``UnreadableCheckpoint``; anything
    else (a bug) propagates as it is."""
    try:
        yield
    except GptjaxError:
        raise
    except _READ_ERRORS as e:
        raise UnreadableCheckpoint(_reason(e)) from e
    except Exception as e:
        # Orbax wraps TensorStore's read error in a bare Exception ("Encountered error while
        # reading array index ...", orbax-checkpoint 0.12); only that wrapper is unwrapped.
        inner = e.__cause__ or e.__context__
        if type(e) is not Exception or not isinstance(inner, _READ_ERRORS):
            raise
        _quiet_abandoned_reads()
        raise UnreadableCheckpoint(_reason(e)) from e


# Orbax's shard reader (orbax-checkpoint 0.12, serialization.py) turns every BaseException into
# that bare Exception, GeneratorExit included. When one shard of an array fails to read, the
# reads of its other shards are abandoned, and closing each at some later garbage collection
# prints "Exception ignored in: <coroutine object _read_array_index_and_device_put ...>" and a
# traceback to stderr, after the checkpoint was already reported unreadable in one line.
_ABANDONED_READ = "_read_array_index_and_device_put"


def _quiet_abandoned_reads() -> None:
    """Installs (once) a ``sys.unraisablehook`` that drops what closing an abandoned orbax
    shard read raises and passes everything else to the hook it replaces."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        if getattr(unraisable.object, "__qualname__", None) != _ABANDONED_READ:
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def handlers() -> dict[str, ocp.CheckpointHandler]:
    arrays, text = ocp.StandardCheckpointHandler, ocp.JsonCheckpointHandler
    return dict(params=arrays(), train=arrays(), data=text(), config=text(), tokenizer=text())


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def _preservation(policy: CheckpointConfig) -> dict[str, Any]:
    """Options keeping the latest ``max_to_keep`` (0 = all), plus with ``keep_best`` the one
    with the lowest val_loss. (Orbax writes metrics to disk only when ``best_fn`` is set, and
    then a reopened manager still knows the best; the policy decides what is kept.)"""
    latest = policies.LatestN(n=policy.max_to_keep or None)
    if not policy.keep_best:
        return {"preservation_policy": latest}
    best = policies.BestN(
        get_metric_fn=_val_loss,
        reverse=True,  # BestN keeps the last n after sorting: descending → the lowest loss
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    both = policies.AnyPreservationPolicy([latest, best])
    return {"preservation_policy": both, "best_fn": _val_loss, "best_mode": "min"}


class _OrbaxNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_orbax(prefix: str):
    """Drops Orbax's absl warnings that start with ``prefix`` while the block runs: notices
    about what the caller asked for, e.g. "Given directory is read only" whenever a manager
    opens checkpoints for reading (generate, finetune --init-from, export)."""
    notice = _OrbaxNotice(prefix)
    logger = logging.getLogger("absl")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class Checkpointer:
    """The checkpoints of one workdir: save (asynchronous unless ``async_save=False``),
    ``wait`` for the save in flight, restore, read the saved config and tokenizer."""

    def __init__(
        self,
        workdir: str | Path,
        policy: CheckpointConfig | None = None,
        *,
        read_only: bool = False,
    ):
        self.workdir = storage.absolute(workdir)
        self.directory = checkpoint_dir(workdir)
        self.policy = policy = policy or CheckpointConfig()
        options = ocp.CheckpointManagerOptions(
            **_preservation(policy),
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=policy.async_save and not read_only,
            cleanup_tmp_directories=not read_only,  # what a killed save left behind
        )
        with quiet_orbax("Given directory is read only"):
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers()
            )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state,
        *,
        data_state: dict,
        config: Config,
        tokenizer: Tokenizer,
        val_loss: float | None = None,
    ) -> None:
        """Starts saving ``state`` (a logical ``TrainState``) at its step. Returns once the
        arrays are copied off the devices; ``wait`` until it is on disk."""
        self.manager.save(
            int(jax.device_get(state.step)),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(_rest(state)),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
                tokenizer=ocp.args.JsonSave(tokenizer.to_state()),
            ),
            metrics=None if val_loss is None else {"val_loss": float(val_loss)},
            force=True,
        )

    def read_saved(self, step: int) -> tuple[Config, Tokenizer]:
        """The config and tokenizer saved with ``step``; ``UnreadableCheckpoint`` if missing."""
        with _reading():
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()
                ),
            )
            tokenizer, saved = tokenizer_from_state(dict(out.tokenizer)), dict(out.config)
        try:
            return Config.from_dict(saved), tokenizer
        except GptjaxError as e:  # readable, but from a gptjax with other config fields
            raise GptjaxError(
                f"checkpoint {self.directory}/{step} has a config this gptjax cannot read ({e})"
            ) from None

    def check_shapes(self, step: int, targets: dict[str, Any]) -> None:
        """Refuses targets (``{"params": tree, "train": tree}`` of abstract arrays) that differ
        in names or shapes from the items saved at ``step``; Orbax would otherwise fail deep
        inside, or pad and truncate where allowed."""
        with _reading():
            metadata = self.manager.item_metadata(step)
            saved = _shapes({name: metadata[name].tree for name in targets})
        wanted = _shapes(targets)
        if saved != wanted:
            raise GptjaxError(_shape_message(saved, wanted, f"{self.directory}/{step}"))

    def restore(self, abstract_state, step: int) -> tuple[Any, dict]:
        """``(state, data_state)`` of ``step``, restored into the shapes, dtypes and shardings of
        ``abstract_state`` (a logical ``TrainState`` of ``jax.ShapeDtypeStruct``).

        Raises ``UnreadableCheckpoint`` if any file of it cannot be read.
        """
        if not (self.directory / str(step) / "train").is_dir():
            raise GptjaxError(
                f"{self.directory}/{step} holds parameters only (an export?), not a training "
                f"state; use it with `gptjax generate`, or resume from a training workdir"
            )
        self.check_shapes(step, {"params": abstract_state.params, "train": _rest(abstract_state)})
        with _reading():
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    train=ocp.args.StandardRestore(_rest(abstract_state)),
                    data=ocp.args.JsonRestore(),
                ),
            )
        return abstract_state.replace(params=out.params, **out.train), out.data

    def set_aside(self, step: int) -> Path:
        """Moves an unreadable ``step`` to ``WORKDIR/checkpoints-unreadable/`` (process 0; every
        process must call this), so a resumed run can write that step again."""
        target = self.workdir / UNREADABLE_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.rmtree(target)
            storage.move(self.directory / str(step), target)
        if jax.process_count() > 1:  # nobody lists the steps again before the move is done
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"gptjax-set-aside-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _rest(state) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _reason(error: BaseException) -> str:
    """The first line of the innermost error (TensorStore's, naming the file) for one line of
    output; Orbax's own wrapper says little more than "error while reading"."""
    for _ in range(8):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    first = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {first[:240]}"


def _shapes(tree) -> dict[str, tuple]:
    """``{"params/h_0/mlp/up/kernel": shape}`` for the array leaves of ``tree``. Orbax saves
    namedtuples as dicts and tuples as lists, so attribute names and indices both become plain
    path parts, which makes the saved metadata and a live abstract state comparable."""

    def part(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(part(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_message(saved: dict, wanted: dict, where: str) -> str:
    changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    if changed:
        k = changed[0]
        what = f"{k} has shape {saved[k]} there but {wanted[k]} in this config"
    else:
        extra = sorted(wanted.keys() - saved.keys()) or sorted(saved.keys() - wanted.keys())
        side = "this config has" if extra[0] in wanted else "the checkpoint has"
        what = f"{side} {extra[0]} and the other does not"
    return (
        f"checkpoint {where} is of a different model or optimizer: {what} "
        f"({len(changed)} arrays differ in shape); start a new --workdir, or resume with the "
        f"model and train.grad_clip settings it was trained with"
    )


# ----------------------------------------------------------------------------- resume


def config_changes(saved: Config, config: Config) -> list[str]:
    """``["model.embed_dim: 64 → 128", ...]`` over ``FIXED_FIELDS``."""
    old, new = saved.to_dict(), config.to_dict()
    changes = []
    for dotted in FIXED_FIELDS:
        section, key = dotted.split(".")
        if old[section][key] != new[section][key]:
            changes.append(f"{dotted}: {old[section][key]!r} → {new[section][key]!r}")
    return changes


def check_compatible(
    saved: Config, saved_tokenizer: Tokenizer, config: Config, tokenizer: Tokenizer, where: str
) -> None:
    """Refuses to resume ``config`` from a checkpoint (at ``where``) that it does not continue:
    another model shape or tokenizer always; another ``FIXED_FIELDS`` value unless
    ``checkpoint.allow_reshape``."""
    changes = config_changes(saved, config)
    model_changed = any(c.startswith("model.") for c in changes)
    if model_changed and _param_shapes(saved) != _param_shapes(config):
        raise GptjaxError(
            f"checkpoint {where} is of a different model shape ({'; '.join(changes)}); start a "
            f"new --workdir, or drop those overrides to continue it"
        )
    if saved_tokenizer.fingerprint != tokenizer.fingerprint:
        raise GptjaxError(
            f"checkpoint {where} was trained with another tokenizer ({saved_tokenizer!r}, now "
            f"{tokenizer!r}); start a new --workdir, or resume with its data settings"
        )
    if changes and not config.checkpoint.allow_reshape:
        raise GptjaxError(
            f"this run changes settings that checkpoint {where} fixes ({'; '.join(changes)}); "
            f"start a new --workdir, drop those overrides, or pass "
            f"--checkpoint.allow_reshape=true to continue with the new settings"
        )


def latest_saved(ckpt: Checkpointer) -> tuple[int, Config, Tokenizer] | None:
    """``(step, config, tokenizer)`` of the latest checkpoint whose config and tokenizer read."""
    for step in reversed(ckpt.steps()):
        try:
            return step, *ckpt.read_saved(step)
        except UnreadableCheckpoint:
            continue
    return None


def check_resumable(ckpt: Checkpointer, config: Config, tokenizer: Tokenizer) -> None:
    """``check_compatible`` against the latest readable checkpoint, if any: a refusal before
    anything is compiled. ``resume`` checks again, step by step."""
    if found := latest_saved(ckpt):
        step, saved, saved_tok = found
        check_compatible(saved, saved_tok, config, tokenizer, f"{ckpt.directory}/{step}")


def _param_shapes(config: Config) -> dict[str, tuple]:
    return _shapes(nn.meta.unbox(abstract_params(config.model)))


def saved_tokenizer(workdir: str | Path) -> Tokenizer | None:
    """The tokenizer of the latest readable checkpoint of ``workdir`` (``None`` if none): a
    resumed run tokenizes with it, whatever the tokenizer cache holds now."""
    if not checkpoint_dir(workdir).is_dir():
        return None
    reader = Checkpointer(workdir, read_only=True)
    found = latest_saved(reader)
    reader.close()
    return found[2] if found else None


def resume(
    ckpt: Checkpointer,
    abstract_state,
    config: Config,
    tokenizer: Tokenizer,
    *,
    log: Log = print,
) -> tuple[Any, dict, int] | None:
    """Restores the latest complete checkpoint into ``abstract_state``: ``(state, data_state,
    step)``, or ``None`` when there is none.

    An unreadable checkpoint is a ``GptjaxError`` naming the step and the directory; with
    ``checkpoint.fallback`` it is moved aside and the previous step is tried instead. Every
    process must call this; they agree on whether each step was readable.
    """
    steps = ckpt.steps()
    for i in range(len(steps) - 1, -1, -1):
        step, where = steps[i], f"{ckpt.directory}/{steps[i]}"
        try:
            saved, saved_tok = _agree_readable(lambda s=step: ckpt.read_saved(s))
            check_compatible(saved, saved_tok, config, tokenizer, where)
            state, data_state = _agree_readable(lambda s=step: ckpt.restore(abstract_state, s))
        except UnreadableCheckpoint as e:
            previous = f" (step {steps[i - 1]})" if i else ""
            if not ckpt.policy.fallback:
                raise GptjaxError(
                    f"checkpoint step {step} in {ckpt.directory} is unreadable ({e}); pass "
                    f"--checkpoint.fallback=true to resume from the previous checkpoint"
                    f"{previous}, or delete {where} yourself"
                ) from None
            moved = ckpt.set_aside(step)
            log(f"checkpoint {where} is unreadable ({e}); moved it to {moved}")
            continue
        return state, _rebatch(data_state, saved, config, log), step
    if steps:
        raise GptjaxError(
            f"no readable checkpoint left in {ckpt.directory} (the unreadable ones are in "
            f"{ckpt.workdir / UNREADABLE_DIR}); start a new --workdir"
        )
    return None


def _agree_readable(read: Callable[[], Any]) -> Any:
    """Runs ``read`` on every process; if it raised ``UnreadableCheckpoint`` anywhere (a
    truncated file may hit only the process reading that shard), it raises everywhere."""
    try:
        out, error = read(), None
    except UnreadableCheckpoint as e:
        out, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        bad = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(bad):
            error = UnreadableCheckpoint("unreadable on another process")
    if error is not None:
        raise error
    return out


def _rebatch(data_state: dict, saved: Config, config: Config, log: Log) -> dict:
    """Keeps the global *sample* position when ``train.batch_size`` changed (allow_reshape)."""
    old, new = saved.train.batch_size, config.train.batch_size
    if old == new or "next_index" not in data_state:
        return data_state
    index = data_state["next_index"] * old // new
    log(f"train.batch_size {old} → {new}: the data continues at global batch {index}")
    return {**data_state, "next_index": index}


# ----------------------------------------------------------------------------- pmap layout


def replica_sharding() -> NamedSharding:
    """One device per process, replicated: how a pmap state (identical on every device) is
    saved and restored — one copy, written once, read by every process."""
    first: dict[int, Any] = {}
    for d in jax.devices():
        first.setdefault(d.process_index, d)
    mesh = Mesh(np.array([first[p] for p in sorted(first)]), ("replica",))
    return NamedSharding(mesh, P())


def unreplicate(state):
    """A pmap state ``[n, ...]`` → its logical state (device 0's copy) on ``replica_sharding``."""
    sharding = replica_sharding()
    here = sharding.mesh.devices.flat[jax.process_index()]

    def one(x):
        local = jax.device_put(x[0], here)
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, [local])

    return jax.tree.map(one, state)


def replicate(state, n: int):
    """Inverse of ``unreplicate``: this process's copy stacked ``[n, ...]`` for ``jax.pmap``."""
    devices = jax.local_devices()[:n]  # what jax.pmap(devices=None) maps over
    stacked = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

    def copies(x):  # one [1, ...] copy per device, never n copies on one device
        one = x.addressable_data(0)[None]
        shards = [jax.device_put(one, d) for d in devices]
        return jax.make_array_from_single_device_arrays((n, *x.shape), stacked, shards)

    return jax.tree.map(copies, state)


def abstract_of(state, *, pmap: bool = False):
    """The logical abstract state (shapes, dtypes, shardings) to restore a live ``state`` into."""
    if pmap:
        sharding = replica_sharding()
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding), state
        )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


# ----------------------------------------------------------------------------- params, export


def load_params(path: str | Path, abstract_params, step: int | None = None):
    """The parameters of the latest (or given) checkpoint of ``path`` — a training workdir or an
    ``export`` directory — restored into ``abstract_params`` (a tree of ``jax.ShapeDtypeStruct``):
    into their shardings where set (each process reads its shards), else as numpy arrays; cast to
    their dtypes (a bfloat16 export loads as float32 if asked)."""
    reader = Checkpointer(path, read_only=True)
    try:
        step = reader.latest_step() if step is None else step
        if step is None:
            raise GptjaxError(
                f"{path} has no checkpoint; train one with `gptjax pretrain --workdir {path}`"
            )
        reader.check_shapes(step, {"params": abstract_params})
        # Without a sharding Orbax would reuse the saved one, which names the saving run's
        # devices (another process count, another machine): read those onto this host instead.
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

        def unsharded(x) -> bool:
            return getattr(x, "sharding", None) is None

        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host) if unsharded(x) else x,
            abstract_params,
        )
        args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
        with _reading():
            params = reader.manager.restore(step, args=args).params
        return jax.tree.map(
            lambda x, y: np.asarray(y) if unsharded(x) else y, abstract_params, params
        )
    except UnreadableCheckpoint as e:
        raise unreadable(reader, step, e) from None
    finally:
        reader.close()


def unreadable(reader: Checkpointer, step: int | None, error: Exception) -> GptjaxError:
    return GptjaxError(f"checkpoint step {step} in {reader.directory} is unreadable ({error})")
