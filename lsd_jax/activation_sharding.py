"""Where the model's activations live on a device mesh: the batch axis split over the mesh's batch
axes (docs/DESIGN.md section 6.3).

Weights are sharded over `fsdp` on their model dimension. Left to itself, XLA's sharding
propagation carries that split onto the activations' feature axis and gathers the batch over
`fsdp` instead, so every device of an fsdp group holds the activations of the whole group's clips
and per-device memory grows with the fsdp axis at a fixed per-device batch. The trainer traces its
step inside `batch_sharded_over(mesh)`, and the model pins its hidden states at every block's
input and output with `constrain_batch`: batch over `data` x `fsdp`, the rest replicated (over
`tensor` too: a block's input and output are whole on each tensor shard, Megatron-style). Outside
the context (inference, tests on one device) `constrain_batch` is the identity.
"""

from __future__ import annotations

import contextlib
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_ACTIVE: list[tuple[Mesh, tuple[str, ...]]] = []


@contextlib.contextmanager
def batch_sharded_over(mesh: Mesh, axes: tuple[str, ...] = ("data", "fsdp")):
    """Within the block, traced models split their activations' batch axis over `axes`."""
    _ACTIVE.append((mesh, axes))
    try:
        yield
    finally:
        _ACTIVE.pop()


def split_axes(mesh: Mesh, axes: tuple[str, ...], batch: int) -> tuple[str, ...]:
    """The batch axes (in mesh order) to split `batch` rows over: the subset with the most devices
    that divides `batch` (all of them for a full batch; fewer for a sub-batch such as the
    shortcut clips, which then sit on a few devices instead of on all)."""
    subsets = [tuple(a for i, a in enumerate(axes) if mask >> i & 1)
               for mask in range(1, 2 ** len(axes))]
    fits = [s for s in subsets if batch % math.prod(mesh.shape[a] for a in s) == 0]
    return max(fits, key=lambda s: (math.prod(mesh.shape[a] for a in s), -len(s)), default=())


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) axis split over the active mesh's batch axes (`split_axes`)
    and the others replicated; unchanged outside `batch_sharded_over`."""
    if not _ACTIVE:
        return x
    mesh, axes = _ACTIVE[-1]
    split = split_axes(mesh, axes, x.shape[0])
    if math.prod(mesh.shape[a] for a in split) == 1:
        return x
    spec = PartitionSpec(split, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
