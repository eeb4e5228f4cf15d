"""Chat fine-tuning end to end: pretrain → finetune (assistant loss falls) → chat CLI."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptjax import lora
from gptjax.config import MODEL_PRESETS, TrainConfig, apply_overrides, load_experiment
from gptjax.errors import GptjaxError
from gptjax.exports import export
from gptjax.inference.generator import load
from gptjax.inference.session import ChatSession
from gptjax.metrics import read_metrics
from gptjax.model import init_params
from gptjax.training.finetune import finetune
from gptjax.training.pretrain import pretrain
from gptjax.training.steps import make_optimizer

QUICK = ["--eval.sample_tokens=0", "--train.log_every_steps=5", "--train.steps_per_call=5"]


def _conversations(n: int) -> list[dict]:
    """A learnable pattern: the assistant repeats the user's number and names its square."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} squared?"},
                {"role": "assistant", "content": f"{i} squared is {i * i}."},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pretrained(tiny_workdir):
    """The suite's tiny pretrained model (tests/conftest.py), fine-tuned here, never written."""
    return tiny_workdir


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_data")
    for name, rows in (("train", _conversations(200)), ("val", _conversations(240)[200:])):
        (root / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8"
        )
    return root


def _chat_config(chat_data, *extra):
    return apply_overrides(
        load_experiment("chat_english"),
        [
            f"--data.source=jsonl:{chat_data}",
            "--train.steps=60",
            "--train.batch_size=8",
            "--train.learning_rate=3e-3",
            "--eval.every_steps=30",
            "--eval.num_batches=2",
            *QUICK,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def chat_workdir(tmp_path_factory, pretrained, chat_data):
    run = tmp_path_factory.mktemp("chat") / "run"
    final = finetune(_chat_config(chat_data), run, pretrained)
    return run, final


def test_assistant_loss_falls_from_step_zero(chat_workdir):
    workdir, final = chat_workdir
    val = [r for r in read_metrics(workdir) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    assert final["val_loss"] == pytest.approx(val[-1]["val_loss"])
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["num_layers"] == 2  # the pretrained shape, not the chat config's


def test_seq_len_is_held_against_the_pretrained_models_context(tmp_path, pretrained, chat_data):
    with pytest.raises(GptjaxError, match=r"data.seq_len=128 must be in \[0, model.max_len=64\]"):
        finetune(_chat_config(chat_data, "--data.seq_len=128"), tmp_path, pretrained)


def test_chinese_dialogues_train(tmp_path, pretrained):
    config = apply_overrides(
        load_experiment("chat_english"),
        [
            "--data.source=chatterbot:chinese",
            "--train.steps=20",
            "--eval.every_steps=20",
            "--eval.num_batches=1",
            "--train.batch_size=8",
            "--train.learning_rate=3e-3",
            *QUICK,
        ],
    )
    final = finetune(config, tmp_path, pretrained)
    val = [r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r]
    # The model was pretrained on English plays only: Chinese text is byte-fallback pieces it
    # has never predicted, so 20 steps must move the assistant loss by a wide margin.
    assert val[-1] < val[0] - 1.0, val
    assert final["train_loss"] < val[0] - 1.0, (final, val)


def test_session_keeps_and_trims_history(chat_workdir):
    gen = load(chat_workdir[0])
    seen = []
    real_chat = gen.chat
    gen.chat = lambda messages, **kw: seen.append(list(messages)) or real_chat(messages, **kw)
    session = ChatSession(gen, system="Be brief.", max_new_tokens=8, temperature=0.0)
    session.send("What is 3 squared?")
    session.send("And 4?")
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    for _ in range(6):  # max_len is 64 tokens: old exchanges must go, the system prompt stays
        session.send("What is 12 squared? Tell me more.")
    assert session.dropped > 0 and seen[-1][0]["role"] == "system"
    session.reset()
    assert session.turns == []


def _chat_cli(workdir, *args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "gptjax", "chat", "--workdir", str(workdir), *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )


def test_chat_once_answers_what_the_python_api_answers(chat_workdir):
    args = ["--temperature", "0.8", "--seed", "3", "--max-new-tokens", "24"]
    result = _chat_cli(chat_workdir[0], "--once", "What is 5 squared?", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.split("assistant> ", 1)[1]
    assert answer.endswith("\n") and answer.strip(), result.stdout
    messages = [{"role": "user", "content": "What is 5 squared?"}]
    expected = load(chat_workdir[0]).chat(messages, max_new_tokens=24, temperature=0.8, seed=3)
    assert answer[:-1] == expected


def test_piped_lines_hold_a_conversation(chat_workdir):
    """A message too long for the 64-token window is refused with a notice; the conversation
    goes on with its history."""
    too_long = "What is 2 squared? " * 40
    lines = (
        f"What is 2 squared?\n{too_long}\n你好，最近如何?\n/reset\nWhat is 7 squared?\n"
        "/exit\nignored\n"
    )
    result = _chat_cli(chat_workdir[0], "--temperature", "0", "--max-new-tokens", "12", stdin=lines)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 3
    assert "(conversation reset)" in result.stdout
    assert "(not sent: the message alone needs more than the" in result.stdout


def test_a_message_too_long_for_the_window_keeps_the_history(chat_workdir):
    session = ChatSession(load(chat_workdir[0]), max_new_tokens=8, temperature=0.0)
    session.send("What is 3 squared?")
    session.send("And 4?")
    before = list(session.turns)
    with pytest.raises(GptjaxError, match="the message alone needs more than"):
        session.send("What is 2 squared? " * 40)
    assert session.turns == before and session.dropped == 0
    session.send("And 5?")
    assert [m["role"] for m in session.turns] == ["user", "assistant"] * 3


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory, pretrained, chat_data):
    run = tmp_path_factory.mktemp("lora") / "run"
    lines = []
    config = _chat_config(chat_data, "--model.lora_rank=4", "--train.learning_rate=1e-2")
    final = finetune(config, run, pretrained, log=lines.append)
    return run, final, lines


def test_lora_trains_only_the_adapters(lora_workdir, chat_workdir, pretrained):
    workdir, final, lines = lora_workdir
    # Rank 4 on 2 layers x (q, k, v, out: 64 -> 64; up 64 -> 256, down 256 -> 64): the adapters
    # are 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 256)) = 9,216 parameters.
    assert any("LoRA rank 4 (alpha 16): 9,216 trainable parameters" in ln for ln in lines), lines
    val = [r for r in read_metrics(workdir) if "val_loss" in r]
    full = [r for r in read_metrics(chat_workdir[0]) if "val_loss" in r]
    # B starts at zero: at step 0 the adapted model is the pretrained one.
    assert val[0]["step"] == 0 and val[0]["val_loss"] == pytest.approx(full[0]["val_loss"], 1e-6)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.3, val
    base, tuned = load(pretrained).params, load(workdir).params
    frozen, adapters = lora.split(tuned)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(frozen), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(adapters))  # B moved off zero


def test_lora_optimizer_keeps_state_for_adapters_only():
    config = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=256, lora_rank=2)
    params = init_params(config, jax.random.key(0))["params"]
    adapters = lora.split(params)[1]
    state = make_optimizer(TrainConfig(), lora=True).init(params)
    sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim)
    assert sizes == sorted(2 * [x.size for x in jax.tree.leaves(adapters)])  # Adam mu and nu


def test_lora_export_merges_into_the_weights(lora_workdir, tmp_path):
    workdir = lora_workdir[0]
    export(workdir, tmp_path / "merged")
    adapted, merged = load(workdir), load(tmp_path / "merged")
    assert merged.config.model.lora_rank == 0 and not lora.split(merged.params)[1]
    tokens = np.array([[2, 5, 9, 14, 30, 41, 7, 3]], np.int32)
    logits = [g.model.apply({"params": g.params}, tokens) for g in (adapted, merged)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_lora_workdir_cannot_be_fine_tuned_again(lora_workdir, chat_data, tmp_path):
    with pytest.raises(ValueError, match="`gptjax export` it first"):
        finetune(_chat_config(chat_data), tmp_path / "again", lora_workdir[0])


def test_pretraining_refuses_lora(tmp_path):
    config = apply_overrides(load_experiment("tiny"), ["--model.lora_rank=4"])
    with pytest.raises(ValueError, match="LoRA adapters are for fine-tuning"):
        pretrain(config, tmp_path)


def test_chat_samples_in_training_decode_from_the_training_tree(chat_workdir, monkeypatch):
    """The eval's chat sample reads the parameters being trained as they are: no
    ``decode_layout`` copy of every kernel at each eval. It answers what a ``Generator``
    (decoding's layout) answers."""
    from gptjax.inference import generator
    from gptjax.training.finetune import sample_chat

    chat = load(chat_workdir[0])  # its config and chat tokenizer; the weights are random
    e = dataclasses.replace(chat.config.eval, sample_tokens=16, sample_temperature=0.0)
    config, tokenizer = dataclasses.replace(chat.config, eval=e), chat.tokenizer
    params = init_params(config.model, jax.random.key(3))["params"]
    want = generator.Generator(config, params, tokenizer).chat(
        [{"role": "user", "content": e.sample_prompt}], max_new_tokens=16, temperature=0
    )

    def no_copy(_):
        raise AssertionError("sample_chat made a decode_layout copy")

    monkeypatch.setattr(generator, "decode_layout", no_copy)
    assert generator.Generator(config, params, tokenizer, fast_layout=False).params is params
    text = sample_chat(config, params, tokenizer, seed=0)
    assert text == f"user: {e.sample_prompt}\nassistant: {want}"
