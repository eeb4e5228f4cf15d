"""Metrics: one JSON object per event in ``WORKDIR/metrics.jsonl``, TensorBoard events under
``WORKDIR/tb/``, and the FLOP count behind model-FLOPs utilisation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gptjax.config import ModelConfig


class MetricsWriter:
    """Appends ``{"step": s, key: value, ...}`` lines and mirrors scalars to TensorBoard.

    Only the process that should write (process 0) passes ``enabled=True``; the others get a
    writer that does nothing, so call sites need no ``if process_index == 0``.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(v: Any) -> Any:
    """Device scalars and numpy numbers → Python numbers, so json can write them."""
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` in order."""
    path = Path(workdir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def flops_per_token(model: ModelConfig, num_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·T·D for attention scores
    (PaLM appendix B; nanoGPT's ``estimate_mfu``)."""
    return 6 * num_params + 12 * model.num_layers * model.max_len * model.embed_dim
