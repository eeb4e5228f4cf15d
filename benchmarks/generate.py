"""Decoding speed: KV-cache generation (gptjax/inference/decode.py) against the old full-recompute
sampler.

    python benchmarks/generate.py [--out FILE.json] [--models char,small,gpt2]

For each model (random float32 weights) and batch size: greedy decoding of ``--new-tokens``
tokens after an 8-token prompt. Reported separately: the first call (compiling prefill and
decode), the prefill alone, the compiled decode loop alone (decode tokens/s = batch * new
tokens / its time, after a fresh prefill) and the whole call end to end, medians of
``--repeats`` calls. With ``--stream`` also batch 1 with a
streaming hook (``on_token``; decoding in chunks of about ``STREAM_INTERVAL_S``). gptjax decodes
as ``Generator`` does, from ``decode_layout(params)`` (its one-off cost is ``decode_layout_s``
in the JSON); ``--no-decode-layout`` decodes from the standard parameter tree instead.

Baseline, measured in the same run at batch 1: the sampler gptjax had before the KV cache,
which recomputed the model over a fixed ``[1, max_len]`` window for every token. Its cost per
token does not depend on the position, so it is timed over ``--baseline-tokens`` tokens.

Reference, measured in the same run when ``torch`` and ``transformers`` are installed
(``pip install -e ".[bench]"``): Hugging Face ``generate`` — PyTorch CPU, KV cache, greedy,
same batch, prompt and number of new tokens, end to end (prefill included) — on a
``GPT2LMHeadModel`` of the same shape with random weights (no download). Its calls alternate
with gptjax's end-to-end calls, and "x HF" is the median of the per-pair ratios: on a shared
machine both then see the same slow and fast moments. Without torch and transformers (or with
``--no-hf``) the table says the reference was not measured; no number stands in for it.

Ceiling, measured in the same run for models too big for the CPU caches: a decoding step
reads every weight once, so no decoder beats ``batch / weights_pass_s``, the time of one pass
that reads all the model's weight matrices (``_read_all_weights``). For GPT-2 124M in float32
that is ~500 MB a token: on this 2-core machine ~19 ms (~26 GB/s), i.e. ~50 tokens/s at batch
1, where decoding runs (HF: ~26). Lower-precision weights would lift the ceiling, but XLA:CPU's
bfloat16 matvecs run ~7x slower than float32 ones here (a chain of GPT-2's matvecs: 186 ms vs
26 ms).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from report import add_dispatch_flag, set_cpu_dispatch, write_json  # benchmarks/report.py

from gptjax.config import MODEL_PRESETS, ModelConfig
from gptjax.inference.decode import (
    STREAM_INTERVAL_S,
    _decode,
    _prefill,
    decode_layout,
    generate_batch,
    pad_prompts,
)
from gptjax.inference.sampling import sample_logits
from gptjax.model import GPT, count_params, init_params

PROMPT_LEN = 8

MODELS: dict[str, ModelConfig] = {
    # nanoGPT's shakespeare_char shape (experiments/shakespeare_char.py), 65 chars + specials
    # and bytes ~ 384 ids; max_len 512 so that prompt + 256 new tokens fit.
    "char": dataclasses.replace(
        MODEL_PRESETS["small"],
        preset="char",
        vocab_size=384,
        num_layers=4,
        num_heads=4,
        embed_dim=128,
        max_len=512,
        use_bias=False,
    ),
    "small": dataclasses.replace(MODEL_PRESETS["small"], vocab_size=2048, max_len=512),
    "gpt2": MODEL_PRESETS["gpt2"],
}


@functools.partial(jax.jit, static_argnames="model")
def _old_next_token(params, window, length, *, model: GPT):
    """The pre-KV-cache sampler's step: the whole [1, max_len] window, every token."""
    logits = model.apply({"params": params}, window)  # [1, T, V]
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)  # [1, V]
    return sample_logits(last, None, temperature=0)[0]


def old_generate(params, model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    max_len = model.config.max_len
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        context = tokens[-max_len:]
        window = np.zeros((1, max_len), np.int32)
        window[0, : len(context)] = context
        tokens.append(int(_old_next_token(params, window, len(context), model=model)))
    return tokens


@jax.jit
def _read_all_weights(params) -> jax.Array:
    """One pass over every weight matrix as decoding at batch 1 makes it: each kernel (and the
    embedding table) times a vector, so each float is read from memory once. The product runs
    over each matrix's last (contiguous) axis, the form XLA:CPU streams fastest (the other one,
    ``vector @ matrix``, took ~1.5x as long here, which decoding from ``decode_layout`` beat)."""
    total = jnp.zeros((), jnp.float32)
    for w in jax.tree.leaves(params):
        if w.ndim >= 2:
            w2 = w.reshape(-1, w.shape[-1])
            total += jnp.dot(w2, jnp.ones((w2.shape[1],), w2.dtype)).sum()
    return total


def weights_pass_s(params, repeats: int = 10) -> float:
    """Seconds for ``_read_all_weights``: per decoding step, no batch-1 decoder can beat it."""
    _read_all_weights(params).block_until_ready()
    return statistics.median(_timed(lambda: _read_all_weights(params))[0] for _ in range(repeats))


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def bench_model(name: str, config: ModelConfig, args) -> list[dict]:
    model = GPT(config)
    params = init_params(config, jax.random.key(0))["params"]
    # What Generator decodes with; the old sampler and the ceiling read the standard tree.
    layout_s, decoding = _timed(lambda: decode_layout(params) if args.decode_layout else params)
    rng = np.random.default_rng(0)
    rows = []
    # Only a bound where the weights do not fit in the CPU caches; a small model's pass is
    # dominated by per-matrix overheads instead.
    weights_s = weights_pass_s(params) if count_params(config) > 50e6 else None
    for batch in args.batch_sizes:
        prompts = rng.integers(8, config.vocab_size, (batch, PROMPT_LEN)).tolist()
        run = functools.partial(
            generate_batch,
            decoding,
            model,
            prompts,
            temperature=0.0,
            max_new_tokens=args.new_tokens,
        )
        first, out = _timed(run)
        assert all(len(row) == PROMPT_LEN + args.new_tokens for row in out), "stopped early"
        padded, lengths = pad_prompts(prompts, config.max_len)
        prefill_only = functools.partial(_prefill, decoding, padded, lengths, model=model)
        prefill = statistics.median(_timed(prefill_only)[0] for _ in range(3))
        decode_s = statistics.median(
            _decode_seconds(decoding, model, prefill_only, batch, args.new_tokens)
            for _ in range(args.repeats)
        )
        # End to end, alternating with Hugging Face generate when it is measured: the two
        # see the same moments of a noisy machine, and each pair gives a ratio.
        hf_run = hf_generate(config, prompts, args) if args.hf else None
        totals, hf_seconds = [], []
        for _ in range(args.repeats):
            totals.append(_timed(run)[0])
            if hf_run is not None:
                hf_seconds.append(_timed(hf_run)[0])
        total = statistics.median(totals)
        decode = batch * args.new_tokens / decode_s
        row = {
            "model": name,
            "params": count_params(config),
            "max_len": config.max_len,
            "batch": batch,
            "new_tokens": args.new_tokens,
            "decode_layout": args.decode_layout,
            "decode_layout_s": layout_s,
            "first_call_s": first,
            "prefill_s": prefill,
            "total_s": total,
            "decode_tokens_per_s": decode,
            "end_to_end_tokens_per_s": batch * args.new_tokens / total,
        }
        if weights_s:  # memory-bandwidth bound: each decoding step reads every weight once
            row["weights_pass_s"] = weights_s
            row["bandwidth_ceiling_tokens_per_s"] = batch / weights_s
        if batch == 1 and args.stream:
            hook = functools.partial(run, on_token=lambda row, token: None)
            hook()  # compiled already; the first call pays nothing new
            streamed = statistics.median(_timed(hook)[0] for _ in range(args.repeats))
            row["stream_tokens_per_s"] = args.new_tokens / (streamed - prefill)
            row["stream_interval_s"] = STREAM_INTERVAL_S
        if batch == 1 and args.baseline_tokens:
            # Fewer tokens for big models: every token is a full [1, max_len] forward pass.
            n = args.baseline_tokens if row["params"] < 50e6 else 3
            old = functools.partial(old_generate, params, model, prompts[0])
            row["baseline_first_call_s"] = _timed(functools.partial(old, 1))[0]
            elapsed, tokens = _timed(functools.partial(old, n))
            assert tokens == out[0][: PROMPT_LEN + n], "the two samplers disagree"
            row["baseline_tokens_per_s"] = n / elapsed
            row["speedup_vs_baseline"] = decode / row["baseline_tokens_per_s"]
        if hf_run is not None:
            row["hf_tokens_per_s"] = batch * args.new_tokens / statistics.median(hf_seconds)
            # the median of the paired ratios (HF seconds / gptjax seconds, call by call)
            row["speedup_vs_hf"] = statistics.median(
                h / g for h, g in zip(hf_seconds, totals, strict=True)
            )
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _decode_seconds(params, model: GPT, prefill, batch: int, new_tokens: int) -> float:
    """Seconds of the compiled greedy decode loop alone, ``new_tokens`` steps after a prefill."""
    state = jax.block_until_ready(prefill())
    seconds, _ = _timed(
        lambda: _decode(
            params,
            state,
            np.int32(new_tokens),
            np.zeros(batch, bool),
            np.arange(batch, dtype=np.int32),
            np.zeros(model.config.padded_vocab_size, bool),
            np.int32(model.config.vocab_size),
            np.float32(1.0),
            np.float32(1.0),
            model=model,
            greedy=True,
            top_k=0,
            nucleus=False,
        )
    )
    return seconds


def hf_generate(config: ModelConfig, prompts: list[list[int]], args) -> Callable[[], None]:
    """Hugging Face ``generate`` (greedy, KV cache) on a random ``GPT2LMHeadModel`` of
    ``config``'s shape: returns a call that generates ``args.new_tokens`` for ``prompts``,
    after one warmup call."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_len,
        n_embd=config.embed_dim,
        n_layer=config.num_layers,
        n_head=config.num_heads,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    ids = torch.tensor(prompts)
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(ids, **kw)
        assert out.shape == (len(prompts), PROMPT_LEN + args.new_tokens)

    run()
    return run


def _hf_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


HEADER = (
    f"{'model':<6} {'params':>7} {'B':>2} {'compile+1st s':>13} {'prefill ms':>10} "
    f"{'decode tok/s':>12} {'ceiling':>8} {'e2e tok/s':>9} {'stream tok/s':>12} "
    f"{'old tok/s':>9} {'x old':>6} "
    f"{'HF tok/s':>9} {'x HF':>5}"
)


def _line(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    return (
        f"{r['model']:<6} {r['params'] / 1e6:>6.1f}M {r['batch']:>2} {r['first_call_s']:>13.2f} "
        f"{r['prefill_s'] * 1e3:>10.1f} {r['decode_tokens_per_s']:>12.0f} "
        f"{f('bandwidth_ceiling_tokens_per_s', '.0f'):>8} {r['end_to_end_tokens_per_s']:>9.0f} "
        f"{f('stream_tokens_per_s', '.0f'):>12} {f('baseline_tokens_per_s', '.1f'):>9} "
        f"{f('speedup_vs_baseline', '.0f'):>6} {f('hf_tokens_per_s', '.0f'):>9} "
        f"{f('speedup_vs_hf', '.2f'):>5}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-tokens", type=int, default=16, help="0 = no baseline")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--decode-layout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with decode_layout(params), as Generator does (--no-...: the "
        "standard parameter tree)",
    )
    parser.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure Hugging Face generate in the same run (default: if torch is installed)",
    )
    add_dispatch_flag(parser)
    args = parser.parse_args()
    cpu_dispatch = set_cpu_dispatch(args)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.hf is None:
        args.hf = _hf_available()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
        f"load average before: {os.getloadavg()[0]:.1f} (other processes skew the numbers)"
    )
    if not args.hf:
        print("Hugging Face generate is not measured in this run (--no-hf, or no torch): no x HF")
    print(HEADER)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        rows += bench_model(name, MODELS[name], args)
    meta = {
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_dispatch": cpu_dispatch,
        "load_average_after": os.getloadavg()[0],
        "prompt_len": PROMPT_LEN,
        "hf": "measured in this run" if args.hf else "not measured",
    }
    write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
