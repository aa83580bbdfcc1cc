"""Rotary embedding inside a kernel, as two element-wise products and one small matrix product.

`lsd_jax.rope.apply_rope` rotates pairs of head dims; inside a kernel the pair partner is
gathered by a signed permutation matrix `R` `[e, e]`: `rope(x) = x * cos + (x @ R) * sin`, with
`cos`, `sin` `[rows, e]` holding each pair's angle on both of its dims. `R` has one +-1 per
column, so `x @ R` is exact in any precision that keeps `x` (float32 products use HIGHEST: on
GPU the default would round `x` to TF32). The gradient of the rotation is
`g * cos + (g * sin) @ R.T`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def partner_matrix(head_dim: int, interleaved: bool) -> jnp.ndarray:
    """float32 `[e, e]` with `(x @ R)[a] = -x[b]`, `(x @ R)[b] = x[a]` for each pair `(a, b)`:
    `(2i, 2i+1)` interleaved, `(i, i + e/2)` otherwise."""
    r = np.zeros((head_dim, head_dim), np.float32)
    half = head_dim // 2
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        r[b, a], r[a, b] = -1.0, 1.0
    return jnp.asarray(r)


def cos_sin(angles: jnp.ndarray, interleaved: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-dim float32 `cos`, `sin` `[..., e]` of pair angles `[..., e/2]`."""
    angles = angles.astype(jnp.float32)
    if interleaved:
        full = jnp.repeat(angles, 2, axis=-1)
    else:
        full = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(full), jnp.sin(full)


def matmul(a, b):
    """`a @ b` accumulated in float32 (full precision for float32 operands)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def matmul_t(a, b):
    """`a @ b.T` accumulated in float32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def rotate(x, cos, sin, r):
    """Rotate float32 rows `x` `[rows, e]` in a kernel (see the module docstring)."""
    return x * cos + matmul(x, r) * sin


def unrotate_grad(g, cos, sin, r):
    """The gradient through `rotate`, for `g` `[..., rows, e]` (outside kernels: plain jnp)."""
    return g * cos + jnp.matmul(g * sin, r.T, precision=jax.lax.Precision.HIGHEST)
