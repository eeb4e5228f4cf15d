"""Peak memory of ``gptjax import`` (``gptjax.hf.import_hf``) on a ~1B-parameter LLaMA.

    python benchmarks/hf_import.py [--shape 1b|tiny] [--source-dtype bfloat16|float32]
        [--dtypes float32,bfloat16] [--what-if-no-deepcopy] [--cache DIR] [--out FILE.json]

A Hugging Face LLaMA directory with random weights (``config.json``, safetensors shards of at
most ``--shard-gb`` with ``model.safetensors.index.json``, a tiny BPE ``tokenizer.json``) is
written once under ``--cache`` and reused by later runs. ``1b`` is TinyLlama-1.1B's shape (22
layers x 2048, MLP 5632, 32 heads, 4 kv heads, vocab 32000, untied head); ``tiny`` (2 x 64) is
a smoke run. The source is bfloat16 by default, as published checkpoints are.

Each import runs in a fresh child process (this script with ``--child``), so that the peak is
the import's alone: the child's peak resident set (``VmHWM`` in ``/proc/self/status``),
``import_hf``'s wall time, the parameter count and the model's size in the target dtype
(parameters x bytes); "peak / model" is their ratio. Measured in the same run, a baseline child
imports ``gptjax.hf`` (jax, flax, orbax, ...) and starts jax's CPU backend, then does nothing:
its peak is the interpreter and libraries, and "peak - baseline" is what the import itself adds.

Per stage: the child wraps ``read_params`` (safetensors → numpy tree, the copy that
is kept), ``write_workdir`` (config and tokenizer), Orbax's ``CheckpointManager.save`` and
the rest (Orbax's close, the rename), then after ``import_hf`` returns runs ``gc.collect`` and
``malloc_trim(0)``. It resets the peak at each boundary (writing 5 to ``/proc/self/clear_refs``),
so each stage's peak is its own, and the import's peak is the largest. A thread samples the
anonymous (arrays) and file-backed (mapped safetensors, libraries) resident sets every 20 ms
for their peaks per stage; both are also given at each stage's end. ``--what-if-no-deepcopy``
adds rows where the child registers Orbax's ``NumpyHandler(deepcopy_host_arrays=False)``
before importing: not what gptjax does, a diagnosis. The import outputs are deleted after each
measurement.

Measured (1b, bfloat16 source, 2 CPUs, orbax-checkpoint 0.12.8; results/hf_import.json):
float32 peak 5.4 GiB for a 4.1 GiB model (1.3x; 1.27x without the 0.22 GiB baseline), bfloat16
3.9 GiB for 2.05 GiB (1.9x). ``read_params`` ends at one copy (+0.8 GiB transient: the mapped
shard and the largest tensor's temporaries); Orbax's save adds ~0.9 GiB of write buffers in
float32 and ~1.6 GiB in bfloat16 (so bfloat16 is 0.72x float32's peak, not half). Before
``gptjax.exports.write_export`` stopped Orbax's ``NumpyHandler`` from deep-copying every host
array (a second full copy), the peaks were 9.7-10.5 and 5.4 GiB; ``--what-if-no-deepcopy`` is
now a no-op kept for that comparison. After ``import_hf`` returns, 1-3 GiB stays resident in
malloc's free lists until ``malloc_trim``. Times vary with the load, not memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from report import write_json  # benchmarks/report.py, beside this script

SHAPES = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json
    "1b": dict(
        num_hidden_layers=22,
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
SOURCE_DTYPES = ("bfloat16", "float32")
GIB = 2**30
RESULT = "RESULT "  # the child's one line of JSON on stdout starts with this
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be, that is the question",
    "all that glitters is not gold",
    "the rain in spain stays mainly in the plain",
]


# ----------------------------------------------------------------------------- the checkpoint


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # comes with jax

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def hf_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of a LLaMA checkpoint, in Hugging Face's order."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    out.append(("model.norm.weight", (d,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, d)))
    return out


def _write_tokenizer(directory: Path) -> None:
    """A BPE ``tokenizer.json`` trained on a few sentences, and its ``tokenizer_config.json``:
    far fewer ids than the model's vocab_size (gptjax keeps all the model's rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_checkpoint(directory: Path, shape: str, source_dtype: str, shard_bytes: int) -> dict:
    """Writes the random checkpoint into ``directory`` unless a complete one is there; returns
    its description. One tensor is generated at a time (seeded, std 0.02; norms are ones), and
    a shard is written as soon as the next tensor would take it past ``shard_bytes``."""
    from safetensors.numpy import save_file

    spec = {"shape": shape, "source_dtype": source_dtype, "shard_bytes": shard_bytes, "seed": 0}
    marker = directory / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text())["spec"] == spec:
        info = json.loads(marker.read_text())
        print(f"reusing the checkpoint in {directory} ({info['bytes'] / GIB:.2f} GiB)")
        return info
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    c = SHAPES[shape]
    dtype = _np_dtype(source_dtype)
    tensors = hf_tensors(c)
    total = sum(int(np.prod(s)) for _, s in tensors) * dtype.itemsize
    _check_space(directory, total, "the checkpoint")
    start = time.perf_counter()
    shards: list[dict[str, np.ndarray]] = [{}]
    names: list[str] = []
    weight_map: dict[str, str] = {}
    used = 0
    count = len(tensors)
    n_shards = _count_shards([int(np.prod(s)) * dtype.itemsize for _, s in tensors], shard_bytes)

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shards[-1], str(directory / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        names.append(name)
        shards[-1] = {}  # freed before the next shard's tensors are made

    for index, (name, shape_) in enumerate(tensors):
        size = int(np.prod(shape_)) * dtype.itemsize
        if shards[-1] and used + size > shard_bytes:
            flush()
            used = 0
        if len(shape_) == 1:  # RMSNorm scales
            value = np.ones(shape_, dtype)
        else:
            value = np.random.default_rng(index).standard_normal(shape_, dtype=np.float32)
            value *= 0.02
            value = value.astype(dtype)
        shards[-1][name] = value
        used += size
    flush()
    assert len(names) == n_shards, (names, n_shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **c,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": source_dtype,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(directory)
    info = {
        "spec": spec,
        "tensors": count,
        "params": sum(int(np.prod(s)) for _, s in tensors),
        "bytes": total,
        "shards": n_shards,
        "generate_s": time.perf_counter() - start,
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"wrote the checkpoint in {directory}: {_count(info['params'])} parameters, "
        f"{total / GIB:.2f} GiB {source_dtype} in {n_shards} shards, {info['generate_s']:.0f} s"
    )
    return info


def _count_shards(sizes: list[int], limit: int) -> int:
    shards, used = 1, 0
    for size in sizes:
        if used and used + size > limit:
            shards, used = shards + 1, 0
        used += size
    return shards


def _check_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    print(f"free space at {directory}: {free / GIB:.1f} GiB; {what} needs {needed / GIB:.2f} GiB")
    if free < needed * 1.1 + GIB:
        raise SystemExit(f"not enough free space in {directory} for {what}; choose another --cache")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the child


def _status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stages:
    """Consecutive named stages of this process: each one's time, peak and resident set at its
    end. The first, ``startup``, runs from the process start (interpreter, imports)."""

    def __init__(self, sample_s: float = 0.02) -> None:
        self.rows: list[dict] = []
        self.name: str | None = "startup"
        self.start = time.perf_counter()
        self.resets = True
        self.lock = threading.Lock()
        self.sampled = {"RssAnon": 0, "RssFile": 0}
        self.sample_s = sample_s
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """The largest anonymous and file-backed resident sets seen in the current stage."""
        while True:
            s = _status()
            with self.lock:
                for key in self.sampled:
                    self.sampled[key] = max(self.sampled[key], s[key])
            time.sleep(self.sample_s)

    def begin(self, name: str | None) -> None:
        with self.lock:
            now, s = time.perf_counter(), _status()
            if self.name is not None:
                self.rows.append(
                    {
                        "stage": self.name,
                        "seconds": now - self.start,
                        "peak_rss": s["VmHWM"],
                        "sampled_peak_anon": max(self.sampled["RssAnon"], s["RssAnon"]),
                        "sampled_peak_file": max(self.sampled["RssFile"], s["RssFile"]),
                        "rss_end": s["VmRSS"],
                        "anon_end": s["RssAnon"],
                        "file_end": s["RssFile"],
                    }
                )
            self.resets = _reset_peak() and self.resets
            self.sampled = {"RssAnon": s["RssAnon"], "RssFile": s["RssFile"]}
            self.name, self.start = name, now

    def wrap(self, owner, attr: str, name: str, after: str) -> None:
        """Runs ``owner.attr`` as stage ``name``, and what follows it as stage ``after``."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self.begin(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.begin(after)

        setattr(owner, attr, wrapper)


def child(args) -> None:
    import ctypes
    import gc
    import resource

    stages = Stages()
    import jax
    import orbax.checkpoint as ocp

    import gptjax
    import gptjax.exports
    import gptjax.hf

    jax.devices()  # the CPU backend, as the import starts it
    result: dict = {
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "flax": _version("flax"),
            "orbax-checkpoint": _version("orbax-checkpoint"),
            "safetensors": _version("safetensors"),
            "numpy": np.__version__,
            "gptjax": getattr(gptjax, "__version__", _version("gptjax")),
        },
        "devices": str(jax.devices()),
    }
    if args.child == "import":
        if not args.orbax_deepcopy:  # what if: Orbax writes the numpy arrays it is given
            from orbax.checkpoint import type_handlers

            handler = type_handlers.NumpyHandler(deepcopy_host_arrays=False)
            type_handlers.register_type_handler(np.ndarray, handler, override=True)
        stages.wrap(gptjax.hf, "read_params", "read_params", "staging")
        stages.wrap(gptjax.exports, "write_workdir", "write config+tokenizer", "orbax manager init")
        stages.wrap(ocp.CheckpointManager, "save", "orbax save", "orbax close + rename")
        write_export = gptjax.exports.write_export

        def counting_write_export(out, params, *rest, **kwargs):
            leaves = jax.tree.leaves(params)
            result["params"] = sum(int(x.size) for x in leaves)
            result["model_bytes"] = sum(int(x.nbytes) for x in leaves)
            result["param_types"] = sorted({f"{type(x).__name__}[{x.dtype}]" for x in leaves})
            return write_export(out, params, *rest, **kwargs)

        gptjax.exports.write_export = counting_write_export
        stages.begin("config+tokenizer")
        start = time.perf_counter()
        gptjax.hf.import_hf(args.src, args.dest, dtype=args.dtype, log=lambda _: None)
        result["import_s"] = time.perf_counter() - start
        # What stays resident once import_hf has returned and its arrays are garbage: freed
        # memory that malloc keeps, unless malloc_trim gives it back.
        stages.begin("returned: gc+malloc_trim")
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    stages.begin(None)
    result["stages"] = stages.rows
    result["peak_resets"] = stages.resets
    # With the resets, VmHWM and ru_maxrss only cover the last stage: the peak is the largest.
    result["peak_rss"] = max(r["peak_rss"] for r in stages.rows)
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT + json.dumps(result), flush=True)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_child(argv: list[str]) -> tuple[dict, float]:
    """Runs this script as a child; its result and its wall time (start-up included)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the child {' '.join(argv)} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT) :]), wall


# ----------------------------------------------------------------------------- the parent


HEADER = (
    f"{'dtype':<20} {'params':>8} {'model GiB':>9} {'peak GiB':>8} {'- base GiB':>10} "
    f"{'peak/model':>10} {'(-base)/model':>13} {'import s':>8} {'child s':>7} "
    f"{'out GiB':>7}  {'peak stage':<18}"
)


def _line(r: dict) -> str:
    return (
        f"{_label(r):<20} {_count(r['params']):>8} {r['model_bytes'] / GIB:>9.3f} "
        f"{r['peak_rss'] / GIB:>8.2f} {r['peak_minus_baseline'] / GIB:>10.2f} "
        f"{r['peak_over_model']:>10.2f} {r['peak_minus_baseline_over_model']:>13.2f} "
        f"{r['import_s']:>8.1f} {r['child_wall_s']:>7.1f} {r['export_bytes'] / GIB:>7.2f}  "
        f"{r['peak_stage']:<18}"
    )


def _label(r: dict) -> str:
    return r["dtype"] + ("" if r["orbax_numpy_deepcopy"] else " no-deepcopy")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _print_stages(rows: list[dict]) -> None:
    print(
        f"{'stage':<26} {'seconds':>7} {'peak GiB':>8} {'anon pk':>7} {'file pk':>7} "
        f"{'RSS end':>7} {'anon':>6} {'file':>6}"
    )
    for s in rows:
        print(
            f"{s['stage']:<26} {s['seconds']:>7.2f} {s['peak_rss'] / GIB:>8.2f} "
            f"{s['sampled_peak_anon'] / GIB:>7.2f} {s['sampled_peak_file'] / GIB:>7.2f} "
            f"{s['rss_end'] / GIB:>7.2f} {s['anon_end'] / GIB:>6.2f} {s['file_end'] / GIB:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--source-dtype", choices=SOURCE_DTYPES, default="bfloat16")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="import dtypes to measure")
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "gptjax-hf-import-bench"),
        help="where the random checkpoint is kept for later runs",
    )
    parser.add_argument("--shard-gb", type=float, default=1.0, help="GB per safetensors shard")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint at the end")
    parser.add_argument(
        "--what-if-no-deepcopy",
        action="store_true",
        help="also measure each dtype with Orbax's NumpyHandler(deepcopy_host_arrays=False) "
        "registered in the child (not what gptjax does: a diagnosis)",
    )
    parser.add_argument("--out", default="benchmarks/results/hf_import.json")
    # the child (internal)
    parser.add_argument("--child", choices=("baseline", "import"), help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument(
        "--orbax-deepcopy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    dtypes = args.dtypes.split(",")
    if bad := [d for d in dtypes if d not in ("float32", "bfloat16")]:
        raise SystemExit(f"--dtypes: unknown dtype {bad[0]!r}; choose float32, bfloat16")

    load_before = os.getloadavg()
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.1f} GiB RAM; "
        f"load average before: {load_before[0]:.1f} (other processes slow the times, not "
        f"the memory)"
    )
    cache = Path(args.cache).expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"llama-{args.shape}-{args.source_dtype}"
    checkpoint = make_checkpoint(source, args.shape, args.source_dtype, int(args.shard_gb * 1e9))
    baseline, baseline_wall = run_child(["--child", "baseline"])
    print(
        f"baseline child (python + gptjax.hf, jax, flax, orbax imported, CPU backend started): "
        f"peak {baseline['peak_rss'] / GIB:.3f} GiB, {baseline_wall:.1f} s"
    )
    rows, stage_tables = [], {}
    work = Path(tempfile.mkdtemp(prefix="imports-", dir=cache))
    try:
        variants = [(d, True) for d in dtypes]
        variants += [(d, False) for d in dtypes if args.what_if_no_deepcopy]
        for dtype, deepcopy in variants:
            need = checkpoint["params"] * _np_dtype(dtype).itemsize
            _check_space(work, need, f"the {dtype} import")
            dest = work / f"out-{dtype}"
            argv = ["--child", "import", "--src", str(source), "--dest", str(dest)]
            argv += ["--dtype", dtype, "--orbax-deepcopy" if deepcopy else "--no-orbax-deepcopy"]
            r, wall = run_child(argv)
            export_bytes = _du(dest)
            shutil.rmtree(dest)
            peak_stage = max(r["stages"], key=lambda s: s["peak_rss"])
            row = {
                "shape": args.shape,
                "source_dtype": args.source_dtype,
                "dtype": dtype,
                "orbax_numpy_deepcopy": deepcopy,
                "params": r["params"],
                "model_bytes": r["model_bytes"],
                "peak_rss": r["peak_rss"],
                "baseline_peak_rss": baseline["peak_rss"],
                "peak_minus_baseline": r["peak_rss"] - baseline["peak_rss"],
                "peak_over_model": r["peak_rss"] / r["model_bytes"],
                "peak_minus_baseline_over_model": (r["peak_rss"] - baseline["peak_rss"])
                / r["model_bytes"],
                "import_s": r["import_s"],
                "child_wall_s": wall,
                "export_bytes": export_bytes,
                "peak_stage": peak_stage["stage"],
                "param_types": r["param_types"],
                "peak_resets": r["peak_resets"],
                "ru_maxrss_last_stage": r["ru_maxrss"],
                "stages": r["stages"],
            }
            rows.append(row)
            stage_tables[_label(row)] = r["stages"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.clean:
            shutil.rmtree(source, ignore_errors=True)

    print(
        f"\n{args.shape}: {_count(checkpoint['params'])} parameters, source "
        f"{args.source_dtype} ({checkpoint['bytes'] / GIB:.2f} GiB in {checkpoint['shards']} "
        f"shards); baseline {baseline['peak_rss'] / GIB:.2f} GiB"
    )
    print(HEADER)
    for row in rows:
        print(_line(row))
    for label, table in stage_tables.items():
        print(f"\nstages of the {label} import (peak: each stage's own; anon and file: sampled)")
        _print_stages(table)

    meta = {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
        "versions": baseline["versions"],
        "devices": baseline["devices"],
        "shape": args.shape,
        "model_config": SHAPES[args.shape],
        "source_dtype": args.source_dtype,
        "checkpoint": checkpoint,
        "baseline_peak_rss": baseline["peak_rss"],
        "baseline_child_wall_s": baseline_wall,
        "command": " ".join(["python", *sys.argv]),
        "peak": "VmHWM of a fresh child process, reset per stage (clear_refs), max over stages",
    }
    write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
