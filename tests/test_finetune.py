"""Chat fine-tuning end to end: pretrain → finetune (assistant loss falls) → chat CLI."""

import json
import subprocess
import sys

import pytest

from gptjax.config import apply_overrides, load_experiment
from gptjax.finetune import finetune
from gptjax.generate import load
from gptjax.loop import pretrain
from gptjax.metrics import read_metrics
from gptjax.session import ChatSession

QUICK = ["--eval.sample_tokens=0", "--train.log_every_steps=5"]


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
def pretrained(tmp_path_factory):
    w = tmp_path_factory.mktemp("pretrained")
    pretrain(apply_overrides(load_experiment("tiny"), ["--train.steps=30", *QUICK]), w)
    return w


@pytest.fixture(scope="module")
def chat_workdir(tmp_path_factory, pretrained):
    root = tmp_path_factory.mktemp("chat")
    (root / "data").mkdir()
    for name, rows in (("train", _conversations(200)), ("val", _conversations(240)[200:])):
        (root / "data" / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8"
        )
    config = apply_overrides(
        load_experiment("chat_english"),
        [
            f"--data.source=jsonl:{root / 'data'}",
            "--train.steps=60",
            "--train.batch_size=8",
            "--train.learning_rate=3e-3",
            "--eval.every_steps=30",
            "--eval.num_batches=2",
            *QUICK,
        ],
    )
    final = finetune(config, root / "run", pretrained)
    return root / "run", final


def test_assistant_loss_falls_from_step_zero(chat_workdir):
    workdir, final = chat_workdir
    val = [r for r in read_metrics(workdir) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    assert final["val_loss"] == pytest.approx(val[-1]["val_loss"])
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["num_layers"] == 2  # the pretrained shape, not the chat config's


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
    assert val[-1] < val[0]
    assert final["train_loss"] < 10


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


def test_chat_once_answers(chat_workdir):
    result = _chat_cli(chat_workdir[0], "--once", "What is 5 squared?", "--temperature", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.split("assistant> ", 1)[1]
    assert answer.strip(), result.stdout


def test_piped_lines_hold_a_conversation(chat_workdir):
    lines = "What is 2 squared?\n你好，最近如何?\n/reset\nWhat is 7 squared?\n/exit\nignored\n"
    result = _chat_cli(chat_workdir[0], "--temperature", "0", "--max-new-tokens", "12", stdin=lines)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 3
    assert "(conversation reset)" in result.stdout
