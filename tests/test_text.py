"""Tests for gptjax/data/text.py and tfds_catalog.py: shakespeare, text:PATH, tfds:NAME,
materialisation, errors; and nanoGPT's tiny-shakespeare split, reproduced."""

import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.shakespeare_char import shared_data_dir
from gptjax.config import DataConfig
from gptjax.data import pipeline as data
from gptjax.data import text as sources
from gptjax.tokenizer import Tokenizer


def _quiet(_: str) -> None:
    pass


def _open(tmp_path, source: str, **kw) -> sources.Source:
    config = DataConfig(source=source, **kw)
    return sources.open_source(config, tmp_path / "datasets", _quiet)


# ----------------------------------------------------------------------------- shakespeare


def test_markdown_to_play_writes_tiny_shakespeare_style():
    md = (
        "# Romeo and Juliet\n\n## ACT I\n\n### SCENE I. Verona.\n\n"
        "_Enter SAMPSON and GREGORY, of the house of\nCapulet_\n\n"
        "**ROMEO**  \nGood morrow, cousin.  \n_\\[Aside]_  \nIs the day so young?\n\n\n"
        "**JULIET**  \n\\--O, swear not by the moon, &amp; c.\n\n*Exeunt.*\n"
    )
    assert sources.markdown_to_play(md) == (
        "Romeo and Juliet\n\nACT I\n\nSCENE I. Verona.\n\n"
        "Enter SAMPSON and GREGORY, of the house of\nCapulet\n\n"
        "ROMEO:\nGood morrow, cousin.\n[Aside]\nIs the day so young?\n\n"
        "JULIET:\n--O, swear not by the moon, & c.\n\nExeunt.\n"
    )


def test_shakespeare_has_38_plays_split_by_play():
    text = sources.shakespeare_text()
    assert len(text.train) + len(text.validation) == 38 and len(text.validation) == 4
    assert not set(text.train) & set(text.validation)
    assert [doc.splitlines()[0] for doc in text.validation] == [
        "Twelfth Night",
        "Henry V",
        "Julius Caesar",
        "Macbeth",
    ]
    everything = "".join(text.train + text.validation)
    assert "\nROMEO:\n" in "".join(text.train)  # Romeo and Juliet stays in train
    for mark in ("**", "_", "*", "\\[", "  \n", "\n#"):
        assert mark not in everything
    share = sum(map(len, text.validation)) / len(everything)
    assert 0.08 < share < 0.12


# ----------------------------------------------------------------------------- text:PATH


def test_single_file_splits_at_exactly_90_percent_of_characters(tmp_path):
    content = "".join(chr(ord("a") + i % 26) for i in range(1234)) + "\n"
    (tmp_path / "input.txt").write_text(content, encoding="utf-8")
    text = sources.local_text(str(tmp_path / "input.txt"), 0.1)
    cut = int(len(content) * 0.9)  # nanoGPT shakespeare_char: data[:int(n*0.9)]
    assert text.train == (content[:cut],) and text.validation == (content[cut:],)
    assert text.description.endswith(
        f"validation = last 10% of the characters ({len(content) - cut:,} of "
        f"{len(content):,}) of 1 file"
    )


def test_folder_is_read_recursively_in_path_order_and_cut_across_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.md").write_text("B" * 30)
    (tmp_path / "a.txt").write_text("A" * 60)
    (tmp_path / "c.txt").write_text("C" * 10)
    (tmp_path / "skip.json").write_text("{}")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("X" * 99)
    text = sources.local_text(str(tmp_path), 0.25)  # 100 characters: cut at 75
    assert text.train == ("A" * 60, "B" * 15)
    assert text.validation == ("B" * 15, "C" * 10)
    assert "of 3 files (sorted by path)" in text.description


def test_train_and_val_files_are_the_splits(tmp_path):
    (tmp_path / "train.txt").write_text("the train text\n")
    (tmp_path / "val.txt").write_text("held out\n")
    (tmp_path / "notes.md").write_text("ignored when train.txt + val.txt exist")
    text = sources.local_text(str(tmp_path), 0.1)
    assert text.train == ("the train text\n",) and text.validation == ("held out\n",)
    assert "validation = val.txt" in text.description


@pytest.mark.parametrize(
    "files, source, match",
    [
        ({}, "bogus", r"data.source='bogus' is not a known source; use 'shakespeare'"),
        ({}, "tfds:", r"is not a known source"),
        ({}, "text:{d}/missing.txt", r"missing.txt': no such file or folder"),
        ({"x.json": "{}"}, "text:{d}", r"the folder holds no .txt or .md files"),
        ({"a.txt": " \n\t\n"}, "text:{d}", r"is empty \(or only whitespace\)"),
        ({"a.txt": b"abc\0def"}, "text:{d}", r"a.txt contains NUL bytes \(a binary file\?\)"),
        ({"bad.txt": b"caf\xe9"}, "text:{d}", r"bad.txt is not valid UTF-8 \(byte 3\)"),
        ({"train.txt": "x"}, "text:{d}", r"has train.txt but no val.txt; add val.txt"),
        ({"val.txt": "x"}, "text:{d}", r"has val.txt but no train.txt; add train.txt"),
        ({"train.txt": "x", "val.txt": "\n"}, "text:{d}", r"empty validation split"),
    ],
)
def test_bad_sources_fail_in_one_line(tmp_path, files, source, match):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, content in files.items():
        write = (
            (folder / name).write_bytes
            if isinstance(content, bytes)
            else (folder / name).write_text
        )
        write(content)
    with pytest.raises(ValueError, match=match) as info:
        _open(tmp_path, source.format(d=folder))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- materialise


def test_materialise_writes_array_record_once(tmp_path, monkeypatch):
    text = sources.LocalText(("one doc", "two docs"), ("held out",), "test")
    lines = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    first = sources.materialise(text, tmp_path / "datasets", lines.append)
    assert not any((tmp_path / "tmp").iterdir())  # no temporary folder left behind
    records = sorted(first.rglob("*.array_record-*"))
    assert len(records) == 2 and first.name == text.content_hash
    stamps = [p.stat().st_mtime_ns for p in records]
    again = sources.materialise(text, tmp_path / "datasets", lines.append)
    assert again == first and [p.stat().st_mtime_ns for p in records] == stamps
    assert lines[0].startswith("materialising") and lines[-1].startswith("reusing")
    changed = sources.LocalText(("one doc", "two docs!"), ("held out",), "test")
    assert changed.content_hash != text.content_hash
    source = sources.open_local(text, tmp_path / "datasets", _quiet)  # read back by random access
    assert list(source.train) == ["one doc", "two docs"] and source.validation[0] == "held out"


# ----------------------------------------------------------------------------- tfds:NAME


class GptjaxTestStories(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dataset standing in for a catalog one (no download, no TF)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see GptjaxText: avoids TFDS's importlib_resources lookup

    def _info(self):
        features = tfds.features.FeaturesDict({"story": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 6), "test": self._generate_examples(6, 8)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"story": f"story number {i}: once upon a time\n", "id": i}


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    GptjaxTestStories(data_dir=root, file_format="array_record").download_and_prepare()
    return root


def test_tfds_source_reads_the_text_field_of_both_splits(tmp_path, stories_dir):
    source = _open(
        tmp_path, "tfds:gptjax_test_stories", tfds_data_dir=str(stories_dir), text_field="story"
    )
    assert list(source.train) == [f"story number {i}: once upon a time\n" for i in range(6)]
    assert list(source.validation)[-1] == "story number 7: once upon a time\n"
    assert "train = train (6 examples), validation = test (2 examples)" in source.description
    sliced = _open(
        tmp_path,
        "tfds:gptjax_test_stories",
        tfds_data_dir=str(stories_dir),
        text_field="story",
        tfds_train_split="train[:50%]",
    )
    assert len(sliced.train) == 3 and sliced.key != source.key


def test_load_corpus_over_tfds(tmp_path, stories_dir):
    config = DataConfig(
        source="tfds:gptjax_test_stories",
        tfds_data_dir=str(stories_dir),
        text_field="story",
        cache_dir=str(tmp_path),
        tokenizer_type="char",
    )
    corpus = data.load_corpus(config, log=_quiet)
    assert np.count_nonzero(corpus.train_tokens == corpus.tokenizer.eos_id) == 6
    assert corpus.tokenizer.decode(corpus.val_tokens) == "".join(
        f"story number {i}: once upon a time\n" for i in (6, 7)
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(source="tfds:no_such_dataset_xyz"), r"unknown tfds dataset \(Dataset no_such"),
        (dict(tfds_data_dir="no/such/dir"), r"data.tfds_data_dir=.no/such/dir. does not exist"),
        (
            dict(text_field="body"),
            r"has no 'body' feature \(it has \['id', 'story'\]\); data.text_field='body' must",
        ),
        (dict(tfds_val_split="validation"), r"split 'validation' is not in .*\['test', 'train'\]"),
    ],
)
def test_bad_tfds_sources_fail_in_one_line(tmp_path, stories_dir, kw, match):
    args = (
        dict(source="tfds:gptjax_test_stories", tfds_data_dir=str(stories_dir), text_field="story")
        | kw
    )
    with pytest.raises(ValueError, match=match) as info:
        _open(tmp_path, **args)
    assert "\n" not in str(info.value)


def test_unprepared_tfds_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"is not prepared in .* run `tfds build "
        r"gptjax_test_stories --file_format=array_record",
    ):
        _open(tmp_path, "tfds:gptjax_test_stories", tfds_data_dir=str(tmp_path))


def test_tiny_shakespeare_splits_and_tokenizes_like_nanogpt():
    """experiments/shakespeare_char.py compares with nanoGPT's shakespeare_char recipe; its data
    must be nanoGPT's: the first 90% of the characters for training (1,003,854), the last 10%
    for validation (111,540), one token per character over a vocabulary of 65 characters
    (figures of nanoGPT's prepare.py, ../shared/data/README.md)."""
    path = shared_data_dir() / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent: set GPTJAX_SHARED_DATA to the folder that holds it")
    text = sources.local_text(str(path), 0.1)
    (train,), (val,) = text.train, text.validation
    assert (len(train), len(val)) == (1_003_854, 111_540)
    tokenizer = Tokenizer.train([train], model_type="char", progress=False)
    learned = tokenizer.vocab_size - 8 - 256  # the specials and byte pieces come first
    assert learned == len(set(train)) == 65
    assert len(tokenizer.encode(val)) == len(val)
