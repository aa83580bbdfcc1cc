"""Ring-buffer temporal attention for the streaming step: the cache read where it lies.

The `temporal_cache` entry of the attention seam (`lsd_jax.attention`); the reference is
`lsd_jax.attention.XLA.temporal_cache`, which rotates every cached key, concatenates the cache
with the new frame and builds a mask. Here each program takes a block of tokens of one stream
(all heads) and walks the ring's slots in place, in whatever order the ring holds them:

- the new frame's query and key are rotated to the newest window position; each slot's keys are
  rotated in the kernel by their age (`window - 1 - age`), so the cache stays un-rotated and is
  never copied or joined;
- slots that hold no history for this stream (`valid` false) get probability zero;
- the softmax over the `s + 1` keys is an online one (running max and sum, float32), starting
  from the new frame, which is always valid.

Each token attends only to the same token of earlier frames, so the scores are row-wise dot
products, not matrix products: the kernel is bound by reading the cache once. Only the streaming
step runs it (no gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lsd_kernels import rotary
from lsd_kernels.backends import Backend, block_size, full_spec

TOKEN_BLOCK = 16
# Bytes of one cache operand's block (all slots x a block of tokens x heads x head dim): the block
# shrinks for long rings so two double-buffered cache blocks and the slots' temporaries fit in
# VMEM (16 MiB scoped on v5e; the Oasis ring of 31 slots at 16 tokens does not).
RING_BLOCK_BYTES = 512 * 1024


def _kernel(q_ref, kn_ref, vn_ref, ck_ref, cv_ref, valid_ref, cos_ref, sin_ref, r_ref, o_ref, *,
            slots: int, scale: float):
    bn, h, e = q_ref.shape
    rows = bn * h
    r = r_ref[...]
    dtype = q_ref.dtype

    def rotated(x, row):
        x = x.reshape(rows, e).astype(jnp.float32)
        return rotary.rotate(x, cos_ref[row:row + 1, :], sin_ref[row:row + 1, :], r).astype(dtype)

    new = slots  # the table's last row is the new frame's position
    q = rotated(q_ref[...], new).astype(jnp.float32)
    k = rotated(kn_ref[...], new).astype(jnp.float32)
    m = jnp.sum(q * k, axis=-1, keepdims=True) * scale  # [rows, 1]
    total = jnp.ones_like(m)
    acc = vn_ref[...].reshape(rows, e).astype(jnp.float32)
    for i in range(slots):
        k = rotated(ck_ref[i], i).astype(jnp.float32)
        s = jnp.sum(q * k, axis=-1, keepdims=True) * scale
        s = jnp.where(valid_ref[:, i:i + 1] > 0, s, -jnp.inf)
        m_new = jnp.maximum(m, s)
        alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
        total = alpha * total + p
        acc = alpha * acc + p * cv_ref[i].reshape(rows, e).astype(jnp.float32)
        m = m_new
    o_ref[...] = (acc / total).reshape(bn, h, e).astype(o_ref.dtype)


def make(backend: Backend):
    """`temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved)`
    with the ring kernel on `backend`."""

    def temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved):
        b, _, n, h, e = q.shape
        s = cache_k.shape[1]
        window = angles.shape[0]
        cos, sin = rotary.cos_sin(angles, interleaved)  # [window, e]
        # One row per slot (by its age), then the new frame's: a gather over the angle table.
        position = jnp.concatenate([window - 1 - age, jnp.asarray([window - 1], age.dtype)])
        cos, sin = cos[position], sin[position]
        r = rotary.partner_matrix(e, interleaved)
        per_token = s * h * e * jnp.dtype(cache_k.dtype).itemsize
        # Tokens are a leading axis of every block here: any power of two tiles them.
        bn = block_size(n, min(TOKEN_BLOCK, max(1, RING_BLOCK_BYTES // per_token)), minimum=1)
        frame = pl.BlockSpec((None, None, bn, h, e), lambda i, j: (i, 0, j, 0, 0))
        ring = pl.BlockSpec((None, s, bn, h, e), lambda i, j: (i, 0, j, 0, 0))
        valid_spec = pl.BlockSpec((None, 1, s), lambda i, j: (i, 0, 0))
        return pl.pallas_call(
            functools.partial(_kernel, slots=s, scale=e ** -0.5),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            grid=(b, n // bn),
            in_specs=[frame, frame, frame, ring, ring, valid_spec, full_spec(cos.shape),
                      full_spec(sin.shape), full_spec(r.shape)],
            out_specs=frame,
            name="ring_temporal_attention",
            **backend.params(("parallel", "parallel")),
        )(q, k_new, v_new, cache_k, cache_v, valid.astype(jnp.int32)[:, None, :], cos, sin, r)

    return temporal_cache
