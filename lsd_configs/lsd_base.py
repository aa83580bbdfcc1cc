"""lsd_base: H100-class Live-Stream Diffusion in the Oasis ViT-VAE latent space.

360x640 frames -> 16x18x32 latents (the live input frame encoded the same way and concatenated
channel-wise), patch 2 (144 tokens per frame), 20 blocks of width 1024, window 16, 3 steps:

    lsd info --config lsd_configs/lsd_base.py
    lsd train --aot-only --config lsd_configs/lsd_base.py --devices 64 mesh.data=8 mesh.fsdp=8

About 0.76B parameters.
"""

from lsd_jax.config import Config, DiffusionConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="lsd_base",
        model=ModelConfig(
            frame_height=18, frame_width=32, channels=16, cond_channels=16, patch_size=2,
            hidden_size=1024, depth=20, num_heads=16, mlp_ratio=4.0, window=16,
            use_step_size=True, prompt_dim=768, external_cond_dim=0,
            remat_policy="dots_no_batch", dtype="bfloat16",
        ),
        diffusion=DiffusionConfig(process="rectified_flow", sample_steps=3, ctx_level=0.02),
        codec="oasis_vae",
    )
