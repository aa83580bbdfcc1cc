"""tiny: the CPU demo. 64x64 RGB pixel space, patch 4 (256 tokens), 2 blocks of width 128.

Streams in real time on a 2-core CPU with 3 shortcut denoising steps per frame:

    lsd info --config lsd_configs/tiny.py
    lsd bench step --config lsd_configs/tiny.py --steps 3 --json

Expected (BENCHMARKS.md has the measured figures and machine): p50 <= 40 ms per frame at 3
steps, >= 40% of the machine's measured float32 matmul peak.
"""

from lsd_jax.config import Config, DiffusionConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(
            frame_height=64, frame_width=64, channels=3, cond_channels=3, patch_size=4,
            hidden_size=128, depth=2, num_heads=4, mlp_ratio=4.0, window=8,
            use_step_size=True, prompt_dim=64, external_cond_dim=0,
        ),
        diffusion=DiffusionConfig(process="rectified_flow", sample_steps=3, ctx_level=0.02),
        codec="pixel",
    )
