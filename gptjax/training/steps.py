"""Training: the state, pure loss/step functions, and their jit (sharded) and pmap wrappers.

Every step function here is pure: ``train_step(state, batch) -> (state, metrics)``. Where and how
it is compiled (mesh shardings, donation, pmap) is decided once, in ``compile_steps``. The loop
that drives it lives in ``gptjax/training/loop.py``.

Batches are dicts of ``[B, T]`` arrays: ``inputs`` and ``targets`` (int32) and ``weights``
(float32, 0 on padding and on tokens that carry no loss). Losses are token-weighted means, so a
batch split into micro-batches (gradient accumulation) or over devices gives the same update as
the whole batch at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from gptjax import lora as lora_lib
from gptjax import sharding
from gptjax.config import Config, TrainConfig
from gptjax.model import GPT, layer_axes
from gptjax.sharding import PMAP_AXIS

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # base dropout key; step k uses fold_in(rng, k)


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, cosine decay to ``min_learning_rate``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.decay_steps or train.steps, train.warmup_steps + 1),
        end_value=train.min_learning_rate,
    )


def make_optimizer(train: TrainConfig, lora: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on matrices only (not on biases,
    norm scales or — being vectors — nothing else; GPT-2/nanoGPT practice).

    With ``lora``, only the LoRA adapters train (``gptjax/lora.py``): every other parameter gets
    a zero update and no optimizer state, and the clipping norm is the adapters'."""

    def decay_mask(params):  # matrices, counted per layer (scan_layers stacks a layers axis)
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.ndim - layer_axes(path) >= 2, params
        )

    adamw = optax.adamw(
        lr_schedule(train),
        b1=train.beta1,
        b2=train.beta2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=decay_mask,
    )
    if train.grad_clip > 0:
        adamw = optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    if lora:
        return optax.multi_transform(
            {"trainable": adamw, "frozen": optax.set_to_zero()}, lora_lib.trainable
        )
    return adamw


def init_state(
    config: Config, model: GPT, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Fresh parameters, optimizer state and dropout key. Params stay boxed with their logical
    axis names, so ``jax.eval_shape`` of this function yields the sharding specs."""
    init_rng, dropout_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, 1), jnp.int32)  # shapes of the parameters do not depend on it
    params = model.init(init_rng, tokens)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng
    )


def loss_sums(params, batch: Batch, *, model: GPT, rng: jax.Array | None) -> tuple:
    """Summed cross-entropy over weighted targets and the summed weights: ``([], [])``."""
    if model.config.lora_rank:
        params = lora_lib.freeze(params)  # gradients for the adapters only
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )  # [B, T, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    weights = batch["weights"]
    return jnp.sum(nll * weights), jnp.sum(weights)


def grad_sums(params, batch: Batch, *, model: GPT, rng: jax.Array | None, accum: int):
    """Gradient of the summed loss over ``accum`` sequential micro-batches (``lax.scan``, so
    memory is that of one micro-batch). Returns ``(grads, loss_sum, weight_sum)``."""
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_sums(p, b, model=model, rng=r), has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, xs):
        grads, loss, weight = carry
        mb, i = xs
        r = None if rng is None else jax.random.fold_in(rng, i)
        (loss_i, w), g = grad_fn(params, mb, r)
        return (jax.tree.map(jnp.add, grads, g), loss + loss_i, weight + w), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss, weight), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
    return grads, loss, weight


def apply_update(
    state: TrainState,
    grads,
    loss_sum,
    weight_sum,
    *,
    tx,
    schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Normalises summed gradients by the token count and takes one optimizer step."""
    weight_sum = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / weight_sum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train_loss": loss_sum / weight_sum,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(
    state: TrainState, batch: Batch, *, model: GPT, tx, schedule, accum: int, dropout: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a (global) batch."""
    rng = jax.random.fold_in(state.rng, state.step) if dropout else None
    grads, loss, weight = grad_sums(state.params, batch, model=model, rng=rng, accum=accum)
    return apply_update(state, grads, loss, weight, tx=tx, schedule=schedule)


def train_steps(state: TrainState, batches: Batch, **kw) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` on each of ``batches`` (every leaf ``[k, B, T]``) in turn, as one
    ``lax.scan``: k optimizer steps in one compiled call, metrics stacked ``[k]``."""
    return jax.lax.scan(functools.partial(train_step, **kw), state, batches)


def pmap_train_step(
    state: TrainState, batch: Batch, *, model: GPT, tx, schedule, accum: int, dropout: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` for one device under ``jax.pmap``: the same gradient code, then a sum of
    gradients, losses and token counts over devices (a token-weighted ``pmean``)."""
    rng = jax.random.fold_in(state.rng, state.step) if dropout else None
    if rng is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(PMAP_AXIS))
    sums = grad_sums(state.params, batch, model=model, rng=rng, accum=accum)
    grads, loss, weight = jax.lax.psum(sums, PMAP_AXIS)
    return apply_update(state, grads, loss, weight, tx=tx, schedule=schedule)


def eval_step(params, batch: Batch, *, model: GPT) -> tuple[jax.Array, jax.Array]:
    """Summed validation loss and token count of one batch: ``([], [])``."""
    return loss_sums(params, batch, model=model, rng=None)


@dataclasses.dataclass
class Steps:
    """Compiled step functions and the layout they expect.

    ``put_batch`` turns a host-local numpy batch into what ``train``/``eval`` take;
    ``params`` extracts plain (unboxed, unreplicated) parameters from a state. With
    ``train.steps_per_call`` = k > 1, ``train_many`` takes k batches stacked by ``put_batches``
    and runs k steps in one call (``train_steps``); otherwise it is None.
    """

    state: TrainState
    train: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    eval: Callable[[Any, Batch], tuple[jax.Array, jax.Array]]
    put_batch: Callable[[dict], Batch]
    params: Callable[[TrainState], Any]
    mesh: jax.sharding.Mesh | None = None
    train_many: Callable[[TrainState, Batch], tuple[TrainState, dict]] | None = None
    put_batches: Callable[[list[dict]], Batch] | None = None


def _step_kwargs(config: Config, model: GPT) -> dict[str, Any]:
    return dict(
        model=model,
        tx=make_optimizer(config.train, lora=config.model.lora_rank > 0),
        schedule=lr_schedule(config.train),
        accum=config.train.grad_accum_steps,
        dropout=config.model.dropout_rate > 0,
    )


@dataclasses.dataclass
class ShardedPlan:
    """The jit layout of a config on a mesh: abstract state with shardings, compiled-on-call
    step functions. Nothing here allocates device memory until ``init`` is called."""

    mesh: jax.sharding.Mesh
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves, each with its sharding
    batch_sharding: jax.sharding.NamedSharding
    init: Callable[[jax.Array], TrainState]
    train: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    eval: Callable[[Any, Batch], tuple[jax.Array, jax.Array]]
    train_many: Callable[[TrainState, Batch], tuple[TrainState, dict]]

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules that the model's sharding constraints read."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            yield


def plan_sharded(config: Config, model: GPT, devices: list | None = None) -> ShardedPlan:
    """Lays the train state and batches out on the ``(data, fsdp, tensor)`` mesh."""
    kw = _step_kwargs(config, model)
    mesh = sharding.make_mesh(config.mesh, devices)
    init = functools.partial(init_state, config, model, kw["tx"])
    # Shapes and logical axis names only: the full state never materialises on one device.
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    boxed = jax.eval_shape(init, rng)
    state_sharding = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        state_sharding,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    return ShardedPlan(
        mesh=mesh,
        abstract_state=abstract,
        batch_sharding=batch_sharding,
        init=jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding),
        train=jax.jit(
            functools.partial(train_step, **kw),
            donate_argnums=0,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, None),
        ),
        eval=jax.jit(
            functools.partial(eval_step, model=model),
            in_shardings=(state_sharding.params, batch_sharding),
        ),
        train_many=jax.jit(  # compiled only if called (train.steps_per_call > 1)
            functools.partial(train_steps, **kw),
            donate_argnums=0,
            in_shardings=(state_sharding, sharding.stacked_batch_sharding(mesh)),
            out_shardings=(state_sharding, None),
        ),
    )


def compile_steps(
    config: Config, model: GPT, devices: list | None = None, init_params: Callable | None = None
) -> Steps:
    """Initialises the state on ``devices`` (default: all) and wraps the step functions for
    ``config.train.parallelism``: "jit" over a ``(data, fsdp, tensor)`` mesh, or "pmap".

    ``init_params(fresh_params) -> params``, when given, supplies the starting parameters from
    the freshly initialised ones (e.g. a pretrained checkpoint restored straight into their
    shardings, new LoRA adapters kept).
    """
    rng = jax.random.PRNGKey(config.train.seed)  # raw uint32[2]: checkpointable as is
    if config.train.parallelism == "pmap":
        return _pmap_steps(config, model, rng, devices, init_params)
    plan = plan_sharded(config, model, devices)

    def in_context(fn):
        def run(*args):
            with plan.context():
                return fn(*args)

        return run

    state = in_context(plan.init)(rng)
    if init_params is not None:
        state = state.replace(params=init_params(state.params))
    many = config.train.steps_per_call > 1
    return Steps(
        state=state,
        train=in_context(plan.train),
        eval=in_context(plan.eval),
        put_batch=lambda b: sharding.global_batch(b, plan.mesh),
        params=lambda s: s.params,
        mesh=plan.mesh,
        train_many=in_context(plan.train_many) if many else None,
        put_batches=(lambda bs: sharding.global_batches(bs, plan.mesh)) if many else None,
    )


def _pmap_steps(config: Config, model: GPT, rng, devices: list | None, init_params) -> Steps:
    kw = _step_kwargs(config, model)
    n = len(devices or jax.local_devices())
    state = jax.jit(lambda r: nn.meta.unbox(init_state(config, model, kw["tx"], r)))(rng)
    if init_params is not None:
        state = state.replace(params=init_params(state.params))
    state = jax.tree.map(lambda x: jnp.stack([x] * n), state)  # [n, ...] replicas
    step = jax.pmap(
        functools.partial(pmap_train_step, **kw),
        axis_name=PMAP_AXIS,
        donate_argnums=0,
        devices=devices,
    )

    def train(state, batch):
        state, metrics = step(state, batch)
        return state, jax.tree.map(lambda m: m[0], metrics)

    evaluate_dev = jax.pmap(
        lambda p, b: jax.lax.psum(eval_step(p, b, model=model), PMAP_AXIS),
        axis_name=PMAP_AXIS,
        devices=devices,
    )

    def put_batch(local):
        return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local.items()}

    return Steps(
        state=state,
        train=train,
        eval=lambda params, b: jax.tree.map(lambda m: m[0], evaluate_dev(params, b)),
        put_batch=put_batch,
        params=lambda s: jax.tree.map(lambda x: x[0], s.params),
    )


def memory_plan(config: Config, model: GPT, devices: list | None = None) -> dict[str, float]:
    """Lowers and compiles the sharded train step from abstract shapes — nothing is allocated —
    and returns per-device bytes: parameters and optimizer state (from their shardings) and the
    compiler's own account (``compiled.memory_analysis()``) of arguments, outputs and
    temporaries."""
    plan = plan_sharded(config, model, devices)
    b, t = config.train.batch_size, config.seq_len
    batch = {
        "inputs": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=plan.batch_sharding),
        "targets": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=plan.batch_sharding),
        "weights": jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=plan.batch_sharding),
    }
    with plan.context():
        compiled = plan.train.lower(plan.abstract_state, batch).compile()
    mem = compiled.memory_analysis()

    def shard_bytes(tree) -> int:
        return sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )

    def total_bytes(tree) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    state = plan.abstract_state
    return {
        "devices": plan.mesh.size,
        "param_bytes": shard_bytes(state.params),
        "opt_state_bytes": shard_bytes(state.opt_state),
        "total_state_bytes": total_bytes(state),
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "batch_bytes": sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch.values()
        ),
    }
