"""Tests for lsd_jax.objectives: noise samplers, history augmentation, shortcut targets, loss.

The network is a small stand-in with the DiT's call signature (causal over frames, conditioned on
time, step size, input frames and prompt), so these tests do not depend on lsd_jax.model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from lsd_jax import history_aug as aug
from lsd_jax import objectives as obj
from lsd_jax.config import Config, DiffusionConfig, HistoryAugConfig, ModelConfig
from lsd_jax.diffusion import make_process

B, T, H, W, C = 4, 5, 16, 16, 3
RF_CFG = DiffusionConfig()
RF = make_process(RF_CFG)
DDPM_CFG = DiffusionConfig(process="ddpm_v", ctx_level=14.0, shortcut=False)
DDPM = make_process(DDPM_CFG)
NO_AUG = HistoryAugConfig(enabled=False)
ONLY = {kind: HistoryAugConfig(prob=1.0, **{k: k == kind for k in aug.CORRUPTIONS})
        for kind in ("noise", "self_prediction")}


# Whole functions under jit: eager dispatch would compile every primitive separately.
augment = jax.jit(aug.augment_history, static_argnums=2)
sample_corruption = jax.jit(aug.sample_corruption, static_argnums=(1, 2))
gaussian_blur = jax.jit(aug.gaussian_blur, static_argnums=2)
jpeg_quantise = jax.jit(aug.jpeg_quantise)
spatial_shift = jax.jit(aug.spatial_shift, static_argnums=2)


def key(seed):
    # XLA compiles threefry slowly on CPU; the code under test is agnostic to the key type
    # (test_loss_fn_ddpm keeps the default one).
    return jax.random.key(seed, impl="rbg")


def _frames(seed, shape=(B, T, H, W, C)):
    return jax.random.uniform(key(seed), shape, minval=-1.0, maxval=1.0)


# ----------------------------------------------------------------------------- stand-in network


def standin_init(seed=0, hidden=8, prompt_dim=6):
    ks = jax.random.split(key(seed), 7)
    return {
        "w_in": jax.random.normal(ks[0], (C, hidden)) / np.sqrt(C),
        "w_cond": jax.random.normal(ks[1], (C, hidden)) / np.sqrt(C),
        "w_time": jax.random.normal(ks[2], (hidden,)),
        "w_step": jax.random.normal(ks[3], (hidden,)),
        "w_prompt": jax.random.normal(ks[4], (prompt_dim, hidden)) / np.sqrt(prompt_dim),
        "mix": jax.random.normal(ks[5], (hidden,)),
        "w_out": jax.random.normal(ks[6], (hidden, C)) / np.sqrt(hidden),
    }


def standin_apply(params, x_bthwc, time_bt, *, step_size_bt=None, cond_bthwc=None,
                  prompt_bp=None, external_btx=None):
    """Per-pixel MLP plus a causal running mean over frames (so history matters)."""
    assert external_btx is None
    h = x_bthwc @ params["w_in"] + (time_bt / 1000.0)[..., None, None, None] * params["w_time"]
    if step_size_bt is not None:
        h = h + jnp.log2(step_size_bt)[..., None, None, None] * params["w_step"]
    if cond_bthwc is not None:
        h = h + cond_bthwc @ params["w_cond"]
    if prompt_bp is not None:
        h = h + (prompt_bp @ params["w_prompt"])[:, None, None, None, :]
    h = jnp.tanh(h)
    frames = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None, None, None]
    h = h + params["mix"] * jnp.cumsum(h, axis=1) / frames
    return h @ params["w_out"]


def standin_fn(params, process, cond_bthwc=None, prompt_bp=None):
    """`fn(x_t, level, step)` as loss_fn builds it for the stand-in."""
    def fn(x_bthwc, level_bt, step_bt):
        n = x_bthwc.shape[0]
        return standin_apply(params, x_bthwc, process.model_time(level_bt), step_size_bt=step_bt,
                             cond_bthwc=None if cond_bthwc is None else cond_bthwc[:n],
                             prompt_bp=None if prompt_bp is None else prompt_bp[:n])
    return fn


# ----------------------------------------------------------------------------- noise levels


@pytest.mark.parametrize("process,cfg", [(RF, RF_CFG), (DDPM, DDPM_CFG)])
def test_independent_levels_per_frame(process, cfg):
    level_bt = np.asarray(obj.sample_noise_levels("independent", key(0), 2048, 6,
                                                  process, cfg))
    assert level_bt.shape == (2048, 6) and level_bt.dtype == np.float32
    corr = np.corrcoef(level_bt.T)
    assert np.abs(corr[~np.eye(6, dtype=bool)]).max() < 0.1
    assert abs(level_bt.mean() / process.max_level - 0.5) < 0.02
    if process is RF:
        assert all(len(set(row)) == 6 for row in level_bt)
    else:
        np.testing.assert_array_equal(level_bt, np.round(level_bt))


def test_clip_levels_shared_by_frames():
    level_bt = np.asarray(obj.sample_noise_levels("clip", key(1), 512, 6, RF, RF_CFG))
    np.testing.assert_array_equal(level_bt, np.repeat(level_bt[:, :1], 6, axis=1))
    assert len(set(level_bt[:, 0])) == 512


@pytest.mark.parametrize("process,cfg", [(RF, RF_CFG), (DDPM, DDPM_CFG)])
def test_history_low_levels(process, cfg):
    level_bt = np.asarray(obj.sample_noise_levels("history_low", key(2), 2048, 6,
                                                  process, cfg))
    low_max = cfg.history_low_max * process.max_level
    assert level_bt[:, :-1].min() >= 0 and level_bt[:, :-1].max() <= low_max
    assert level_bt[:, :-1].max() > 0.9 * low_max
    last = level_bt[:, -1]
    assert last.min() >= 0 and last.max() <= process.max_level
    assert abs(last.mean() / process.max_level - 0.5) < 0.03


def test_unknown_sampler_named():
    with pytest.raises(ValueError, match="'sideways'"):
        obj.sample_noise_levels("sideways", key(0), 2, 2, RF, RF_CFG)


# ----------------------------------------------------------------------------- corruption kernels


def _np_gaussian_blur(frame_hwc, sigma, radius):
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    w /= w.sum()
    out = frame_hwc.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(wi * np.take(padded, np.arange(i, i + n), axis=axis) for i, wi in enumerate(w))
    return out


def test_gaussian_blur_matches_reference():
    x = _frames(3, (8, T, H, W, C))
    sigma_bt = jax.random.uniform(key(4), (8, T), minval=0.3, maxval=1.5)
    out = np.asarray(gaussian_blur(x, sigma_bt, 5))
    x_np, sigma_np = np.asarray(x), np.asarray(sigma_bt)
    for b, t in np.ndindex(8, T):
        np.testing.assert_allclose(out[b, t], _np_gaussian_blur(x_np[b, t], sigma_np[b, t], 5),
                                   atol=1e-5)
    np.testing.assert_array_equal(gaussian_blur(x, jnp.zeros((8, T)), 5), x)


def test_jpeg_quantise_matches_scipy_dct():
    x = _frames(5, (8, T, H, W, C))
    step_bt = jax.random.uniform(key(6), (8, T), minval=0.05, maxval=0.25)
    out = np.asarray(jpeg_quantise(x, step_bt))
    x_np, step_np = np.asarray(x), np.asarray(step_bt)
    freq_k, freq_l = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    ramp = 1 + (freq_k + freq_l) / 7
    for b, t in np.ndindex(8, T):
        frame = x_np[b, t].astype(np.float64)
        expected = np.empty_like(frame)
        q = step_np[b, t] * ramp
        for i in range(0, H, 8):
            for j in range(0, W, 8):
                for c in range(C):
                    coef = scipy.fft.dctn(frame[i:i + 8, j:j + 8, c], norm="ortho")
                    expected[i:i + 8, j:j + 8, c] = scipy.fft.idctn(
                        np.round(coef / q) * q, norm="ortho")
        np.testing.assert_allclose(out[b, t], expected, atol=1e-5)
    np.testing.assert_array_equal(jpeg_quantise(x, jnp.zeros((8, T))), x)


def test_jpeg_falls_back_to_rounding_when_blocks_do_not_fit():
    x = _frames(7, (2, 3, 12, 20, C))
    step_bt = jax.random.uniform(key(8), (2, 3), minval=0.05, maxval=0.25)
    q = np.asarray(step_bt)[..., None, None, None]
    np.testing.assert_allclose(jpeg_quantise(x, step_bt), np.round(np.asarray(x) / q) * q,
                               atol=1e-6)


def test_spatial_shift_matches_reference():
    x = _frames(9, (8, T, H, W, C))
    shift_bt2 = jax.random.randint(key(10), (8, T, 2), -2, 3)
    out, x_np, shift_np = np.asarray(spatial_shift(x, shift_bt2, 2)), np.asarray(x), np.asarray(
        shift_bt2)
    ys, xs = np.arange(H), np.arange(W)
    for b, t in np.ndindex(8, T):
        dy, dx = shift_np[b, t]
        rows = np.clip(ys - dy, 0, H - 1)
        cols = np.clip(xs - dx, 0, W - 1)
        np.testing.assert_array_equal(out[b, t], x_np[b, t][rows][:, cols])


def test_color_shift():
    x = _frames(11, (2, 3, H, W, C))
    gain = jax.random.uniform(key(12), (2, 3, C), minval=0.8, maxval=1.2)
    offset = jax.random.uniform(key(13), (2, 3, C), minval=-0.2, maxval=0.2)
    expected = (np.asarray(x) * np.asarray(gain)[:, :, None, None, :]
                + np.asarray(offset)[:, :, None, None, :])
    np.testing.assert_allclose(aug.color_shift(x, gain, offset), expected, atol=1e-6)


# ----------------------------------------------------------------------------- history augmentation


def test_corruption_draws_respect_config():
    cfg = HistoryAugConfig(prob=0.6, jpeg=False, self_prediction=False)
    corr = sample_corruption(key(14), (256, 8, 8, 8, C), cfg)
    kind_bt = np.asarray(corr.kind_bt)
    assert np.all(kind_bt[:, -1] == aug.UNTOUCHED)  # the last frame is never history
    history = kind_bt[:, :-1]
    assert abs(np.mean(history != aug.UNTOUCHED) - 0.6) < 0.03
    # Disabled kinds are never drawn, every enabled one is.
    used = set(np.unique(history)) - {aug.UNTOUCHED}
    assert used == {aug.CORRUPTIONS.index(k) for k in ("blur", "color", "shift", "noise")}
    # Strengths within the configured maxima, and actually spread up to them.
    sigma = np.asarray(corr.blur_sigma_bt)
    assert sigma.min() >= 0 and sigma.max() <= cfg.blur_max_sigma
    assert sigma.max() > 0.95 * cfg.blur_max_sigma
    assert np.abs(np.asarray(corr.color_gain_btc) - 1).max() <= cfg.color_max_shift + 1e-7
    assert np.abs(np.asarray(corr.color_offset_btc)).max() <= cfg.color_max_shift
    step = np.asarray(corr.jpeg_step_bt)
    assert step.min() >= 0 and step.max() <= cfg.jpeg_max_step
    shift_pixels = np.abs(np.asarray(corr.shift_bt2)).max(axis=-1)
    assert shift_pixels.min() == 1 and shift_pixels.max() == cfg.shift_max_pixels
    std = np.asarray(corr.noise_std_bt)
    assert std.min() >= 0 and std.max() <= cfg.noise_max_std


def test_each_kind_changes_only_history_frames():
    # All kinds on, every history frame corrupted: each frame must be exactly its drawn kind.
    cfg = HistoryAugConfig(prob=1.0)
    shape = (8, T, H, W, C)
    x, self_pred = _frames(15, shape), _frames(16, shape)
    rng = key(17)
    out = np.asarray(augment(rng, x, cfg, self_pred))
    corr = sample_corruption(rng, shape, cfg)
    expected = {
        "blur": gaussian_blur(x, corr.blur_sigma_bt, 5),
        "color": aug.color_shift(x, corr.color_gain_btc, corr.color_offset_btc),
        "jpeg": jpeg_quantise(x, corr.jpeg_step_bt),
        "shift": spatial_shift(x, corr.shift_bt2, 2),
        "noise": x + corr.noise_std_bt[..., None, None, None] * corr.noise_bthwc,
        "self_prediction": self_pred,
    }
    kind_bt = np.asarray(corr.kind_bt)
    np.testing.assert_array_equal(out[:, -1], x[:, -1])
    assert np.all(kind_bt[:, -1] == aug.UNTOUCHED)
    changed_bt = np.any(out != np.asarray(x), axis=(-3, -2, -1))
    for kind, frames in expected.items():
        sel = kind_bt == aug.CORRUPTIONS.index(kind)
        assert sel.any(), kind
        np.testing.assert_allclose(out[sel], np.asarray(frames)[sel], atol=1e-6, err_msg=kind)
        if kind == "blur":  # below ~0.2 px every off-centre tap underflows: the identity
            sel &= np.asarray(corr.blur_sigma_bt) > 0.2
        assert changed_bt[sel].all(), kind


def test_augmentation_off_is_identity():
    x = _frames(19)
    for cfg in (NO_AUG, HistoryAugConfig(prob=0.0),
                HistoryAugConfig(prob=1.0, **{k: False for k in aug.CORRUPTIONS})):
        assert aug.enabled_corruptions(cfg) == ()
        np.testing.assert_array_equal(aug.augment_history(key(20), x, cfg), x)


def test_self_prediction_needs_predictions():
    with pytest.raises(ValueError, match="self_pred_bthwc"):
        augment(key(21), _frames(22), ONLY["self_prediction"], None)


PARAMS = standin_init()
FN = standin_fn(PARAMS, RF)
targets = jax.jit(obj.training_targets, static_argnums=(0, 1, 4, 5))


@pytest.mark.parametrize("kind", ["noise", "self_prediction"])
def test_augmentation_changes_inputs_never_targets(kind):
    x0 = _frames(23)
    rng = key(24)
    cfg_off = dataclasses.replace(RF_CFG, shortcut=False, history_aug=NO_AUG)
    cfg_on = dataclasses.replace(cfg_off, history_aug=ONLY[kind])
    clean = targets(FN, FN, x0, rng, cfg_off, RF)
    augmented = targets(FN, FN, x0, rng, cfg_on, RF)
    # Targets come from the clean frames: bit-identical, and the exact flow-matching velocity.
    np.testing.assert_array_equal(augmented.target_bthwc, clean.target_bthwc)
    np.testing.assert_array_equal(augmented.level_bt, clean.level_bt)
    eps = clean.target_bthwc + x0
    np.testing.assert_allclose(RF.add_noise(x0, eps, clean.level_bt), clean.x_t_bthwc, atol=1e-5)
    # Inputs: the last frame untouched, every history frame changed.
    diff_bt = np.abs(np.asarray(augmented.x_t_bthwc - clean.x_t_bthwc)).max(axis=(-3, -2, -1))
    assert np.all(diff_bt[:, -1] < 1e-6)
    assert np.all(diff_bt[:, :-1] > 1e-3)
    if kind == "self_prediction":
        # History content is the model's own x0 prediction on the clean clip noised alike.
        pred = FN(clean.x_t_bthwc, clean.level_bt, jnp.full((B, T), RF.min_step_size))
        x0_hat = RF.predict_x0(clean.x_t_bthwc, pred, clean.level_bt)
        np.testing.assert_allclose(augmented.x_t_bthwc[:, :-1],
                                   RF.add_noise(x0_hat, eps, clean.level_bt)[:, :-1], atol=1e-4)


# ----------------------------------------------------------------------------- shortcut


def test_shortcut_target_is_mean_of_two_half_steps():
    params = standin_init(1)
    fn = standin_fn(params, RF, cond_bthwc=_frames(25))
    x_t = jax.random.normal(key(26), (B, T, H, W, C))
    d_bt = 2.0 ** -jax.random.randint(key(27), (B, T), 1, 7).astype(jnp.float32)
    level_bt = 2 * d_bt * jax.random.randint(key(28), (B, T), 1, 3)
    target = obj.shortcut_target(fn, x_t, level_bt, d_bt)
    # Reference: two explicit Euler d-steps in float64, then the velocity of one 2d-step.
    d = np.asarray(d_bt, np.float64)[..., None, None, None]
    v1 = np.asarray(fn(x_t, level_bt, d_bt), np.float64)
    x_mid = np.asarray(x_t, np.float64) - d * v1
    v2 = np.asarray(fn(jnp.asarray(x_mid, jnp.float32), level_bt - d_bt, d_bt), np.float64)
    np.testing.assert_allclose(target, (v1 + v2) / 2, atol=1e-5)
    two_steps = x_mid - d * v2
    np.testing.assert_allclose(np.asarray(x_t) - 2 * d * np.asarray(target), two_steps, atol=1e-5)
    # Stop-gradient: no gradient reaches the target network's parameters.
    grad = jax.grad(lambda p: jnp.sum(obj.shortcut_target(standin_fn(p, RF), x_t, level_bt,
                                                          d_bt)))(params)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grad))


def test_x0_prediction_shortcut_target_lands_where_two_steps_land():
    """Rectified flow with x0 prediction: Euler steps along v = (x_t - x0) / t; the shortcut
    target is the x0 output whose one 2d-step lands where two d-steps land (float64 reference),
    and at the last cell (t = 2d) it is that landing point itself."""
    x0_cfg = dataclasses.replace(RF_CFG, prediction="x0")
    process = make_process(x0_cfg)
    params = standin_init(3)
    fn = standin_fn(params, process, cond_bthwc=_frames(33))
    x_t = jax.random.normal(key(34), (B, T, H, W, C))
    d_bt = 2.0 ** -jax.random.randint(key(35), (B, T), 1, 7).astype(jnp.float32)
    level_bt = 2 * d_bt * jax.random.randint(key(36), (B, T), 1, 3)
    target = np.asarray(obj.shortcut_target(fn, x_t, level_bt, d_bt, process), np.float64)
    d = np.asarray(d_bt, np.float64)[..., None, None, None]
    t = np.asarray(level_bt, np.float64)[..., None, None, None]
    xt = np.asarray(x_t, np.float64)
    p1 = np.asarray(fn(x_t, level_bt, d_bt), np.float64)
    x_mid = xt - d * (xt - p1) / t
    p2 = np.asarray(fn(jnp.asarray(x_mid, jnp.float32), level_bt - d_bt, d_bt), np.float64)
    x_end = x_mid - d * (x_mid - p2) / (t - d)
    np.testing.assert_allclose(xt - 2 * d * (xt - target) / t, x_end, atol=1e-4)
    last = np.broadcast_to(np.isclose(t, 2 * d), x_end.shape)
    assert last.any() and (~last).any()
    np.testing.assert_allclose(target[last], x_end[last], atol=1e-4)
    # The flow-matching target is the clean frame; the prediction of x0 is the output itself.
    x0 = _frames(37)
    np.testing.assert_array_equal(process.target(x0, x_t, level_bt), x0)
    np.testing.assert_array_equal(process.predict_x0(x_t, x0, level_bt), x0)


def test_training_targets_shortcut_items():
    params = standin_init(2)
    fn = standin_fn(params, RF)
    cfg = dataclasses.replace(RF_CFG, shortcut_fraction=0.5, shortcut_max_steps=16,
                              history_aug=NO_AUG)
    process = make_process(cfg)
    x0 = _frames(29, (8, T, H, W, C))
    n = obj.num_shortcut_clips(8, cfg)
    assert n == 4
    tg = jax.jit(lambda: obj.training_targets(fn, fn, x0, key(30), cfg, process))()
    level, step = np.asarray(tg.level_bt), np.asarray(tg.step_size_bt)
    # Flow-matching clips: the smallest step, velocity of the clean frame.
    np.testing.assert_array_equal(step[n:], 1 / 16)
    eps = tg.target_bthwc[n:] + x0[n:]
    np.testing.assert_allclose(process.add_noise(x0[n:], eps, tg.level_bt[n:]), tg.x_t_bthwc[n:],
                               atol=1e-5)
    # Shortcut clips: one power-of-two step 2d per clip in [2/16, 1], levels on its grid.
    np.testing.assert_array_equal(step[:n], np.repeat(step[:n, :1], T, axis=1))
    assert set(np.log2(step[:n, 0])) <= {0.0, -1.0, -2.0, -3.0}
    assert np.all(level[:n] - step[:n] >= 0) and np.all(level[:n] <= 1)
    np.testing.assert_array_equal(level[:n] / step[:n], np.round(level[:n] / step[:n]))
    expected = obj.shortcut_target(fn, tg.x_t_bthwc[:n], tg.level_bt[:n], tg.step_size_bt[:n] / 2)
    np.testing.assert_allclose(tg.target_bthwc[:n], expected, atol=1e-5)


def test_shortcut_levels_cover_grid():
    level_bt = RF.sample_levels(key(31), (4096, 2))
    snapped, big = obj.sample_shortcut_levels(key(32), level_bt, 8)
    snapped, big = np.asarray(snapped), np.asarray(big)
    assert set(np.unique(big)) == {1.0, 0.5, 0.25}
    for size in (1.0, 0.5, 0.25):
        cells = snapped[big == size] / size
        np.testing.assert_array_equal(np.unique(cells), np.arange(1, 1 / size + 1))
        assert np.all(snapped[big == size] >= level_bt[big == size] - 1e-7)


# ----------------------------------------------------------------------------- loss


def _config(**diffusion):
    model = ModelConfig(frame_height=H, frame_width=W, channels=C, cond_channels=C, patch_size=4,
                        hidden_size=16, depth=1, num_heads=1, prompt_dim=6)
    return Config(model=model, diffusion=dataclasses.replace(RF_CFG, **diffusion))


def _batch(seed=33):
    return {"target": _frames(seed), "cond": _frames(seed + 1),
            "prompt": jax.random.normal(key(seed + 2), (B, 6))}


def test_loss_fn_jit_and_grad_match_reference():
    cfg = _config(shortcut_fraction=0.5)
    params = standin_init(3)
    batch, rng = _batch(), key(36)

    def loss(p):
        return obj.loss_fn(standin_apply, p, batch, rng, cfg, RF)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert set(metrics) == {"loss", "loss/flow_matching", "loss/shortcut"} | {
        f"loss/level_bucket_{i}" for i in range(4)}
    # Reference: targets built outside the gradient are constants; the gradient must be that of a
    # plain regression onto them (self-prediction and shortcut targets carry no gradient).
    fn = standin_fn(params, RF, batch["cond"], batch["prompt"])
    tg = jax.jit(lambda: obj.training_targets(fn, fn, batch["target"], rng, cfg.diffusion, RF))()

    def reference(p):
        pred = standin_apply(p, tg.x_t_bthwc, RF.model_time(tg.level_bt),
                             step_size_bt=tg.step_size_bt, cond_bthwc=batch["cond"],
                             prompt_bp=batch["prompt"])
        return jnp.mean((pred - tg.target_bthwc) ** 2, axis=(-3, -2, -1))

    mse_bt = np.asarray(reference(params))
    np.testing.assert_allclose(value, mse_bt.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/shortcut"], mse_bt[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/flow_matching"], mse_bt[2:].mean(), rtol=1e-5)
    bucket_bt = np.minimum(np.asarray(tg.level_bt[2:]) * 4 // 1, 3)
    for i in range(4):
        sel = bucket_bt == i
        expected = mse_bt[2:][sel].mean() if sel.any() else 0.0
        np.testing.assert_allclose(metrics[f"loss/level_bucket_{i}"], expected, rtol=1e-5)
    ref_grads = jax.grad(lambda p: jnp.mean(reference(p)))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_loss_fn_ema_target():
    cfg = _config(shortcut_fraction=0.5, shortcut_target="ema", history_aug=NO_AUG)
    params, ema = standin_init(4), standin_init(5)
    batch, rng = _batch(37), key(38)
    with pytest.raises(ValueError, match="ema_params"):
        obj.loss_fn(standin_apply, params, batch, rng, cfg, RF)
    with_ema = jax.jit(lambda p, e: obj.loss_fn(standin_apply, p, batch, rng, cfg, RF, e)[0])
    loss_ema, loss_self = with_ema(params, ema), with_ema(params, params)
    online = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion,
                                                                    shortcut_target="online"))
    loss_online = jax.jit(lambda p: obj.loss_fn(standin_apply, p, batch, rng, online, RF)[0])(
        params)
    np.testing.assert_allclose(loss_self, loss_online, rtol=1e-6)
    assert abs(float(loss_ema) - float(loss_online)) > 1e-4


def test_loss_fn_ddpm():
    cfg = Config(model=dataclasses.replace(_config().model, use_step_size=False),
                 diffusion=dataclasses.replace(DDPM_CFG, history_aug=NO_AUG))
    value, metrics = jax.jit(lambda p: obj.loss_fn(standin_apply, p, _batch(39),
                                                   jax.random.key(40), cfg, DDPM))(standin_init())
    assert np.isfinite(value) and "loss/shortcut" not in metrics
    bad = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, shortcut=True))
    with pytest.raises(ValueError, match="use_step_size"):
        obj.loss_fn(standin_apply, standin_init(), _batch(39), key(40), bad, DDPM)
    bad = dataclasses.replace(bad, model=_config().model)
    with pytest.raises(ValueError, match="rectified_flow"):
        obj.loss_fn(standin_apply, standin_init(), _batch(39), key(40), bad, DDPM)


def test_loss_fn_distillation():
    """With a teacher clip, the flow-matching clips also regress onto `process.target` of the
    teacher's frames at the same noise, weighted per clip by `distill` and by
    `train.distill_weight`; clips the teacher does not know (`distill` 0) add nothing."""
    base = _config(shortcut_fraction=0.5, history_aug=NO_AUG)
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, distill_weight=0.5))
    params, rng = standin_init(6), key(41)
    batch = _batch(42)
    teacher = _frames(45)
    distill = jnp.asarray([1.0, 1.0, 1.0, 0.0][:B])
    with_teacher = {**batch, "teacher": teacher, "distill": distill}
    value, metrics = jax.jit(lambda p: obj.loss_fn(standin_apply, p, with_teacher, rng, cfg,
                                                   RF))(params)
    plain, plain_metrics = jax.jit(lambda p: obj.loss_fn(standin_apply, p, batch, rng, cfg,
                                                         RF))(params)
    fn = standin_fn(params, RF, batch["cond"], batch["prompt"])
    tg = jax.jit(lambda: obj.training_targets(fn, fn, batch["target"], rng, cfg.diffusion, RF,
                                              teacher_bthwc=teacher))()
    pred = standin_apply(params, tg.x_t_bthwc, RF.model_time(tg.level_bt),
                         step_size_bt=tg.step_size_bt, cond_bthwc=batch["cond"],
                         prompt_bp=batch["prompt"])
    n_short = obj.num_shortcut_clips(B, cfg.diffusion)
    teacher_mse_bt = np.asarray(jnp.mean((pred - tg.teacher_target_bthwc) ** 2,
                                         axis=(-3, -2, -1)))[n_short:]
    weights = np.asarray(distill)[n_short:]
    expected = (weights[:, None] * teacher_mse_bt).sum() / (weights.sum() * T)
    assert expected > 1e-3
    np.testing.assert_allclose(metrics["loss/distill"], expected, rtol=1e-5)
    np.testing.assert_allclose(value, float(plain) + 0.5 * expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/flow_matching"], plain_metrics["loss/flow_matching"],
                               rtol=1e-6)
    # The same noise: the two targets differ by what the clean frames differ by.
    zeros = jnp.zeros_like(teacher)
    np.testing.assert_allclose(
        np.asarray(tg.teacher_target_bthwc - tg.target_bthwc)[n_short:],
        np.asarray(RF.target(teacher, zeros, tg.level_bt) - RF.target(batch["target"], zeros,
                                                                       tg.level_bt))[n_short:],
        rtol=1e-5, atol=1e-6)
