"""Tests for gptjax/dialogues.py: chatterbot, jsonl and tfds sources, bad records, splits."""

import dataclasses
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from gptjax.config import Config, DataConfig, validate
from gptjax.data import dialogues, sft
from gptjax.data.pipeline import Batching
from gptjax.tokenizer import Tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
BAD_LINES = [  # (line, reason)
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0 has unknown role 'bot'"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
        r"message 1 \(assistant\) has empty content",
    ),
    ('{"messages": [{"role": "user", "content": "anyone?"}]}', "no assistant message"),
    (
        '{"messages": [{"role": "assistant", "content": 7}]}',
        r"message 0 \(assistant\) content is int, not a",
    ),
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad JSON \(Expecting ',' delimiter at"),
    ('{"conversation": []}', 'not a JSON object with a "messages" list'),
    ('["hi"]', 'not a JSON object with a "messages" list'),
]


def _quiet(_: str) -> None:
    pass


def _config(tmp_path, source: str, **kw) -> DataConfig:
    args = dict(source=source, cache_dir=str(tmp_path / "cache"), tokenizer_type="char") | kw
    return DataConfig(**args)


def _conversation(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": f"question {i}?"},
            {"role": "assistant", "content": f"answer {i}."},
        ]
    }


def _write_jsonl(path, objects) -> None:
    path.write_text("".join(o if isinstance(o, str) else json.dumps(o) for o in objects))


def _lines(objects) -> list[str]:
    return [(o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects]


def _template(messages) -> str:
    return "<s>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


# ----------------------------------------------------------------------------- jsonl


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_each_bad_jsonl_record_is_reported_as_path_line_reason(tmp_path, line, reason):
    path = tmp_path / "chats.jsonl"
    _write_jsonl(path, _lines([GOOD, GOOD, "", line, GOOD]))  # line 3 is blank: not a record
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:4: {reason}") as info:
        dialogues.load_dialogues(_config(tmp_path, f"jsonl:{path}"), log=_quiet)
    message = str(info.value)
    assert "\n" not in message and message.endswith(
        f"(1 bad record in data.source='jsonl:{path}'; fix it, or set --data.on_bad_record=skip)"
    )


def test_skip_mode_counts_and_logs_bad_records(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    bad = [line for line, _ in BAD_LINES]
    _write_jsonl(folder / "train.jsonl", _lines([_conversation(0), *bad, _conversation(1)]))
    _write_jsonl(folder / "val.jsonl", _lines([bad[0], _conversation(2)]))
    lines = []
    config = _config(tmp_path, f"jsonl:{folder}", on_bad_record="skip")
    chats = dialogues.load_dialogues(config, log=lines.append)
    assert chats.skipped == len(bad) + 1
    assert (len(chats.train), len(chats.validation)) == (2, 1)
    assert f"skipped {len(bad) + 1} bad records of jsonl:{folder} (first: " in lines[0]
    assert f"{folder / 'train.jsonl'}:2: message 0 has unknown role" in lines[0]
    assert chats.description.endswith(f"; {len(bad) + 1:,} bad records skipped")
    assert "train.jsonl, validation = val.jsonl" in chats.description
    tok = chats.tokenizer
    assert tok.decode(chats.validation[0][0], keep_special=True) == _template(
        _conversation(2)["messages"]
    )
    with pytest.raises(ValueError, match=r"data.on_bad_record='ignore' is not one of"):
        validate(Config(data=_config(tmp_path, f"jsonl:{folder}", on_bad_record="ignore")))


def test_jsonl_file_is_split_by_content_hash(tmp_path):
    convs = [_conversation(i) for i in range(300)]
    path, reordered = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_jsonl(path, _lines(convs))
    _write_jsonl(reordered, _lines(convs[::-1] + [_conversation(1000)]))
    bad = []
    train, val, description = dialogues.local_records(_config(tmp_path, f"jsonl:{path}"), bad)
    assert not bad and len(train) + len(val) == 300 and 15 <= len(val) <= 45
    assert "validation = 10% of the conversations by content hash" in description
    _, val2, _ = dialogues.local_records(_config(tmp_path, f"jsonl:{reordered}"), bad)
    key = dialogues.canonical_json
    assert {key(c) for c in val} <= {key(c) for c in val2}  # stable under reorder and additions
    for c in val:
        assert dialogues.held_out(c, 0.1) and not dialogues.held_out(c, 0.0)


def test_load_dialogues_renders_the_template_and_reuses_its_cache(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _lines([_conversation(i) for i in range(5)]))
    # Extra keys (OpenAI's "name", "weight") are not part of the stored conversation.
    extra = {
        "messages": [{"role": "user", "content": "q", "name": "x"}]
        + [{"role": "assistant", "content": "a", "weight": 1}]
    }
    _write_jsonl(folder / "val.jsonl", _lines([extra]))
    config = _config(tmp_path, f"jsonl:{folder}")
    lines = []
    chats = dialogues.load_dialogues(config, log=lines.append)
    tok = chats.tokenizer
    for i in range(5):
        ids, mask = chats.train[i]
        assert tok.decode(ids, keep_special=True) == _template(_conversation(i)["messages"])
        assert tok.decode(ids[mask]) == f"answer {i}."
    assert tok.decode(chats.validation[0][0], keep_special=True) == (
        "<s><|user|>q<|end|><|assistant|>a<|end|>"
    )
    assert any(line.startswith("materialising 5 + 1 documents as array_record") for line in lines)
    assert chats.description.startswith(f"jsonl:{folder}: train.jsonl, validation = val.jsonl; 5")
    lines.clear()
    again = dialogues.load_dialogues(config, log=lines.append)
    assert any(line.startswith("reusing materialised dataset") for line in lines)
    assert any(line.startswith("reusing tokenizer") for line in lines)
    np.testing.assert_array_equal(again.train.tokens, chats.train.tokens)
    given = Tokenizer.train(["question answer 0123456789"], model_type="char", progress=False)
    assert dialogues.load_dialogues(config, given, log=_quiet).tokenizer is given


@pytest.mark.parametrize(
    "source, files, match",
    [
        ("jsonl:/no/such.jsonl", {}, r"data.source='jsonl:/no/such.jsonl': no such file or"),
        ("jsonl:{d}", {"train.jsonl": GOOD}, "is a folder without train.jsonl and val.jsonl"),
        ("jsonl:{d}/one.jsonl", {"one.jsonl": GOOD}, r"gives no validation conversations \(1 "),
        ("chatterbot:klingon", {}, "'chatterbot:klingon' is not a chatterbot-corpus language; "),
        ("csv:{d}", {}, "is not a dialogue source; use 'chatterbot:LANG', 'jsonl:PATH' or"),
    ],
)
def test_bad_sources_fail_in_one_line(tmp_path, source, files, match):
    for name, obj in files.items():
        _write_jsonl(tmp_path / name, _lines([obj]))
    with pytest.raises(ValueError, match=match) as info:
        dialogues.load_dialogues(_config(tmp_path, source.format(d=tmp_path)), log=_quiet)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- chatterbot


def test_chatterbot_reader_locates_odd_entries_by_line(tmp_path):
    path = tmp_path / "odd.yml"
    path.write_text(
        "categories:\n- test\nconversations:\n"
        "- - Hello\n  - Hi!\n  - How are you?\n"  # 4: good, ends on a user turn
        "- - What is 6 times 7?\n  - 42\n"  # 7: an int, not a string
        "- A question? - with its answer\n"  # 9: a string, not a list
        "- - Anyone?\n"  # 10: no assistant turn
        "- - ''\n  - empty question\n",  # 11: empty content
        encoding="utf-8",
    )
    records = list(dialogues.read_chatterbot(path))
    assert [(where, reason) for where, _, reason in records] == [
        (f"{path}:4", None),
        (f"{path}:7", "conversation 1: message 1 (assistant) content is int, not a string"),
        (f"{path}:9", "conversation 2 is a str, not a list of turns"),
        (f"{path}:10", "conversation 3: no assistant message (nothing to learn from)"),
        (f"{path}:11", "conversation 4: message 0 (user) has empty content"),
    ]
    assert [m["role"] for m in records[0][1]] == ["user", "assistant", "user"]
    path.write_text("conversations:\n- - a\n  - [b\n", encoding="utf-8")
    ((where, _, reason),) = dialogues.read_chatterbot(path)
    assert where.startswith(f"{path}:") and reason.startswith("YAML error: ")


@pytest.fixture(scope="module")
def corpus_tokenizer():
    """A BPE tokenizer on the english + chinese dialogue text (rare characters → bytes)."""
    bad, texts = [], []
    for lang in ("english", "chinese"):
        config = DataConfig(source=f"chatterbot:{lang}")
        train, val, _ = dialogues.local_records(config, bad)
        texts += ["\n".join(m["content"] for m in c) for c in train + val]
    return Tokenizer.train(texts, model_type="bpe", vocab_size=2000, progress=False)


def test_chatterbot_english_skips_the_bad_record_it_ships(tmp_path, corpus_tokenizer):
    """The package's own malformed record is skipped (and said) even under the default
    on_bad_record="error", which is for the user's own data."""
    lines = []
    config = _config(tmp_path, "chatterbot:english")
    assert config.on_bad_record == "error"
    chats = dialogues.load_dialogues(config, corpus_tokenizer, log=lines.append)
    assert chats.skipped == 1 and len(chats.train) + len(chats.validation) == 2025
    said = "skipped 1 bad record that the package ships of chatterbot:english (first: "
    assert lines[0].startswith(said), lines
    assert "english/trivia.yml:35: conversation 13 is a str, not" in lines[0]
    assert 0.03 < len(chats.validation) / 2025 < 0.2
    assert chats.description.startswith("chatterbot:english: 21 files of chatterbot-corpus")


def test_chatterbot_chinese_tokenizes_losslessly(tmp_path, corpus_tokenizer):
    config = _config(tmp_path, "chatterbot:chinese")
    chats = dialogues.load_dialogues(config, corpus_tokenizer, log=_quiet)
    assert chats.skipped == 0
    train, val, _ = dialogues.local_records(config, [])  # the same conversations, same order
    tok = corpus_tokenizer
    for split, convs in ((chats.train, train), (chats.validation, val)):
        assert len(split) == len(convs)
        for i, messages in enumerate(convs):
            ids, mask = split[i]
            assert tok.decode(ids, keep_special=True) == _template(messages)
            answers = "".join(m["content"] for m in messages if m["role"] == "assistant")
            assert tok.decode(ids[mask]) == answers
    assert any(8 <= i < 8 + 256 for i in chats.train.tokens)  # some characters went to bytes
    batch = next(
        sft.sft_batches(
            chats.train, Batching(64, global_batch_size=4, pad_id=0), seed=0, log=_quiet
        )
    )
    assert batch["weights"].sum() > 0 and batch["segment_ids"].max() > 1


# ----------------------------------------------------------------------------- tfds


class GptjaxTestChats(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dialogue dataset (Sequence of role/content) standing in for a real one."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see sources.GptjaxText: avoids TFDS's importlib_resources lookup

    def _info(self):
        turn = {"role": tfds.features.Text(), "content": tfds.features.Text()}
        features = tfds.features.FeaturesDict({"messages": tfds.features.Sequence(turn)})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 6), "test": self._generate_examples(6, 8)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            answer = "" if i == 2 else f"答案 {i}"  # example 2 is bad: empty answer
            turns = [("user", f"问题 {i}?"), ("assistant", answer)]
            yield i, {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    GptjaxTestChats(data_dir=root, file_format="array_record").download_and_prepare()
    return root


def test_tfds_dialogues_validate_split_and_render(tmp_path, chats_dir):
    config = _config(tmp_path, "tfds:gptjax_test_chats", tfds_data_dir=str(chats_dir))
    with pytest.raises(
        ValueError, match=r"^tfds:gptjax_test_chats\[train\]:2: message 1 \(assistant\) has empty"
    ):
        dialogues.load_dialogues(config, log=_quiet)
    skip = _config(
        tmp_path, "tfds:gptjax_test_chats", tfds_data_dir=str(chats_dir), on_bad_record="skip"
    )
    chats = dialogues.load_dialogues(skip, log=_quiet)
    assert (len(chats.train), len(chats.validation), chats.skipped) == (5, 2, 1)
    assert chats.tokenizer.decode(chats.validation[1][0], keep_special=True) == (
        "<s><|user|>问题 7?<|end|><|assistant|>答案 7<|end|>"
    )
    assert "train = train (6 examples), validation = test (2 examples)" in chats.description
    missing = dataclasses.replace(config, tfds_val_split="validation")
    with pytest.raises(ValueError, match=r"split 'validation' is not in tfds:gptjax_test_chats"):
        dialogues.load_dialogues(missing, log=_quiet)


@pytest.mark.parametrize(
    "value, reason",
    [
        ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]', None),
        ({"role": [b"user", b"assistant"], "content": [b"q", b"a"]}, None),
        ('[{"role": "user"', "bad JSON (Expecting"),
        ({"role": [b"user"], "content": [b"q"]}, "no assistant message"),
    ],
)
def test_tfds_messages_values_in_every_layout(value, reason):
    messages, why = dialogues.messages_of(value)
    if reason is None:
        assert why is None and [m["content"] for m in messages] == ["q", "a"]
    else:
        assert why.startswith(reason)
