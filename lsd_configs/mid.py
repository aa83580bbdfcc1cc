"""mid: a mid-size pixel-space model, 128x128 RGB, patch 8 (256 tokens per frame), 8 blocks of 384.

For single-GPU experiments between the CPU demo and the H100-class config:

    lsd info --config lsd_configs/mid.py
"""

from lsd_jax.config import Config, DiffusionConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="mid",
        model=ModelConfig(
            frame_height=128, frame_width=128, channels=3, cond_channels=3, patch_size=8,
            hidden_size=384, depth=8, num_heads=6, mlp_ratio=4.0, window=12,
            use_step_size=True, prompt_dim=256, external_cond_dim=0,
        ),
        diffusion=DiffusionConfig(process="rectified_flow", sample_steps=3, ctx_level=0.02),
        codec="pixel",
    )
