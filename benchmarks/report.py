"""What the benchmark scripts share: CPU calls set up as gptjax runs them, and at the end the
table's rows and the run's facts as JSON."""

import argparse
import json
from pathlib import Path


def add_dispatch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--async-dispatch",
        action="store_true",
        help="CPU calls on XLA's executor threads (pretrain, finetune and gptjax.load run them "
        "inline)",
    )


def set_cpu_dispatch(args: argparse.Namespace) -> str:
    """As ``pretrain``, ``finetune`` and ``gptjax.load`` run: single-device calls on this
    thread (unless ``--async-dispatch``), freed buffers kept in the process (every peer in the
    process shares the latter). Call before anything touches a device; returns the JSON meta's
    ``cpu_dispatch``: ``inline`` or ``async``."""
    from gptjax import host_memory  # here: hf_import's children measure what they import

    inline = not args.async_dispatch and host_memory.run_calls_inline()
    host_memory.keep_freed_memory()
    return "inline" if inline else "async"


def write_json(out: str, meta: dict, rows: list[dict]) -> Path:
    """Writes ``{"meta": meta, "rows": rows}`` to ``out`` (creating its folder) and says so."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
