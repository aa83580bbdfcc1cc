"""Overfit test: the real DiT trained with the full objective memorises one clip.

A tiny DiT (16x16 frames, patch 4, 2 blocks of 64) is trained with `objectives.loss_fn` as the
tiny config sets it up (Diffusion Forcing levels, history augmentation including self-prediction,
shortcut targets) on a batch made of copies of ONE fixed clip, with fresh noise levels and noise
every step. The plain Diffusion Forcing loss (no shortcut, no augmentation) on that clip, averaged
over fixed evaluation draws, must fall at least 10x.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lsd_jax import objectives as obj
from lsd_jax.config import HistoryAugConfig, load_config
from lsd_jax.diffusion import make_process
from lsd_jax.model import DiT

STEPS = 300
B, T, HW = 4, 8, 16


def _clip_bthwc():
    """One clip: a colour wave drifting right, its input frames the same wave in grey."""
    y, x = np.meshgrid(np.arange(HW), np.arange(HW), indexing="ij")
    frames = [np.stack([np.sin(2 * np.pi * (x / HW + t / T) + c) * np.cos(2 * np.pi * y / HW)
                        for c in range(3)], axis=-1) for t in range(T)]
    target_thwc = np.stack(frames).astype(np.float32)
    cond_thwc = np.repeat(target_thwc.mean(-1, keepdims=True), 3, axis=-1)
    return (jnp.broadcast_to(target_thwc, (B, *target_thwc.shape)),
            jnp.broadcast_to(cond_thwc, (B, *cond_thwc.shape)))


@pytest.mark.slow
def test_dit_overfits_one_clip():
    cfg = load_config("lsd_configs/tiny.py", [
        f"model.frame_height={HW}", f"model.frame_width={HW}", "model.patch_size=4",
        "model.hidden_size=64", "model.depth=2", "model.num_heads=4", "model.window=4",
        "model.prompt_dim=16",
    ])
    assert cfg.diffusion.shortcut and cfg.diffusion.history_aug.enabled
    process = make_process(cfg.diffusion)
    graphdef, params, rest = nnx.split(DiT(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    model_apply = functools.partial(obj.apply_model, graphdef, rest_state=rest)
    target_bthwc, cond_bthwc = _clip_bthwc()
    prompt_bp = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (16,)), (B, 16))
    batch = {"target": target_bthwc, "cond": cond_bthwc, "prompt": prompt_bp}

    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(params, opt_state, rng):
        grads, _ = jax.grad(obj.loss_fn, argnums=1, has_aux=True)(
            model_apply, params, batch, rng, cfg, process)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    plain = dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, shortcut=False, history_aug=HistoryAugConfig(enabled=False)))
    eval_keys = jax.random.split(jax.random.key(2), 8)

    @jax.jit
    def df_loss(params):
        losses = jax.vmap(lambda k: obj.loss_fn(model_apply, params, batch, k, plain, process)[0])
        return jnp.mean(losses(eval_keys))

    before = float(df_loss(params))
    opt_state = optimizer.init(params)
    for rng in jax.random.split(jax.random.key(3), STEPS):
        params, opt_state = train_step(params, opt_state, rng)
    after = float(df_loss(params))
    assert np.isfinite(after)
    assert after < before / 10, f"DF loss fell from {before:.4f} to {after:.4f} in {STEPS} steps"
