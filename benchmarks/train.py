"""Training speed: gptjax's train step against a PyTorch peer measured in the same run.

    python benchmarks/train.py [--shapes char,small,default] [--steps 20] [--out FILE.json]
    python benchmarks/train.py --preset gpt2 --seq 1024 --batch auto    # on an accelerator

For each shape, one full optimizer step (forward, backward, global-norm clipping, AdamW) on
random token batches, float32, median over ``--steps`` steps after ``--warmup``:

* gptjax: ``gptjax.training.steps.compile_steps`` on one device, the step as the training loop
  runs it; one row per ``--steps-per-call`` value k (default 1 and 10: k steps in one compiled
  call, ``train.steps_per_call``), step time = call time / k.
* PyTorch peer (``pip install -e ".[bench]"``; ``--no-torch`` skips it): transformers'
  ``GPT2LMHeadModel`` of the same shape, batch and sequence length, ``torch.optim.AdamW`` and
  ``clip_grad_norm_``, ``torch.set_num_threads(cores)``, dropout off, eager mode.

``--matmul-precision bfloat16`` (on a CPU that multiplies bfloat16 natively:
``gptjax.model.cpu_multiplies_bfloat16``) times ``model.matmul_precision=bfloat16``: gptjax's
weight matmuls take bfloat16 operands summed in float32, against PyTorch's CPU mixed precision
(the forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)``) and, in the same
rounds, the float32 PyTorch peer (``speedup_vs_torch_float32``). A comma-separated list gives
rows for each value from one process; README's tables come from one process per value.

Both run in one process that keeps the memory a step frees for the next step, and gptjax's
calls run on the thread that makes them, as in the training loop on CPU (``gptjax.host_memory``;
``--async-dispatch`` times them on XLA's executor threads instead, as before). They take turns:
each of ``--steps`` rounds times one call of every k and one PyTorch step, so a drift of the
machine's speed during the run hits both alike; ``speedup`` is the median of the rounds'
ratios.

Shapes (GPT-2 style: learned positions, LayerNorm, GELU, biases, tied head):
``char`` — nanoGPT's shakespeare_char CPU recipe, 4 layers × 4 heads × 128, T 64, B 12,
vocabulary 65; ``small`` — 6 × 6 × 384, T 256, B 16, vocabulary 65; ``default`` —
experiments/shakespeare.py's model (4 × 6 × 192, T 128, B 32, vocabulary 2048).

``--profile`` adds where gptjax's step spends its time: a per-op profile of one step (k = 1)
from jax's profiler, summed by part of the model, forward and backward (``op_profile.py``).
``--attention`` adds the attention alone (forward, and forward + backward) through each
``model.attention_impl`` that runs on the device: ``jax.nn.dot_product_attention`` ("xla") and
``attend_einsum`` ("einsum"), the numbers behind ``attention_implementation``'s CPU choice.

``--preset NAME`` instead times one preset of ``gptjax.config.MODEL_PRESETS`` (GPT-2 124M:
``gpt2``) at ``--seq`` with ``--batch`` (``auto``: the largest power of two that fits), in the
device's default compute dtype (bfloat16 on GPU/TPU), and reports tokens/s, model FLOPs
utilisation against the device's peak (``gptjax.metrics.PEAK_FLOPS``) and peak device memory.

Writes JSON rows with ``shape``, ``matmul_precision``, ``gptjax_step_ms``,
``gptjax_tokens_per_sec``, ``hf_step_ms``, ``hf_tokens_per_sec`` (medians), ``speedup`` (the
median over rounds of PyTorch's step time ÷ gptjax's), every round's times (``gptjax_times_ms``,
``hf_times_ms``) and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import op_profile  # benchmarks/op_profile.py, beside this script
from report import add_dispatch_flag, set_cpu_dispatch, write_json  # benchmarks/report.py

from gptjax import sharding
from gptjax.config import (
    MODEL_PRESETS,
    Config,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    load_experiment,
)
from gptjax.metrics import flops_per_token, peak_flops
from gptjax.model import GPT, attend, count_params
from gptjax.training.steps import compile_steps, plan_sharded

GPT2_STYLE = dict(position="learned", norm="layernorm", activation="gelu", use_bias=True)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: ModelConfig
    batch: int

    @property
    def seq(self) -> int:
        return self.model.max_len


def shapes() -> dict[str, Shape]:
    default = load_experiment("shakespeare").model
    return {
        "char": Shape(
            "char",
            ModelConfig(
                preset="char",
                vocab_size=65,
                num_layers=4,
                num_heads=4,
                embed_dim=128,
                max_len=64,
                **GPT2_STYLE,
            ),
            12,
        ),
        "small": Shape(
            "small",
            ModelConfig(
                preset="small",
                vocab_size=65,
                num_layers=6,
                num_heads=6,
                embed_dim=384,
                max_len=256,
                **GPT2_STYLE,
            ),
            16,
        ),
        "default": Shape("default", dataclasses.replace(default, vocab_size=2048), 32),
    }


def _batches(shape: Shape, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, shape.model.vocab_size, (shape.batch, shape.seq + 1), np.int32)
        weights = np.ones((shape.batch, shape.seq), np.float32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights})
    return out


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def _config(shape: Shape, k: int, precision: str = "float32") -> Config:
    """One device, ``k`` optimizer steps per compiled call, a schedule that never ends."""
    train = TrainConfig(steps=10**6, batch_size=shape.batch, warmup_steps=10, steps_per_call=k)
    model = dataclasses.replace(shape.model, matmul_precision=precision)
    return Config(model=model, train=train, mesh=MeshConfig(data=1))


def gptjax_runner(
    shape: Shape, k: int, precision: str = "float32"
) -> tuple[Callable[[], float], float]:
    """Compiles gptjax's step with ``k`` steps per call (and ``model.matmul_precision``) and
    makes its first call; returns ``(run, compile_s)``: each ``run()`` makes one more call and
    returns its seconds per step."""
    config = _config(shape, k, precision)
    start = time.perf_counter()
    steps = compile_steps(config, GPT(config.model), devices=jax.devices()[:1])
    train, put = (steps.train_many, steps.put_batches) if k > 1 else (steps.train, None)
    batches = _batches(shape, k * 4)  # host data is not what is timed: four calls' worth
    calls = [batches[i : i + k] for i in range(0, len(batches), k)]
    calls = [put(c) if put else steps.put_batch(c[0]) for c in calls]
    calls = itertools.cycle(calls)
    state, metrics = train(steps.state, next(calls))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    def run() -> float:
        nonlocal state
        batch = next(calls)
        t0 = time.perf_counter()
        state, metrics = train(state, batch)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - t0) / k

    return run, compile_s


def time_gptjax(shape: Shape, k: int, args) -> dict[str, float]:
    """gptjax alone: median seconds per step over ``args.steps`` calls after the warm-up."""
    run, compile_s = gptjax_runner(shape, k)
    times = [run() for _ in range(args.warmup + args.steps)][args.warmup :]
    step_ms = _median_ms(times)
    return {
        "gptjax_step_ms": step_ms,
        "gptjax_tokens_per_sec": shape.batch * shape.seq / step_ms * 1000,
        "gptjax_compile_s": compile_s,
    }


def profile_gptjax(shape: Shape, args) -> dict[str, float]:
    """Per-op profile of one gptjax step (k = 1): ms per step by part of the model."""
    config = _config(shape, 1)
    plan = plan_sharded(config, GPT(config.model), jax.devices()[:1])
    with plan.context():
        state = plan.init(jax.random.PRNGKey(0))
        batch = sharding.global_batch(_batches(shape, 1)[0], plan.mesh)
        compiled = plan.train.lower(state, batch).compile()
    for _ in range(1 + args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    result = op_profile.profile(compiled, (state, batch), calls=args.profile_calls)
    return {"wall_ms": result["wall_ms"], **result["categories"]}


def time_attention(shape: Shape, args) -> dict[str, dict[str, float]]:
    """ms of the attention alone at the shape, forward and forward + backward, per impl."""
    m = shape.model
    rng = np.random.default_rng(0)

    def draw(heads):
        return jnp.asarray(rng.standard_normal((shape.batch, shape.seq, heads, m.head_dim)))

    q, k, v = draw(m.num_heads), draw(m.kv_heads), draw(m.kv_heads)
    impls = ["xla", "einsum"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    out = {}
    for impl in impls:
        qkv = (q, k, v) if impl != "cudnn" else tuple(x.astype(jnp.bfloat16) for x in (q, k, v))

        def loss(q, k, v, impl=impl):
            return jnp.sum(attend(q, k, v, None, impl).astype(jnp.float32))

        forward = jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, None, impl))
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out[impl] = {}
        for name, fn in (("forward", forward), ("forward_backward", backward)):
            jax.block_until_ready(fn(*qkv))
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*qkv))
                times.append(time.perf_counter() - t0)
            out[impl][name] = _median_ms(times)
    return out


def torch_runner(shape: Shape, precision: str = "float32") -> Callable[[], float]:
    """The PyTorch peer; each ``run()`` makes one optimizer step and returns its seconds.
    ``precision`` "bfloat16": the forward pass (and so its backward) under CPU autocast."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    m = shape.model
    config = transformers.GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.max_len,
        n_embd=m.embed_dim,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    if precision == "bfloat16":
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    batches = itertools.cycle(
        [
            tuple(torch.from_numpy(b[key]).long() for key in ("inputs", "targets"))
            for b in _batches(shape, 4)
        ]
    )

    def run() -> float:
        inputs, targets = next(batches)
        t0 = time.perf_counter()
        with autocast():
            logits = model(inputs).logits
            flat = logits.view(-1, logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(flat, targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    return run


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def bench_shapes(args) -> list[dict]:
    rows = []
    table = shapes()
    for name in args.shapes.split(","):
        if name not in table:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {', '.join(table)}")
        shape = table[name]
        runners = {
            (p, k): gptjax_runner(shape, k, p)
            for p in args.matmul_precision
            for k in args.steps_per_call
        }
        timed = {key: run for key, (run, _) in runners.items()}
        if args.torch:  # float32, and a bfloat16 peer (autocast) for bfloat16 rows
            peers = dict.fromkeys(["float32", *args.matmul_precision])
            timed.update({("torch", p): torch_runner(shape, p) for p in peers})
        for _ in range(args.warmup):
            for run in timed.values():
                run()
        # Alternated: each round times one call of every k and one PyTorch step, so a drift of
        # the machine's speed (minutes apart, it moves by 10-20% here) hits all of them alike.
        times = {key: [] for key in timed}
        for _ in range(args.steps):
            for key, run in timed.items():
                times[key].append(run())
        for (p, k), (_, compile_s) in runners.items():
            mine = times[p, k]
            step_ms = _median_ms(mine)
            row = {
                "shape": name,
                "matmul_precision": p,
                "layers": shape.model.num_layers,
                "embed_dim": shape.model.embed_dim,
                "seq": shape.seq,
                "batch": shape.batch,
                "vocab": shape.model.vocab_size,
                "params": count_params(shape.model),
                "steps_per_call": k,
                "gptjax_step_ms": step_ms,
                "gptjax_tokens_per_sec": shape.batch * shape.seq / step_ms * 1000,
                "gptjax_compile_s": compile_s,
                "gptjax_times_ms": [1000 * t for t in mine],
            }
            if args.torch:
                peer = times["torch", p]  # the same precision
                hf_ms = _median_ms(peer)
                row.update(
                    hf_step_ms=hf_ms,
                    hf_tokens_per_sec=shape.batch * shape.seq / hf_ms * 1000,
                    hf_times_ms=[1000 * t for t in peer],
                    # the median of the rounds' ratios, not the ratio of the two medians
                    speedup=_median_ratio(peer, mine),
                )
                if p != "float32":
                    row["speedup_vs_torch_float32"] = _median_ratio(times["torch", "float32"], mine)
            rows.append(row)
            print(_line(row), flush=True)
        first = next(r for r in rows if r["shape"] == name)
        if args.attention:
            first["attention_ms"] = time_attention(shape, args)
        if args.profile:
            first["profile_ms"] = profile_gptjax(shape, args)
    for row in rows:
        if "attention_ms" in row:
            print(f"\nattention alone at {row['shape']} (ms, median of {args.steps}):")
            for impl, t in row["attention_ms"].items():
                print(
                    f"  {impl:<7} forward {t['forward']:8.2f}  forward+backward "
                    f"{t['forward_backward']:8.2f}"
                )
        if "profile_ms" in row:
            prof = row["profile_ms"]
            print(
                f"\nwhere a {row['shape']} step goes (k=1, profiled wall {prof['wall_ms']:.1f} "
                f"ms/step; ms per step, leaf XLA ops):"
            )
            for part, ms in prof.items():
                if part != "wall_ms":
                    print(f"  {part:<42} {ms:8.1f}  {ms / prof['wall_ms']:6.1%}")
    return rows


def _median_ratio(theirs: list[float], mine: list[float]) -> float:
    return statistics.median(t / m for t, m in zip(theirs, mine, strict=True))


HEADER = (
    f"{'shape':<8} {'params':>8} {'B×T':>8} {'matmuls':>8} {'k':>3} {'gptjax ms':>10} "
    f"{'gptjax tok/s':>13} {'torch ms':>9} {'torch tok/s':>12} {'× torch':>8} "
    f"{'× fp32 torch':>12} {'compile s':>9}"
)


def _line(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    return (
        f"{r['shape']:<8} {r['params'] / 1e6:>7.2f}M {r['batch']:>3}×{r['seq']:<4} "
        f"{r['matmul_precision']:>8} {r['steps_per_call']:>3} "
        f"{r['gptjax_step_ms']:>10.1f} {r['gptjax_tokens_per_sec']:>13,.0f} "
        f"{f('hf_step_ms', '.1f'):>9} {f('hf_tokens_per_sec', ',.0f'):>12} "
        f"{f('speedup', '.2f'):>8} {f('speedup_vs_torch_float32', '.2f'):>12} "
        f"{r['gptjax_compile_s']:>9.1f}"
    )


def bench_preset(args) -> list[dict]:
    """One preset on whatever device is present: tokens/s, MFU, peak memory."""
    device = jax.devices()[0]
    dtype = "float32" if device.platform == "cpu" else "bfloat16"
    model = dataclasses.replace(MODEL_PRESETS[args.preset], max_len=args.seq, dtype=dtype)
    batches = [int(args.batch)] if args.batch != "auto" else [2**k for k in range(8, -1, -1)]
    for batch in batches:
        shape = Shape(args.preset, model, batch)
        try:
            row = {"shape": args.preset, "seq": args.seq, "batch": batch, "dtype": dtype}
            row.update(time_gptjax(shape, 1, args))
            break
        except Exception as e:  # out of memory: try half the batch (only with --batch auto)
            if args.batch != "auto" or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"batch {batch}: out of memory, trying {batch // 2}")
    n = count_params(model)
    flops = flops_per_token(model, n, args.seq) * row["gptjax_tokens_per_sec"]
    peak = peak_flops(device.device_kind)
    row.update(
        params=n,
        device=device.device_kind,
        tflops_per_sec=flops / 1e12,
        mfu=flops / peak if peak else None,
        peak_memory_gib=(device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30,
    )
    mfu = f"{row['mfu']:.1%}" if row["mfu"] else "- (unknown peak)"
    print(
        f"{args.preset} T{args.seq} B{row['batch']} {dtype} on {row['device']}: "
        f"{row['gptjax_tokens_per_sec']:,.0f} tokens/s, {row['tflops_per_sec']:.1f} TFLOP/s, "
        f"MFU {mfu}, peak memory {row['peak_memory_gib']:.1f} GiB"
    )
    return [row]


def _precisions(text: str) -> list[str]:
    values = text.split(",")
    if not set(values) <= {"float32", "bfloat16"}:
        raise argparse.ArgumentTypeError(f"{text!r}: give float32, bfloat16 or both")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/train.json")
    parser.add_argument("--shapes", default="char,small,default")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument(
        "--steps-per-call",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[1, 10],
        help="comma-separated: a row for each (k steps in one compiled call)",
    )
    parser.add_argument(
        "--matmul-precision",
        type=_precisions,
        default=["float32"],
        help="comma-separated, of float32 and bfloat16 (model.matmul_precision): a row for each",
    )
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--profile", action="store_true", help="per-op profile of each shape")
    parser.add_argument("--profile-calls", type=int, default=3, help="steps profiled")
    parser.add_argument("--attention", action="store_true", help="time each attention_impl")
    parser.add_argument("--preset", default=None, help="time one MODEL_PRESETS row instead")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", default="auto")
    add_dispatch_flag(parser)
    args = parser.parse_args()
    cpu_dispatch = set_cpu_dispatch(args)
    if args.torch is None:
        args.torch = _torch_available() and args.preset is None
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
        f"load average before: {os.getloadavg()[0]:.1f} (other processes skew the numbers)"
    )
    if args.preset:
        rows = bench_preset(args)
    else:
        if not args.torch:
            print("the PyTorch peer is not measured in this run (--no-torch, or no torch)")
        print(HEADER)
        rows = bench_shapes(args)
    meta = {
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_dispatch": cpu_dispatch,
        "load_average_after": os.getloadavg()[0],
        "torch": "measured in this run" if args.torch else "not measured",
    }
    write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
