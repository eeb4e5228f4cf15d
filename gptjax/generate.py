"""Sampling from a trained model.

``sample_logits`` applies temperature, top-k and top-p (nucleus) filtering to a ``[B, V]`` batch
of logits. ``generate`` extends a prompt token by token, recomputing the model over a fixed
``[1, max_len]`` window so the forward pass compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gptjax.model import GPT

NEG_INF = -1e30


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Draws one token per row of ``logits`` ``[B, V]`` → ``[B]`` int32.

    ``temperature=0`` is greedy (argmax). ``top_k > 0`` keeps the k most likely tokens;
    ``top_p < 1`` keeps the smallest set whose probability reaches ``top_p``.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus: first index where cum >= top_p.
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"))
def _next_token(params, window, length, rng, *, model: GPT, temperature, top_k, top_p):
    logits = model.apply({"params": params}, window)  # [1, T, V]
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)  # [1, V]
    return sample_logits(last, rng, temperature=temperature, top_k=top_k, top_p=top_p)[0]


def generate(
    params,
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """Returns ``prompt`` followed by up to ``max_new_tokens`` sampled tokens.

    When the text outgrows ``max_len`` the window slides, keeping the latest tokens. Stops
    early after emitting a token in ``stop_ids``.
    """
    max_len = model.config.max_len
    if not prompt:
        raise ValueError("the prompt is empty; pass at least one token (e.g. the BOS id)")
    if len(prompt) > max_len:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens but model.max_len={max_len}; shorten the prompt"
        )
    tokens = list(prompt)
    rng = jax.random.PRNGKey(seed)
    for i in range(max_new_tokens):
        context = tokens[-max_len:]
        window = np.zeros((1, max_len), np.int32)
        window[0, : len(context)] = context
        token = int(
            _next_token(
                params,
                window,
                len(context),
                jax.random.fold_in(rng, i),
                model=model,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
        )
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens


class Generator:
    """A trained model with its tokenizer: ``gen("prompt", max_new_tokens=50) -> str``."""

    def __init__(self, config, params, tokenizer):
        self.config = config
        self.model = GPT(config.model)
        self.params = params
        self.tokenizer = tokenizer

    def __call__(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str:
        """Returns ``prompt`` and its continuation, as text."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        tokens = generate(
            self.params,
            self.model,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        return self.tokenizer.decode(tokens)  # lossless: starts with the prompt


def load(workdir) -> Generator:
    """Loads the config, tokenizer and latest parameters of a training workdir."""
    from pathlib import Path

    from gptjax.checkpoint import restore_params
    from gptjax.loop import load_workdir_config
    from gptjax.model import abstract_params
    from gptjax.tokenizer import Tokenizer

    config = load_workdir_config(workdir)
    tokenizer = Tokenizer.load(Path(workdir) / "tokenizer.model")
    abstract = nn.meta.unbox(abstract_params(config.model))["params"]
    params = restore_params(workdir, abstract)
    return Generator(config, params, tokenizer)
