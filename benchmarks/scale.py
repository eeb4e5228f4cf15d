"""Compile time and per-device memory of the GPT-2 presets: scan over layers and remat.

    python benchmarks/scale.py [--devices 8] [--batch 8] [--out FILE.json]

``gptjax pretrain --dry-run`` compiles the sharded train step from abstract shapes (nothing is
allocated) and reads per-device bytes from the compiled executable. This script does that on
``--devices`` simulated CPU devices (an fsdp mesh over all of them, sequence 1024, float32) for

* ``gpt2-xl`` (48 layers) with ``model.scan_layers`` off and on: compile time (``dry_run``'s
  wall time: abstract init, lowering, XLA compilation) and temporaries;
* ``gpt2`` (12 layers, scanned) with each ``model.remat`` setting: temporaries per device
  (activations and gradients) — what rematerialisation trades for recomputation — and once
  with ``remat=full`` unscanned.

XLA:CPU's memory plan is not a GPU's or a TPU's (other fusion and scheduling), so the absolute
bytes are indicative; the ratios between settings are the point. Rows go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--scan-preset", default="gpt2-xl")
    parser.add_argument("--remat-preset", default="gpt2")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import gptjax
    from gptjax.config import REMAT_POLICIES
    from gptjax.training.pretrain import dry_run

    def plan(preset: str, *overrides: str) -> dict:
        config = gptjax.apply_overrides(
            gptjax.load_experiment("tiny"),
            [
                f"--model.preset={preset}",
                f"--model.max_len={args.seq}",
                "--mesh.data=1",
                f"--mesh.fsdp={jax.device_count()}",
                f"--train.batch_size={args.batch}",
                *overrides,
            ],
        )
        start = time.perf_counter()
        result = dry_run(config, log=lambda _: None)
        seconds = time.perf_counter() - start
        return {
            "preset": preset,
            "settings": " ".join(overrides),
            "compile_s": round(seconds, 2),
            "temp_mib": round(result["temp_bytes"] / 2**20, 1),
            "argument_mib": round(result["argument_bytes"] / 2**20, 1),
        }

    rows = [
        plan(args.scan_preset, "--model.scan_layers=false"),
        plan(args.scan_preset, "--model.scan_layers=true"),
    ]
    rows += [
        plan(args.remat_preset, "--model.scan_layers=true", f"--model.remat={policy}")
        for policy in REMAT_POLICIES
    ]
    rows.append(plan(args.remat_preset, "--model.scan_layers=false", "--model.remat=full"))
    print(f"{'preset':10s} {'settings':62s} {'compile s':>9s} {'temps MiB':>10s} {'args MiB':>9s}")
    for r in rows:
        print(
            f"{r['preset']:10s} {r['settings']:62s} {r['compile_s']:9.1f} "
            f"{r['temp_mib']:10.1f} {r['argument_mib']:9.1f}"
        )
    scan_off, scan_on = rows[0], rows[1]
    print(f"scan_layers: compile {scan_off['compile_s'] / scan_on['compile_s']:.1f}x faster")
    remat = {r["settings"]: r["temp_mib"] for r in rows[2:]}
    none = remat["--model.scan_layers=true --model.remat=none"]
    full = remat["--model.scan_layers=true --model.remat=full"]
    print(f"remat=full (scanned): temporaries {none / full:.1f}x smaller")
    info = {
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "batch": args.batch,
        "seq": args.seq,
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
