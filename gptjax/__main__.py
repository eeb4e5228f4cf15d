"""The ``gptjax`` command line (also ``python -m gptjax``).

It only parses arguments, joins the other processes of a multi-host run and calls the library
(``gptjax.pretrain``, ``gptjax.finetune``, ``gptjax.load``, ...), which does everything else.
A ``GptjaxError`` (a user error) becomes one line on stderr and exit code 2; Ctrl-C exit code
130; any other exception is a bug and keeps its traceback, with a request to report it.
The library is imported inside each command, so that ``gptjax --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from gptjax import storage
from gptjax.errors import GptjaxError

DEFAULT_EXPERIMENT = "shakespeare"
DEFAULT_CHAT_EXPERIMENT = "chat_english"
QUICKSTART_QUESTIONS = ("Hello, how are you?", "What is your name?", "Tell me a joke.")
QUICKSTART_TEMPERATURE = 0.5  # a 2M-parameter model rambles at 0.8 and repeats itself at 0
DESCRIPTION = (
    "gptjax: pretrain GPT-style language models on text, fine-tune them for chat, sample from "
    "them and talk to them (JAX/Flax; one CPU to a TPU pod, same code)."
)
EXAMPLES = """examples:
  gptjax quickstart                        pretrain on Shakespeare, fine-tune for chat, talk
  gptjax pretrain --config tiny --workdir runs/tiny --train.steps=200
  gptjax generate --workdir runs/tiny --prompt "ROMEO:"
  gptjax finetune --init-from runs/tiny --workdir runs/chat
  gptjax chat --workdir runs/chat
  gptjax import hf:HuggingFaceTB/SmolLM2-135M-Instruct --out runs/smollm2

`gptjax COMMAND --help` lists a command's options; any --section.key=value sets a config field."""
REPORT = "gptjax: internal error (a bug, not your input): please report it with the traceback above"


def _sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)


def _sampling(args: argparse.Namespace) -> dict:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise GptjaxError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    if args.max_new_tokens < 1:
        raise GptjaxError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptjax",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    fin.add_argument(
        "--init-from",
        required=True,
        help="a pretraining workdir, an export, a Hugging Face model directory or hf:REPO_ID",
    )
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
    exp = sub.add_parser(
        "export", help="write the model alone: a gptjax export, or Hugging Face format"
    )
    exp.add_argument("--workdir", required=True, help="a training workdir (or an export)")
    exp.add_argument("--out", required=True, help="a new directory")
    exp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    exp.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    exp.add_argument(
        "--format",
        choices=("gptjax", "hf"),
        default="gptjax",
        help="hf: config.json + safetensors + tokenizer files for transformers",
    )
    exp.add_argument(
        "--max-shard-size", type=float, default=5.0, help="GB per safetensors file (hf)"
    )
    plot = sub.add_parser("plot", help="draw the loss, learning rate and speed of runs (PNG)")
    plot.add_argument("--workdir", action="append", required=True, help="repeat to compare")
    plot.add_argument("--out", default=None, help="default: WORKDIR/curves.png for one run")
    imp = sub.add_parser("import", help="import a Hugging Face model (GPT-2, LLaMA, Qwen2)")
    imp.add_argument("src", help="a Hugging Face model directory, or hf:REPO_ID[@REVISION]")
    imp.add_argument("--out", required=True, help="a new directory (a gptjax export)")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    quick = sub.add_parser("quickstart", help="pretrain on Shakespeare, fine-tune for chat, talk")
    quick.add_argument("--workdir", default="runs/quickstart")
    return parser


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    """``pretrain`` and ``finetune``: the experiment with the overrides, then the library."""
    from gptjax.config import apply_overrides, load_experiment, validate

    config = apply_overrides(load_experiment(args.config), overrides)
    config = validate(config, fine_tune=args.command == "finetune")
    _init_distributed(config)
    if getattr(args, "dry_run", False):
        from gptjax.training.pretrain import dry_run

        dry_run(config)
        return
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    if args.command == "pretrain":
        from gptjax.training.pretrain import pretrain

        final = pretrain(config, workdir)
    else:
        from gptjax.training.finetune import finetune

        final = finetune(config, workdir, args.init_from)
    import jax

    if jax.process_index() == 0 and "stopped_at_step" not in final:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float))
        print(f"done: {summary}; outputs in {workdir}")


def _generate(args: argparse.Namespace) -> None:
    from gptjax.inference.generator import load

    sampling = _sampling(args)
    generator = load(args.workdir)
    print(generator(args.prompt, max_new_tokens=args.max_new_tokens, **sampling))


def _chat(args: argparse.Namespace) -> None:
    from gptjax.inference.generator import load
    from gptjax.inference.session import ChatSession

    sampling = _sampling(args)
    for stream in (sys.stdin, sys.stdout):  # UTF-8 both ways, whatever the locale says
        if hasattr(stream, "reconfigure"):  # not on a replaced stream (a notebook, a test)
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
            try:
                _answer(session, text)
            except GptjaxError as e:  # a message too long for the window: say so, go on
                print(f"(not sent: {e})", flush=True)


def _answer(session, text: str) -> None:
    """Sends ``text`` and streams the reply; raises before printing anything if it cannot."""
    started = False

    def show(piece: str) -> None:
        nonlocal started
        if not started:
            print("assistant> ", end="", flush=True)
            started = True
        print(piece, end="", flush=True)

    reply = session.send(text, stream=show)
    if not started:
        print(f"assistant> {reply}", end="")
    print(flush=True)
    if session.dropped:
        print(f"(dropped the {session.dropped} oldest messages to fit the context window)")


def _export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        from gptjax.hf import export_hf

        max_bytes = int(args.max_shard_size * 1e9)
        export_hf(
            args.workdir, args.out, dtype=args.dtype, step=args.step, max_shard_bytes=max_bytes
        )
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")
        return
    from gptjax.exports import export

    written = export(args.workdir, args.out, dtype=args.dtype, step=args.step)
    print(
        f"exported {written} ({args.dtype}, no optimizer state); use it with "
        f"`gptjax generate --workdir {args.out}` or `gptjax finetune --init-from {args.out}`"
    )


def _plot(args: argparse.Namespace) -> None:
    from gptjax.curves import CURVES_FILE, plot

    one = len(args.workdir) == 1
    out = args.out or (str(storage.path(args.workdir[0]) / CURVES_FILE) if one else CURVES_FILE)
    print(f"wrote {plot(args.workdir, out)}")


def _import(args: argparse.Namespace) -> None:
    from gptjax.hf import import_hf

    out = import_hf(args.src, args.out, dtype=args.dtype)
    print(
        f"use it with `gptjax chat --workdir {out}`, `gptjax generate --workdir {out}` or "
        f"`gptjax finetune --init-from {out}`"
    )


def _quickstart(args: argparse.Namespace) -> None:
    """The main job: pretrain on the embedded plays, fine-tune on chatterbot english, talk."""
    from gptjax.config import load_experiment
    from gptjax.inference.generator import load
    from gptjax.metrics import read_metrics
    from gptjax.training.finetune import finetune
    from gptjax.training.pretrain import pretrain

    root = storage.path(args.workdir)
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


COMMANDS = {
    "pretrain": _train,
    "finetune": _train,
    "generate": _generate,
    "chat": _chat,
    "export": _export,
    "import": _import,
    "plot": _plot,
    "quickstart": _quickstart,
}
TAKES_OVERRIDES = ("pretrain", "finetune")


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command in TAKES_OVERRIDES:
            COMMANDS[args.command](args, extra)
        elif extra:
            raise GptjaxError(f"unrecognised arguments: {' '.join(extra)}")
        else:
            COMMANDS[args.command](args)
    except GptjaxError as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(REPORT, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
