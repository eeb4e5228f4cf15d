"""Chat fine-tuning (SFT): a pretrained model, dialogue data, the assistant-only loss.

``finetune(config, workdir, init_from)`` takes the model shape, tokenizer and parameters of a
pretraining workdir (or an export of one), builds a ``loop.Task`` from a dialogue source (packed
conversations whose loss mask covers only assistant content and its end-of-turn token) and runs
the same loop as pretraining with a fresh optimizer. ``val_loss`` is the assistant-token loss on
held-out conversations, measured before the first step (step 0) and at every evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from gptjax import chat, checkpoint, dialogues, lora
from gptjax.config import Config, validate
from gptjax.generate import Generator
from gptjax.loop import Log, Task, load_workdir_config, run
from gptjax.tokenizer import Tokenizer


def pretrained(init_from: str | Path) -> tuple[Config, Tokenizer]:
    """The config and tokenizer of a pretraining workdir or export directory."""
    path = Path(init_from)
    config = load_workdir_config(path)
    if not (path / "tokenizer.model").is_file():
        raise ValueError(
            f"{path} has no tokenizer.model; pass a gptjax workdir or export directory"
        )
    return config, Tokenizer.load(path / "tokenizer.model")


def finetune_config(config: Config, base: Config, init_from: str | Path) -> Config:
    """``config`` with the pretrained model's shape (dropout may differ), its tokenizer, and
    LoRA adapters of ``finetune.lora_rank`` (``gptjax/lora.py``)."""
    if base.model.lora_rank:
        raise ValueError(
            f"{init_from} holds a model with LoRA adapters (rank {base.model.lora_rank}); "
            f"`gptjax export` it first (that merges them) and fine-tune from the export"
        )
    model = dataclasses.replace(
        base.model,
        dropout_rate=config.model.dropout_rate,
        lora_rank=config.finetune.lora_rank,
        lora_alpha=config.finetune.lora_alpha,
    )
    data = dataclasses.replace(
        config.data, tokenizer=str(Path(init_from).absolute() / "tokenizer.model")
    )
    return dataclasses.replace(config, model=model, data=data)


def finetune(
    config: Config, workdir: str | Path, init_from: str | Path, *, log: Log = print
) -> dict[str, Any]:
    """Fine-tunes the model of ``init_from`` on ``config.data.source`` dialogues in
    ``workdir`` (resuming from its own checkpoints if any) and returns the final metrics."""
    validate(config)
    base, tokenizer = pretrained(init_from)
    config = finetune_config(config, base, init_from)
    say = log if jax.process_index() == 0 else (lambda _: None)
    chats = dialogues.load_dialogues(config.data, tokenizer, log=say)
    common = dict(
        max_len=config.model.max_len,
        pad_id=tokenizer.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    task = Task(
        name="finetune",
        tokenizer=tokenizer,
        description=chats.description,
        train_iterator=chat.sft_batches(
            chats.train,
            global_batch_size=config.train.batch_size,
            seed=config.train.seed,
            log=say,
            **common,
        ),
        val_batches=chat.sft_eval_batches(
            chats.validation,
            global_batch_size=config.eval.batch_size or config.train.batch_size,
            num_batches=config.eval.num_batches,
            **common,
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
    return lora.combine(checkpoint.restore_params(init_from, abstract), adapters)


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
