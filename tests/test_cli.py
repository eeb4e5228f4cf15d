"""The gptjax command line end to end: pretrain → generate, every user error as one line, an
internal error with its traceback, and the README's commands and layout table kept true."""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax.__main__ import REPORT, _parser, main
from gptjax.config import Config, parse_override, replace
from gptjax.inference.generator import load
from gptjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptjax", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
    """The suite's tiny model (tests/conftest.py): 60 steps through the CLI, as the README's
    smoke run."""
    return tiny_workdir


def test_pretrain_writes_falling_loss_and_val_loss(workdir):
    records = read_metrics(workdir)
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(train) == 12 and train[-1] < train[0] - 0.5, train
    assert any("val_loss" in r for r in records)
    assert all(r["tokens_per_sec"] > 0 for r in records[1:] if "tokens_per_sec" in r)


def test_generate_prints_what_the_python_api_samples(workdir):
    """The CLI's text is the model's: the Python API with the same seed and sampling settings
    gives exactly it, and another seed gives another text."""
    args = ["--max-new-tokens", "30", "--temperature", "0.8", "--top-k", "50"]
    result = _cli("generate", "--workdir", str(workdir), "--prompt", "ROMEO:", *args, "--seed", "1")
    assert result.returncode == 0, result.stderr
    gen = load(workdir)
    sampling = dict(max_new_tokens=30, temperature=0.8, top_k=50)
    assert result.stdout == gen("ROMEO:", seed=1, **sampling) + "\n"
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:\n")
    assert gen("ROMEO:", seed=2, **sampling) != gen("ROMEO:", seed=1, **sampling)
    ids = gen.tokenizer.encode(result.stdout[len("ROMEO:") : -1])
    assert ids and max(ids) < gen.config.model.vocab_size  # text of the model's own vocabulary


def test_load_runs_cpu_calls_inline_and_caches_compiles_in_a_fresh_process(workdir, tmp_path):
    """``gptjax.load`` as a program's first jax call turns asynchronous CPU dispatch off
    (``host_memory.run_calls_inline``; the CLI above decodes that way, this process, whose
    backend was up before, asynchronously, and both gave the same text) and keeps compiled
    programs in ``$GPTJAX_CACHE/xla`` (``compile_cache``)."""
    script = "import gptjax, jax, sys; gptjax.load(sys.argv[1]); "
    script += "print(jax.config.read('jax_cpu_enable_async_dispatch'), "
    script += "jax.config.jax_compilation_cache_dir)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "GPTJAX_CACHE": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["False", str(tmp_path / "xla")]


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


def test_internal_error_keeps_its_traceback(capsys, tmp_path, monkeypatch):
    """A bug (here: an evaluation that divides by zero) is not dressed up as a user error."""
    from gptjax.training import loop

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(loop, "evaluate", broken)
    code = main(["pretrain", "--config", "tiny", "--workdir", str(tmp_path), "--train.steps=2"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1] == REPORT
    assert "gptjax: error:" not in err


def test_help_speaks_to_users():
    result = _cli("--help")
    assert result.returncode == 0
    first = result.stdout.split("\n\n")[1]  # after the usage line
    assert first.startswith("gptjax: pretrain GPT-style language models"), result.stdout
    assert "gptjax quickstart" in result.stdout and "gptjax chat --workdir" in result.stdout
    assert "``" not in result.stdout and "call the library" not in result.stdout


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_path_in_the_readme_layout_table_exists():
    table = _readme().split("## Layout", 1)[1].split("```")[1]
    paths = [ln.split()[0] for ln in table.splitlines() if ln.strip() and not ln[0].isspace()]
    assert len(paths) > 20, paths
    for path in paths:
        matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
        assert matches and all(m.exists() for m in matches), f"README layout lists {path}"
    listed = {p for p in paths if p.endswith(".py")}
    for module in (ROOT / "gptjax").rglob("*.py"):  # and every module is listed
        rel = str(module.relative_to(ROOT))
        assert rel in listed or module.name == "__init__.py", f"{rel} missing from README layout"


def test_modules_import_only_the_layers_above_them_in_the_readme_table():
    table = _readme().split("## Layout", 1)[1].split("```")[1]
    order = [ln.split()[0] for ln in table.splitlines() if ln.startswith("gptjax/")]
    modules = [p.removesuffix(".py").replace("/", ".") for p in order]
    for i, module in enumerate(modules[2:], start=2):  # after __init__ and __main__
        tree = ast.parse((ROOT / order[i]).read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {
            f"{n.module}.{a.name}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module in ("gptjax", "gptjax.data")
            for a in n.names
        }
        for name in sorted(m for m in imported if m and m in modules):
            assert modules.index(name) < i, f"{module} imports {name}, listed below it"


def _readme_commands() -> list[list[str]]:
    """Every `gptjax ...` command line of the README's shell blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", _readme(), flags=re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    commands = []
    for line in lines:
        line = line.split(" #")[0].replace("$i", "0")  # the multi-process loop's variable
        for part in re.split(r"&&|&|;|\|", line):
            words = shlex.split(part.strip())
            if "gptjax" in words and words.index("gptjax") + 1 < len(words):
                commands.append(words[words.index("gptjax") + 1 :])
    return commands


def test_every_gptjax_command_in_the_readme_parses():
    commands = _readme_commands()
    assert len(commands) >= 15, commands
    for argv in commands:
        args, extra = _parser().parse_known_args(argv)
        if args.command in ("pretrain", "finetune"):
            replace(Config(), dict(parse_override(a) for a in extra))  # known keys, right types
        else:
            assert not extra, argv
