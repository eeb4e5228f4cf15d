"""Pretraining input pipeline: source → tokenizer → flat token arrays → grain batches.

``load_corpus`` resolves ``data.source`` (see ``gptjax/data/text.py``), trains or loads the
tokenizer (trained on the train split only), and tokenizes each split once into one flat
int32 array — documents joined by EOS — cached as ``.npy`` under ``<cache>/tokens/``.

``train_batches`` cuts the train array into windows of ``seq_len + 1`` tokens at stride
``seq_len`` (window i = tokens[i*T : i*T + T + 1]), so each token after the first is a
target exactly once per epoch; the last window is padded with ``pad_id`` and weight 0. The
window order is a fresh seeded permutation each epoch, batched to the *global* batch size
before each process takes its own rows: the sample order and the iterator state mean the same
thing for any number of processes. ``eval_batches`` reads the validation split from its start,
unshuffled.

Shapes: B = rows of this process (global batch / process count), T = ``seq_len``
(``data.seq_len``, else ``model.max_len``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grain
import numpy as np

from gptjax import storage
from gptjax.config import DataConfig
from gptjax.data import text as text_sources
from gptjax.errors import GptjaxError
from gptjax.metrics import Log
from gptjax.tokenizer import SentencePieceTokenizer, Tokenizer
from gptjax.workdir import load_tokenizer

# Tokenizer training reads at most this many characters of the train split: SentencePiece
# holds its input in memory, and more text barely changes a 2-50k vocabulary.
TOKENIZER_MAX_CHARS = 200_000_000
_ENCODE_BATCH = 64  # documents per encode_batch call
# How every grain pipeline here reads ahead: two threads, eight elements buffered.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized source. ``train_tokens``: [N] int32, ``val_tokens``: [M] int32."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray  # documents joined with EOS (each document is followed by EOS)
    val_tokens: np.ndarray
    description: str  # one line: source, documents, split rule, token counts


def cache_root(data: DataConfig) -> Path:
    """``data.cache_dir``, else ``$GPTJAX_CACHE``, else ``~/.cache/gptjax``. A ``gs://``
    cache_dir is shared through a local mirror: entries are fetched from the bucket when another
    host built them and published when built here (``storage.fetch`` / ``storage.publish``)."""
    root = data.cache_dir or storage.cache_home()
    if storage.is_remote(root):  # shared by every host: entries built once, fetched elsewhere
        return storage.mirror(root)
    return Path(root).expanduser()


def load_corpus(
    data: DataConfig, *, tokenizer: Tokenizer | None = None, log: Log = print
) -> Corpus:
    """Reads ``data.source``, gets a tokenizer, and returns both splits as token arrays.

    Args:
      data: the data config (source, split rule, tokenizer choice, cache folder).
      tokenizer: use this tokenizer (e.g. the one saved with a checkpoint) instead of
        ``data.tokenizer`` or a trained one.
      log: receives one human-readable line per step (what is built or reused, how long).
    """
    root = cache_root(data)
    source = text_sources.open_source(data, root / "datasets", log)
    if tokenizer is None:
        tokenizer = tokenizer_for(data, source, root, log)
    train = _cached_tokens(source.train, "train", source.key, tokenizer, root, log)
    val = _cached_tokens(source.validation, "validation", source.key, tokenizer, root, log)
    description = (
        f"{source.description}; {len(train):,} train / {len(val):,} validation "
        f"tokens (vocab {tokenizer.vocab_size:,})"
    )
    return Corpus(tokenizer, train, val, description)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_for(data: DataConfig, source: text_sources.Source, root: Path, log: Log) -> Tokenizer:
    """Loads ``data.tokenizer`` (a SentencePiece .model, a Hugging Face tokenizer folder or
    workdir), or trains one on the train split (cached by data+type+size)."""
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    size = 0 if data.tokenizer_type == "char" else data.tokenizer_vocab_size
    key = hashlib.sha256(f"{source.key}|{data.tokenizer_type}|{size}".encode()).hexdigest()
    path = root / "tokenizers" / f"{key[:20]}.model"
    if storage.fetch(path):
        storage.publish(path)
        log(f"reusing tokenizer {path}")
        return SentencePieceTokenizer.load(path)
    log(
        f"training a {data.tokenizer_type} tokenizer (vocab {size or 'all characters'}) "
        f"on the train split"
    )
    start = time.perf_counter()
    tokenizer = Tokenizer.train(
        _capped(iter(source.train), TOKENIZER_MAX_CHARS, log),
        model_type=data.tokenizer_type,
        vocab_size=data.tokenizer_vocab_size,
    )
    tokenizer.save(path)  # atomic: concurrent processes never read a half-written model
    storage.publish(path)
    log(f"trained tokenizer → {path} in {time.perf_counter() - start:.1f}s")
    return tokenizer


def _capped(texts: Iterator[str], max_chars: int, log: Log) -> Iterable[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= max_chars:
            log(f"tokenizer trained on the first {seen:,} characters of the train split")
            return


# ----------------------------------------------------------------------------- tokens


def tokenize(texts: grain.MapDataset, tokenizer: Tokenizer) -> np.ndarray:
    """Encodes every document and appends EOS; returns the concatenation, [N] int32."""
    eos = tokenizer.eos_id

    def encode(batch: list[str]) -> np.ndarray:
        ids = tokenizer.encode_batch(batch)
        return np.fromiter(itertools.chain.from_iterable(i + [eos] for i in ids), np.int32)

    pieces = texts.batch(_ENCODE_BATCH, batch_fn=list).map(encode).to_iter_dataset(READ_OPTIONS)
    return np.concatenate([np.zeros(0, np.int32), *pieces])


def _cached_tokens(
    texts: grain.MapDataset, split: str, source_key: str, tokenizer: Tokenizer, root: Path, log: Log
) -> np.ndarray:
    """``tokenize``, cached under ``<cache>/tokens/`` and memory-mapped on reuse."""
    path = root / "tokens" / f"{source_key}-{tokenizer.fingerprint}-{split}.npy"
    if storage.fetch(path):
        storage.publish(path)
        return np.load(path, mmap_mode="r")
    start = time.perf_counter()
    tokens = tokenize(texts, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
    os.replace(tmp, path)
    storage.publish(path)
    log(
        f"tokenized {split}: {len(texts):,} documents → {len(tokens):,} tokens in "
        f"{time.perf_counter() - start:.1f}s ({path})"
    )
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------- batches


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows needed so that each of the ``num_tokens - 1`` targets appears once."""
    return max(0, -(-(num_tokens - 1) // seq_len))


def read_windows(
    tokens: np.ndarray, index: np.ndarray, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Window ``i`` of ``tokens`` for each ``i`` in ``index`` [B]; ``-1`` gives a padding row.

    Returns ``inputs``/``targets`` int32 [B, T] and ``weights`` float32 [B, T] (0 on padding).
    """
    t = seq_len
    rows = np.full((len(index), t + 1), pad_id, np.int32)  # [B, T+1]
    weights = np.zeros((len(index), t), np.float32)  # [B, T]
    for r, i in enumerate(index):
        if i >= 0:
            chunk = tokens[i * t : i * t + t + 1]
            rows[r, : len(chunk)] = chunk
            weights[r, : len(chunk) - 1] = 1.0
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": np.ascontiguousarray(rows[:, 1:]),
        "weights": weights,
    }


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a task's data becomes batches: rows of ``seq_len`` tokens (T), ``global_batch_size``
    rows per step over all processes (and hosts), padded with ``pad_id``; process
    ``process_index`` of ``process_count`` takes the contiguous rows ``rows`` of each."""

    seq_len: int
    global_batch_size: int
    pad_id: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        n, p = self.process_count, self.process_index
        if n < 1 or not 0 <= p < n:
            raise GptjaxError(f"process_index={p} must be in [0, process_count={n})")
        if self.global_batch_size < 1 or self.global_batch_size % n:
            raise GptjaxError(
                f"global batch size {self.global_batch_size} (train.batch_size or "
                f"eval.batch_size) must be a positive multiple of the process count {n}; use "
                f"a multiple of {n}"
            )

    @property
    def rows(self) -> slice:
        """This process's rows ``[p*b, (p+1)*b)`` of every global batch."""
        b = self.global_batch_size // self.process_count
        return slice(self.process_index * b, (self.process_index + 1) * b)


def train_batches(tokens: np.ndarray, batching: Batching, *, seed: int) -> grain.DatasetIterator:
    """An endless, seeded iterator of this process's training batches of ``tokens`` [N].

    Each epoch is an exact permutation of all windows: grain's ``shuffle`` before ``repeat``
    draws a fresh permutation per epoch, seeded ``(seed + epoch) mod 2**32``. The iterator
    supports ``get_state()``/``set_state()``; its state is the global batch count, the same for
    every process count. Yields ``inputs``/``targets`` int32 [B, T], ``weights`` float32 [B, T].
    """
    t, rows = batching.seq_len, batching.rows
    if len(tokens) < t + 1:
        raise GptjaxError(
            f"the train split has {len(tokens):,} tokens, fewer than one window of "
            f"data.seq_len+1={t + 1}; use more text or a smaller data.seq_len"
        )

    def read(index: np.ndarray) -> dict[str, np.ndarray]:  # index: [global batch]
        return read_windows(tokens, index[rows], t, batching.pad_id)

    ds = (
        grain.MapDataset.range(num_windows(len(tokens), t))
        .shuffle(seed=seed % 2**32)
        .repeat()
        .batch(batching.global_batch_size)
        .map(read)
    )
    return iter(ds.to_iter_dataset(READ_OPTIONS))


def eval_batches(
    tokens: np.ndarray, batching: Batching, *, num_batches: int
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` global batches of windows of ``tokens``, in order, for this
    process.

    A short split gives fewer batches (all its windows); the last one is filled up with
    weight-0 rows so every batch has the same shapes ([B, T], as ``train_batches``).
    """
    t, size = batching.seq_len, batching.global_batch_size
    n = num_windows(len(tokens), t)
    if n == 0:
        raise GptjaxError(
            f"the validation split has {len(tokens)} tokens; it needs at least 2 — give it "
            f"more text"
        )
    count = min(num_batches, -(-n // size))
    index = np.arange(count * size)
    index[index >= n] = -1  # padding rows
    return [
        read_windows(tokens, batch[batching.rows], t, batching.pad_id)
        for batch in index.reshape(count, size)
    ]
