"""Hugging Face ↔ gptjax conversion, without I/O: configs both ways and the weight name map.

``model_config`` turns a Hugging Face ``config.json`` (``gpt2``, ``llama``, ``qwen2``) into a
``ModelConfig`` carrying every field that changes the numbers, and refuses by name what gptjax
does not implement; ``architecture`` and ``hf_config`` go the other way. ``layout`` lists a
checkpoint's tensors with the gptjax parameters each holds; ``to_gptjax`` and ``to_hf`` convert
one tensor by reshape and transpose only. GPT-2's Conv1D weights are ``[in, out]`` like gptjax's
kernels (``c_attn`` is split into query, key and value); LLaMA's ``nn.Linear`` weights are
``[out, in]`` and are transposed. Both use the rotate-half rotary layout that
``gptjax.model.rope`` implements (HF's converter already permuted Meta's interleaved q/k rows),
so no row permutation is needed. The vocabulary is padded to ``model.vocab_multiple`` rows on
import and cut back on export. Reading and writing checkpoints is ``gptjax/hf.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.model import kernel_in_axes

SUPPORTED = ("gpt2", "llama", "qwen2")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GPT-2's tanh approximation
# What each architecture fixes in a ModelConfig (Qwen2 is LLaMA with q/k/v biases).
GPT2 = dict(position="learned", norm="layernorm", activation="gelu", use_bias=True)
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", use_bias=False)
# config.json key -> ModelConfig field; import and export read the same tables.
# fmt: off
GPT2_FIELDS = {
    "vocab_size": "vocab_size", "n_layer": "num_layers", "n_head": "num_heads",
    "n_embd": "embed_dim", "n_inner": "mlp_dim", "n_positions": "max_len",
    "layer_norm_epsilon": "norm_eps",
}
LLAMA_FIELDS = {
    "vocab_size": "vocab_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "hidden_size": "embed_dim", "intermediate_size": "mlp_dim",
    "max_position_embeddings": "max_len", "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
# fmt: on
# transformers' defaults for keys a config.json may leave out
HF_DEFAULTS = dict(layer_norm_epsilon=1e-5, rms_norm_eps=1e-6, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- configs


def model_config(hf: dict[str, Any], name: str) -> ModelConfig:
    """The gptjax ``ModelConfig`` of a Hugging Face ``config.json``; every field that changes
    the numbers is carried over, and what gptjax cannot represent is refused by name."""
    kind = hf["model_type"]
    if kind == "gpt2":
        _refuse(hf, "activation_function", lambda v: v in GELU_TANH, "gelu_new")
        _refuse(hf, "scale_attn_weights", lambda v: v in (None, True), "true")
        _refuse(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, "false")
        _refuse(hf, "add_cross_attention", lambda v: not v, "false")
    else:
        heads = hf["num_attention_heads"]
        _refuse(hf, "hidden_act", lambda v: v in (None, "silu"), "silu")
        _refuse(hf, "head_dim", lambda v: v in (None, hf["hidden_size"] // heads), "hidden/heads")
        _refuse(hf, "rope_scaling", lambda v: not v or v.get("rope_type") == "default", "null")
        for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
            _refuse(hf, flag, lambda v: not v, "false")
        _refuse(hf.get("rope_parameters") or {}, "rope_type", lambda v: v in (None, "default"), "")
    fields, fixed = (GPT2_FIELDS, GPT2) if kind == "gpt2" else (LLAMA_FIELDS, LLAMA)
    values = {ours: hf.get(theirs, HF_DEFAULTS.get(theirs)) for theirs, ours in fields.items()}
    if kind == "gpt2":
        values.update(mlp_dim=values["mlp_dim"] or 0, tie_embeddings=True)
    else:  # HF's rope_parameters (transformers 5) or the older top-level rope_theta
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kv = values["num_kv_heads"] or values["num_heads"]
        values.update(num_kv_heads=kv, rope_theta=float(theta), qkv_bias=kind == "qwen2")
    return ModelConfig(preset=name, **fixed, **values)


def _refuse(hf: dict, key: str, ok: Callable[[Any], bool], want: str) -> None:
    if not ok(hf.get(key)):
        raise GptjaxError(
            f"config.json has {key}={hf.get(key)!r}, which gptjax models do not implement "
            f"(they need {want}); this checkpoint cannot be imported"
        )


def architecture(m: ModelConfig) -> str:
    """The Hugging Face model type a gptjax model is, or a one-line refusal naming the field."""
    misses = {
        kind: [k for k, v in want.items() if getattr(m, k) != v]
        for kind, want in (("gpt2", GPT2), ("llama", LLAMA))
    }
    kind = min(misses, key=lambda k: len(misses[k]))  # the nearest architecture
    if misses[kind]:
        fields = ", ".join(f"model.{k}={getattr(m, k)!r}" for k in misses[kind])
        raise GptjaxError(
            f"{fields}: this variant has no Hugging Face architecture (GPT-2 needs "
            f"{_fmt(GPT2)}; LLaMA/Qwen2 need {_fmt(LLAMA)})"
        )
    if kind == "gpt2" and not m.tie_embeddings:
        raise GptjaxError(
            "model.tie_embeddings=False has no GPT-2 equivalent (GPT2LMHeadModel ties its head)"
        )
    if kind == "gpt2" and m.kv_heads != m.num_heads:
        raise GptjaxError("model.num_kv_heads has no GPT-2 equivalent (no grouped-query attention)")
    if m.lora_rank:
        raise GptjaxError("a model with LoRA adapters: `gptjax export` it first (that merges them)")
    return "qwen2" if kind == "llama" and m.qkv_bias else kind


def _fmt(want: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in want.items())


def hf_config(m: ModelConfig, bos_id: int, eos_id: int, dtype: str) -> dict[str, Any]:
    """``config.json`` for ``m`` (see ``architecture``)."""
    kind = architecture(m)
    fields = GPT2_FIELDS if kind == "gpt2" else LLAMA_FIELDS
    resolved = {"num_kv_heads": m.kv_heads, "mlp_dim": m.hidden_dim}  # 0 = the derived value
    out = {theirs: resolved.get(ours, getattr(m, ours)) for theirs, ours in fields.items()}
    out.update(model_type=kind, torch_dtype=dtype, bos_token_id=bos_id, eos_token_id=eos_id)
    if kind == "gpt2":
        dropout = {k: m.dropout_rate for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        gelu = dict(activation_function="gelu_new", tie_word_embeddings=True)
        return dict(architectures=["GPT2LMHeadModel"], **out, **gelu, **dropout)
    out.update(
        head_dim=m.head_dim,
        hidden_act="silu",
        rope_theta=m.rope_theta,
        rope_scaling=None,
        attention_dropout=m.dropout_rate,
    )
    if kind == "qwen2":
        window = dict(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
        return dict(architectures=["Qwen2ForCausalLM"], **out, **window)
    flags = dict(attention_bias=False, mlp_bias=False)
    return dict(architectures=["LlamaForCausalLM"], **out, **flags)


# ----------------------------------------------------------------------------- the name map


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the gptjax parameters it holds.

    ``paths``: one parameter, or (GPT-2's ``c_attn``) query, key and value, split along the last
    axis. ``transpose``: an ``nn.Linear`` ``[out, in]`` weight. ``vocab``: the embedding's rows
    (or, transposed, the head's columns) are padded to the model's padded vocabulary.
    """

    name: str
    paths: tuple[str, ...]
    transpose: bool = False
    vocab: bool = False


def layout(m: ModelConfig, kind: str) -> list[Tensor]:
    """Every tensor of a ``kind`` checkpoint of model ``m``, in the checkpoint's order."""
    if kind == "gpt2":
        return _gpt2_layout(m)
    out = [Tensor("model.embed_tokens.weight", ("embed/embedding",), vocab=True)]
    for i in range(m.num_layers):
        pre, h = f"model.layers.{i}.", f"h_{i}/"
        for theirs, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            attn = f"{pre}self_attn.{theirs}_proj"
            out.append(Tensor(f"{attn}.weight", (f"{h}attn/{ours}/kernel",), transpose=True))
            if m.qkv_bias and ours != "out":
                out.append(Tensor(f"{attn}.bias", (f"{h}attn/{ours}/bias",)))
        for name in ("gate", "up", "down"):
            mlp = f"{pre}mlp.{name}_proj.weight"
            out.append(Tensor(mlp, (f"{h}mlp/{name}/kernel",), transpose=True))
        out.append(Tensor(f"{pre}input_layernorm.weight", (f"{h}ln_1/scale",)))
        out.append(Tensor(f"{pre}post_attention_layernorm.weight", (f"{h}ln_2/scale",)))
    out.append(Tensor("model.norm.weight", ("ln_f/scale",)))
    if not m.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head/kernel",), transpose=True, vocab=True))
    return out


def _gpt2_layout(m: ModelConfig) -> list[Tensor]:
    out = [
        Tensor("transformer.wte.weight", ("embed/embedding",), vocab=True),
        Tensor("transformer.wpe.weight", ("pos_embed/embedding",)),
    ]
    for i in range(m.num_layers):
        pre, h = f"transformer.h.{i}.", f"h_{i}/"
        qkv = tuple(f"{h}attn/{n}/" for n in ("query", "key", "value"))
        for theirs, ours, norm in (("weight", "kernel", "scale"), ("bias", "bias", "bias")):
            out += [
                Tensor(f"{pre}ln_1.{theirs}", (f"{h}ln_1/{norm}",)),
                Tensor(f"{pre}attn.c_attn.{theirs}", tuple(p + ours for p in qkv)),
                Tensor(f"{pre}attn.c_proj.{theirs}", (f"{h}attn/out/{ours}",)),
                Tensor(f"{pre}ln_2.{theirs}", (f"{h}ln_2/{norm}",)),
                Tensor(f"{pre}mlp.c_fc.{theirs}", (f"{h}mlp/up/{ours}",)),
                Tensor(f"{pre}mlp.c_proj.{theirs}", (f"{h}mlp/down/{ours}",)),
            ]
    out.append(Tensor("transformer.ln_f.weight", ("ln_f/scale",)))
    out.append(Tensor("transformer.ln_f.bias", ("ln_f/bias",)))
    return out


def to_gptjax(t: Tensor, value: np.ndarray, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """``{path: array}`` from the Hugging Face tensor ``t``, each in its gptjax shape."""
    if t.transpose:
        value = value.T
    if t.vocab:  # vocabulary rows: axis 0 of the embedding, the last axis of the head
        axis = value.ndim - 1 if t.transpose else 0
        extra = shapes[t.paths[0]][axis] - value.shape[axis]
        if extra < 0:
            raise GptjaxError(
                f"{t.name} has {value.shape[axis]:,} vocabulary rows, more than config.json's "
                f"vocab_size; the checkpoint and config disagree"
            )
        value = np.pad(value, [(0, extra if a == axis else 0) for a in range(value.ndim)])
    parts = np.split(value, len(t.paths), axis=-1) if len(t.paths) > 1 else [value]
    out = {}
    for path, part in zip(t.paths, parts, strict=True):
        if part.size != np.prod(shapes[path]):
            raise GptjaxError(
                f"{t.name} has shape {value.shape}, which does not fit {path} {shapes[path]} of "
                f"the model that config.json describes; the checkpoint and config disagree"
            )
        out[path] = np.ascontiguousarray(part.reshape(shapes[path]))
    return out


def to_hf(t: Tensor, params: dict[str, np.ndarray], m: ModelConfig) -> np.ndarray:
    """The Hugging Face tensor ``t`` from flat gptjax ``params`` (inverse of ``to_gptjax``)."""
    value = np.concatenate([_matrix(p, params[p]) for p in t.paths], axis=-1)
    if t.vocab:
        value = value[:, : m.vocab_size] if t.transpose else value[: m.vocab_size]
    return np.ascontiguousarray(value.T if t.transpose else value)


def _matrix(path: str, p: np.ndarray) -> np.ndarray:
    """A gptjax parameter as Conv1D lays it out: kernels ``[in, out]`` (the attention output's
    ``[H, K, D]`` has two input axes, q/k/v's ``[D, H, K]`` two output axes), biases flat."""
    if path.endswith("/kernel"):
        n_in = kernel_in_axes(path.split("/"))
        return p.reshape(math.prod(p.shape[:n_in]), -1)
    return p.reshape(-1) if path.endswith("/bias") else p
