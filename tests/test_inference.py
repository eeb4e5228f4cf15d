"""Tests for gptjax/inference/ (sampling, decode, generator) and the KV-cache path of the model."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gptjax import model as M
from gptjax.config import Config, ModelConfig
from gptjax.inference.decode import (
    _decode,
    _prefill,
    decode_layout,
    generate,
    generate_batch,
    pad_prompts,
    prompt_bucket,
)
from gptjax.inference.generator import Generator
from gptjax.inference.sampling import argmax, sample_logits
from gptjax.tokenizer import Tokenizer

# Small configs (vocab 100 padded to 128 rows). max_len 128: prompt buckets 16, 32, 64, 128 and
# two attention windows over the cache (64, 128; see model.cache_windows).
GPT2_STYLE = ModelConfig(
    vocab_size=100, num_layers=2, num_heads=4, embed_dim=64, max_len=128, position="learned",
    norm="layernorm", activation="gelu", tie_embeddings=True, use_bias=True,
)  # fmt: skip
LLAMA_STYLE = ModelConfig(
    vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_len=128,
    position="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False, use_bias=False,
)  # fmt: skip
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}
MODEL = M.GPT(GPT2_STYLE)


@functools.cache
def _params(config, seed=0):
    """Random float32 params (NumPy, no compile) whose logits are of order one."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(M.abstract_params(config))["params"]

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1.0 + noise if is_scale else noise, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(8, 100, n).tolist() for n in lengths]


def _greedy(prompts, **kw):
    return generate_batch(_params(GPT2_STYLE), MODEL, prompts, temperature=0, **kw)


# ---------------------------------------------------------------- the model's KV cache


@functools.partial(jax.jit, static_argnames="config")
def _full(config, params, tokens):
    return M.GPT(config).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnames="config")
def _cached(config, params, tokens, positions, cache):
    return M.GPT(config).apply({"params": params}, tokens, positions=positions, cache=cache)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("prompt_len", [(5, 11), (5, 63)], ids=["window64", "window128"])
def test_cached_decoding_equals_full_recompute(style, prompt_len):
    """Right-padded rows of different lengths: prefill, a 2-token step, then 1-token steps.

    Positions stay below 64 (the cache's first attention window) or cross it (max 62, 64, ...).
    """
    c = STYLES[style]
    params = _params(c)
    prompt_len = np.array(prompt_len)
    total = prompt_len + 4  # prompt, a 2-token step and two 1-token steps
    seqs = np.asarray(_prompts([total[1]] * 2, seed=1), np.int32)  # row 0 is shorter
    want = np.asarray(_full(c, params, jnp.asarray(seqs)))  # [2, T, V]; causal: row 0 ok
    prompts = seqs[:, : prompt_len[1]].copy()
    prompts[0, prompt_len[0] :] = 0  # padding after row 0's prompt: in the cache, never seen
    got = {}
    positions = np.broadcast_to(np.arange(prompt_len[1]), prompts.shape)
    logits, cache = _cached(c, params, prompts, positions, M.init_cache(c, 2))
    for b in range(2):
        for t in range(prompt_len[b]):
            got[b, t] = logits[b, t]
    pos = np.stack([prompt_len, prompt_len + 1], axis=1)  # [2, 2]
    logits, cache = _cached(c, params, np.take_along_axis(seqs, pos, 1), pos, cache)
    for b in range(2):
        got[b, pos[b, 0]], got[b, pos[b, 1]] = logits[b, 0], logits[b, 1]
    for step in (2, 3):
        pos = (prompt_len + step)[:, None]  # [2, 1]
        logits, cache = _cached(c, params, np.take_along_axis(seqs, pos, 1), pos, cache)
        for b in range(2):
            got[b, int(pos[b, 0])] = logits[b, 0]
    assert sorted(got) == [(b, t) for b in range(2) for t in range(total[b])]
    for (b, t), value in got.items():
        np.testing.assert_allclose(value, want[b, t], rtol=1e-4, atol=1e-4, err_msg=f"{b, t}")
    assert np.abs(want[..., :100]).max() > 0.5  # the comparison is not of near-zeros


@pytest.mark.parametrize("style", STYLES)
def test_logits_at_gives_the_chosen_positions_logits(style):
    """``logits_at`` (a prefill's last prompt positions) returns exactly those rows of the full
    logits, with or without a cache, and the cache it fills decodes as the full one does."""
    c = STYLES[style]
    params = _params(c)
    tokens = jnp.asarray(_prompts([20, 20], seed=2), jnp.int32)
    at = jnp.asarray([[19, 4], [7, 7]], jnp.int32)  # [B, N]
    full = _full(c, params, tokens)  # [2, 20, V]
    want = jnp.take_along_axis(full, at[..., None], axis=1)
    got = M.GPT(c).apply({"params": params}, tokens, logits_at=at)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    got, cache = M.GPT(c).apply(
        {"params": params}, tokens, positions=positions, cache=M.init_cache(c, 2), logits_at=at
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    _, full_cache = _cached(c, params, tokens, positions, M.init_cache(c, 2))
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(full_cache), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # another compile: a few ulp


@pytest.mark.parametrize("layout", ["standard", "decode_layout"])
@pytest.mark.parametrize("style", STYLES)
def test_decode_loop_reads_the_cache_in_place(style, layout):
    """The compiled decoding loop holds no copy, slice or transpose as large as a cache block:
    any would stream the cache through memory again on every step (a prefix of one
    ``[B*G, S, K]`` array was copied before each attention matmul, a quarter of GPT-2's step at
    batch 32). Nor does it with ``decode_layout``'s kernels (no per-step transposed copy)."""
    c = STYLES[style]
    model = M.GPT(c)
    params = _params(c) if layout == "standard" else decode_layout(_params(c))
    padded, lengths = pad_prompts(_prompts([3, 70]), c.max_len)
    state = _prefill(params, padded, lengths, model=model)
    v = c.padded_vocab_size
    args = (np.int32(4), np.zeros(2, bool), np.arange(2, dtype=np.int32), np.zeros(v, bool))
    args += (np.int32(c.vocab_size), np.float32(1), np.float32(1))
    hlo = (
        _decode.lower(params, state, *args, model=model, greedy=True, top_k=0, nucleus=False)
        .compile()
        .as_text()
    )
    block = 2 * c.kv_heads * M.cache_windows(c.max_len)[0] * c.head_dim  # [B*G, 64, K]
    found = []
    for name, dims, op in re.findall(r"%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", hlo):
        size = math.prod(int(d) for d in dims.split(",") if d)
        moves = op in ("copy", "slice", "dynamic-slice", "transpose") or re.search(
            r"copy|slice|transpose", name
        )
        if moves and size >= block:
            found.append(f"{op} {name} [{dims}]")
    assert len(jax.tree.leaves(state.cache)) == 2 * 2 * 2  # layers x (k, v) x 2 blocks
    assert not found, found


@pytest.mark.parametrize("style", [*STYLES, "gpt2-scan"])
def test_decode_layout_computes_what_the_standard_tree_computes(style):
    """``decode_layout`` (CPU: every kernel as a transposed ``kernel_out_in [OUT, IN]``): the
    same logits over few rows and over ``BF16_MIN_ROWS`` (the two product forms), the same
    greedy tokens; no standard kernel is left to fall back on; idempotent; a kernel of the
    wrong shape is refused."""
    c = STYLES.get(style) or dataclasses.replace(GPT2_STYLE, scan_layers=True)
    params = _params(c)
    layout = decode_layout(params)

    def names(tree):
        return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]

    assert any(n.endswith("['kernel']") for n in names(params))
    assert sorted(names(layout)) == sorted(
        n.replace("['kernel']", "['kernel_out_in']") for n in names(params)
    )
    assert decode_layout(layout) is layout
    for rows in (2, M.BF16_MIN_ROWS // 2):  # [2, T] tokens: 4 and BF16_MIN_ROWS rows
        tokens = jnp.asarray(_prompts([rows, rows], seed=3), jnp.int32)
        want = _full(c, params, tokens)
        np.testing.assert_allclose(_full(c, layout, tokens), want, rtol=1e-5, atol=1e-5)
    prompts = _prompts([3, 9, 1], seed=4)
    greedy = functools.partial(generate_batch, model=M.GPT(c), prompts=prompts, temperature=0)
    assert greedy(layout, max_new_tokens=12) == greedy(params, max_new_tokens=12)
    path = "h" if c.scan_layers else "h_0"
    broken = {**layout, path: {**layout[path], "mlp": dict(layout[path]["mlp"])}}
    up = broken[path]["mlp"]["up"] = dict(broken[path]["mlp"]["up"])
    up["kernel_out_in"] = jnp.swapaxes(up["kernel_out_in"], -1, -2)
    with pytest.raises(
        ValueError, match=r"mlp/up/kernel_out_in has shape .* decode_layout\(params\)"
    ):
        _full(c, broken, jnp.zeros((1, 4), jnp.int32))


def test_cache_keeps_the_parameter_tree():
    c = LLAMA_STYLE
    shapes = jax.eval_shape(
        lambda: M.GPT(c).init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32), cache=M.init_cache(c, 1)
        )
    )
    plain = jax.eval_shape(lambda: M.GPT(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(plain)
    assert set(shapes) == {"params"}
    with pytest.raises(ValueError, match="segment_ids cannot be combined with a KV cache"):
        M.GPT(c).apply(
            {"params": _params(c)},
            jnp.zeros((1, 2), jnp.int32),
            segment_ids=jnp.ones((1, 2), jnp.int32),
            cache=M.init_cache(c, 1),
        )


# ---------------------------------------------------------------- sampling


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05] + [0.0] * 4]))  # [1, 8]
    logits = jnp.where(jnp.arange(8) >= 4, M.PADDED_LOGIT, logits)  # padded vocabulary rows
    settings = [{}, {"temperature": 5.0}, {"top_k": 2}, {"top_p": 0.7}, {"top_p": 0.4}]

    @jax.jit
    def draws(keys):  # [N] keys -> [settings, N] tokens, in one compile
        return jnp.stack(
            [
                jax.vmap(lambda key, kw=kw: sample_logits(logits, key, **kw)[0])(keys)
                for kw in settings
            ]
        )

    out = np.asarray(draws(jax.random.split(jax.random.key(0), 2000)))
    counts = [np.bincount(row, minlength=8) for row in out]
    np.testing.assert_allclose(counts[0][:4] / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert set(np.flatnonzero(counts[1])) == {0, 1, 2, 3}  # hot, but never a padded id
    assert set(np.flatnonzero(counts[2])) == {0, 1}
    assert set(np.flatnonzero(counts[3])) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(np.flatnonzero(counts[4])) == {0}
    assert sample_logits(logits, None, temperature=0).tolist() == [0]


def test_argmax_equals_jax_argmax():
    """Greedy decoding's argmax (two plain reductions) picks what ``jnp.argmax`` picks: the first
    of tied maxima, the first NaN of a row that has one, the padded vocabulary never."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    logits[:, 256:] = M.PADDED_LOGIT
    logits[1, [5, 17, 200]] = 9.0  # a three-way tie
    logits[2, [40, 90]] = np.nan
    logits[3, :256] = -np.inf
    logits[3, 7] = 0.0
    logits[4] = 1.0  # every entry tied
    want = np.argmax(logits, axis=-1)  # NumPy agrees with jnp.argmax on all of these
    np.testing.assert_array_equal(want[1:5], [5, 40, 7, 0])
    got = jax.jit(argmax)(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jnp.argmax(logits, axis=-1), want)


def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    prompts = _prompts([7])
    first = _greedy(prompts, max_new_tokens=20)
    assert len(first[0]) == 27 and first[0][:7] == prompts[0]
    assert _greedy(prompts, max_new_tokens=20) == first
    top1 = generate(_params(GPT2_STYLE), MODEL, prompts[0], max_new_tokens=20, top_k=1, seed=3)
    assert top1 == first[0]


def test_sampling_is_reproducible_per_seed_and_per_row():
    params, prompts = _params(GPT2_STYLE), _prompts([3, 9, 5])

    def sample(ps, seed):
        return generate_batch(
            params, MODEL, ps, max_new_tokens=24, temperature=1.5, top_p=0.95, seed=seed
        )

    batch = sample(prompts, seed=10)
    assert sample(prompts, seed=10) == batch
    assert sample(prompts, seed=11) != batch
    # Row i samples with seed + i, whatever else is in the batch.
    for i, prompt in enumerate(prompts):
        assert sample([prompt], seed=10 + i) == [batch[i]]


# ---------------------------------------------------------------- batches, stops, streaming


def test_batch_of_different_lengths_equals_each_prompt_alone():
    prompts = _prompts([1, 56, 12])  # row 1 crosses into the second cache window (64)
    batch = _greedy(prompts, max_new_tokens=16)
    assert [len(row) for row in batch] == [17, 72, 28]
    for prompt, row in zip(prompts, batch, strict=True):
        assert _greedy([prompt], max_new_tokens=16) == [row]


def test_stop_ids_end_their_row_only():
    prompts = _prompts([4, 10, 7])
    free = _greedy(prompts, max_new_tokens=12)
    stop = free[0][4 + 5]  # row 0's sixth new token
    first = free[0].index(stop, 4)  # ... or an earlier copy of it
    out = _greedy(prompts, max_new_tokens=12, stop_ids=[stop])
    assert out[0] == free[0][: first + 1]  # kept, and nothing after it
    for row, n in [(1, 10), (2, 7)]:
        cont = free[row][n:]
        assert out[row] == (free[row][: n + cont.index(stop) + 1] if stop in cont else free[row])


def test_generation_stops_when_the_context_is_full():
    s = GPT2_STYLE.max_len
    prompt = _prompts([s - 3])[0]
    assert len(_greedy([prompt], max_new_tokens=10)[0]) == s
    assert _greedy([prompt + [9, 9, 9]], max_new_tokens=10) == [prompt + [9, 9, 9]]
    with pytest.raises(ValueError, match=f"{s + 1} tokens but model.max_len={s}"):
        _greedy([prompt + [9, 9, 9, 9]], max_new_tokens=10)


def test_streaming_hook_sees_tokens_in_order_while_they_are_made():
    prompts = _prompts([6, 2, 9])
    want = _greedy(prompts, max_new_tokens=10)
    seen = []
    out = _greedy(prompts, max_new_tokens=10, on_token=lambda r, t: seen.append((r, t)))
    assert out == want
    for r in range(3):
        assert [t for row, t in seen if row == r] == want[r][len(prompts[r]) :]
    assert [row for row, _ in seen[:6]] == [0, 1, 2, 0, 1, 2]  # step by step, not row by row
    # The hook runs during generation: it can end a row, which then stops there.
    count = []
    stopped = generate(
        _params(GPT2_STYLE),
        MODEL,
        prompts[0],
        max_new_tokens=50,
        temperature=0,
        on_token=lambda t: count.append(t) or len(count) == 3,
    )
    assert stopped == want[0][:9] and len(count) == 3


def test_no_recompilation_within_a_prompt_bucket():
    assert [prompt_bucket(n, 128) for n in (1, 16, 17, 32, 33, 64, 65, 128)] == [
        16, 16, 32, 32, 64, 64, 128, 128
    ]  # fmt: skip
    assert prompt_bucket(200, 1024) == 256 and prompt_bucket(20, 24) == 24
    _prefill.clear_cache()
    _decode.clear_cache()

    def compiled():
        return _prefill._cache_size(), _decode._cache_size()

    for lengths, n in [([3, 5, 1], 4), ([10, 16, 2], 9), ([16, 1, 1], 2), ([7, 12, 8], 30)]:
        _greedy(_prompts(lengths), max_new_tokens=n)
        assert compiled() == (1, 1)
    for i, lengths in enumerate([[17, 30, 8], [33, 64, 1], [65, 2, 3]]):  # 32, 64, 128
        _greedy(_prompts(lengths), max_new_tokens=2)  # the next bucket: one more prefill
        assert compiled() == (2 + i, 1)
    sample = functools.partial(
        generate_batch, _params(GPT2_STYLE), MODEL, _prompts([3, 5, 1]), max_new_tokens=3
    )
    sample(temperature=0.7, top_p=0.9)  # sampling instead of argmax: one more decode
    assert compiled() == (4, 2)
    sample(temperature=1.3, top_p=0.5, seed=4)  # temperature, top_p and seed are traced
    assert compiled() == (4, 2)


def test_user_errors():
    params = _params(GPT2_STYLE)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(params, MODEL, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        generate(params, MODEL, [1], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(params, MODEL, [1], max_new_tokens=2, temperature=-1.0)


# ---------------------------------------------------------------- Generator: text in, text out

CHARS = "abcdhikloxyz !"


@functools.cache
def _tokenizer():
    return Tokenizer.train([CHARS * 50], model_type="char", progress=False)


@functools.cache
def _bigram_generator():
    """A model whose greedy next token depends only on the current one, by a chosen table.

    Blocks are zeroed (the residual stream is the token embedding), so logits are
    ``rmsnorm(E[t]) @ W``; column ``next[t]`` of W is ``rmsnorm(E[t])`` / sqrt(D), which wins
    by a wide margin for random E with D = 128.
    """
    tok = _tokenizer()
    i = {ch: tok.encode(ch)[0] for ch in CHARS}
    table = {
        i["b"]: i["c"], i["c"]: i["d"], i["d"]: tok.eos_id,  # "ab" -> "abcd" then EOS
        tok.assistant_id: i["o"], i["o"]: i["k"], i["k"]: tok.end_of_turn_id,  # reply "ok"
        tok.eos_id: i["z"], tok.end_of_turn_id: i["z"],  # ignoring a stop shows as "z"
    }  # fmt: skip
    c = dataclasses.replace(
        LLAMA_STYLE, vocab_size=tok.vocab_size, embed_dim=128, num_heads=4, num_kv_heads=2
    )
    params = jax.tree_util.tree_map(jnp.zeros_like, nn.meta.unbox(M.abstract_params(c)))
    params = params["params"]
    embed = np.random.default_rng(0).normal(size=(c.padded_vocab_size, 128))
    unit = embed / np.linalg.norm(embed, axis=1, keepdims=True)
    head = np.zeros((128, c.padded_vocab_size))
    for t, nxt in table.items():
        head[:, nxt] += 10 * unit[t]
    params["embed"]["embedding"] = jnp.asarray(embed, jnp.float32)
    params["lm_head"]["kernel"] = jnp.asarray(head, jnp.float32)
    params["ln_f"]["scale"] = jnp.ones(128)
    for layer in range(c.num_layers):
        for norm in ("ln_1", "ln_2"):
            params[f"h_{layer}"][norm]["scale"] = jnp.ones(128)
    return Generator(Config(model=c), params, tok)


def test_generator_text_in_text_out():
    gen = _bigram_generator()
    assert gen("ab", max_new_tokens=20, temperature=0) == "abcd"  # stops at EOS
    assert gen(["ab", "c"], max_new_tokens=20, temperature=0) == ["abcd", "cd"]
    assert gen("ab", max_new_tokens=1, temperature=0) == "abc"


def test_generator_stop_strings_and_text_streaming():
    gen = _bigram_generator()
    assert gen("ab", max_new_tokens=20, temperature=0, stop=["d"]) == "abc"
    assert gen("ab", max_new_tokens=20, temperature=0, stop=["cd", "x"]) == "ab"
    pieces = []
    assert gen("ab", max_new_tokens=20, temperature=0, stream=pieces.append) == "abcd"
    assert pieces == ["c", "d"]
    pieces = []
    gen("ab", max_new_tokens=20, temperature=0, stop=["cd"], stream=pieces.append)
    assert pieces == []  # "c" was held back: it could have begun the stop string
    rows = []
    gen(["ab", "c"], max_new_tokens=20, temperature=0, stream=lambda i, s: rows.append((i, s)))
    assert rows == [(0, "c"), (1, "d"), (0, "d")]


def test_generator_chat_replies_until_end_of_turn():
    gen = _bigram_generator()
    messages = [{"role": "user", "content": "hi"}]
    pieces = []
    assert gen.chat(messages, max_new_tokens=20, temperature=0, stream=pieces.append) == "ok"
    assert pieces == ["o", "k"]
    with pytest.raises(ValueError, match="model.max_len=128"):
        gen.chat([{"role": "user", "content": "hi" * 70}], max_new_tokens=4)
