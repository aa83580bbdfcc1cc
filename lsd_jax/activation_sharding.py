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


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) axis split over the active mesh's batch axes and the others
    replicated; unchanged outside `batch_sharded_over` or when the batch does not divide."""
    if not _ACTIVE:
        return x
    mesh, axes = _ACTIVE[-1]
    size = math.prod(mesh.shape[a] for a in axes)
    if size == 1 or x.shape[0] % size:
        return x
    spec = PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
