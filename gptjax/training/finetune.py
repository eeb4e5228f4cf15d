"""Chat fine-tuning (SFT): a pretrained model, dialogue data, the assistant-only loss.

``finetune(config, workdir, init_from)`` takes the model shape, tokenizer and parameters of a
pretraining workdir (or an export of one), builds a ``Task`` from a dialogue source (packed
conversations whose loss mask covers only assistant content and its end-of-turn token) and runs
the same loop as pretraining with a fresh optimizer. ``val_loss`` is the assistant-token loss on
held-out conversations, measured before the first step (step 0) and at every evaluation.

From the user's config it keeps everything but the model: the model section is the pretrained
one, except ``model.dropout_rate`` and the LoRA settings (``model.lora_rank``,
``model.lora_alpha``; ``gptjax/lora.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from gptjax import checkpoint, lora
from gptjax.config import Config, validate
from gptjax.data import dialogues, sft
from gptjax.errors import GptjaxError
from gptjax.inference.generator import Generator
from gptjax.metrics import Log, lead_only
from gptjax.tokenizer import Tokenizer
from gptjax.training.loop import Task, batching, run
from gptjax.workdir import TOKENIZER_FILE, read_workdir


def finetune_config(config: Config, base: Config, init_from: str | Path) -> Config:
    """``config`` with the pretrained model's shape (dropout and LoRA may differ) and its
    tokenizer."""
    if base.model.lora_rank:
        raise GptjaxError(
            f"{init_from} holds a model with LoRA adapters (rank {base.model.lora_rank}); "
            f"`gptjax export` it first (that merges them) and fine-tune from the export"
        )
    model = dataclasses.replace(
        base.model,
        dropout_rate=config.model.dropout_rate,
        lora_rank=config.model.lora_rank,
        lora_alpha=config.model.lora_alpha,
    )
    data = dataclasses.replace(
        config.data, tokenizer=str(Path(init_from).absolute() / TOKENIZER_FILE)
    )
    return dataclasses.replace(config, model=model, data=data)


def finetune(
    config: Config, workdir: str | Path, init_from: str | Path, *, log: Log = print
) -> dict[str, Any]:
    """Fine-tunes the model of ``init_from`` on ``config.data.source`` dialogues in
    ``workdir`` (resuming from its own checkpoints if any) and returns the final metrics."""
    validate(config)
    base, tokenizer = read_workdir(init_from)
    config = finetune_config(config, base, init_from)
    say = lead_only(log)
    chats = dialogues.load_dialogues(config.data, tokenizer, log=say)
    train, val = batching(config, tokenizer)
    task = Task(
        name="finetune",
        tokenizer=tokenizer,
        description=chats.description,
        train_iterator=sft.sft_batches(chats.train, train, seed=config.train.seed, log=say),
        val_batches=sft.sft_eval_batches(
            chats.validation, val, num_batches=config.eval.num_batches
        ),
        init_params=lambda fresh: pretrained_params(init_from, fresh),
        eval_at_start=True,
    )
    if config.eval.sample_tokens:
        task.sample = lambda params, seed: sample_chat(config, params, tokenizer, seed)
    return run(config, workdir, task, log=log)


def pretrained_params(init_from: str | Path, fresh: dict) -> dict:
    """The pretrained weights of ``init_from`` restored into the shardings of ``fresh`` (the
    freshly initialised parameters), whose LoRA adapters, if any, are kept as initialised."""
    base, adapters = lora.split(fresh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), base
    )
    return lora.combine(checkpoint.load_params(init_from, abstract), adapters)


def sample_chat(config: Config, params, tokenizer: Tokenizer, seed: int) -> str:
    """One exchange: ``eval.sample_prompt`` as the user's message and the model's answer."""
    e = config.eval
    gen = Generator(config, params, tokenizer)
    messages = [{"role": "user", "content": e.sample_prompt}]
    answer = gen.chat(
        messages,
        max_new_tokens=e.sample_tokens,
        temperature=e.sample_temperature,
        top_k=e.sample_top_k,
        seed=seed,
    )
    return f"user: {e.sample_prompt}\nassistant: {answer}"
