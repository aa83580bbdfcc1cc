"""Mosaic TPU kernels compiled ahead of time for v5e / v6e topologies on this CPU-only machine
(`lsd_kernels.tpu_aot`): lowering alone does not run Mosaic's compile, this does (VMEM budget,
layouts). Needs the `libtpu` wheel (`pip install 'jax[tpu]'`); skipped without it."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jax[tpu]')")

from lsd_kernels import tpu_aot  # noqa: E402

TOPOLOGIES = ("v5e", "v6e")


def _devices(topology: str) -> None:
    try:
        tpu_aot.topology_devices(topology)
    except tpu_aot.TpuCompileUnavailable as err:
        pytest.skip(str(err))


def _cases() -> list:
    """(topology, dtype, kernel): bf16 everywhere; f32 and v6e beyond v5e bf16 are `slow`."""
    cases = []
    for topology in TOPOLOGIES:
        for dtype in ("bfloat16", "float32"):
            for kernel in tpu_aot.KERNELS:
                slow = topology != "v5e" or dtype != "bfloat16"
                cases.append(pytest.param(topology, dtype, kernel,
                                          marks=[pytest.mark.slow] if slow else [],
                                          id=f"{topology}-{dtype}-{kernel}"))
    return cases


@pytest.mark.parametrize("topology,dtype,kernel", _cases())
def test_kernel_compiles_for_tpu(topology: str, dtype: str, kernel: str) -> None:
    _devices(topology)
    fn, args = tpu_aot.kernel_cases(jnp.dtype(dtype))[kernel]
    result = tpu_aot.compile_for_tpu(fn, *args, topology=topology)
    assert result["compiled"]
    assert "tpu_custom_call" in result["custom_calls"]
    expected = {"spatial": ["flash_spatial_fwd"],
                "spatial_grad": ["flash_spatial_dkdv", "flash_spatial_dq"],
                "ring": ["ring_temporal_attention"], "norm_modulate": ["norm_modulate"],
                "residual_norm_modulate": ["residual_norm_modulate"]}[kernel]
    for name in expected:
        assert any(name in k for k in result["kernels"]), (name, result["kernels"])
    assert result["memory"]["argument"] > 0 and result["memory"]["output"] > 0
    assert result["device_kind"].startswith({"v5e": "TPU v5 lite", "v6e": "TPU v6"}[topology])


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_vmem_overflow_fails_the_compile(topology: str) -> None:
    """A norm block of 256 tokens x 16384 f32 (16 MiB per operand window) is over the scoped VMEM
    limit of v5e (16 MiB) and v6e (32 MiB): lowering accepts it, the AOT compile must not."""
    import jax

    from lsd_kernels import norm_modulate
    from lsd_kernels.backends import MOSAIC_TPU

    _devices(topology)
    d = 16384
    args = [jax.ShapeDtypeStruct((1, 256, d), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, d), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, d), jnp.float32)]

    def fn(x, shift, scale):
        return norm_modulate._call(MOSAIC_TPU, 1e-6, x, shift, scale)

    jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)  # lowering does not see it
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"RESOURCE_EXHAUSTED.*(?i:vmem)"):
        tpu_aot.compile_for_tpu(fn, *args, topology=topology)
    # The same kernel at the Oasis hidden size fits.
    small = [jax.ShapeDtypeStruct((1, 256, 1024), jnp.float32)] + [
        jax.ShapeDtypeStruct((1, 1, 1024), jnp.float32)] * 2
    assert tpu_aot.compile_for_tpu(fn, *small, topology=topology)["compiled"]


def test_missing_libtpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    with pytest.raises(tpu_aot.TpuCompileUnavailable, match="libtpu is not installed"):
        tpu_aot.libtpu_version()
