"""The norm seam (docs/DESIGN.md section 7): LayerNorm + adaLN modulate, optionally after the
gated residual, selected by `model.norm_impl` from the kernel table (`lsd_jax.kernels`).

A `NormImpl` has two functions; `x` is `[..., d]` in the compute dtype, `shift`, `scale`, `gate`
broadcast against it (per frame in the DiT: `[b, t, 1, d]`), the output is in `x`'s dtype:

- `norm_modulate(x, shift, scale, *, eps) -> LN(x) * (1 + scale) + shift`;
- `residual_norm_modulate(x, gate, y, shift, scale, *, eps) -> (r, norm_modulate(r, ...))` with
  `r = x + gate * y`: a sub-block's gated residual and the next norm in one call.

The LayerNorm has no affine parameters and is computed in float32. "xla" is the pure-JAX
reference every other implementation is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lsd_jax.kernels import select


class NormImpl(NamedTuple):
    norm_modulate: Callable[..., jnp.ndarray]
    residual_norm_modulate: Callable[..., tuple[jnp.ndarray, jnp.ndarray]]


def get_norm(name: str, *, dtype: str | None = None, platform: str | None = None) -> NormImpl:
    """The implementation `model.norm_impl = name` (`kernels.select`)."""
    return select("norm", name, dtype=dtype, platform=platform)


def layer_norm(x, eps):
    """Affine-free LayerNorm in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def norm_modulate(x, shift, scale, *, eps):
    return modulate(layer_norm(x, eps), shift, scale)


def residual_norm_modulate(x, gate, y, shift, scale, *, eps):
    x = x + gate * y
    return x, norm_modulate(x, shift, scale, eps=eps)


XLA = NormImpl(norm_modulate, residual_norm_modulate)
