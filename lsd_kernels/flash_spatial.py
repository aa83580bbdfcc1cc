"""Spatial flash attention with the rotary embedding applied in the kernel, forward and backward.

The `spatial` entry of the attention seam (`lsd_jax.attention`): every token attends to every
token of its own frame; the reference is `lsd_jax.attention.XLA.spatial`. Queries and keys
arrive un-rotated with the token grid's angles; each program rotates its block of queries once and
each block of keys as it streams through (`lsd_kernels.rotary`), and keeps a running max and
sum (online softmax), so the `[n, n]` logits never exist in memory.

Layout: the model's `[b, t, n, heads, e]` is viewed as `[b*t, heads, n, e]` (frames x heads are
the grid's parallel axes, then blocks of queries). The forward also writes the log-sum-exp per
query, which the backward uses to recompute the probabilities block by block:

- `_dkdv_kernel`: one program per block of keys, looping over query blocks: `dv += p^T do`,
  `dk += scale * ds^T q` with `ds = p * (do v^T - delta)`, `delta = rowsum(do * o)`;
- `_dq_kernel`: one program per block of queries, looping over key blocks: `dq += scale * ds k`.

Both backward kernels rotate q and k in the kernel like the forward; the gradients they return are
for the rotated q and k and are rotated back (`rotary.unrotate_grad`) outside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lsd_kernels import rotary
from lsd_kernels.backends import Backend, block_size, full_spec

BLOCK_Q, BLOCK_K = 64, 64


def _to_heads(x):
    b, t, n, h, e = x.shape
    return x.reshape(b * t, n, h, e).transpose(0, 2, 1, 3)


def _from_heads(x, shape):
    b, t, n, h, e = shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n, h, e)


def _fwd_kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, r_ref, o_ref, lse_ref, *, block_q,
                block_k, num_k_blocks, scale):
    i = pl.program_id(2)
    r = r_ref[...]
    rows = pl.ds(i * block_q, block_q)
    q = rotary.rotate(q_ref[...].astype(jnp.float32), cos_ref[rows, :], sin_ref[rows, :], r)
    q = q.astype(q_ref.dtype)

    def body(j, carry):
        m, total, acc = carry
        keys = pl.ds(j * block_k, block_k)
        k = rotary.rotate(k_ref[keys, :].astype(jnp.float32), cos_ref[keys, :], sin_ref[keys, :],
                          r).astype(k_ref.dtype)
        s = rotary.matmul_t(q, k) * scale
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        total = alpha * total + jnp.sum(p, axis=-1, keepdims=True)
        acc = alpha * acc + rotary.matmul(p.astype(v_ref.dtype), v_ref[keys, :])
        return m_new, total, acc

    e = q_ref.shape[-1]
    m0 = jnp.full((block_q, 1), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((block_q, 1), jnp.float32)
    m, total, acc = jax.lax.fori_loop(0, num_k_blocks, body,
                                  (m0, l0, jnp.zeros((block_q, e), jnp.float32)))
    o_ref[...] = (acc / total).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _probs(q, k, lse, scale):
    return jnp.exp(rotary.matmul_t(q, k) * scale - lse)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref, r_ref,
                 dk_ref, dv_ref, *, block_q, block_k, num_q_blocks, scale):
    j = pl.program_id(2)
    r = r_ref[...]
    keys = pl.ds(j * block_k, block_k)
    k = rotary.rotate(k_ref[...].astype(jnp.float32), cos_ref[keys, :], sin_ref[keys, :], r)
    k = k.astype(k_ref.dtype)
    v = v_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q = rotary.rotate(q_ref[rows, :].astype(jnp.float32), cos_ref[rows, :],
                          sin_ref[rows, :], r).astype(q_ref.dtype)
        do = do_ref[rows, :]
        p = _probs(q, k, lse_ref[rows, :], scale)  # [bq, bk]
        dv = dv + rotary.matmul(p.T.astype(do.dtype), do)
        dp = rotary.matmul_t(do, v)
        ds = p * (dp - delta_ref[rows, :])
        dk = dk + rotary.matmul(ds.T.astype(q.dtype), q) * scale
        return dk, dv

    e = k_ref.shape[-1]
    zeros = jnp.zeros((block_k, e), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref, r_ref, dq_ref,
               *, block_q, block_k, num_k_blocks, scale):
    i = pl.program_id(2)
    r = r_ref[...]
    rows = pl.ds(i * block_q, block_q)
    q = rotary.rotate(q_ref[...].astype(jnp.float32), cos_ref[rows, :], sin_ref[rows, :], r)
    q = q.astype(q_ref.dtype)
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = rotary.rotate(k_ref[keys, :].astype(jnp.float32), cos_ref[keys, :],
                          sin_ref[keys, :], r).astype(k_ref.dtype)
        p = _probs(q, k, lse, scale)
        ds = p * (rotary.matmul_t(do, v_ref[keys, :]) - delta)
        return dq + rotary.matmul(ds.astype(k.dtype), k) * scale

    e = q_ref.shape[-1]
    dq_ref[...] = jax.lax.fori_loop(0, num_k_blocks, body, jnp.zeros((block_q, e), jnp.float32))


def _specs(n, e, block, axis_block):
    """Block spec of a `[F, H, n, e]` operand: a block of rows (the grid's third axis) or whole."""
    if axis_block:
        return pl.BlockSpec((None, None, block, e), lambda f, h, i: (f, h, i, 0))
    return pl.BlockSpec((None, None, n, e), lambda f, h, i: (f, h, 0, 0))


def _forward(backend: Backend, q, k, v, cos, sin, r):
    f, h, n, e = q.shape
    bq, bk = block_size(n, BLOCK_Q), block_size(n, BLOCK_K)
    kernel = functools.partial(_fwd_kernel, block_q=bq, block_k=bk, num_k_blocks=n // bk,
                               scale=e ** -0.5)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((f, h, n, 1), jnp.float32)),
        grid=(f, h, n // bq),
        in_specs=[_specs(n, e, bq, True), _specs(n, e, bk, False), _specs(n, e, bk, False),
                  full_spec(cos.shape), full_spec(sin.shape), full_spec(r.shape)],
        out_specs=(_specs(n, e, bq, True), _specs(n, 1, bq, True)),
        name="flash_spatial_fwd",
        **backend.params(("parallel", "parallel", "parallel")),
    )(q, k, v, cos, sin, r)


def _backward(backend: Backend, q, k, v, cos, sin, r, o, lse, do):
    f, h, n, e = q.shape
    bq, bk = block_size(n, BLOCK_Q), block_size(n, BLOCK_K)
    scale = e ** -0.5
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    whole = [_specs(n, e, bq, False)] * 4 + [_specs(n, 1, bq, False)] * 2
    tables = [full_spec(cos.shape), full_spec(sin.shape), full_spec(r.shape)]
    params = backend.params(("parallel", "parallel", "parallel"))
    grad_struct = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, block_k=bk, num_q_blocks=n // bq,
                          scale=scale),
        out_shape=(grad_struct, grad_struct),
        grid=(f, h, n // bk),
        in_specs=[whole[0], _specs(n, e, bk, True), _specs(n, e, bk, True), *whole[3:], *tables],
        out_specs=(_specs(n, e, bk, True), _specs(n, e, bk, True)),
        name="flash_spatial_dkdv", **params,
    )(q, k, v, do, lse, delta, cos, sin, r)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=bq, block_k=bk, num_k_blocks=n // bk, scale=scale),
        out_shape=grad_struct,
        grid=(f, h, n // bq),
        in_specs=[_specs(n, e, bq, True), whole[1], whole[2], _specs(n, e, bq, True),
                  _specs(n, 1, bq, True), _specs(n, 1, bq, True), *tables],
        out_specs=_specs(n, e, bq, True),
        name="flash_spatial_dq", **params,
    )(q, k, v, do, lse, delta, cos, sin, r)
    # Gradients of the rotated q and k -> of the inputs.
    dq = rotary.unrotate_grad(dq, cos, sin, r)
    dk = rotary.unrotate_grad(dk, cos, sin, r)
    return dq, dk, dv


def make(backend: Backend):
    """`spatial(q, k, v, *, angles, interleaved)` with the flash kernels on `backend`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attend(q, k, v, angles, interleaved):
        return fwd(q, k, v, angles, interleaved)[0]

    def fwd(q, k, v, angles, interleaved):
        cos, sin = rotary.cos_sin(angles, interleaved)
        r = rotary.partner_matrix(q.shape[-1], interleaved)
        qh, kh, vh = _to_heads(q), _to_heads(k), _to_heads(v)
        out, lse = _forward(backend, qh, kh, vh, cos, sin, r)
        return _from_heads(out, q.shape), (qh, kh, vh, angles, out, lse)

    def bwd(interleaved, saved, g):
        qh, kh, vh, angles, out, lse = saved
        cos, sin = rotary.cos_sin(angles, interleaved)
        r = rotary.partner_matrix(qh.shape[-1], interleaved)
        dq, dk, dv = _backward(backend, qh, kh, vh, cos, sin, r, out, lse, _to_heads(g))
        shape = g.shape
        return (_from_heads(dq, shape).astype(qh.dtype), _from_heads(dk, shape).astype(kh.dtype),
                _from_heads(dv, shape).astype(vh.dtype), jnp.zeros_like(angles))

    attend.defvjp(fwd, bwd)
    return lambda q, k, v, *, angles, interleaved: attend(q, k, v, angles, interleaved)
