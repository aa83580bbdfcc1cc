"""Device mesh, the logical-axis rule table, and the shardings of the train state and batch.

Parameters carry logical axis names in their variable metadata (`out_sharding`, set in
`lsd_jax/model.py`); `LOGICAL_RULES` maps each name to a mesh axis (or None: replicated). A
dimension is sharded only when its size divides the mesh axis size (> 1) and the mesh axis is not
already used by another dimension of the same array; otherwise it is replicated (a small
embedding stays whole rather than failing to compile). Batches are split over `data` x `fsdp`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsd_jax.config import MeshConfig
from lsd_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Weights shard their model dimension over `fsdp` (ZeRO-3 style: each
# device holds a slice, gathered for the matmul) and their head / MLP dimension over `tensor`.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("patch", None),
    ("prompt", None),
    ("external", None),
    ("freq", None),
    ("pixel", None),
)


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` with a -1 resolved; the product must be `device_count`."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: "
                              f"{device_count} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} has "
                          f"{math.prod(sizes)} devices, expected the {device_count} available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A `Mesh` over `devices` (default all) with axes `MESH_AXES` sized by `cfg`."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
                    mesh: Mesh) -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` whose dimensions are named `axes`."""
    rules = dict(LOGICAL_RULES)
    spec, used = [], set()
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ConfigError(f"logical axis {name!r} has no rule in "
                              f"lsd_train.sharding.LOGICAL_RULES (known: {', '.join(rules)})")
        axis = rules.get(name)
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def logical_axes(model) -> dict:
    """Nested dict (like the params) of each parameter's logical axis names."""
    params = nnx.state(model, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata()["out_sharding"], params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes) if isinstance(axes, nnx.State) else axes


def _is_axes(x) -> bool:
    """A leaf of the logical-axes tree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)


def param_shardings(abstract_params: dict, axes: dict, mesh: Mesh) -> dict:
    """`NamedSharding` per parameter, from its logical axes and the rule table."""
    return jax.tree.map(
        lambda a, p: NamedSharding(mesh, logical_to_spec(a, p.shape, mesh)), axes,
        abstract_params, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` x `fsdp`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))

