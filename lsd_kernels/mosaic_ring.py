"""Ring-buffer temporal attention on Mosaic GPU (Hopper): the streaming step's attention over one
layer's ring-buffer cache, read in place by TMA.

The `temporal_cache` entry of the attention seam (`lsd_jax.attention`); the reference is
`lsd_jax.attention.XLA.temporal_cache`. Each token attends only to the same token of earlier
frames, so the cache `[b, s, n, heads, e]` is viewed (no copy) as `[b, s, n*heads, e]`: rows of
(token, head), a 64-row tile per block, one block per (stream, 64 rows). A memory warpgroup
streams each slot's key and value tiles through `SLOTS` buffers; the compute warpgroup

- starts the online softmax (float32, base 2) from the new frame (always valid): its query and
  key, rotated to the newest window position by `lsd_jax.rope.apply_rope` outside the kernel
  (one small frame), and its value;
- rotates each slot's keys by the slot's age inside the kernel: `k @ R` by WGMMA against the
  signed pair-permutation matrix `R` (`lsd_kernels.rotary`; exact: one +-1 per column), then
  `k cos + (k @ R) sin` with the slot's angles, rounded to the cache dtype as the reference
  rounds its rotated keys;
- adds the stream's slot bias (0, or -inf where the slot holds none of its history) to the row
  dot products and folds the slot into the running max, sum and value accumulator.

Rows are padded to a multiple of 64 and the head dim to one 128-byte swizzled row where a shape
needs it (a copy of the cache: the configs' shapes, 144 tokens x 16 heads x 64, need none). Only
the streaming step runs it (no gradient). Compute dtypes: a bfloat16 (or float16) cache on the
GPU, where WGMMA multiplies 16-bit operands; the interpreter also runs float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from lsd_jax import rope
from lsd_kernels import mosaic_gpu as mg
from lsd_kernels import rotary

BLOCK = 64  # (token, head) rows of one tile
SLOTS = 3  # slots in flight per streamed operand
LOG2E = math.log2(math.e)


def _ring(q, kn, vn, cache_k, cache_v, bias, cos, sin, r, *, scale: float, interpret: bool):
    """q, kn, vn `[b, R, e]` (rotated), cache `[b, s, R, e]`, bias `[b, s32]` float32, cos/sin
    `[s, e]` float32, r `[e, e]` in the cache dtype -> out `[b, R, e]`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, rows, e = q.shape
    s = cache_k.shape[1]
    dtype, cdtype = q.dtype, cache_k.dtype
    slots = min(SLOTS, s)
    qt, ct = mg.tile_transforms(dtype), mg.tile_transforms(cdtype)
    wgmma = plgpu.Layout.WGMMA
    row, col = wgmma.reduce(1), wgmma.reduce(0)
    scale = scale * LOG2E

    def body(q_ref, kn_ref, vn_ref, ck_ref, cv_ref, bias_ref, cos_ref, sin_ref, r_ref, o_ref,
             new_smem, r_smem, bias_smem, cos_smem, sin_smem, ready,
             k_buf, k_ready, k_free, v_buf, v_ready, v_free):
        stream, wg = lax.axis_index("stream"), lax.axis_index("wg")
        tile = pl.ds(lax.axis_index("rows") * BLOCK, BLOCK)

        @pl.when(wg == 0)
        def _compute():
            sources = (q_ref.at[stream, tile], kn_ref.at[stream, tile], vn_ref.at[stream, tile])
            for i, src in enumerate(sources):
                plgpu.copy_gmem_to_smem(src, new_smem.at[i], ready.at[i])
            for i, (src, dst) in enumerate(((r_ref, r_smem), (bias_ref.at[stream], bias_smem),
                                            (cos_ref, cos_smem), (sin_ref, sin_smem))):
                plgpu.copy_gmem_to_smem(src, dst, ready.at[3 + i])
            for i in range(7):
                plgpu.barrier_wait(ready.at[i])
            q = plgpu.layout_cast(new_smem.at[0][...], wgmma).astype(jnp.float32) * scale
            kn = plgpu.layout_cast(new_smem.at[1][...], wgmma).astype(jnp.float32)
            acc = plgpu.layout_cast(new_smem.at[2][...], wgmma).astype(jnp.float32)
            m = (q * kn).sum(axis=1)
            total = plgpu.layout_cast(jnp.ones((BLOCK,), jnp.float32), row)

            def step(j, carry):
                acc, m, total = carry
                slot = lax.rem(j, slots)
                plgpu.barrier_wait(k_ready.at[slot])

                def partner(acc_ref):
                    plgpu.wgmma(acc_ref, k_buf.at[slot], r_smem)
                    return acc_ref[...]

                k_r = pl.run_scoped(partner, plgpu.ACC((BLOCK, e), jnp.float32))
                k = plgpu.layout_cast(k_buf.at[slot][...], wgmma).astype(jnp.float32)
                plgpu.barrier_arrive(k_free.at[slot])
                cos_j = lax.broadcast_in_dim(plgpu.layout_cast(cos_smem.at[j][...], col),
                                             k.shape, [1])
                sin_j = lax.broadcast_in_dim(plgpu.layout_cast(sin_smem.at[j][...], col),
                                             k.shape, [1])
                k = (k * cos_j + k_r * sin_j).astype(cdtype).astype(jnp.float32)
                logit = (q * k).sum(axis=1) + bias_smem[j]
                m_new = jnp.maximum(m, logit)
                alpha, p = jnp.exp2(m - m_new), jnp.exp2(logit - m_new)
                plgpu.barrier_wait(v_ready.at[slot])
                v = plgpu.layout_cast(v_buf.at[slot][...], wgmma).astype(jnp.float32)
                plgpu.barrier_arrive(v_free.at[slot])
                acc = (acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                       + v * lax.broadcast_in_dim(p, v.shape, [0]))
                return acc, m_new, total * alpha + p

            acc, _, total = lax.fori_loop(0, s, step, (acc, m, total))
            out = new_smem.at[0]
            out[...] = (acc / lax.broadcast_in_dim(total, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, o_ref.at[stream, tile])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            mg.produce([
                mg.Stream(lambda j: ck_ref.at[stream, j, tile], k_buf, k_ready, k_free),
                mg.Stream(lambda j: cv_ref.at[stream, j, tile], v_buf, v_ready, v_free),
            ], s, slots)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[
            plgpu.SMEM((3, BLOCK, e), dtype, transforms=qt),
            plgpu.SMEM((e, e), cdtype, transforms=ct),
            plgpu.SMEM(bias.shape[1:], jnp.float32),
            plgpu.SMEM(cos.shape, jnp.float32),
            plgpu.SMEM(sin.shape, jnp.float32),
            plgpu.Barrier(num_barriers=7),
            *mg.stream_scratch((BLOCK, e), cdtype, slots, 1, ct),
            *mg.stream_scratch((BLOCK, e), cdtype, slots, 1, ct),
        ],
        grid=(b, rows // BLOCK), grid_names=("stream", "rows"),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=mg.interpret_params(interpret),
    )(q, kn, vn, cache_k, cache_v, bias, cos, sin, r)


def make(interpret: bool = False):
    """`temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved)`
    with the Mosaic GPU ring kernel; `interpret=True` runs it under the Mosaic GPU interpreter."""

    def temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved):
        b, _, n, h, e = q.shape
        s = cache_k.shape[1]
        new_pos = angles.shape[0] - 1
        q = rope.apply_rope(q, angles[new_pos], interleaved=interleaved)
        k_new = rope.apply_rope(k_new, angles[new_pos], interleaved=interleaved)
        # Per slot: the angles of its frame's window position, per head dim.
        cos, sin = rotary.cos_sin(angles[new_pos - age], interleaved)  # [s, e]
        rows = n * h
        rows_pad = mg.round_up(rows, BLOCK)
        e_pad = mg.round_up(e, max(mg.lane_multiple(q.dtype), mg.lane_multiple(cache_k.dtype)))

        def frame(x):
            return jnp.pad(x.reshape(b, rows, e), ((0, 0), (0, rows_pad - rows), (0, e_pad - e)))

        def ring(x):
            x = x.reshape(b, s, rows, e)  # a view of the cache: no copy
            if (rows_pad, e_pad) != (rows, e):
                x = jnp.pad(x, ((0, 0), (0, 0), (0, rows_pad - rows), (0, e_pad - e)))
            return x

        table = lambda x: jnp.pad(x, ((0, 0), (0, e_pad - e)))  # noqa: E731
        r = jnp.pad(rotary.partner_matrix(e, interleaved), ((0, e_pad - e), (0, e_pad - e)))
        # A copy moves a multiple of 128 bytes (one per thread of the warpgroup issuing it): the
        # bias row is padded to a multiple of 32 slots.
        bias = jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)
        bias = jnp.pad(bias, ((0, 0), (0, mg.round_up(s, 32) - s)))
        out = _ring(frame(q), frame(k_new), frame(v_new), ring(cache_k), ring(cache_v), bias,
                    table(cos), table(sin), r.astype(cache_k.dtype), scale=e ** -0.5,
                    interpret=interpret)
        return out[:, :rows, :e].reshape(b, 1, n, h, e)

    return temporal_cache
