"""The ``gptjax`` command line (also ``python -m gptjax``): parse, set up, call the library.

    gptjax pretrain [--config FILE_OR_NAME] [--workdir DIR] [--section.key=value ...]
    gptjax generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                    [--top-k K] [--top-p P] [--seed S]

User errors (bad config, bad data, bad device layout) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "shakespeare"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="train a model on text",
        epilog="Any other --section.key=value overrides the config, "
        "e.g. --train.steps=200 --model.num_layers=2.",
    )
    pre.add_argument(
        "--config",
        default=DEFAULT_EXPERIMENT,
        help="a Python file with get_config(), or a name in experiments/ "
        f"(default: {DEFAULT_EXPERIMENT})",
    )
    pre.add_argument(
        "--workdir",
        default=None,
        help="where checkpoints, metrics and samples go (default: runs/CONFIG)",
    )
    pre.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the train step for the configured mesh and print per-device memory, "
        "without allocating or training",
    )
    gen = sub.add_parser("generate", help="sample a continuation of a prompt")
    gen.add_argument("--workdir", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    return parser


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    from gptjax.config import apply_overrides, load_experiment, validate

    config = validate(apply_overrides(load_experiment(args.config), overrides))
    _init_distributed(config)
    from gptjax.loop import pretrain

    if args.dry_run:
        _dry_run(config)
        return
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    final = pretrain(config, workdir)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float))
    print(f"done: {summary}; outputs in {workdir}")


def _dry_run(config) -> None:
    """Prints what one device will hold for this config and mesh; allocates nothing."""
    from gptjax import data
    from gptjax.loop import preflight, with_vocab
    from gptjax.metrics import flops_per_token
    from gptjax.model import GPT, count_params
    from gptjax.train import memory_plan

    if not config.model.vocab_size:  # the vocabulary comes from the data's tokenizer
        config = with_vocab(config, data.load_corpus(config.data).tokenizer)
    shape = preflight(config)
    plan = memory_plan(config, GPT(config.model))
    n = count_params(config.model)
    mib = {k: v / 2**20 for k, v in plan.items() if k.endswith("bytes")}
    print(
        f"model {config.model.preset}: {n:,} parameters, "
        f"{flops_per_token(config.model, n) / 1e9:.3f} GFLOPs per trained token"
    )
    print(f"mesh data,fsdp,tensor={shape} over {plan['devices']} devices; per device:")
    print(f"  parameters        {mib['param_bytes']:10.1f} MiB")
    print(f"  optimizer state   {mib['opt_state_bytes']:10.1f} MiB")
    print(f"  step arguments    {mib['argument_bytes']:10.1f} MiB (state + batch, compiled)")
    print(f"  temporaries       {mib['temp_bytes']:10.1f} MiB (activations, gradients)")
    peak = mib["argument_bytes"] + mib["output_bytes"] - mib["alias_bytes"] + mib["temp_bytes"]
    print(f"  peak estimate     {peak:10.1f} MiB")


def _generate(args: argparse.Namespace) -> None:
    from gptjax.generate import load

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    generator = load(args.workdir)
    print(
        generator(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    )


def _init_distributed(config) -> None:
    """Joins the other processes before jax touches a device (multi-host runs only)."""
    d = config.dist
    if d.num_processes <= 1 and not d.coordinator_address:
        return
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # XLA:CPU's cross-process collectives come from gloo; TPU/GPU bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address or None,
        num_processes=d.num_processes,
        process_id=d.process_id,
    )


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command == "pretrain":
            _pretrain(args, extra)
        else:
            if extra:
                raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
            _generate(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
