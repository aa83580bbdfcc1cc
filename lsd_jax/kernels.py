"""The kernel table: every implementation the model can switch to by config (docs/DESIGN.md
section 7).

Two seams, each selected by name: `model.attention_impl` (an `attention.AttentionImpl`, the
spatial, banded temporal and ring-buffer temporal entry points) and `model.norm_impl` (a
`norm.NormImpl`, LayerNorm + adaLN modulate, optionally after the gated residual). A row names
the object that implements the seam (`module:attribute`, imported only when selected), the
platforms it runs on (as `jax.export` names them) and the compute dtypes it supports. Nothing
registers itself: a new implementation is a new row here.

Implementations are imported only when selected, so `lsd_jax.config` can check names against
this table without importing JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

from lsd_jax.errors import ConfigError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
BOTH = ("float32", "bfloat16")
KINDS = ("attention", "norm")


@dataclasses.dataclass(frozen=True)
class Kernel:
    kind: str  # one of KINDS
    name: str  # the value of model.<kind>_impl
    target: str  # "module:attribute" of the implementation object
    platforms: tuple[str, ...]  # where it runs (PLATFORMS)
    dtypes: tuple[str, ...]  # the model.dtype values it supports
    about: str


TABLE: tuple[Kernel, ...] = (
    Kernel("attention", "xla", "lsd_jax.attention:XLA", PLATFORMS, ("float32", "bfloat16"),
           "pure-JAX reference: einsums, float32 logits and softmax"),
    Kernel("attention", "jax_nn", "lsd_jax.attention:JAX_NN", PLATFORMS, ("float32", "bfloat16"),
           "the reference's structure around jax.nn.dot_product_attention"),
    Kernel("attention", "pallas_triton", "lsd_kernels.impls:PALLAS_TRITON", ("cuda",), BOTH,
           "Pallas (Triton backend): flash spatial attention with RoPE in the kernel (forward "
           "and backward), ring-buffer temporal attention; banded temporal on XLA"),
    Kernel("attention", "jax_triton", "lsd_kernels.impls:JAX_TRITON", ("cuda",), BOTH,
           "pallas_triton with the ring-buffer attention as a @triton.jit kernel called through "
           "jax_triton.triton_call (the gpu extra)"),
    Kernel("attention", "mosaic_gpu", "lsd_kernels.impls:MOSAIC_GPU", ("cuda",), ("bfloat16",),
           "Mosaic GPU for Hopper (TMA, WGMMA, a memory warpgroup beside the compute ones): "
           "flash spatial attention with forward and backward both Mosaic GPU kernels (RoPE "
           "applied by XLA before them), ring-buffer temporal attention reading the cache in "
           "place; banded temporal on XLA"),
    Kernel("attention", "cudnn", "lsd_jax.attention:CUDNN", ("cuda",), ("bfloat16",),
           "the vendor bar: spatial attention by jax.nn.dot_product_attention("
           "implementation='cudnn') (cuDNN flash attention, forward and backward); temporal "
           "attention on XLA"),
    Kernel("attention", "pallas_tpu", "lsd_kernels.impls:PALLAS_TPU", ("tpu",), BOTH,
           "the same Pallas kernels on Mosaic TPU"),
    Kernel("attention", "pallas_interpret", "lsd_kernels.impls:PALLAS_INTERPRET", ("cpu",),
           BOTH, "the Pallas kernels under the Pallas interpreter (numerics checks on CPU)"),
    Kernel("attention", "pallas_tpu_interpret", "lsd_kernels.impls:PALLAS_TPU_INTERPRET",
           ("cpu",), BOTH, "the Pallas kernels under the TPU interpreter, races detected"),
    Kernel("attention", "mosaic_gpu_interpret", "lsd_kernels.impls:MOSAIC_GPU_INTERPRET",
           ("cpu",), BOTH, "the Mosaic GPU kernels under JAX's Mosaic GPU interpreter "
           "(numerics checks on CPU; float32 there checks the algorithm, the GPU runs bfloat16)"),
    Kernel("norm", "xla", "lsd_jax.norm:XLA", PLATFORMS, ("float32", "bfloat16"),
           "pure-JAX reference: LayerNorm in float32, then shift/scale"),
    Kernel("norm", "pallas_triton", "lsd_kernels.impls:NORM_TRITON", ("cuda",), BOTH,
           "Pallas (Triton backend): fused residual + LayerNorm + modulate; backward on XLA"),
    Kernel("norm", "pallas_tpu", "lsd_kernels.impls:NORM_TPU", ("tpu",), BOTH,
           "the same Pallas kernel on Mosaic TPU"),
    Kernel("norm", "pallas_interpret", "lsd_kernels.impls:NORM_INTERPRET", ("cpu",), BOTH,
           "the Pallas kernel under the Pallas interpreter (numerics checks on CPU)"),
    Kernel("norm", "pallas_tpu_interpret", "lsd_kernels.impls:NORM_TPU_INTERPRET", ("cpu",),
           BOTH, "the Pallas kernel under the TPU interpreter, races detected"),
)


def kernel_names(kind: str) -> tuple[str, ...]:
    return tuple(k.name for k in TABLE if k.kind == kind)


def entry(kind: str, name: str) -> Kernel:
    """The table row of `model.<kind>_impl = name`; a `ConfigError` listing the names if none."""
    for kernel in TABLE:
        if kernel.kind == kind and kernel.name == name:
            return kernel
    raise ConfigError(f"model.{kind}_impl={name!r} is not one of "
                 f"{', '.join(map(repr, sorted(kernel_names(kind))))}")


_TARGET: list[str] = []


@contextlib.contextmanager
def lowering_for(platform: str):
    """Within the block, `current_platform()` is `platform`: models traced there select the
    kernels of the platform a `jax.export` lowers for, not of the host's."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def selected(cfg_model) -> dict[str, str]:
    """The kernel rows a model config selects that are not the pure-JAX paths: `{kind: name}`."""
    names = {"attention": cfg_model.attention_impl, "norm": cfg_model.norm_impl}
    return {k: v for k, v in names.items() if set(entry(k, v).platforms) != set(PLATFORMS)}


def current_platform() -> str:
    """The platform kernels are selected for: the one `lowering_for` names, else the default
    backend as a `jax.export` platform name (`gpu` told apart as cuda or rocm)."""
    if _TARGET:
        return _TARGET[-1]
    import jax

    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "")
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


def select(kind: str, name: str, *, dtype: str | None = None, platform: str | None = None):
    """The implementation object of `model.<kind>_impl = name`, checked to run on `platform`
    (default: the current one) in `dtype` (when given); a one-line `ConfigError` if not."""
    kernel = entry(kind, name)
    platform = platform or current_platform()
    if platform not in kernel.platforms:
        raise ConfigError(f"model.{kind}_impl={name!r} cannot run on {platform}: it runs on "
                     f"{', '.join(kernel.platforms)}")
    if dtype is not None and dtype not in kernel.dtypes:
        raise ConfigError(f"model.{kind}_impl={name!r} does not support model.dtype={dtype!r}: it "
                     f"supports {', '.join(kernel.dtypes)}")
    module, attribute = kernel.target.split(":")
    return getattr(importlib.import_module(module), attribute)
