"""One train step, many layouts: single device == pmap == data/fsdp/tensor meshes."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax import sharding
from gptjax.config import Config, MeshConfig, ModelConfig, TrainConfig
from gptjax.model import GPT, stack_layers, unstack_layers
from gptjax.training.steps import compile_steps, memory_plan, plan_sharded

# 8 heads and an MLP of 256 so that tensor=8 divides them; vocab padded to 128.
MODEL = ModelConfig(num_layers=2, num_heads=8, embed_dim=64, max_len=16, vocab_size=100)
STEPS = 20


def _config(parallelism="jit", **mesh) -> Config:
    return Config(
        model=MODEL,
        mesh=MeshConfig(**{"data": 1, **mesh}),
        train=TrainConfig(
            steps=STEPS, batch_size=16, warmup_steps=2, learning_rate=3e-3, parallelism=parallelism
        ),
    )


def _batches():
    """Rows of a learnable sequence (each token determines the next), so the loss falls."""
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        start = rng.integers(0, MODEL.vocab_size, (16, 1))
        tokens = ((start + 7 * np.arange(MODEL.max_len + 1)) % MODEL.vocab_size).astype(np.int32)
        yield {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": np.ones((16, MODEL.max_len), np.float32),
        }


def _train(config: Config, devices, init_params=None):
    steps = compile_steps(config, GPT(config.model), devices=devices, init_params=init_params)
    state, losses = steps.state, []
    for batch in _batches():
        state, metrics = steps.train(state, steps.put_batch(batch))
        losses.append(float(metrics["train_loss"]))
    return np.array(losses), jax.device_get(steps.params(state)), state


@pytest.fixture(scope="module")
def reference():
    losses, params, _ = _train(_config(), jax.devices()[:1])
    return losses, params


@pytest.mark.parametrize(
    "name, config",
    [
        ("pmap over 8", _config("pmap")),
        ("data=8", _config(data=8)),
        ("fsdp=8", _config(fsdp=8)),
        ("data=2,fsdp=2,tensor=2", _config(data=2, fsdp=2, tensor=2)),
        ("tensor=8", _config(tensor=8)),
    ],
)
def test_layouts_match_one_device(reference, name, config):
    ref_losses, ref_params = reference
    losses, params, state = _train(config, jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, err_msg=name)
    assert ref_losses[-1] < ref_losses[0] - 0.5
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("mesh", [dict(), dict(fsdp=8)])
@pytest.mark.parametrize(
    "variant", [dict(scan_layers=True), dict(scan_layers=True, remat="full"), dict(remat="full")]
)
def test_scan_and_remat_train_like_the_plain_model(reference, mesh, variant):
    """The same initial parameters (stacked for the scan): the reference run's losses over the
    first 10 steps within 1e-5 (20 steps within 1e-4: the scan sums in another order, and Adam
    amplifies that) and its final parameters, on one device and on an fsdp=8 mesh."""
    plain = _config(**mesh)
    config = dataclasses.replace(plain, model=dataclasses.replace(MODEL, **variant))
    start = jax.device_get(compile_steps(_config(), GPT(MODEL), jax.devices()[:1]).state.params)
    if config.model.scan_layers:
        start = stack_layers(start, MODEL.num_layers)
    devices = jax.devices()[:1] if not mesh else jax.devices()

    def init(fresh):
        return jax.tree.map(lambda x, f: jax.device_put(x, f.sharding), start, fresh)

    losses, params, _ = _train(config, devices, init)
    np.testing.assert_allclose(losses[:10], reference[0][:10], rtol=1e-5)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-4)
    params = unstack_layers(params) if config.model.scan_layers else params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_parameters_really_are_sharded():
    plan = plan_sharded(_config(fsdp=8), GPT(MODEL), jax.devices())
    up = plan.abstract_state.params["h_0"]["mlp"]["up"]["kernel"]  # [D, F] = (embed, mlp)
    assert up.sharding.spec[0] == "fsdp"
    assert up.sharding.shard_shape(up.shape) == (64 // 8, 256)
    mu = plan.abstract_state.opt_state  # optimizer moments follow their parameters
    assert any(
        leaf.shape == up.shape and leaf.sharding.spec == up.sharding.spec
        for leaf in jax.tree.leaves(mu)
    )
    plan = plan_sharded(_config(tensor=8), GPT(MODEL), jax.devices())
    q = plan.abstract_state.params["h_0"]["attn"]["query"]["kernel"]  # [D, H, K]
    assert q.sharding.shard_shape(q.shape) == (64, 1, 8)
    out = plan.abstract_state.params["h_0"]["attn"]["out"]["kernel"]  # [H, K, D]
    assert out.sharding.shard_shape(out.shape) == (1, 8, 64)


@pytest.mark.parametrize(
    "mesh, match",
    [
        (MeshConfig(data=3), r"needs 3 devices but 8 are present"),
        (MeshConfig(data=-1, fsdp=3), r"cannot fill 8 devices"),
        (MeshConfig(data=-1, fsdp=-1), r"at most one -1"),
        (MeshConfig(data=0), r"mesh.data=0"),
    ],
)
def test_bad_mesh(mesh, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(mesh, jax.devices())


def test_minus_one_takes_the_rest():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.make_mesh(MeshConfig(data=-1), jax.devices()).shape["data"] == 8


def test_host_local_batch_becomes_global():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    local = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    out = sharding.global_batch(local, mesh)["inputs"]
    assert out.shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(out), local["inputs"])
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert dataclasses.is_dataclass(MeshConfig())


def test_fsdp_memory_is_split_across_devices():
    """Compiled per-device state bytes under fsdp=8 are about 1/8 of the whole state."""
    plan = memory_plan(_config(fsdp=8), GPT(MODEL), jax.devices())
    state_per_device = plan["argument_bytes"] - plan["batch_bytes"]
    assert plan["param_bytes"] + plan["opt_state_bytes"] <= 1.15 * plan["total_state_bytes"] / 8
    assert state_per_device <= 1.15 * plan["total_state_bytes"] / 8, plan
    replicated = memory_plan(_config(data=8), GPT(MODEL), jax.devices())
    assert replicated["argument_bytes"] - replicated["batch_bytes"] >= plan["total_state_bytes"]


def test_dry_run_reports_what_the_compiler_allocates(capsys):
    """The CLI's --dry-run figures, checked against an independent lowering of the same step:
    XLA's own memory analysis of the compiled program and the shard shapes of the state."""
    import math
    import re

    import jax.numpy as jnp

    from gptjax.__main__ import main
    from gptjax.config import apply_overrides, load_experiment

    overrides = [
        "--model.preset=small",
        "--model.vocab_size=4096",
        "--mesh.data=1",
        "--mesh.fsdp=8",
    ]
    code = main(["pretrain", "--config", "tiny", "--dry-run", *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "over 8 devices" in out
    printed = {k: float(v) for k, v in re.findall(r"  ([a-z ]+?)\s+([\d.]+) MiB", out)}

    config = apply_overrides(load_experiment("tiny"), overrides)
    plan = plan_sharded(config, GPT(config.model))
    b, t = config.train.batch_size, config.model.max_len
    batch = {
        k: jax.ShapeDtypeStruct((b, t), dtype, sharding=plan.batch_sharding)
        for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))
    }
    with plan.context():
        mem = plan.train.lower(plan.abstract_state, batch).compile().memory_analysis()

    def shard_mib(tree) -> float:
        leaves = jax.tree.leaves(tree)
        size = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
        return size / 2**20

    expected = {
        "parameters": shard_mib(plan.abstract_state.params),
        "optimizer state": shard_mib(plan.abstract_state.opt_state),
        "step arguments": mem.argument_size_in_bytes / 2**20,
        "temporaries": mem.temp_size_in_bytes / 2**20,
    }
    for key, mib in expected.items():
        assert printed[key] == pytest.approx(mib, abs=0.051), (key, out)
    assert expected["parameters"] > 1 and expected["temporaries"] > 1  # not rounding noise
