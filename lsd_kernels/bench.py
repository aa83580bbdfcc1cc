"""`lsd bench kernels`: every kernel at a config's shapes — numerics, lowering, compile stats and a
roofline.

Per kernel (`KERNELS`), on any machine:

- `max_rel_err`: the kernel under the Pallas interpreter against the pure-JAX reference, float32,
  random inputs at the config's shapes (`max|out - ref| / max|ref|`; for the backward, the worst
  of dq, dk, dv);
- `custom_calls`: the call targets found when the kernel is lowered by `jax.export` for `cuda`
  (Pallas' Triton backend) and for `tpu` (Mosaic);
- `flops`, `bytes` (HBM traffic: each operand read once, each output written once) and the
  predicted H100 time: `max(flops / (peak * FLOP_EFFICIENCY), bytes / (bandwidth *
  BW_EFFICIENCY))` — stated efficiencies, to be replaced by measured ones;
- `tpu_compile`: Mosaic compiled ahead of time for a TPU topology when `libtpu` is installed
  (`lsd_kernels.tpu_aot`), else the reason it was not;
- `sm_90`: for the jax-triton kernel, registers, spills and shared memory of its ahead-of-time
  compile for H100 (`lsd_kernels.triton_aot`) when `triton` is installed.

On a GPU, `timing` compares each kernel with XLA's own fusion of the reference (median of
`repeats` runs) and reports TFLOP/s against the H100 peak; elsewhere it is null with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax import kernels, rope
from lsd_jax.attention import XLA
from lsd_jax.config import Config
from lsd_jax.lowering import UNGUARANTEED_CALLS, custom_calls
from lsd_jax.norm import XLA as NORM_XLA
from lsd_jax.streaming import cache_size
from lsd_kernels import triton_aot

# H100 SXM, dense bfloat16 tensor cores and HBM3 (NVIDIA's data sheet).
H100_PEAK_FLOPS = 989e12
H100_BANDWIDTH = 3.35e12
FLOP_EFFICIENCY = 0.5  # flash attention forward reaches ~50-70% of peak on H100 in bf16
BW_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the seam entry point
    make_args: Callable[[jnp.dtype], tuple]  # random arrays
    call: Callable  # (impl, *args) -> output(s)
    flops: int
    bytes_per_elem: Callable[[int], int]  # element size -> HBM bytes
    grad: bool = False


def _normal(key, shape, dtype):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def cases(cfg: Config, frames: int = 2) -> list[Case]:
    """The kernels at `cfg`'s shapes: `frames` frames for the spatial and norm kernels, one
    streamed frame against the full ring for the temporal one."""
    m = cfg.model
    h, d = m.num_heads, m.hidden_size
    e, n = d // h, m.tokens_per_frame
    s = cache_size(cfg)
    grid = (m.frame_height // m.patch_size, m.frame_width // m.patch_size)
    sp_angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(e)), *grid)
    t_angles = rope.temporal_angles(jnp.asarray(rope.temporal_frequencies(e)),
                                    jnp.arange(m.window))
    il = m.rope_interleaved
    frame_shape = (1, frames, n, h, e)

    def spatial(impl, q, k, v):
        return impl.spatial(q, k, v, angles=sp_angles, interleaved=il)

    def spatial_grad(impl, q, k, v, cot):
        def loss(q, k, v):
            return jnp.sum(spatial(impl, q, k, v).astype(jnp.float32) * cot)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    age = (jnp.arange(s)[::-1] + 1).astype(jnp.int32)
    valid = jnp.ones((1, s), bool)

    def ring(impl, q, kn, vn, ck, cv):
        return impl.temporal_cache(q, kn, vn, ck, cv, age=age, valid=valid, angles=t_angles,
                                   interleaved=il)

    def norm(impl, x, shift, scale):
        return impl.norm_modulate(x, shift, scale, eps=m.norm_eps)

    def residual_norm(impl, x, gate, y, shift, scale):
        return impl.residual_norm_modulate(x, gate, y, shift, scale, eps=m.norm_eps)

    sp_flops = frames * h * (4 * n * n * e + 4 * n * e * e)  # QK^T, PV; rotating q and k
    ring_flops = h * n * (4 * (s + 1) * e + 2 * (s + 2) * e * e)
    x_shape, vec_shape = (1, frames, n, d), (1, frames, 1, d)
    qkv = 3 * frames * n * d
    return [
        Case("flash_spatial", "spatial",
             lambda dt: tuple(_normal(i, frame_shape, dt) for i in range(3)), spatial,
             sp_flops, lambda b: (qkv + frames * n * d) * b),
        Case("flash_spatial_bwd", "spatial",
             lambda dt: (*(_normal(i, frame_shape, dt) for i in range(3)),
                         _normal(3, frame_shape, jnp.float32)), spatial_grad,
             int(2.5 * sp_flops), lambda b: (2 * qkv + 2 * frames * n * d) * b, grad=True),
        Case("ring_temporal", "temporal_cache",
             lambda dt: (*(_normal(i, (1, 1, n, h, e), dt) for i in range(3)),
                         *(_normal(3 + i, (1, s, n, h, e), dt) for i in range(2))), ring,
             ring_flops, lambda b: (2 * s + 4) * n * d * b),
        Case("norm_modulate", "norm_modulate",
             lambda dt: (_normal(0, x_shape, dt), _normal(1, vec_shape, dt),
                         _normal(2, vec_shape, dt)), norm,
             8 * frames * n * d, lambda b: 2 * frames * n * d * b),
        Case("residual_norm_modulate", "residual_norm_modulate",
             lambda dt: (_normal(0, x_shape, dt), _normal(1, vec_shape, dt),
                         _normal(2, x_shape, dt), _normal(3, vec_shape, dt),
                         _normal(4, vec_shape, dt)), residual_norm,
             10 * frames * n * d, lambda b: 4 * frames * n * d * b),
    ]


def _impl(case: Case, name: str):
    kind = "attention" if case.kind in ("spatial", "temporal_cache") else "norm"
    return kernels.select(kind, name, platform=kernels.entry(kind, name).platforms[0])


def _rel_err(got, want) -> float:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))
                     / np.max(np.abs(np.asarray(w, np.float64))))
               for g, w in zip(got, want, strict=True))


def _custom_calls(case: Case, args, platform: str, name: str) -> list[str]:
    with kernels.lowering_for(platform):
        impl = _impl(case, name)
        exported = jax.export.export(jax.jit(lambda *a: case.call(impl, *a)),
                                     platforms=(platform,), disabled_checks=UNGUARANTEED_CALLS)(
            *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    return sorted(custom_calls(exported))


def _tpu_compile(case: Case, args) -> dict:
    try:
        from lsd_kernels import tpu_aot  # lazy: sets libtpu's env vars; backend up first
    except ImportError as err:
        return {"skipped": f"lsd_kernels.tpu_aot unavailable: {err}"}
    try:
        with kernels.lowering_for("tpu"):
            impl = _impl(case, "pallas_tpu")
            report = tpu_aot.compile_for_tpu(lambda *a: case.call(impl, *a),
                                             *(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                               for a in args))
    except Exception as err:  # noqa: BLE001 - reported, not raised: a bench row per kernel
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    # The compiled executable stays behind: the row is data (`--json` prints it).
    return {key: value for key, value in report.items() if key != "executable"}


def _timing(case: Case, args, repeats: int) -> dict | str:
    platform = kernels.current_platform()
    if platform not in ("cuda", "tpu"):
        return f"no GPU or TPU here (platform {platform}): kernels are timed on one"
    name = "pallas_triton" if platform == "cuda" else "pallas_tpu"
    out = {}
    for label, impl in (("kernel", _impl(case, name)), ("xla", XLA if case.kind in (
            "spatial", "temporal_cache") else NORM_XLA)):
        fn = jax.jit(lambda *a, impl=impl: case.call(impl, *a))
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        out[f"{label}_ms"] = statistics.median(times) * 1e3
    out["speedup"] = out["xla_ms"] / out["kernel_ms"]
    out["tflops"] = case.flops / (out["kernel_ms"] * 1e-3) / 1e12
    out["fraction_of_h100_peak"] = out["tflops"] * 1e12 / H100_PEAK_FLOPS
    return out


def bench_kernels(cfg: Config, *, frames: int = 2, repeats: int = 20, tpu: bool = True,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """One entry per kernel (see the module docstring)."""
    dtype = jnp.dtype(cfg.model.dtype)
    rows = []
    for case in cases(cfg, frames):
        progress(case.name)
        args32 = case.make_args(jnp.float32)
        interp = _impl(case, "pallas_interpret")
        ref = XLA if case.kind in ("spatial", "temporal_cache") else NORM_XLA
        err = _rel_err(jax.jit(functools.partial(case.call, interp))(*args32),
                       jax.jit(functools.partial(case.call, ref))(*args32))
        args = case.make_args(dtype)
        nbytes = case.bytes_per_elem(dtype.itemsize)
        predicted = max(case.flops / (H100_PEAK_FLOPS * FLOP_EFFICIENCY),
                        nbytes / (H100_BANDWIDTH * BW_EFFICIENCY))
        rows.append({
            "name": case.name,
            "entry_point": case.kind,
            "dtype": dtype.name,
            "max_rel_err": err,
            "custom_calls": {p: _custom_calls(case, args, p, name) for p, name in
                             (("cuda", "pallas_triton"), ("tpu", "pallas_tpu"))},
            "flops": case.flops,
            "bytes": nbytes,
            "arithmetic_intensity": case.flops / nbytes,
            "bound": ("compute" if case.flops / (H100_PEAK_FLOPS * FLOP_EFFICIENCY)
                      >= nbytes / (H100_BANDWIDTH * BW_EFFICIENCY) else "memory"),
            "predicted_h100_us": predicted * 1e6,
            "tpu_compile": _tpu_compile(case, args) if tpu else {"skipped": "--no-tpu"},
            "timing": _timing(case, args, repeats),
        })
    return {"config": cfg.name, "frames": frames, "dtype": dtype.name, "kernels": rows,
            "sm_90": _sm90(), "assumptions": {
                "h100_peak_flops": H100_PEAK_FLOPS, "h100_bandwidth": H100_BANDWIDTH,
                "flop_efficiency": FLOP_EFFICIENCY, "bandwidth_efficiency": BW_EFFICIENCY}}


def _sm90() -> dict:
    try:
        return triton_aot.compile_stats()
    except Exception as err:  # noqa: BLE001 - reported: triton may be absent on this machine
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
