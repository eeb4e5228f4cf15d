"""Step time with and without a checkpoint save in flight (gptjax/checkpoint.py).

    python benchmarks/checkpoint.py [--out FILE.json] [--model wide] [--saves 3] [--steps 8]

A model whose train state takes over a second to write (``wide``: 8 layers x 1024, ~110M
parameters, ~1.3 GB of parameters and Adam moments in float32; ``gpt2`` also works) trains on
random tokens in one process. Measured in the same run, each step timed to completion:

* ``no save``: steps with nothing in flight — the baseline;
* ``async``: ``Checkpointer.save`` with ``checkpoint.async_save=true`` (the default) — how long
  the call blocks the loop (copying the arrays off the devices), how long until the checkpoint
  is on disk, and the time of the steps that run while it is written;
* ``sync``: ``async_save=false`` — the loop waits for the whole write.

"Lost per save" is the blocking time plus the extra time of the steps that overlapped the write,
i.e. what the save costs the run. On CPU the writer threads share the cores with the step, so
overlapped steps slow down; on TPU/GPU the step runs on the accelerator while the host writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from gptjax.checkpoint import Checkpointer
from gptjax.config import MODEL_PRESETS, CheckpointConfig, Config, MeshConfig, TrainConfig
from gptjax.model import GPT, count_params
from gptjax.tokenizer import Tokenizer
from gptjax.training.steps import compile_steps

MODELS = {
    "wide": dataclasses.replace(
        MODEL_PRESETS["small"],
        preset="wide",
        num_layers=8,
        num_heads=8,
        embed_dim=1024,
        vocab_size=8192,
        max_len=16,
    ),
    "gpt2": dataclasses.replace(MODEL_PRESETS["gpt2"], max_len=16),
}


def _config(model: str, batch_size: int) -> Config:
    return Config(
        model=MODELS[model],
        train=TrainConfig(steps=10_000, batch_size=batch_size, warmup_steps=10),
        mesh=MeshConfig(data=1),
    )


def _batch(config: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, t, v = config.train.batch_size, config.model.max_len, config.model.vocab_size
    tokens = rng.integers(0, v, (b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), "f4")}


class Trainer:
    """The state and a timed step; ``step()`` returns its wall time in seconds."""

    def __init__(self, config: Config):
        self.config = config
        self.steps = compile_steps(config, GPT(config.model), devices=jax.devices()[:1])
        self.state = self.steps.state
        self.rng = np.random.default_rng(0)

    def step(self) -> float:
        batch = self.steps.put_batch(_batch(self.config, self.rng))
        start = time.perf_counter()
        self.state, metrics = self.steps.train(self.state, batch)
        jax.block_until_ready(metrics["train_loss"])
        return time.perf_counter() - start


def measure_save(trainer: Trainer, workdir: Path, *, async_save: bool, saves: int) -> dict:
    """``saves`` checkpoints, each followed by training steps for as long as it is in flight."""
    policy = CheckpointConfig(max_to_keep=1, async_save=async_save)
    ckpt = Checkpointer(workdir, policy)
    tokenizer = Tokenizer.train(["to be or not to be"] * 20, model_type="char", progress=False)
    blocking, total, overlapped = [], [], []
    for _ in range(saves):
        trainer.step()  # a new step to save (uncounted)
        start = time.perf_counter()
        ckpt.save(trainer.state, data_state={}, config=trainer.config, tokenizer=tokenizer)
        blocking.append(time.perf_counter() - start)
        during = []
        while ckpt.manager.is_saving_in_progress():
            during.append(trainer.step())
        ckpt.wait()
        total.append(time.perf_counter() - start)
        overlapped.append(during)
    ckpt.close()
    return {"blocking_s": blocking, "total_s": total, "overlapped_steps_s": overlapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="wide")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="baseline steps")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument(
        "--dir", default="", help="where to write checkpoints (default: a temp dir)"
    )
    parser.add_argument("--out", default="checkpoint_benchmark.json")
    args = parser.parse_args()

    config = _config(args.model, args.batch_size)
    trainer = Trainer(config)
    for _ in range(3):  # compile and warm up
        trainer.step()
    baseline = [trainer.step() for _ in range(args.steps)]
    root = Path(args.dir or tempfile.mkdtemp(prefix="gptjax-ckpt-bench-"))
    results = {}
    try:
        for mode, async_save in (("async", True), ("sync", False)):
            results[mode] = measure_save(
                trainer, root / mode, async_save=async_save, saves=args.saves
            )
        nbytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(baseline)
    none = {"blocking_s": [0.0], "total_s": [0.0], "overlapped_steps_s": [baseline]}
    rows = [_row("no save", base, none)] + [_row(m, base, r) for m, r in results.items()]
    _print(args.model, count_params(config.model), nbytes, rows)
    report = {
        "model": args.model,
        "model_config": dataclasses.asdict(config.model),
        "batch_size": args.batch_size,
        "params": count_params(config.model),
        "state_bytes": nbytes,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "baseline_steps_s": baseline,
        "modes": results,
        "table": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _row(mode: str, base: float, r: dict) -> dict:
    steps = [s for during in r["overlapped_steps_s"] for s in during]
    lost = [
        b + sum(s - base for s in during)
        for b, during in zip(r["blocking_s"], r["overlapped_steps_s"], strict=True)
    ]
    return {
        "mode": mode,
        "save_blocks_s": statistics.median(r["blocking_s"]),
        "save_total_s": statistics.median(r["total_s"]),
        "steps_overlapped": 0 if mode == "no save" else len(steps) / len(r["overlapped_steps_s"]),
        "step_ms": 1000 * statistics.median(steps) if steps else float("nan"),
        "step_ms_without_save": 1000 * base,
        "lost_per_save_s": 0.0 if mode == "no save" else statistics.median(lost),
    }


def _print(model: str, params: int, nbytes: int, rows: list[dict]) -> None:
    print(f"model {model}: {params / 1e6:.0f}M parameters, train state {nbytes / 2**30:.2f} GiB")
    head = ("mode", "save blocks s", "on disk after s", "steps in flight", "step ms", "lost/save s")
    print(" | ".join(f"{h:>15}" for h in head))
    for r in rows:
        cells = (
            r["mode"],
            f"{r['save_blocks_s']:.2f}",
            f"{r['save_total_s']:.2f}",
            f"{r['steps_overlapped']:.1f}",
            f"{r['step_ms']:.0f}",
            f"{r['lost_per_save_s']:.2f}",
        )
        print(" | ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
