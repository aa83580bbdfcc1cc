"""What `jax.export` needs to know about the kernels (docs/DESIGN.md section 7).

`UNGUARANTEED_CALLS` are the custom calls a kernel lowers to that `jax.export` does not vouch for
across versions (the Triton call of Pallas' Triton backend, cuDNN's fused attention), passed as
its `disabled_checks`: a module holding one is tied to the jax version that lowered it (Mosaic
GPU's `mosaic_gpu_v2` and Mosaic TPU's `tpu_custom_call` are vouched for). `custom_calls(exported)`
are the call targets a lowered module holds (`lsd export` records them in an artifact's header,
`lsd bench kernels` reports them per kernel). The platform names are `lsd_jax.kernels.PLATFORMS`.
"""

from __future__ import annotations

import re

import jax

UNGUARANTEED_CALLS = tuple(jax.export.DisabledSafetyCheck.custom_call(target) for target in (
    "__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"))
_CUSTOM_CALL = re.compile(r"custom_call @([^(\s]+)\(")


def custom_calls(exported: jax.export.Exported) -> set[str]:
    """The custom call targets in the module `exported` holds."""
    return set(_CUSTOM_CALL.findall(exported.mlir_module()))
