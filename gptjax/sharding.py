"""Device mesh, the one logical-axis rules table, and host-local → global batches.

The model names every parameter and key activation with logical axes (``gptjax/model.py``);
``LOGICAL_RULES`` maps those names onto the mesh axes ``data``, ``fsdp`` and ``tensor``:

* ``data``   — pure data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   — ZeRO-3 style: the batch is split *and* parameters/optimizer state are sharded
  along their ``embed`` dimension, gathered just in time by XLA.
* ``tensor`` — Megatron style: attention heads, MLP hidden units and the vocabulary are split, so
  q/k/v/up projections are column-parallel and the out/down projections row-parallel.

Data parallel, FSDP and tensor parallel therefore come from the same code by changing the mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import MeshConfig
from gptjax.errors import GptjaxError

MESH_AXES = ("data", "fsdp", "tensor")
PMAP_AXIS = "devices"  # the axis name of train.parallelism="pmap" (one device per replica)
BATCH_AXES = ("data", "fsdp")

# Priority-ordered: flax assigns each mesh axis at most once per array, so an activation
# [batch, length, act_embed] keeps fsdp on the batch dimension.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("kv", None),
    ("layers", None),  # the stacked axis of model.scan_layers: every device holds every layer
)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves a ``-1`` axis and checks that the mesh uses exactly ``num_devices``."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [f"mesh.{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise GptjaxError(
            f"{', '.join(bad) or 'more than one mesh axis is -1'}: mesh axes must "
            f"be positive, with at most one -1 meaning 'the rest of the devices'"
        )
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise GptjaxError(
                f"mesh {_fmt(sizes)} cannot fill {num_devices} devices: "
                f"{num_devices} is not a multiple of {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise GptjaxError(
            f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices but "
            f"{num_devices} are present; make data*fsdp*tensor={num_devices} "
            f"(or set one axis to -1)"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _fmt(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(mesh: MeshConfig, devices: list | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of them)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh, len(devices))
    if devices[0].platform in ("tpu", "gpu"):
        # mesh_utils orders devices by the physical topology so that the innermost mesh axis
        # (tensor, the most communication-hungry) stays within the fastest links (ICI on TPU,
        # NVLink within a GPU node); a plain reshape can put tensor peers across hosts.
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[B, T]`` batch split over ``data × fsdp``; ``T`` replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[k, B, T]``: k batches of ``batch_sharding`` stacked (``train.steps_per_call``)."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def logical_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for a tree of (possibly boxed) abstract arrays, via ``LOGICAL_RULES``.

    Leaves without logical names (step counters, scalars) are replicated. A box around an empty
    node stays that node: optax's ``MaskedNode``, the optimizer state of a frozen parameter
    (LoRA), holds no array to place.
    """

    def spec(x):
        if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x):
            return x.value  # not unbox(): under a mesh that would add a sharding constraint
        return nn.get_partition_spec(x)

    specs = jax.tree.map(spec, abstract_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array per key.

    Process ``p`` passes rows ``[p*b, (p+1)*b)`` of the global batch (see ``gptjax/data.py``);
    with one process this is a plain sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def global_batches(local: list[dict[str, np.ndarray]], mesh: Mesh) -> dict[str, jax.Array]:
    """``global_batch`` of k host-local batches stacked into ``[k, B, T]`` arrays."""
    sharding = stacked_batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.stack([b[k] for b in local]))
        for k in local[0]
    }
