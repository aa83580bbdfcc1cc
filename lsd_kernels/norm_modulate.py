"""Fused LayerNorm + adaLN modulate (+ the gated residual before it): one read of `x`, one write.

Implements the norm seam (`lsd_jax.norm.NormImpl`); the reference is `lsd_jax.norm.XLA`:

- `norm_modulate(x, shift, scale) = LN(x) * (1 + scale) + shift`,
- `residual_norm_modulate(x, gate, y, shift, scale) = (r, norm_modulate(r, ...))`, `r = x + gate*y`.

`x` is `[..., n, d]` (the DiT: `[b, t, tokens, hidden]`); `shift`, `scale`, `gate` broadcast to
it, per frame (`[..., 1, d]`, as adaLN gives them) or per token. The grid runs over frames and
blocks of tokens; each program normalises its `[tokens, d]` rows in float32 and writes the
modulated rows in `x`'s dtype. Backward: the reference's (`jax.vjp` of `lsd_jax.norm.XLA`), an
element-wise XLA fusion that a kernel would not beat by much.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lsd_jax import norm as norm_ref
from lsd_kernels.backends import Backend, block_size

TOKEN_BLOCK = 256


def _kernel(*refs, eps: float, residual: bool):
    if residual:
        x_ref, gate_ref, y_ref, shift_ref, scale_ref, r_ref, o_ref = refs
        x = (x_ref[...].astype(jnp.float32)
             + gate_ref[...].astype(jnp.float32) * y_ref[...].astype(jnp.float32))
        r_ref[...] = x.astype(r_ref.dtype)
        x = x.astype(r_ref.dtype).astype(jnp.float32)  # the residual stream as stored
    else:
        x_ref, shift_ref, scale_ref, o_ref = refs
        x = x_ref[...].astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(var + eps)
    out = normed * (1.0 + scale_ref[...].astype(jnp.float32)) + shift_ref[...].astype(jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)


def _rows(a, x_shape):
    """`a` broadcast to `x_shape` as `[frames, n or 1, d]` (per-frame stays one row)."""
    lead, (n, d) = x_shape[:-2], x_shape[-2:]
    rows = 1 if a.ndim >= 2 and a.shape[-2] == 1 else n
    return jnp.broadcast_to(a, (*lead, rows, d)).reshape(-1, rows, d)


def _call(backend: Backend, eps: float, x, shift, scale, gate=None, y=None):
    *lead, n, d = x.shape
    frames = 1
    for size in lead:
        frames *= size
    bn = block_size(n, TOKEN_BLOCK)
    x3 = x.reshape(frames, n, d)
    row_spec = pl.BlockSpec((None, bn, d), lambda f, j: (f, j, 0))

    def spec(a3):
        if a3.shape[1] == 1:
            return pl.BlockSpec((None, 1, d), lambda f, j: (f, 0, 0))
        return row_spec

    residual = gate is not None
    operands = [x3]
    if residual:
        operands += [_rows(gate, x.shape), _rows(y, x.shape)]
    operands += [_rows(shift, x.shape), _rows(scale, x.shape)]
    out_struct = jax.ShapeDtypeStruct(x3.shape, x.dtype)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, residual=residual),
        out_shape=(out_struct, out_struct) if residual else out_struct,
        grid=(frames, n // bn),
        in_specs=[spec(a) for a in operands],
        out_specs=(row_spec, row_spec) if residual else row_spec,
        name="residual_norm_modulate" if residual else "norm_modulate",
        **backend.params(("parallel", "parallel")),
    )(*operands)
    if residual:
        return tuple(o.reshape(x.shape) for o in outs)
    return outs.reshape(x.shape)


def make(backend: Backend) -> norm_ref.NormImpl:
    """The norm seam with the fused kernel on `backend`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def norm_modulate(x, shift, scale, eps):
        return _call(backend, eps, x, shift, scale)

    def nm_fwd(x, shift, scale, eps):
        return norm_modulate(x, shift, scale, eps), (x, shift, scale)

    def nm_bwd(eps, saved, g):
        _, vjp = jax.vjp(functools.partial(norm_ref.norm_modulate, eps=eps), *saved)
        return vjp(g)

    norm_modulate.defvjp(nm_fwd, nm_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def residual_norm_modulate(x, gate, y, shift, scale, eps):
        return _call(backend, eps, x, shift, scale, gate=gate, y=y)

    def rnm_fwd(x, gate, y, shift, scale, eps):
        return residual_norm_modulate(x, gate, y, shift, scale, eps), (x, gate, y, shift, scale)

    def rnm_bwd(eps, saved, g):
        _, vjp = jax.vjp(functools.partial(norm_ref.residual_norm_modulate, eps=eps), *saved)
        return vjp(g)

    residual_norm_modulate.defvjp(rnm_fwd, rnm_bwd)

    return norm_ref.NormImpl(
        lambda x, shift, scale, *, eps: norm_modulate(x, shift, scale, eps),
        lambda x, gate, y, shift, scale, *, eps: residual_norm_modulate(x, gate, y, shift,
                                                                        scale, eps))
