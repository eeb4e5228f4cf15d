"""Decoding token ids: prefill once, then a KV-cache decode loop compiled as one XLA program.

``generate_batch`` / ``generate``: token ids in, token ids out. A batch of prompts of different
lengths is **right-padded**: row b's token t sits at position t and in cache slot t
(``gptjax/model.py``), so no row pays for another's padding and every row may grow to
``max_len``. The prompts are padded to a bucket (16, 32, 64, then multiples of 64, at most
``max_len``; ``prompt_bucket``) and prefilled in one forward pass; the cache always holds
``max_len`` slots.
Decoding is a ``lax.while_loop`` with fixed shapes whose step count is an argument, so nothing
recompiles per token, per prompt length within a bucket, or per ``max_new_tokens``; temperature
and top-p are traced too (only greedy-or-not, top-k and top-p-or-not are static). The loop runs
in chunks when there is a host-side ``on_token`` hook (streaming, stop strings): each chunk (one
token at first, then about ``STREAM_INTERVAL_S`` of decoding) hands its tokens to the hook in
order as soon as it is done. Text in and out is ``gptjax/inference/generator.py``.

A row stops after a stop id (end-of-turn, EOS; the stop token is kept in its ids), when the
hook says so, after ``max_new_tokens``, or when prompt + continuation fill ``max_len``: no
sliding window (a chat caller trims history instead). Randomness: row i samples with the key
``seed + i`` folded with the step, so row i of a batch draws exactly what that prompt draws
alone with ``seed=seed + i``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gptjax.errors import GptjaxError
from gptjax.inference.sampling import NEG_INF, SAMPLING, Sampling, sample_logits
from gptjax.model import (
    GPT,
    KERNEL_OUT_IN,
    KVCache,
    init_cache,
    kernel_in_axes,
    layer_axes,
    out_rows_product,
)

# Prompts are padded to a bucket, one prefill compile per bucket: a power of two from
# MIN_PROMPT_BUCKET up to PROMPT_BUCKET, then multiples of PROMPT_BUCKET. Short prompts then pay
# for at most twice their length: GPT-2 124M, 32 prompts of 8 tokens, prefilled 4.4 s as 64
# tokens each, which was a quarter of generating 128 tokens.
MIN_PROMPT_BUCKET = 16
PROMPT_BUCKET = 64
# With a host hook (streaming, stop strings) decoding runs in chunks, each sized from the last
# one's speed to take about STREAM_INTERVAL_S (at most MAX_CHUNK tokens): a compiled call
# costs ~0.2 ms on top of its steps, so one token per call would halve a small model's speed.
STREAM_INTERVAL_S = 0.05
MAX_CHUNK = 64


class DecodeState(NamedTuple):
    """What the decode loop carries; every shape is fixed by (B, max_len)."""

    cache: KVCache  # per layer (k, v), each a tuple of blocks [B*G, S_j, K]
    tokens: jax.Array  # [B, S] int32: prompt then continuation, right-padded with 0
    lengths: jax.Array  # [B] int32: valid tokens per row
    done: jax.Array  # [B] bool
    logits: jax.Array  # [B, V] float32: the next token's logits
    step: jax.Array  # [] int32: tokens decoded so far (the rng is folded with it)


@functools.partial(jax.jit, static_argnames="model")
def _prefill(params, prompts: jax.Array, lengths: jax.Array, *, model: GPT) -> DecodeState:
    """Runs the right-padded ``prompts [B, P]`` through the model once, filling the cache."""
    b, p = prompts.shape
    s = model.config.max_len
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    cache = init_cache(model.config, b)
    logits, cache = model.apply(
        {"params": params},
        prompts,
        positions=positions,
        cache=cache,
        logits_at=(lengths - 1)[:, None],
    )  # [B, 1, V]: each row's last prompt position
    last = logits[:, 0]  # [B, V]
    tokens = jnp.zeros((b, s), jnp.int32).at[:, :p].set(prompts)  # [B, S]
    return DecodeState(cache, tokens, lengths, lengths >= s, last, jnp.zeros((), jnp.int32))


@functools.partial(
    jax.jit,
    static_argnames=("model", "greedy", "top_k", "nucleus"),
    donate_argnames="state",
)
def _decode(
    params,
    state: DecodeState,
    num_steps: jax.Array,
    ended: jax.Array,
    seeds: jax.Array,
    is_stop: jax.Array,
    vocab_limit: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    model: GPT,
    greedy: bool,
    top_k: int,
    nucleus: bool,
) -> DecodeState:
    """Decodes up to ``num_steps`` tokens per live row (fewer if every row is done).

    ``ended [B]`` bool: rows the host has ended; ``seeds [B]`` int32: per-row rng seeds;
    ``is_stop [V]`` bool: ids that end a row; ``vocab_limit`` []: ids from it on are never
    drawn (the model's vocabulary may be larger than its tokenizer's).
    """
    s = model.config.max_len
    rows = jnp.arange(state.tokens.shape[0])  # [B]
    keys = jax.vmap(jax.random.key)(seeds)  # [B]
    state = state._replace(done=state.done | ended)

    def step(carry):
        st, i = carry
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, st.step)  # [B]
        allowed = jnp.arange(st.logits.shape[-1]) < vocab_limit  # [V]
        token = sample_logits(
            jnp.where(allowed, st.logits, NEG_INF),
            step_keys,
            temperature=0 if greedy else temperature,
            top_k=top_k,
            top_p=top_p if nucleus else 1.0,
        )  # [B]
        live = ~st.done
        slot = jnp.minimum(st.lengths, s - 1)  # finished rows decode garbage at a valid slot
        tokens = st.tokens.at[rows, jnp.where(live, slot, s)].set(token, mode="drop")
        logits, cache = model.apply(
            {"params": params}, token[:, None], positions=slot[:, None], cache=st.cache
        )  # [B, 1, V]
        lengths = st.lengths + live
        done = st.done | (live & (is_stop[token] | (lengths >= s)))
        return DecodeState(cache, tokens, lengths, done, logits[:, 0], st.step + 1), i + 1

    def more(carry):
        st, i = carry
        return (i < num_steps) & ~jnp.all(st.done)

    return jax.lax.while_loop(more, step, (state, jnp.zeros((), jnp.int32)))[0]


def decode_layout(params: dict) -> dict:
    """``params`` (the plain tree, ``{"params": ...}``'s inside) laid out for decoding: on the
    CPU backend every ``Linear``'s ``kernel [*IN, *OUT]`` becomes ``kernel_out_in [OUT, IN]``,
    a transposed copy that ``Linear`` multiplies as ``w @ x.T`` over few rows
    (``model.out_rows_product``). XLA cannot get there from an ``[IN, OUT]`` argument: a
    transpose inside the compiled call is folded back into the slower form. Same 2 cores,
    float32: GPT-2's 48 block matmuls at 1 / 8 / 32 rows take 16.8 / 22.8 / 47.8 ms from
    ``[IN, OUT]`` kernels and 13.1 / 17.8 / 32.2 ms from ``[OUT, IN]`` ones; a GPT-2 124M
    decoding step at batch 8 / 32 43.0 -> 35.4 / 126 -> 106 ms (medians of 5, alternating).

    Elsewhere (GPU, TPU) ``params`` is returned unchanged. Idempotent. ``model.apply`` takes
    either tree and computes the same; training and checkpoints keep the standard one, so build
    this for a model that will decode (``Generator`` does, once). It copies every kernel: drop
    the standard tree if nothing else needs it.
    """
    if not out_rows_product(1):  # not on CPU: the standard layout is the fast one
        return params
    flat = traverse_util.flatten_dict(params)
    kernels = {names: leaf for names, leaf in flat.items() if names[-1] == "kernel"}
    if not kernels:
        return params
    specs = tuple(
        (layer_axes(tuple(map(jax.tree_util.DictKey, names))), kernel_in_axes(names))
        for names in kernels
    )
    for names, matrix in zip(kernels, _kernels_out_in(list(kernels.values()), specs), strict=True):
        del flat[names]
        flat[(*names[:-1], KERNEL_OUT_IN)] = matrix
    return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnums=1)
def _kernels_out_in(kernels: list, specs: tuple) -> list:
    """Each ``[(L,) *IN, *OUT]`` kernel as ``[(L,) OUT, IN]``; ``specs``: per kernel (number of
    leading layer axes, number of IN axes)."""
    out = []
    for kernel, (lead, n_in) in zip(kernels, specs, strict=True):
        shape = kernel.shape
        ins, outs = shape[lead : lead + n_in], shape[lead + n_in :]
        matrix = kernel.reshape(*shape[:lead], math.prod(ins), math.prod(outs))
        out.append(jnp.swapaxes(matrix, -1, -2))
    return out


def _check_args(prompts, max_len: int, max_new_tokens: int, temperature, top_k, top_p) -> None:
    if not prompts:
        raise GptjaxError("no prompts given; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        if not len(p):
            raise GptjaxError(f"prompt {i} is empty; pass at least one token (e.g. the BOS id)")
        if len(p) > max_len:
            raise GptjaxError(
                f"prompt {i} has {len(p)} tokens but model.max_len={max_len}; "
                f"shorten the prompt (or trim the chat history) to at most {max_len} tokens"
            )
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise GptjaxError(
            f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; "
            f"got {max_new_tokens}, {temperature}, {top_k}, {top_p}"
        )


def prompt_bucket(longest: int, max_len: int) -> int:
    """The padded prompt length for a longest prompt of ``longest`` tokens: the next power of
    two from ``MIN_PROMPT_BUCKET`` up to ``PROMPT_BUCKET``, then the next multiple of
    ``PROMPT_BUCKET``; at most ``max_len``."""
    if longest <= PROMPT_BUCKET:
        bucket = max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length())
    else:
        bucket = PROMPT_BUCKET * -(-longest // PROMPT_BUCKET)
    return min(max_len, bucket)


def pad_prompts(prompts: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts with 0 to a bucket: ``(ids [B, P] int32, lengths [B] int32)``.

    P is ``prompt_bucket`` of the longest prompt.
    """
    lengths = np.array([len(p) for p in prompts], np.int32)
    bucket = prompt_bucket(int(lengths.max()), max_len)
    padded = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    return padded, lengths


def generate_batch(
    params,
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = frozenset(),
    vocab_limit: int | None = None,
    on_token: Callable[[int, int], Any] | None = None,
    stream_interval: float = STREAM_INTERVAL_S,
    **sampling: Unpack[Sampling],
) -> list[list[int]]:
    """Returns each prompt followed by its up to ``max_new_tokens`` sampled tokens.

    Args:
      params: the model's ``params`` tree (plain arrays), standard or, faster on CPU,
        ``decode_layout``'s (``Generator`` passes that one).
      prompts: B lists of token ids, of any lengths in 1..max_len.
      stop_ids: ids that end a row (kept as its last token).
      vocab_limit: only ids below it are drawn (default: ``model.vocab_size``).
      on_token: ``on_token(row, token)`` is called for every new token, step by step, in
        order; returning True ends that row after this token. Decoding then runs in chunks
        of about ``stream_interval`` seconds (the first is one token); without a hook, in
        one compiled call.
      sampling: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed`` (row i samples
        with ``seed + i``, see the module docstring); defaults in ``sampling.SAMPLING``.
    """
    c, opt = model.config, {**SAMPLING, **sampling}
    temperature, top_p = opt["temperature"], opt["top_p"]
    _check_args(prompts, c.max_len, max_new_tokens, temperature, opt["top_k"], top_p)
    b, s = len(prompts), c.max_len
    padded, lengths = pad_prompts(prompts, s)
    if max_new_tokens == 0 or lengths.min() == s:
        return [list(p) for p in prompts]
    is_stop = np.zeros(c.padded_vocab_size, bool)
    is_stop[[t for t in stop_ids if 0 <= t < c.padded_vocab_size]] = True
    state = _prefill(params, padded, lengths, model=model)
    decode = functools.partial(
        _decode,
        params,
        seeds=(opt["seed"] + np.arange(b)).astype(np.int32),
        is_stop=is_stop,
        vocab_limit=np.int32(vocab_limit or c.vocab_size),
        temperature=np.float32(temperature),
        top_p=np.float32(top_p),
        model=model,
        greedy=temperature == 0,
        top_k=opt["top_k"],
        nucleus=top_p < 1.0,
    )
    cut = np.full(b, s, np.int32)  # rows the hook ended: their length at that moment
    produced, done, chunk = 0, lengths >= s, 1
    while produced < max_new_tokens and not done.all():  # at least once: see the check above
        n = max_new_tokens - produced
        n = n if on_token is None else min(n, chunk)
        start = time.perf_counter()
        state = decode(state, np.int32(n), cut < s)
        produced += n
        tokens, after, done = jax.device_get((state.tokens, state.lengths, state.done))
        if on_token is not None:
            per_token = (time.perf_counter() - start) / n
            chunk = int(np.clip(stream_interval / per_token, 1, MAX_CHUNK))
            done = done | _feed(on_token, tokens, lengths, after, cut)
        lengths = after
    lengths = np.minimum(lengths, cut)
    return [tokens[i, : lengths[i]].tolist() for i in range(b)]


def _feed(on_token, tokens: np.ndarray, before: np.ndarray, after, cut: np.ndarray) -> np.ndarray:
    """Hands the new tokens ``tokens[b, before[b]:after[b]]`` to the hook step by step;
    records in ``cut`` where rows end and returns ``[B]`` bool: the rows that have ended."""
    for j in range(int((after - before).max(initial=0))):
        for row in np.flatnonzero((before + j < after) & (cut == tokens.shape[1])):
            if on_token(int(row), int(tokens[row, before[row] + j])):
                cut[row] = before[row] + j + 1
    return cut < tokens.shape[1]


def generate(
    params,
    model: GPT,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = frozenset(),
    on_token: Callable[[int], Any] | None = None,
    **sampling: Unpack[Sampling],
) -> list[int]:
    """``generate_batch`` for one prompt: ids ``[N]`` → ids ``[N + n]``, n <= max_new_tokens.

    ``on_token(token)`` (optional) sees each new token in order; True ends generation.
    """
    hook = None if on_token is None else (lambda _, token: on_token(token))
    batch = generate_batch(
        params,
        model,
        [prompt],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        on_token=hook,
        **sampling,
    )
    return batch[0]
