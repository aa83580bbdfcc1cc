"""Training objectives as swappable functions (shortcut-models style), DESIGN.md section 3.

In:  a batch of clips (`target` [B,T,H,W,C] clean model-space frames, optional `cond`
     [B,T,H,W,C_cond], `prompt` [B,P], `external` [B,T,E]), a `Process`, the config and a model.
Out: `loss_fn` -> `(loss, metrics)`; the pieces it is built from are public and tested alone:

- noise-level samplers (`sample_noise_levels`): Diffusion Forcing (own level per frame), one level
  per clip, history-low / current-high;
- history augmentation (`augment_history` = `apply_corruption(sample_corruption(...))`): blur,
  colour, JPEG-style quantisation, spatial shift, additive noise, the model's own predictions;
- shortcut targets (`shortcut_target`): the target for a step `2d` is the mean of two `d`-steps;
- `training_targets`: network inputs and regression targets for one batch (the three above put
  together); `loss_fn` is that plus one network call and the mean squared error.

Augmented history is network *input* only: every frame is noised from its (possibly corrupted)
content, while the flow-matching target is computed from the clean frame, so the model learns to
correct a bad history instead of copying it.

The model is called through `model_apply(params, x_bthwc, time_bt, *, step_size_bt, cond_bthwc,
prompt_bp, external_btx) -> pred_bthwc`, a pure function of params; `apply_model` makes one from a
split Flax NNX model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax.config import Config, DiffusionConfig, HistoryAugConfig
from lsd_jax.diffusion import Process

# `fn(x_t_bthwc, level_bt, step_size_bt) -> pred_bthwc`: a network with its conditioning bound.
NetworkFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# ----------------------------------------------------------------------------- noise levels


def sample_noise_levels(kind: str, rng: jax.Array, batch: int, frames: int, process: Process,
                        cfg: DiffusionConfig) -> jax.Array:
    """Training noise levels `level_bt` [batch, frames] float32 in the process's units.

    - "independent": Diffusion Forcing, an independent uniform level per frame;
    - "clip": one uniform level per clip, shared by its frames (full-sequence baseline);
    - "history_low": every frame but the last uniform in `[0, cfg.history_low_max * max_level]`,
      the last frame uniform over the whole range (the streaming situation: clean-ish history,
      noisy current frame).
    """
    if kind == "independent":
        return process.sample_levels(rng, (batch, frames))
    if kind == "clip":
        return jnp.broadcast_to(process.sample_levels(rng, (batch, 1)), (batch, frames))
    if kind == "history_low":
        k_hist, k_last = jax.random.split(rng)
        history_bt = process.sample_levels(k_hist, (batch, frames - 1),
                                           high=cfg.history_low_max * process.max_level)
        return jnp.concatenate([history_bt, process.sample_levels(k_last, (batch, 1))], axis=1)
    raise ValueError(f"noise sampler {kind!r}, expected 'independent', 'clip' or 'history_low'")


# ----------------------------------------------------------------------------- history augmentation

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


# ----------------------------------------------------------------------------- shortcut targets


def shortcut_target(fn: NetworkFn, x_t_bthwc: jax.Array, level_bt: jax.Array,
                    step_bt: jax.Array, process: Process | None = None) -> jax.Array:
    """Self-consistency target for a step of size `2d` (Frans et al. 2024), `d = step_bt`.

    Velocity prediction: `v1 = fn(x_t, t, d)`, `x' = x_t - d v1`, `v2 = fn(x', t - d, d)`,
    target `stop_gradient((v1 + v2) / 2)`: one `2d` Euler step with it lands where two `d`-steps
    land. With a `process` whose network predicts something else (rectified flow with x0
    prediction), the two `d` steps are the process's own `denoise_step`s and the target is the
    output whose one `2d` step lands at the same point (`process.output_for_step`). All frames of
    a clip take the half-step together, so in the second call a frame sees its half-stepped
    history (the approximation Diffusion Forcing makes whenever it denoises a clip).
    """
    if process is None or getattr(process, "prediction", "velocity") == "velocity":
        v1_bthwc = fn(x_t_bthwc, level_bt, step_bt)
        x_mid_bthwc = x_t_bthwc - step_bt[..., None, None, None] * v1_bthwc
        v2_bthwc = fn(x_mid_bthwc, level_bt - step_bt, step_bt)
        return jax.lax.stop_gradient((v1_bthwc + v2_bthwc) / 2)
    p1_bthwc = fn(x_t_bthwc, level_bt, step_bt)
    x_mid_bthwc = process.denoise_step(x_t_bthwc, p1_bthwc, level_bt, level_bt - step_bt)
    p2_bthwc = fn(x_mid_bthwc, level_bt - step_bt, step_bt)
    x_end_bthwc = process.denoise_step(x_mid_bthwc, p2_bthwc, level_bt - step_bt,
                                       level_bt - 2 * step_bt)
    return jax.lax.stop_gradient(process.output_for_step(x_t_bthwc, x_end_bthwc, level_bt,
                                                         2 * step_bt))


def num_shortcut_clips(batch: int, cfg: DiffusionConfig) -> int:
    """Clips per batch trained on self-consistency: `floor(batch * shortcut_fraction)` (the first
    ones), none when the shortcut objective is off or `shortcut_max_steps < 2`."""
    if not cfg.shortcut or cfg.shortcut_max_steps < 2:
        return 0
    return int(batch * cfg.shortcut_fraction)


def sample_shortcut_levels(rng: jax.Array, level_bt: jax.Array,
                           max_steps: int) -> tuple[jax.Array, jax.Array]:
    """`(level_bt, big_step_bt)` for shortcut clips: per clip a step `2d = 2^-k`, k uniform in
    `0..log2(max_steps)-1` (so `d` goes from 1/2 down to `1/max_steps`); each sampled level is
    moved up to the grid `{2d, 4d, ..., 1}` (as in the paper), so `t - 2d >= 0` always. Levels
    shared by a clip stay shared; under "history_low" the low history levels of these clips rise
    to `2d`, the lowest level a `2d` step can start from."""
    n_big = int(math.log2(max_steps))
    k_b = jax.random.randint(rng, (level_bt.shape[0], 1), 0, n_big)
    big_step_b1 = 2.0 ** -k_b.astype(jnp.float32)
    cells_bt = jnp.clip(jnp.ceil(level_bt / big_step_b1), 1, 1 / big_step_b1)
    big_step_bt = jnp.broadcast_to(big_step_b1, level_bt.shape)
    return cells_bt * big_step_b1, big_step_bt


# ----------------------------------------------------------------------------- targets and loss


class Targets(NamedTuple):
    """One batch ready for the network: inputs `(x_t_bthwc, level_bt, step_size_bt)` and the
    regression target `target_bthwc`; the first `num_shortcut_clips` clips are shortcut items."""

    x_t_bthwc: jax.Array
    level_bt: jax.Array
    step_size_bt: jax.Array
    target_bthwc: jax.Array


def training_targets(fn: NetworkFn, target_fn: NetworkFn, x0_bthwc: jax.Array, rng: jax.Array,
                     cfg: DiffusionConfig, process: Process) -> Targets:
    """Network inputs and targets for clean clips `x0_bthwc`.

    - Levels from `cfg.noise_sampler`; step size `process.min_step_size` (flow matching at the
      smallest step), except the shortcut clips (rectified flow only), which get a step `2d`,
      levels on its grid and the target `shortcut_target(target_fn, x_t, t, d)`.
    - History augmentation corrupts the history frames *before* noising, so only the network input
      changes. Flow-matching targets are `process.target(clean x0, eps, level)` from the clean
      frames; shortcut targets are the model's own two-step consistency at the same input the
      network sees. Self-prediction history comes from one stop-gradient pass of `fn` on the
      clean clip noised at the same levels, through `process.predict_x0`.

    `fn` is the trained network, `target_fn` the online or EMA network for shortcut targets; both
    map `(x_t_bthwc, level_bt, step_size_bt)` -> prediction and must accept a leading slice of
    the batch (the shortcut clips).
    """
    b, t = x0_bthwc.shape[:2]
    k_level, k_eps, k_aug, k_short = jax.random.split(rng, 4)
    level_bt = sample_noise_levels(cfg.noise_sampler, k_level, b, t, process, cfg)
    step_bt = jnp.full((b, t), process.min_step_size, jnp.float32)
    if cfg.shortcut and process.name != "rectified_flow":
        raise ValueError(f"diffusion.shortcut=True with process={process.name!r}: shortcut "
                         "targets need process='rectified_flow'")
    n_short = num_shortcut_clips(b, cfg)
    if n_short:
        short_level_bt, big_step_bt = sample_shortcut_levels(k_short, level_bt[:n_short],
                                                             cfg.shortcut_max_steps)
        level_bt = level_bt.at[:n_short].set(short_level_bt)
        step_bt = step_bt.at[:n_short].set(big_step_bt)
    eps_bthwc = jax.random.normal(k_eps, x0_bthwc.shape, x0_bthwc.dtype)

    input_bthwc = x0_bthwc
    aug = cfg.history_aug
    if enabled_corruptions(aug):
        self_pred_bthwc = None
        if aug.self_prediction:
            clean_x_t_bthwc = process.add_noise(x0_bthwc, eps_bthwc, level_bt)
            min_step_bt = jnp.full((b, t), process.min_step_size, jnp.float32)
            pred_bthwc = jax.lax.stop_gradient(fn(clean_x_t_bthwc, level_bt, min_step_bt))
            self_pred_bthwc = process.predict_x0(clean_x_t_bthwc, pred_bthwc, level_bt)
        input_bthwc = augment_history(k_aug, x0_bthwc, aug, self_pred_bthwc)

    x_t_bthwc = process.add_noise(input_bthwc, eps_bthwc, level_bt)
    target_bthwc = process.target(x0_bthwc, eps_bthwc, level_bt)
    if n_short:
        short_target_bthwc = shortcut_target(target_fn, x_t_bthwc[:n_short], level_bt[:n_short],
                                             step_bt[:n_short] / 2, process)
        target_bthwc = target_bthwc.at[:n_short].set(short_target_bthwc)
    return Targets(x_t_bthwc, level_bt, step_bt, target_bthwc)


def apply_model(graphdef: nnx.GraphDef, params: nnx.State, x_bthwc: jax.Array, time_bt: jax.Array,
                *, rest_state: nnx.State | None = None, step_size_bt: jax.Array | None = None,
                cond_bthwc: jax.Array | None = None, prompt_bp: jax.Array | None = None,
                external_btx: jax.Array | None = None) -> jax.Array:
    """`model_apply` for an NNX model split as `graphdef, params, rest_state =
    nnx.split(model, nnx.Param, ...)` (the rest holds fixed, untrained variables such as rotary
    frequencies); bind it with `functools.partial(apply_model, graphdef, rest_state=rest_state)`.
    With `rest_state=None`, `params` must be the model's whole state."""
    model = nnx.merge(graphdef, params, *(() if rest_state is None else (rest_state,)))
    return model(x_bthwc, time_bt, cond_bthwc=cond_bthwc, step_size_bt=step_size_bt,
                 prompt_bp=prompt_bp, external_btx=external_btx)


N_LEVEL_BUCKETS = 4


def loss_fn(model_apply: Callable, params, batch: dict, rng: jax.Array, cfg: Config,
            process: Process, ema_params=None) -> tuple[jax.Array, dict]:
    """Diffusion Forcing loss: mean squared error against `training_targets` over every frame of
    every clip (uniform per-frame weights).

    `batch`: `target` [B,T,H,W,C] clean model-space frames; optional `cond` [B,T,H,W,C_cond]
    input frames, `prompt` [B,P] prompt embeddings, `external` [B,T,E] per-frame vectors.
    `ema_params` are required when `cfg.diffusion.shortcut_target == "ema"`.

    Metrics (scalars): `loss`; `loss/flow_matching` and `loss/shortcut` (means over those clips);
    `loss/level_bucket_{i}`, the flow-matching loss of frames whose level lies in the i-th quarter
    of `[0, max_level]` (0 when no frame fell there).
    """
    dcfg = cfg.diffusion
    x0_bthwc = batch["target"]
    cond_bthwc, prompt_bp = batch.get("cond"), batch.get("prompt")
    external_btx = batch.get("external")
    if dcfg.shortcut and not cfg.model.use_step_size:
        raise ValueError("diffusion.shortcut=True needs model.use_step_size=True (the network "
                         "must be told the step size)")
    if dcfg.shortcut_target == "ema" and num_shortcut_clips(x0_bthwc.shape[0], dcfg) and (
            ema_params is None):
        raise ValueError("diffusion.shortcut_target='ema' needs ema_params, got None")

    def network(p) -> NetworkFn:
        def fn(x_bthwc, level_bt, step_bt):
            # Shortcut targets run on the first clips only: slice the conditioning to match.
            n = x_bthwc.shape[0]
            return model_apply(
                p, process.network_input(x_bthwc, level_bt), process.model_time(level_bt),
                step_size_bt=step_bt if cfg.model.use_step_size else None,
                cond_bthwc=None if cond_bthwc is None else cond_bthwc[:n],
                prompt_bp=None if prompt_bp is None else prompt_bp[:n],
                external_btx=None if external_btx is None else external_btx[:n])
        return fn

    target_params = ema_params if dcfg.shortcut_target == "ema" else params
    targets = training_targets(network(params), network(target_params), x0_bthwc, rng, dcfg,
                               process)
    pred_bthwc = network(params)(targets.x_t_bthwc, targets.level_bt, targets.step_size_bt)
    mse_bt = jnp.mean(jnp.square(pred_bthwc.astype(jnp.float32) - targets.target_bthwc),
                      axis=(-3, -2, -1))
    loss = jnp.mean(mse_bt)

    n_short = num_shortcut_clips(x0_bthwc.shape[0], dcfg)
    fm_mse_bt, fm_level_bt = mse_bt[n_short:], targets.level_bt[n_short:]
    metrics = {"loss": loss, "loss/flow_matching": jnp.mean(fm_mse_bt)}
    if n_short:
        metrics["loss/shortcut"] = jnp.mean(mse_bt[:n_short])
    bucket_bt = jnp.clip(jnp.floor(N_LEVEL_BUCKETS * fm_level_bt / process.max_level), 0,
                         N_LEVEL_BUCKETS - 1)
    for i in range(N_LEVEL_BUCKETS):
        in_bucket_bt = bucket_bt == i
        count = jnp.sum(in_bucket_bt)
        metrics[f"loss/level_bucket_{i}"] = (
            jnp.sum(jnp.where(in_bucket_bt, fm_mse_bt, 0.0)) / jnp.maximum(count, 1))
    return loss, metrics
