"""gptjax: GPT-style language models in JAX/Flax — pretrain, chat fine-tune, sample, talk.

Everything the CLI does is importable, e.g. from a notebook::

    import gptjax
    config = gptjax.load_experiment("tiny")
    gptjax.pretrain(config, "runs/tiny")
    gen = gptjax.load("runs/tiny")
    print(gen("ROMEO:", max_new_tokens=50))
    gptjax.finetune(gptjax.load_experiment("chat_english"), "runs/chat", "runs/tiny")
    print(gptjax.load("runs/chat").chat([{"role": "user", "content": "Hello!"}]))
"""

from gptjax.config import (
    MODEL_PRESETS,
    Config,
    apply_overrides,
    load_experiment,
    validate,
)
from gptjax.config import ModelConfig as GPTConfig
from gptjax.finetune import finetune
from gptjax.generate import Generator, generate, load
from gptjax.loop import pretrain
from gptjax.model import GPT
from gptjax.session import ChatSession
from gptjax.tokenizer import Tokenizer

train = pretrain

__all__ = [
    "GPT",
    "ChatSession",
    "GPTConfig",
    "MODEL_PRESETS",
    "Config",
    "Generator",
    "Tokenizer",
    "apply_overrides",
    "finetune",
    "generate",
    "load",
    "load_experiment",
    "pretrain",
    "train",
    "validate",
]
