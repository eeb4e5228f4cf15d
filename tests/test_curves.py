"""Tests for gptjax/curves.py: the plotted series are metrics.jsonl's, each step once; the PNG is
written for one run or several; `gptjax plot` and the end of a run write it; the TensorBoard
events hold the scalars."""

import json
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

import gptjax
from gptjax.__main__ import main
from gptjax.curves import read_curves
from gptjax.metrics import MetricsWriter, read_metrics


def _run(workdir, losses: dict[int, float], *, val: dict[int, float], batch=8, seq=16) -> None:
    workdir.mkdir(parents=True)
    config = {"train": {"batch_size": batch}, "model": {"max_len": seq}, "data": {"seq_len": 0}}
    (workdir / "config.json").write_text(json.dumps(config))
    with MetricsWriter(workdir) as writer:
        for step, loss in losses.items():
            writer.write(step, train_loss=loss, lr=1e-3 * step, tokens_per_sec=100.0 + step)
        for step, loss in val.items():
            writer.write(step, val_loss=loss)


def test_series_equal_the_metrics_and_each_step_appears_once(tmp_path):
    run = tmp_path / "run"
    _run(run, {1: 5.0, 2: 4.0, 3: 3.5}, val={0: 6.0, 3: 3.9})
    # what a resume before gptjax dropped lost steps left behind: steps 2-3 again, later
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 2, "train_loss": 4.5}) + "\n")
        f.write(json.dumps({"step": 3, "train_loss": 3.25}) + "\n")
    series = read_curves(run)
    assert series["train_loss"] == [(1, 5.0), (2, 4.5), (3, 3.25)]  # the later record wins
    assert series["val_loss"] == [(0, 6.0), (3, 3.9)]  # a fine-tuning run's step 0 included
    assert series["lr"] == [(s, 1e-3 * s) for s in (1, 2, 3)]
    assert [s for s, _ in series["tokens_per_sec"]] == [1, 2, 3]
    records = [r for r in read_metrics(run) if "train_loss" in r]
    assert len(records) == 5 and len(series["train_loss"]) == 3


def test_plot_writes_a_png_for_one_run_and_for_several(tmp_path):
    for name, scale in (("a", 1.0), ("b", 0.8)):
        losses = {s: scale * 6 / s for s in range(1, 41)}
        _run(tmp_path / name, losses, val={10 * k: scale * 6 / (10 * k) for k in range(1, 5)})
    one = gptjax.plot([tmp_path / "a"], tmp_path / "one.png")
    both = gptjax.plot([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
    for png in (one, both):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    assert main(["plot", "--workdir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "curves.png").is_file()
    with pytest.raises(ValueError, match="has no metrics.jsonl"):
        gptjax.plot([tmp_path / "nothing"], tmp_path / "x.png")


def test_metrics_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX's writer module imports torch where it is installed (2-3 s at the start of
    every run) only to accept torch tensors, and boto3 and google-cloud-storage (~0.5 s) for
    its own s3:// and gs:// writers; the writer gptjax uses must not pay for them, they still
    import afterwards, and its TensorBoard events still hold every scalar."""
    pytest.importorskip("torch", reason="the test extra installs torch; this checks it is unused")
    code = (
        "import importlib, importlib.util, sys; from gptjax.metrics import MetricsWriter\n"
        f"with MetricsWriter({str(tmp_path)!r}) as w:\n"
        "    w.write(1, train_loss=2.5); w.write(2, train_loss=2.25, lr=0.5)\n"
        "names = ('torch', 'boto3', 'google.cloud.storage')\n"
        "print([name in sys.modules for name in names])\n"
        "for name in names:  # none left blocked: each still imports, where installed\n"
        "    if importlib.util.find_spec(name):\n"
        "        importlib.import_module(name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[False, False, False]"
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = []
    data = events.read_bytes()
    while data:  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12 : 12 + length])
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        data = data[12 + length + 4 :]
    assert scalars == [(1, "train_loss", 2.5), (2, "train_loss", 2.25), (2, "lr", 0.5)]
