"""Dialogue sources for chat fine-tuning: records → validated conversations → rendered splits.

``data.source`` picks one of three schemes:

* ``chatterbot:LANG`` — the YAML files of the ``chatterbot-corpus`` package
  (``chatterbot_corpus/data/<LANG>/*.yml``; ``LANG`` is a folder name such as ``english`` or
  ``chinese``, or ``all``), read as data with ``yaml`` (chatterbot's code is never imported).
  Each conversation is a list of strings: user and assistant turns alternating, user first.
* ``jsonl:PATH`` — one ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line
  (OpenAI fine-tuning / Hugging Face chat layout; blank lines are ignored). PATH is a file, or a
  folder holding ``train.jsonl`` and ``val.jsonl``.
* ``tfds:NAME[/CONFIG]`` — a prepared TFDS dataset in array_record format with a ``messages``
  feature: ``Sequence({"role": Text, "content": Text})``, or JSON text of the message list.

Every record is checked with ``validate_messages``. A bad one is reported as
``PATH:LINE: reason`` (chatterbot: the line where the conversation starts and its index in the
file; tfds: ``tfds:NAME[split]:INDEX``). With ``data.on_bad_record="error"`` (the default) the
first of them fails the run in one line that also counts the rest; with ``"skip"`` they are
left out, counted and logged. The shipped english corpus has one: trivia.yml's bingo question
is a YAML scalar that swallowed its answer.

Without explicit splits a conversation is held out for validation when the first 64 bits of the
sha256 of its canonical JSON fall below ``data.val_fraction``: stable under reordering and
additions, and identical conversations always land on the same side. Local sources are
materialised once (``text.materialise``: one canonical JSON text per conversation, in a TFDS
array_record dataset keyed by its content hash) and read back from there, as pretraining text is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grain
import yaml

from gptjax import storage
from gptjax.chat_template import Messages, validate_messages
from gptjax.config import DataConfig
from gptjax.data import pipeline, sft, tfds_catalog
from gptjax.data import text as text_sources
from gptjax.errors import GptjaxError
from gptjax.metrics import Log
from gptjax.tokenizer import Tokenizer

# (where, messages, reason): reason is None exactly when messages is a valid conversation.
Record = tuple[str, Any, str | None]
MESSAGES_FIELD = "messages"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


@dataclasses.dataclass(frozen=True, eq=False)
class Dialogues:
    """A dialogue source, rendered with the chat template (see ``gptjax/chat_template.py``)."""

    tokenizer: Tokenizer
    train: sft.ChatSplit
    validation: sft.ChatSplit
    description: str  # one line: source, split rule, counts, tokens, skipped records
    skipped: int  # bad records left out (data.on_bad_record="skip")


def canonical_json(messages: Messages) -> str:
    """The stored form of a valid conversation: role and content only, compact UTF-8 JSON."""
    kept = [{"role": m["role"], "content": m["content"]} for m in messages]
    return json.dumps(kept, ensure_ascii=False, separators=(",", ":"))


def held_out(messages: Messages, val_fraction: float) -> bool:
    """Whether the hash split puts this conversation in validation (see module docstring)."""
    digest = hashlib.sha256(canonical_json(messages).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


# ----------------------------------------------------------------------------- readers


def chatterbot_files(lang: str) -> list[Path]:
    """The YAML files of one chatterbot-corpus language (or of ``all``), sorted by path."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise GptjaxError(
            f"data.source='chatterbot:{lang}' needs the chatterbot-corpus package; "
            "pip install chatterbot-corpus, or use --data.source=jsonl:PATH"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    langs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if lang != "all" and lang not in langs:
        raise GptjaxError(
            f"data.source='chatterbot:{lang}' is not a chatterbot-corpus language; use "
            f"'all' or one of {', '.join(langs)}"
        )
    return sorted(root.glob("*/*.yml" if lang == "all" else f"{lang}/*.yml"))


def read_chatterbot(path: Path) -> Iterator[Record]:
    """One record per conversation of a chatterbot YAML file, located by its first line."""
    loader = _YAML_LOADER(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()  # the node tree keeps line numbers
        doc = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        yield f"{path}:{line}", None, f"YAML error: {getattr(err, 'problem', err)}"
        return
    finally:
        loader.dispose()
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        yield f"{path}:1", None, "no 'conversations' list at the top level"
        return
    items = next(v for k, v in node.value if k.value == "conversations").value
    for i, (turns, item) in enumerate(zip(conversations, items, strict=True)):
        where = f"{path}:{item.start_mark.line + 1}"
        if not isinstance(turns, list):
            yield where, None, f"conversation {i} is a {type(turns).__name__}, not a list of turns"
            continue
        roles = ("user", "assistant")
        messages = [{"role": roles[j % 2], "content": t} for j, t in enumerate(turns)]
        reason = validate_messages(messages)
        yield where, messages, reason and f"conversation {i}: {reason}"


def read_jsonl(path: Path) -> Iterator[Record]:
    """One record per non-blank line of a JSONL file: ``{"messages": [...]}``."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, f"not valid UTF-8 (byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, None, f"bad JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict) or MESSAGES_FIELD not in obj:
                yield where, None, 'not a JSON object with a "messages" list'
                continue
            yield where, obj[MESSAGES_FIELD], validate_messages(obj[MESSAGES_FIELD])


def _text(value: Any) -> Any:
    """bytes (TFDS Text) → str; anything else unchanged (validation reports its type)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def messages_of(value: Any) -> tuple[Any, str | None]:
    """A TFDS ``messages`` value → (messages, reason or None).

    Accepts JSON text of a message list, a dict of ``role``/``content`` sequences (how TFDS
    returns a ``Sequence`` of dicts) or a list of message dicts.
    """
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            return None, f"bad JSON ({err.msg} at column {err.colno})"
    if isinstance(value, dict) and {"role", "content"} <= value.keys():
        turns = zip(value["role"], value["content"], strict=False)  # TFDS: equal lengths
        value = [{"role": r, "content": c} for r, c in turns]
    if isinstance(value, (list, tuple)):
        value = [{k: _text(v) for k, v in m.items()} if isinstance(m, dict) else m for m in value]
    return value, validate_messages(value)


def read_tfds_split(builder, name: str, split: str) -> Iterator[Record]:
    """One record per example of a prepared TFDS split, located as ``tfds:NAME[split]:i``."""
    examples = builder.as_data_source(split)
    for i in range(len(examples)):
        messages, reason = messages_of(examples[i][MESSAGES_FIELD])
        yield f"tfds:{name}[{split}]:{i}", messages, reason


# ----------------------------------------------------------------------------- bad records


def keep_valid(records: Iterable[Record], bad: list[str]) -> list[Messages]:
    """The valid conversations of ``records``, canonical; ``where: reason`` of the rest → bad."""
    valid = []
    for where, messages, reason in records:
        if reason is None:
            valid.append(json.loads(canonical_json(messages)))
        else:
            bad.append(f"{where}: {reason}")
    return valid


def _settle(bad: list[str], data: DataConfig, log: Log, *, shipped: bool) -> int:
    """Fails on the first bad record of the user's data (``on_bad_record="error"``) or logs
    them; a shipped corpus's own bad records are always skipped (nobody can fix them)."""
    if not bad:
        return 0
    count = "1 bad record" if len(bad) == 1 else f"{len(bad):,} bad records"
    if data.on_bad_record == "error" and not shipped:
        them = "it" if len(bad) == 1 else "them"
        raise GptjaxError(
            f"{bad[0]} ({count} in data.source={data.source!r}; fix {them}, or set "
            "--data.on_bad_record=skip)"
        )
    shipped_by = " that the package ships" if shipped else ""
    log(f"skipped {count}{shipped_by} of {data.source} (first: {bad[0]})")
    return len(bad)


# ----------------------------------------------------------------------------- sources


def _hash_split(
    conversations: list[Messages], val_fraction: float
) -> tuple[list[Messages], list[Messages]]:
    val = [held_out(c, val_fraction) for c in conversations]
    return (
        [c for c, v in zip(conversations, val, strict=True) if not v],
        [c for c, v in zip(conversations, val, strict=True) if v],
    )


def local_records(data: DataConfig, bad: list[str]) -> tuple[list, list, str]:
    """``chatterbot:LANG`` or ``jsonl:PATH`` → (train, validation, description)."""
    scheme, _, rest = data.source.partition(":")
    split_rule = f"validation = {data.val_fraction:.0%} of the conversations by content hash"
    if scheme == "chatterbot":
        files = chatterbot_files(rest)
        version = importlib.metadata.version("chatterbot-corpus")
        records = itertools.chain.from_iterable(read_chatterbot(f) for f in files)
        train, val = _hash_split(keep_valid(records, bad), data.val_fraction)
        what = f"{len(files)} files of chatterbot-corpus {version}"
        return train, val, f"{data.source}: {what}, {split_rule}"
    path = storage.path(rest)
    if not rest or not path.exists():
        raise GptjaxError(
            f"data.source={data.source!r}: no such file or folder; give a .jsonl file or a "
            "folder with train.jsonl and val.jsonl"
        )
    if path.is_file():
        train, val = _hash_split(keep_valid(read_jsonl(path), bad), data.val_fraction)
        return train, val, f"{data.source}: {split_rule}"
    named = [path / "train.jsonl", path / "val.jsonl"]
    if not all(p.is_file() for p in named):
        raise GptjaxError(
            f"data.source={data.source!r} is a folder without train.jsonl and val.jsonl; add "
            "both, or point jsonl: at one .jsonl file to split it by hash"
        )
    train, val = (keep_valid(read_jsonl(p), bad) for p in named)
    return train, val, f"{data.source}: train.jsonl, validation = val.jsonl"


def _materialised(train: list, val: list, description: str, root: Path, log: Log):
    """Writes the conversations as TFDS array_record (once per content) and reads them back."""
    text = text_sources.LocalText(
        tuple(map(canonical_json, train)), tuple(map(canonical_json, val)), description
    )
    source = text_sources.open_local(text, root / "datasets", log)
    read = [[json.loads(doc) for doc in split] for split in (source.train, source.validation)]
    return read[0], read[1], f"chat-{text.content_hash}"


def tfds_records(name: str, data: DataConfig, bad: list[str]) -> tuple[list, list, str, str]:
    """``tfds:NAME`` → (train, validation, description, cache key)."""
    fix = "chat fine-tuning reads a list of role/content messages from that feature"
    builder, splits = tfds_catalog.open_dataset(name, data, feature=MESSAGES_FIELD, fix=fix)
    train, val = (
        keep_valid(read_tfds_split(builder, name, split), bad)
        for split in (data.tfds_train_split, data.tfds_val_split)
    )
    key = "chat-" + tfds_catalog.dataset_key(builder, splits, MESSAGES_FIELD)
    return train, val, tfds_catalog.describe(f"tfds:{name}", builder, data, splits), key


def load_dialogues(
    data: DataConfig, tokenizer: Tokenizer | None = None, *, log: Log = print
) -> Dialogues:
    """Reads, validates, splits and renders ``data.source``; trains a tokenizer if needed.

    Args:
      data: source, split rule, ``on_bad_record``, tokenizer choice and cache folder.
      tokenizer: use this one (e.g. the pretrained checkpoint's) instead of ``data.tokenizer``
        or one trained on the train conversations' text (cached like pretraining's).
      log: receives one human-readable line per step.
    """
    root = pipeline.cache_root(data)
    scheme, _, name = data.source.partition(":")
    bad: list[str] = []
    if scheme in ("chatterbot", "jsonl"):
        train, val, description = local_records(data, bad)
    elif scheme == "tfds" and name:
        train, val, description, key = tfds_records(name, data, bad)
    else:
        raise GptjaxError(
            f"data.source={data.source!r} is not a dialogue source; use 'chatterbot:LANG', "
            "'jsonl:PATH' or 'tfds:NAME[/CONFIG]'"
        )
    skipped = _settle(bad, data, log, shipped=scheme == "chatterbot")
    for split, convs in (("train", train), ("validation", val)):
        if not convs:
            raise GptjaxError(
                f"data.source={data.source!r} gives no {split} conversations ({len(train)} "
                f"train, {len(val)} validation); change data.val_fraction or add conversations"
            )
    if scheme != "tfds":
        train, val, key = _materialised(train, val, description, root, log)
    if tokenizer is None:
        texts = ["\n".join(m["content"] for m in c) for c in train]
        text_source = text_sources.Source(
            grain.MapDataset.source(texts), grain.MapDataset.source([]), key, description
        )
        tokenizer = pipeline.tokenizer_for(data, text_source, root, log)
    rendered = sft.render_all(train, tokenizer), sft.render_all(val, tokenizer)
    description += (
        f"; {len(train):,} train / {len(val):,} validation conversations, "
        f"{rendered[0].tokens.size:,} / {rendered[1].tokens.size:,} tokens "
        f"(vocab {tokenizer.vocab_size:,})"
    )
    if skipped:
        description += f"; {skipped:,} bad record{'s' * (skipped != 1)} skipped"
    return Dialogues(tokenizer, *rendered, description, skipped)
