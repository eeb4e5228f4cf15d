"""Pictures of training: loss, learning rate and throughput of one or several runs.

``read_curves(workdir)`` reads ``metrics.jsonl`` into series ``{name: [(step, value), ...]}``, each
step once (the last record wins, so an old file with a resumed run's repeated steps still plots
each step once); ``plot(workdirs, out)`` draws them with matplotlib (headless: a ``Figure``, no
pyplot) and writes a PNG: train and validation loss against steps, with the tokens seen on a
second axis, the learning rate, and tokens/s. Several runs share the figure, one colour each, so
they compare at a glance. ``gptjax pretrain`` and ``gptjax finetune`` write
``WORKDIR/curves.png`` when they finish; ``gptjax plot --workdir W [--workdir W2 ...]`` draws
any runs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from gptjax import storage
from gptjax.errors import GptjaxError
from gptjax.metrics import METRICS_FILE, read_metrics
from gptjax.workdir import CONFIG_FILE

SERIES = ("train_loss", "val_loss", "lr", "tokens_per_sec")
CURVES_FILE = "curves.png"


def read_curves(workdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{series: [(step, value), ...]}`` sorted by step, one value per step (the last)."""
    path = storage.path(workdir) / METRICS_FILE
    if not path.is_file():
        raise GptjaxError(f"{workdir} has no {METRICS_FILE}: train there first (gptjax pretrain)")
    by_step: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    for record in read_metrics(workdir):
        for name in SERIES:
            if name in record:
                by_step[name][record["step"]] = record[name]
    return {name: sorted(values.items()) for name, values in by_step.items()}


def tokens_per_step(workdir: str | Path) -> int:
    """Training tokens per optimizer step of the run in ``workdir`` (0 if unknown)."""
    path = storage.path(workdir) / CONFIG_FILE
    if not path.is_file():
        return 0
    config = json.loads(path.read_text(encoding="utf-8"))
    seq = config.get("data", {}).get("seq_len") or config["model"]["max_len"]
    return int(config["train"]["batch_size"]) * int(seq)


def plot(workdirs: Sequence[str | Path], out: str | Path) -> Path:
    """Draws the runs in ``workdirs`` into the PNG ``out``; returns its path."""
    if not workdirs:
        raise GptjaxError("no --workdir given: name at least one run to plot")
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplot_mosaic([["loss", "loss"], ["lr", "speed"]])
    loss, lr, speed = axes["loss"], axes["lr"], axes["speed"]
    colors = [f"C{i % 10}" for i in range(len(workdirs))]
    for workdir, color in zip(workdirs, colors, strict=True):
        series, name = read_curves(workdir), storage.path(workdir).name
        _line(loss, series["train_loss"], color, f"{name} train")
        _line(loss, series["val_loss"], color, f"{name} validation", dashed=True)
        _line(lr, series["lr"], color, name)
        _line(speed, series["tokens_per_sec"], color, name)
    per_step = tokens_per_step(workdirs[0])
    if per_step and len({tokens_per_step(w) for w in workdirs}) == 1:
        tokens = loss.secondary_xaxis(
            "top", functions=(lambda s: s * per_step, lambda t: t / per_step)
        )
        tokens.set_xlabel("tokens")
    loss.set(xlabel="step", ylabel="loss (nats per token)", title="loss")
    lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    speed.set(xlabel="step", ylabel="tokens / s", title="throughput")
    for ax in (loss, lr, speed):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    out = storage.path(out)
    storage.write_atomic(out, png.getvalue())
    return out


def _line(ax, points: list[tuple[int, float]], color: str, label: str, dashed=False) -> None:
    if not points:
        return
    steps, values = zip(*points, strict=True)
    style = dict(linestyle="--", marker="o", markersize=3) if dashed else dict(linewidth=1.2)
    ax.plot(steps, values, color=color, label=label, **style)
