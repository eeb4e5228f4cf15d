"""gptjax: GPT-style language models in JAX/Flax — pretrain, chat fine-tune, sample, talk.

Everything the CLI does is importable, e.g. from a notebook::

    import gptjax
    config = gptjax.load_experiment("tiny")
    gptjax.pretrain(config, "runs/tiny")
    gen = gptjax.load("runs/tiny")
    print(gen("ROMEO:", max_new_tokens=50))
    gptjax.finetune(gptjax.load_experiment("chat_english"), "runs/chat", "runs/tiny")
    print(gptjax.load("runs/chat").chat([{"role": "user", "content": "Hello!"}]))

The names below load on first use (module ``__getattr__``), so ``import gptjax`` itself does
not import JAX, Orbax, TFDS or grain.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_PUBLIC = {
    "MODEL_PRESETS": "gptjax.config",
    "Config": "gptjax.config",
    "apply_overrides": "gptjax.config",
    "load_experiment": "gptjax.config",
    "validate": "gptjax.config",
    "GptjaxError": "gptjax.errors",
    "GPT": "gptjax.model",
    "Tokenizer": "gptjax.tokenizer",
    "export": "gptjax.exports",
    "import_hf": "gptjax.hf",
    "export_hf": "gptjax.hf",
    "pretrain": "gptjax.training.pretrain",
    "finetune": "gptjax.training.finetune",
    "generate": "gptjax.inference.decode",
    "Generator": "gptjax.inference.generator",
    "load": "gptjax.inference.generator",
    "ChatSession": "gptjax.inference.session",
    "plot": "gptjax.curves",
    "read_curves": "gptjax.curves",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
