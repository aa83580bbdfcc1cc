"""oasis_500m_gpu: `lsd_configs/oasis_500m.py` with the Pallas kernels for H100 (the gpu preset).

Flash spatial attention with RoPE in the kernel, the ring-buffer temporal attention of the
streaming step and the fused residual + LayerNorm + modulate, all on Pallas' Triton backend
(`model.attention_impl=pallas_triton`, `model.norm_impl=pallas_triton`, docs/DESIGN.md
section 7); bfloat16 compute. Runs on CUDA GPUs; on another machine it lowers and exports for
`cuda` (`lsd export --config lsd_configs/oasis_500m_gpu.py --platforms cuda`) but does not run.
"""

from lsd_configs import oasis_500m
from lsd_configs._gpu import gpu_preset
from lsd_jax.config import Config


def get_config() -> Config:
    return gpu_preset(oasis_500m.get_config())
