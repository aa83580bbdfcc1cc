"""The streaming step (docs/DESIGN.md section 4): one jitted call per frame, state donated.

    state = init_stream(cfg, batch, rng)
    step = make_step(cfg, graphdef)                 # jax.jit, compiles once
    state, out_bhwc_uint8 = step(params, state, frame_bhwc_uint8, prompt_bp)

The state is a ring-buffer KV cache holding the temporal keys/values of the last `window - 1`
frames for every layer, the next slot to write, how many slots hold history for each stream, and
an rng key. Nothing in it depends on the absolute frame index: cached keys are stored un-rotated
and rotated at read time by their age (1 .. window-1), so frame 10,000,000 is computed exactly
like frame 100. The batch axis is the set of concurrent streams; a stream is reset by setting its
`num_valid` to 0.

Inside one step: encode the input frame, start from noise, `k` denoising steps on the new frame
reading (never writing) the cache, then one more pass of the finished frame at the context level
`t_ctx` (clean and labelled `t_ctx`, or really noised to it) whose K/V are written into the ring
buffer. That extra pass makes the cache hold exactly what the full banded forward over the
generated history computes (see `reference_sample`). With `diffusion.cache_from="last_step"` the
cache keeps the K/V of the last denoising pass instead (the frame as it was at the last step's
level, labelled so), one pass fewer per frame; `reference_sample` then builds the history the
same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax.config import MAX_SAMPLE_STEPS, Config, dtype_of
from lsd_jax.diffusion import initial_noise, make_process
from lsd_jax.errors import ConfigError
from lsd_jax.model import StreamContext
from lsd_jax.stream_state import StreamState
from lsd_jax.xla_options import step_compiler_options


def cache_size(cfg: Config) -> int:
    return cfg.model.window - 1


def init_stream(cfg: Config, batch: int, rng, start_frame: int = 0) -> StreamState:
    """Empty cache for `batch` streams. `start_frame` only sets which ring slot is written first."""
    m = cfg.model
    if batch < 1:
        raise ValueError(f"batch={batch}, expected >= 1 concurrent streams")
    shape = (m.depth, batch, cache_size(cfg), m.tokens_per_frame, m.num_heads, m.head_dim)
    return StreamState(
        cache_k=jnp.zeros(shape, dtype_of(m.dtype)),
        cache_v=jnp.zeros(shape, dtype_of(m.dtype)),
        slot=jnp.asarray(start_frame % cache_size(cfg), jnp.int32),
        num_valid=jnp.zeros((batch,), jnp.int32),
        # A copy: the state is donated to the step, the caller's key must survive.
        rng=jax.random.PRNGKey(rng) if isinstance(rng, int) else jnp.array(rng, jnp.uint32),
    )


def read_cache(cfg: Config, state: StreamState) -> StreamContext:
    """The cache as the streamed passes read it: keys as stored (un-rotated), each slot's age and
    which slots are valid. Rotation by age and masking happen in the attention implementation
    (`attention.temporal_cache`)."""
    size = cache_size(cfg)
    slots = jnp.arange(size)
    age_s = ((state.slot - 1 - slots) % size + 1).astype(jnp.int32)  # the slot written last: 1
    return StreamContext(state.cache_k, state.cache_v, age_s,
                         age_s[None, :] <= state.num_valid[:, None])


def write_cache(cfg: Config, state: StreamState, k_lbkne, v_lbkne) -> StreamState:
    """Write one frame's per-layer K/V into the ring at `slot` and advance."""
    size = cache_size(cfg)
    put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        cache, new[:, :, None].astype(cache.dtype), state.slot, axis=2)
    return state._replace(
        cache_k=put(state.cache_k, k_lbkne),
        cache_v=put(state.cache_v, v_lbkne),
        slot=(state.slot + 1) % size,
        num_valid=jnp.minimum(state.num_valid + 1, size),
    )


def _schedule(cfg: Config, steps: int | None):
    process = make_process(cfg.diffusion)
    steps = cfg.diffusion.sample_steps if steps is None else steps
    if not 1 <= steps <= MAX_SAMPLE_STEPS:
        raise ValueError(f"steps={steps}, expected 1..{MAX_SAMPLE_STEPS} denoising steps per frame")
    levels, step_sizes = process.sampling_schedule(steps)
    return process, np.asarray(levels, np.float32), np.asarray(step_sizes, np.float32)


def frame_keys(cfg: Config, rng):
    """`(next rng, starting-noise key, context-noise key)` of one streamed frame. With
    `diffusion.frame_noise="fixed"` the stream's key does not advance, so every frame starts from
    the same noise."""
    rng_next, k_noise, k_ctx = jax.random.split(rng, 3)
    return (rng if cfg.diffusion.frame_noise == "fixed" else rng_next), k_noise, k_ctx


def make_latent_step(cfg: Config, graphdef, *, steps: int | None = None, unroll: bool = False):
    """The pure (un-jitted) step in model space.

    `step(params, state, cond_bhwc, prompt_bp=None, external_bx=None) -> (state, x0_bhwc)`.
    `unroll=True` unrolls the denoising loop (XLA's cost analysis counts a loop body once, so
    FLOP counts are taken on the unrolled form).
    """
    process, levels, step_sizes = _schedule(cfg, steps)
    m = cfg.model
    ctx_level = cfg.diffusion.ctx_level
    min_step = process.min_step_size
    cache_last = cfg.diffusion.cache_from == "last_step"

    def step(params, state: StreamState, cond_bhwc, prompt_bp=None, external_bx=None):
        model = nnx.merge(graphdef, params)
        batch = state.num_valid.shape[0]
        rng, k_noise, k_ctx = frame_keys(cfg, state.rng)
        ctx = read_cache(cfg, state)
        kwargs = dict(cond_bhwc=cond_bhwc, prompt_bp=prompt_bp, external_bx=external_bx)
        full = lambda value: jnp.full((batch,), value, jnp.float32)  # noqa: E731
        step_b = lambda d: full(d) if m.use_step_size else None  # noqa: E731

        def run_pass(x_bhwc, t, d):
            return model.stream_pass(process.network_input(x_bhwc, t),
                                     full(process.model_time(t)), ctx, step_size_b=step_b(d),
                                     **kwargs)

        @jax.named_scope("denoise")
        def denoise(carry, level):
            t, t_next, d = level
            pred, k, v = run_pass(carry[0], t, d)
            x_next = process.denoise_step(carry[0], pred, t, t_next)
            return ((x_next, (k, v)) if cache_last else (x_next,)), None

        x_bhwc = initial_noise(k_noise, (batch, *m.frame_shape))
        carry = (x_bhwc,)
        if cache_last:  # the last pass's K/V are what the cache keeps
            kv_shape = (m.depth, batch, m.tokens_per_frame, m.num_heads, m.head_dim)
            carry = (x_bhwc, (jnp.zeros(kv_shape, dtype_of(m.dtype)),) * 2)
        carry, _ = jax.lax.scan(denoise, carry, (levels[:-1], levels[1:], step_sizes),
                                unroll=unroll)
        x0_bhwc = carry[0]
        if cache_last:
            k_new, v_new = carry[1]
        else:
            x_ctx = context_frame(cfg, process, x0_bhwc, k_ctx)
            with jax.named_scope("cache_write"):
                _, k_new, v_new = run_pass(x_ctx, ctx_level, min_step)
        return write_cache(cfg, state, k_new, v_new)._replace(rng=rng), x0_bhwc

    return step


def context_frame(cfg: Config, process, x0, key):
    """What a finished frame is as history: clean (labelled t_ctx) or really noised to t_ctx."""
    if cfg.diffusion.context_noise == "label":
        return x0
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    return process.add_noise(x0, eps, jnp.full(x0.shape[:-3], cfg.diffusion.ctx_level))


def make_step(cfg: Config, graphdef, *, steps: int | None = None, unroll: bool = False,
              codec=None, jit: bool = True):
    """The jitted pixel-space step: uint8 `[b, H, W, 3]` in and out, state donated; frames go
    through `codec` (default `make_codec(cfg)`, the pixel codec; a latent model's VAE codec is
    loaded from its directory by the caller). `jit=False` returns the function un-jitted, for a
    caller that traces it inside its own `jax.jit` (a nested jit cannot take compiler options).

    `step(params, state, frame_bhwc, prompt_bp=None, external_bx=None, codec_params=None)
    -> (state, out_bhwc)`. A codec with weights (the VAE) takes them as the `codec_params`
    argument (`codec.params`), so they stay arrays the step is called with rather than constants
    compiled into it; leaving them out is an error.
    """
    from lsd_jax.codec import make_codec

    codec = make_codec(cfg) if codec is None else codec
    latent_step = make_latent_step(cfg, graphdef, steps=steps, unroll=unroll)
    uses_frame = cfg.model.cond_channels > 0
    needs_params = bool(jax.tree.leaves(codec.params))

    def step(params, state, frame_bhwc, prompt_bp=None, external_bx=None, codec_params=None):
        if needs_params and codec_params is None:
            raise ConfigError(f"the {codec.name!r} codec has weights: pass them to the step as "
                              "codec_params=codec.params (they are an argument of the step, not "
                              "constants compiled into it)")
        bound = codec.bind(codec_params) if needs_params else codec
        cond = bound.encode(frame_bhwc) if uses_frame else None
        state, x0_bhwc = latent_step(params, state, cond, prompt_bp, external_bx)
        return state, bound.decode(x0_bhwc)

    if not jit:
        return step
    return jax.jit(step, donate_argnames="state", compiler_options=step_compiler_options())


def reference_sample(cfg: Config, model, rng, cond_bthwc, *, steps: int | None = None,
                     prompt_bp=None, external_btx=None):
    """Plain autoregressive sampler: no cache, the banded full forward re-run at every step.

    For each new frame and each denoising step, runs `model(...)` over every frame generated so
    far (as history: as the cache holds it, the finished frame at `t_ctx`, or with
    `diffusion.cache_from="last_step"` the frame at its last step's level) plus the new one, and
    keeps the new frame's prediction. Consumes `rng` exactly as `make_latent_step` does. Returns
    x0 `[b,t,h,w,c]`.
    """
    process, levels, step_sizes = _schedule(cfg, steps)
    m = cfg.model
    batch, num_frames = cond_bthwc.shape[:2] if cond_bthwc is not None else external_btx.shape[:2]
    # Each history frame as the cache holds it: its content, level and step size.
    history, hist_levels, hist_steps, outputs = [], [], [], []
    for i in range(num_frames):
        rng, k_noise, k_ctx = frame_keys(cfg, rng)
        x = initial_noise(k_noise, (batch, *m.frame_shape))
        for t, t_next, d in zip(levels[:-1], levels[1:], step_sizes, strict=True):
            level_bt = jnp.broadcast_to(jnp.asarray([*hist_levels, t], jnp.float32),
                                        (batch, i + 1))
            clip = process.network_input(jnp.stack([*history, x], axis=1), level_bt)
            time_bt = jnp.asarray([process.model_time(v) for v in (*hist_levels, t)],
                                  jnp.float32)
            step_bt = jnp.asarray([*hist_steps, d], jnp.float32)
            pred = model(
                clip, jnp.broadcast_to(time_bt, (batch, i + 1)),
                cond_bthwc=None if cond_bthwc is None else cond_bthwc[:, : i + 1],
                step_size_bt=jnp.broadcast_to(step_bt, (batch, i + 1)) if m.use_step_size else None,
                prompt_bp=prompt_bp,
                external_btx=None if external_btx is None else external_btx[:, : i + 1],
            )[:, -1]
            x_last = x
            x = process.denoise_step(x, pred, t, t_next)
        outputs.append(x)
        if cfg.diffusion.cache_from == "last_step":
            history.append(x_last)
            hist_levels.append(float(levels[-2]))
            hist_steps.append(float(step_sizes[-1]))
        else:
            history.append(context_frame(cfg, process, x, k_ctx))
            hist_levels.append(cfg.diffusion.ctx_level)
            hist_steps.append(process.min_step_size)
    return jnp.stack(outputs, axis=1)
