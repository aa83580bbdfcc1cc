"""Analytic FLOPs against what XLA compiles.

Every program here is only lowered and compiled, never run, with abstract (shape-only) inputs.
The analytic count is of matmuls only (`lsd_jax/flops.py`); `hlo_matmul_flops` counts the dots and
convolutions of the compiled HLO, each while-loop body its trip count. The two are expected to be
equal: the only slack allowed (`MATMUL_RTOL`) is for XLA lowering a matmul with a unit dimension
(e.g. the single-query temporal attention, 0.1% of a tiny pass) to multiply + reduce, which a dot
count cannot see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsd_jax.bench import cost_analysis_flops
from lsd_jax.config import apply_overrides, load_config
from lsd_jax.flops import dit_flops, frame_pass_flops, hlo_matmul_flops, streamed_frame_flops
from lsd_jax.model import abstract_model

MATMUL_RTOL = 2e-3


def _forward(cfg, frames):
    """The jitted full-clip forward and abstract arguments for a batch of one clip."""
    m = cfg.model
    graphdef, state = nnx.split(abstract_model(m))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    kwargs = {}
    if m.cond_channels:
        kwargs["cond_bthwc"] = spec(1, frames, m.frame_height, m.frame_width, m.cond_channels)
    if m.use_step_size:
        kwargs["step_size_bt"] = spec(1, frames)
    if m.prompt_dim:
        kwargs["prompt_bp"] = spec(1, m.prompt_dim)
    if m.external_cond_dim:
        kwargs["external_btx"] = spec(1, frames, m.external_cond_dim)
    forward = jax.jit(lambda state, x, t, kw: nnx.merge(graphdef, state)(x, t, **kw))
    return forward, (state, spec(1, frames, *m.frame_shape), spec(1, frames), kwargs)


@pytest.mark.parametrize("name,overrides", [
    ("tiny", ()), ("mid", ()), ("lsd_base", ()), ("oasis_500m", ()),
    ("tiny", ("model.pixel_channels=8", "model.pixel_depth=3", "model.color_map=affine")),
])
def test_forward_matmul_flops_match_analytic(repo_root, name, overrides):
    # Two layers keep the compile short; FLOPs per layer do not depend on depth. A clip of exactly
    # `window` frames makes the masked dense temporal attention compute `window` keys per frame.
    cfg = load_config(repo_root / "lsd_configs" / f"{name}.py", ["model.depth=2", *overrides])
    frames = cfg.model.window
    forward, args = _forward(cfg, frames)
    counted = hlo_matmul_flops(forward.lower(*args).compile().as_text())
    assert counted.unknown_trip_counts == 0
    expected = dit_flops(cfg.model, frames=frames, keys_per_frame=frames)["total"]
    assert counted.flops == pytest.approx(expected, rel=MATMUL_RTOL)


@pytest.mark.parametrize("steps,overrides", [
    (1, ()), (3, ()), (3, ("model.pixel_channels=8", "model.pixel_depth=2")),
    (3, ("model.color_map=quadratic",)),
    (3, ("model.pixel_channels=8", "model.color_map=curves", "diffusion.cache_from=last_step")),
    (3, ("model.num_heads=2", "model.head_width=16", "model.mlp_ratio=1.5")),
])
def test_streaming_step_matmul_flops_match_analytic(tiny_cfg, steps, overrides):
    """Also checks that the compiler computes the pixel stem once per frame (hoisted out of the
    denoising loop) and drops the cache-write pass's final layer and pixel head."""
    from lsd_jax.streaming import init_stream, make_step

    tiny_cfg = apply_overrides(tiny_cfg, list(overrides))
    graphdef, state = nnx.split(abstract_model(tiny_cfg.model))
    stream = jax.eval_shape(lambda: init_stream(tiny_cfg, 1, 0))
    frame = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
    prompt = jax.ShapeDtypeStruct((1, tiny_cfg.model.prompt_dim), jnp.float32)
    step = make_step(tiny_cfg, graphdef, steps=steps)
    counted = hlo_matmul_flops(step.lower(state, stream, frame, prompt).compile().as_text())
    assert counted.unknown_trip_counts == 0
    assert counted.flops == pytest.approx(streamed_frame_flops(tiny_cfg, steps), rel=MATMUL_RTOL)


def test_xla_cost_analysis_close_to_analytic(tiny_cfg):
    # XLA's cost analysis counts a while body once, so layers are unrolled here. It also counts
    # every elementwise op (norms, modulation, GELU, softmax, RoPE): O(hidden) per token against the
    # matmuls' O(hidden^2), about 2% for the tiny model. So XLA's figure must lie at or above the
    # analytic matmul count, and within 5% of it.
    cfg = apply_overrides(tiny_cfg, ["model.scan_layers=false"])
    frames = cfg.model.window
    forward, args = _forward(cfg, frames)
    xla = cost_analysis_flops(forward.lower(*args).compile())
    analytic = dit_flops(cfg.model, frames=frames, keys_per_frame=frames)["total"]
    assert 1.0 <= xla / analytic <= 1.05


def test_streamed_frame_is_steps_passes_plus_cache_write(tiny_cfg):
    parts = dit_flops(tiny_cfg.model, frames=1, keys_per_frame=tiny_cfg.model.window)
    per_pass = frame_pass_flops(tiny_cfg.model)
    assert per_pass == parts["total"]
    # k denoising passes, one cache-write pass without the final layer; the prompt and the input
    # frame's half of the patch embed once.
    m = tiny_cfg.model
    once = parts["prompt"] + 2 * m.tokens_per_frame * m.patch_size ** 2 * m.cond_channels * (
        m.hidden_size)
    per_pass -= parts["temporal_attention"]  # elementwise on the cache, not matmuls
    last_step = apply_overrides(tiny_cfg, ["diffusion.cache_from=last_step"])
    for steps in (1, 3, 12):
        assert streamed_frame_flops(tiny_cfg, steps) == (
            (steps + 1) * per_pass - parts["final_layer"] - steps * once)
        # Caching the last denoising pass: no cache-write pass.
        assert streamed_frame_flops(last_step, steps) == steps * per_pass - (steps - 1) * once
    assert streamed_frame_flops(tiny_cfg) == streamed_frame_flops(tiny_cfg, 3)


def test_tiny_pass_by_hand(tiny_cfg):
    # N=256 tokens, D=128, MLP 512, 2 layers, patch 4 over 6 input channels, window 8.
    n, d, mlp, depth, p = 256, 128, 512, 2, 4
    sub_block = 2 * d * 6 * d + 2 * n * d * (3 * d + d + 2 * mlp)
    expected = (2 * n * (p * p * 6) * d                      # patch embed
                + 2 * 2 * (256 * d + d * d) + 2 * 64 * d     # noise-level + step MLPs, prompt
                + depth * (2 * sub_block + 4 * n * n * d + 4 * n * 8 * d)
                + 2 * d * 2 * d + 2 * n * d * (p * p * 3))   # final adaLN + linear
    assert frame_pass_flops(tiny_cfg.model) == expected


def test_hlo_counter_counts_loops_and_convolutions():
    def program(x_bhwc, kernel_hwio, w_ldd):
        y = jax.lax.conv_general_dilated(x_bhwc, kernel_hwio, (2, 2), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y_nd = y.reshape(-1, y.shape[-1])

        def layer(h, w_dd):
            return jnp.tanh(h @ w_dd), None

        return jax.lax.scan(layer, y_nd, w_ldd)[0]

    args = (jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),
            jax.ShapeDtypeStruct((2, 2, 3, 32), jnp.float32),
            jax.ShapeDtypeStruct((5, 32, 32), jnp.float32))
    lowered = jax.jit(program).lower(*args)
    conv = 2 * (2 * 8 * 8 * 32) * (2 * 2 * 3)
    dots = 5 * 2 * (2 * 8 * 8) * 32 * 32
    assert hlo_matmul_flops(lowered.compile().as_text()) == (conv + dots, 0)
    # XLA's own figure counts the loop body once.
    assert cost_analysis_flops(lowered.compile()) < conv + 2 * dots
