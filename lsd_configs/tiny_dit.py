"""tiny_dit: the tiny model (lsd_configs/tiny.py) with the plain DiT training recipe (x0 prediction,
hashed prompts): the recipe of the first demo weights and the baseline (run A) of the recipe search
in EVAL.md. Those weights were made by (one CPU core, about 85 minutes):

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 \
        lsd train --config lsd_configs/tiny_dit.py --workdir runs/tiny_dit

and the two ablations of EVAL.md by the same command with, respectively,

    diffusion.history_aug.enabled=false train.steps=1000   (no history augmentation)
    diffusion.noise_sampler=clip train.steps=1000          (one noise level per clip, no DF)

The learning rate is constant after warm-up, so the main run's step-1000 checkpoint is the same
training as a 1000-step ablation except for the ablated piece. `--resume` continues an
interrupted run from its newest checkpoint.
"""

import dataclasses

from lsd_configs import tiny
from lsd_jax.config import Config, TrainConfig


def get_config() -> Config:
    base = tiny.get_config()
    return dataclasses.replace(
        base,
        name="tiny_dit",
        diffusion=dataclasses.replace(base.diffusion, prediction="x0"),
        train=TrainConfig(
            steps=1500, batch_size=4, lr=6e-4, warmup_steps=200, final_lr_fraction=1.0,
            weight_decay=0.01, grad_clip=1.0, ema_decay=0.998, save_every=250, keep=10,
            log_every=10, sample_every=500, seed=0,
        ),
    )
