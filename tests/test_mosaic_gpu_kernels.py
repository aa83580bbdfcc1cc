"""The Mosaic GPU kernels (`lsd_kernels/mosaic_flash.py`, `mosaic_ring.py`) and the `cudnn` row on a
machine without a GPU: the kernels under JAX's Mosaic GPU interpreter against the pure-JAX
reference at sizes where their tiles loop (several key tiles with a padded tail, two compute
warpgroups, several row blocks); their export for `cuda` (one `mosaic_gpu_v2` custom call per
kernel) for the seam, the streaming step and the train step; the figures of the lowered kernels
(threads, shared memory, WGMMA shapes, TMA loads, H100 occupancy); the `cudnn` row lowered for
`cuda` with cuDNN's fused attention calls. `tests/test_attention_seam.py` runs the
`mosaic_gpu_interpret` row at the seam's small shapes with every other row."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS, REPO_ROOT, rel_err

from lsd_jax import kernels, rope
from lsd_jax.attention import CUDNN, XLA
from lsd_jax.config import apply_overrides, load_config
from lsd_jax.lowering import UNGUARANTEED_CALLS
from lsd_kernels import impls, mosaic_flash, mosaic_gpu, mosaic_ring
from lsd_kernels.cudnn_lowering import assume_cudnn

TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # the policy of tests/test_attention_seam.py
MOSAIC_CALL = "mosaic_gpu_v2"


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


@pytest.fixture(scope="module")
def interpreter():
    why = mosaic_gpu.interpreter_available()
    if why:
        pytest.skip(why)


def _calls(exported) -> list[str]:
    return re.findall(r"custom_call @([^(\s]+)\(", exported.mlir_module())


def _spatial_case(grid, heads, head_dim, dtype, frames=(1, 1)):
    n = grid[0] * grid[1]
    arrays = tuple(_normal(i, (*frames, n, heads, head_dim), dtype) for i in range(3))
    angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(head_dim)), *grid)
    return arrays, angles, _normal(7, arrays[0].shape)


def _value_and_grad(impl, angles, cot, interleaved=True):
    def fn(*a):
        out = impl.spatial(*a, angles=angles, interleaved=interleaved)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("case", [
    # 144 tokens (lsd_base's frame): three 64-key tiles, the last with 48 keys and 16 of padding;
    # one compute warpgroup per block.
    ("float32", (12, 12), 16, False),
    # 128 tokens: two query tiles per block, two compute warpgroups, no padding.
    ("float32", (8, 16), 16, True),
    ("bfloat16", (12, 12), 64, True),
])
def test_flash_over_several_tiles(interpreter, case):
    """Forward and the gradients of q, k, v (both backward kernels) against the reference."""
    dtype, grid, head_dim, interleaved = case
    arrays, angles, cot = _spatial_case(grid, 1, head_dim, dtype)
    assert arrays[0].shape[2] > mosaic_flash.BLOCK
    (_, out), grads = _value_and_grad(impls.MOSAIC_GPU_INTERPRET, angles, cot, interleaved)(
        *arrays)
    (_, ref), ref_grads = _value_and_grad(XLA, angles, cot, interleaved)(
        *(a.astype(jnp.float32) for a in arrays))
    assert out.dtype == jnp.dtype(dtype) and rel_err(out, ref) <= TOL[dtype]
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.dtype(dtype) and rel_err(g, r) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_over_several_row_blocks(interpreter, dtype):
    """48 tokens x 4 heads = 192 rows (three blocks of 64), a ring of 5 slots written up to slot
    3, streams with full, partial and no history."""
    s, window, n, heads, e, batch = 5, 6, 48, 4, 16, 3
    new = tuple(_normal(i, (batch, 1, n, heads, e), dtype) for i in range(3))
    cache = tuple(_normal(3 + i, (batch, s, n, heads, e), dtype) for i in range(2))
    age = ((3 - 1 - jnp.arange(s)) % s + 1).astype(jnp.int32)
    valid = age[None, :] <= jnp.asarray([s, 2, 0])[:, None]
    angles = rope.temporal_angles(jnp.asarray(rope.temporal_frequencies(e)), jnp.arange(window))
    kw = dict(age=age, valid=valid, angles=angles, interleaved=True)
    assert n * heads // mosaic_ring.BLOCK == 3
    out = jax.jit(lambda *a: impls.MOSAIC_GPU_INTERPRET.temporal_cache(*a, **kw))(*new, *cache)
    ref = jax.jit(lambda *a: XLA.temporal_cache(*a, **kw))(
        *(a.astype(jnp.float32) for a in (*new, *cache)))
    assert out.dtype == jnp.dtype(dtype) and rel_err(out, ref) <= TOL[dtype]


# ----------------------------------------------------------------------------- lowering for cuda

BASE = dict(grid=(12, 12), heads=16, head_dim=64, slots=15)  # lsd_base: 144 tokens, window 16


def _base_spatial():
    x = jax.ShapeDtypeStruct((1, 2, 144, BASE["heads"], BASE["head_dim"]), jnp.bfloat16)
    angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(64)), *BASE["grid"])
    return x, angles


def _base_ring():
    s, e = BASE["slots"], BASE["head_dim"]
    new = jax.ShapeDtypeStruct((1, 1, 144, BASE["heads"], e), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, s, 144, BASE["heads"], e), jnp.bfloat16)
    kw = dict(age=jnp.arange(s, 0, -1, dtype=jnp.int32), valid=jnp.ones((1, s), bool),
              angles=rope.temporal_angles(jnp.asarray(rope.temporal_frequencies(e)),
                                          jnp.arange(s + 1)), interleaved=True)
    return new, cache, kw


def test_kernels_export_for_cuda_at_lsd_base_shapes():
    """The forward, the gradient (forward, dq, dk/dv) and the ring each lower to Mosaic GPU
    calls and nothing else; the exports survive serialization."""
    x, angles = _base_spatial()
    spatial = lambda q, k, v: impls.MOSAIC_GPU.spatial(  # noqa: E731
        q, k, v, angles=angles, interleaved=True)
    loss = lambda q, k, v: spatial(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    new, cache, kw = _base_ring()
    ring = lambda *a: impls.MOSAIC_GPU.temporal_cache(*a, **kw)  # noqa: E731
    for fn, args, count in ((spatial, (x,) * 3, 1),
                            (jax.grad(loss, argnums=(0, 1, 2)), (x,) * 3, 3),
                            (ring, (new,) * 3 + (cache,) * 2, 1)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert _calls(exported) == [MOSAIC_CALL] * count
        back = jax.export.deserialize(exported.serialize())
        assert back.platforms == ("cuda",) and back.out_avals == exported.out_avals


def test_lowered_kernel_figures_at_lsd_base_shapes():
    """What the lowered kernels say about themselves without a GPU: bf16 WGMMA tiles of 64 x 64,
    TMA loads, a memory warpgroup beside the compute one(s), shared memory within a block's
    227 KiB, and at least one block resident per H100 SM."""
    x, angles = _base_spatial()

    def loss(q, k, v):
        out = impls.MOSAIC_GPU.spatial(q, k, v, angles=angles, interleaved=True)
        return out.astype(jnp.float32).sum()

    new, cache, kw = _base_ring()
    stats = (mosaic_gpu.lowered_stats(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
             + mosaic_gpu.lowered_stats(
                 lambda *a: impls.MOSAIC_GPU.temporal_cache(*a, **kw), *(new,) * 3,
                 *(cache,) * 2))
    assert len(stats) == 4  # forward, dq, dk/dv, ring
    for st in stats:
        assert st["threads"] == 128 * st["warpgroups"] and st["warpgroups"] >= 2, st
        assert st["wgmma"] == ["m64n64k16.f32.bf16.bf16"], st
        assert st["tma_loads"] >= 2 and st["smem_fits_one_block"], st
        assert st["blocks_per_sm"] >= 1 and st["warps_per_sm"] >= 8, st
    forward, dq, dkdv, ring = stats
    # 144 tokens pad to 192: 3 query tiles per (head, frame) of 2 frames x 16 heads.
    assert sorted(forward["grid"]) == [2, 3, 16]
    assert sorted(ring["grid"]) == [1, 1, 144 * 16 // 64]


def _with(name: str, *extra: str):
    cfg = load_config(CONFIGS / "tiny.py")
    return apply_overrides(cfg, [f"model.attention_impl={name}", "model.dtype=bfloat16", *extra])


def test_streaming_step_exports_with_the_mosaic_gpu_row(tmp_path):
    """`lsd export --platforms cuda` of a config selecting `mosaic_gpu`: the header names the
    row and the Mosaic GPU call, which the deserialized step holds."""
    from flax import nnx

    from lsd_jax.model import DiT
    from lsd_serve.artifact import load_artifact
    from lsd_serve.export import save_artifact

    cfg = _with("mosaic_gpu")
    graphdef, params = nnx.split(DiT(cfg.model, rngs=nnx.Rngs(0)))
    art = load_artifact(save_artifact(tmp_path / "m.lsdx", cfg, graphdef, params,
                                      platforms=("cuda",)))
    assert art.header["kernels"]["selected"] == {"attention": "mosaic_gpu"}
    assert MOSAIC_CALL in art.header["kernels"]["custom_calls"]
    assert all(MOSAIC_CALL in _calls(exp) for exp in art._exported.values())


@pytest.mark.parametrize("name, targets", [
    ("mosaic_gpu", {MOSAIC_CALL}),
    ("cudnn", {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}),
])
def test_train_step_exports_with_the_row(name, targets):
    """The train step lowered for cuda with the row selected holds its forward and backward
    calls (three Mosaic GPU kernels per spatial attention: forward, dq, dk/dv; cuDNN's forward
    and backward)."""
    from lsd_train.trainer import abstract_batch, init_state, make_train_step

    cfg = _with(name, "data.clip_frames=4", "train.batch_size=2")
    state = jax.eval_shape(lambda: init_state(cfg))
    leaves, treedef = jax.tree.flatten(state)
    step = make_train_step(cfg)

    def flat_step(leaves, batch):
        new_state, metrics = step(jax.tree.unflatten(treedef, leaves), batch)
        return jax.tree.leaves(new_state), metrics

    with kernels.lowering_for("cuda"), assume_cudnn():
        exported = jax.export.export(jax.jit(flat_step), platforms=("cuda",),
                                     disabled_checks=UNGUARANTEED_CALLS)(leaves,
                                                                         abstract_batch(cfg))
    calls = _calls(jax.export.deserialize(bytearray(exported.serialize())))
    assert targets <= set(calls), sorted(set(calls))
    if name == "mosaic_gpu":
        assert calls.count(MOSAIC_CALL) >= 3


def test_cudnn_row_lowers_to_cudnn_flash_attention():
    """The `cudnn` row's spatial entry, forward and gradient, lowered for cuda at lsd_base's
    shapes: cuDNN's fused attention calls, the temporal entries on XLA."""
    x, angles = _base_spatial()

    def loss(q, k, v):
        return CUDNN.spatial(q, k, v, angles=angles, interleaved=True).astype(jnp.float32).sum()

    with assume_cudnn():
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                                     platforms=["cuda"], disabled_checks=UNGUARANTEED_CALLS)(
            x, x, x)
    assert set(_calls(exported)) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
    assert kernels.entry("attention", "cudnn").dtypes == ("bfloat16",)
    assert CUDNN.temporal_cache is XLA.temporal_cache


def test_rows_are_refused_where_they_cannot_run():
    with pytest.raises(Exception, match="mosaic_gpu'? cannot run on cpu: it runs on cuda"):
        kernels.select("attention", "mosaic_gpu")
    with kernels.lowering_for("cuda"):
        assert kernels.select("attention", "mosaic_gpu") is impls.MOSAIC_GPU
        with pytest.raises(Exception, match="does not support model.dtype='float32'"):
            kernels.select("attention", "mosaic_gpu", dtype="float32")


def test_modules_import_without_a_gpu_toolchain():
    """Importing the Mosaic GPU modules imports neither triton nor the Pallas Mosaic GPU
    package: they load when a kernel is traced."""
    code = ("import sys; import lsd_kernels.mosaic_flash, lsd_kernels.mosaic_ring, "
            "lsd_kernels.cudnn_lowering; "
            "bad = {'triton', 'jax_triton', 'jax.experimental.pallas.mosaic_gpu'} & "
            "set(sys.modules); assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
