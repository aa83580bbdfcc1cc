"""The DiT: shapes and parameter counts of every config, the cache == forward fact, causality."""


import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS, rel_err
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.model import DiT, abstract_model, count_params, randomize
from lsd_jax.streaming import init_stream, read_cache, write_cache

SMALL = ["model.frame_height=16", "model.frame_width=24", "model.patch_size=4",
         "model.hidden_size=64", "model.num_heads=4", "model.depth=3", "model.window=4",
         "model.prompt_dim=8"]


def small_model(overrides=(), seed=0):
    cfg = load_config(CONFIGS / "tiny.py", [*SMALL, *overrides])
    return cfg, randomize(DiT(cfg.model, rngs=nnx.Rngs(seed)), seed=seed)


def random_inputs(cfg, batch, frames, seed=1):
    m = cfg.model
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    out = dict(
        x=jax.random.normal(k[0], (batch, frames, *m.frame_shape)),
        time=jax.random.uniform(k[1], (batch, frames), minval=0.0, maxval=1000.0),
    )
    out["cond"] = (jax.random.normal(k[2], (batch, frames, m.frame_height, m.frame_width,
                                            m.cond_channels)) if m.cond_channels else None)
    out["step"] = (2.0 ** -jax.random.randint(k[3], (batch, frames), 0, 8).astype(jnp.float32)
                   if m.use_step_size else None)
    out["prompt"] = jax.random.normal(k[4], (batch, m.prompt_dim)) if m.prompt_dim else None
    out["ext"] = (jax.random.normal(k[5], (batch, frames, m.external_cond_dim))
                  if m.external_cond_dim else None)
    return out


def forward(model, inp):
    return model(inp["x"], inp["time"], cond_bthwc=inp["cond"], step_size_bt=inp["step"],
                 prompt_bp=inp["prompt"], external_btx=inp["ext"])


@pytest.mark.parametrize("name,total,trainable", [
    ("tiny", 1_344_584, 1_344_560),
    ("mid", 43_650_288, 43_650_240),
    ("lsd_base", 761_176_176, 761_176_128),
    ("oasis_500m", 607_943_792, 607_943_744),
])
def test_config_shapes_and_param_counts(name, total, trainable):
    cfg = load_config(CONFIGS / f"{name}.py")
    model = abstract_model(cfg.model)
    assert count_params(model) == (total, trainable)
    m = cfg.model
    blocks = nnx.state(model.blocks, nnx.Param)
    qkv = blocks["spatial"]["attn"]["to_qkv"]["kernel"]
    assert qkv.shape == (m.depth, m.hidden_size, 3 * m.hidden_size)
    inp = random_inputs(cfg, 1, m.window)
    abstract_inp = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inp)
    out = nnx.eval_shape(lambda mod, i: forward(mod, i), model, abstract_inp)
    assert out.shape == (1, m.window, *m.frame_shape)


def test_oasis_state_layout_matches_checkpoint_shapes():
    model = abstract_model(load_config(CONFIGS / "oasis_500m.py").model)
    state = nnx.state(model, nnx.Param)
    assert state["x_embedder"]["kernel"].shape == (2 * 2 * 16, 1024)
    assert state["external_cond"]["kernel"].shape == (25, 1024)
    assert state["blocks"]["temporal"]["adaLN_modulation"]["kernel"].shape == (16, 1024, 6144)
    assert "bias" not in state["blocks"]["temporal"]["attn"]["to_qkv"]
    assert state["final_layer"]["linear"]["kernel"].shape == (1024, 64)
    assert model.spatial_freqs.shape == (16,) and model.temporal_freqs.shape == (32,)


@pytest.mark.parametrize("overrides", [
    (),
    ("model.scan_layers=false", "model.rope_interleaved=false"),
    ("model.cond_channels=0", "model.prompt_dim=0", "model.use_step_size=false",
     "model.external_cond_dim=5", "model.attention_impl=jax_nn"),
    ("model.pixel_channels=8", "model.pixel_depth=3", "model.pixel_residual=true"),
])
def test_cache_equals_banded_forward(overrides):
    """A clip of 3W+2 frames, each at its own noise level, through the ring-buffer cache one frame
    at a time (each pass writes its K/V), equals the banded full-clip forward."""
    cfg, model = small_model(overrides)
    num_frames = 3 * cfg.model.window + 2
    inp = random_inputs(cfg, 2, num_frames)
    full = jax.jit(lambda i: forward(model, i))(inp)

    @jax.jit
    def one_frame(state, i):
        at = lambda a: None if a is None else a[:, i]  # noqa: E731
        pred, k, v = model.stream_pass(
            at(inp["x"]), inp["time"][:, i], read_cache(cfg, state), cond_bhwc=at(inp["cond"]),
            step_size_b=at(inp["step"]), prompt_bp=inp["prompt"], external_bx=at(inp["ext"]))
        return write_cache(cfg, state, k, v), pred

    state = init_stream(cfg, 2, 0)
    streamed = []
    for i in range(num_frames):
        state, pred = one_frame(state, i)
        streamed.append(pred)
    assert rel_err(jnp.stack(streamed, axis=1), full) <= 1e-5


def test_causality():
    """Changing any input after frame i leaves outputs 0..i unchanged; later outputs change."""
    cfg, model = small_model()
    num_frames = 2 * cfg.model.window + 1
    inp = random_inputs(cfg, 1, num_frames)
    fwd = jax.jit(lambda i: forward(model, i))
    base = fwd(inp)
    for i in (0, cfg.model.window - 1, num_frames - 2):
        other = random_inputs(cfg, 1, num_frames, seed=7)
        changed = {k: None if v is None else (v if k == "prompt" else
                                             v.at[:, i + 1:].set(other[k][:, i + 1:]))
                   for k, v in inp.items()}
        out = fwd(changed)
        assert float(jnp.abs(out[:, : i + 1] - base[:, : i + 1]).max()) == 0.0
        assert float(jnp.abs(out[:, i + 1:] - base[:, i + 1:]).max()) > 1e-3


def test_band_limits_direct_dependence():
    """With one layer, frame i depends on frames i-W+1..i only (the band), not on older ones."""
    cfg, model = small_model(["model.depth=1"])
    w = cfg.model.window
    inp = random_inputs(cfg, 1, 2 * w + 1)
    fwd = jax.jit(lambda i: forward(model, i))
    base = fwd(inp)
    changed = dict(inp, x=inp["x"].at[:, 0].add(1.0))
    out = fwd(changed)
    assert float(jnp.abs(out[:, w:] - base[:, w:]).max()) == 0.0
    assert float(jnp.abs(out[:, w - 1] - base[:, w - 1]).max()) > 1e-3


def test_bad_inputs_name_the_value():
    cfg, model = small_model()
    inp = random_inputs(cfg, 1, 2)
    with pytest.raises(ValueError, match=r"16x24x4, expected 16x24x3"):
        model(jnp.ones((1, 2, 16, 24, 4)), inp["time"], cond_bthwc=inp["cond"],
              step_size_bt=inp["step"], prompt_bp=inp["prompt"])
    with pytest.raises(ValueError, match="needs `prompt`"):
        model(inp["x"], inp["time"], cond_bthwc=inp["cond"], step_size_bt=inp["step"])


def test_color_features_of_each_kind():
    """`color_features` on random pixels: each kind is the previous one's features with new ones
    inserted before the constant; "curves" adds one hinge of the BT.601 luma per knot."""
    import numpy as np

    from lsd_jax.model import CURVE_KNOTS, color_features, num_color_features

    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (2, 5, 7, 3), minval=-1, maxval=1))
    feats = {k: np.asarray(color_features(jnp.asarray(x), k))
             for k in ("affine", "quadratic", "curves")}
    for kind, f in feats.items():
        assert f.shape == (2, 5, 7, num_color_features(3, kind))
        np.testing.assert_array_equal(f[..., -1], 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    quad = np.stack([r, g, b, r * r, g * g, b * b, r * g, r * b, g * b], -1)
    np.testing.assert_allclose(feats["quadratic"][..., :-1], quad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(feats["affine"][..., :-1], x)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    hinges = np.stack([np.maximum(luma - k, 0.0) for k in CURVE_KNOTS], -1)
    np.testing.assert_allclose(feats["curves"][..., 9:-1], hinges, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(feats["curves"][..., :9], feats["quadratic"][..., :-1])
    assert 0.2 < (hinges > 0).mean() < 0.8  # the knots cut through the random pixels


@pytest.mark.parametrize("old,new", [("affine", "quadratic"), ("quadratic", "curves"),
                                     ("affine", "curves")])
def test_color_map_grows_without_changing_the_function(old, new):
    """A model's colour map grown into a larger kind (`grow_color_map`: the added features get
    zero coefficients) computes what the model computed, on random weights and inputs."""
    from lsd_jax.model import grow_color_map, num_color_features

    cfg_old, model_old = small_model(["model.color_map=" + old], seed=4)
    cfg_new, model_new = small_model(["model.color_map=" + new], seed=5)
    params = nnx.to_pure_dict(nnx.state(model_old, nnx.Param))
    kernel, bias = grow_color_map(params["color_map"]["kernel"], params["color_map"]["bias"],
                                  cfg_old.model.channels, old, new)
    params["color_map"] = {"kernel": kernel, "bias": bias}
    state = nnx.state(model_new, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model_new, state)
    inp = random_inputs(cfg_old, batch=2, frames=3)
    want, got = forward(model_old, inp), forward(model_new, inp)
    assert rel_err(got, want) < 1e-6
    # ... and the added features matter once their coefficients move off zero
    f_old, f_new = num_color_features(3, old), num_color_features(3, new)
    added = [c * f_new + i for c in range(3) for i in range(f_old - 1, f_new - 1)]
    params["color_map"]["bias"] = bias.at[jnp.array(added)].set(0.5)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model_new, state)
    assert rel_err(forward(model_new, inp), want) > 1e-2
    with pytest.raises(ValueError, match="does not grow into 'affine'"):
        grow_color_map(params["color_map"]["kernel"], params["color_map"]["bias"], 3, new, "affine")
