"""demo: the recipe of the built-in demo weights (`lsd_jax/demo_model/`, see its TRAINING.md for
the exact command, steps and time): `lsd_configs/tiny_pixel.py`, the tiny DiT with the
full-resolution pixel path, a colour map, the few-step input scale and MiniLM prompts (the shipped
weights were trained under that name).

    lsd bench step --config lsd_configs/demo.py       # the streaming step the demo model runs
    lsd info --config demo
"""

import dataclasses

from lsd_configs import tiny_pixel
from lsd_jax.config import Config


def get_config() -> Config:
    return dataclasses.replace(tiny_pixel.get_config(), name="demo")
