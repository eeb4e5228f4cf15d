"""Tests for gptjax/model.py: parity with a float64 NumPy reference, masking, counts, numerics."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gptjax import model as M
from gptjax.config import MODEL_PRESETS, MeshConfig, ModelConfig

# Small configs; vocab 100 is padded to 128 rows.
GPT2_STYLE = ModelConfig(
    vocab_size=100, num_layers=2, num_heads=4, embed_dim=64, max_len=32, position="learned",
    norm="layernorm", activation="gelu", tie_embeddings=True, use_bias=True,
)  # fmt: skip
LLAMA_STYLE = ModelConfig(
    vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_len=32,
    position="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False, use_bias=False,
)  # fmt: skip
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}
ALLOWED_PARAM_NAMES = {"vocab", "embed", "heads", "kv", "mlp", None}


def _tokens(shape, seed=0, vocab=100):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.cache
def _random_params(config, seed=0):
    """Random float32 params of the model's shapes (NumPy, no compile): biases and norm
    scales are not trivially 0 and 1, and logits come out of order one."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(M.abstract_params(config))

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1.0 + noise if is_scale else noise, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnames=("config", "deterministic"))
def _forward(
    config, params, tokens, positions=None, segment_ids=None, deterministic=True, rngs=None
):
    """Jitted ``GPT(config).apply`` (eager dispatch of every op is slow on CPU)."""
    return M.GPT(config).apply(
        params,
        tokens,
        positions=positions,
        segment_ids=segment_ids,
        deterministic=deterministic,
        rngs=rngs,
    )


# ---------------------------------------------------------------- float64 NumPy reference


def _ref_norm(c, x, p):
    if c.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + c.norm_eps) * p["scale"]
    return y + p["bias"] if c.use_bias else y


def _ref_dense(x, p, spec):
    y = np.einsum(spec, x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def _ref_rope(x, pos, theta):
    """Rotate-half RoPE via complex numbers: pair (i, i + K/2) is one complex feature."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[:, :, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def _ref_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _ref_attention(c, x, p, pos):
    q = _ref_dense(x, p["query"], "btd,dhk->bthk")
    k = _ref_dense(x, p["key"], "btd,dhk->bthk")
    v = _ref_dense(x, p["value"], "btd,dhk->bthk")
    if c.position == "rope":
        q, k = _ref_rope(q, pos, c.rope_theta), _ref_rope(k, pos, c.rope_theta)
    group = c.num_heads // c.kv_heads  # query head n reads kv head n // group
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(c.head_dim)
    t = x.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhts,bshk->bthk", a, v)
    return _ref_dense(y, p["out"], "bthk,hkd->btd")


def _ref_mlp(c, x, p):
    up = _ref_dense(x, p["up"], "btd,df->btf")
    if c.activation == "swiglu":
        gate = _ref_dense(x, p["gate"], "btd,df->btf")
        h = gate / (1 + np.exp(-gate)) * up
    else:
        h = _ref_gelu(up)
    return _ref_dense(h, p["down"], "btf,fd->btd")


def reference_forward(c, params, tokens):
    """Independent float64 forward pass from the same parameter tree."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    tokens = np.asarray(tokens)
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    x = p["embed"]["embedding"][tokens]
    if c.position == "learned":
        x = x + p["pos_embed"]["embedding"][pos]
    for i in range(c.num_layers):
        block = p[f"h_{i}"]
        x = x + _ref_attention(c, _ref_norm(c, x, block["ln_1"]), block["attn"], pos)
        x = x + _ref_mlp(c, _ref_norm(c, x, block["ln_2"]), block["mlp"])
    x = _ref_norm(c, x, p["ln_f"])
    head = p["embed"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]  # [D, V]
    logits = x @ head
    logits[..., c.vocab_size :] = M.PADDED_LOGIT
    return logits


@pytest.mark.parametrize("style", STYLES)
def test_matches_float64_numpy_reference(style):
    c = STYLES[style]
    params = _random_params(c)
    tokens = _tokens((2, 16))
    logits = _forward(c, params, tokens)
    assert logits.shape == (2, 16, 128) and logits.dtype == jnp.float32
    want = reference_forward(c, params, tokens)
    assert np.abs(want[..., :100]).max() > 0.5  # the comparison is not of near-zeros
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("style", STYLES)
def test_future_tokens_never_change_earlier_logits(style):
    c = STYLES[style]
    params = _random_params(c)
    tokens = _tokens((2, 16))  # one shape in most tests: fewer compiles
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 100)
    a, b = _forward(c, params, tokens), _forward(c, params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


@pytest.mark.parametrize("style", STYLES)
def test_packed_segments_equal_separate_sequences(style):
    c = STYLES[style]
    params = _random_params(c)
    first, second = _tokens((1, 5), seed=1), _tokens((1, 7), seed=2)
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    out = _forward(c, params, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(out[:, :5], _forward(c, params, first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], _forward(c, params, second), rtol=1e-5, atol=1e-5)
    unpacked = _forward(c, params, packed)  # without segment ids the second part sees the first
    assert np.abs(np.asarray(unpacked[:, 5:] - out[:, 5:])).max() > 1e-3


# ---------------------------------------------------------------- parameter counts


def _expected_count(c):
    """Parameter count from the architecture, written out by hand."""
    d, f, v, k = c.embed_dim, c.hidden_dim, c.padded_vocab_size, c.head_dim
    b = int(c.use_bias)
    norm = d * (2 if c.norm == "layernorm" and c.use_bias else 1)
    attn = d * (c.num_heads + 2 * c.kv_heads) * k + c.num_heads * k * d
    attn += b * ((c.num_heads + 2 * c.kv_heads) * k + d)
    mats = 3 if c.activation == "swiglu" else 2
    mlp = mats * d * f + b * ((mats - 1) * f + d)
    total = v * d + (c.max_len * d if c.position == "learned" else 0)
    total += c.num_layers * (2 * norm + attn + mlp) + norm
    return total + (0 if c.tie_embeddings else d * v)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_count_params_of_every_preset(name):
    c = MODEL_PRESETS[name]
    if c.vocab_size == 0:  # filled in from the tokenizer at run time
        c = dataclasses.replace(c, vocab_size=2048)
    assert M.count_params(c) == _expected_count(c)


def test_gpt2_parameter_counts_match_hugging_face():
    gpt2 = MODEL_PRESETS["gpt2"]
    assert M.count_params(dataclasses.replace(gpt2, vocab_multiple=1)) == 124_439_808
    assert gpt2.padded_vocab_size == 50304
    assert M.count_params(gpt2) == 124_439_808 + 47 * 768
    hf_counts = {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, count in hf_counts.items():
        unpadded = dataclasses.replace(MODEL_PRESETS[name], vocab_multiple=1)
        assert _expected_count(unpadded) == count, name  # counts of the same tree, checked above


def test_param_shapes_reshape_to_gpt2_layout():
    c = GPT2_STYLE
    shapes = jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(M.abstract_params(c)))["params"]
    d, h, k = 64, 4, 16
    attn, mlp = shapes["h_0"]["attn"], shapes["h_0"]["mlp"]
    assert attn["query"] == {"kernel": (d, h, k), "bias": (h, k)}
    assert attn["out"] == {"kernel": (h, k, d), "bias": (d,)}
    assert mlp["up"] == {"kernel": (d, 4 * d), "bias": (4 * d,)}
    assert mlp["down"] == {"kernel": (4 * d, d), "bias": (d,)}
    assert shapes["embed"]["embedding"] == (128, d)
    assert shapes["pos_embed"]["embedding"] == (32, d)
    assert shapes["ln_f"] == {"scale": (d,), "bias": (d,)}
    assert "lm_head" not in shapes
    llama = nn.meta.unbox(M.abstract_params(LLAMA_STYLE))["params"]
    assert llama["h_0"]["attn"]["key"]["kernel"].shape == (d, 2, k)
    assert set(llama["h_0"]["mlp"]) == {"gate", "up", "down"}
    assert "bias" not in llama["ln_f"] and "pos_embed" not in llama
    assert llama["lm_head"]["kernel"].shape == (d, 128)


def test_gpt2_initialisation():
    c = dataclasses.replace(GPT2_STYLE, num_layers=1)  # init compiles slowly on CPU
    variables = M.init_params(c, jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)  # unboxed
    p = variables["params"]
    block = p["h_0"]
    np.testing.assert_allclose(np.std(p["embed"]["embedding"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["pos_embed"]["embedding"]), 0.01, rtol=0.05)
    np.testing.assert_allclose(np.std(block["attn"]["query"]["kernel"]), 0.02, rtol=0.05)
    residual_std = 0.02 / math.sqrt(2 * 1)
    np.testing.assert_allclose(np.std(block["attn"]["out"]["kernel"]), residual_std, rtol=0.05)
    np.testing.assert_allclose(np.std(block["mlp"]["down"]["kernel"]), residual_std, rtol=0.05)
    assert np.all(block["ln_1"]["scale"] == 1) and np.all(block["ln_1"]["bias"] == 0)
    assert np.all(block["mlp"]["up"]["bias"] == 0)


# ---------------------------------------------------------------- vocabulary padding


def test_padded_logits_leave_the_loss_unchanged():
    c = GPT2_STYLE
    tokens = _tokens((2, 16))
    logits = _forward(c, _random_params(c), tokens)
    assert np.all(np.asarray(logits[..., 100:]) == M.PADDED_LOGIT)
    probs = jax.nn.softmax(logits)
    assert np.all(np.asarray(probs[..., 100:]) == 0)  # never sampled
    targets = _tokens((2, 16), seed=3)
    padded = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
    unpadded = -jnp.take_along_axis(jax.nn.log_softmax(logits[..., :100]), targets[..., None], -1)
    np.testing.assert_allclose(padded, unpadded, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("style", STYLES)
def test_bfloat16_compute_is_close_to_float32(style):
    c32 = STYLES[style]
    c16 = dataclasses.replace(c32, dtype="bfloat16")
    params = _random_params(c32)
    shapes16 = nn.meta.unbox(M.abstract_params(c16))
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes16)} == {jnp.dtype(jnp.float32)}
    tokens = _tokens((2, 16))
    out32 = np.asarray(_forward(c32, params, tokens))[..., :100]
    out16 = _forward(c16, params, tokens)
    assert out16.dtype == jnp.float32
    out16 = np.asarray(out16)[..., :100]
    scale = np.abs(out32).max()
    assert np.abs(out16 - out32).max() < 0.05 * scale
    assert np.mean(out16.argmax(-1) == out32.argmax(-1)) >= 0.9


def _bf16(x) -> np.ndarray:
    """x rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("w_contract", [0, 1], ids=["w-in-out", "w-out-in"])
def test_bfloat16_matmul_against_float64(w_contract):
    """Forward and both gradients: the float64 products of the operands (and cotangent) rounded
    to bfloat16, summed to float32 accuracy; float32 in and out."""
    rng = np.random.default_rng(0)
    n, d_in, d_out = 24, 40, 56
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w_io = rng.standard_normal((d_in, d_out)).astype(np.float32)
    w = w_io if w_contract == 0 else np.ascontiguousarray(w_io.T)
    g = rng.standard_normal((n, d_out)).astype(np.float32)
    y, vjp = jax.vjp(lambda a, b: M.bfloat16_matmul(a, b, w_contract), x, w)
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    xb, wb, gb = _bf16(x), _bf16(w_io), _bf16(g)
    np.testing.assert_allclose(y, xb @ wb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gb @ wb.T, rtol=1e-5, atol=1e-5)
    dw_io = xb.T @ gb
    np.testing.assert_allclose(dw, dw_io if w_contract == 0 else dw_io.T, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y) - x.astype(np.float64) @ w_io).max() > 1e-3  # it did round


@pytest.mark.parametrize("w_contract", [0, 1], ids=["w-in-out", "w-out-in"])
@pytest.mark.parametrize("rows", [8, M.BF16_MIN_ROWS + 8], ids=["decode-rows", "train-rows"])
def test_weight_matmul_against_float64(w_contract, rows):
    """Float32 weight matmuls, forward and both gradients, whichever product form the rows
    pick (``out_rows_product``: ``w @ x.T`` for an [OUT, IN] weight over few rows on CPU)."""
    rng = np.random.default_rng(1)
    d_in, d_out = 40, 56
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    w_io = rng.standard_normal((d_in, d_out)).astype(np.float32)
    w = w_io if w_contract == 0 else np.ascontiguousarray(w_io.T)
    g = rng.standard_normal((rows, d_out)).astype(np.float32)
    f = lambda a, b: M.weight_matmul(GPT2_STYLE, a, b, w_contract)  # noqa: E731
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w_io, g))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    dw_io = x64.T @ g64
    np.testing.assert_allclose(dw, dw_io if w_contract == 0 else dw_io.T, rtol=1e-5, atol=1e-5)
    transposed = "optimization_barrier" in str(jax.make_jaxpr(f)(x, w))
    assert transposed == (w_contract == 1 and rows < M.BF16_MIN_ROWS)  # CPU: the test backend
    assert M.out_rows_product(rows) == (rows < M.BF16_MIN_ROWS)


def test_matmul_precision_auto_follows_the_cpu(tmp_path, monkeypatch):
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    older = tmp_path / "older"
    older.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert M.cpu_multiplies_bfloat16(str(zen4))
    assert not M.cpu_multiplies_bfloat16(str(older))
    assert not M.cpu_multiplies_bfloat16(str(tmp_path / "absent"))
    auto = dataclasses.replace(GPT2_STYLE, matmul_precision="auto")
    for native, expected in [(True, jnp.bfloat16), (False, None)]:
        monkeypatch.setattr(M, "cpu_multiplies_bfloat16", lambda native=native: native)
        assert M.matmul_dtype(auto) == expected
    assert M.matmul_dtype(GPT2_STYLE) is None  # the default: float32
    both = dataclasses.replace(GPT2_STYLE, matmul_precision="bfloat16", dtype="bfloat16")
    assert M.matmul_dtype(both) is None  # bfloat16 compute multiplies in bfloat16 anyway


@pytest.mark.parametrize("style", STYLES)
def test_bfloat16_matmuls_are_close_to_float32(style):
    """Over BF16_MIN_ROWS tokens or more; fewer (decoding) multiply in float32."""
    c32 = STYLES[style]
    c16 = dataclasses.replace(c32, matmul_precision="bfloat16")
    params = _random_params(c32)
    tokens = _tokens((M.BF16_MIN_ROWS // 32, 32))
    out32 = np.asarray(_forward(c32, params, tokens))[..., :100]
    out16 = np.asarray(_forward(c16, params, tokens))[..., :100]
    diff = np.abs(out16 - out32).max()
    assert 0 < diff < 0.02 * np.abs(out32).max(), diff
    assert np.mean(out16.argmax(-1) == out32.argmax(-1)) >= 0.9
    few = tokens[:2]  # 64 rows
    np.testing.assert_array_equal(_forward(c16, params, few), _forward(c32, params, few))


@pytest.mark.parametrize("t", [16, 3 * M.CAUSAL_CHUNK], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_attention_implementations_agree(heads, kv_heads, t):
    """attend_einsum (the CPU default) against jax.nn.dot_product_attention: outputs and
    gradients, causal (in query chunks when T spans several) and with a packed-segment mask,
    with and without grouped kv heads."""
    rng = np.random.default_rng(0)
    b, k = 2, 8

    def draw(h):
        return jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)

    q, key, value = draw(heads), draw(kv_heads), draw(kv_heads)
    segments = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((b, t, heads, k)), jnp.float32)
    # jitted: one compile per function instead of one per primitive run eagerly
    attend = jax.jit(M.attend, static_argnums=4)
    grad = functools.partial(jax.grad, argnums=(0, 1, 2))
    for mask in (None, M.causal_segment_mask(segments)):

        def loss(impl, *qkv, mask=mask):
            return jnp.sum(M.attend(*qkv, mask, impl) * weights)

        want = attend(q, key, value, mask, "xla")
        got = attend(q, key, value, mask, "einsum")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        want_grads = jax.jit(grad(functools.partial(loss, "xla")))(q, key, value)
        grads = jax.jit(grad(functools.partial(loss, "einsum")))(q, key, value)
        for got_g, want_g in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-5)
    c = dataclasses.replace(LLAMA_STYLE, attention_impl="auto")
    assert M.attention_implementation(c) == "einsum"  # this suite runs on CPU
    assert M.attention_implementation(dataclasses.replace(c, attention_impl="xla")) == "xla"


def test_dropout():
    c = dataclasses.replace(GPT2_STYLE, dropout_rate=0.2)
    params = _random_params(c)
    tokens = _tokens((2, 16))
    det = _forward(c, params, tokens)
    np.testing.assert_array_equal(det, _forward(c, params, tokens, deterministic=True))

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return _forward(c, params, tokens, deterministic=False, rngs=rngs)

    np.testing.assert_array_equal(train(1), train(1))
    assert np.abs(np.asarray(train(1) - train(2))).max() > 1e-3
    assert np.abs(np.asarray(train(1) - det)).max() > 1e-3
    no_dropout = dataclasses.replace(c, dropout_rate=0.0)  # needs no rng
    np.testing.assert_array_equal(_forward(no_dropout, params, tokens, deterministic=False), det)


# ---------------------------------------------------------------- logical axes and boxing


@pytest.mark.parametrize("style", STYLES)
def test_every_param_has_allowed_logical_names(style):
    boxed = M.abstract_params(STYLES[style])
    leaves = jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= ALLOWED_PARAM_NAMES, leaf.names


def test_apply_accepts_boxed_and_unboxed_params():
    c = LLAMA_STYLE
    abstract = M.abstract_params(c)  # what model.init returns, as shapes
    assert isinstance(abstract["params"]["ln_f"]["scale"], nn.LogicallyPartitioned)
    plain = _random_params(c)
    boxed = jax.tree_util.tree_map(
        lambda box, x: box.replace_boxed(x), abstract, plain,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )  # fmt: skip
    assert isinstance(boxed["params"]["ln_f"]["scale"], nn.LogicallyPartitioned)
    tokens = _tokens((2, 16))
    np.testing.assert_array_equal(_forward(c, boxed, tokens), _forward(c, plain, tokens))


def test_sharding_constraints_are_a_no_op_without_a_mesh():
    from gptjax import sharding

    c = LLAMA_STYLE
    model, params = M.GPT(c), _random_params(c)
    tokens = _tokens((8, 8))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        jaxpr = str(jax.make_jaxpr(model.apply)(params, tokens))
    assert "sharding_constraint" not in jaxpr
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(mesh):
        assert "sharding_constraint" in str(jax.make_jaxpr(model.apply)(params, tokens))


@pytest.mark.parametrize("style", STYLES)
def test_sharded_forward_equals_single_device(style):
    from gptjax import sharding

    c = STYLES[style]
    model, params = M.GPT(c), _random_params(c)
    tokens = _tokens((8, 16))
    want = _forward(c, params, tokens)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(mesh):
        shardings = sharding.logical_shardings(M.abstract_params(c), mesh)
        out = jax.jit(model.apply)(
            jax.device_put(params, shardings),
            jax.device_put(tokens, sharding.batch_sharding(mesh)),
        )
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- user errors


def test_user_errors():
    with pytest.raises(ValueError, match="model.vocab_size=0 must be set"):
        M.count_params(dataclasses.replace(GPT2_STYLE, vocab_size=0))
    with pytest.raises(ValueError, match="exceeds model.max_len=32"):
        M.GPT(GPT2_STYLE).init(jax.random.key(0), _tokens((1, 33)))


# ---------------------------------------------------------------- scan over layers, remat


@pytest.mark.parametrize(
    "variant",
    [
        dict(scan_layers=True),
        dict(remat="full"),
        dict(scan_layers=True, remat="dots_with_no_batch_dims_saveable"),
    ],
)
@pytest.mark.parametrize("style", STYLES)
def test_scan_and_remat_compute_what_the_plain_model_computes(style, variant):
    """Same parameters (stacked for the scan), same logits and gradients; the stacked tree has
    a leading layers axis named "layers"; the KV cache decodes the same."""
    plain = STYLES[style]
    other = dataclasses.replace(plain, **variant)
    params = _random_params(plain)["params"]
    theirs = M.stack_layers(params, plain.num_layers) if other.scan_layers else params
    tokens = _tokens((2, 16))

    def loss(config, p):
        return jnp.sum(M.GPT(config).apply({"params": p}, tokens)[..., :100] ** 2)

    np.testing.assert_allclose(
        _forward(other, {"params": theirs}, tokens),
        _forward(plain, {"params": params}, tokens),
        atol=2e-5,
    )
    grads = jax.jit(jax.grad(functools.partial(loss, other)))(theirs)  # jitted: eager is slow
    grads = M.unstack_layers(grads) if other.scan_layers else grads
    reference = jax.jit(jax.grad(functools.partial(loss, plain)))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    if other.scan_layers:
        boxed = M.abstract_params(other)["params"]["h"]["mlp"]["up"]["kernel"]
        assert boxed.names[0] == "layers" and boxed.value.shape[0] == plain.num_layers
        assert M.unstack_layers(theirs).keys() == params.keys()
