"""tiny_pixel: the tiny DiT with the full-resolution pixel path, MiniLM prompts and the few-step
recipe chosen by the recipe search of EVAL.md (validation split, equal steps).

Changes from `lsd_configs/tiny_dit.py` (the plain tiny DiT recipe), each a config option:
`model.pixel_channels=32` (3x3 convolutions at 64x64 around the DiT: stem on the input frame,
modulated head adding a pixel-resolution correction), `model.color_map=curves` (a per-frame
colour map of the input frame made from the prompt: quadratic in RGB plus a tone curve of its
luma), `diffusion.input_scale=signal` (the starting noise enters as zeros), MiniLM prompt
embeddings (`prompt.encoder=minilm`, 384 wide) trained on every phrasing of each task
(`data.prompt_phrasings`), seven more training photographs (`data.photographs=extended`), and,
for sampling only, the same starting noise for every streamed frame
(`diffusion.frame_noise=fixed`: less flicker for a few hundredths of a dB, EVAL.md).

Trained with both cores, resumable across sessions (constant learning rate after warm-up, so
raising `train.steps` on `--resume` continues the same run):

    lsd train --config lsd_configs/tiny_pixel.py --workdir runs/tiny_pixel
    lsd train --config lsd_configs/tiny_pixel.py --workdir runs/tiny_pixel --resume
    lsd eval --checkpoint runs/tiny_pixel --split validation --steps 3

Expected: above every task's floor of `lsd eval` (copy input, best per-pixel colour map) on the
held-out split at 3 steps once trained long enough; the streaming step within the 40 ms p50 real-
time budget of this 2-core CPU (`lsd bench step --config lsd_configs/tiny_pixel.py`).
"""

import dataclasses

from lsd_configs import tiny_dit
from lsd_jax.config import Config, PromptConfig


def get_config() -> Config:
    base = tiny_dit.get_config()
    return dataclasses.replace(
        base,
        name="tiny_pixel",
        model=dataclasses.replace(base.model, pixel_channels=32, color_map="curves",
                                  prompt_dim=384),
        diffusion=dataclasses.replace(base.diffusion, input_scale="signal", frame_noise="fixed"),
        prompt=PromptConfig(encoder="minilm"),
        data=dataclasses.replace(base.data, photographs="extended", prompt_phrasings=True),
        train=dataclasses.replace(base.train, steps=20_000, warmup_steps=200, save_every=250,
                                  sample_every=1000),
    )
