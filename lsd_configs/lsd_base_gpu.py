"""lsd_base_gpu: `lsd_configs/lsd_base.py` with the Pallas kernels for H100 selected (the gpu
preset).

Flash spatial attention with RoPE in the kernel, the ring-buffer temporal attention of the
streaming step and the fused residual + LayerNorm + modulate, all on Pallas' Triton backend
(`model.attention_impl=pallas_triton`, `model.norm_impl=pallas_triton`, docs/DESIGN.md
section 7); bfloat16 compute. Runs on CUDA GPUs; on another machine it lowers and exports for
`cuda` (`lsd export --config lsd_configs/lsd_base_gpu.py --platforms cuda`) but does not run.
"""

from lsd_configs import lsd_base
from lsd_configs._gpu import gpu_preset
from lsd_jax.config import Config


def get_config() -> Config:
    return gpu_preset(lsd_base.get_config())
