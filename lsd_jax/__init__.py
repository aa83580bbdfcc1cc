"""lsd-jax: Live-Stream Diffusion in JAX/Flax NNX.

A causal video DiT that turns a live stream into a restyled stream, one frame at a time. This
package is the core, which the packages above it use and never import:

    lsd_cli       the `lsd` command: its parser and every subcommand
    lsd_train     training at scale, evaluation, shipping the demo model
    lsd_serve     the exported step, streaming a video, the server
    lsd_kernels   fused kernels the kernel table (`kernels`) names and imports when selected
    lsd_configs   the packaged configs (`--config NAME`)

Modules:

- `config`: the typed config tree, config files and `key.path=value` overrides; `errors`: the
  errors a user can cause;
- `model`: the causal spatio-temporal DiT; `attention`, `norm`, `rope`: its attention, norm and
  rotary parts; `activation_sharding`: where its activations live on a device mesh;
- `kernels`: the table of implementations `model.attention_impl` / `model.norm_impl` select;
  `lowering`: what `jax.export` needs to know about them;
- `diffusion`: rectified flow and DDPM v-prediction behind one interface;
- `objectives`, `history_aug`: Diffusion Forcing levels, history augmentation, shortcut targets,
  the loss;
- `streaming`: the ring-buffer KV cache and the jitted per-frame step; `stream_state`: its state;
- `checkpoint`: model checkpoints (config + orbax parameters); `resolve`: which model a command
  runs; `demo`: the built-in demo model;
- `codec`: frames <-> model space; `vae`: the Oasis ViT-VAE and its codec; `video`: mp4 files;
- `prompt_encoder`, `prompt`: the prompt encoders' interface and the encoders; `minilm`,
  `minilm_files`: all-MiniLM-L6-v2 and its verified files;
- `interop/`: `convert`, `torch_ref`, `parity`, `oasis`: Oasis/PyTorch weight conversion, the
  PyTorch reference (torch extra), parity checks, and Oasis as an action-conditioned world model;
- `flops`: analytic and compiled-HLO FLOP counts; `bench`: the step benchmark; `progress`: the
  console progress bar.
"""

from lsd_jax.config import Config, load_config
from lsd_jax.errors import ConfigError

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
