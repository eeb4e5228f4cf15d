"""Metrics and log lines: one JSON object per event in ``WORKDIR/metrics.jsonl``, TensorBoard
events under ``WORKDIR/tb/``, the FLOP count behind model-FLOPs utilisation, and the ``Log``
callable that every long-running function takes for its one-line progress messages.

``metrics.jsonl`` is a true history: a run resumed from the checkpoint of step s first drops the
records after s that the interrupted run wrote (``MetricsWriter(resume_step=s)``), so every step
appears once; TensorBoard is told the same with a purge event.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from gptjax import storage
from gptjax.config import ModelConfig

METRICS_FILE = "metrics.jsonl"

Log = Callable[[str], None]  # receives one human-readable line


def lead_only(log: Log) -> Log:
    """``log`` on process 0, a no-op on the others: one copy of every line in a multi-host run."""
    return log if jax.process_index() == 0 else (lambda _: None)


# What tensorboardX imports at start-up only for what gptjax never uses: torch (to take torch
# tensors; 2-3 s), boto3 and google-cloud-storage (its own s3:// and gs:// event writers; ~0.5 s).
# gptjax writes events to a local folder and uploads them itself (gptjax.storage).
_UNUSED_BY_TENSORBOARDX = ("torch", "boto3", "google.cloud.storage")


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter`` (event files without TensorFlow), imported without the
    modules in ``_UNUSED_BY_TENSORBOARDX``: ``sys.modules[name] = None`` makes tensorboardX's
    guarded ``import`` of each fail as if it were not installed, for that one import; a module
    already imported is left alone, and every entry is removed right after."""
    blocked = [name for name in _UNUSED_BY_TENSORBOARDX if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        for name in blocked:
            del sys.modules[name]
    return SummaryWriter


class MetricsWriter:
    """Appends ``{"step": s, key: value, ...}`` lines and mirrors scalars to TensorBoard.

    Only the process that should write (process 0) passes ``enabled=True``; the others get a
    writer that does nothing, so call sites need no ``if process_index == 0``.

    ``resume_step``: the step the run continues from. Records of later steps (written by a run
    that was killed after its last checkpoint) are dropped first, and TensorBoard purges them
    too; at step 0 nothing is kept (everything is done again).

    A ``gs://`` workdir cannot be appended to: both files are written to a local mirror and
    uploaded whole by ``sync`` — every ``sync_every_s`` seconds, after every checkpoint (the
    training loop calls it) and at ``close``. A run killed between two syncs loses only records
    after its last checkpoint, which its resumed run writes again anyway. The mirror's folder
    (``mirror_folder``) is the same for every run of one workdir, so the copy a killed run leaves
    behind is replaced by the resumed run's and removed at its ``close``.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        sync_every_s: float = 30.0,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._remote = None
        self._mirror = None
        self.sync_every_s = sync_every_s
        if enabled:
            SummaryWriter = _summary_writer_class()
            local = workdir
            if storage.is_remote(workdir):
                self._remote = storage.path(workdir)
                self._mirror = local = mirror_folder(str(workdir))
                shutil.rmtree(local, ignore_errors=True)  # a killed run's: the bucket's is newer
                local.mkdir(parents=True)
                remote_jsonl = self._remote / METRICS_FILE
                if remote_jsonl.is_file():
                    (local / METRICS_FILE).write_bytes(remote_jsonl.read_bytes())
            workdir = Path(local)
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / METRICS_FILE
            # purge_step: TensorBoard hides the earlier run's events at or after that step.
            purge = (resume_step + 1 if resume_step else 0) if path.is_file() else None
            truncate_after(path, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=purge)
            self._synced = time.monotonic()

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
        if self._remote is not None and time.monotonic() - self._synced >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Uploads the local mirror of a ``gs://`` workdir's metrics and events (a no-op for a
        local workdir, whose files are written in place)."""
        if not self.enabled or self._remote is None or self._jsonl.closed:
            return
        self._jsonl.flush()
        self._tb.flush()
        storage.upload_tree(self._mirror, self._remote)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self.sync()  # the last records, for a gs:// workdir
            self._jsonl.close()
            self._tb.close()
            if self._mirror is not None:
                shutil.rmtree(self._mirror, ignore_errors=True)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mirror_folder(workdir: str) -> Path:
    """The local folder that holds a ``gs://`` workdir's metrics and events while a run writes
    them: one per user and workdir, in the temp folder (``$TMPDIR``)."""
    digest = hashlib.sha1(workdir.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gptjax-metrics-{os.getuid()}-{digest}"


def _plain(v: Any) -> Any:
    """Device scalars and numpy numbers → Python numbers, so json can write them."""
    if hasattr(v, "item"):
        return v.item()
    return v


def truncate_after(path: Path, step: int) -> None:
    """Keeps the records of steps ``<= step`` of a metrics file (none for step 0), atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and step > 0 and json.loads(ln)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` in order."""
    text = (storage.path(workdir) / METRICS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Peak dense bfloat16 FLOP/s of one device (one chip; one GPU), the denominator of model FLOPs
# utilisation. Sources: Google Cloud TPU system-architecture pages (v4: 275 TFLOP/s; v5e: 197;
# v5p: 459; Trillium v6e: 918); NVIDIA data sheets, dense (no sparsity): A100 312, H100 SXM
# 989 (H100 PCIe 756), H200 989, L4 121; T4 has no bfloat16 tensor cores: its FP16 peak, 65.
# Matched against jax's ``device_kind`` in order, first substring wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("A100", 312e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("L4", 121e12),
    ("T4", 65e12),
)


def peak_flops(device_kind: str) -> float:
    """Peak dense FLOP/s of a device kind from ``PEAK_FLOPS``; 0.0 when unknown (CPUs)."""
    return next((peak for name, peak in PEAK_FLOPS if name in device_kind), 0.0)


def flops_per_token(model: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token of rows of ``seq_len`` tokens: 6N for the matmuls plus 12·L·T·D
    for attention scores (PaLM appendix B; nanoGPT's ``estimate_mfu``)."""
    return 6 * num_params + 12 * model.num_layers * seq_len * model.embed_dim
