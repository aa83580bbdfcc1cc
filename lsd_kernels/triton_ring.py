"""Ring-buffer temporal attention (`AttentionImpl.temporal_cache`) as a plain Triton kernel,
called from JAX through `jax_triton.triton_call`.

One new frame attends over itself and one layer's ring-buffer cache, read in place through its
strides (no concatenation, no copy): one program per (stream, block of token positions, head)
walks the `s` slots with an online softmax in float32, rotating each cached key by its slot's
age inside the kernel and skipping invalid slots (their loads are masked off). Rotary pairs are
loaded as two `[tokens, e/2]` halves, `(2i, 2i+1)` (interleaved) or `(i, i + e/2)`, so the
rotation and the dot products never re-interleave. Inputs float32 or bfloat16 (the cache may
have its own dtype); the output has the queries' shape and dtype.

Runs on CUDA GPUs only (jax-triton needs jaxlib's CUDA plugin). `triton` and `jax_triton` are
imported inside functions, so this module imports anywhere. Triton 3.9 writes sm_90 PTX for its
CUDA 13 `ptxas-blackwell` (PTX ISA 9.x), which CUDA 12 tools and drivers cannot load; with those,
set `TRITON_PTXAS_BLACKWELL_PATH` to the wheel's CUDA 12.9 `ptxas` (PTX 8.8, same registers).

On CPU (tests/test_triton_kernels.py) the kernel body runs under Triton's interpreter
(`TRITON_INTERPRET=1`) on torch CPU tensors against `lsd_jax.attention.XLA.temporal_cache`, its
`jax.export` for cuda is lowered where jaxlib's CUDA plugin is installed, and
`lsd_kernels.triton_aot` compiles it for sm_90.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

tl: Any = None  # `triton.language`, bound by `ring_kernel()`: the kernel body's `tl`

# Elements of one [BLOCK_N, e/2] tile: 4 a thread at 4 warps, about 90 registers and no spill on
# sm_90 (twice that spills: `lsd kernels triton-aot`).
MAX_TILE = 512
NUM_WARPS = 4


def _ring_attention_kernel(
    q_ptr, k_new_ptr, v_new_ptr, cache_k_ptr, cache_v_ptr, age_ptr, valid_ptr, angles_ptr,
    n_tokens, n_slots, new_pos,
    stride_xb, stride_xn, stride_xh, stride_xe,
    stride_cb, stride_cs, stride_cn, stride_ch, stride_ce,
    stride_vb, stride_vs, stride_aw, stride_ae,
    out_ptr,
    QK_SCALE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Program (stream b, token block, head h). `x` strides are shared by q, k_new, v_new and
    out, `c` strides by cache_k and cache_v; `valid` is int32 `[b, s]`, `age` int32 `[s]`
    contiguous. QK_SCALE = log2(e) / sqrt(head_dim): logits are in base 2 (exp2)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_h = tl.program_id(2)
    tok = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = tok < n_tokens
    pair = tl.arange(0, HALF)
    if INTERLEAVED:
        d1 = 2 * pair
        d2 = 2 * pair + 1
    else:
        d1 = pair
        d2 = pair + HALF
    mask = tok_ok[:, None]

    # The new frame: q, k_new at window position new_pos.
    x_rows = pid_b * stride_xb + tok[:, None] * stride_xn + pid_h * stride_xh
    x1 = x_rows + d1[None, :] * stride_xe
    x2 = x_rows + d2[None, :] * stride_xe
    angle = tl.load(angles_ptr + new_pos * stride_aw + pair * stride_ae)[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    q1 = tl.load(q_ptr + x1, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + x2, mask=mask, other=0.0).to(tl.float32)
    q1, q2 = (q1 * cos - q2 * sin) * QK_SCALE, (q2 * cos + q1 * sin) * QK_SCALE
    k1 = tl.load(k_new_ptr + x1, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_new_ptr + x2, mask=mask, other=0.0).to(tl.float32)
    # The new frame is always attended: it starts the running max, so no row is ever all -inf.
    m = tl.sum(q1 * (k1 * cos - k2 * sin) + q2 * (k2 * cos + k1 * sin), axis=1)
    denom = tl.full([BLOCK_N], 1.0, tl.float32)
    acc1 = tl.load(v_new_ptr + x1, mask=mask, other=0.0).to(tl.float32)
    acc2 = tl.load(v_new_ptr + x2, mask=mask, other=0.0).to(tl.float32)

    c_rows = pid_b * stride_cb + tok[:, None] * stride_cn + pid_h * stride_ch
    c1 = c_rows + d1[None, :] * stride_ce
    c2 = c_rows + d2[None, :] * stride_ce
    for j in range(n_slots):
        ok = tl.load(valid_ptr + pid_b * stride_vb + j * stride_vs) != 0
        age = tl.load(age_ptr + j)
        angle = tl.load(angles_ptr + (new_pos - age) * stride_aw + pair * stride_ae)[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        # Token rows of a valid slot. (`mask & ok` is right too, but Triton's interpreter turns
        # a bool block & a bool scalar into int32, which it then rejects as a load mask.)
        slot_mask = (tok < tl.where(ok, n_tokens, 0))[:, None]
        k1 = tl.load(cache_k_ptr + j * stride_cs + c1, mask=slot_mask, other=0.0).to(tl.float32)
        k2 = tl.load(cache_k_ptr + j * stride_cs + c2, mask=slot_mask, other=0.0).to(tl.float32)
        logit = tl.sum(q1 * (k1 * cos - k2 * sin) + q2 * (k2 * cos + k1 * sin), axis=1)
        logit = tl.where(ok, logit, -float("inf"))
        m_new = tl.maximum(m, logit)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(logit - m_new)
        v1 = tl.load(cache_v_ptr + j * stride_cs + c1, mask=slot_mask, other=0.0).to(tl.float32)
        v2 = tl.load(cache_v_ptr + j * stride_cs + c2, mask=slot_mask, other=0.0).to(tl.float32)
        acc1 = acc1 * alpha[:, None] + p[:, None] * v1
        acc2 = acc2 * alpha[:, None] + p[:, None] * v2
        denom = denom * alpha + p
        m = m_new

    inv = (1.0 / denom)[:, None]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + x1, (acc1 * inv).to(out_ty), mask=mask)
    tl.store(out_ptr + x2, (acc2 * inv).to(out_ty), mask=mask)


@functools.cache
def ring_kernel():
    """`_ring_attention_kernel` under `triton.jit` (a JIT function, or Triton's interpreted one
    under `TRITON_INTERPRET=1`). Imports triton."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_ring_attention_kernel)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch(
    q_shape: Sequence[int], cache_shape: Sequence[int], window: int, *, interleaved: bool,
    x_strides: Sequence[int], cache_strides: Sequence[int], valid_strides: Sequence[int],
    angle_strides: Sequence[int], block_n: int | None = None,
) -> tuple[tuple[int, int, int], tuple[int, ...], dict[str, Any]]:
    """(grid, scalar arguments, constexpr arguments) of one launch: the scalars go between the
    array inputs and `out`, in the kernel's order. Strides are in elements."""
    b, one, n, heads, e = q_shape
    if one != 1 or tuple(cache_shape[:1]) != (b,) or tuple(cache_shape[2:]) != (n, heads, e):
        raise ValueError(f"queries {tuple(q_shape)} and cache {tuple(cache_shape)} do not match "
                         "([b, 1, n, heads, e] and [b, s, n, heads, e])")
    half = e // 2
    if e % 2 or half != _pow2(half):
        raise ValueError(f"head_dim {e} must be twice a power of two")
    if block_n is None:
        block_n = min(_pow2(n), max(1, MAX_TILE // half), 64)
    grid = (b, -(-n // block_n), heads)
    scalars = (n, cache_shape[1], window - 1, *x_strides[:1], *x_strides[2:], *cache_strides,
               *valid_strides, *angle_strides)
    meta = dict(QK_SCALE=math.log2(math.e) / math.sqrt(e), HALF=half, BLOCK_N=block_n,
                INTERLEAVED=bool(interleaved))
    return grid, scalars, meta


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides in elements (a JAX array's layout as the kernel sees it)."""
    out, step = [], 1
    for dim in reversed(shape):
        out.append(step)
        step *= dim
    return tuple(reversed(out))


def _temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved,
                    compute_capability: int | None):
    import jax_triton

    if k_new.shape != q.shape or v_new.shape != q.shape or cache_v.shape != cache_k.shape:
        raise ValueError("q, k_new, v_new share one shape, cache_k and cache_v another")
    valid = valid.astype(jnp.int32)
    grid, scalars, meta = launch(
        q.shape, cache_k.shape, angles.shape[0], interleaved=interleaved,
        x_strides=_strides(q.shape), cache_strides=_strides(cache_k.shape),
        valid_strides=_strides(valid.shape), angle_strides=_strides(angles.shape))
    return jax_triton.triton_call(
        q, k_new, v_new, cache_k, cache_v, age.astype(jnp.int32), valid,
        angles.astype(jnp.float32), *scalars, kernel=ring_kernel(),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=grid, num_warps=NUM_WARPS,
        num_stages=1, compute_capability=compute_capability, name="ring_attention", **meta)


def temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved):
    """`AttentionImpl.temporal_cache` (see `lsd_jax.attention`) on the GPU of the lowering
    process (its compute capability is read at lowering)."""
    return _temporal_cache(q, k_new, v_new, cache_k, cache_v, age=age, valid=valid,
                           angles=angles, interleaved=interleaved, compute_capability=None)


def temporal_cache_for(compute_capability: int) -> Callable[..., jnp.ndarray]:
    """`temporal_cache` compiled for a fixed compute capability (90: H100), so it lowers, for
    `jax.export`, where no GPU is visible."""
    return functools.partial(_temporal_cache, compute_capability=compute_capability)
