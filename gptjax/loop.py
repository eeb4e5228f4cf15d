"""The pretraining loop, as phases: prepare data → check the layout → initialise or resume →
train (log, evaluate, sample, checkpoint) → finish.

Only process 0 writes logs, metrics, samples and the workdir files; every process runs the same
steps on its own shard of each global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gptjax import data, sharding
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config, validate
from gptjax.generate import generate
from gptjax.metrics import MetricsWriter, flops_per_token
from gptjax.model import GPT, count_params
from gptjax.tokenizer import Tokenizer
from gptjax.train import Steps, compile_steps

Log = Callable[[str], None]


def preflight(config: Config) -> tuple[int, int, int]:
    """Checks the config against the devices present; returns the mesh shape.

    Each failure is one ``ValueError`` line naming the setting and the fix.
    """
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
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by {what} × "
            f"train.grad_accum_steps={t.grad_accum_steps} = {per_step}; use a multiple of "
            f"{per_step}"
        )
    if t.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )
    for key, value in [
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.kv_heads),
        ("model.mlp_dim", m.hidden_dim),
    ]:
        if value % tensor:
            raise ValueError(
                f"{key}={value} must be divisible by mesh.tensor={tensor}; "
                f"lower mesh.tensor or change {key}"
            )
    return shape


def with_vocab(config: Config, tokenizer: Tokenizer) -> Config:
    """Fills ``model.vocab_size`` from the tokenizer (or checks that it fits)."""
    m = config.model
    if m.vocab_size and m.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; set model.vocab_size=0 to take it from the "
            f"tokenizer"
        )
    size = m.vocab_size or tokenizer.vocab_size
    return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=size))


def write_workdir(workdir: Path, config: Config, tokenizer: Tokenizer) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    tokenizer.save(workdir / "tokenizer.model")


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
    ``init_params`` (plain arrays) replace the fresh initialisation, e.g. a pretrained model.
    """

    name: str
    tokenizer: Tokenizer
    description: str
    train_iterator: Any  # grain DatasetIterator of host-local batches
    val_batches: list[dict[str, np.ndarray]]
    sample: Callable[[Any, int], str] | None = None
    init_params: Any = None
    eval_at_start: bool = False


def sample_text(config: Config, model: GPT, params, tokenizer: Tokenizer, seed: int) -> str:
    """Continues ``eval.sample_prompt`` with ``eval.sample_tokens`` sampled tokens."""
    e = config.eval
    prompt = tokenizer.encode(e.sample_prompt) or [tokenizer.bos_id]
    tokens = generate(
        params,
        model,
        prompt[-config.model.max_len :],
        max_new_tokens=e.sample_tokens,
        temperature=e.sample_temperature,
        top_k=e.sample_top_k,
        seed=seed,
    )
    return tokenizer.decode(tokens)


def pretrain(config: Config, workdir: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Pretrains ``config`` on its text source in ``workdir`` (resuming from the latest
    checkpoint if any) and returns the final metrics."""
    validate(config)
    say = _lead_only(log)
    corpus = data.load_corpus(config.data, log=say)
    config = with_vocab(config, corpus.tokenizer)
    common = dict(
        max_len=config.model.max_len,
        pad_id=corpus.tokenizer.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    task = Task(
        name="pretrain",
        tokenizer=corpus.tokenizer,
        description=corpus.description,
        train_iterator=data.train_batches(
            corpus.train_tokens,
            global_batch_size=config.train.batch_size,
            seed=config.train.seed,
            **common,
        ),
        val_batches=data.eval_batches(
            corpus.val_tokens,
            global_batch_size=config.eval.batch_size or config.train.batch_size,
            num_batches=config.eval.num_batches,
            **common,
        ),
    )
    model = GPT(config.model)
    if config.eval.sample_tokens:
        task.sample = lambda params, seed: sample_text(config, model, params, task.tokenizer, seed)
    return run(config, workdir, task, log=log)


def _lead_only(log: Log) -> Log:
    return log if jax.process_index() == 0 else (lambda _: None)


def run(config: Config, workdir: str | Path, task: Task, *, log: Log = print) -> dict[str, Any]:
    """The loop shared by pretraining and fine-tuning: preflight → init or resume → train
    (log, evaluate, sample, checkpoint) → final checkpoint. Returns the final metrics."""
    workdir, say = Path(workdir), _lead_only(log)
    shape = preflight(config)
    say(task.description)
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
    t0 = time.time()
    steps = compile_steps(config, model, init_params=task.init_params)
    ckpt = Checkpointer(workdir)
    state = steps.state
    if ckpt.latest_step() is not None and config.train.parallelism == "jit":
        state, data_state = ckpt.restore(_abstract(state))
        task.train_iterator.set_state(data_state)
        say(f"resumed from {ckpt.directory / str(ckpt.latest_step())} at step {int(state.step)}")
    loop = _Loop(
        config,
        steps,
        task,
        MetricsWriter(workdir, enabled=jax.process_index() == 0),
        ckpt,
        say,
        num_params,
        t0,
    )
    try:
        state, final = loop.train(state)
    finally:
        loop.writer.close()
    ckpt.save(
        state, data_state=task.train_iterator.get_state(), config=config, tokenizer=task.tokenizer
    )
    ckpt.wait()
    ckpt.close()
    return final


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


@dataclasses.dataclass
class _Loop:
    config: Config
    steps: Steps
    task: Task
    writer: MetricsWriter
    ckpt: Checkpointer
    say: Log
    num_params: int
    t0: float

    def train(self, state) -> tuple[Any, dict[str, Any]]:
        t = self.config.train
        start = int(jax.device_get(state.step))
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
        if self.task.eval_at_start and start == 0:
            final.update(self.evaluate(state, 0))
        tick, tick_step = time.time(), start
        for step in range(start + 1, t.steps + 1):
            state, metrics = self.steps.train(
                state, self.steps.put_batch(next(self.task.train_iterator))
            )
            if step == start + 1:
                jax.block_until_ready(metrics)
                self.note(
                    f"step {step}: compiled and ran the first step in {time.time() - self.t0:.1f}s"
                )
                tick, tick_step = time.time(), step
            if step % t.log_every_steps == 0 or step == t.steps:
                final.update(self.log_train(step, metrics, time.time() - tick, step - tick_step))
                tick, tick_step = time.time(), step
            e = self.config.eval
            if (e.every_steps and step % e.every_steps == 0) or step == t.steps:
                final.update(self.evaluate(state, step))
                tick = time.time()
            every = self.config.checkpoint.every_steps
            if every and step % every == 0 and step != t.steps:
                self.ckpt.save(
                    state,
                    data_state=self.task.train_iterator.get_state(),
                    config=self.config,
                    tokenizer=self.task.tokenizer,
                )
            self.bar.update(1)
        self.bar.close()
        final["wall_time_s"] = time.time() - self.t0
        return state, final

    def log_train(self, step: int, metrics, elapsed: float, steps_done: int) -> dict[str, float]:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"non-finite train_loss at step {step}")
        if steps_done > 0 and elapsed > 0:
            tokens = self.config.train.batch_size * self.config.model.max_len * steps_done
            flops = flops_per_token(self.config.model, self.num_params) * tokens
            metrics["tokens_per_sec"] = tokens / elapsed
            metrics["step_time_ms"] = 1000 * elapsed / steps_done
            metrics["tflops_per_sec"] = flops / elapsed / 1e12
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


def load_workdir_config(workdir: str | Path) -> Config:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{workdir} has no config.json: it is not a gptjax workdir; train one "
            f"with `gptjax pretrain --workdir {workdir}`"
        )
    return Config.from_dict(json.loads(path.read_text(encoding="utf-8")))
