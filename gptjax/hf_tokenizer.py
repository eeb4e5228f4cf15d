"""Hugging Face tokenizers (a model's ``tokenizer.json``) behind gptjax's ``Tokenizer`` interface,
and the conversion of a gptjax SentencePiece model into one.

``HFTokenizer`` runs ``tokenizer.json`` with the ``tokenizers`` library, the same pipeline that
``transformers.AutoTokenizer`` loads for a ``PreTrainedTokenizerFast``; ``encode`` adds no
special tokens (``add_special_tokens=False``). ``tokenizer_config.json`` gives the special tokens
(bos, eos, pad, unk) and the chat template (also read from ``chat_template.jinja``);
``generation_config.json`` may add end-of-generation ids (Qwen2.5: ``<|im_end|>`` and
``<|endoftext|>``). ``save_pretrained`` writes the files back with ``tokenizer_class:
PreTrainedTokenizerFast``, so that transformers loads ``tokenizer.json`` verbatim: some model
classes (``LlamaTokenizer`` in transformers 5) rebuild parts of the pipeline from their own
code and then differ from ``tokenizer.json`` on leading spaces.

``from_sentencepiece`` (for ``gptjax export --format hf``) converts a gptjax SentencePiece model
to a ``tokenizer.json`` with the same ids for every text without a literal special-token string
(``"<|user|>"``: SentencePiece keeps it text, Hugging Face takes it for the token, as it does
for every model). The mapping:

* Vocabulary: every piece keeps its id; in learned pieces the escaped space "▁" is a real space
  (``"▁the"`` → ``" the"``) and there is no normaliser, so a literal "▁" in the text falls back to
  its three byte pieces, as gptjax's ``encode`` does.
* Model: "bpe" → ``BPE`` with byte fallback and a merge for every split of a learned piece into
  two learned pieces, best piece score first; "unigram" → ``Unigram`` with the same scores;
  "char" → ``BPE`` without merges. Unigram can differ where two segmentations of a word score
  the same (SentencePiece breaks the tie by float32 rounding of the whole text's score); both
  decode to the same text.
* Pre-tokenizer: splits only where no learned piece crosses (checked on conversion): before a
  space that follows a non-space, around each digit (split_digits), and between "<", "|" or "/"
  and an ASCII letter.
* Decoder: ByteFallback then Fuse. A run of byte pieces that is not valid UTF-8 decodes to one
  U+FFFD per byte (gptjax: per invalid byte); ids from ``encode`` never hold such runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from gptjax import storage
from gptjax.errors import GptjaxError
from gptjax.tokenizer import CHAT_PIECES, SentencePieceTokenizer, Tokenizer

HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIALS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# gptjax's template (chat_template.py) as Jinja, for models exported with gptjax's chat tokens.
GPTJAX_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ end-of-generation ids)."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any], eos_ids: Sequence[int] = ()):
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise GptjaxError(f"{HF_FILE} is not a tokenizers file ({str(e)[:200]})") from None
        self._json, self.config = tokenizer_json, dict(config)
        if self.config.get("split_special_tokens"):
            self._tok.encode_special_tokens = True
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template or None
        ids = {key: self._token_id(key) for key in SPECIAL_KEYS}
        self.eos_id = ids["eos_token"] if ids["eos_token"] is not None else _first(eos_ids)
        self.bos_id = ids["bos_token"] if ids["bos_token"] is not None else self.eos_id
        self.pad_id = next(i for i in (ids["pad_token"], self.eos_id, 0) if i is not None)
        self._eos_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *eos_ids) if i is not None))
        self._special = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )

    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens_map().get(key)
        return None if token is None else self._tok.token_to_id(token)

    # ---------------------------------------------------------------- files and state
    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Reads a Hugging Face model or tokenizer directory."""
        directory = storage.path(directory)
        path = directory / HF_FILE
        if not path.is_file():
            raise GptjaxError(
                f"{directory} has no {HF_FILE}; gptjax reads Hugging Face tokenizers from "
                f"{HF_FILE} (re-save the tokenizer with transformers' save_pretrained)"
            )
        config = _read_json(directory / CONFIG_FILE)
        for key, value in _read_json(directory / SPECIALS_FILE).items():
            config.setdefault(key, value)
        if (directory / TEMPLATE_FILE).is_file():
            config["chat_template"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        eos = _read_json(directory / GENERATION_FILE).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(path.read_text(encoding="utf-8"), config, eos_ids)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HFTokenizer:
        return cls(state["tokenizer_json"], state["config"], state.get("eos_ids", ()))

    def to_state(self) -> dict[str, Any]:
        state = {"tokenizer_json": self._json, "config": self.config, "eos_ids": self._eos_ids}
        return {"huggingface": state}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (with the
        chat template in the config) for gptjax and for ``transformers.AutoTokenizer``."""
        directory = storage.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HF_FILE).write_text(self._json, encoding="utf-8")
        config = {
            **self.config,
            "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 5: TokenizersBackend
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _write_json(directory / CONFIG_FILE, config)
        specials = {k: config[k] for k in SPECIAL_KEYS if config.get(k) is not None}
        _write_json(directory / SPECIALS_FILE, specials)

    def __reduce__(self):  # pickles as its state (grain worker processes)
        return (HFTokenizer.from_state, (self.to_state()["huggingface"],))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"

    # ---------------------------------------------------------------- the interface
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        state = json.dumps(self.to_state(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(state.encode()).hexdigest()[:16]

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def chat_ids(self) -> dict[str, int] | None:
        ids = [self._tok.token_to_id(piece) for piece in CHAT_PIECES]
        if None in ids:
            return None
        return dict(zip(("system", "user", "assistant", "end"), ids, strict=True))

    def special_tokens_map(self) -> dict[str, str]:
        tokens = {key: self.config.get(key) for key in SPECIAL_KEYS}
        tokens = {k: t.get("content") if isinstance(t, dict) else t for k, t in tokens.items()}
        return {k: t for k, t in tokens.items() if t is not None}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode`` plus each token's ``(start, end)`` character span in ``text``."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int] | np.ndarray, *, keep_special: bool = False) -> str:
        return self._tok.decode(self.check_ids(ids), skip_special_tokens=not keep_special)

    def id_to_piece(self, i: int) -> str:
        self.check_ids([int(i)])
        return self._tok.id_to_token(int(i))

    def with_chat_tokens(self) -> HFTokenizer:
        """This tokenizer with gptjax's role and end-of-turn tokens appended as special tokens
        (for a base model without a chat template, e.g. GPT-2)."""
        tok = tokenizers.Tokenizer.from_str(self._json)
        tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in CHAT_PIECES])
        return HFTokenizer(tok.to_str(), self.config, self._eos_ids)


def _first(ids: Sequence[int]) -> int | None:
    return ids[0] if ids else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptjaxError(f"{path} is not valid JSON ({e})") from None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- SentencePiece


_META = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = range(1, 7)
_UNIGRAM, _BPE, _WORD, _CHAR = range(1, 5)
# Pre-tokenizer regexes (Oniguruma): see the module docstring.
_WORDS = r" *[^ ]+| +"  # a space run and the non-spaces after it
_DIGIT = "[0-9\uff10-\uff19]"  # SentencePiece's IsDigit
_SCRIPT_BREAK = r"(?<=[<|/])[A-Za-z]"  # a letter after "<", "|" or "/"
_CROSSES = re.compile(rf"(?s)[^ ] |{_DIGIT}.|.{_DIGIT}|[<|/][A-Za-z]")


def from_sentencepiece(sp: SentencePieceTokenizer) -> HFTokenizer:
    """The same tokenizer as a Hugging Face one, with gptjax's chat template in Jinja."""
    proto = model_pb2.ModelProto.FromString(sp.to_bytes())
    _check_convertible(proto)
    tok = tokenizers.Tokenizer(_model(proto))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORDS), "isolated"),
            pre_tokenizers.Split(Regex(_DIGIT), "isolated"),
            pre_tokenizers.Split(Regex(_SCRIPT_BREAK), "merged_with_next"),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    piece = sp.id_to_piece
    config = {
        "bos_token": piece(sp.bos_id),
        "eos_token": piece(sp.eos_id),
        "unk_token": piece(sp.unk_id),
        "pad_token": piece(sp.pad_id),
        "additional_special_tokens": list(CHAT_PIECES),
        "chat_template": GPTJAX_TEMPLATE,
    }
    return HFTokenizer(tok.to_str(), config)


def _model(proto: model_pb2.ModelProto) -> models.Model:
    """The BPE or Unigram model over the pieces, each keeping its id."""
    vocab = [p.piece.replace(_META, " ") if p.type == _NORMAL else p.piece for p in proto.pieces]
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == _UNKNOWN)
    kind = proto.trainer_spec.model_type
    if kind == _UNIGRAM:
        # SentencePiece scores an unknown character min(learned scores) - 10; Hugging Face
        # takes the min over all pieces, so the others (never matched in text) get that min.
        low = min(p.score for p in proto.pieces if p.type == _NORMAL)
        scores = [p.score if p.type == _NORMAL else low for p in proto.pieces]
        return models.Unigram(list(zip(vocab, scores, strict=True)), unk_id=unk, byte_fallback=True)
    merges = _bpe_merges(proto, vocab) if kind == _BPE else []
    ids = {v: i for i, v in enumerate(vocab)}
    return models.BPE(ids, merges, unk_token=vocab[unk], byte_fallback=True)


def _check_convertible(proto: model_pb2.ModelProto) -> None:
    """Refuses models whose normalisation or pieces this conversion does not reproduce."""
    norm, kind = proto.normalizer_spec, proto.trainer_spec.model_type
    problem = None
    if kind not in (_UNIGRAM, _BPE, _CHAR):
        problem = "a word-level model"
    elif norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        problem = "a normalising model"
    elif any(p.type in (_USER_DEFINED, _UNUSED) for p in proto.pieces):
        problem = "user-defined pieces"
    elif sum(p.type == _BYTE for p in proto.pieces) != 256:
        problem = "no byte fallback"
    elif crossing := [
        p.piece
        for p in proto.pieces
        if p.type == _NORMAL and _CROSSES.search(p.piece.replace(_META, " "))
    ]:
        problem = f"piece {crossing[0]!r}"
    if problem:
        raise GptjaxError(
            f"the SentencePiece tokenizer has {problem}, which the Hugging Face export does not "
            f"reproduce; train the tokenizer with gptjax (Tokenizer.train)"
        )


def _bpe_merges(proto: model_pb2.ModelProto, vocab: list[str]) -> list[tuple[str, str]]:
    """Every split of a learned piece into two learned pieces, best piece score first."""
    normal = {vocab[i]: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-proto.pieces[i].score, i, normal[left], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]
