"""The gpu preset of a config: the Pallas kernels for H100 selected, bfloat16 compute."""

import dataclasses

from lsd_jax.config import Config


def gpu_preset(base: Config) -> Config:
    """`base` with `model.attention_impl=pallas_triton`, `model.norm_impl=pallas_triton` and
    `model.dtype=bfloat16`, named `<base>_gpu`."""
    return dataclasses.replace(
        base, name=f"{base.name}_gpu",
        model=dataclasses.replace(base.model, attention_impl="pallas_triton",
                                  norm_impl="pallas_triton", dtype="bfloat16"))
