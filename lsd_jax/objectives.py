"""Training objectives as swappable functions (shortcut-models style), docs/DESIGN.md section 3.

In:  a batch of clips (`target` [B,T,H,W,C] clean model-space frames, optional `cond`
     [B,T,H,W,C_cond], `prompt` [B,P], `external` [B,T,E]), a `Process`, the config and a model.
Out: `loss_fn` -> `(loss, metrics)`; the pieces it is built from are public and tested alone:

- noise-level samplers (`sample_noise_levels`): Diffusion Forcing (own level per frame), one level
  per clip, history-low / current-high;
- history augmentation (`lsd_jax.history_aug.augment_history`): blur, colour, JPEG-style
  quantisation, spatial shift, additive noise, the model's own predictions;
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
from flax import nnx

from lsd_jax.config import Config, DiffusionConfig
from lsd_jax.diffusion import Process
from lsd_jax.history_aug import augment_history, enabled_corruptions

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
    # The regression target made from a teacher's clip instead of the clean one (None without).
    teacher_target_bthwc: jax.Array | None = None


def training_targets(fn: NetworkFn, target_fn: NetworkFn, x0_bthwc: jax.Array, rng: jax.Array,
                     cfg: DiffusionConfig, process: Process,
                     teacher_bthwc: jax.Array | None = None) -> Targets:
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
    the batch (the shortcut clips). With `teacher_bthwc` (a teacher's outputs for the same input
    clips), `teacher_target_bthwc` is `process.target` of the teacher's frames at the same noise.
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
    teacher_target_bthwc = (None if teacher_bthwc is None
                            else process.target(teacher_bthwc, eps_bthwc, level_bt))
    return Targets(x_t_bthwc, level_bt, step_bt, target_bthwc, teacher_target_bthwc)


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
    `ema_params` are required when `cfg.diffusion.shortcut_target == "ema"`. With `teacher`
    [B,T,H,W,C] (a teacher's streamed outputs) and `distill` [B] (1 where the teacher knows the
    clip's prompt, else 0), the flow-matching clips also regress to the teacher's frames:
    `loss += train.distill_weight * mean(distill_b * mse_to_teacher_bt)` (`loss/distill`).

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
                               process, teacher_bthwc=batch.get("teacher"))
    pred_bthwc = network(params)(targets.x_t_bthwc, targets.level_bt, targets.step_size_bt)
    mse_bt = jnp.mean(jnp.square(pred_bthwc.astype(jnp.float32) - targets.target_bthwc),
                      axis=(-3, -2, -1))
    loss = jnp.mean(mse_bt)

    n_short = num_shortcut_clips(x0_bthwc.shape[0], dcfg)
    fm_mse_bt, fm_level_bt = mse_bt[n_short:], targets.level_bt[n_short:]
    metrics = {"loss": loss, "loss/flow_matching": jnp.mean(fm_mse_bt)}
    if targets.teacher_target_bthwc is not None:
        teacher_mse_bt = jnp.mean(jnp.square(
            pred_bthwc[n_short:].astype(jnp.float32) - targets.teacher_target_bthwc[n_short:]),
            axis=(-3, -2, -1))
        weight_b = batch["distill"][n_short:].astype(jnp.float32)
        distill = jnp.sum(weight_b[:, None] * teacher_mse_bt) / (
            jnp.maximum(jnp.sum(weight_b), 1.0) * teacher_mse_bt.shape[1])
        loss = loss + cfg.train.distill_weight * distill
        metrics["loss"], metrics["loss/distill"] = loss, distill
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
