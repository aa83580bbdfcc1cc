"""Spatial flash attention on Mosaic GPU (Hopper: TMA, WGMMA, a memory warpgroup beside the compute
warpgroups), forward and backward, each a Mosaic GPU kernel.

The `spatial` entry of the attention seam (`lsd_jax.attention`); the reference is
`lsd_jax.attention.XLA.spatial`. Outside the kernels, in one XLA fusion per operand: queries and
keys are rotated by `lsd_jax.rope.apply_rope` (the reference's own rotation, so the kernel sees
the same rounded operands), the model's `[b, t, n, heads, e]` is viewed as `[F = b*t, n, heads,
e]` (no copy), tokens are padded to a multiple of the 64-row tile and the head dim to a multiple
of one 128-byte swizzled row (64 bf16), and the operands a product needs transposed are written
transposed (`[F, heads, e, n]`): see `lsd_kernels.mosaic_gpu` for why the kernels never transpose
in shared memory. Padded keys are masked in the forward; in the backward they and padded queries
contribute zero (their keys, and the padded queries' output gradients, are zero).

- forward (`_forward`): a block per (head, 64 or 128 queries, frame); one or two compute
  warpgroups each own 64 queries, a memory warpgroup streams 64-key tiles of `K^T` and `V`
  through `SLOTS` buffers; per tile `S = Q K^T` (WGMMA), the online softmax in registers (base-2,
  float32), `P` stored to shared memory and `O += P V` (WGMMA). Writes `O` and the log-sum-exp.
- `dq` (`_dq`): a block per (head, 64 queries, frame) streaming `K^T`, `K`, `V^T`: recompute
  `P = exp(S - lse)`, `dP = dO V^T`, `dS = P (dP - delta)`, `dQ += dS K`.
- `dk, dv` (`_dkdv`): a block per (head, 64 keys, frame) streaming `Q^T`, `Q`, `dO^T`, `dO`, lse
  and `delta = rowsum(dO * O)`: `S^T = K Q^T`, `P^T = exp(S^T - lse)`, `dV += P^T dO`,
  `dP^T = V dO^T`, `dS^T = P^T (dP^T - delta)`, `dK += dS^T Q`.

Gradients leave the kernels in float32; the rotation's gradient is JAX's, through `apply_rope`.
Compute dtypes: bfloat16 (and float16) on the GPU, where WGMMA multiplies 16-bit operands; the
interpreter also runs float32, which checks the algorithm to float32 precision on the CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lsd_jax import rope
from lsd_kernels import mosaic_gpu as mg

BLOCK = 64  # query and key rows of one tile: one warpgroup's WGMMA rows
SLOTS = 2  # tiles in flight per streamed operand
LOG2E = math.log2(math.e)
# Registers per thread of the compute and memory warpgroups of a 384-thread block (two compute
# warpgroups): 2 * 232 + 40 = 504 of the 3 * 168 a block of 384 threads gets on one SM.
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40


def _plgpu():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return pl, plgpu


def _compute_wgs(rows: int) -> int:
    """Compute warpgroups per block: two when the padded rows split into pairs of tiles."""
    return 2 if rows % (2 * BLOCK) == 0 else 1


def _params(compute_wgs: int):
    _, plgpu = _plgpu()
    return plgpu.CompilerParams(approx_math=True)


def _forward(q, kt, v, *, n_valid: int, scale: float, interpret: bool):
    """q, v `[F, n, H, e]`, kt `[F, H, e, n]` (n, e padded) -> out `[F, n, H, e]`, lse `[F, H, n]`
    (natural log, float32)."""
    pl, plgpu = _plgpu()
    f_count, n, heads, e = q.shape
    dtype = q.dtype
    wgs = _compute_wgs(n)
    steps = n // BLOCK
    slots = min(SLOTS, steps)
    full, tail = divmod(n_valid, BLOCK)
    scale = scale * LOG2E
    tiles = mg.tile_transforms(dtype)
    row = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, kt_ref, v_ref, o_ref, lse_ref, q_smem, p_smem, lse_smem, q_ready,
             kt_buf, kt_ready, kt_free, v_buf, v_ready, v_free):
        frame, head = lax.axis_index("frame"), lax.axis_index("head")
        wg = lax.axis_index("wg")

        @pl.when(wg < wgs)
        def _compute():
            if wgs == 2:  # FlashAttention-3's split of a 384-thread block's registers
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            rows = pl.ds((lax.axis_index("q") * wgs + wg) * BLOCK, BLOCK)
            q_tile, p_tile = q_smem.at[wg], p_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[frame, rows, head], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            def step(j, carry, valid=None):
                acc, m, total = carry
                slot = lax.rem(j, slots)
                plgpu.barrier_wait(kt_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, kt_buf.at[slot])
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32)) * scale
                plgpu.barrier_arrive(kt_free.at[slot])
                if valid is not None:  # the last key tile holds padding
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1,
                                                  layout=plgpu.Layout.WGMMA)
                    s = jnp.where(cols < valid, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                total = total * alpha + p.sum(axis=1)
                p_tile[...] = p.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_ready.at[slot])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_tile, v_buf.at[slot])
                    return acc_ref[...]

                pv_out = pl.run_scoped(pv, plgpu.ACC((BLOCK, e), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_out
                return acc, m_new, total

            carry = (plgpu.layout_cast(jnp.zeros((BLOCK, e), jnp.float32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row),
                     plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), row))
            carry = lax.fori_loop(0, full, step, carry)
            if tail:
                carry = step(full, carry, valid=tail)
            acc, m, total = carry
            q_tile[...] = (acc / lax.broadcast_in_dim(total, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log2(total)) * (1 / LOG2E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[frame, rows, head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[frame, head, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            if wgs == 2:
                plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
            mg.produce([
                mg.Stream(lambda j: kt_ref.at[frame, head, :, pl.ds(j * BLOCK, BLOCK)], kt_buf,
                          kt_ready, kt_free),
                mg.Stream(lambda j: v_ref.at[frame, pl.ds(j * BLOCK, BLOCK), head], v_buf,
                          v_ready, v_free),
            ], steps, slots)

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((f_count, heads, n), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((wgs, BLOCK, e), dtype, transforms=tiles),
            plgpu.SMEM((wgs, BLOCK, BLOCK), dtype, transforms=tiles),
            plgpu.SMEM((wgs, BLOCK), jnp.float32),
            plgpu.Barrier(num_barriers=wgs),
            *mg.stream_scratch((e, BLOCK), dtype, slots, wgs, tiles),
            *mg.stream_scratch((BLOCK, e), dtype, slots, wgs, tiles),
        ],
        grid=(heads, n // (BLOCK * wgs), f_count), grid_names=("head", "q", "frame"),
        num_threads=wgs + 1, thread_name="wg", compiler_params=_params(wgs),
        interpret=mg.interpret_params(interpret),
    )(q, kt, v)


def _dq(q, do, lse, delta, k, kt, vt, *, scale: float, interpret: bool):
    """dq `[F, n, H, e]` float32 of the rotated, padded queries."""
    pl, plgpu = _plgpu()
    f_count, n, heads, e = q.shape
    dtype = q.dtype
    steps = n // BLOCK
    slots = min(SLOTS, steps)
    tiles, tiles32 = mg.tile_transforms(dtype), mg.tile_transforms(jnp.float32)
    row = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, do_ref, lse_ref, delta_ref, k_ref, kt_ref, vt_ref, dq_ref,
             q_smem, do_smem, lse_smem, delta_smem, ds_smem, out_smem, ready,
             kt_buf, kt_ready, kt_free, k_buf, k_ready, k_free, vt_buf, vt_ready, vt_free):
        frame, head = lax.axis_index("frame"), lax.axis_index("head")
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _compute():
            rows = pl.ds(lax.axis_index("q") * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(q_ref.at[frame, rows, head], q_smem, ready.at[0])
            plgpu.copy_gmem_to_smem(do_ref.at[frame, rows, head], do_smem, ready.at[1])
            plgpu.copy_gmem_to_smem(lse_ref.at[frame, head, rows], lse_smem, ready.at[2])
            plgpu.copy_gmem_to_smem(delta_ref.at[frame, head, rows], delta_smem, ready.at[3])
            for i in range(4):
                plgpu.barrier_wait(ready.at[i])
            lse = plgpu.layout_cast(lse_smem[...], row) * LOG2E
            delta = plgpu.layout_cast(delta_smem[...], row)

            def step(j, dq):
                slot = lax.rem(j, slots)
                plgpu.barrier_wait(kt_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, kt_buf.at[slot])
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                plgpu.barrier_arrive(kt_free.at[slot])
                p = jnp.exp2(s * (scale * LOG2E) - lax.broadcast_in_dim(lse, s.shape, [0]))
                plgpu.barrier_wait(vt_ready.at[slot])

                def dov(acc_ref):
                    plgpu.wgmma(acc_ref, do_smem, vt_buf.at[slot])
                    return acc_ref[...]

                dp = pl.run_scoped(dov, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                plgpu.barrier_arrive(vt_free.at[slot])
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                ds_smem[...] = ds.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(k_ready.at[slot])

                def dsk(acc_ref):
                    plgpu.wgmma(acc_ref, ds_smem, k_buf.at[slot])
                    return acc_ref[...]

                out = dq + pl.run_scoped(dsk, plgpu.ACC((BLOCK, e), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                return out

            dq = lax.fori_loop(0, steps, step, plgpu.layout_cast(
                jnp.zeros((BLOCK, e), jnp.float32), plgpu.Layout.WGMMA))
            out_smem[...] = dq * scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, dq_ref.at[frame, rows, head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            keys = lambda j: pl.ds(j * BLOCK, BLOCK)  # noqa: E731
            mg.produce([
                mg.Stream(lambda j: kt_ref.at[frame, head, :, keys(j)], kt_buf, kt_ready,
                          kt_free),
                mg.Stream(lambda j: k_ref.at[frame, keys(j), head], k_buf, k_ready, k_free),
                mg.Stream(lambda j: vt_ref.at[frame, head, :, keys(j)], vt_buf, vt_ready,
                          vt_free),
            ], steps, slots)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        scratch_types=[
            plgpu.SMEM((BLOCK, e), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK, e), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK,), jnp.float32),
            plgpu.SMEM((BLOCK,), jnp.float32),
            plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK, e), jnp.float32, transforms=tiles32),
            plgpu.Barrier(num_barriers=4),
            *mg.stream_scratch((e, BLOCK), dtype, slots, 1, tiles),
            *mg.stream_scratch((BLOCK, e), dtype, slots, 1, tiles),
            *mg.stream_scratch((e, BLOCK), dtype, slots, 1, tiles),
        ],
        grid=(heads, n // BLOCK, f_count), grid_names=("head", "q", "frame"),
        num_threads=2, thread_name="wg", compiler_params=_params(1),
        interpret=mg.interpret_params(interpret),
    )(q, do, lse, delta, k, kt, vt)


def _dkdv(k, v, q, qt, do, dot, lse, delta, *, scale: float, interpret: bool):
    """dk, dv `[F, n, H, e]` float32 of the rotated, padded keys and the values."""
    pl, plgpu = _plgpu()
    f_count, n, heads, e = k.shape
    dtype = k.dtype
    steps = n // BLOCK
    slots = min(SLOTS, steps)
    tiles, tiles32 = mg.tile_transforms(dtype), mg.tile_transforms(jnp.float32)
    col = plgpu.Layout.WGMMA.reduce(0)

    def body(k_ref, v_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, dk_ref, dv_ref,
             k_smem, v_smem, pt_smem, dst_smem, out_smem, ready,
             qt_buf, qt_ready, qt_free, q_buf, q_ready, q_free, dot_buf, dot_ready, dot_free,
             do_buf, do_ready, do_free, lse_buf, lse_ready, lse_free,
             delta_buf, delta_ready, delta_free):
        frame, head = lax.axis_index("frame"), lax.axis_index("head")
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _compute():
            rows = pl.ds(lax.axis_index("kv") * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[frame, rows, head], k_smem, ready.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[frame, rows, head], v_smem, ready.at[1])
            plgpu.barrier_wait(ready.at[0])
            plgpu.barrier_wait(ready.at[1])

            def step(j, carry):
                dk, dv = carry
                slot = lax.rem(j, slots)
                plgpu.barrier_wait(qt_ready.at[slot])

                def kq(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, qt_buf.at[slot])
                    return acc_ref[...]

                st = pl.run_scoped(kq, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                plgpu.barrier_arrive(qt_free.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                lse = plgpu.layout_cast(lse_buf.at[slot][...], col) * LOG2E
                plgpu.barrier_arrive(lse_free.at[slot])
                pt = jnp.exp2(st * (scale * LOG2E) - lax.broadcast_in_dim(lse, st.shape, [1]))
                pt_smem[...] = pt.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(do_ready.at[slot])

                def pdo(acc_ref):
                    plgpu.wgmma(acc_ref, pt_smem, do_buf.at[slot])
                    return acc_ref[...]

                dv = dv + pl.run_scoped(pdo, plgpu.ACC((BLOCK, e), jnp.float32))
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(dot_ready.at[slot])

                def vdo(acc_ref):
                    plgpu.wgmma(acc_ref, v_smem, dot_buf.at[slot])
                    return acc_ref[...]

                dpt = pl.run_scoped(vdo, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
                plgpu.barrier_arrive(dot_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta = plgpu.layout_cast(delta_buf.at[slot][...], col)
                plgpu.barrier_arrive(delta_free.at[slot])
                dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
                dst_smem[...] = dst.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(q_ready.at[slot])

                def dsq(acc_ref):
                    plgpu.wgmma(acc_ref, dst_smem, q_buf.at[slot])
                    return acc_ref[...]

                dk = dk + pl.run_scoped(dsq, plgpu.ACC((BLOCK, e), jnp.float32))
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros((BLOCK, e), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, steps, step, (zeros, zeros))
            out_smem.at[0][...] = dk * scale
            out_smem.at[1][...] = dv
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[0], dk_ref.at[frame, rows, head])
            plgpu.copy_smem_to_gmem(out_smem.at[1], dv_ref.at[frame, rows, head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            qs = lambda j: pl.ds(j * BLOCK, BLOCK)  # noqa: E731
            mg.produce([
                mg.Stream(lambda j: qt_ref.at[frame, head, :, qs(j)], qt_buf, qt_ready, qt_free),
                mg.Stream(lambda j: lse_ref.at[frame, head, qs(j)], lse_buf, lse_ready,
                          lse_free),
                mg.Stream(lambda j: do_ref.at[frame, qs(j), head], do_buf, do_ready, do_free),
                mg.Stream(lambda j: dot_ref.at[frame, head, :, qs(j)], dot_buf, dot_ready,
                          dot_free),
                mg.Stream(lambda j: delta_ref.at[frame, head, qs(j)], delta_buf, delta_ready,
                          delta_free),
                mg.Stream(lambda j: q_ref.at[frame, qs(j), head], q_buf, q_ready, q_free),
            ], steps, slots)

    grad = jax.ShapeDtypeStruct(k.shape, jnp.float32)
    return plgpu.kernel(
        body,
        out_type=(grad, grad),
        scratch_types=[
            plgpu.SMEM((BLOCK, e), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK, e), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=tiles),
            plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=tiles),
            plgpu.SMEM((2, BLOCK, e), jnp.float32, transforms=tiles32),
            plgpu.Barrier(num_barriers=2),
            *mg.stream_scratch((e, BLOCK), dtype, slots, 1, tiles),
            *mg.stream_scratch((BLOCK, e), dtype, slots, 1, tiles),
            *mg.stream_scratch((e, BLOCK), dtype, slots, 1, tiles),
            *mg.stream_scratch((BLOCK, e), dtype, slots, 1, tiles),
            *mg.stream_scratch((BLOCK,), jnp.float32, slots, 1),
            *mg.stream_scratch((BLOCK,), jnp.float32, slots, 1),
        ],
        grid=(heads, n // BLOCK, f_count), grid_names=("head", "kv", "frame"),
        num_threads=2, thread_name="wg", compiler_params=_params(1),
        interpret=mg.interpret_params(interpret),
    )(k, v, q, qt, do, dot, lse, delta)


# ----------------------------------------------------------------------------- the seam


def _frames(x, n_pad: int, e_pad: int):
    """`[b, t, n, H, e]` -> `[F, n_pad, H, e_pad]` (zeros in the padding)."""
    b, t, n, h, e = x.shape
    return jnp.pad(x.reshape(b * t, n, h, e), ((0, 0), (0, n_pad - n), (0, 0), (0, e_pad - e)))


def _t(x):
    """`[F, n, H, e]` -> `[F, H, e, n]`."""
    return x.transpose(0, 2, 3, 1)


def _padded_sizes(n: int, e: int, dtype) -> tuple[int, int]:
    return mg.round_up(n, BLOCK), mg.round_up(e, mg.lane_multiple(dtype))


def make(interpret: bool = False):
    """`spatial(q, k, v, *, angles, interleaved)` with the Mosaic GPU kernels (forward and
    backward); `interpret=True` runs them under the Mosaic GPU interpreter on the CPU."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def core(q, k, v, n_valid, scale):
        return _core_fwd(q, k, v, n_valid, scale)[0]

    def _core_fwd(q, k, v, n_valid, scale):
        """Rotated, padded `[F, n, H, e]` q, k, v -> out (same layout), residuals."""
        out, lse = _forward(q, _t(k), v, n_valid=n_valid, scale=scale, interpret=interpret)
        return out, (q, k, v, out, lse)

    def _core_bwd(n_valid, scale, saved, g):
        del n_valid  # padded keys are zero: they add nothing to dq (module docstring)
        q, k, v, out, lse = saved
        delta = jnp.einsum("fnhe,fnhe->fhn", g.astype(jnp.float32), out.astype(jnp.float32))
        do = g.astype(q.dtype)
        dq = _dq(q, do, lse, delta, k, _t(k), _t(v), scale=scale, interpret=interpret)
        dk, dv = _dkdv(k, v, q, _t(q), do, _t(do), lse, delta, scale=scale,
                       interpret=interpret)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    core.defvjp(_core_fwd, _core_bwd)

    def spatial(q, k, v, *, angles, interleaved):
        b, t, n, h, e = q.shape
        angles_n1e = angles[:, None, :]
        q = rope.apply_rope(q, angles_n1e, interleaved=interleaved)
        k = rope.apply_rope(k, angles_n1e, interleaved=interleaved)
        n_pad, e_pad = _padded_sizes(n, e, q.dtype)
        out = core(*(_frames(x, n_pad, e_pad) for x in (q, k, v)), n, e ** -0.5)
        return out[:, :n, :, :e].reshape(b, t, n, h, e)

    return spatial
