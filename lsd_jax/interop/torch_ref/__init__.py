"""PyTorch reference of the lsd-jax models, for parity checks and like-for-like speed comparisons.

Needs the `torch` extra (`pip install -e '.[torch]'`); nothing else in the package imports it.

- `dit`: the causal DiT with every option of `lsd_jax.config.ModelConfig`, Oasis module names
  (`blocks.N.s_attn.to_qkv.weight`, ...), full-clip banded forward and the one-frame stream pass;
- `streaming`: the ring-buffer KV cache and the streaming step, same semantics as
  `lsd_jax.streaming` (un-rotated keys rotated by age, `slot`, `num_valid`), noise passed in;
- `diffusion`: rectified flow and DDPM-v (Oasis DDIM) formulas, the plain autoregressive sampler
  and the training loss on given noise;
- `vae`: the Oasis ViT-VAE.

Frames are NHWC model-space tensors `[..., H, W, C]` as in the JAX code (Oasis's `(B, T, C, H, W)`
is `x.permute(0, 1, 3, 4, 2)` of it), so the same arrays feed both implementations.
"""

from lsd_jax.interop.torch_ref.dit import TorchDiT
from lsd_jax.interop.torch_ref.vae import TorchVAE

__all__ = ["TorchDiT", "TorchVAE"]
