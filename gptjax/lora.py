"""LoRA: low-rank adapters for fine-tuning with the pretrained weights frozen (Hu et al., 2021).

With ``model.lora_rank = r > 0`` every attention and MLP matrix ``W [IN, OUT]`` of the model
(query, key, value, out, up, gate, down — not the embeddings or the output head) gains two
parameters, ``lora_a [*IN, r]`` and ``lora_b [r, *OUT]``, and computes
``x @ W + (alpha / r) * (x @ A) @ B`` (``gptjax/model.py``, ``Linear``). B starts at zero, so
the adapted model starts as the pretrained one. ``gptjax finetune --model.lora_rank=r`` is
how a user asks for them.

Only the adapters train. The frozen weights get no gradient (``freeze``: a ``stop_gradient``,
so XLA does not even compute their weight gradients) and no optimizer state (``trainable``
labels them for ``optax.multi_transform`` in ``gptjax/training/steps.py``). ``merge`` folds
the adapters into the base weights — ``W + (alpha / r) A @ B`` — which ``gptjax export`` does,
so an export is a plain model again.

Trees here are the nested parameter dicts of ``GPT``, boxed (logical names) or plain.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from gptjax.config import Config, ModelConfig

ADAPTERS = ("lora_a", "lora_b")


def _is_adapter(path) -> bool:
    return any(getattr(k, "key", None) in ADAPTERS for k in path)


def trainable(params) -> Any:
    """The labels ``"trainable"`` (adapters) / ``"frozen"`` (everything else) per leaf; with no
    adapters in ``params`` everything is trainable."""
    has = any(_is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "trainable" if not has or _is_adapter(p) else "frozen", params
    )


def freeze(params) -> Any:
    """``params`` with a ``stop_gradient`` on every non-adapter leaf (a no-op without adapters)."""
    labels = trainable(params)
    return jax.tree.map(
        lambda x, label: x if label == "trainable" else jax.lax.stop_gradient(x), params, labels
    )


def split(params: dict) -> tuple[dict, dict]:
    """``(base, adapters)``: two nested dicts that ``combine`` puts back together. ``base`` has
    exactly the tree of the model without LoRA (what a pretraining checkpoint holds)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if key in ADAPTERS:
            adapters[key] = value
        elif isinstance(value, dict):
            b, a = split(value)
            base[key] = b
            if a:
                adapters[key] = a
        else:
            base[key] = value
    return base, adapters


def combine(base: dict, adapters: dict) -> dict:
    """Inverse of ``split``."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def merge(params: dict, model: ModelConfig) -> dict:
    """Plain (numpy) parameters with every adapter folded into its kernel:
    ``kernel + (alpha / r) * A @ B`` in float32, cast back to the kernel's dtype (with
    ``scan_layers``, layer by layer along the leading axis)."""
    scale = model.lora_alpha / model.lora_rank

    def walk(tree: dict) -> dict:
        out = {k: walk(v) for k, v in tree.items() if isinstance(v, dict)}
        plain = {k: v for k, v in tree.items() if not isinstance(v, dict)}
        if "lora_a" in plain:
            kernel = np.asarray(plain["kernel"])
            a = np.asarray(plain.pop("lora_a"), np.float32)
            b = np.asarray(plain.pop("lora_b"), np.float32)
            layers = a.ndim + b.ndim - 3 == kernel.ndim  # a [L, *IN, r], b [L, r, *OUT]
            lead = (kernel.shape[0],) if layers else ()
            r = a.shape[-1]
            delta = np.matmul(a.reshape(*lead, -1, r), b.reshape(*lead, r, -1))  # [.., IN, OUT]
            merged = kernel.astype(np.float32) + scale * delta.reshape(kernel.shape)
            plain["kernel"] = merged.astype(kernel.dtype)
        return {**out, **plain}

    return walk(params)


def without_lora(config: Config) -> Config:
    """``config`` for a merged (adapter-free) model."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, lora_rank=0))


def count_trainable(params) -> int:
    """Parameters that train: the adapters when there are any, else all of them."""
    labels = jax.tree.leaves(trainable(params))
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
    return sum(n for n, label in zip(sizes, labels, strict=True) if label == "trainable")
