"""Lowering the `cudnn` attention row for `cuda` on a host without a GPU.

`jax.nn.dot_product_attention(implementation="cudnn")` asks, while it is traced, for the cuDNN
version and the GPU's compute capability (`jax._src.cudnn.fused_attention_stablehlo`), which only
jaxlib's CUDA plugin and a GPU can answer; without them tracing stops at "cuDNN is not detected".
`assume_cudnn()` answers those two questions for the duration of a lowering (by default cuDNN
9.10 on sm_90, an H100's), so the export for `cuda` can be built and checked on any machine. With
the CUDA plugin installed it changes nothing. The module lowered is the one a GPU host lowers;
whether cuDNN accepts the shapes at run time is known only on the GPU (`lsd bench device`).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def assume_cudnn(version: int = 91000, capability: str = "9.0"):
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if fused.cuda_versions is not None:  # the CUDA plugin answers for itself
        yield
        return
    saved = (fused.check_cudnn_version, fused.check_compute_capability,
             fused.is_cuda_compute_capability_equal)
    target = tuple(int(x) for x in capability.split("."))

    def at_least(wanted: str) -> bool:
        return target >= tuple(int(x) for x in wanted.split("."))

    def equal(wanted: str) -> bool:
        return target == tuple(int(x) for x in wanted.split("."))

    fused.check_cudnn_version = lambda: version
    fused.check_compute_capability = at_least
    fused.is_cuda_compute_capability_equal = equal
    try:
        yield
    finally:
        (fused.check_cudnn_version, fused.check_compute_capability,
         fused.is_cuda_compute_capability_equal) = saved
