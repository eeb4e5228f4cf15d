"""The ``gptjax`` command line (also ``python -m gptjax``): parse, set up, call the library.

    gptjax quickstart [--workdir DIR]          pretrain → chat fine-tune → a few chat turns
    gptjax pretrain [--config FILE_OR_NAME] [--workdir DIR] [--dry-run] [--section.key=value]
    gptjax finetune --init-from DIR [--config FILE_OR_NAME] [--workdir DIR] [--section.key=value]
    gptjax generate --workdir DIR --prompt TEXT [sampling flags]
    gptjax chat --workdir DIR [--system TEXT] [--once MESSAGE] [sampling flags]
    gptjax export --workdir DIR --out DIR [--dtype float32|bfloat16] [--step N]

User errors (bad config, bad data, bad device layout) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "shakespeare"
DEFAULT_CHAT_EXPERIMENT = "chat_english"
QUICKSTART_QUESTIONS = ("Hello, how are you?", "What is your name?", "Tell me a joke.")
QUICKSTART_TEMPERATURE = 0.5  # a 2M-parameter model rambles at 0.8 and repeats itself at 0


def _sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)


def _sampling(args: argparse.Namespace) -> dict:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


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
    fin = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model on dialogues (assistant-only loss)",
        epilog="Any other --section.key=value overrides the config.",
    )
    fin.add_argument("--init-from", required=True, help="a pretraining workdir or export")
    fin.add_argument("--config", default=DEFAULT_CHAT_EXPERIMENT)
    fin.add_argument("--workdir", default=None, help="default: runs/CONFIG")
    gen = sub.add_parser("generate", help="sample a continuation of a prompt")
    gen.add_argument("--workdir", required=True)
    gen.add_argument("--prompt", required=True)
    _sampling_flags(gen, 200)
    chat = sub.add_parser("chat", help="talk to a fine-tuned model (/reset, /exit)")
    chat.add_argument("--workdir", required=True)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--once", default=None, help="answer this one message and exit")
    _sampling_flags(chat, 128)
    exp = sub.add_parser("export", help="write a params-only checkpoint for generate/finetune")
    exp.add_argument("--workdir", required=True, help="a training workdir (or an export)")
    exp.add_argument("--out", required=True, help="a new directory")
    exp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    exp.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    quick = sub.add_parser("quickstart", help="pretrain on Shakespeare, fine-tune for chat, talk")
    quick.add_argument("--workdir", default="runs/quickstart")
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
    _summary(final, workdir)


def _summary(final: dict, workdir: str) -> None:
    import jax

    if jax.process_index() == 0 and "stopped_at_step" not in final:
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


def _finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    from gptjax.config import apply_overrides, load_experiment, validate

    config = validate(apply_overrides(load_experiment(args.config), overrides))
    _init_distributed(config)
    from gptjax.finetune import finetune

    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    final = finetune(config, workdir, args.init_from)
    _summary(final, workdir)


def _generate(args: argparse.Namespace) -> None:
    from gptjax.generate import load

    sampling = _sampling(args)
    generator = load(args.workdir)
    print(generator(args.prompt, max_new_tokens=args.max_new_tokens, **sampling))


def _chat(args: argparse.Namespace) -> None:
    from gptjax.generate import load
    from gptjax.session import ChatSession

    sampling = _sampling(args)
    for stream in (sys.stdin, sys.stdout):  # UTF-8 both ways, whatever the locale says
        stream.reconfigure(encoding="utf-8", errors="replace")
    session = ChatSession(
        load(args.workdir), system=args.system, max_new_tokens=args.max_new_tokens, **sampling
    )
    if args.once is not None:
        _answer(session, args.once)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset forgets the conversation, /exit quits")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)")
        elif text:
            _answer(session, text)


def _answer(session, text: str) -> None:
    print("assistant> ", end="", flush=True)
    session.send(text, stream=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
    if session.dropped:
        print(f"(dropped the {session.dropped} oldest messages to fit the context window)")


def _export(args: argparse.Namespace) -> None:
    from gptjax.checkpoint import export

    written = export(args.workdir, args.out, dtype=args.dtype, step=args.step)
    print(
        f"exported {written} ({args.dtype}, no optimizer state); use it with "
        f"`gptjax generate --workdir {args.out}` or `gptjax finetune --init-from {args.out}`"
    )


def _quickstart(args: argparse.Namespace) -> None:
    """The main job: pretrain on the embedded plays, fine-tune on chatterbot english, talk."""
    from gptjax.config import load_experiment
    from gptjax.finetune import finetune
    from gptjax.generate import load
    from gptjax.loop import pretrain
    from gptjax.metrics import read_metrics

    root = Path(args.workdir)
    pretrain(load_experiment(DEFAULT_EXPERIMENT), root / "pretrain")
    final = finetune(load_experiment(DEFAULT_CHAT_EXPERIMENT), root / "chat", root / "pretrain")

    val = [r["val_loss"] for r in read_metrics(root / "chat") if "val_loss" in r]
    print(
        f"assistant-token validation loss: {val[0]:.3f} before fine-tuning → "
        f"{final['val_loss']:.3f} after"
    )
    generator = load(root / "chat")
    for question in QUICKSTART_QUESTIONS:
        reply = generator.chat(
            [{"role": "user", "content": question}],
            max_new_tokens=48,
            temperature=QUICKSTART_TEMPERATURE,
            seed=0,
        )
        print(f"you> {question}\nassistant> {reply}")
    print(f"talk to it: gptjax chat --workdir {root / 'chat'}")


def _init_distributed(config) -> None:
    """Joins the other processes before jax touches a device (multi-host runs only)."""
    from gptjax import distributed

    distributed.initialize(config.dist)


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command in ("pretrain", "finetune"):
            (_pretrain if args.command == "pretrain" else _finetune)(args, extra)
        else:
            if extra:
                raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
            commands = {
                "generate": _generate,
                "chat": _chat,
                "export": _export,
                "quickstart": _quickstart,
            }
            commands[args.command](args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
