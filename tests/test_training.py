"""Tests for gptjax/training/: loss falls, gradient accumulation equals a bigger batch, evals."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax.config import MODEL_PRESETS, Config, TrainConfig, apply_overrides, load_experiment
from gptjax.metrics import read_metrics
from gptjax.model import GPT
from gptjax.training.pretrain import pretrain
from gptjax.training.steps import compile_steps, lr_schedule

TINY = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=100, max_len=16)


def _config(**train) -> Config:
    return Config(
        model=TINY,
        train=TrainConfig(**{"steps": 10, "warmup_steps": 2, **train}),
        mesh=dataclasses.replace(Config().mesh, data=1),
    )


def _batch(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (batch_size, TINY.max_len + 1), dtype=np.int32)
    weights = (rng.random((batch_size, TINY.max_len)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def _run(config: Config, batches) -> tuple[list[float], dict]:
    devices = jax.devices()[:1]
    steps = compile_steps(config, GPT(config.model), devices=devices)
    state, losses = steps.state, []
    for b in batches:
        state, metrics = steps.train(state, steps.put_batch(b))
        losses.append(float(metrics["train_loss"]))
    return losses, jax.device_get(steps.params(state))


def test_grad_accumulation_equals_bigger_batch():
    batches = [_batch(8, seed=i) for i in range(3)]
    whole, p_whole = _run(_config(batch_size=8), batches)
    accum, p_accum = _run(_config(batch_size=8, grad_accum_steps=4), batches)
    np.testing.assert_allclose(accum, whole, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_accum), jax.tree.leaves(p_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam amplifies ~0 grads


def test_padding_weights_are_ignored():
    b = _batch(4)
    padded = {k: v.copy() for k, v in b.items()}
    padded["targets"][padded["weights"] == 0] = 7  # any target under weight 0 changes nothing
    (l1,), _ = _run(_config(batch_size=4), [b])
    (l2,), _ = _run(_config(batch_size=4), [padded])
    assert l1 == pytest.approx(l2, rel=1e-6)


def test_schedule_warmup_then_cosine_floor():
    s = lr_schedule(
        TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    )
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(100)) == pytest.approx(1e-4)
    assert float(s(55)) == pytest.approx(5.5e-4, rel=1e-3)


def test_tiny_experiment_loss_falls_and_evaluates(tmp_path):
    config = apply_overrides(
        load_experiment("tiny"),
        ["--train.steps=40", "--eval.every_steps=20", "--eval.sample_tokens=10"],
    )
    final = pretrain(config, tmp_path)
    records = read_metrics(tmp_path)
    train = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert len(train) == 8 and train[-1] < train[0] - 0.5, train
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert final["val_loss"] == pytest.approx(val[-1]["val_loss"])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.model").is_file()
    assert list((tmp_path / "tb").iterdir()), "TensorBoard event file missing"


def test_several_steps_per_call_equal_one_at_a_time(tmp_path):
    """train.steps_per_call=4: the same losses (to float32 rounding), each step logged once,
    and an MFU figure when the device's peak is given."""
    base = ["--train.steps=12", "--train.log_every_steps=4", "--eval.every_steps=0"]
    base += ["--eval.sample_tokens=0", "--mesh.data=8"]
    one = apply_overrides(load_experiment("tiny"), base)
    four = apply_overrides(one, ["--train.steps_per_call=4", "--train.peak_flops=1e12"])
    pretrain(one, tmp_path / "one")
    pretrain(four, tmp_path / "four")
    losses = [
        [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / w) if "train_loss" in r]
        for w in ("one", "four")
    ]
    assert [s for s, _ in losses[1]] == [4, 8, 12]
    np.testing.assert_allclose([x for _, x in losses[1]], [x for _, x in losses[0]], rtol=1e-5)
    mfu = [r["mfu"] for r in read_metrics(tmp_path / "four") if "mfu" in r]
    assert len(mfu) == 2 and all(0 < x < 1 for x in mfu), mfu  # the first window has no time
    with pytest.raises(ValueError, match="train.steps_per_call=3 must divide train.log_every"):
        pretrain(apply_overrides(one, ["--train.steps_per_call=3"]), tmp_path / "bad")


def test_bfloat16_training_follows_float32(tmp_path):
    """50 steps of the tiny experiment computing in bfloat16, or in float32 with bfloat16
    matmul operands, end within 2% of float32's loss."""
    overrides = ["--train.steps=50", "--eval.every_steps=0", "--eval.sample_tokens=0"]
    overrides += ["--train.log_every_steps=50"]
    runs = {
        "float32": ["--model.dtype=float32"],
        "bfloat16": ["--model.dtype=bfloat16"],
        "bfloat16-matmuls": ["--model.dtype=float32", "--model.matmul_precision=bfloat16"],
    }
    losses = {}
    for name, extra in runs.items():
        config = apply_overrides(load_experiment("tiny"), [*overrides, *extra])
        pretrain(config, tmp_path / name)
        losses[name] = read_metrics(tmp_path / name)[-2]["train_loss"]  # [-1]: val
    for name in ("bfloat16", "bfloat16-matmuls"):
        assert losses[name] == pytest.approx(losses["float32"], rel=0.02), losses
        assert losses[name] != losses["float32"]  # it computed differently
    assert losses["float32"] < 5.5  # it trained (from ~6.3)


def test_cudnn_attention_needs_a_gpu(tmp_path):
    config = apply_overrides(load_experiment("tiny"), ["--model.attention_impl=cudnn"])
    with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs an NVIDIA GPU"):
        pretrain(config, tmp_path)


def test_flops_per_token_matches_the_compiled_step():
    """metrics.flops_per_token (6N + 12·L·T·D) against XLA's own count of the compiled train
    step's floating-point operations, within 10%."""
    import jax.numpy as jnp

    from gptjax.metrics import flops_per_token
    from gptjax.model import count_params
    from gptjax.training.steps import plan_sharded

    model = dataclasses.replace(TINY, embed_dim=256, num_heads=4, vocab_size=512, max_len=128)
    config = dataclasses.replace(_config(batch_size=8), model=model)
    plan = plan_sharded(config, GPT(model), jax.devices()[:1])
    shape = (8, model.max_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=plan.batch_sharding)
        for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))
    }
    with plan.context():
        cost = plan.train.lower(plan.abstract_state, batch).compile().cost_analysis()
    xla = cost["flops"] / (8 * model.max_len)
    ours = flops_per_token(model, count_params(model), model.max_len)
    assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
