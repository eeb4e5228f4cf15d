"""Chat fine-tuning (SFT): a pretrained model, dialogue data, the assistant-only loss.

``finetune(config, workdir, init_from)`` takes the model shape, tokenizer and parameters of a
pretraining workdir (or an export of one), builds a ``Task`` from a dialogue source (packed
conversations whose loss mask covers only assistant content and its end-of-turn token) and runs
the same loop as pretraining with a fresh optimizer. ``val_loss`` is the assistant-token loss on
held-out conversations, measured before the first step (step 0) and at every evaluation.

From the user's config it keeps everything but the model: the model section is the pretrained
one, except what does not change the weights — dropout, the LoRA adapters (``gptjax/lora.py``)
and how the model runs (``model.dtype``, ``remat``, ``attention_impl``, ``scan_layers``; the
pretrained parameters are stacked or unstacked to match).

``init_from`` may also be a Hugging Face model (a directory or ``hf:REPO_ID``): it is imported
into ``WORKDIR/base-model`` first (``gptjax/hf.py``). A model that ships a chat template trains
in its own format. One that has neither a template nor gptjax's chat tokens (a base model such
as GPT-2) gets the tokens appended to its vocabulary; their embedding rows start at the mean
embedding plus noise of the embeddings' own spread (so that each is distinct), and the run
says so.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from gptjax import checkpoint, compile_cache, hf, host_memory, lora, storage
from gptjax.config import Config, ModelConfig, validate
from gptjax.data import dialogues, sft
from gptjax.errors import GptjaxError
from gptjax.hf_tokenizer import HFTokenizer
from gptjax.inference.generator import Generator
from gptjax.metrics import Log, lead_only
from gptjax.model import abstract_params, stack_layers, unstack_layers
from gptjax.tokenizer import Tokenizer
from gptjax.training.loop import Task, batching, run
from gptjax.workdir import read_workdir

# The model fields a fine-tuning config sets (none of them changes what the weights mean).
FROM_FINETUNE_CONFIG = (
    "dropout_rate",
    "lora_rank",
    "lora_alpha",
    "dtype",
    "matmul_precision",
    "remat",
    "attention_impl",
    "scan_layers",
)


def finetune_config(
    config: Config, base: Config, init_from: str | Path, tokenizer: Tokenizer
) -> Config:
    """``config`` with the pretrained model's shape (dropout and LoRA may differ, and the
    vocabulary grows with ``tokenizer``) and its tokenizer."""
    if base.model.lora_rank:
        raise GptjaxError(
            f"{init_from} holds a model with LoRA adapters (rank {base.model.lora_rank}); "
            f"`gptjax export` it first (that merges them) and fine-tune from the export"
        )
    ours = {key: getattr(config.model, key) for key in FROM_FINETUNE_CONFIG}
    vocab = max(base.model.vocab_size, tokenizer.vocab_size)
    model = dataclasses.replace(base.model, vocab_size=vocab, **ours)
    data = dataclasses.replace(config.data, tokenizer=os.fspath(storage.absolute(init_from)))
    return dataclasses.replace(config, model=model, data=data)


def finetune(
    config: Config, workdir: str | Path, init_from: str | Path, *, log: Log = print
) -> dict[str, Any]:
    """Fine-tunes the model of ``init_from`` on ``config.data.source`` dialogues in
    ``workdir`` (resuming from its own checkpoints if any) and returns the final metrics."""
    validate(config, fine_tune=True)  # before anything is read or imported
    host_memory.run_calls_inline()  # before jax starts: CPU calls reuse their memory
    compile_cache.enable()  # a rerun or resume loads its compiled programs
    say = lead_only(log)
    init_from = _local(init_from, workdir, say)
    base, tokenizer = read_workdir(init_from)
    tokenizer = _chat_ready(tokenizer, say)
    config = validate(finetune_config(config, base, init_from, tokenizer))  # the real shape
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
        init_params=lambda fresh: pretrained_params(
            init_from, fresh, base.model, config.model.vocab_size
        ),
        eval_at_start=True,
    )
    if config.eval.sample_tokens:
        task.sample = lambda params, seed: sample_chat(config, params, tokenizer, seed)
    return run(config, workdir, task, log=log)


def _local(init_from: str | Path, workdir: str | Path, say: Log) -> Path:
    """``init_from`` as a gptjax model directory: a Hugging Face model is imported into
    ``WORKDIR/base-model`` once (by process 0; the others wait for it)."""
    if not hf.is_hf_source(init_from):
        return storage.path(init_from)
    target = storage.path(workdir) / "base-model"
    if jax.process_index() == 0 and not (target / "config.json").is_file():
        hf.import_hf(str(init_from), target, log=say)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gptjax-import")
    return target


def _chat_ready(tokenizer: Tokenizer, say: Log) -> Tokenizer:
    """The tokenizer with a chat format: its own template, gptjax's tokens, or those added."""
    if tokenizer.chat_template or tokenizer.chat_ids or not isinstance(tokenizer, HFTokenizer):
        return tokenizer
    extended = tokenizer.with_chat_tokens()
    ids = extended.chat_ids
    say(
        f"the model has no chat template: gptjax's template adds <|system|>, <|user|>, "
        f"<|assistant|>, <|end|> as ids {ids['system']}-{ids['end']}, their embeddings the "
        f"mean embedding plus noise of its spread"
    )
    return extended


def pretrained_params(init_from: str | Path, fresh: dict, base: ModelConfig, vocab: int) -> dict:
    """The pretrained weights of ``init_from`` (a model of config ``base``) in the shardings of
    ``fresh`` (the freshly initialised parameters), whose LoRA adapters, if any, are kept as
    initialised; the rows of ids the fine-tuned vocabulary of ``vocab`` adds (chat tokens) are
    filled in."""
    fresh_base, adapters = lora.split(fresh)
    stored = nn.meta.unbox(abstract_params(base))["params"]
    if jax.tree.map(lambda x: x.shape, stored) == jax.tree.map(lambda x: x.shape, fresh_base):
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh_base
        )
        params = checkpoint.load_params(init_from, abstract)
    else:  # another layer layout or a larger padded vocabulary: on the host, then lay out
        host = unstack_layers(checkpoint.load_params(init_from, stored))
        if "h" in fresh_base:
            host = stack_layers(host, base.num_layers)
        params = jax.tree.map(_pad_to, host, fresh_base)
    return lora.combine(_new_token_rows(params, base.vocab_size, vocab), adapters)


def _pad_to(host: np.ndarray, like: jax.Array) -> jax.Array:
    padded = np.pad(host, [(0, n - h) for h, n in zip(host.shape, like.shape, strict=True)])
    return jax.device_put(padded, like.sharding)


def _new_token_rows(params: dict, old: int, new: int) -> dict:
    """Embedding rows (and untied head columns) ``[old, new)`` set to the mean of the real ones
    plus Gaussian noise of their per-dimension spread; seeded, so every process agrees."""
    if old >= new:
        return params
    key = jax.random.key(0)

    def fill(table: jax.Array) -> jax.Array:  # [V, D]
        real = table[:old]
        noise = jax.random.normal(key, (new - old, table.shape[1]), table.dtype)
        return table.at[old:new].set(real.mean(0) + noise * real.std(0))

    params = {**params, "embed": {"embedding": fill(params["embed"]["embedding"])}}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": fill(params["lm_head"]["kernel"].T).T}
    return params


def sample_chat(config: Config, params, tokenizer: Tokenizer, seed: int) -> str:
    """One exchange: ``eval.sample_prompt`` as the user's message and the model's answer,
    decoded from the training tree itself (no second copy of the kernels at every eval)."""
    e = config.eval
    gen = Generator(config, params, tokenizer, fast_layout=False)
    messages = [{"role": "user", "content": e.sample_prompt}]
    answer = gen.chat(
        messages,
        max_new_tokens=e.sample_tokens,
        temperature=e.sample_temperature,
        top_k=e.sample_top_k,
        seed=seed,
    )
    return f"user: {e.sample_prompt}\nassistant: {answer}"
