"""The seams' implementations built from this package's kernels, one per backend; the rows of
`lsd_jax.kernels.TABLE` point here.

Attention: `spatial` is the flash kernel (`flash_spatial`), `temporal_cache` the ring kernel
(`ring_temporal`); `temporal_band` (training only, a handful of frames per token) stays on the
reference's XLA path. `JAX_TRITON` swaps the ring kernel for its jax-triton twin. `MOSAIC_GPU` is
the Mosaic GPU pair (`mosaic_flash`, `mosaic_ring`), written for Hopper rather than through a
`Backend` (TMA, WGMMA and warpgroups are its own programming model). Norm: the fused LayerNorm +
modulate (`norm_modulate`).
"""

from __future__ import annotations

from lsd_jax.attention import XLA, AttentionImpl
from lsd_jax.norm import NormImpl
from lsd_kernels import (
    flash_spatial,
    mosaic_flash,
    mosaic_ring,
    norm_modulate,
    ring_temporal,
    triton_ring,
)
from lsd_kernels.backends import BACKENDS, Backend


def attention(backend: Backend) -> AttentionImpl:
    return AttentionImpl(flash_spatial.make(backend), XLA.temporal_band,
                         ring_temporal.make(backend))


def norm(backend: Backend) -> NormImpl:
    return norm_modulate.make(backend)


PALLAS_TRITON = attention(BACKENDS["triton"])
PALLAS_TPU = attention(BACKENDS["mosaic_tpu"])
PALLAS_INTERPRET = attention(BACKENDS["interpret"])
PALLAS_TPU_INTERPRET = attention(BACKENDS["tpu_interpret"])

def jax_triton_attention() -> AttentionImpl:
    """The Pallas Triton flash spatial kernel with the ring-buffer attention written in Triton and
    called through jax-triton (`triton_ring`, which imports triton and jax-triton when the kernel
    is first called: CUDA only)."""
    return AttentionImpl(PALLAS_TRITON.spatial, XLA.temporal_band, triton_ring.temporal_cache)


JAX_TRITON = jax_triton_attention()


def mosaic_gpu_attention(interpret: bool) -> AttentionImpl:
    """The Mosaic GPU kernels (`mosaic_flash`, `mosaic_ring`), on the GPU or interpreted."""
    return AttentionImpl(mosaic_flash.make(interpret), XLA.temporal_band,
                         mosaic_ring.make(interpret))


MOSAIC_GPU = mosaic_gpu_attention(False)
MOSAIC_GPU_INTERPRET = mosaic_gpu_attention(True)

NORM_TRITON = norm(BACKENDS["triton"])
NORM_TPU = norm(BACKENDS["mosaic_tpu"])
NORM_INTERPRET = norm(BACKENDS["interpret"])
NORM_TPU_INTERPRET = norm(BACKENDS["tpu_interpret"])
