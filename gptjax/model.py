"""The decoder-only Transformer (GPT-2 and LLaMA flavours), in Flax Linen.

One ``ModelConfig`` picks every variant: learned positions (GPT-2) or RoPE, LayerNorm or
RMSNorm (always pre-norm, with a final norm before the head), GELU or SwiGLU MLP,
multi-head or grouped-query attention, tied or untied head, biases on or off.

Shape legend (also the einsum letters)::

    B batch   T length (queries)   S key length   D embed_dim   H num_heads
    G kv_heads   K head_dim   F hidden_dim (MLP)   V padded_vocab_size   L num_layers

Parameter tree (``params``; ``[...]`` are shapes, ``(...)`` the logical axis names)::

    embed/embedding          [V, D]     (vocab, embed)      token table; also the tied head
    pos_embed/embedding      [T_max, D] (None, embed)       only for position="learned"
    h_{i}/ln_1/scale         [D]        (embed,)            (+ bias [D]: layernorm and use_bias)
    h_{i}/attn/query/kernel  [D, H, K]  (embed, heads, kv)  (+ bias [H, K]: use_bias or qkv_bias)
    h_{i}/attn/key/kernel    [D, G, K]  (embed, heads, kv)  (+ bias [G, K])
    h_{i}/attn/value/kernel  [D, G, K]  (embed, heads, kv)  (+ bias [G, K])
    h_{i}/attn/out/kernel    [H, K, D]  (heads, kv, embed)  (+ bias [D])
    h_{i}/ln_2/scale         [D]        (embed,)
    h_{i}/mlp/gate/kernel    [D, F]     (embed, mlp)        only for activation="swiglu"
    h_{i}/mlp/up/kernel      [D, F]     (embed, mlp)        (+ bias [F])
    h_{i}/mlp/down/kernel    [F, D]     (mlp, embed)        (+ bias [D])
    ln_f/scale               [D]        (embed,)            (+ bias [D])
    lm_head/kernel           [D, V]     (embed, vocab)      only if tie_embeddings=False

Every kernel is a reshape of GPT-2's Conv1D weights (``c_attn`` splits into query/key/value
``[D, H, K]``; ``c_proj`` is ``[H*K, D]``), so ``gptjax/hf_convert.py`` converts GPT-2 weights
by reshape only (LLaMA's ``[out, in]`` ones by a transpose).
The head never has a bias (GPT-2, nanoGPT and LLaMA have none).

Boxed or plain parameters: ``model.init`` returns ``nn.LogicallyPartitioned`` boxes that carry
the logical names; ``model.apply`` accepts boxed and plain (``nn.meta.unbox``) trees alike.
Convention: boxes are used only to derive shardings (``nn.get_partition_spec`` of a
``jax.eval_shape``'d init gives every parameter's and optimizer moment's logical names, see
``gptjax/training/steps.py:plan_sharded``); the train state, checkpoints and sampling hold
plain arrays (``init_params``, ``nn.meta.unbox``). ``abstract_params`` gives the boxed shapes
without memory. Logical names (``gptjax/sharding.py`` maps them onto the mesh):
parameters use vocab, embed, heads, kv, mlp; activations use batch, length, act_embed, heads,
kv, mlp, vocab. The activation constraints act only inside ``jax.set_mesh(mesh)`` plus
``nn.logical_axis_rules(...)``; elsewhere they are no-ops, so the model runs plain on one device.

Numerics: parameters are float32; matmul inputs are cast to ``config.dtype``. The residual
stream stays float32 (as under torch autocast in nanoGPT); norm statistics, the attention
softmax and the logits are float32. A float32 model may take bfloat16 operands in its weight
matmuls and tied head over enough tokens, summing in float32 (``config.matmul_precision``,
``weight_matmul``).

KV cache (decoding, ``gptjax/inference/decode.py``): ``model.apply(variables, tokens, positions=...,
cache=cache)`` returns ``(logits, cache)``. The cache is a plain pytree passed explicitly (no
mutable Flax collection): per layer a pair ``(k, v)``, each a tuple of blocks ``[B*G, S_j, K]``
that together hold S = max_len slots (``cache_blocks``), from ``init_cache``. A call writes its
keys/values at slot = position (``positions [B, T]``; so a batch of prompts is right-padded,
row b's token t sitting in slot t) and its queries attend to every slot <= their position;
slots beyond are ignored, whatever they hold. The parameter tree is the same with or without a
cache. A model that decodes on CPU is faster from ``decode_layout(params)``
(``gptjax/inference/decode.py``), a copy of the tree with each kernel stored transposed
(``kernel_out_in [OUT, IN]``, which ``Linear`` reads instead of ``kernel``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError

Array = jax.Array
# Per layer (k, v), each a tuple of blocks [B*G, S_j, K] (row b*G + g, slots cache_blocks) in the
# compute dtype; see init_cache.
LayerCache = tuple[tuple[Array, ...], tuple[Array, ...]] | None
KVCache = tuple[LayerCache, ...]

# Logit given to padded vocabulary ids: finite (no inf-inf NaNs in a loss), but exp() of it is 0
# in float32, so sampling and softmax/cross-entropy equal those of an unpadded model.
PADDED_LOGIT = -1e9

# GPT-2 (Radford et al. 2019, OpenAI's model.py) draws token embeddings and matrices from
# N(0, 0.02) and the position table from N(0, 0.01); residual projections are scaled by
# 1/sqrt(2L) because each layer adds two of them to the residual stream.
INIT_STD = 0.02
POS_INIT_STD = 0.01


def _named(init: nn.initializers.Initializer, names: tuple) -> nn.initializers.Initializer:
    """An initializer whose parameter carries logical axis names (boxed by ``model.init``)."""
    return nn.with_logical_partitioning(init, names)


def _normal(std: float, names: tuple) -> nn.initializers.Initializer:
    return _named(nn.initializers.normal(std), names)


def _constrain(x: Array, names: tuple) -> Array:
    """Sharding hint by logical names; a no-op without a mesh and rules context."""
    return nn.with_logical_constraint(x, names)


def _dtype(config: ModelConfig) -> jnp.dtype:
    """The compute dtype; ``"auto"``: bfloat16 on accelerators, float32 on CPU."""
    if config.dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(config.dtype)


# /proc/cpuinfo flags of x86 CPUs with bfloat16 dot-product instructions (AMD Zen 4 and later,
# Intel Cooper Lake, Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_multiplies_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU has bfloat16 dot-product instructions (``BF16_CPU_FLAGS`` among
    the flags of Linux's ``/proc/cpuinfo``); False where that cannot be read."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def matmul_dtype(config: ModelConfig) -> jnp.dtype | None:
    """``model.matmul_precision`` for this backend, chosen here and nowhere else: bfloat16 where
    a float32 model's matmuls take bfloat16 operands (``bfloat16_matmul``), None where they run
    in the compute dtype. "auto" is bfloat16 on the CPU backend of a CPU that multiplies bfloat16
    natively (``cpu_multiplies_bfloat16``). There XLA:CPU runs ``[4096, 192] x [192, 768]`` at
    ~2x its float32 rate when the products are summed in float32 (2 cores of an AMD EPYC with
    AVX512-BF16: 195-326 against 89-163 GFLOP/s), but not when they are rounded to bfloat16
    too (75-142), which is why ``model.dtype`` stays float32 on CPU. Elsewhere "auto" is
    float32: without those instructions bfloat16 is emulated, and on GPU/TPU ``model.dtype`` is
    bfloat16 already.
    """
    if config.matmul_precision == "float32" or _dtype(config) != jnp.float32:
        return None
    if config.matmul_precision == "auto" and not (
        jax.default_backend() == "cpu" and cpu_multiplies_bfloat16()
    ):
        return None
    return jnp.dtype(jnp.bfloat16)


# The fewest rows (tokens) a weight matmul needs before it takes bfloat16 operands.
BF16_MIN_ROWS = 256


def bfloat16_operands(config: ModelConfig, rows: int) -> bool:
    """Whether a weight matmul over ``rows`` tokens (of the whole batch) takes bfloat16 operands:
    ``matmul_dtype`` says so and there are at least ``BF16_MIN_ROWS``. Fewer (decoding: one row
    per sequence) stay float32: XLA:CPU's bfloat16 kernels are slower there. The same 2 cores,
    chains of GPT-2-style layers, float32 time / bfloat16-operand time: D 768 at 1 / 8 / 32 /
    128 / 256 / 1024 rows 0.12 / 0.25 / 0.43 / 0.85 / 1.07 / 1.79; D 192 at 1 / 32 / 128 /
    1024 rows 0.65 / 1.22 / 1.52 / 1.70; D 128 and 384 at 256 rows 1.63 and 1.31.
    """
    return rows >= BF16_MIN_ROWS and matmul_dtype(config) is not None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bfloat16_matmul(x: Array, w: Array, w_contract: int = 0) -> Array:
    """``x [N, IN]`` times ``w`` over IN (``w [IN, OUT]`` for ``w_contract`` 0, ``[OUT, IN]``
    for 1) with both operands rounded to bfloat16 and the products summed in float32: float32
    ``[N, OUT]``. Its gradients are the same kind of matmul, of the cotangent rounded to
    bfloat16, and come back float32. (jax's own rule for ``jnp.dot`` of bfloat16 casts would
    multiply the float32 cotangent with a bfloat16 operand, which XLA:CPU converts and runs at
    the float32 rate, and round both gradients to bfloat16.)"""
    return _bfloat16_matmul_fwd(x, w, w_contract)[0]


def _bfloat16_matmul_fwd(x: Array, w: Array, w_contract: int) -> tuple[Array, tuple]:
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dims = (((1,), (w_contract,)), ((), ()))
    return jax.lax.dot_general(xb, wb, dims, preferred_element_type=jnp.float32), (xb, wb)


def _bfloat16_matmul_bwd(w_contract: int, saved: tuple, g: Array) -> tuple[Array, Array]:
    xb, wb = saved  # bfloat16: half the float32 activations kept for the backward pass
    gb = g.astype(jnp.bfloat16)  # [N, OUT]
    over = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
    dx = over(gb, wb, (((1,), (1 - w_contract,)), ((), ())))  # [N, IN]
    first, second = (xb, gb) if w_contract == 0 else (gb, xb)
    dw = over(first, second, (((0,), (0,)), ((), ())))  # [IN, OUT] or [OUT, IN], as w
    return dx, dw


bfloat16_matmul.defvjp(_bfloat16_matmul_fwd, _bfloat16_matmul_bwd)


def weight_matmul(
    config: ModelConfig, x: Array, w: Array, w_contract: int = 0, float32_out: bool = False
) -> Array:
    """``x [N, IN]`` (in the compute dtype) times a float32 weight ``w`` over IN (``[IN, OUT]``
    for ``w_contract`` 0, ``[OUT, IN]`` for 1), as ``bfloat16_operands`` says: bfloat16
    operands summed in float32, or in the compute dtype (accumulated and returned in float32
    with ``float32_out``). An ``[OUT, IN]`` weight over few rows is multiplied as
    ``out_rows_product`` says."""
    if bfloat16_operands(config, x.shape[0]):
        return bfloat16_matmul(x, w, w_contract)  # float32 = the compute dtype
    out = jnp.float32 if float32_out else None
    w = w.astype(x.dtype)
    if w_contract == 1 and out_rows_product(x.shape[0]):
        y = jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=out)
        # [OUT, N]; without the barrier XLA folds the transpose back into an [N, OUT] dot.
        return jax.lax.optimization_barrier(y).T
    dims = (((1,), (w_contract,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out)


# A Linear kernel stored [OUT, IN] (IN and OUT flattened): gptjax/inference/decode.py's
# decode_layout.
KERNEL_OUT_IN = "kernel_out_in"


def kernel_in_axes(names: Sequence[str]) -> int:
    """How many axes of the kernel at ``names`` (its key names from the tree's root, after any
    layers axis) are IN axes: two for the attention output projection ``out`` (``[H, K, D]``),
    one for every other kernel (the parameter tree in the module docstring)."""
    return 2 if names[-2] == "out" else 1


def out_rows_product(rows: int) -> bool:
    """Whether ``weight_matmul`` multiplies an ``[OUT, IN]`` weight by ``x [N, IN]`` as
    ``w @ x.T`` (``[OUT, N]``, then transposed) rather than ``x @ w.T``: on the CPU backend,
    below ``BF16_MIN_ROWS`` rows (decoding: one row per sequence), where XLA:CPU's kernels run
    the wide-output form faster. Same 2 cores, GPT-2's tied head ``[50257, 768]``, float32:
    1 / 8 / 32 / 64 rows 6.4 / 19.2 / 36.6 / 66.8 ms as ``x @ w.T``, 6.7 / 8.5 / 14.2 / 25.6
    ms as ``w @ x.T``. (A ``[IN, OUT]`` weight gains nothing from it: the transposed product
    of that layout is slower still.)"""
    return rows < BF16_MIN_ROWS and jax.default_backend() == "cpu"


def attention_implementation(config: ModelConfig) -> str:
    """``model.attention_impl`` for this backend, chosen here and nowhere else. "auto" is:

    * cudnn on an NVIDIA GPU computing in bfloat16 or float16 (cuDNN's fused attention);
    * einsum on CPU (``attend_einsum``): XLA:CPU runs it faster than
      ``jax.nn.dot_product_attention``'s xla path (whole train steps, A/B in one process, 2
      cores: 5-12% faster at the benchmark shapes; ``python benchmarks/train.py --attention``
      times the attention alone);
    * xla (``jax.nn.dot_product_attention``) elsewhere.
    """
    if config.attention_impl != "auto":
        return config.attention_impl
    backend = jax.default_backend()
    if backend == "cpu":
        return "einsum"
    fused = backend == "gpu" and _dtype(config) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if fused else "xla"


class Linear(nn.Module):
    """``x [..., *IN] @ kernel [*IN, *OUT] (+ bias [*OUT])`` in the compute dtype.

    Kernels keep their multi-axis shapes (``[D, H, K]``, ``[H, K, D]``: GPT-2 reshapes, and
    per-axis logical names), but the product runs as one 2-D matmul ``[B*T, IN] @ [IN, OUT]``:
    XLA:CPU takes a much slower path for dots over 3-D activations, in the backward pass
    especially (GELU MLP forward + backward at B32 T128 D192 on 2 cores: 191 ms as a 3-D
    einsum, 95 ms as a 2-D dot). In a ``decode_layout`` tree the kernel is
    ``kernel_out_in [OUT, IN]`` instead (2-D, transposed), multiplied as ``weight_matmul``
    multiplies an ``[OUT, IN]`` weight.
    """

    config: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple  # logical names of the kernel axes, IN then OUT
    std: float = INIT_STD
    bias: bool | None = None  # None = config.use_bias
    float32_out: bool = False  # accumulate and return float32 (the logits)
    lora: bool = True  # LoRA adapters when config.lora_rank > 0 (gptjax/lora.py)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        dtype = _dtype(self.config)
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = x.reshape(-1, n_in).astype(dtype)  # [N, IN]
        if self.has_variable("params", KERNEL_OUT_IN):  # decode_layout's [OUT, IN]
            w2, w_contract = self.get_variable("params", KERNEL_OUT_IN), 1
            if w2.shape != (n_out, n_in):
                raise GptjaxError(
                    f"{'/'.join(self.scope.path)}/{KERNEL_OUT_IN} has shape {w2.shape}, "
                    f"expected {(n_out, n_in)}; build it with decode_layout(params)"
                )
        else:
            shape = (*self.in_shape, *self.out_shape)
            kernel = self.param("kernel", _normal(self.std, self.names), shape, jnp.float32)
            w2, w_contract = kernel.reshape(n_in, n_out), 0
        y = weight_matmul(self.config, x2, w2, w_contract, self.float32_out)  # [N, OUT]
        if self.lora and self.config.lora_rank:
            y = y + self._adapter(x2, n_in, n_out)
        y = y.reshape(*lead, *self.out_shape)  # [..., *OUT]
        if self.config.use_bias if self.bias is None else self.bias:
            out_names = self.names[len(self.in_shape) :]
            bias = self.param(
                "bias", _named(nn.initializers.zeros, out_names), self.out_shape, jnp.float32
            )
            y = y + bias.astype(dtype)
        return y

    def _adapter(self, x: Array, n_in: int, n_out: int) -> Array:
        """LoRA: ``(alpha / r) * (x [N, IN] @ A [IN, r]) @ B [r, OUT]``. A is uniform in
        ±1/sqrt(IN) (PEFT's Kaiming init), B zero: the adapted layer starts as the base one."""
        c, r = self.config, self.config.lora_rank
        n = len(self.in_shape)
        in_names, out_names = self.names[:n], self.names[n:]
        bound = 1.0 / math.sqrt(n_in)
        a = self.param(
            "lora_a",
            _named(
                lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                (*in_names, None),
            ),
            (*self.in_shape, r),
            jnp.float32,
        )
        b = self.param(
            "lora_b", _named(nn.initializers.zeros, (None, *out_names)), (r, *self.out_shape)
        )
        dtype = x.dtype
        h = jnp.dot(x, a.reshape(n_in, r).astype(dtype))  # [N, r]
        return (c.lora_alpha / r) * jnp.dot(h, b.reshape(r, n_out).astype(dtype))


def _norm(config: ModelConfig, name: str) -> nn.Module:
    """Pre-norm layer; statistics in float32, output in the compute dtype (it feeds a matmul)."""
    scale_init = _named(nn.initializers.ones, ("embed",))
    if config.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=config.norm_eps,
            dtype=_dtype(config),
            scale_init=scale_init,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        dtype=_dtype(config),
        use_bias=config.use_bias,
        scale_init=scale_init,
        use_fast_variance=False,
        bias_init=_named(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding, "rotate-half" layout (GPT-NeoX, HF LLaMA).

    Feature pair ``(i, i + K/2)`` is rotated by ``positions * theta**(-2i/K)``. Computed in
    float32 and returned in ``x.dtype``.

    Args:
      x: ``[B, T, N, K]`` queries or keys (N = H or G).
      positions: ``[B, T]`` int positions.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [K/2]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, K/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, K/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, K/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def causal_segment_mask(segment_ids: Array) -> Array:
    """``[B, 1, T, T]`` bool: query t sees key s iff s <= t and both are in the same segment.

    The diagonal is always allowed, so no row is fully masked (padding, segment 0, only sees
    padding; its logits are ignored by the loss).
    """
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return (causal & same)[:, None]  # [B, 1, T, S]


def attend(q: Array, k: Array, v: Array, mask: Array | None, impl: str = "xla") -> Array:
    """Scaled dot-product attention: ``jax.nn.dot_product_attention`` (``impl`` "xla" or
    "cudnn", its ``implementation``) or ``attend_einsum`` (``impl`` "einsum").

    Args:
      q: ``[B, T, H, K]``; k, v: ``[B, S, G, K]`` with G dividing H (query head n uses kv head
        ``n // (H/G)``, jax's grouping).
      mask: ``[B, 1, T, S]`` bool (True = attend), or None for plain causal attention with
        T == S. A decoder with a cache must pass an explicit mask: jax's ``is_causal`` aligns
        the triangle to the top-left corner.

    Returns ``[B, T, H, K]``. jax's function has no dropout on the attention probabilities, so
    this model has none (GPT-2 had it); dropout acts on the residual branches instead.
    """
    if impl == "einsum":
        return attend_einsum(q, k, v, mask)
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


# Causal attention on CPU runs in query chunks of this many (attend_einsum).
CAUSAL_CHUNK = 64


def attend_einsum(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """``attend`` as two batched matmuls in a heads-major layout, for XLA:CPU.

    Same arguments, grouping and result as ``jax.nn.dot_product_attention``. What makes it
    faster there: q, k and v are transposed once to ``[B, G, N, T, K]`` (``[B, H, T, K]``
    when each head has its own k/v: a unit N axis costs XLA:CPU layout copies, 4-8% of the
    default experiment's step) so that both products are plain batched matmuls (jax's einsums
    over ``[B, T, H, K]`` make XLA:CPU transpose the ``[B, H, T, S]`` scores instead); the
    softmax is normalised after the value product (T·K divisions instead of T·S); its max is a
    constant to autodiff (any shift gives the same softmax), so the backward pass has no max to
    differentiate. Scores and the softmax are float32.

    With plain causal attention (no mask) over at least two chunks of ``CAUSAL_CHUNK`` queries,
    each chunk attends only to the keys up to its end, so the masked upper triangle is mostly
    never computed: at the small benchmark shape (T 256, four chunks) the attention's forward +
    backward took 71-74 ms per layer instead of 116-121, with identical outputs.
    """
    t = q.shape[1]
    c = CAUSAL_CHUNK
    if mask is None and k.shape[1] == t and t % c == 0 and t >= 2 * c:
        chunks = [
            _attend_einsum(q[:, i : i + c], k[:, : i + c], v[:, : i + c], None, offset=i)
            for i in range(0, t, c)
        ]
        return jnp.concatenate(chunks, axis=1)  # [B, T, H, K]
    return _attend_einsum(q, k, v, mask)


def _attend_einsum(q: Array, k: Array, v: Array, mask: Array | None, offset: int = 0) -> Array:
    """``attend_einsum`` over all of ``k, v``; without a mask, causal for queries at positions
    ``offset + arange(T)`` (``[B, 1, (1,) T, S]`` masks are the caller's)."""
    b, t, h, k_dim = q.shape
    s, g = k.shape[1], k.shape[2]
    q = (q * (1 / math.sqrt(k_dim))).transpose(0, 2, 1, 3)  # [B, H, T, K]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, S, K]
    qs = "bgtk"  # q as [B, H, T, K] = [B, G, T, K] when each head has its own k/v
    if g != h:  # query head n uses kv head n // N: [B, G, N, T, K]
        q, qs = q.reshape(b, g, h // g, t, k_dim), "bgntk"
        mask = None if mask is None else mask[:, :, None]  # [B, 1, 1, T, S]
    ss = qs[:-1] + "s"  # scores: [B, G, (N,) T, S]
    scores = jnp.einsum(f"{qs},bgsk->{ss}", q, k, preferred_element_type=jnp.float32)
    if mask is None:  # [T, S] causal: query t (at position offset + t) sees keys 0..offset + t
        mask = jnp.arange(s)[None, :] <= offset + jnp.arange(t)[:, None]
    scores = jnp.where(mask, scores, -jnp.inf)  # every row keeps its diagonal: finite max
    shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - shift)  # [B, G, (N,) T, S]
    y = jnp.einsum(
        f"{ss},bgsk->{qs}", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    y = (y / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)  # [B, G, (N,) T, K]
    return y.reshape(b, h, t, k_dim).transpose(0, 2, 1, 3)  # [B, T, H, K]


def cache_windows(cache_len: int) -> list[int]:
    """The cache prefixes attention may be limited to: S/8, S/4, S/2 (if >= 64) and S."""
    return sorted(
        {w for w in (cache_len // 8, cache_len // 4, cache_len // 2) if w >= 64} | {cache_len}
    )


def cache_blocks(cache_len: int) -> list[tuple[int, int]]:
    """The cache's blocks, slot ranges ``[lo, hi)`` between consecutive ``cache_windows``
    (for 1024 slots: 0-128, 128-256, 256-512, 512-1024); each is an array of its own."""
    windows = cache_windows(cache_len)
    return list(zip([0, *windows[:-1]], windows, strict=True))


def _block_starts(blocks: tuple[Array, ...]) -> list[int]:
    """Each cache block's first slot, then S: ``[0, S_0, S_0 + S_1, ..., S]``."""
    return [0, *np.cumsum([block.shape[1] for block in blocks]).tolist()]


def attend_cache(q: Array, k: tuple[Array, ...], v: tuple[Array, ...], positions: Array) -> Array:
    """Attention of ``q [B, T, H, K]`` at ``positions [B, T]`` over a cache whose k and v are
    tuples of blocks ``[B*G, S_j, K]`` (``cache_blocks``).

    The query at position p sees cache slots 0..p (slot = position). Only the blocks up to the
    one holding max(positions) are read (a ``lax.switch`` on a traced length, so shapes stay
    fixed): decoding need not stream the whole max_len cache for a short context (GPT-2 124M,
    batch 8: the cache is as big as the weights). The blocks are separate arrays because a
    prefix of one ``[B*G, S, K]`` array is strided: XLA:CPU copied it before every matmul, and
    at batch 32 those copies took a quarter of each decoding step.
    """
    branches = [functools.partial(_attend_blocks, n) for n in range(1, len(k) + 1)]
    if len(branches) == 1:
        return branches[0](q, k, v, positions)
    ends = jnp.asarray(_block_starts(k)[1:-1])  # [n - 1]
    index = jnp.sum(ends <= jnp.max(positions))  # blocks needed, minus one
    return jax.lax.switch(index, branches, q, k, v, positions)


def _attend_blocks(n: int, q: Array, k: tuple, v: tuple, positions: Array) -> Array:
    """``attend_cache`` over the first ``n`` blocks.

    The cache folds (B, G) into one leading axis so that both einsums are batched matmuls over
    each block as it lies. ``jax.nn.dot_product_attention`` wants ``[B, S, G, K]``, for which
    XLA:CPU transposes the whole cache on every decoding step; and with a separate B axis of
    size 1, XLA copied every layer's cache on every step. Same grouping as ``attend``: query
    head n reads kv head ``n // (H/G)``. Returns ``[B, T, H, K]``; the softmax is float32.
    """
    b, t, h, k_dim = q.shape
    k, v = k[:n], v[:n]  # blocks [B*G, S_j, K]
    starts = _block_starts(k)
    window = starts[-1]
    g = k[0].shape[0] // b
    heads_per_kv = h // g
    q = q.reshape(b, t, g, heads_per_kv, k_dim).transpose(0, 2, 3, 1, 4)  # [B, G, N, T, K]
    q = q.reshape(b * g, heads_per_kv * t, k_dim)  # [B*G, N*T, K]
    scores = jnp.concatenate(
        [jnp.einsum("xqk,xsk->xqs", q, kb, preferred_element_type=jnp.float32) for kb in k],
        axis=-1,
    )  # [B*G, N*T, W]
    slots = jnp.arange(window, dtype=positions.dtype)  # [W]
    mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, W]
    mask = jnp.broadcast_to(mask[:, :, None], (b, g, heads_per_kv, t, window))
    mask = mask.reshape(b * g, heads_per_kv * t, window)
    scores = jnp.where(mask, scores / math.sqrt(k_dim), -jnp.inf)  # [B*G, N*T, W]
    probs = jax.nn.softmax(scores, axis=-1).astype(v[0].dtype)  # never all -inf: slot p is seen
    y = sum(
        jnp.einsum("xqs,xsk->xqk", probs[..., lo:hi], vb, preferred_element_type=jnp.float32)
        for vb, lo, hi in zip(v, starts[:-1], starts[1:], strict=True)
    ).astype(v[0].dtype)  # [B*G, N*T, K]
    return y.reshape(b, g, heads_per_kv, t, k_dim).transpose(0, 3, 1, 2, 4).reshape(b, t, h, k_dim)


def _write_cache(cache: tuple[tuple, tuple], k: Array, v: Array, positions: Array):
    """Writes this call's ``k, v [B, T, G, K]`` into cache slots ``positions [B, T]`` (< S)."""
    b, _, g, _ = k.shape
    rows = (jnp.arange(b)[:, None] * g + jnp.arange(g))[:, :, None]  # [B, G, 1]: row b*G + g
    new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, T, K]
    written = ([], [])
    starts = _block_starts(cache[0])
    # (k block, v block), each [B*G, S_j, K], holding slots lo..hi-1
    for blocks, lo, hi in zip(zip(*cache, strict=True), starts[:-1], starts[1:], strict=True):
        inside = (positions >= lo) & (positions < hi)  # [B, T]
        cols = jnp.where(inside, positions - lo, hi - lo)[:, None, :]  # [B, 1, T]; S_j: dropped
        for out, block, x in zip(written, blocks, new, strict=True):
            out.append(block.at[rows, cols].set(x.astype(block.dtype), mode="drop"))
    return tuple(written[0]), tuple(written[1])


class Attention(nn.Module):
    """Causal (grouped-query) self-attention: ``[B, T, D] -> [B, T, D]``.

    With a layer ``cache`` (k, v: tuples of blocks ``[B*G, S_j, K]``) it writes this call's
    keys and values at slots ``positions`` and attends over the cache (``attend_cache``;
    ``mask`` is unused); returns ``(y, cache)``, cache None when none was given.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, mask: Array | None, cache: LayerCache = None
    ) -> tuple[Array, LayerCache]:
        c = self.config
        d, h, g, k_dim = c.embed_dim, c.num_heads, c.kv_heads, c.head_dim
        qkv = functools.partial(
            Linear, c, (d,), names=("embed", "heads", "kv"), bias=c.use_bias or c.qkv_bias
        )
        q = qkv((h, k_dim), name="query")(x)  # [B, T, H, K]
        k = qkv((g, k_dim), name="key")(x)  # [B, S, G, K]
        v = qkv((g, k_dim), name="value")(x)  # [B, S, G, K]
        if c.position == "rope":
            q = rope(q, positions, c.rope_theta)
            k = rope(k, positions, c.rope_theta)
        names = ("batch", "length", "heads", "kv")
        q, k, v = (_constrain(a, names) for a in (q, k, v))
        if cache is None:
            y = attend(q, k, v, mask, attention_implementation(c))  # [B, T, H, K]
        else:
            cache = _write_cache(cache, k, v, positions)
            y = attend_cache(q, *cache, positions)  # [B, T, H, K]
        y = _constrain(y, names)
        out_std = INIT_STD / math.sqrt(2 * c.num_layers)
        out = Linear(c, (h, k_dim), (d,), ("heads", "kv", "embed"), out_std, name="out")
        return out(y), cache  # [B, T, D]


class MLP(nn.Module):
    """GELU (tanh approximation, as GPT-2) or SwiGLU (LLaMA) MLP: ``[B, T, D] -> [B, T, D]``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        d, f = c.embed_dim, c.hidden_dim
        up = Linear(c, (d,), (f,), ("embed", "mlp"), name="up")(x)  # [B, T, F]
        if c.activation == "swiglu":
            gate = Linear(c, (d,), (f,), ("embed", "mlp"), name="gate")(x)  # [B, T, F]
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(up, approximate=True)
        hidden = _constrain(hidden, ("batch", "length", "mlp"))
        out_std = INIT_STD / math.sqrt(2 * c.num_layers)
        return Linear(c, (f,), (d,), ("mlp", "embed"), out_std, name="down")(hidden)  # [B, T, D]


class Block(nn.Module):
    """Pre-norm residual block: ``x + drop(attn(ln_1(x)))``, then ``x + drop(mlp(ln_2(x)))``
    (dropout on each residual branch, as GPT-2's resid_pdrop). ``(x, cache) -> (x, cache)``:
    the form ``nn.scan`` runs over layers."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, mask: Array | None, cache: LayerCache = None
    ) -> tuple[Array, LayerCache]:
        c = self.config
        drop = nn.Dropout(c.dropout_rate, deterministic=self.deterministic)
        y, cache = Attention(c, name="attn")(_norm(c, "ln_1")(x), positions, mask, cache)
        x = _constrain(x + drop(y), ("batch", "length", "act_embed"))
        x = x + drop(MLP(c, name="mlp")(_norm(c, "ln_2")(x)))
        return _constrain(x, ("batch", "length", "act_embed")), cache


class GPT(nn.Module):
    """The decoder-only Transformer; ``model.apply(variables, tokens) -> logits``."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        cache: KVCache | None = None,
        logits_at: Array | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Logits for every position.

        Args:
          tokens: ``[B, T]`` int32 token ids.
          positions: ``[B, T]`` int32, default ``arange(T)``; restart them per packed segment.
          segment_ids: ``[B, T]`` int32; attention never crosses segments (0 may mark padding).
            None = one segment per row.
          deterministic: False enables dropout (needs the ``"dropout"`` rng when
            ``dropout_rate > 0``).
          cache: a ``KVCache`` (``init_cache``) to decode with: this call's keys and values go
            to slots ``positions`` (which must be < max_len) and each query attends to the
            slots up to its position. Not with ``segment_ids``.
          logits_at: ``[B, N]`` int32 indices into T: only these positions reach the head, and
            the logits are ``[B, N, V]`` (a prefill needs each row's last prompt position only;
            GPT-2's head is ~30% of a short prompt's forward pass).

        Returns ``[B, T, V]`` float32 logits, V = ``padded_vocab_size``; padded ids get
        ``PADDED_LOGIT``. With a cache: ``(logits, updated cache)``.
        """
        c = self.config
        _check(c, tokens.shape[1], positions is None)
        if cache is not None and segment_ids is not None:
            raise GptjaxError(
                "segment_ids cannot be combined with a KV cache; decode one "
                "sequence per row (right-padded) instead"
            )
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        v = c.padded_vocab_size
        embed = nn.Embed(
            v, c.embed_dim, embedding_init=_normal(INIT_STD, ("vocab", "embed")), name="embed"
        )
        # Gather from a table whose embed axis is whole: the FSDP-sharded embed axis would
        # otherwise clash with the batch sharding of the result (XLA then replicates it all).
        table = _constrain(embed.embedding, ("vocab", None))  # [V, D]
        x = jnp.take(table, tokens, axis=0)  # [B, T, D] float32
        if c.position == "learned":
            pos_embed = nn.Embed(
                c.max_len,
                c.embed_dim,
                name="pos_embed",
                embedding_init=_normal(POS_INIT_STD, (None, "embed")),
            )
            pos_table = _constrain(pos_embed.embedding, (None, None))  # [T_max, D]
            x = x + jnp.take(pos_table, positions, axis=0)  # [B, T, D]
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        x = _constrain(x, ("batch", "length", "act_embed"))
        mask = None if segment_ids is None else causal_segment_mask(segment_ids)
        x, new_cache = _blocks(c, x, positions, mask, deterministic, cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, N, D]
            t = logits_at.shape[1]
        x = _norm(c, "ln_f")(x)  # [B, T, D] compute dtype
        if c.tie_embeddings:  # one 2-D matmul (see Linear), accumulated in float32
            # Contracting D of the [V, D] table directly: written as x @ table.T, XLA:CPU
            # fused ln_f and the transpose into a naive loop for one row (decoding; 4x slower).
            x2 = x.reshape(b * t, -1)  # [B*T, D] . [V, D] over D
            logits = weight_matmul(c, x2, embed.embedding, 1, float32_out=True)
            logits = logits.reshape(b, t, v)  # [B, T, V]
        else:
            logits = Linear(
                c,
                (c.embed_dim,),
                (v,),
                ("embed", "vocab"),
                bias=False,
                float32_out=True,
                lora=False,
                name="lm_head",
            )(x)  # [B, T, V]
        logits = logits.astype(jnp.float32)
        if v > c.vocab_size:
            real = jnp.arange(v) < c.vocab_size  # [V]
            logits = jnp.where(real, logits, jnp.float32(PADDED_LOGIT))
        logits = _constrain(logits, ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)


def _block_class(config: ModelConfig) -> type[nn.Module]:
    """``Block``, rematerialised in the backward pass as ``model.remat`` says."""
    if config.remat == "none":
        return Block
    policy = None if config.remat == "full" else getattr(jax.checkpoint_policies, config.remat)
    # prevent_cse is for remat outside a loop; under nn.scan it only blocks optimisations.
    return nn.remat(Block, policy=policy, prevent_cse=not config.scan_layers)


def _blocks(c: ModelConfig, x, positions, mask, deterministic: bool, cache):
    """The ``num_layers`` blocks: a Python loop (parameters ``h_0``, ``h_1``, ...; a cache is a
    tuple of per-layer pairs) or, with ``scan_layers``, one ``nn.scan`` (parameters ``h`` with
    a leading layers axis; a cache is one pair of ``[L, ...]`` arrays). Returns ``(x, cache)``.
    """
    block = _block_class(c)
    if c.scan_layers:
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, 0),  # positions, mask, the layer's cache
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(c, deterministic, name="h")(x, positions, mask, cache)
    new_cache = []
    for i in range(c.num_layers):
        layer_cache = None if cache is None else cache[i]
        x, layer_cache = block(c, deterministic, name=f"h_{i}")(x, positions, mask, layer_cache)
        new_cache.append(layer_cache)
    return x, tuple(new_cache)


def layer_axes(path: tuple) -> int:
    """1 for a parameter under ``scan_layers``' stacked ``h`` (a leading layers axis), else 0;
    ``path`` is a ``jax.tree_util`` key path from the parameter tree's root."""
    return int(bool(path) and getattr(path[0], "key", None) == "h")


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer parameters (``h_0`` ... ``h_{L-1}``) → the ``scan_layers`` tree (``h``, each
    leaf with a leading ``[L]`` axis)."""
    layers = [params[f"h_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return {**rest, "h": jax.tree.map(lambda *xs: np.stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
    """Inverse of ``stack_layers``."""
    if "h" not in params:
        return params
    num_layers = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    layers = {f"h_{i}": jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(num_layers)}
    return {**rest, **layers}


def _check(config: ModelConfig, length: int, default_positions: bool) -> None:
    if config.vocab_size < 1:
        raise GptjaxError(
            f"model.vocab_size={config.vocab_size} must be set before building "
            f"the model; use the tokenizer's vocabulary size"
        )
    if config.embed_dim % config.num_heads or config.num_heads % config.kv_heads:
        raise GptjaxError(
            f"model.num_heads={config.num_heads} must divide model.embed_dim="
            f"{config.embed_dim} and be a multiple of model.num_kv_heads="
            f"{config.num_kv_heads}; see config.validate()"
        )
    if config.position == "learned" and default_positions and length > config.max_len:
        raise GptjaxError(
            f"sequence length {length} exceeds model.max_len={config.max_len} of "
            f"the learned position table; shorten the input or raise max_len"
        )


def init_cache(config: ModelConfig, batch_size: int) -> KVCache:
    """An empty ``KVCache``: per layer (k, v), each a tuple of zero blocks ``[B*G, S_j, K]``
    (``cache_blocks`` of max_len), compute dtype; with ``scan_layers`` one pair whose blocks
    are ``[L, B*G, S_j, K]``."""
    lead = (config.num_layers,) if config.scan_layers else ()
    rows = batch_size * config.kv_heads

    def blocks():
        return tuple(
            jnp.zeros((*lead, rows, hi - lo, config.head_dim), _dtype(config))
            for lo, hi in cache_blocks(config.max_len)
        )

    if config.scan_layers:
        return (blocks(), blocks())
    return tuple((blocks(), blocks()) for _ in range(config.num_layers))


def _init_boxed(config: ModelConfig, rng: Array) -> Any:
    return GPT(config).init(rng, jnp.zeros((1, 1), jnp.int32))


def abstract_params(config: ModelConfig) -> Any:
    """``{"params": ...}`` of boxed ``jax.ShapeDtypeStruct`` (with logical names); no memory."""
    return jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))


def init_params(config: ModelConfig, rng: Array) -> Any:
    """Initialised variables ``{"params": ...}`` as plain float32 arrays, on one device."""
    return nn.meta.unbox(jax.jit(functools.partial(_init_boxed, config))(rng))


def count_params(config: ModelConfig) -> int:
    """Number of parameters (padded vocabulary rows included), from shapes only."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(abstract_params(config)))
    return sum(math.prod(leaf.shape) for leaf in leaves)
