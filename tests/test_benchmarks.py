"""The training, decoding and import benchmarks at their smallest, so that the scripts cannot
rot: the table prints and the JSON has every row and field (speed itself is the scripts'
business)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_benchmark_measures_gptjax_and_the_pytorch_peer(tmp_path):
    out = tmp_path / "train.json"
    args = ["--shapes", "char", "--steps", "2", "--warmup", "1", "--steps-per-call", "1,2"]
    args += ["--matmul-precision", "float32,bfloat16"]
    result = _run("train.py", *args, "--profile", "--attention", "--out", str(out))
    assert "torch tok/s" in result.stdout and "where a char step goes" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    # The per-op profile: every part of the model shows up, forward and backward, and the
    # parts account for the step (two XLA threads may overlap, the profiler adds a little).
    profile = rows[0].pop("profile_ms")
    for part in ("attention core", "attention projections", "MLP", "norms"):
        assert profile[f"{part} (forward)"] > 0 and profile[f"{part} (backward)"] > 0, part
    parts = sum(ms for key, ms in profile.items() if key != "wall_ms")
    assert 0.8 * profile["wall_ms"] < parts < 2 * profile["wall_ms"], profile
    attention = rows[0].pop("attention_ms")
    assert set(attention) == {"xla", "einsum"}
    # times only: which is faster is the benchmark's finding, not something a test can assert
    assert all(t["forward_backward"] > 0 and t["forward"] > 0 for t in attention.values())
    assert [(r["shape"], r["matmul_precision"], r["steps_per_call"]) for r in rows] == [
        ("char", p, k) for p in ("float32", "bfloat16") for k in (1, 2)
    ]
    for row in rows:
        # a bfloat16 row: against PyTorch under bfloat16 autocast, and against float32 PyTorch
        assert ("speedup_vs_torch_float32" in row) == (row["matmul_precision"] == "bfloat16")
        for key in ("gptjax_step_ms", "gptjax_tokens_per_sec", "hf_step_ms", "hf_tokens_per_sec"):
            assert row[key] > 0, key
        # calls taken in turns: the median of the per-round ratios, round by round
        mine, theirs = row.pop("gptjax_times_ms"), row.pop("hf_times_ms")
        assert len(mine) == len(theirs) == 2
        assert row["gptjax_step_ms"] == pytest.approx(statistics.median(mine), rel=1e-9)
        assert row["speedup"] == pytest.approx(
            statistics.median(h / m for h, m in zip(theirs, mine, strict=True)), rel=1e-9
        )
        assert row["gptjax_tokens_per_sec"] == pytest.approx(12 * 64 / row["gptjax_step_ms"] * 1e3)


def test_hf_import_benchmark_reports_peak_memory(tmp_path):
    out = tmp_path / "hf_import.json"
    result = _run(
        "hf_import.py", "--shape", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(out)
    )
    assert "peak" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["peak_rss"] > 0 and r["params"] > 0 for r in rows), rows


def test_generate_benchmark_measures_gptjax_and_hugging_face(tmp_path):
    out = tmp_path / "generate.json"
    args = ["--models", "char", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "2"]
    result = _run("generate.py", *args, "--baseline-tokens", "2", "--out", str(out))
    assert "HF tok/s" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("char", 1), ("char", 2)]
    for row in rows:
        for key in ("prefill_s", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
            assert row[key] > 0, key
        assert row["hf_tokens_per_s"] > 0
        assert row["speedup_vs_hf"] > 0  # a median of paired ratios, not of the two medians
    assert rows[0]["baseline_tokens_per_s"] > 0 and rows[0]["speedup_vs_baseline"] > 0
    # new tokens / (streamed call - prefill), each timed apart: with 4 tokens the difference is
    # within the timing noise, so only its presence is checked
    assert isinstance(rows[0]["stream_tokens_per_s"], float)


def test_generate_benchmark_without_hugging_face_says_so(tmp_path):
    """--no-hf (also the default without torch): no reference figure, and the JSON says the
    reference was not measured rather than carrying a number in its place."""
    out = tmp_path / "generate.json"
    args = ["--models", "char", "--batch-sizes", "1", "--new-tokens", "2", "--repeats", "1"]
    result = _run("generate.py", *args, "--baseline-tokens", "0", "--no-hf", "--out", str(out))
    assert "decode tok/s" in result.stdout and "not measured in this run" in result.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["hf"] == "not measured"
    (row,) = data["rows"]
    assert row["decode_tokens_per_s"] > 0 and row["end_to_end_tokens_per_s"] > 0, row
    assert "hf_tokens_per_s" not in row and "speedup_vs_hf" not in row
