"""What a workdir or an export directory holds, and reading and writing its small files.

A training workdir (``gptjax pretrain`` / ``gptjax finetune``)::

    config.json        the resolved config (vocabulary size filled in)
    tokenizer.model    the tokenizer
    metrics.jsonl      one JSON object per event (gptjax/metrics.py)
    tb/                TensorBoard event files
    checkpoints/STEP/  Orbax checkpoints (gptjax/checkpoint.py)

An export (``gptjax export``) holds ``config.json``, ``tokenizer.model``, ``export.json`` (where
it came from) and ``checkpoints/STEP/`` with the parameters only. Everything that reads a model
(``gptjax.load``, ``finetune --init-from``, ``export``) takes either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
EXPORT_FILE = "export.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints`` as an absolute path (Orbax wants one)."""
    return Path(workdir).absolute() / CHECKPOINTS


def write_workdir(workdir: str | Path, config: Config, tokenizer: Tokenizer) -> None:
    """Writes ``config.json`` and the tokenizer (creating ``workdir``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
    tokenizer.save(workdir / TOKENIZER_FILE)


def write_export_info(out: str | Path, info: dict[str, Any]) -> None:
    (Path(out) / EXPORT_FILE).write_text(json.dumps(info) + "\n", encoding="utf-8")


def read_config(workdir: str | Path) -> Config:
    """The config saved in ``workdir`` (a training workdir or an export)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise GptjaxError(
            f"{workdir} has no {CONFIG_FILE}: it is not a gptjax workdir or export; train one "
            f"with `gptjax pretrain --workdir {workdir}`"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptjaxError(f"{path} is not valid JSON ({e}); restore it or start anew") from None
    return Config.from_dict(saved)


def read_tokenizer(workdir: str | Path) -> Tokenizer:
    """The tokenizer saved in ``workdir``."""
    path = Path(workdir) / TOKENIZER_FILE
    if not path.is_file():
        raise GptjaxError(
            f"{workdir} has no {TOKENIZER_FILE}; pass a gptjax workdir or export directory"
        )
    return Tokenizer.load(path)


def read_workdir(workdir: str | Path) -> tuple[Config, Tokenizer]:
    """``(config, tokenizer)`` of a workdir or export."""
    return read_config(workdir), read_tokenizer(workdir)
