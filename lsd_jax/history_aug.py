"""History augmentation: the history frames of a training clip deliberately corrupted, so a
model learns to correct what its own past outputs get wrong instead of copying it (errors do not
accumulate over a long stream).

In:  model-space clips `[B, T, H, W, C]` (roughly in [-1, 1]), `HistoryAugConfig`, an rng.
Out: the same clips with every frame but the last of each clip corrupted by one kind, drawn per
     clip: blur, colour, JPEG-style quantisation, spatial shift, additive noise or the model's own
     predictions (`augment_history` = `apply_corruption(sample_corruption(...))`). The result is
     network input only; `lsd_jax.objectives` computes every target from the clean frames.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.config import HistoryAugConfig

CORRUPTIONS = ("blur", "color", "jpeg", "shift", "noise", "self_prediction")
UNTOUCHED = -1
JPEG_BLOCK = 8


class Corruption(NamedTuple):
    """Per-frame corruption draws. `kind_bt` indexes `CORRUPTIONS` (`UNTOUCHED` = -1 for clean);
    every kind's parameters are drawn for every frame, only the selected kind's are used."""

    kind_bt: jax.Array  # int32
    blur_sigma_bt: jax.Array  # in [0, blur_max_sigma] pixels
    color_gain_btc: jax.Array  # in [1 - color_max_shift, 1 + color_max_shift]
    color_offset_btc: jax.Array  # in [-color_max_shift, color_max_shift]
    jpeg_step_bt: jax.Array  # in [0, jpeg_max_step]
    shift_bt2: jax.Array  # int32 (dy, dx), max(|dy|, |dx|) in [1, shift_max_pixels]
    noise_std_bt: jax.Array  # in [0, noise_max_std]
    noise_bthwc: jax.Array  # standard normal


def enabled_corruptions(cfg: HistoryAugConfig) -> tuple[str, ...]:
    """The kinds switched on (none when augmentation is off or `prob` is 0)."""
    if not cfg.enabled or cfg.prob == 0:
        return ()
    return tuple(kind for kind in CORRUPTIONS if getattr(cfg, kind))


def sample_corruption(rng: jax.Array, shape_bthwc: tuple[int, ...],
                      cfg: HistoryAugConfig) -> Corruption:
    """Draw which history frames are corrupted, how, and how strongly.

    History frames are frames 0..T-2 of each clip: under Diffusion Forcing each of them is history
    for the later frames of its clip. The last frame is history for nothing in the clip, so it is
    never corrupted: it always trains plain denoising of an uncorrupted frame after a corrupted
    history. A history frame is corrupted with probability `cfg.prob`, by one kind drawn uniformly
    among the enabled ones, with one strength `u ~ U[0, 1]` scaling that kind's maximum (a shift
    moves by `ceil(u * shift_max_pixels)` >= 1 pixels along its major axis, so it is never a
    no-op).
    """
    b, t, _, _, c = shape_bthwc
    keys = jax.random.split(rng, 7)
    kinds = enabled_corruptions(cfg)
    if kinds:
        kind_ids = jnp.asarray([CORRUPTIONS.index(k) for k in kinds], jnp.int32)
        chosen_bt = kind_ids[jax.random.randint(keys[0], (b, t), 0, len(kinds))]
        is_history_bt = jnp.arange(t)[None, :] < t - 1
        corrupt_bt = jax.random.bernoulli(keys[1], float(cfg.prob), (b, t)) & is_history_bt
        kind_bt = jnp.where(corrupt_bt, chosen_bt, UNTOUCHED)
    else:
        kind_bt = jnp.full((b, t), UNTOUCHED, jnp.int32)
    u_bt = jax.random.uniform(keys[2], (b, t))
    direction_bt2 = jax.random.uniform(keys[5], (b, t, 2), minval=-1.0, maxval=1.0)
    direction_bt2 = direction_bt2 / jnp.max(jnp.abs(direction_bt2), axis=-1, keepdims=True)
    shift_pixels_bt = jnp.clip(jnp.ceil(u_bt * cfg.shift_max_pixels), 1, cfg.shift_max_pixels)
    return Corruption(
        kind_bt=kind_bt,
        blur_sigma_bt=u_bt * cfg.blur_max_sigma,
        color_gain_btc=1.0 + u_bt[..., None] * cfg.color_max_shift
        * jax.random.uniform(keys[3], (b, t, c), minval=-1.0, maxval=1.0),
        color_offset_btc=u_bt[..., None] * cfg.color_max_shift
        * jax.random.uniform(keys[4], (b, t, c), minval=-1.0, maxval=1.0),
        jpeg_step_bt=u_bt * cfg.jpeg_max_step,
        shift_bt2=jnp.round(shift_pixels_bt[..., None] * direction_bt2).astype(jnp.int32),
        noise_std_bt=u_bt * cfg.noise_max_std,
        noise_bthwc=jax.random.normal(keys[6], shape_bthwc),
    )


def gaussian_blur(x_hwc: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of `[..., H, W, C]` with per-frame `sigma` [...] (pixels), kernel
    taps `-radius..radius`, edge padding (so a flat frame stays flat); sigma 0 is the identity."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    # A floor instead of a branch: at 1e-3 px every tap but the centre underflows to exactly 0.
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)[..., None]
    w = jnp.exp(-0.5 * (offsets / s) ** 2)
    w = w / jnp.sum(w, axis=-1, keepdims=True)

    def blur_axis(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        x_pad = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        return sum(w[..., i, None, None, None] * jax.lax.slice_in_dim(x_pad, i, i + n, axis=axis)
                   for i in range(2 * radius + 1))

    return blur_axis(blur_axis(x_hwc, -3), -2)


def color_shift(x_hwc: jax.Array, gain_c: jax.Array, offset_c: jax.Array) -> jax.Array:
    """Per-channel gain and offset (colour cast and brightness): `x * gain + offset`."""
    return x_hwc * gain_c[..., None, None, :] + offset_c[..., None, None, :]


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix `[n, n]` (rows = frequencies)."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def jpeg_quantise(x_hwc: jax.Array, step: jax.Array) -> jax.Array:
    """JPEG-style quantisation of `[..., H, W, C]` with per-frame base `step` [...].

    Each channel is cut in 8x8 blocks, DCT-transformed (orthonormal), each coefficient rounded to
    a multiple of `step * (1 + (k + l) / 7)` (coarser at high frequency `(k, l)`, like JPEG's
    tables, growing to 3x the step), and transformed back. When 8 does not divide H and W (e.g.
    18x32 latents) it falls back to plain rounding of the values to multiples of `step`. Step 0 is
    the identity.
    """
    h, w = x_hwc.shape[-3:-1]
    step = jnp.asarray(step, jnp.float32)[..., None, None, None]
    safe_step = jnp.maximum(step, 1e-12)
    if h % JPEG_BLOCK or w % JPEG_BLOCK:
        return jnp.where(step > 0, jnp.round(x_hwc / safe_step) * safe_step, x_hwc)
    n = JPEG_BLOCK
    d = jnp.asarray(_dct_matrix(n))
    blocks = x_hwc.reshape(*x_hwc.shape[:-3], h // n, n, w // n, n, x_hwc.shape[-1])
    hi = jax.lax.Precision.HIGHEST
    coef = jnp.einsum("ki,...aibjc,lj->...akblc", d, blocks, d, precision=hi)
    freq_k, freq_l = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramp_kl = jnp.asarray(1.0 + (freq_k + freq_l) / (n - 1), jnp.float32)
    q = safe_step[..., None, None] * ramp_kl[:, None, :, None]  # [..., 1, n, 1, n, 1]
    coef = jnp.round(coef / q) * q
    out = jnp.einsum("ki,...akblc,lj->...aibjc", d, coef, d, precision=hi).reshape(x_hwc.shape)
    return jnp.where(step > 0, out, x_hwc)


def spatial_shift(x_hwc: jax.Array, shift_2: jax.Array, max_pixels: int) -> jax.Array:
    """Move each frame's content by integer `(dy, dx)` (`shift_2` [..., 2], |dy|, |dx| <=
    `max_pixels`), filling the uncovered border by edge padding: `out[y, x] = in[clamp(y - dy),
    clamp(x - dx)]`."""
    lead, (h, w, c) = x_hwc.shape[:-3], x_hwc.shape[-3:]
    m = max_pixels
    x_nhwc = jnp.pad(x_hwc.reshape(-1, h, w, c), ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    shift_n2 = shift_2.reshape(-1, 2)
    out = jax.vmap(lambda f, s: jax.lax.dynamic_slice(f, (m - s[0], m - s[1], 0), (h, w, c)))(
        x_nhwc, shift_n2)
    return out.reshape(*lead, h, w, c)


def apply_corruption(frames_bthwc: jax.Array, corruption: Corruption, cfg: HistoryAugConfig,
                     self_pred_bthwc: jax.Array | None = None) -> jax.Array:
    """Frames with each frame's drawn corruption applied; untouched frames are returned bit-exact.
    `self_pred_bthwc` (the model's stop-gradient clean-frame predictions) replaces the frames
    whose kind is "self_prediction"."""
    kinds = enabled_corruptions(cfg)
    if "self_prediction" in kinds and self_pred_bthwc is None:
        raise ValueError("history_aug.self_prediction=True needs self_pred_bthwc (the model's "
                         "stop-gradient x0 predictions), got None")
    c = corruption
    out = frames_bthwc
    for kind in kinds:
        if kind == "blur":
            radius = max(1, math.ceil(3 * cfg.blur_max_sigma))
            corrupted = gaussian_blur(frames_bthwc, c.blur_sigma_bt, radius)
        elif kind == "color":
            corrupted = color_shift(frames_bthwc, c.color_gain_btc, c.color_offset_btc)
        elif kind == "jpeg":
            corrupted = jpeg_quantise(frames_bthwc, c.jpeg_step_bt)
        elif kind == "shift":
            corrupted = spatial_shift(frames_bthwc, c.shift_bt2, cfg.shift_max_pixels)
        elif kind == "noise":
            corrupted = frames_bthwc + c.noise_std_bt[..., None, None, None] * c.noise_bthwc
        else:
            corrupted = jax.lax.stop_gradient(self_pred_bthwc)
        selected = (c.kind_bt == CORRUPTIONS.index(kind))[..., None, None, None]
        out = jnp.where(selected, corrupted, out)
    return out


def augment_history(rng: jax.Array, frames_bthwc: jax.Array, cfg: HistoryAugConfig,
                    self_pred_bthwc: jax.Array | None = None) -> jax.Array:
    """History frames (all but the last of each clip) randomly corrupted, see `sample_corruption`.

    Frames are model-space `[B, T, H, W, C]`, roughly in [-1, 1]. The result is meant only as the
    network's *input* content; loss targets are always computed from the clean frames (see
    `training_targets`), so the model learns to correct what its history gets wrong instead of
    copying it.
    """
    if not enabled_corruptions(cfg):
        return frames_bthwc
    corruption = sample_corruption(rng, frames_bthwc.shape, cfg)
    return apply_corruption(frames_bthwc, corruption, cfg, self_pred_bthwc)
