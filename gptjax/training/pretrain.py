"""Pretraining: next-token prediction on a text source, as a ``Task`` of the one training loop.

``pretrain(config, workdir)`` reads ``data.source`` (``gptjax/data/pipeline.py``), sizes the
vocabulary from its tokenizer, and runs ``gptjax/training/loop.py`` with windows of the corpus;
each evaluation also samples a continuation of ``eval.sample_prompt``. ``dry_run(config)``
compiles the sharded train step from abstract shapes and reports what one device will hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gptjax import checkpoint, compile_cache, host_memory
from gptjax.config import Config, validate
from gptjax.data import pipeline
from gptjax.errors import GptjaxError
from gptjax.inference.decode import generate
from gptjax.metrics import Log, flops_per_token, lead_only
from gptjax.model import GPT, count_params
from gptjax.tokenizer import Tokenizer
from gptjax.training.loop import Task, batching, preflight, run
from gptjax.training.steps import memory_plan


def pretrain(config: Config, workdir: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Pretrains ``config`` on its text source in ``workdir`` (resuming from the latest
    checkpoint if any) and returns the final metrics."""
    validate(config)
    host_memory.run_calls_inline()  # before jax starts: CPU calls reuse their memory
    compile_cache.enable()  # a rerun or resume loads its compiled programs
    if config.model.lora_rank:
        raise GptjaxError(
            "LoRA adapters are for fine-tuning a pretrained model: pretrain without "
            "model.lora_rank, then `gptjax finetune --model.lora_rank=R`"
        )
    say = lead_only(log)
    tokenizer = checkpoint.saved_tokenizer(workdir)  # a resumed run keeps its tokenizer
    corpus = pipeline.load_corpus(config.data, tokenizer=tokenizer, log=say)
    config = with_vocab(config, corpus.tokenizer)
    train, val = batching(config, corpus.tokenizer)
    task = Task(
        name="pretrain",
        tokenizer=corpus.tokenizer,
        description=corpus.description,
        train_iterator=pipeline.train_batches(corpus.train_tokens, train, seed=config.train.seed),
        val_batches=pipeline.eval_batches(
            corpus.val_tokens, val, num_batches=config.eval.num_batches
        ),
    )
    model = GPT(config.model)
    if config.eval.sample_tokens:
        task.sample = lambda params, seed: sample_text(config, model, params, task.tokenizer, seed)
    return run(config, workdir, task, log=log)


def with_vocab(config: Config, tokenizer: Tokenizer) -> Config:
    """Fills ``model.vocab_size`` from the tokenizer (or checks that it fits)."""
    m = config.model
    if m.vocab_size and m.vocab_size < tokenizer.vocab_size:
        raise GptjaxError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; set model.vocab_size=0 to take it from the tokenizer"
        )
    size = m.vocab_size or tokenizer.vocab_size
    return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=size))


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


def dry_run(config: Config, *, log: Log = print) -> dict[str, float]:
    """Compiles the train step for ``config``'s mesh from abstract shapes — nothing is
    allocated — and logs what one device will hold. Returns ``memory_plan``'s bytes."""
    validate(config)
    if not config.model.vocab_size:  # the vocabulary comes from the data's tokenizer
        config = with_vocab(config, pipeline.load_corpus(config.data, log=log).tokenizer)
    shape = preflight(config)
    plan = memory_plan(config, GPT(config.model))
    n = count_params(config.model)
    mib = {k: v / 2**20 for k, v in plan.items() if k.endswith("bytes")}
    peak = mib["argument_bytes"] + mib["output_bytes"] - mib["alias_bytes"] + mib["temp_bytes"]
    log(
        f"model {config.model.preset}: {n:,} parameters, "
        f"{flops_per_token(config.model, n, config.seq_len) / 1e9:.3f} GFLOPs per trained token\n"
        f"mesh data,fsdp,tensor={shape} over {plan['devices']} devices; per device:\n"
        f"  parameters        {mib['param_bytes']:10.1f} MiB\n"
        f"  optimizer state   {mib['opt_state_bytes']:10.1f} MiB\n"
        f"  step arguments    {mib['argument_bytes']:10.1f} MiB (state + batch, compiled)\n"
        f"  temporaries       {mib['temp_bytes']:10.1f} MiB (activations, gradients)\n"
        f"  peak estimate     {peak:10.1f} MiB"
    )
    return plan
