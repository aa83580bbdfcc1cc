"""The floors of `lsd eval`: copy input and per-pixel colour maps fitted by least squares."""

from __future__ import annotations

import numpy as np
import pytest

from lsd_jax.config import load_config
from lsd_train import baselines


def test_affine_fit_recovers_an_affine_map_exactly():
    rng = np.random.default_rng(0)
    cond = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    matrix = np.array([[0.5, 0.2, 0.1], [-0.3, 0.4, 0.2], [0.1, 0.1, 0.4]])
    target_f = cond.astype(np.float64) / 255 @ matrix.T + np.array([0.1, 0.35, 0.2])
    target = np.round(255 * target_f).astype(np.uint8)
    coef = baselines.fit_color_map(cond, target, "affine")
    assert coef.shape == (4, 3)
    np.testing.assert_allclose(coef[:3], matrix.T, atol=2e-3)
    out = baselines.apply_color_map(coef, cond, "affine")
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - target).max() <= 1


def test_quadratic_fit_recovers_a_quadratic_map_the_affine_one_cannot():
    rng = np.random.default_rng(1)
    cond = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = cond.astype(np.float64) / 255
    target = np.round(255 * np.stack([x[..., 0] ** 2, x[..., 1] * x[..., 2], 1 - x[..., 0]],
                                     -1)).astype(np.uint8)
    errors = {}
    for kind in baselines.COLOR_MAPS:
        out = baselines.apply_color_map(baselines.fit_color_map(cond, target, kind), cond, kind)
        errors[kind] = np.abs(out.astype(int) - target).max()
    assert errors["quadratic"] <= 1 < 20 < errors["affine"]
    with pytest.raises(ValueError, match="'cubic'"):
        baselines.color_features(cond.reshape(-1, 3), "cubic")


def test_floor_is_one_db_over_the_best_baseline_capped_at_40():
    assert baselines.floor_of({"copy_input": 14.9, "affine": 16.5, "quadratic": 12.0}) == 17.5
    assert baselines.floor_of({"copy_input": 5.6, "affine": 100.0, "quadratic": 100.0}) == 40.0


def test_fitted_baselines_on_validation_clips_match_the_tasks():
    """A negative is an exact affine map; sepia a clipped matrix (near exact); the pencil sketch
    is not a colour map at all."""
    cfg = load_config("lsd_configs/demo.py")
    fits = baselines.fit_baselines(cfg, "negative,sepia,pencil_sketch")
    from lsd_train.eval_data import heldout_pairs
    from lsd_train.evaluate import clip_psnr

    names, _, cond, target, _ = heldout_pairs(cfg, clips=1, frames=4, tasks=
                                              "negative,sepia,pencil_sketch")
    psnr = {name: {kind: clip_psnr(out, target[i]) for kind, out in
                   baselines.baseline_outputs(fits[name], cond[i]).items()}
            for i, name in enumerate(names)}
    assert psnr["negative"]["affine"] == 100.0 and psnr["negative"]["copy_input"] < 10
    assert psnr["sepia"]["affine"] > 30
    assert max(psnr["pencil_sketch"].values()) < 15
