"""Tests for lsd_jax.diffusion: the sigmoid schedule, both processes' algebra, the schedules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsd_jax.config import DiffusionConfig
from lsd_jax.diffusion import make_process, sigmoid_alphas_cumprod

RF = make_process(DiffusionConfig())
DDPM = make_process(DiffusionConfig(process="ddpm_v", ctx_level=14.0, shortcut=False))
SHAPE_BTHWC = (2, 3, 4, 5, 3)


def _x0_eps(seed=0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, SHAPE_BTHWC), jax.random.normal(k1, SHAPE_BTHWC)


# ----------------------------------------------------------------------------- sigmoid schedule


def test_sigmoid_schedule_published_values():
    abar = DDPM.alphas_cumprod
    assert abar.dtype == np.float32 and abar.shape == (1000,)
    assert abs(abar[14] - 0.9953) < 5e-5
    assert abs(abar[499] - 0.5) < 5e-5
    assert 2.95e-7 < abar[999] < 3.05e-7
    assert np.all(np.diff(abar) < 0)


def test_sigmoid_schedule_closed_form():
    # cumprod(1 - beta) telescopes to the normalised sigmoid curve at t = (i + 1) / T, except the
    # last beta (the curve reaches 0 there), which is clipped to 0.999.
    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    t = np.arange(1, 1001) / 1000
    curve = (sigmoid(3.0) - sigmoid(6 * t - 3)) / (sigmoid(3.0) - sigmoid(-3.0))
    expected = curve.copy()
    expected[-1] = curve[-2] * 0.001
    np.testing.assert_allclose(sigmoid_alphas_cumprod(1000, -3.0, 3.0, 1.0), expected,
                               rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- rectified flow


def test_rf_noise_target_step_consistency():
    x0, eps = _x0_eps()
    level_bt = jax.random.uniform(jax.random.key(1), SHAPE_BTHWC[:2], minval=0.05, maxval=1.0)
    next_bt = level_bt * jax.random.uniform(jax.random.key(2), SHAPE_BTHWC[:2])
    x_t = RF.add_noise(x0, eps, level_bt)
    t = np.asarray(level_bt)[..., None, None, None]
    np.testing.assert_allclose(x_t, (1 - t) * np.asarray(x0) + t * np.asarray(eps), atol=1e-5)
    v = RF.target(x0, eps, level_bt)
    np.testing.assert_allclose(v, np.asarray(eps) - np.asarray(x0), atol=1e-5)
    # The exact velocity carries x_t along the straight path: to 0 it lands on x0.
    np.testing.assert_allclose(RF.denoise_step(x_t, v, level_bt, 0.0), x0, atol=1e-5)
    np.testing.assert_allclose(RF.predict_x0(x_t, v, level_bt), x0, atol=1e-5)
    np.testing.assert_allclose(RF.denoise_step(x_t, v, level_bt, next_bt),
                               RF.add_noise(x0, eps, next_bt), atol=1e-5)


def test_rf_constants_and_model_time():
    assert RF.max_level == 1.0 and RF.ctx_level == pytest.approx(0.02)
    assert RF.min_step_size == 1 / 128
    level_bt = jax.random.uniform(jax.random.key(3), (2, 3))
    np.testing.assert_allclose(RF.model_time(level_bt), np.asarray(level_bt) * 1000, rtol=1e-6)


def _split_largest_reference(n):
    sizes = [1.0]
    while len(sizes) < n:
        sizes.sort(reverse=True)
        largest = sizes.pop(0)
        sizes += [largest / 2, largest / 2]
    return sorted(sizes, reverse=True)


@pytest.mark.parametrize("n", range(1, 129))
def test_rf_schedule_power_of_two_steps(n):
    levels, steps = RF.sampling_schedule(n)
    assert levels.dtype == np.float32 and steps.dtype == np.float32
    assert levels.shape == (n + 1,) and steps.shape == (n,)
    assert steps.sum() == 1.0 and levels[0] == 1.0 and levels[-1] == 0.0
    assert np.all(np.log2(steps) == np.round(np.log2(steps)))
    np.testing.assert_array_equal(steps, _split_largest_reference(n))
    np.testing.assert_array_equal(levels[:-1] - levels[1:], steps)


def test_rf_schedule_rejects_bad_counts():
    for n in (0, 129):
        with pytest.raises(ValueError, match=f"n_steps={n}"):
            RF.sampling_schedule(n)


def test_rf_sample_levels_range():
    levels = RF.sample_levels(jax.random.key(4), (4096,))
    assert levels.dtype == jnp.float32
    assert 0 <= levels.min() and levels.max() <= 1 and levels.max() > 0.99
    low = RF.sample_levels(jax.random.key(4), (4096,), high=0.1)
    assert 0 <= low.min() and low.max() <= 0.1


def test_rf_level_shift_moves_training_levels_to_high_noise():
    """Shift s maps u to s u / (1 + (s - 1) u): the median 0.5 goes to s / (s + 1), the same
    uniform draws are transformed (so 0 and 1 stay put), and s = 1 is the plain uniform."""
    shifted = make_process(DiffusionConfig(level_shift=3.0))
    u = np.asarray(RF.sample_levels(jax.random.key(5), (8192,)))
    t = np.asarray(shifted.sample_levels(jax.random.key(5), (8192,)))
    np.testing.assert_allclose(t, 3 * u / (1 + 2 * u), rtol=1e-6)
    assert abs(np.median(t) - 0.75) < 0.02 and 0 <= t.min() and t.max() <= 1
    with pytest.raises(ValueError, match="diffusion.level_shift=0"):
        DiffusionConfig(level_shift=0.0)


# ----------------------------------------------------------------------------- DDPM v / DDIM


def test_ddpm_constants_and_model_time():
    assert DDPM.max_level == 999.0 and DDPM.ctx_level == 14.0 and DDPM.min_step_size == 1.0
    level_bt = jnp.array([[0.0, 14.0, 999.0]])
    np.testing.assert_array_equal(DDPM.model_time(level_bt), level_bt)
    np.testing.assert_allclose(DDPM.abar(jnp.array([-1.0, 14.0, 999.0])),
                               [1.0, DDPM.alphas_cumprod[14], DDPM.alphas_cumprod[999]])


def test_ddpm_noise_and_v_target():
    x0, eps = _x0_eps(5)
    level_bt = jax.random.randint(jax.random.key(6), SHAPE_BTHWC[:2], 0, 1000).astype(jnp.float32)
    a = DDPM.alphas_cumprod[np.asarray(level_bt, int)][..., None, None, None].astype(np.float64)
    x0_64, eps_64 = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
    x_t = DDPM.add_noise(x0, eps, level_bt)
    np.testing.assert_allclose(x_t, np.sqrt(a) * x0_64 + np.sqrt(1 - a) * eps_64, atol=1e-5)
    v = DDPM.target(x0, eps, level_bt)
    np.testing.assert_allclose(v, np.sqrt(a) * eps_64 - np.sqrt(1 - a) * x0_64, atol=1e-5)
    np.testing.assert_allclose(DDPM.predict_x0(x_t, v, level_bt), x0, atol=1e-5)


def test_ddim_step_with_exact_v():
    x0, eps = _x0_eps(7)
    level_bt = jax.random.randint(jax.random.key(8), SHAPE_BTHWC[:2], 50, 1000).astype(jnp.float32)
    next_bt = jnp.floor(level_bt * jax.random.uniform(jax.random.key(9), SHAPE_BTHWC[:2]))
    x_t = DDPM.add_noise(x0, eps, level_bt)
    v = DDPM.target(x0, eps, level_bt)
    step = jax.jit(DDPM.denoise_step)
    # next < 0: abar_next = 1, the step returns x0 (the last Oasis step).
    np.testing.assert_allclose(step(x_t, v, level_bt, jnp.full_like(level_bt, -1.0)), x0,
                               atol=1e-5)
    np.testing.assert_allclose(step(x_t, v, level_bt, next_bt), DDPM.add_noise(x0, eps, next_bt),
                               atol=1e-5)


def test_ddim_step_matches_oasis_formulas():
    # Oasis's step, written out in float64 on an arbitrary (not exact) prediction.
    x0, v = _x0_eps(10)
    level, next_level = 699.0, 599.0
    x = np.asarray(x0, np.float64)
    vv = np.asarray(v, np.float64)
    a = float(DDPM.alphas_cumprod[699])
    a_next = float(DDPM.alphas_cumprod[599])
    x_start = np.sqrt(a) * x - np.sqrt(1 - a) * vv
    x_noise = (np.sqrt(1 / a) * x - x_start) / np.sqrt(1 / a - 1)
    expected = np.sqrt(a_next) * x_start + x_noise * np.sqrt(1 - a_next)
    level_bt = jnp.full(SHAPE_BTHWC[:2], level)
    next_bt = jnp.full(SHAPE_BTHWC[:2], next_level)
    np.testing.assert_allclose(DDPM.denoise_step(x0, v, level_bt, next_bt), expected, atol=1e-5)


def test_ddpm_schedule_is_oasis_noise_range():
    levels, steps = DDPM.sampling_schedule(10)
    noise_range = np.linspace(-1, 999, 11).astype(np.int64)  # torch.linspace(...).long()
    np.testing.assert_array_equal(levels, noise_range[::-1])
    np.testing.assert_array_equal(steps, np.ones(10))
    levels3, _ = DDPM.sampling_schedule(3)
    np.testing.assert_array_equal(levels3, [999, 665, 332, -1])
    with pytest.raises(ValueError, match="n_steps=0"):
        DDPM.sampling_schedule(0)


def test_ddpm_sample_levels_are_integers():
    levels = DDPM.sample_levels(jax.random.key(11), (8192,))
    assert levels.dtype == jnp.float32
    np.testing.assert_array_equal(levels, np.round(levels))
    assert levels.min() == 0 and levels.max() == 999
    low = DDPM.sample_levels(jax.random.key(11), (8192,), high=99.9)
    assert low.min() == 0 and low.max() == 99


def test_small_ddpm_schedule_follows_config():
    cfg = dataclasses.replace(DiffusionConfig(process="ddpm_v", ctx_level=3.0, shortcut=False),
                              num_timesteps=50)
    process = make_process(cfg)
    assert process.max_level == 49.0 and process.alphas_cumprod.shape == (50,)
    np.testing.assert_allclose(process.alphas_cumprod,
                               sigmoid_alphas_cumprod(50, -3.0, 3.0, 1.0), rtol=1e-6)


def test_network_input_scales_by_the_clean_frames_weight():
    """"signal": x_t times (1 - t) (rectified flow) or sqrt(abar) (DDPM); pure noise enters as
    zeros; "unit" (the default) passes x_t unchanged."""
    x = jax.random.normal(jax.random.key(7), (2, 3, 4, 4, 3))
    level = jnp.asarray([[0.0, 0.25, 1.0], [0.5, 0.75, 0.1]])
    rf = make_process(DiffusionConfig(input_scale="signal"))
    np.testing.assert_allclose(rf.network_input(x, level),
                               x * (1 - level)[..., None, None, None], rtol=1e-6)
    assert float(jnp.abs(rf.network_input(x, level)[0, 2]).max()) == 0.0
    np.testing.assert_array_equal(RF.network_input(x, level), x)
    ddpm = make_process(DiffusionConfig(process="ddpm_v", ctx_level=14.0, shortcut=False,
                                        input_scale="signal"))
    steps = jnp.asarray([[0.0, 250.0, 999.0], [500.0, 10.0, -1.0]])
    abar = np.asarray(ddpm.abar(steps))
    np.testing.assert_allclose(ddpm.network_input(x, steps),
                               x * np.sqrt(abar)[..., None, None, None], rtol=1e-6)
    with pytest.raises(ValueError, match="diffusion.input_scale='snr'"):
        DiffusionConfig(input_scale="snr")
