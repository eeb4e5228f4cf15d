"""The gptjax command line end to end: pretrain → generate, and every user error as one line."""

import shutil
import subprocess
import sys

import pytest

from gptjax.__main__ import main
from gptjax.metrics import read_metrics


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptjax", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model trained for 60 steps through the CLI, as the README's smoke run."""
    w = tmp_path_factory.mktemp("run")
    result = _cli(
        "pretrain",
        "--config",
        "experiments/tiny.py",
        "--workdir",
        str(w),
        "--train.steps=60",
        "--eval.every_steps=30",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return w


def test_pretrain_writes_falling_loss_and_val_loss(workdir):
    records = read_metrics(workdir)
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(train) == 12 and train[-1] < train[0] - 0.5, train
    assert any("val_loss" in r for r in records)
    assert all(r["tokens_per_sec"] > 0 for r in records[1:] if "tokens_per_sec" in r)


def test_generate_starts_with_prompt(workdir):
    result = _cli(
        "generate",
        "--workdir",
        str(workdir),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "30",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:\n")


def test_console_script_is_the_same_cli():
    exe = shutil.which("gptjax")
    assert exe, "the gptjax console script is not installed (pip install -e .)"
    result = subprocess.run(
        [exe, "pretrain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--workdir" in result.stdout


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--train.step=5"], "did you mean 'train.steps'"),
        (["--train.steps=many"], "train.steps='many' has type str, expected int"),
        (["--model.num_heads=3"], "model.num_heads=3 must divide model.embed_dim=64"),
        (["--data.source=text:does/not/exist.txt"], "does/not/exist.txt"),
        (["--data.source=ftp:corpus"], "data.source"),
    ],
)
def test_pretrain_config_errors(capsys, tmp_path, args, match):
    line = _error(capsys, "pretrain", "--config", "tiny", "--workdir", str(tmp_path), *args)
    assert match in line


def test_pretrain_bad_corpus_errors(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert (
        "empty"
        in _error(
            capsys,
            "pretrain",
            "--config",
            "tiny",
            "--workdir",
            str(tmp_path / "w"),
            f"--data.source=text:{empty}",
        ).lower()
    )
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02\xff" * 100)
    assert "blob.txt" in _error(
        capsys,
        "pretrain",
        "--config",
        "tiny",
        "--workdir",
        str(tmp_path / "w"),
        f"--data.source=text:{binary}",
    )


def test_generate_errors(capsys, tmp_path, workdir):
    assert "not a gptjax workdir" in _error(
        capsys, "generate", "--workdir", str(tmp_path), "--prompt", "hi"
    )
    long_prompt = "ROMEO: " * 400
    assert "model.max_len=64" in _error(
        capsys, "generate", "--workdir", str(workdir), "--prompt", long_prompt
    )


def test_error_has_no_traceback_in_a_real_process(tmp_path):
    result = _cli("pretrain", "--config", "tiny", "--workdir", str(tmp_path), "--model.num_heads=3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gptjax: error: model.num_heads=3")
