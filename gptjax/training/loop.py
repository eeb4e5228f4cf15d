"""The training loop shared by pretraining and fine-tuning: check the layout → initialise or
resume → train (log, evaluate, sample, checkpoint) → finish. What differs between the two is a
``Task`` (data, tokenizer, samples, starting parameters): ``gptjax/training/pretrain.py`` and
``gptjax/training/finetune.py`` build one each.

Only process 0 writes logs, metrics, samples and the workdir files; every process runs the same
steps on its own shard of each global batch.

Fault tolerance (see ``gptjax/checkpoint.py`` for what a checkpoint holds):

* Resume: a workdir with checkpoints continues from the latest complete one, with its tokenizer
  and data position, so the continued run is the run that never stopped.
* SIGTERM/SIGINT (preemption, SLURM time limits, Ctrl-C): the current step finishes, a
  checkpoint of it is saved and finalised, and ``run`` returns normally. A second Ctrl-C stops
  at once (``KeyboardInterrupt``).
* Non-finite loss or gradient norm: ``TrainingDiverged`` (a ``GptjaxError``) naming the step.
  Metrics are read back at every log step and before every save, and the state is checked
  before it is saved, so no checkpoint ever holds a NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gptjax import checkpoint, curves, distributed, host_memory, lora, sharding, storage
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config
from gptjax.data.pipeline import Batching
from gptjax.errors import GptjaxError, TrainingDiverged
from gptjax.metrics import Log, MetricsWriter, flops_per_token, lead_only, peak_flops
from gptjax.model import GPT, abstract_params, count_params
from gptjax.tokenizer import Tokenizer
from gptjax.training.steps import Steps, compile_steps
from gptjax.workdir import write_workdir


def preflight(config: Config) -> tuple[int, int, int]:
    """Checks the config against the devices present; returns the mesh shape.

    Each failure is one ``GptjaxError`` line naming the setting and the fix.
    """
    distributed.check_processes_agree(config)  # same versions and config on every process
    m, t = config.model, config.train
    num_devices = jax.device_count()
    if t.parallelism == "pmap":
        shape = (num_devices, 1, 1)
    else:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    data_ways, _, tensor = shape[0] * shape[1], shape[1], shape[2]
    per_step = data_ways * t.grad_accum_steps
    if t.batch_size % per_step:
        what = (
            f"devices={num_devices}" if t.parallelism == "pmap" else f"mesh data*fsdp={data_ways}"
        )
        raise GptjaxError(
            f"train.batch_size={t.batch_size} must be divisible by {what} × "
            f"train.grad_accum_steps={t.grad_accum_steps} = {per_step}; use a multiple of "
            f"{per_step}"
        )
    if t.batch_size % jax.process_count():
        raise GptjaxError(
            f"train.batch_size={t.batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )
    if m.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise GptjaxError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, and this run is on "
            f"{jax.default_backend()}; use model.attention_impl='auto' or 'xla'"
        )
    if m.attention_impl == "cudnn" and m.dtype not in ("auto", "bfloat16"):
        raise GptjaxError(
            f"model.attention_impl='cudnn' runs in bfloat16, but model.dtype={m.dtype!r}; set "
            f"model.dtype='bfloat16' (or 'auto'), or model.attention_impl='xla'"
        )
    for key, value in [
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.kv_heads),
        ("model.mlp_dim", m.hidden_dim),
    ]:
        if value % tensor:
            raise GptjaxError(
                f"{key}={value} must be divisible by mesh.tensor={tensor}; "
                f"lower mesh.tensor or change {key}"
            )
    return shape


def batching(config: Config, tokenizer: Tokenizer) -> tuple[Batching, Batching]:
    """How a task cuts its train and validation data: window length, padding, global batch
    sizes, and which rows of each global batch are this process's."""
    common = dict(
        seq_len=config.seq_len,
        pad_id=tokenizer.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train = Batching(global_batch_size=config.train.batch_size, **common)
    val = Batching(global_batch_size=config.eval.batch_size or config.train.batch_size, **common)
    return train, val


def evaluate(steps: Steps, state, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted validation loss and perplexity over fixed batches."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, weight_sum = jax.device_get(steps.eval(state.params, steps.put_batch(batch)))
        total, count = total + float(loss_sum), count + float(weight_sum)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@dataclasses.dataclass
class Task:
    """What a run trains on: pretraining text and chat fine-tuning differ only here.

    ``sample(params, seed) -> str`` shows the model's behaviour at each evaluation;
    ``init_params(fresh_params) -> params`` replaces the fresh initialisation, e.g. with a
    pretrained model (see ``train.compile_steps``).
    """

    name: str
    tokenizer: Tokenizer
    description: str
    train_iterator: Any  # grain DatasetIterator of host-local batches
    val_batches: list[dict[str, np.ndarray]]
    sample: Callable[[Any, int], str] | None = None
    init_params: Any = None
    eval_at_start: bool = False


def run(config: Config, workdir: str | Path, task: Task, *, log: Log = print) -> dict[str, Any]:
    """The loop shared by pretraining and fine-tuning: preflight → init or resume → train
    (log, evaluate, sample, checkpoint) → final checkpoint. Returns the final metrics; after a
    SIGTERM/SIGINT stop they include ``stopped_at_step`` and ``stopped_by``."""
    workdir, say = storage.path(workdir), lead_only(log)
    shape = preflight(config)
    distributed.check_shared_workdir(workdir)  # several processes: one folder, or stop now
    say(task.description)
    ckpt = Checkpointer(workdir, config.checkpoint)
    try:
        checkpoint.check_resumable(ckpt, config, task.tokenizer)  # refuse before compiling
    except GptjaxError:
        ckpt.close()
        raise
    if jax.process_index() == 0:
        write_workdir(workdir, config, task.tokenizer)
    model = GPT(config.model)
    num_params = count_params(config.model)
    m = config.model
    say(
        f"model: {num_params:,} parameters ({m.preset} preset, {m.num_layers} layers × "
        f"{m.embed_dim} dims, vocab {m.vocab_size} padded to {m.padded_vocab_size}); "
        f"{jax.device_count()} devices, {config.train.parallelism} mesh data,fsdp,tensor={shape}"
    )
    if m.lora_rank:
        trainable = lora.count_trainable(abstract_params(m))
        say(
            f"LoRA rank {m.lora_rank} (alpha {m.lora_alpha:g}): {trainable:,} trainable "
            f"parameters ({trainable / num_params:.2%}); every pretrained weight is frozen"
        )
    t0 = time.time()
    host_memory.keep_freed_memory()  # on CPU: each call reuses the last one's buffers
    steps = compile_steps(config, model, init_params=task.init_params)
    loop = _Loop(config, steps, task, ckpt, say, num_params, t0)
    # Signals are caught until the last save is on disk: a SIGTERM then only ends the run early.
    with _StopSignals() as stop:
        try:
            state = loop.resume(steps.state)
            # Opened at the step the run continues from: later records of a killed run go.
            loop.writer = MetricsWriter(
                workdir, enabled=jax.process_index() == 0, resume_step=_host_step(state)
            )
            state, final = loop.train(state, stop)
            loop.writer.close()  # every record written (uploaded, for a gs:// workdir)
            if jax.process_index() == 0:  # the picture of the run, beside its metrics
                curves.plot([workdir], workdir / curves.CURVES_FILE)
        finally:
            if loop.bar is not None:
                loop.bar.close()  # before the CLI prints an error line, not after it
            if loop.writer is not None:
                loop.writer.close()
            ckpt.close()  # waits for the save in flight, even after an error
    return final


def _host_step(state) -> int:
    """The step counter as an int (a pmap state holds one per device)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class _StopSignals:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current step; a
    SIGINT after that raises ``KeyboardInterrupt`` at once. The previous handlers come back on
    exit.

    Multi-process runs must stop at the same step on every process: ``agreed`` takes the
    maximum of every process's signal with ``process_allgather`` at each log step (where the
    loop waits for the devices anyway), so a signal delivered to any one process — or to all,
    a step apart — stops all of them together within ``train.log_every_steps`` steps.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0  # the first signal number, 0 = none
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            # None: a handler installed outside Python (e.g. JAX's preemption notifier).
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received:  # Ctrl-C again: stop now, no save
            raise KeyboardInterrupt
        self.received = self.received or signum

    def agreed(self, step: int, every: int) -> str | None:
        """The name of the signal this process (or, multi-process, any process) received."""
        received = self.received
        if jax.process_count() > 1:
            if step % every:
                return None
            from jax.experimental import multihost_utils

            received = int(np.max(multihost_utils.process_allgather(np.int32(received))))
        return signal.Signals(received).name if received else None


@dataclasses.dataclass
class _Loop:
    config: Config
    steps: Steps
    task: Task
    ckpt: Checkpointer
    say: Log
    num_params: int
    t0: float
    writer: MetricsWriter | None = None  # opened once the resumed step is known
    bar: tqdm | None = None
    tick: tuple[float, int] = (0.0, 0)  # (time, step) where the throughput window starts
    pending: list = dataclasses.field(default_factory=list)  # [(step, metrics)] not yet read

    @property
    def pmap(self) -> bool:
        return self.config.train.parallelism == "pmap"

    @functools.cached_property
    def peak_flops(self) -> float:
        """One device's peak FLOP/s: ``train.peak_flops``, else the device's known figure."""
        return self.config.train.peak_flops or peak_flops(jax.devices()[0].device_kind)

    def resume(self, state):
        """The latest complete checkpoint restored into ``state``'s layout, else ``state``."""
        abstract = checkpoint.abstract_of(state, pmap=self.pmap)
        found = checkpoint.resume(
            self.ckpt, abstract, self.config, self.task.tokenizer, log=self.say
        )
        if found is None:
            return state
        restored, data_state, step = found
        self.task.train_iterator.set_state(data_state)
        self.say(f"resumed from {self.ckpt.directory / str(step)} at step {step}")
        if self.pmap:
            return checkpoint.replicate(restored, jax.tree.leaves(state)[0].shape[0])
        return restored

    def train(self, state, stop: _StopSignals) -> tuple[Any, dict[str, Any]]:
        t = self.config.train
        start = step = _host_step(state)
        self.bar = tqdm(
            total=t.steps,
            initial=start,
            desc=self.task.name,
            unit="step",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
            mininterval=1.0,
        )
        final: dict[str, Any] = {}
        if start >= t.steps:
            self.note(f"already at step {start} of train.steps={t.steps}; nothing to train")
        if self.task.eval_at_start and start == 0:
            final.update(self.evaluate(state, 0))
        while step < t.steps:
            state, done = self.advance(state, step)
            if step == start:
                jax.block_until_ready(state.step)
                took = time.time() - self.t0
                self.note(f"step {done}: compiled and ran the first call in {took:.1f}s")
                self.tick = (time.time(), done)
            self.bar.update(done - step)
            step = done
            if self.after(state, step, stop, final):
                break
        self.bar.close()
        final["wall_time_s"] = time.time() - self.t0
        return state, final

    def advance(self, state, step: int) -> tuple[Any, int]:
        """Runs the steps after ``step``: ``train.steps_per_call`` of them in one compiled call
        when ``step`` is a multiple of it and they all fit, else one. Returns the new step."""
        k, it = self.config.train.steps_per_call, self.task.train_iterator
        if k == 1 or step % k or step + k > self.config.train.steps:
            state, metrics = self.steps.train(state, self.steps.put_batch(next(it)))
            self.pending.append(([step + 1], jax.tree.map(lambda m: m[None], metrics)))
            return state, step + 1
        batches = self.steps.put_batches([next(it) for _ in range(k)])
        state, metrics = self.steps.train_many(state, batches)  # each metric [k]
        self.pending.append((list(range(step + 1, step + k + 1)), metrics))
        return state, step + k

    def after(self, state, step: int, stop: _StopSignals, final: dict[str, Any]) -> bool:
        """Logs, evaluates, checkpoints as due at ``step``; True when a signal ends the run."""
        t, c, e = self.config.train, self.config.checkpoint, self.config.eval
        last = step == t.steps
        if step % t.log_every_steps == 0 or last:
            final.update(self.log_train(step))
        sync_every = 1 if jax.process_count() == 1 else t.log_every_steps
        signal_name = stop.agreed(step, sync_every)
        if signal_name and not last:
            final.update(self.stop(state, step, signal_name))
            return True
        val_loss = None
        if (e.every_steps and step % e.every_steps == 0) or last:
            final.update(self.evaluate(state, step))
            val_loss = final["val_loss"]
            self.tick = (time.time(), step)  # evaluation time is not training throughput
        keep = c.keep_best and val_loss is not None
        if last or (c.every_steps and step % c.every_steps == 0) or keep:
            self.save(state, step, val_loss)
        return False

    def read_metrics(self) -> dict[str, float]:
        """Fetches the metrics of the steps run since the last call; raises at the first step
        whose loss or gradient norm is not finite. Returns the latest step's."""
        if not self.pending:
            return {}
        values = jax.device_get([m for _, m in self.pending])
        for (steps, _), m in zip(self.pending, values, strict=True):
            for key in ("train_loss", "grad_norm"):
                for step, value in zip(steps, m[key], strict=True):
                    if not math.isfinite(float(value)):
                        self.halt(f"{key} is {float(value)} at step {step}")
        self.pending.clear()
        return {k: float(v[-1]) for k, v in values[-1].items()}

    def halt(self, what: str) -> None:
        latest = self.ckpt.latest_step()
        kept = (
            f"the last good checkpoint is {self.ckpt.directory / str(latest)}"
            if latest is not None
            else "no checkpoint was saved"
        )
        raise TrainingDiverged(
            f"{what}; training stopped and nothing from that step on was saved ({kept}); lower "
            f"train.learning_rate or raise train.warmup_steps, then rerun to resume"
        )

    def save(self, state, step: int, val_loss: float | None = None) -> None:
        """Starts an asynchronous checkpoint of ``state`` (step ``step``) once it is known to be
        finite: the metrics of every step so far, then every parameter and moment."""
        self.read_metrics()
        logical = checkpoint.unreplicate(state) if self.pmap else state
        if not bool(_all_finite((logical.params, logical.opt_state))):
            self.halt(f"the parameters or optimizer state are not finite after step {step}")
        self.ckpt.save(
            logical,
            data_state=self.task.train_iterator.get_state(),
            config=self.config,
            tokenizer=self.task.tokenizer,
            val_loss=val_loss,
        )
        if self.writer is not None:
            self.writer.sync()  # a gs:// workdir's metrics, up to this checkpoint

    def stop(self, state, step: int, signal_name: str) -> dict[str, Any]:
        """Saves ``step`` and waits until it is on disk: the job may be killed right after."""
        if step != self.ckpt.latest_step():
            self.save(state, step)
        self.ckpt.wait()
        self.bar.close()
        self.say(
            f"stopped by {signal_name} after step {step}: checkpoint "
            f"{self.ckpt.directory / str(step)} saved; run the same command again to resume"
        )
        return {"stopped_at_step": step, "stopped_by": signal_name}

    def log_train(self, step: int) -> dict[str, float]:
        metrics = self.read_metrics()
        # Timed after the fetch: dispatch is asynchronous, the steps have only now finished.
        since, since_step = self.tick
        elapsed, steps_done = time.time() - since, step - since_step
        if steps_done > 0 and elapsed > 0:
            c = self.config
            tokens = c.train.batch_size * c.seq_len * steps_done
            flops = flops_per_token(c.model, self.num_params, c.seq_len) * tokens / elapsed
            metrics["tokens_per_sec"] = tokens / elapsed
            metrics["step_time_ms"] = 1000 * elapsed / steps_done
            metrics["tflops_per_sec"] = flops / 1e12
            if self.peak_flops:  # model FLOPs utilisation, of all devices together
                metrics["mfu"] = flops / (jax.device_count() * self.peak_flops)
        self.tick = (time.time(), step)
        self.writer.write(step, **metrics)
        self.bar.set_postfix(
            loss=f"{metrics['train_loss']:.3f}", tok_s=f"{metrics.get('tokens_per_sec', 0):,.0f}"
        )
        return metrics

    def evaluate(self, state, step: int) -> dict[str, float]:
        result = evaluate(self.steps, state, self.task.val_batches)
        self.writer.write(step, **result)
        self.note(
            f"step {step}: val_loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f})"
        )
        if self.task.sample:  # every process samples: the params span all of them
            text = self.task.sample(self.steps.params(state), step)
            self.note(f"--- sample at step {step} ---\n{text}\n---")
        return result

    def note(self, text: str) -> None:
        """Prints above the progress bar (process 0 only)."""
        if not self.bar.disable:
            self.bar.write(text)
