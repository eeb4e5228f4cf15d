"""Tokenizers behind one interface: gptjax's own SentencePiece models, and Hugging Face ones.

``Tokenizer`` is the interface every part of gptjax uses (encode, decode, vocabulary size, the
special ids, the chat template, saving into a workdir, a JSON state for checkpoints);
``Tokenizer.train`` trains a SentencePiece one. The Hugging Face kind (a model's own
``tokenizer.json``, through the ``tokenizers`` library) is ``gptjax/hf_tokenizer.py``;
``gptjax/workdir.py`` opens either from a path (``load_tokenizer``) or a checkpoint's state.

SentencePiece (``SentencePieceTokenizer``): every model trained here has the same first eight
ids, so a chat fine-tune reuses a pretrained tokenizer with no vocabulary surgery:

    0 <pad>  1 <unk>  2 <s>  3 </s>  4 <|system|>  5 <|user|>  6 <|assistant|>  7 <|end|>

then the 256 byte-fallback pieces <0x00>..<0xFF>, then the learned pieces. The chat markers are
SentencePiece *control* symbols: they are never produced from plain text, even from text that
spells "<|user|>". ``decode(encode(s)) == s`` for every string without lone surrogates: the
normaliser is the identity, whitespace is kept as is, characters outside the vocabulary fall back
to their UTF-8 bytes, and a literal "▁" (U+2581, SentencePiece's escaped space) is encoded as its
three byte pieces so that it does not come back as a space.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tqdm.auto import tqdm

from gptjax import storage
from gptjax.errors import GptjaxError

CHAT_PIECES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids 4-7
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>", *CHAT_PIECES)  # ids 0-7
MODEL_TYPES = ("bpe", "unigram", "char")
SENTENCEPIECE_FILE = "tokenizer.model"  # its name in a workdir
_META = "\u2581"  # SentencePiece writes spaces as this; a literal one would decode as " "
_CHUNK_BYTES = 4096  # max_sentence_length: sentencepiece silently skips longer "sentences"
# Upper bound on any char vocabulary (all code points + specials + bytes); with
# hard_vocab_limit=False sentencepiece keeps exactly the characters it saw.
_CHAR_VOCAB_BOUND = 0x110000 + len(SPECIAL_PIECES) + 256


class Tokenizer(abc.ABC):
    """What gptjax needs of a tokenizer. Ids are ints in ``[0, vocab_size)``.

    ``chat_template`` is the model's own Jinja chat template (Hugging Face tokenizers that ship
    one), or None for gptjax's template, which needs the role and end-of-turn ids
    (``chat_ids``). Build one with ``Tokenizer.train`` or ``workdir.load_tokenizer``.
    """

    pad_id: int
    bos_id: int
    eos_id: int
    chat_template: str | None = None

    # ---------------------------------------------------------------- construction
    @staticmethod
    def train(texts: Iterable[str], **kwargs: Any) -> SentencePieceTokenizer:
        """Trains a SentencePiece tokenizer (``SentencePieceTokenizer.train``)."""
        return SentencePieceTokenizer.train(texts, **kwargs)

    @staticmethod
    def from_bytes(model_proto: bytes) -> SentencePieceTokenizer:
        """A SentencePiece tokenizer from its serialized model (``to_bytes``)."""
        return SentencePieceTokenizer(model_proto)

    # ---------------------------------------------------------------- the interface
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, unpadded (the model pads its embedding to a multiple of 128)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """16 hex digits identifying the tokenizer (a cache key, a resume check)."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode`` drops unless asked to keep them."""

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a generation (a model may have several)."""
        return (self.eos_id,)

    @property
    @abc.abstractmethod
    def chat_ids(self) -> dict[str, int] | None:
        """Ids of gptjax's template markers (``system``, ``user``, ``assistant``, ``end``), or
        None when the vocabulary lacks them."""

    @abc.abstractmethod
    def special_tokens_map(self) -> dict[str, str]:
        """``{"bos_token": "<s>", ...}``: the special tokens a chat template may name."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text → ids [N], no bos/eos added."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """[B] texts → B id lists; the same ids as ``encode`` on each."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray, *, keep_special: bool = False) -> str:
        """Ids [N] → text; special ids dropped unless ``keep_special``."""

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The token string of id ``i``."""

    @abc.abstractmethod
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer's files into ``directory`` (a workdir or an export)."""

    @abc.abstractmethod
    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable state (what a checkpoint holds); ``from_state`` reads it."""

    def check_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
        """``ids`` as a list of ints, refused unless one sequence of ids in the vocabulary."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise GptjaxError(
                f"decode takes one sequence of int ids [N], got {arr.dtype}{arr.shape}"
            )
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise GptjaxError(
                f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {self.vocab_size}); "
                "mask the padded vocabulary rows out of the logits before sampling"
            )
        return arr.tolist()


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model with gptjax's special-token layout (module docstring).

    Pickles as its serialized model, so it can cross into data-loader worker processes.
    """

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    system_id, user_id, assistant_id, end_of_turn_id = 4, 5, 6, 7
    special_ids = frozenset(range(len(SPECIAL_PIECES)))
    chat_ids = {"system": 4, "user": 5, "assistant": 6, "end": 7}

    def __init__(self, model_proto: bytes, *, name: str = "<bytes>"):
        """Wraps a serialized SentencePiece ModelProto; ``name`` is used in error messages."""
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError:
            raise GptjaxError(
                f"tokenizer {name} is not a SentencePiece model; point data.tokenizer "
                'at a .model file written by Tokenizer.save, or set it to "" to train one'
            ) from None
        self._proto = bytes(model_proto)
        _check_layout(self._sp, model_pb2.ModelProto.FromString(self._proto), name)
        # The three byte pieces of U+2581, emitted for a literal "▁" in the input.
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        self._num_threads = os.cpu_count() or 1

    # ---------------------------------------------------------------- construction, storage
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        model_type: str = "bpe",
        vocab_size: int = 2048,
        input_sentence_size: int = 50_000,
        progress: bool = True,
    ) -> SentencePieceTokenizer:
        """Trains a tokenizer on ``texts`` (documents of any length, newlines included).

        Args:
          texts: iterable of str documents, read once (a generator is fine).
          model_type: "bpe", "unigram" or "char". For "char" the vocabulary is the specials, the
            256 bytes and every character of the (sampled) text; ``vocab_size`` is ignored.
          vocab_size: exact piece count for "bpe"/"unigram", specials and bytes included.
          input_sentence_size: documents are cut at line ends into chunks of at most 4 KiB;
            sentencepiece trains on a random (but fixed) sample of this many chunks (0 = all).
          progress: show a tqdm bar of the bytes read.
        """
        if model_type not in MODEL_TYPES:
            raise GptjaxError(f"data.tokenizer_type={model_type!r} must be one of {MODEL_TYPES}")
        if 0 < input_sentence_size <= 100:  # sentencepiece's own lower bound
            raise GptjaxError(
                f"input_sentence_size={input_sentence_size} must be 0 (all text) or over 100"
            )
        char = model_type == "char"
        desc = f"{model_type} tokenizer: text read"
        bar = tqdm(desc=desc, unit="B", unit_scale=True, disable=not progress)
        out, errors = io.BytesIO(), []
        # 0.2.3 already samples with a fixed seed; this pins any use of the global generator.
        spm.set_random_generator_seed(0)
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=_chunks(texts, bar, errors),
                model_writer=out,
                model_type=model_type,
                vocab_size=_CHAR_VOCAB_BOUND if char else vocab_size,
                hard_vocab_limit=not char,
                character_coverage=1.0 if char else 0.9995,  # the rest falls back to bytes
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=_CHUNK_BYTES,
                # Lossless: no normalisation, no added or collapsed spaces, bytes for the rest.
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                byte_fallback=True,
                allow_whitespace_only_pieces=True,  # indentation runs become single pieces
                split_digits=True,  # one token per digit, as in LLaMA
                pad_id=cls.pad_id,
                unk_id=cls.unk_id,
                bos_id=cls.bos_id,
                eos_id=cls.eos_id,
                control_symbols=list(CHAT_PIECES),
                num_threads=os.cpu_count() or 1,
                minloglevel=1,  # its INFO log is hundreds of lines
            )
        except RuntimeError as err:
            if errors:  # sentencepiece turned an error of the text source into this one
                raise errors[0] from None
            raise _training_error(err, vocab_size) from None
        finally:
            bar.close()
        # num_threads is recorded in the model but does not change BPE pieces; drop it so the
        # same text gives the same bytes (and fingerprint) on any machine.
        proto = model_pb2.ModelProto.FromString(out.getvalue())
        proto.trainer_spec.ClearField("num_threads")
        return cls(proto.SerializeToString(), name=f"<trained {model_type}>")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Reads a ``.model`` file written by ``save`` (or by sentencepiece with our layout)."""
        path = storage.path(path)
        if not path.is_file():
            raise GptjaxError(
                f"tokenizer model {str(path)!r} does not exist; set data.tokenizer to an existing "
                '.model file, or to "" to train one'
            )
        return cls(path.read_bytes(), name=repr(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model to ``path`` (creating parent folders), atomically."""
        storage.write_atomic(path, self._proto)

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece ModelProto (what ``save`` writes)."""
        return self._proto

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.save(storage.path(directory) / SENTENCEPIECE_FILE)

    def special_tokens_map(self) -> dict[str, str]:
        keys = ("pad_token", "unk_token", "bos_token", "eos_token")
        return dict(zip(keys, SPECIAL_PIECES[:4], strict=True))

    def to_state(self) -> dict[str, Any]:
        return {"sentencepiece_model_base64": base64.b64encode(self._proto).decode()}

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the serialized model: a cache key."""
        return hashlib.sha256(self._proto).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        """Number of pieces, unpadded (the model pads its embedding to a multiple of 128)."""
        return self._sp.get_piece_size()

    def __reduce__(self):
        return (SentencePieceTokenizer, (self._proto,))

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer(vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint!r})"
        )

    # ---------------------------------------------------------------- encode, decode
    def encode(self, text: str) -> list[int]:
        """Text → ids [N], no bos/eos added. Never yields a special id (see module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if _META not in text:
            return self._sp.encode(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """[B] texts → B id lists, encoded on all CPU cores; same ids as ``encode`` on each."""
        texts = list(texts)
        if not any(_META in t for t in texts):
            return self._sp.encode(texts, num_threads=self._num_threads)
        parts = [t.split(_META) for t in texts]  # a literal "▁" goes in as its byte pieces
        flat = self._sp.encode([p for ps in parts for p in ps], num_threads=self._num_threads)
        out, k = [], 0
        for ps in parts:
            ids = list(flat[k])
            for piece_ids in flat[k + 1 : k + len(ps)]:
                ids += self._meta_ids + piece_ids
            out.append(ids)
            k += len(ps)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, *, keep_special: bool = False) -> str:
        """Ids [N] (a list, numpy or jax array of ints) → text.

        Special ids (pad, unk, bos, eos and the chat markers) are dropped, so a generated or
        padded sequence decodes to its plain text; ``keep_special=True`` writes them as their
        pieces ("<|user|>", "</s>", ...) instead, to inspect chat templates. Ids outside
        [0, vocab_size), e.g. from the model's padded vocabulary rows, raise ``GptjaxError``.
        """
        ids = self.check_ids(ids)
        if not keep_special:
            return self._sp.decode([i for i in ids if i not in self.special_ids])
        runs = itertools.groupby(ids, key=lambda i: i in self.special_ids)
        return "".join(
            "".join(SPECIAL_PIECES[i] for i in run) if special else self._sp.decode(list(run))
            for special, run in runs
        )

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i`` ("▁the", "<0x0A>", "<|user|>", ...)."""
        if not 0 <= int(i) < self.vocab_size:
            raise GptjaxError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(i))


def _chunks(texts: Iterable[str], bar: tqdm, errors: list[Exception]) -> Iterator[str]:
    """``_chunk_texts``, also putting its exceptions (the text source's too) in ``errors``:
    sentencepiece replaces them by a RuntimeError without their type or traceback."""
    try:
        yield from _chunk_texts(texts, bar)
    except Exception as err:
        errors.append(err)
        raise


def _chunk_texts(texts: Iterable[str], bar: tqdm) -> Iterator[str]:
    """Cuts each document at line ends into chunks of at most _CHUNK_BYTES UTF-8 bytes.

    Newlines inside a chunk are kept, so "\\n" is learned like any other character (sentencepiece
    strips the last one of each chunk).
    """
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"tokenizer training texts must be str, got {type(text).__name__}")
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode())
            if size + n > _CHUNK_BYTES and buf:
                bar.update(size)
                yield "".join(buf)
                buf, size = [], 0
            if n > _CHUNK_BYTES:  # one enormous line: cut every 1024 chars (<= 4096 bytes)
                for start in range(0, len(line), _CHUNK_BYTES // 4):
                    piece = line[start : start + _CHUNK_BYTES // 4]
                    bar.update(len(piece.encode()))
                    yield piece
                continue
            buf.append(line)
            size += n
        if buf:
            bar.update(size)
            yield "".join(buf)


def _training_error(err: RuntimeError, vocab_size: int) -> Exception:
    """Turns sentencepiece's CHECK failures into one-line GptjaxErrors saying what to change."""
    msg = str(err)
    if "sentences_.empty()" in msg:
        return GptjaxError(
            "tokenizer training text is empty (no non-blank lines); check data.source"
        )
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return GptjaxError(
            f"data.tokenizer_vocab_size={vocab_size} is more pieces than this text can yield; "
            f"lower data.tokenizer_vocab_size to at most {m[1]}, or train on more text"
        )
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return GptjaxError(
            f"data.tokenizer_vocab_size={vocab_size} cannot hold the specials, 256 bytes and the "
            f"characters of this text; raise data.tokenizer_vocab_size to more than {m[1]}"
        )
    return err


def _check_layout(sp: spm.SentencePieceProcessor, proto: model_pb2.ModelProto, name: str) -> None:
    """Rejects models that lack our special ids, or that cannot round-trip every string."""
    ids = range(min(sp.get_piece_size(), len(SPECIAL_PIECES)))
    have = tuple(sp.id_to_piece(i) for i in ids)
    # unk is SentencePiece's UNKNOWN type, the other seven are CONTROL: never matched in text.
    if have != SPECIAL_PIECES or not all(sp.is_control(i) or i == 1 for i in ids):
        raise GptjaxError(
            f"tokenizer {name} does not have gptjax's special pieces at ids 0-7 (has {have}, "
            f"expects {SPECIAL_PIECES}); train a new one with Tokenizer.train"
        )
    if not all(sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256)):
        raise GptjaxError(
            f"tokenizer {name} was trained without byte_fallback, so it cannot encode every "
            "string; train a new one with Tokenizer.train"
        )
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise GptjaxError(
            f"tokenizer {name} normalises text (rule {norm.name!r}, add_dummy_prefix="
            f"{norm.add_dummy_prefix}, remove_extra_whitespaces={norm.remove_extra_whitespaces}), "
            "so decode(encode(s)) != s; train a new one with Tokenizer.train"
        )
