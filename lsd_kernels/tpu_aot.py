"""Ahead-of-time compiles of the Mosaic TPU kernels for a TPU topology, on a machine without a TPU.

Lowering (`jax.export(..., platforms=["tpu"])`) stops at the Mosaic MLIR inside each
`tpu_custom_call`; Mosaic's own compile (VMEM budget, layouts the TPU cannot hold) runs in
`libtpu`. With the `libtpu` wheel installed (`pip install 'jax[tpu]'`, same jax version),
`jax.experimental.topologies` makes compile-only TPU devices for a named topology (`v5e:2x2`,
`v6e:2x2`, `v5p:2x2x1`, `tpu7x:2x2x1`; a single chip is `v5e:1x1` with
`chips_per_host_bounds=(1, 1, 1)`), and `jax.jit(...).lower(...).compile()` on one of them runs
the whole XLA:TPU + Mosaic pipeline: a block that does not fit in VMEM is a `RESOURCE_EXHAUSTED`
`JaxRuntimeError` here, as it would be on the chip.

    lsd kernels tpu-aot               # every kernel at the Oasis shape on v5e, v6e
    lsd kernels tpu-aot v5e:2x2 f32

Importing this module sets (if unset) `TPU_SKIP_MDS_QUERY=1` (no GCE metadata queries) and
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` (another jax process on the host may hold libtpu's
`/tmp/libtpu_lockfile`; a compile-only client uses no chip); `libtpu` reads both when it loads.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lsd_kernels.impls import NORM_TPU, PALLAS_TPU  # noqa: E402

TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "v7x": "tpu7x:2x2x1"}
# Oasis-like streaming shape: batch, frames, tokens (18 x 32), heads, head dim, hidden, ring
# slots, temporal window.
OASIS = dict(b=1, t=2, n=576, h=16, e=64, hidden=1024, slots=7, window=8)
KERNELS = ("spatial", "spatial_grad", "ring", "norm_modulate", "residual_norm_modulate")


class TpuCompileUnavailable(RuntimeError):
    """No TPU compile-only client here: `libtpu` is missing or cannot make the topology."""


def libtpu_version() -> str:
    """The installed `libtpu` wheel's version; `TpuCompileUnavailable` if there is none."""
    from importlib import metadata

    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise TpuCompileUnavailable(
            f"libtpu is not installed (pip install 'jax[tpu]=={jax.__version__}')") from err
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def _topology(name: str, bounds: tuple[int, ...] | None) -> tuple[Any, ...]:
    from jax.experimental import topologies

    version = libtpu_version()
    kwargs = {} if bounds is None else {"chips_per_host_bounds": bounds}
    try:
        return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                  **kwargs).devices)
    except Exception as err:  # libtpu's errors are JaxRuntimeError / RuntimeError
        raise TpuCompileUnavailable(
            f"libtpu {version} could not make a compile-only client for TPU topology {name!r}: "
            f"{type(err).__name__}: {err}") from err


def topology_devices(topology: str = "v5e:2x2",
                     chips_per_host_bounds: tuple[int, ...] | None = None) -> list[Any]:
    """The compile-only devices of `topology` (a name of `TOPOLOGIES` or a libtpu topology
    string); `TpuCompileUnavailable` if libtpu is missing or refuses the topology."""
    name = TOPOLOGIES.get(topology, topology)
    return list(_topology(name, chips_per_host_bounds))


def _abstract_on(device: Any, tree: Any) -> Any:
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_for_tpu(fn: Callable, *args: Any, topology: str = "v5e:2x2",
                    chips_per_host_bounds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Compile `jax.jit(fn)(*args)` (`args`: pytrees of `jax.ShapeDtypeStruct` or arrays, placed
    on the topology's first chip) for a TPU, Mosaic kernels included.

    Returns `topology`, `device_kind`, `compiled` (True), `seconds`, `custom_calls` (the custom
    call targets in the optimised HLO), `kernels` (names of the `tpu_custom_call`s), `memory`
    (bytes of HBM from `memory_analysis()`: `argument`, `output`, `temp`, `alias`, `code`,
    `peak`) and `executable`. Raises `TpuCompileUnavailable` when there is no compile-only
    client; a kernel that Mosaic rejects (e.g. VMEM overflow) raises libtpu's
    `JaxRuntimeError`."""
    devices = topology_devices(topology, chips_per_host_bounds)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*_abstract_on(devices[0], args)).compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    stats = compiled.memory_analysis()
    memory = {key: int(getattr(stats, attr, 0) or 0) for key, attr in (
        ("argument", "argument_size_in_bytes"), ("output", "output_size_in_bytes"),
        ("temp", "temp_size_in_bytes"), ("alias", "alias_size_in_bytes"),
        ("code", "generated_code_size_in_bytes"), ("peak", "peak_memory_in_bytes"))}
    kernels = re.findall(r"%([\w.-]+?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"",
                         hlo)
    return dict(topology=TOPOLOGIES.get(topology, topology), device_kind=devices[0].device_kind,
                compiled=True, seconds=seconds,
                custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
                kernels=sorted(set(kernels)), memory=memory, executable=compiled)


def kernel_cases(dtype: Any = jnp.bfloat16, **shape: int) -> dict[str, tuple[Callable, list]]:
    """`{name: (fn, abstract args)}` of each Mosaic TPU kernel (`KERNELS`) at `OASIS` (or
    `shape` overrides), for `compile_for_tpu`; `spatial_grad` is `jax.grad` through `spatial`."""
    p = {**OASIS, **shape}
    b, t, n, h, e, d, s, w = (p[k] for k in ("b", "t", "n", "h", "e", "hidden", "slots",
                                             "window"))

    def arr(*dims: int, dt: Any = dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(dims, dt)

    def spatial(q, k, v, angles):
        return PALLAS_TPU.spatial(q, k, v, angles=angles, interleaved=True)

    def spatial_loss(q, k, v, angles):
        return spatial(q, k, v, angles).astype(jnp.float32).sum()

    def ring(q, k_new, v_new, cache_k, cache_v, age, valid, angles):
        return PALLAS_TPU.temporal_cache(q, k_new, v_new, cache_k, cache_v, age=age, valid=valid,
                                         angles=angles, interleaved=True)

    frame, row, angles_sp = arr(b, t, n, h, e), arr(b, t, 1, d), arr(n, e // 2, dt=jnp.float32)
    return {
        "spatial": (spatial, [frame] * 3 + [angles_sp]),
        "spatial_grad": (jax.grad(spatial_loss, argnums=(0, 1, 2)), [frame] * 3 + [angles_sp]),
        "ring": (ring, [arr(b, 1, n, h, e)] * 3 + [arr(b, s, n, h, e)] * 2
                 + [arr(s, dt=jnp.int32), arr(b, s, dt=jnp.bool_), arr(w, e // 2, dt=jnp.float32)]),
        "norm_modulate": (lambda x, shift, scale: NORM_TPU.norm_modulate(x, shift, scale,
                                                                         eps=1e-6),
                          [arr(b, t, n, d), row, row]),
        "residual_norm_modulate": (
            lambda x, gate, y, shift, scale: NORM_TPU.residual_norm_modulate(
                x, gate, y, shift, scale, eps=1e-6),
            [arr(b, t, n, d), row, arr(b, t, n, d), row, row]),
    }
