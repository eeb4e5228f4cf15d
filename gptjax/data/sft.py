"""Supervised fine-tuning data: rendered conversations, packed into batches with an
assistant-only loss.

Conversations are rendered by ``gptjax/chat_template.py`` (ids and a loss mask that is 1 on
assistant content and its end-of-turn token). Packing (``sft_batches``): each conversation of n
tokens becomes n - 1 (input, target, weight) triples, weight of target t = mask of token t + 1.
Conversations of more than ``seq_len + 1`` tokens are cut to ``seq_len + 1`` (counted and
logged, never dropped). grain's first-fit packer puts them into ``seq_len`` rows, one bin per
row of the global batch; ``segment_ids`` (1, 2, ... per conversation, 0 = padding) keep attention
inside a conversation and ``positions`` restart at 0 for each. Shapes: B = rows of this process,
T = ``seq_len`` (``data.seq_len``, else ``model.max_len``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from gptjax import chat_template
from gptjax.chat_template import Messages
from gptjax.data.pipeline import READ_OPTIONS, Batching
from gptjax.errors import GptjaxError
from gptjax.metrics import Log
from gptjax.tokenizer import Tokenizer

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
    """``chat_template.render`` on every conversation (validated), as one ``ChatSplit``."""
    return ChatSplit.from_rendered(chat_template.render_batch(conversations, tokenizer))


# ----------------------------------------------------------------------------- packing


def num_truncated(split: ChatSplit, seq_len: int) -> int:
    """Conversations longer than ``seq_len + 1`` tokens, which packing cuts to that length."""
    return int(np.count_nonzero(split.lengths > seq_len + 1))


def num_without_answer(split: ChatSplit, seq_len: int) -> int:
    """Conversations with no assistant token left among their first ``seq_len + 1`` (targets
    1..seq_len): cutting them leaves nothing to learn from."""
    return sum(not split[i][1][1 : seq_len + 1].any() for i in range(len(split)))


def _example(split: ChatSplit, seq_len: int) -> Callable[[int], dict[str, np.ndarray]]:
    """Conversation index → its (cut) ``inputs``/``targets``/``weights`` [n - 1] triples."""

    def example(i: int) -> dict[str, np.ndarray]:
        ids, mask = split[int(i)]
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        return {
            "inputs": np.asarray(ids[:-1], np.int32),
            "targets": np.asarray(ids[1:], np.int32),
            "weights": mask[1:].astype(np.float32),  # target t is learned iff token t+1 is
        }

    return example


def _pack(
    examples: grain.IterDataset, batching: Batching, *, seed: int, shuffle: bool
) -> grain.IterDataset:
    """grain's first-fit packer, one bin per global-batch row; keys renamed to gptjax's."""
    t, pad_id = batching.seq_len, batching.pad_id
    packed = FirstFitPackIterDataset(
        examples,
        length_struct={"inputs": t, "targets": t, "weights": t},
        num_packing_bins=batching.global_batch_size,
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
        raise GptjaxError(
            f"the {name} split has no conversations; check data.source and data.val_fraction"
        )


def sft_batches(
    split: ChatSplit, batching: Batching, *, seed: int, log: Log = print
) -> grain.DatasetIterator:
    """An endless, seeded iterator of this process's packed training batches.

    Every epoch is a fresh seeded permutation of the conversations (grain ``shuffle`` before
    ``repeat``), packed first-fit in that order into ``global_batch_size`` bins; a batch is
    emitted when the next conversation fits no bin, so each conversation appears whole, once
    per epoch (an epoch's last conversations may share a batch with the next epoch's first).
    Each process packs the same global batch and keeps its rows. The iterator supports
    ``get_state()``/``set_state()`` (JSON-serialisable).

    Yields ``inputs``/``targets``/``positions``/``segment_ids`` int32 [B, T] and ``weights``
    float32 [B, T] (0 on padding and on every target that is not assistant content or end).
    """
    t, rows = batching.seq_len, batching.rows
    _check_split(split, "train")
    if cut := num_truncated(split, t):
        empty = num_without_answer(split, t)
        if empty == len(split):
            raise GptjaxError(
                f"no train conversation has an assistant token within data.seq_len+1={t + 1} "
                f"tokens (longest: {split.lengths.max():,}); raise data.seq_len"
            )
        log(
            f"{cut:,} of {len(split):,} train conversations are longer than data.seq_len+1="
            f"{t + 1} tokens and are cut to that length (longest: {split.lengths.max():,}); "
            f"{empty:,} lose every assistant token"
        )
    examples = (
        grain.MapDataset.range(len(split))
        .shuffle(seed=seed % 2**32)
        .repeat()
        .map(_example(split, t))
        .to_iter_dataset(READ_OPTIONS)
    )
    packed = _pack(examples, batching, seed=seed, shuffle=True)

    def take_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}

    return iter(packed.batch(batching.global_batch_size).map(take_rows))


def sft_eval_batches(
    split: ChatSplit, batching: Batching, *, num_batches: int
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` packed global batches of ``split`` in order, for this process.

    Unshuffled and first-fit packed like ``sft_batches``, so the batches are the same on every
    call. A short split gives fewer batches; the last is filled up with all-padding rows
    (weight 0, segment 0) so that every batch has the shapes [B, T] of ``sft_batches``.
    """
    size, pad_id = batching.global_batch_size, batching.pad_id
    _check_split(split, "validation")
    examples = grain.MapDataset.range(len(split)).map(_example(split, batching.seq_len))
    packed = _pack(examples.to_iter_dataset(READ_OPTIONS), batching, seed=0, shuffle=False)
    out = list(itertools.islice(packed, num_batches * size))
    if len(out) % size:  # all-padding rows: the first row's keys, emptied
        empty = {
            k: np.full_like(v, pad_id) if k in ("inputs", "targets") else np.zeros_like(v)
            for k, v in out[0].items()
        }
        out += [empty] * (-len(out) % size)
    return [
        {k: np.stack([r[k] for r in out[i : i + size]])[batching.rows] for k in out[0]}
        for i in range(0, len(out), size)
    ]
