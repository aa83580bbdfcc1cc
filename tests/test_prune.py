"""`lsd prune` (lsd_train/prune): widths checked against the tile, units kept by score, and the
cut model computing what the uncut one computes with the cut units' outputs zeroed (exact for the
MLP channels and heads, which no normalisation follows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, rel_err
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.errors import ConfigError
from lsd_jax.model import DiT, model_from_params, randomize
from lsd_train.prune import Widths, check_widths, cut, keep_indices, pruned_config, score_units

SMALL = ["model.frame_height=16", "model.frame_width=16", "model.patch_size=4",
         "model.hidden_size=32", "model.num_heads=4", "model.depth=2", "model.window=3",
         "model.prompt_dim=8", "model.pixel_channels=8", "model.color_map=curves"]


def _setup(seed=0):
    cfg = load_config(CONFIGS / "tiny.py", SMALL)
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(seed)), seed=seed, gain=0.7)
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return cfg, model, params


def _forward(cfg, params, seed=1):
    m = cfg.model
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (2, 3, *m.frame_shape))
    cond = jax.random.uniform(k[1], (2, 3, m.frame_height, m.frame_width, 3), minval=-1, maxval=1)
    time = jax.random.uniform(k[2], (2, 3), maxval=1000.0)
    prompt = jax.random.normal(k[3], (2, m.prompt_dim))
    model = model_from_params(m, jax.tree.map(jnp.asarray, params))
    return model(x, time, cond_bthwc=cond, step_size_bt=jnp.full((2, 3), 0.25), prompt_bp=prompt)


def test_keeping_every_unit_changes_nothing():
    cfg, _, params = _setup()
    m = cfg.model
    widths = Widths(m.mlp_width, m.num_heads, m.pixel_channels)
    scores = score_units(cfg, params, score="magnitude")
    keep = keep_indices(scores, widths)
    new_cfg = pruned_config(cfg, widths)
    np.testing.assert_array_equal(np.asarray(_forward(new_cfg, cut(cfg, params, keep))),
                                  np.asarray(_forward(cfg, params)))


def test_cut_mlp_channels_and_heads_equal_zeroed_outputs():
    """Cutting MLP channels and heads = zeroing the weights that read them (fc2 rows, to_out rows)
    in the uncut model; every layer keeps its own units."""
    cfg, _, params = _setup()
    m = cfg.model
    widths = Widths(mlp=48, heads=2)
    scores = score_units(cfg, params, score="magnitude")
    keep = keep_indices(scores, widths)
    assert keep["mlp"].shape == (m.depth, 2, 48) and keep["heads"].shape == (m.depth, 2, 2)
    assert not np.array_equal(keep["heads"][0], keep["heads"][1])  # per-layer choice
    zeroed = jax.tree.map(np.array, params)
    for si, sub in enumerate(("spatial", "temporal")):
        block = zeroed["blocks"][sub]
        for layer in range(m.depth):
            drop = np.setdiff1d(np.arange(m.mlp_width), keep["mlp"][layer, si])
            block["mlp"]["fc2"]["kernel"][layer, drop] = 0.0
            heads = np.setdiff1d(np.arange(m.num_heads), keep["heads"][layer, si])
            rows = (heads[:, None] * m.head_dim + np.arange(m.head_dim)).ravel()
            block["attn"]["to_out"]["kernel"][layer, rows] = 0.0
    new_cfg = pruned_config(cfg, widths)
    assert (new_cfg.model.mlp_width, new_cfg.model.num_heads, new_cfg.model.head_dim) == (
        48, 2, m.head_dim)
    out = _forward(new_cfg, cut(cfg, params, keep))
    ref = _forward(cfg, zeroed)
    assert float(jnp.std(ref)) > 0.1
    assert rel_err(out, ref) <= 1e-5


def test_pixel_channels_cut_to_a_working_model():
    cfg, _, params = _setup()
    widths = Widths(pixel=4)
    keep = keep_indices(score_units(cfg, params, score="magnitude"), widths)
    new_cfg = pruned_config(cfg, widths)
    new = cut(cfg, params, keep)
    # The pruned weights have exactly the pruned model's shapes.
    want = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(
        DiT(new_cfg.model, rngs=nnx.Rngs(0)), nnx.Param)))
    assert jax.tree.map(lambda a: a.shape, new) == want
    assert bool(jnp.all(jnp.isfinite(_forward(new_cfg, new))))


def test_magnitude_scores_rank_a_scaled_unit_first():
    cfg, _, params = _setup()
    params["blocks"]["spatial"]["mlp"]["fc2"]["kernel"][1, 5] *= 100.0
    scores = score_units(cfg, params, score="magnitude")
    assert int(np.argmax(scores["mlp"][1, 0])) == 5


@pytest.mark.parametrize("widths, align, message", [
    (Widths(mlp=40), 16, "--mlp-width 40: 40 is not a multiple of --align 16"),
    (Widths(heads=3), 16, "--heads 3: 3 heads x 8 wide = 24 is not a multiple of --align 16"),
    (Widths(mlp=512), 16, "--mlp-width 512, expected 1..128"),
    (Widths(pixel=0), 1, "--pixel-channels 0, expected 1..8"),
])
def test_widths_checked(widths, align, message):
    cfg, _, _ = _setup()
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
        check_widths(cfg, widths, align)
