"""Rotary position embeddings with the Oasis frequencies (docs/OASIS.md), for any head dim.

Angles are per rotated pair: `[..., head_dim / 2]`. With `interleaved=True` (Oasis, GPT-J style)
pair `i` is head dims `(2i, 2i+1)`; with `interleaved=False` (NeoX style) it is
`(i, i + head_dim/2)`.
All rotation arithmetic is float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def spatial_frequencies(head_dim: int) -> np.ndarray:
    """`head_dim/4` frequencies `linspace(1, 128, head_dim/4) * pi` (pixel rotary, max_freq 256)."""
    return (np.linspace(1.0, 128.0, head_dim // 4) * np.pi).astype(np.float32)


def temporal_frequencies(head_dim: int) -> np.ndarray:
    """`head_dim/2` frequencies `1 / 10000^(arange(0, head_dim, 2) / head_dim)`."""
    return (1.0 / 10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(
        np.float32
    )


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, n)` bit for bit: a float32 step, each point one fused
    multiply-add from the nearer end. Oasis computed its positions this way, and high
    rotary frequencies (up to 288 pi) turn a one-ulp position difference into 1e-4 rad."""
    if n == 1:
        return np.asarray([start], np.float32)
    step = np.float64(np.float32((end - start) / (n - 1)))
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(np.float32(start)) + step * i
    from_end = np.float64(np.float32(end)) - step * (n - 1 - i)
    return np.where(i < n // 2, from_start, from_end).astype(np.float32)


def spatial_angles(freqs_f: jnp.ndarray, grid_h: int, grid_w: int) -> jnp.ndarray:
    """Pair angles `[grid_h * grid_w, head_dim/2]` for a row-major token grid.

    Rows use positions `linspace(-1, 1, grid_h)` on the first half of the pairs, columns
    `linspace(-1, 1, grid_w)` on the second half, computed exactly as torch computes them.
    """
    freqs_f = freqs_f.astype(jnp.float32)
    rows_hf = jnp.asarray(torch_linspace(-1.0, 1.0, grid_h))[:, None] * freqs_f
    cols_wf = jnp.asarray(torch_linspace(-1.0, 1.0, grid_w))[:, None] * freqs_f
    rows_nf = jnp.broadcast_to(rows_hf[:, None, :], (grid_h, grid_w, freqs_f.shape[0]))
    cols_nf = jnp.broadcast_to(cols_wf[None, :, :], (grid_h, grid_w, freqs_f.shape[0]))
    return jnp.concatenate([rows_nf, cols_nf], axis=-1).reshape(grid_h * grid_w, -1)


def temporal_angles(freqs_f: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """Pair angles `[*positions.shape, head_dim/2]` for (small, window-relative) frame positions."""
    return positions.astype(jnp.float32)[..., None] * freqs_f.astype(jnp.float32)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray, *, interleaved: bool = True) -> jnp.ndarray:
    """Rotate the last axis of `x` (`head_dim`) by `angles` (`[..., head_dim/2]`, broadcastable)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if interleaved:
        x_pairs = x.reshape(*x.shape[:-1], -1, 2)
        x1, x2 = x_pairs[..., 0], x_pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.reshape(x.shape).astype(dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)
