"""The jitted streaming step against the plain autoregressive reference sampler."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, rel_err
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.model import DiT, randomize
from lsd_jax.streaming import init_stream, make_latent_step, reference_sample

SMALL = ["model.frame_height=16", "model.frame_width=16", "model.patch_size=4",
         "model.hidden_size=64", "model.num_heads=4", "model.depth=2", "model.window=3",
         "model.prompt_dim=8"]
# An Oasis-shaped small model: DDPM v-prediction, actions, no input frame, no prompt or step size.
OASIS_LIKE = ["model.cond_channels=0", "model.prompt_dim=0", "model.use_step_size=false",
              "model.external_cond_dim=5", "diffusion.process=ddpm_v", "diffusion.ctx_level=14",
              "diffusion.sample_steps=3"]


def setup(overrides, batch=2, seed=0):
    cfg = load_config(CONFIGS / "tiny.py", [*SMALL, *overrides])
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(seed)), seed=seed, gain=0.7)
    m = cfg.model
    num_frames = 3 * m.window
    k = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    cond = (jax.random.uniform(k[0], (batch, num_frames, m.frame_height, m.frame_width,
                                      m.cond_channels), minval=-1, maxval=1)
            if m.cond_channels else None)
    prompt = jax.random.normal(k[1], (batch, m.prompt_dim)) if m.prompt_dim else None
    ext = (jax.random.normal(k[2], (batch, num_frames, m.external_cond_dim))
           if m.external_cond_dim else None)
    return cfg, model, num_frames, cond, prompt, ext


def stream(cfg, model, num_frames, cond, prompt, ext, *, rng, start_frame=0, steps=None):
    graphdef, params = nnx.split(model)
    step = jax.jit(make_latent_step(cfg, graphdef, steps=steps), donate_argnames="state")
    batch = (cond if cond is not None else ext).shape[0]
    state = init_stream(cfg, batch, rng, start_frame=start_frame)
    outs = []
    for i in range(num_frames):
        at = lambda a, i=i: None if a is None else a[:, i]  # noqa: E731
        state, x0 = step(params, state, at(cond), prompt, at(ext))
        outs.append(x0)
    return jnp.stack(outs, axis=1), state


@pytest.mark.parametrize("overrides", [
    (),
    ("diffusion.context_noise=noised", "diffusion.ctx_level=0.1"),
    OASIS_LIKE,
    ("diffusion.prediction=x0",),
    ("diffusion.prediction=x0", "model.pixel_channels=8", "model.pixel_residual=true",
     "diffusion.input_scale=signal", "model.color_map=curves"),
    (*OASIS_LIKE, "diffusion.input_scale=signal"),
    ("diffusion.frame_noise=fixed", "diffusion.context_noise=noised", "diffusion.ctx_level=0.1"),
    ("diffusion.prediction=x0", "diffusion.cache_from=last_step", "model.pixel_channels=8",
     "diffusion.input_scale=signal", "model.color_map=curves"),
    (*OASIS_LIKE, "diffusion.cache_from=last_step"),
    ("model.num_heads=2", "model.head_width=24", "model.mlp_ratio=1.5"),
], ids=["rf-label", "rf-noised", "ddpm-oasis-like", "rf-x0", "rf-x0-pixel-signal",
        "ddpm-signal", "rf-fixed-noise", "rf-cache-last-step", "ddpm-cache-last-step",
        "narrow-heads-mlp"])
def test_step_equals_reference_sampler(overrides):
    cfg, model, num_frames, cond, prompt, ext = setup(overrides)
    rng = jax.random.PRNGKey(42)
    streamed, state = stream(cfg, model, num_frames, cond, prompt, ext, rng=rng)
    apply = jax.jit(lambda *a, **kw: model(*a, **kw))
    ref = reference_sample(cfg, apply, rng, cond, prompt_bp=prompt, external_btx=ext)
    assert streamed.shape == ref.shape == (2, num_frames, *cfg.model.frame_shape)
    assert float(jnp.std(ref)) > 0.1  # a real output, not a collapsed one
    assert rel_err(streamed, ref) <= 1e-5
    assert int(state.num_valid[0]) == cfg.model.window - 1


def test_fixed_frame_noise():
    """`diffusion.frame_noise="fixed"`: the stream's key does not advance, every frame starts from
    the noise a fresh stream's first frame starts from, and a still input gives a still output."""
    cfg, model, num_frames, cond, prompt, ext = setup(("diffusion.frame_noise=fixed",))
    rng = jax.random.PRNGKey(7)
    still = jnp.repeat(cond[:, :1], num_frames, axis=1)
    fixed, state = stream(cfg, model, num_frames, still, prompt, ext, rng=rng)
    assert np.array_equal(np.asarray(state.rng), np.asarray(rng))
    fresh_cfg = load_config(CONFIGS / "tiny.py", SMALL)
    fresh, fresh_state = stream(fresh_cfg, model, num_frames, still, prompt, ext, rng=rng)
    assert not np.array_equal(np.asarray(fresh_state.rng), np.asarray(rng))
    # The first frame is the same either way: same key, no history.
    assert rel_err(fixed[:, 0], fresh[:, 0]) <= 1e-6
    # A still input: once the history is full the fixed-noise output changes less from frame to
    # frame than the fresh-noise output does.
    def change(x):
        return float(jnp.mean(jnp.abs(jnp.diff(x[:, cfg.model.window:], axis=1))))
    assert float(jnp.std(fixed)) > 0.1
    assert change(fixed) < 0.01 * change(fresh)


def test_frame_index_invariance():
    """The same frames streamed from frame 0 and from frame 10,000,000 give the same outputs."""
    # window 4: 3 ring slots, and 10,000,000 % 3 = 1, so the ring starts at another slot.
    cfg, model, num_frames, cond, prompt, ext = setup(("model.window=4",))
    rng = jax.random.PRNGKey(3)
    a, state_a = stream(cfg, model, num_frames, cond, prompt, ext, rng=rng)
    b, state_b = stream(cfg, model, num_frames, cond, prompt, ext, rng=rng, start_frame=10_000_000)
    assert int(state_a.slot) != int(state_b.slot)  # the ring really is rotated differently
    assert rel_err(b, a) <= 1e-5


def test_step_counts_and_batch_independence():
    """Every step count 1..4 runs; each stream in the batch is independent of the others."""
    cfg, model, num_frames, cond, prompt, ext = setup(())
    rng = jax.random.PRNGKey(5)
    outs = {k: stream(cfg, model, 4, cond, prompt, ext, rng=rng, steps=k)[0] for k in (1, 2, 4)}
    assert rel_err(outs[1], outs[2]) > 1e-3 and rel_err(outs[2], outs[4]) > 1e-3
    # Streams differ only through their inputs: swapping stream 1's input changes only stream 1.
    cond2 = cond.at[1].set(cond[0])
    swapped, _ = stream(cfg, model, 4, cond2, prompt, ext, rng=rng, steps=2)
    assert float(jnp.abs(swapped[0] - outs[2][0]).max()) == 0.0
    assert float(jnp.abs(swapped[1] - outs[2][1]).max()) > 1e-3


def test_reset_one_stream():
    """Setting a stream's num_valid to 0 makes it start afresh, like a new stream."""
    cfg, model, _, cond, prompt, ext = setup(())
    graphdef, params = nnx.split(model)
    step = jax.jit(make_latent_step(cfg, graphdef))
    state = init_stream(cfg, 2, 0)
    for i in range(5):
        state, _ = step(params, state, cond[:, i], prompt)
    state = state._replace(num_valid=state.num_valid.at[1].set(0))
    fresh = init_stream(cfg, 2, 0)._replace(rng=state.rng)
    _, out_reset = step(params, state, cond[:, 5], prompt)
    _, out_fresh = step(params, fresh, cond[:, 5], prompt)
    assert float(jnp.abs(out_reset[1] - out_fresh[1]).max()) <= 1e-6
    assert float(jnp.abs(out_reset[0] - out_fresh[0]).max()) > 1e-3


def test_pixel_step_and_bad_frames():
    """The jitted uint8 step: right shapes work; a wrong frame or prompt is a clear error and the
    stream state survives it."""
    from lsd_jax.errors import FrameError
    from lsd_jax.streaming import make_step

    cfg, model, _, _, prompt, _ = setup(())
    graphdef, params = nnx.split(model)
    step = make_step(cfg, graphdef)
    state = init_stream(cfg, 2, 0)
    frames = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    state, out = step(params, state, frames, prompt)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.uint8
    assert float(jnp.std(out.astype(jnp.float32))) > 1.0
    with pytest.raises(FrameError, match=r"frames are 2x16x16x4 uint8, expected 2x16x16x3 uint8"):
        step(params, state, np.zeros((2, 16, 16, 4), np.uint8), prompt)
    with pytest.raises(FrameError, match=r"float32, expected 2x16x16x3 uint8"):
        step(params, state, frames.astype(np.float32), prompt)
    with pytest.raises(ValueError, match=r"prompt embedding is 2x5, expected 2x8"):
        step(params, state, frames, prompt[:, :5])
    state, out2 = step(params, state, frames, prompt)  # the state was not consumed by the errors
    assert int(state.num_valid[0]) == 2


def test_sessions_stack_step_and_split_like_one_state():
    """Two streams kept apart as `SessionCache`s, stacked, stepped and split back for 5 frames,
    give the outputs of one 2-stream state stepped directly (same rng); a reset session starts
    over while the other keeps its history."""
    from lsd_jax.stream_state import empty_session, split_sessions, stack_sessions
    from lsd_jax.streaming import make_step

    cfg = load_config(CONFIGS / "tiny.py", SMALL)
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(0)), seed=3, gain=0.7)
    graphdef, params = nnx.split(model)
    step = make_step(cfg, graphdef, steps=2)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 2, 16, 16, 3), dtype=np.uint8)
    prompt_bp = rng.standard_normal((2, 8)).astype(np.float32)
    state = init_stream(cfg, 2, 7)
    sessions, key = [empty_session(state)] * 2, jnp.array(state.rng)
    assert state.batch == 2
    for frames_bhwc in frames:
        state, ref = step(params, state, frames_bhwc, prompt_bp)
        stacked, out = step(params, stack_sessions(sessions, key), frames_bhwc, prompt_bp)
        key, sessions = stacked.rng, split_sessions(stacked, 2)
        diff = np.abs(np.asarray(out, np.int32) - np.asarray(ref, np.int32))
        # uint8 outputs; the stacked caches are rolled, so attention sums run in another order
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.asarray(ref).std() > 5
    assert [int(s.num_valid) for s in sessions] == [2, 2]  # window 3: 2 cached frames
    stepped = step(params, stack_sessions([sessions[0].reset(), sessions[1]], key), frames[0],
                   prompt_bp)[0]
    assert [int(s.num_valid) for s in split_sessions(stepped, 2)] == [1, 2]
