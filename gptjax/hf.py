"""Hugging Face checkpoints in and out: GPT-2, LLaMA (SmolLM2, TinyLlama) and Qwen2 (Qwen2.5).

``import_hf(SRC, OUT)`` reads a Hugging Face model directory (``config.json``,
``*.safetensors`` — one file or shards listed in ``model.safetensors.index.json`` — and the
tokenizer files) or ``hf:REPO_ID[@REVISION]`` (downloaded with ``huggingface_hub``), and writes a
gptjax export: ``gptjax generate``, ``chat``, ``finetune --init-from`` and ``export`` take it.
``export_hf(WORKDIR, OUT)`` writes any gptjax model whose variant is an HF architecture back
as ``config.json``, safetensors, ``generation_config.json`` and tokenizer files, loadable with
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer``.

Weights map by reshape and transpose only, through one explicit table
(``gptjax/hf_convert.py``); every tensor's shape is checked against the model's before use.

Import streams: one tensor at a time is read (memory-mapped), converted to ``--dtype`` and kept,
so the model is held once (``benchmarks/hf_import.py``, a 1.1B LLaMA: peak 1.3x the float32
model, 1.9x the bfloat16 one, Orbax's write buffers included). Nothing is written to ``OUT``
until the whole result is complete in a temporary folder beside it, which is then renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptjax import chat_template, exports, storage
from gptjax.config import Config, ModelConfig
from gptjax.errors import GptjaxError
from gptjax.hf_convert import (
    SUPPORTED,
    Tensor,
    architecture,
    hf_config,
    layout,
    model_config,
    to_gptjax,
    to_hf,
)
from gptjax.hf_tokenizer import GENERATION_FILE, HFTokenizer, from_sentencepiece
from gptjax.metrics import Log
from gptjax.model import abstract_params, stack_layers, unstack_layers
from gptjax.tokenizer import SentencePieceTokenizer, Tokenizer
from gptjax.workdir import CHECKPOINTS, read_workdir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- sources


def is_hf_source(src: str | os.PathLike) -> bool:
    """``hf:ID``, or a folder with a Hugging Face ``config.json`` and weights."""
    if str(src).startswith("hf:"):
        return True
    if storage.is_remote(src):  # gs:// holds gptjax workdirs and exports; import from local
        return False
    path = Path(src)
    return (path / "config.json").is_file() and not (path / CHECKPOINTS).exists()


def resolve(src: str, log: Log = print) -> Path:
    """A local model directory for ``src``: the directory itself, or ``hf:ID[@REV]``
    downloaded (config, safetensors, tokenizer files) into the Hugging Face cache."""
    if not src.startswith("hf:"):
        path = Path(src).expanduser()
        if not path.is_dir():
            raise GptjaxError(f"{src} is not a directory; give a Hugging Face model directory")
        return path
    repo, _, revision = src[3:].partition("@")
    try:
        import huggingface_hub  # only for hf: sources (the [hf] extra)
    except ImportError:
        raise GptjaxError(
            f"{src} needs huggingface_hub to download; pip install huggingface_hub, or "
            f"download the model elsewhere and pass its directory"
        ) from None
    log(f"downloading {repo}{'@' + revision if revision else ''} from the Hugging Face Hub")
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    try:
        local = huggingface_hub.snapshot_download(
            repo, revision=revision or None, allow_patterns=patterns
        )
    except OSError as e:  # offline, unknown repo or revision, gated: all are OSErrors
        raise GptjaxError(
            f"could not download {src} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"check the name and your connection, or download it where you have internet and "
            f"pass the directory"
        ) from None
    return Path(local)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise GptjaxError(
            f"{directory} has no config.json: it is not a Hugging Face model directory"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptjaxError(f"{path} is not valid JSON ({e})") from None
    if config.get("model_type") not in SUPPORTED:
        raise GptjaxError(
            f"{directory} holds a {config.get('model_type')!r} model; gptjax imports the model "
            f"types {', '.join(SUPPORTED)}"
        )
    return config


# ----------------------------------------------------------------------------- import


def import_hf(
    src: str, out: str | os.PathLike, *, dtype: str = "float32", log: Log = print
) -> Path:
    """Imports the Hugging Face model ``src`` (a directory or ``hf:ID[@REV]``) as a gptjax
    export in the new directory ``out``; returns ``out``."""
    if dtype not in DTYPES:
        raise GptjaxError(f"--dtype={dtype!r} is not one of {DTYPES}")
    out = storage.absolute(out)
    _check_new(out)
    directory = resolve(str(src), log)
    hf = read_config(directory)
    tokenizer = HFTokenizer.load(directory)
    name = str(src)[3:] if str(src).startswith("hf:") else directory.name
    m = model_config(hf, name.split("@")[0].split("/")[-1])
    _check_vocab(m, tokenizer, log)
    params = read_params(directory, m, hf["model_type"], dtype)
    info = {"source": str(src), "model_type": hf["model_type"], "dtype": dtype}
    with _staged(out, orbax=True) as tmp:
        exports.write_export(tmp, params, Config(model=m), tokenizer, 0, info)
    log(
        f"imported {src} ({hf['model_type']}, {m.num_layers} layers × {m.embed_dim}, "
        f"vocab {m.vocab_size:,}, {dtype}) → {out}"
    )
    return out


def _check_vocab(m: ModelConfig, tokenizer: Tokenizer, log: Log) -> None:
    if tokenizer.vocab_size > m.vocab_size:
        raise GptjaxError(
            f"the tokenizer has {tokenizer.vocab_size:,} ids but config.json's vocab_size is "
            f"{m.vocab_size:,}: they do not belong to the same model"
        )
    if tokenizer.vocab_size < m.vocab_size:
        log(
            f"config.json's vocab_size {m.vocab_size:,} is larger than the tokenizer's "
            f"{tokenizer.vocab_size:,} (padding rows, as trained): the model keeps all rows, "
            f"sampling never picks the ids past the tokenizer's"
        )


def read_params(directory: Path, m: ModelConfig, kind: str, dtype: str) -> dict:
    """The gptjax parameter tree of the checkpoint in ``directory``, tensor by tensor."""
    per_layer = dataclasses.replace(m, scan_layers=False)  # the name map is per layer
    shapes = _flat(nn.meta.unbox(abstract_params(per_layer))["params"])
    shapes = {path: x.shape for path, x in shapes.items()}
    files = _weight_files(directory)
    tensors = {_stored_name(t.name, files): t for t in layout(m, kind)}
    flat = {}
    for file in sorted({files[name] for name in tensors}):
        with _open_weights(file) as weights:
            for name in (n for n in tensors if files[n] == file):
                value = weights.get_tensor(name).astype(jax.numpy.dtype(dtype))
                flat.update(to_gptjax(tensors[name], value, shapes))
    if missing := sorted(set(shapes) - set(flat)):
        raise GptjaxError(f"{directory} lacks the weights for {missing[0]}; is it complete?")
    tree = _unflat(flat)
    return stack_layers(tree, m.num_layers) if m.scan_layers else tree


def _weight_files(directory: Path) -> dict[str, Path]:
    """``{tensor name: file}`` from ``model.safetensors`` or the shard index."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = {name: directory / file for name, file in weight_map.items()}
        if absent := sorted({f.name for f in files.values() if not f.is_file()}):
            raise GptjaxError(f"{directory} lacks the shard {absent[0]} listed in {INDEX_FILE}")
        return files
    if (directory / SINGLE_FILE).is_file():
        with _open_weights(directory / SINGLE_FILE) as weights:
            return {name: directory / SINGLE_FILE for name in weights.keys()}  # noqa: SIM118
    if any(directory.glob("pytorch_model*.bin")):
        raise GptjaxError(
            f"{directory} has PyTorch .bin weights only; gptjax reads safetensors (never "
            f"pickles): convert them, e.g. load with transformers and save_pretrained(..., "
            f"safe_serialization=True)"
        )
    raise GptjaxError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


@contextlib.contextmanager
def _open_weights(file: Path) -> Iterator[Any]:
    try:
        with safe_open(str(file), framework="np") as weights:
            yield weights
    except SafetensorError as e:
        raise GptjaxError(
            f"{file} is not a readable safetensors file ({e}); download it again"
        ) from None


def _stored_name(name: str, files: dict[str, Path]) -> str:
    """The name a tensor has in this checkpoint: GPT-2 checkpoints come with and without the
    ``transformer.`` prefix."""
    for candidate in (name, name.removeprefix("transformer.")):
        if candidate in files:
            return candidate
    raise GptjaxError(f"the checkpoint has no tensor {name!r}; is it complete?")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _check_new(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptjaxError(f"--out {out} already exists and is not empty; choose a new directory")


@contextlib.contextmanager
def _staged(out: Path, *, orbax: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only when complete. For a
    ``gs://`` ``out`` (no renames there): a local folder uploaded when complete, or ``out``
    itself for an Orbax export, whose checkpoint counts only once its commit marker is
    written last (and ``export.json`` after it)."""
    if storage.is_remote(out):
        if orbax:
            yield out
            return
        with tempfile.TemporaryDirectory(prefix="gptjax-export-") as tmp:
            yield Path(tmp)
            storage.upload_tree(Path(tmp), out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty: _check_new
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- export


def export_hf(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    step: int | None = None,
    max_shard_bytes: int = 5 * 10**9,
    log: Log = print,
) -> Path:
    """Writes ``workdir``'s model (latest or ``step`` checkpoint, LoRA merged) to ``out`` in
    Hugging Face format; returns ``out``."""
    if dtype not in DTYPES:
        raise GptjaxError(f"--dtype={dtype!r} is not one of {DTYPES}")
    out = storage.absolute(out)
    _check_new(out)
    m = read_workdir(workdir)[0].model
    if m.lora_rank:
        m = dataclasses.replace(m, lora_rank=0)
    kind = architecture(m)  # refuse before reading any weights
    params, config, tokenizer, step = exports.plain_params(workdir, step)
    params = unstack_layers(params)  # the name map is per layer
    flat = {k: np.asarray(v).astype(jax.numpy.dtype(dtype)) for k, v in _flat(params).items()}
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer = from_sentencepiece(tokenizer)
    with _staged(out) as tmp:
        per_layer = dataclasses.replace(config.model, scan_layers=False)
        _write_shards(tmp, layout(per_layer, kind), flat, config.model, max_shard_bytes)
        hf = hf_config(config.model, tokenizer.bos_id, tokenizer.eos_id, dtype)
        _write_json(tmp / "config.json", hf)
        _write_json(tmp / GENERATION_FILE, _generation_config(tokenizer))
        tokenizer.save_pretrained(tmp)
    log(f"exported {workdir} (step {step}) as a Hugging Face {kind} model → {out}")
    return out


def _write_shards(out: Path, tensors: list[Tensor], flat: dict, m: ModelConfig, limit: int) -> None:
    """``model.safetensors``, or shards of at most ``limit`` bytes with their index."""
    sizes = [sum(flat[p].nbytes for p in t.paths) for t in tensors]
    shards: list[list[Tensor]] = [[]]
    used = 0
    for t, size in zip(tensors, sizes, strict=True):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        save_file({t.name: to_hf(t, flat, m) for t in shard}, out / name, {"format": "pt"})
    if len(shards) > 1:
        weight_map = {t.name: n for n, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_json(out / INDEX_FILE, index)


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """Where HF ``generate`` stops: the chat format's end-of-turn ids when there is one."""
    chat = tokenizer.chat_template or tokenizer.chat_ids
    stops = list(chat_template.stop_ids(tokenizer) if chat else tokenizer.eos_ids)
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_id,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
