"""Dialogue schema, the one chat template, and packed SFT batches with an assistant-only loss.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}`` (the OpenAI / Hugging Face chat layout; other keys are ignored). ``validate_messages``
says what is wrong with one, in words.

The template (the same for training, evaluation and the chat CLI) uses the tokenizer's reserved
control pieces, which plain text can never produce, so content that spells "<|user|>" stays
text::

    <s> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

``render`` returns the ids and a loss mask that is 1 exactly on assistant content and the
``<|end|>`` closing it: the model learns to answer and to stop, never to write the user's turns
or the role markers. ``render_prompt`` renders the conversation so far plus ``<|assistant|>``,
for the model to continue; generation stops at any of ``stop_ids``.

Packing (``sft_batches``): each conversation of n tokens becomes n - 1 (input, target, weight)
triples, weight of target t = mask of token t + 1. Conversations of more than ``max_len + 1``
tokens are cut to ``max_len + 1`` (counted and logged, never dropped). grain's first-fit packer
puts them into ``max_len`` rows, one bin per row of the global batch; ``segment_ids`` (1, 2, ...
per conversation, 0 = padding) keep attention inside a conversation and ``positions`` restart
at 0 for each. Shapes: B = rows of this process, T = ``max_len``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from gptjax import data as data_lib
from gptjax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Messages = Sequence[dict[str, Any]]
Log = Callable[[str], None]
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
_ENCODE_BATCH = 1024  # message contents per encode_batch call


# ----------------------------------------------------------------------------- schema


def validate_messages(messages: Any, *, need_assistant: bool = True) -> str | None:
    """Why ``messages`` is not a valid conversation, or None if it is.

    Valid: a non-empty list of dicts, each with a ``role`` in ``ROLES`` and a non-blank str
    ``content``, and (if ``need_assistant``) at least one assistant message: a conversation
    without one carries no loss.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"messages must be a non-empty list of messages, got {_kind(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {_kind(message)}, not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}"
        if content is None:
            return f"message {i} ({role}) has no content"
        if not isinstance(content, str):
            return f"message {i} ({role}) content is {_kind(content)}, not a string"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn from)"
    return None


def _kind(value: Any) -> str:
    return "empty" if isinstance(value, (list, tuple)) and not value else type(value).__name__


def _checked(messages: Messages, *, need_assistant: bool) -> Messages:
    if reason := validate_messages(messages, need_assistant=need_assistant):
        raise ValueError(f"invalid conversation: {reason}")
    return messages


# ----------------------------------------------------------------------------- template


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn in generation: ``<|end|>`` and, defensively, ``</s>``."""
    return (tokenizer.end_of_turn_id, tokenizer.eos_id)


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return {
        "system": tokenizer.system_id,
        "user": tokenizer.user_id,
        "assistant": tokenizer.assistant_id,
    }[role]


def _assemble(
    messages: Messages, contents: Sequence[Sequence[int]], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """The template over already encoded contents; ``(ids [N] int32, mask [N] bool)``."""
    ids, mask = [tokenizer.bos_id], [False]
    for message, content in zip(messages, contents, strict=True):
        learn = message["role"] == "assistant"
        ids += [_role_id(tokenizer, message["role"]), *content, tokenizer.end_of_turn_id]
        mask += [False] + [learn] * (len(content) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def render(messages: Messages, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A conversation → ``(ids [N] int32, mask [N] bool)``, mask 1 on assistant content + end.

    Raises ValueError (``validate_messages``'s reason) for an invalid conversation.
    """
    messages = _checked(messages, need_assistant=True)
    return _assemble(messages, tokenizer.encode_batch([m["content"] for m in messages]), tokenizer)


def render_prompt(messages: Messages, tokenizer: Tokenizer) -> np.ndarray:
    """The conversation so far + ``<|assistant|>``: ids [N] int32 for the model to continue.

    ``messages`` need no assistant turn (a first user message is a prompt). The ids equal
    ``render``'s up to the assistant turn that the model is about to write.
    """
    messages = _checked(messages, need_assistant=False)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    ids, _ = _assemble(messages, contents, tokenizer)
    return np.append(ids, np.int32(tokenizer.assistant_id))


# ----------------------------------------------------------------------------- rendered splits


@dataclasses.dataclass(frozen=True, eq=False)
class ChatSplit:
    """Rendered conversations, flat: conversation i is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``tokens`` [N] int32, ``mask`` [N] bool (the loss mask of ``render``), ``offsets`` [C + 1].
    """

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.mask[lo:hi]

    @property
    def lengths(self) -> np.ndarray:
        """[C] tokens per conversation."""
        return np.diff(self.offsets)

    @classmethod
    def from_rendered(cls, rendered: Sequence[tuple[np.ndarray, np.ndarray]]) -> ChatSplit:
        lengths = [len(ids) for ids, _ in rendered]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        tokens = np.concatenate([np.zeros(0, np.int32), *(ids for ids, _ in rendered)])
        mask = np.concatenate([np.zeros(0, bool), *(m for _, m in rendered)])
        return cls(tokens.astype(np.int32), mask.astype(bool), offsets)


def render_all(conversations: Sequence[Messages], tokenizer: Tokenizer) -> ChatSplit:
    """``render`` on every conversation (validated), encoding contents in large batches."""
    for messages in conversations:
        _checked(messages, need_assistant=True)
    flat = [m["content"] for messages in conversations for m in messages]
    encoded = []
    for start in range(0, len(flat), _ENCODE_BATCH):
        encoded += tokenizer.encode_batch(flat[start : start + _ENCODE_BATCH])
    rendered, k = [], 0
    for messages in conversations:
        rendered.append(_assemble(messages, encoded[k : k + len(messages)], tokenizer))
        k += len(messages)
    return ChatSplit.from_rendered(rendered)


# ----------------------------------------------------------------------------- packing


def num_truncated(split: ChatSplit, max_len: int) -> int:
    """Conversations longer than ``max_len + 1`` tokens, which packing cuts to that length."""
    return int(np.count_nonzero(split.lengths > max_len + 1))


def _example(split: ChatSplit, max_len: int) -> Callable[[int], dict[str, np.ndarray]]:
    """Conversation index → its (cut) ``inputs``/``targets``/``weights`` [n - 1] triples."""

    def example(i: int) -> dict[str, np.ndarray]:
        ids, mask = split[int(i)]
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        return {
            "inputs": np.asarray(ids[:-1], np.int32),
            "targets": np.asarray(ids[1:], np.int32),
            "weights": mask[1:].astype(np.float32),  # target t is learned iff token t+1 is
        }

    return example


def _pack(
    examples: grain.IterDataset, *, max_len: int, bins: int, seed: int, shuffle: bool, pad_id: int
) -> grain.IterDataset:
    """grain's first-fit packer, one bin per global-batch row; keys renamed to gptjax's."""
    packed = FirstFitPackIterDataset(
        examples,
        length_struct={"inputs": max_len, "targets": max_len, "weights": max_len},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=shuffle,  # first fit fills early bins with long conversations
        # Only "inputs" gets segment ids and positions; targets/weights share them.
        meta_features=("targets", "weights"),
        padding_struct={"inputs": pad_id, "targets": pad_id, "weights": 0.0},
    )

    def rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "inputs": row["inputs"],
            "targets": row["targets"],
            "weights": row["weights"],
            "positions": row["inputs_positions"],
            "segment_ids": row["inputs_segment_ids"],
        }

    return packed.map(rename)


def _check_split(split: ChatSplit, name: str) -> None:
    if len(split) == 0:
        raise ValueError(
            f"the {name} split has no conversations; check data.source and data.val_fraction"
        )


def sft_batches(
    split: ChatSplit,
    *,
    max_len: int,
    global_batch_size: int,
    seed: int,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
    log: Log = print,
) -> grain.DatasetIterator:
    """An endless, seeded iterator of this process's packed training batches.

    Every epoch is a fresh seeded permutation of the conversations (grain ``shuffle`` before
    ``repeat``), packed first-fit in that order into ``global_batch_size`` bins; a batch is
    emitted when the next conversation fits no bin, so each conversation appears whole, once
    per epoch (an epoch's last conversations may share a batch with the next epoch's first).
    Each process packs the same global batch and keeps rows ``[p*B, (p+1)*B)``. The iterator
    supports ``get_state()``/``set_state()`` (JSON-serialisable).

    Yields ``inputs``/``targets``/``positions``/``segment_ids`` int32 [B, T] and ``weights``
    float32 [B, T] (0 on padding and on every target that is not assistant content or end).
    """
    rows = data_lib.process_rows(global_batch_size, process_index, process_count)
    _check_split(split, "train")
    if cut := num_truncated(split, max_len):
        log(
            f"{cut:,} of {len(split):,} train conversations are longer than model.max_len+1="
            f"{max_len + 1} tokens and are cut to that length (longest: {split.lengths.max():,})"
        )
    examples = (
        grain.MapDataset.range(len(split))
        .shuffle(seed=seed % 2**32)
        .repeat()
        .map(_example(split, max_len))
        .to_iter_dataset(_READ)
    )
    packed = _pack(
        examples, max_len=max_len, bins=global_batch_size, seed=seed, shuffle=True, pad_id=pad_id
    )

    def take_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}

    return iter(packed.batch(global_batch_size).map(take_rows))


def sft_eval_batches(
    split: ChatSplit,
    *,
    max_len: int,
    global_batch_size: int,
    num_batches: int,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` packed global batches of ``split`` in order, for this process.

    Unshuffled and first-fit packed like ``sft_batches``, so the batches are the same on every
    call. A short split gives fewer batches; the last is filled up with all-padding rows
    (weight 0, segment 0) so that every batch has the shapes [B, T] of ``sft_batches``.
    """
    rows = data_lib.process_rows(global_batch_size, process_index, process_count)
    _check_split(split, "validation")
    examples = grain.MapDataset.range(len(split)).map(_example(split, max_len))
    packed = _pack(
        examples.to_iter_dataset(_READ),
        max_len=max_len,
        bins=global_batch_size,
        seed=0,
        shuffle=False,
        pad_id=pad_id,
    )
    wanted = num_batches * global_batch_size
    out = []
    for row in packed:
        out.append(row)
        if len(out) == wanted:
            break
    if len(out) % global_batch_size:  # all-padding rows: the first row's keys, emptied
        empty = {
            k: np.full_like(v, pad_id) if k in ("inputs", "targets") else np.zeros_like(v)
            for k, v in out[0].items()
        }
        out += [empty] * (-len(out) % global_batch_size)
    return [
        {k: np.stack([r[k] for r in out[i : i + global_batch_size]])[rows] for k in out[0]}
        for i in range(0, len(out), global_batch_size)
    ]
