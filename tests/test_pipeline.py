"""Tests for gptjax/data/pipeline.py: windows, batches, iterator state, process slices, caching."""

import itertools
import json

import grain
import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data import pipeline as data
from gptjax.tokenizer import Tokenizer

PAD = 0


def _tokens(n: int) -> np.ndarray:
    """Distinct non-pad ids 1..n, so every target can be traced back to its position."""
    return np.arange(1, n + 1, dtype=np.int32)


def _batches(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def _batching(**kw) -> data.Batching:
    return data.Batching(**(dict(seq_len=8, global_batch_size=4, pad_id=PAD) | kw))


def _train(tokens, seed: int = 0, **kw):
    return data.train_batches(tokens, _batching(**kw), seed=seed)


# ----------------------------------------------------------------------------- train batches


def test_train_batches_shapes_and_dtypes():
    it = _train(_tokens(100))
    assert isinstance(it, grain.DatasetIterator)  # what a grain/Orbax checkpoint stores
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, 8), np.int32),
        "targets": ((4, 8), np.int32),
        "weights": ((4, 8), np.float32),
    }
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_batches_are_deterministic_for_a_seed():
    tokens = _tokens(500)
    first = _batches(_train(tokens, seed=3), 6)
    assert _same(first, _batches(_train(tokens, seed=3), 6))
    assert not _same(first, _batches(_train(tokens, seed=4), 6))


def test_each_epoch_is_an_exact_permutation_of_the_windows():
    # 103 tokens, T=8: 102 targets in 13 windows, the last holding 6 targets and 2 pads.
    tokens, t = _tokens(103), 8
    n = data.num_windows(len(tokens), t)
    assert n == 13
    rows = itertools.chain.from_iterable(  # one row per window, across batch borders
        zip(*(b[k] for k in ("inputs", "targets", "weights")), strict=True)
        for b in _train(tokens, global_batch_size=4)
    )
    epochs = [list(itertools.islice(rows, n)) for _ in range(3)]
    for epoch in epochs:
        targets = np.concatenate([tg[w == 1] for _, tg, w in epoch])
        np.testing.assert_array_equal(np.sort(targets), tokens[1:])  # each target once
        for inputs, tg, w in epoch:
            assert np.all((tg == PAD) == (w == 0))  # weight 0 exactly on padding
            start = int(inputs[0]) - 1  # the window's first position in the split
            real = int(w.sum())
            np.testing.assert_array_equal(inputs[:real], tokens[start : start + real])
    order = [[int(x[0][0]) for x in epoch] for epoch in epochs]
    assert len({tuple(o) for o in order}) == 3  # a fresh permutation every epoch


def test_iterator_state_restores_the_same_batches():
    tokens = _tokens(300)
    it = _train(tokens, seed=1)
    _batches(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint stores it as JSON
    expected = _batches(it, 6)
    restored = _train(tokens, seed=1)
    restored.set_state(state)
    assert _same(expected, _batches(restored, 6))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    tokens = _tokens(400)
    whole = _batches(_train(tokens, global_batch_size=8, seed=2), 5)
    parts = [
        _batches(
            _train(
                tokens, global_batch_size=8, seed=2, process_index=p, process_count=process_count
            ),
            5,
        )
        for p in range(process_count)
    ]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            pieces = [part[step][key] for part in parts]
            assert all(piece.shape[0] == 8 // process_count for piece in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces), value)


def test_train_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"fewer than one window of data.seq_len\+1=9"):
        _train(_tokens(8))
    with pytest.raises(
        ValueError, match=r"global batch size 6 \(train.batch_size or eval.batch_size\) must"
    ):
        _train(_tokens(100), global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        _train(_tokens(100), process_index=2, process_count=2)


# ----------------------------------------------------------------------------- eval batches


def test_eval_batches_read_a_short_split_in_order_with_padding_rows():
    tokens = _tokens(30)  # 29 targets: 4 windows of 8 (the last holds 5)
    batches = data.eval_batches(tokens, _batching(global_batch_size=3), num_batches=20)
    assert len(batches) == 2  # all 4 windows, the 2nd batch filled up with 2 empty rows
    targets = np.concatenate([b["targets"][b["weights"] == 1] for b in batches])
    np.testing.assert_array_equal(targets, tokens[1:])  # in order, each once
    assert batches[1]["weights"][1:].sum() == 0 and batches[1]["inputs"].shape == (3, 8)


def test_eval_batches_stop_at_num_batches_and_slice_per_process():
    tokens = _tokens(1000)
    whole = data.eval_batches(tokens, _batching(), num_batches=3)
    assert len(whole) == 3
    np.testing.assert_array_equal(whole[0]["inputs"][0], tokens[:8])
    halves = [
        data.eval_batches(tokens, _batching(process_index=p, process_count=2), num_batches=3)
        for p in (0, 1)
    ]
    for step in range(3):
        np.testing.assert_array_equal(
            np.concatenate([h[step]["targets"] for h in halves]), whole[step]["targets"]
        )
    with pytest.raises(ValueError, match="validation split has 1 tokens; it needs at least 2"):
        data.eval_batches(_tokens(1), _batching(), num_batches=1)


# ----------------------------------------------------------------------------- load_corpus


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "\n", "ROMEO:"]
    text = " ".join(rng.choice(words, size=3000))
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def _config(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=source, cache_dir=str(tmp_path / "cache"), tokenizer_type="char", **kw)


def test_load_corpus_text_file_round_trips_both_splits(tmp_path, text_file):
    path, text = text_file
    lines = []
    corpus = data.load_corpus(_config(tmp_path, f"text:{path}"), log=lines.append)
    cut = int(len(text) * 0.9)
    tok = corpus.tokenizer
    for tokens, part in ((corpus.train_tokens, text[:cut]), (corpus.val_tokens, text[cut:])):
        assert tokens.dtype == np.int32 and tokens[-1] == tok.eos_id
        assert np.count_nonzero(tokens == tok.eos_id) == 1  # one document, one EOS
        assert tok.decode(tokens) == part
    assert f"({len(text) - cut:,} of {len(text):,}) of 1 file" in corpus.description
    assert f"{len(corpus.train_tokens):,} train" in corpus.description
    assert any(line.startswith("materialising") for line in lines)


def test_load_corpus_reuses_every_cached_artifact(tmp_path, text_file):
    path, _ = text_file
    config = _config(tmp_path, f"text:{path}")
    first = data.load_corpus(config, log=lambda _: None)
    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    lines = []
    second = data.load_corpus(config, log=lines.append)
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing rewritten
    assert any("reusing materialised dataset" in line for line in lines)
    assert any("reusing tokenizer" in line for line in lines)
    assert isinstance(second.train_tokens, np.memmap)
    np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
    assert first.tokenizer.fingerprint == second.tokenizer.fingerprint


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("abc abc cab\n" * 50)
    (folder / "val.txt").write_text("xyz\n" * 20)
    corpus = data.load_corpus(_config(tmp_path, f"text:{folder}"), log=lambda _: None)
    tok = corpus.tokenizer
    assert len(tok.encode("a")) == 1 and tok.encode("a")[0] >= 8 + 256  # a learned piece
    assert 8 <= tok.encode("x")[0] < 8 + 256  # unseen in train: byte fallback
    assert tok.decode(corpus.val_tokens) == "xyz\n" * 20


def test_given_tokenizer_path_is_loaded_not_trained(tmp_path, text_file):
    path, text = text_file
    trained = Tokenizer.train([text], model_type="bpe", vocab_size=300, progress=False)
    model = tmp_path / "my.model"
    trained.save(model)
    corpus = data.load_corpus(
        _config(tmp_path, f"text:{path}", tokenizer=str(model)), log=lambda _: None
    )
    assert corpus.tokenizer.fingerprint == trained.fingerprint
    assert not (tmp_path / "cache" / "tokenizers").exists()
    with pytest.raises(ValueError, match="tokenizer '/nope.model' does not exist"):
        data.load_corpus(_config(tmp_path, f"text:{path}", tokenizer="/nope.model"))


def test_load_corpus_shakespeare_end_to_end(tmp_path):
    corpus = data.load_corpus(_config(tmp_path, "shakespeare"), log=lambda _: None)
    assert corpus.description.startswith("shakespeare: 34 train plays")
    tok = corpus.tokenizer
    assert np.count_nonzero(corpus.train_tokens == tok.eos_id) == 34
    assert np.count_nonzero(corpus.val_tokens == tok.eos_id) == 4
    head = tok.decode(corpus.val_tokens[:2000])
    assert head.startswith("Twelfth Night") and "ORSINO:" in head and "**" not in head
    batch = next(
        data.train_batches(
            corpus.train_tokens, data.Batching(64, global_batch_size=2, pad_id=tok.pad_id), seed=0
        )
    )
    assert batch["inputs"].shape == (2, 64) and batch["weights"].all()
