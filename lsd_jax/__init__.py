"""lsd-jax: Live-Stream Diffusion in JAX/Flax NNX.

A causal video DiT that turns a live stream into a restyled stream, one frame at a time. Modules:

- `config`: the typed config tree, config files and `key.path=value` overrides;
- `model`: the causal spatio-temporal DiT; `attention`, `rope`: its attention and rotary parts;
- `diffusion`: rectified flow and DDPM v-prediction behind one interface;
- `objectives`: Diffusion Forcing levels, history augmentation, shortcut targets, the loss;
- `streaming`: the ring-buffer KV cache and the jitted per-frame step;
- `checkpoint`: model checkpoints (config + orbax parameters);
- `codec`: frames <-> model space; `vae`: the Oasis ViT-VAE and its codec;
- `prompt`: prompt encoders;
- `convert`, `torch_ref`, `parity`, `oasis`: Oasis/PyTorch weight conversion, the PyTorch
  reference (torch extra), parity checks, and Oasis as an action-conditioned world model;
- `flops`: analytic and compiled-HLO FLOP counts; `bench`: the step benchmark.

The `lsd` command is `lsd_cli`, above this package.
"""

from lsd_jax.config import Config, load_config
from lsd_jax.errors import ConfigError

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
