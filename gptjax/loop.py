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


def sample_text(config: Config, model: GPT, params, tokenizer: Tokenizer, seed: int) -> str:
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
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint if any) and
    returns the final metrics."""
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    say: Log = log if lead else (lambda _: None)
    validate(config)
    corpus = data.load_corpus(config.data, log=say)
    config = with_vocab(config, corpus.tokenizer)
    shape = preflight(config)
    say(corpus.description)
    if lead:
        write_workdir(workdir, config, corpus.tokenizer)
    model = GPT(config.model)
    num_params = count_params(config.model)
    say(
        f"model: {num_params:,} parameters ({config.model.preset} preset, "
        f"{config.model.num_layers} layers × {config.model.embed_dim} dims, vocab "
        f"{config.model.vocab_size} padded to {config.model.padded_vocab_size}); "
        f"{jax.device_count()} devices, {config.train.parallelism} mesh data,fsdp,tensor={shape}"
    )
    t0 = time.time()
    steps = compile_steps(config, model)
    train_it = _train_iterator(config, corpus)
    ckpt = Checkpointer(workdir)
    state = steps.state
    if ckpt.latest_step() is not None and config.train.parallelism == "jit":
        state, data_state = ckpt.restore(_abstract(state))
        train_it.set_state(data_state)
        say(f"resumed from {ckpt.directory / str(ckpt.latest_step())} at step {int(state.step)}")
    val_batches = _val_batches(config, corpus)
    with MetricsWriter(workdir, enabled=lead) as writer:
        state, final = _run(
            config,
            steps,
            state,
            train_it,
            val_batches,
            writer,
            ckpt,
            model,
            corpus.tokenizer,
            say,
            num_params,
            t0,
        )
    ckpt.save(state, data_state=train_it.get_state(), config=config, tokenizer=corpus.tokenizer)
    ckpt.wait()
    ckpt.close()
    return final


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _train_iterator(config: Config, corpus: data.Corpus):
    return data.train_batches(
        corpus.train_tokens,
        max_len=config.model.max_len,
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        pad_id=corpus.tokenizer.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _val_batches(config: Config, corpus: data.Corpus):
    return data.eval_batches(
        corpus.val_tokens,
        max_len=config.model.max_len,
        global_batch_size=config.eval.batch_size or config.train.batch_size,
        num_batches=config.eval.num_batches,
        pad_id=corpus.tokenizer.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _run(
    config, steps, state, train_it, val_batches, writer, ckpt, model, tokenizer, say, num_params, t0
):
    t, e = config.train, config.eval
    start = int(jax.device_get(state.step))
    tokens_per_step = t.batch_size * config.model.max_len
    flops = flops_per_token(config.model, num_params) * tokens_per_step
    final: dict[str, Any] = {}
    bar = tqdm(
        total=t.steps,
        initial=start,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
        mininterval=1.0,
    )
    tick, tick_step = time.time(), start
    for step in range(start + 1, t.steps + 1):
        state, metrics = steps.train(state, steps.put_batch(next(train_it)))
        if step == start + 1:
            jax.block_until_ready(metrics)
            say_bar(bar, f"step {step}: compiled and ran the first step in {time.time() - t0:.1f}s")
            tick, tick_step = time.time(), step
        if step % t.log_every_steps == 0 or step == t.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"non-finite train_loss at step {step}")
            elapsed = time.time() - tick
            if step > tick_step and elapsed > 0:
                metrics["tokens_per_sec"] = (step - tick_step) * tokens_per_step / elapsed
                metrics["step_time_ms"] = 1000 * elapsed / (step - tick_step)
                metrics["tflops_per_sec"] = flops * (step - tick_step) / elapsed / 1e12
            writer.write(step, **metrics)
            bar.set_postfix(
                loss=f"{metrics['train_loss']:.3f}",
                tok_s=f"{metrics.get('tokens_per_sec', 0):,.0f}",
            )
            final.update(metrics)
            tick, tick_step = time.time(), step
        if (e.every_steps and step % e.every_steps == 0) or step == t.steps:
            final.update(
                _eval_and_sample(
                    config, steps, state, val_batches, writer, model, tokenizer, step, bar, say
                )
            )
            tick = time.time()
        if (
            config.checkpoint.every_steps
            and step % config.checkpoint.every_steps == 0
            and step != t.steps
        ):
            ckpt.save(state, data_state=train_it.get_state(), config=config, tokenizer=tokenizer)
        bar.update(1)
    bar.close()
    final["wall_time_s"] = time.time() - t0
    return state, final


def _eval_and_sample(
    config, steps, state, val_batches, writer, model, tokenizer, step, bar, say
) -> dict[str, float]:
    result = evaluate(steps, state, val_batches)
    writer.write(step, **result)
    say_bar(
        bar, f"step {step}: val_loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f})"
    )
    if config.eval.sample_tokens:  # every process samples: the params span all of them
        text = sample_text(config, model, steps.params(state), tokenizer, seed=step)
        say_bar(bar, f"--- sample at step {step} ---\n{text}\n---")
    return result


def say_bar(bar: tqdm, text: str) -> None:
    """Prints above the progress bar (process 0 only)."""
    if not bar.disable:
        bar.write(text)


def load_workdir_config(workdir: str | Path) -> Config:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{workdir} has no config.json: it is not a gptjax workdir; train one "
            f"with `gptjax pretrain --workdir {workdir}`"
        )
    return Config.from_dict(json.loads(path.read_text(encoding="utf-8")))
