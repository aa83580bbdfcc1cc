"""Floors for `lsd eval`: what a model must beat on each paired task.

- `copy_input`: the output frame is the input frame;
- per-pixel colour maps: each output pixel is a fixed function of the same input pixel's RGB,
  fitted per task by least squares on the validation split (clips of the training photographs
  under camera seeds `FIT_SEED`, which neither training nor the evaluated clips draw):
  `affine` (RGB and a constant: 4 x 3 = 12 parameters) and `quadratic` (RGB, their squares and
  pairwise products, and a constant: 10 x 3 = 30 parameters).

A task's floor is the best of these; `lsd eval` reports each model's margin over it. A model that
does not beat a colour map on a task has not learned more than a colour lookup there.
"""

from __future__ import annotations

import numpy as np

from lsd_jax.config import Config
from lsd_train.eval_data import heldout_pairs

COLOR_MAPS = ("affine", "quadratic")
BASELINES = ("copy_input", *COLOR_MAPS)
# Validation clips the colour maps are fitted on: evaluation draws seed 0 (and small seeds).
FIT_SEED = 101
FIT_CLIPS, FIT_FRAMES = 4, 8


def color_features(rgb_n3: np.ndarray, kind: str) -> np.ndarray:
    """Per-pixel features `[n, f]` float64 of uint8 RGB `[n, 3]` scaled to [0, 1]."""
    x = rgb_n3.astype(np.float64) / 255.0
    ones = np.ones((x.shape[0], 1))
    if kind == "affine":
        return np.concatenate([x, ones], axis=1)
    if kind == "quadratic":
        r, g, b = x[:, :1], x[:, 1:2], x[:, 2:]
        return np.concatenate([x, x * x, r * g, r * b, g * b, ones], axis=1)
    raise ValueError(f"colour map kind {kind!r}, expected one of {COLOR_MAPS}")


def fit_color_map(cond: np.ndarray, target: np.ndarray, kind: str) -> np.ndarray:
    """Least-squares coefficients `[f, 3]` mapping input pixels to target pixels (uint8 arrays of
    any matching shape `[..., 3]`), in [0, 1] units."""
    feats = color_features(cond.reshape(-1, 3), kind)
    coef, *_ = np.linalg.lstsq(feats, target.reshape(-1, 3).astype(np.float64) / 255.0,
                               rcond=None)
    return coef


def apply_color_map(coef: np.ndarray, cond: np.ndarray, kind: str) -> np.ndarray:
    """The colour map applied to uint8 frames `[..., 3]`: uint8 of the same shape."""
    out = color_features(cond.reshape(-1, 3), kind) @ coef
    return np.clip(np.round(255.0 * out), 0, 255).astype(np.uint8).reshape(cond.shape)


def fit_baselines(cfg: Config, tasks: str = "all") -> dict[str, dict[str, np.ndarray]]:
    """`{task: {kind: coef}}`: every colour map fitted on the task's validation clips."""
    names, _, cond, target, _ = heldout_pairs(cfg, clips=FIT_CLIPS, frames=FIT_FRAMES,
                                              seed=FIT_SEED, tasks=tasks, split="validation")
    fits = {}
    for ti, name in enumerate(names):
        rows = slice(ti * FIT_CLIPS, (ti + 1) * FIT_CLIPS)
        fits[name] = {kind: fit_color_map(cond[rows], target[rows], kind) for kind in COLOR_MAPS}
    return fits


def baseline_outputs(fits: dict[str, np.ndarray], cond_thwc: np.ndarray) -> dict[str, np.ndarray]:
    """Every baseline's output clip for one task's input clip (uint8 `[T, H, W, 3]`)."""
    outs = {"copy_input": cond_thwc}
    outs.update({kind: apply_color_map(fits[kind], cond_thwc, kind) for kind in COLOR_MAPS})
    return outs


def floor_of(baselines: dict[str, float], cap: float = 40.0) -> float:
    """The PSNR a model must reach on a task: 1 dB above its best baseline, at most `cap` dB (a
    colour map is exact for some tasks, e.g. the negative)."""
    return min(max(baselines[k] for k in BASELINES) + 1.0, cap)
