"""oasis_500m: exactly the Oasis-500M DiT (docs/OASIS.md): 16x18x32 latents, patch 2,
16 blocks of 1024.

Action-conditioned (25-dim external vector per frame), no input-frame channels, no prompt, no step
size; DDPM v-prediction with the sigmoid schedule, stabilisation level 15 (context labelled t=14),
10 DDIM steps, 32-frame window.

    lsd info --config lsd_configs/oasis_500m.py

prints 607,943,792 parameters (607,943,744 trained + 48 fixed rotary frequencies, as the Oasis
checkpoint counts them).
"""

from lsd_jax.config import Config, DiffusionConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="oasis_500m",
        model=ModelConfig(
            frame_height=18, frame_width=32, channels=16, cond_channels=0, patch_size=2,
            hidden_size=1024, depth=16, num_heads=16, mlp_ratio=4.0, window=32,
            use_step_size=False, prompt_dim=0, external_cond_dim=25,
        ),
        diffusion=DiffusionConfig(
            process="ddpm_v", num_timesteps=1000, sample_steps=10, ctx_level=14.0,
            context_noise="label", shortcut=False,
        ),
        codec="oasis_vae",
    )
