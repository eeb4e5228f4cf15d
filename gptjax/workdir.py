"""What a workdir or an export directory holds, and reading and writing its small files.

A training workdir (``gptjax pretrain`` / ``gptjax finetune``)::

    config.json        the resolved config (vocabulary size filled in)
    tokenizer.model    the tokenizer: gptjax's SentencePiece model, or a Hugging Face
                       tokenizer's tokenizer.json + tokenizer_config.json
    metrics.jsonl      one JSON object per event (gptjax/metrics.py)
    tb/                TensorBoard event files
    checkpoints/STEP/  Orbax checkpoints (gptjax/checkpoint.py)

An export (``gptjax export``, or ``gptjax import`` of a Hugging Face model) holds ``config.json``,
the tokenizer files, ``export.json`` (where it came from) and ``checkpoints/STEP/`` with the
parameters only. Everything that reads a model (``gptjax.load``, ``finetune --init-from``,
``export``) takes either.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from gptjax import storage
from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.hf_tokenizer import HF_FILE, HFTokenizer
from gptjax.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer, Tokenizer

CONFIG_FILE = "config.json"
EXPORT_FILE = "export.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints`` as an absolute path (Orbax wants one) or ``gs://`` URI."""
    return storage.absolute(workdir) / CHECKPOINTS


def write_workdir(workdir: str | Path, config: Config, tokenizer: Tokenizer) -> None:
    """Writes ``config.json`` and the tokenizer (creating ``workdir``)."""
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
    tokenizer.save_pretrained(workdir)


def write_export_info(out: str | Path, info: dict[str, Any]) -> None:
    (storage.path(out) / EXPORT_FILE).write_text(json.dumps(info) + "\n", encoding="utf-8")


def read_config(workdir: str | Path) -> Config:
    """The config saved in ``workdir`` (a training workdir or an export)."""
    path = storage.path(workdir) / CONFIG_FILE
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A SentencePiece ``.model`` file, a Hugging Face ``tokenizer.json``, or a folder holding
    either (a workdir, an export, a Hugging Face model directory)."""
    path = storage.path(path)
    if path.is_dir() and (path / SENTENCEPIECE_FILE).is_file():
        path = path / SENTENCEPIECE_FILE
    elif path.is_dir() and (path / HF_FILE).is_file():
        return HFTokenizer.load(path)
    elif path.is_file() and path.name == HF_FILE:
        return HFTokenizer.load(path.parent)
    if not path.is_file():
        raise GptjaxError(
            f"tokenizer {str(path)!r} does not exist; give a SentencePiece .model file or a "
            f'folder with {SENTENCEPIECE_FILE} or {HF_FILE} (data.tokenizer="" trains one)'
        )
    return SentencePieceTokenizer.load(path)


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Inverse of ``Tokenizer.to_state`` (what a checkpoint holds)."""
    if "huggingface" in state:
        return HFTokenizer.from_state(state["huggingface"])
    return Tokenizer.from_bytes(base64.b64decode(state["sentencepiece_model_base64"]))


def read_tokenizer(workdir: str | Path) -> Tokenizer:
    """The tokenizer saved in ``workdir``."""
    files = (storage.path(workdir) / name for name in (SENTENCEPIECE_FILE, HF_FILE))
    if not any(f.is_file() for f in files):
        raise GptjaxError(
            f"{workdir} has no {SENTENCEPIECE_FILE} or {HF_FILE}; pass a gptjax workdir or "
            f"export directory"
        )
    return load_tokenizer(workdir)


def read_workdir(workdir: str | Path) -> tuple[Config, Tokenizer]:
    """``(config, tokenizer)`` of a workdir or export."""
    return read_config(workdir), read_tokenizer(workdir)
