"""Causal spatio-temporal DiT (docs/DESIGN.md section 2), Flax NNX.

Shapes: `b` batch, `t` frames, `h, w, c` a frame in model space (NHWC), `n` tokens per frame,
`d` hidden size, `l` layers, `s` cached history frames (window - 1), `k` attention heads,
`e` head dim.

Two entry points share every layer:
- `DiT.__call__`: the full clip, temporal attention banded-causal over `window` frames;
- `DiT.stream_pass`: one new frame per stream, temporal attention over the ring-buffer KV cache
  plus itself. It also returns the frame's un-rotated temporal K/V for every layer, so the caller
  can write them into the cache.

Blocks are stacked (parameters carry a leading `layers` axis) and run with `jax.lax.scan` under a
selectable `jax.checkpoint` policy, so compile time does not grow with depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lsd_jax import rope
from lsd_jax.activation_sharding import constrain_batch
from lsd_jax.attention import get_attention
from lsd_jax.config import COLOR_MAP_KINDS, ModelConfig, color_map_grows, dtype_of
from lsd_jax.norm import NormImpl, get_norm, layer_norm, modulate

# The step-size input is -log2(d) in [0, log2(max_steps)]; scaling it spreads it over the
# sinusoid's frequencies as the noise-level input (0..1000) is spread.
STEP_EMBED_SCALE = 100.0

# The `jax.checkpoint` policy of each `model.remat_policy` (config.REMAT_POLICIES) but "none",
# which runs the blocks without rematerialisation.
_CHECKPOINT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RopeFreqs(nnx.Variable):
    """Fixed rotary frequencies: part of the state (Oasis counts them), never trained."""


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
            bias: bool = True, zero: bool = False, init=None) -> nnx.Linear:
    """A Linear whose kernel/bias carry logical axis names (mapped to a mesh by train/)."""
    kernel_init = nnx.initializers.zeros_init() if zero else (
        init or nnx.initializers.xavier_uniform())
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=kernel_init, rngs=rngs,
        kernel_metadata={"out_sharding": axes, "eager_sharding": False},
        bias_metadata={"out_sharding": axes[1:], "eager_sharding": False},
    )


def timestep_sinusoid(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """`cat(cos(t f), sin(t f))` with `f = exp(-ln(max_period) * arange(dim/2) / (dim/2))`."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Scalar per frame -> sinusoid -> Linear, SiLU, Linear: `[...] -> [..., d]`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.freq_dim = cfg.freq_embed_dim
        init = nnx.initializers.normal(0.02)
        self.mlp_0 = _linear(cfg, cfg.freq_embed_dim, cfg.hidden_size, ("freq", "embed"),
                             rngs=rngs, init=init)
        self.mlp_2 = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"),
                             rngs=rngs, init=init)

    def __call__(self, t):
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_sinusoid(t, self.freq_dim))))


class Attention(nnx.Module):
    """`to_qkv` (q, k, v chunks, each head-major) and `to_out`; the mixing is passed in."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, a = cfg.hidden_size, cfg.attention_width
        self.num_heads = cfg.num_heads
        self.to_qkv = _linear(cfg, d, 3 * a, ("embed", "heads"), rngs=rngs, bias=cfg.qkv_bias)
        self.to_out = _linear(cfg, a, d, ("heads", "embed"), rngs=rngs)

    def qkv(self, x_btnd):
        qkv = self.to_qkv(x_btnd).reshape(*x_btnd.shape[:-1], 3, self.num_heads, -1)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def out(self, o_btnke):
        return self.to_out(o_btnke.reshape(*o_btnke.shape[:-2], -1))


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.mlp_width
        self.approximate = cfg.gelu_approximate
        self.fc1 = _linear(cfg, cfg.hidden_size, hidden, ("embed", "mlp"), rngs=rngs)
        self.fc2 = _linear(cfg, hidden, cfg.hidden_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate))


# mix(q, k, v) -> attention output, all [b, t, n, heads, head_dim]; k, v are un-rotated.
Mixer = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


class SubBlock(nnx.Module):
    """adaLN-Zero DiT sub-block: gated attention then gated MLP, shift/scale/gate per frame."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.adaLN_modulation = _linear(cfg, cfg.hidden_size, 6 * cfg.hidden_size,
                                        ("embed", "mlp"), rngs=rngs, zero=True)

    def __call__(self, x_btnd, c_btd, mix: Mixer, norm: NormImpl):
        with jax.named_scope("modulation"):
            mod_bt1d = self.adaLN_modulation(jax.nn.silu(c_btd))[:, :, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod_bt1d, 6, -1)
        with jax.named_scope("attention"):
            q, k, v = self.attn.qkv(norm.norm_modulate(x_btnd, shift_msa, scale_msa, eps=self.eps))
            with jax.named_scope("mix"):
                o = mix(q, k, v)
            x_btnd, h_btnd = norm.residual_norm_modulate(
                x_btnd, gate_msa, self.attn.out(o), shift_mlp, scale_mlp, eps=self.eps)
        with jax.named_scope("mlp"):
            x_btnd = x_btnd + gate_mlp * self.mlp(h_btnd)
        return x_btnd, (k, v)


class Block(nnx.Module):
    """Spatial sub-block (bidirectional within a frame) then temporal sub-block (over frames)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.spatial = SubBlock(cfg, rngs=rngs)
        self.temporal = SubBlock(cfg, rngs=rngs)

    def __call__(self, x_btnd, c_btd, spatial_mix: Mixer, temporal_mix: Mixer, norm: NormImpl):
        with jax.named_scope("spatial"):
            x_btnd, _ = self.spatial(x_btnd, c_btd, spatial_mix, norm)
        with jax.named_scope("temporal"):
            return self.temporal(x_btnd, c_btd, temporal_mix, norm)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) and a Linear to `p * p * out_channels` per token: the prediction's
    channels, and the pixel path's feature channels when it is on."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        p, c = cfg.patch_size, cfg.channels + cfg.pixel_channels
        self.eps = cfg.norm_eps
        self.adaLN_modulation = _linear(cfg, cfg.hidden_size, 2 * cfg.hidden_size,
                                        ("embed", "mlp"), rngs=rngs, zero=True)
        self.linear = _linear(cfg, cfg.hidden_size, p * p * c, ("embed", "patch"), rngs=rngs,
                              zero=True)

    def __call__(self, x_btnd, c_btd, norm: NormImpl):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c_btd))[:, :, None, :], 2, -1)
        return self.linear(norm.norm_modulate(x_btnd, shift, scale, eps=self.eps))


def _conv(cfg: ModelConfig, d_in: int, d_out: int, kernel: int, *, rngs: nnx.Rngs,
          zero: bool = False) -> nnx.Conv:
    """A `kernel x kernel` SAME convolution over NHWC frames at pixel resolution."""
    return nnx.Conv(
        d_in, d_out, (kernel, kernel), padding="SAME", dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype), rngs=rngs,
        kernel_init=nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal(),
        kernel_metadata={"out_sharding": (None, None, "pixel", "pixel"), "eager_sharding": False},
        bias_metadata={"out_sharding": ("pixel",), "eager_sharding": False},
    )


def _conv_part(conv: nnx.Conv, start: int, stop: int | None, bias: bool, x_nhwc):
    """`conv` applied to input channels `start:stop` of its kernel only (with its bias or not):
    a convolution over a channel concatenation is the sum of such parts."""
    kernel = conv.kernel[...][:, :, start:stop].astype(x_nhwc.dtype)
    y = jax.lax.conv_general_dilated(x_nhwc, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + conv.bias[...].astype(y.dtype) if bias else y


def _frames_apply(fn, x_bthwc):
    """`fn` over NHWC frames applied to `[b, t, h, w, c]` (batch and time folded together)."""
    b, t = x_bthwc.shape[:2]
    y = fn(x_bthwc.reshape(b * t, *x_bthwc.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class PixelPath(nnx.Module):
    """The full-resolution convolutional path around the DiT (`model.pixel_channels = F > 0`).

    Residual blocks at pixel resolution, each `h + conv3x3(gelu(modulate(norm(h))))` with the
    norm an affine-free LayerNorm over channels and the conv zero-initialised:

    - `stem_features(cond_bthwc) -> feats_bthwf`: a 3x3 convolution of the input frame to `F`
      channels and `pixel_depth - 1` unmodulated blocks. It does not see the noise level, so one
      frame's stem is the same for every denoising pass (and is hoisted out of the denoising loop
      by the compiler).
    - `__call__(dit_bthwx, feats_bthwf, cond_bthwc, c_btd) -> out_bthwc`: the DiT's unpatchified
      output holds a coarse prediction (the first `C` channels, what the plain DiT outputs) and
      `F` feature channels. The features, the coarse prediction, the stem's features and the input
      frame, concatenated, go through a 3x3 convolution, `pixel_depth` blocks modulated per frame
      by the conditioning vector (shift and scale), and a modulated, zero-initialised 1x1
      convolution: a pixel-resolution correction added to the coarse prediction. At
      initialisation the correction is zero, so the network starts as the plain DiT. With
      `pixel_residual` the input frame is added too: the restyle is learned as a residual over
      the input frame.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        f, depth = cfg.pixel_channels, cfg.pixel_depth
        self.residual = cfg.pixel_residual
        self.approximate = cfg.gelu_approximate
        self.eps = cfg.norm_eps
        self.stem_in = _conv(cfg, cfg.cond_channels, f, 3, rngs=rngs)
        self.stem = nnx.List([_conv(cfg, f, f, 3, rngs=rngs, zero=True)
                              for _ in range(depth - 1)])
        self.head_in = _conv(cfg, 2 * f + cfg.cond_channels + cfg.channels, f, 3, rngs=rngs)
        self.head = nnx.List([_conv(cfg, f, f, 3, rngs=rngs, zero=True) for _ in range(depth)])
        self.head_modulation = _linear(cfg, cfg.hidden_size, 2 * f * (depth + 1),
                                       ("embed", "pixel"), rngs=rngs, zero=True)
        self.out = _conv(cfg, f, cfg.channels, 1, rngs=rngs, zero=True)

    def _block(self, conv, h, shift=None, scale=None):
        x = layer_norm(h, self.eps)
        if shift is not None:
            x = modulate(x, shift, scale)
        return h + _frames_apply(conv, jax.nn.gelu(x, approximate=self.approximate))

    def stem_features(self, cond_bthwc):
        h = _frames_apply(self.stem_in, cond_bthwc)
        for conv in self.stem:
            h = self._block(conv, h)
        return h

    def __call__(self, dit_bthwx, feats_bthwf, cond_bthwc, c_btd):
        dtype = dit_bthwx.dtype
        coarse_bthwc = dit_bthwx[..., :self.out.out_features].astype(jnp.float32)
        mod_bt11f = self.head_modulation(jax.nn.silu(c_btd))[:, :, None, None, :]
        mods = jnp.split(mod_bt11f, 2 * (len(self.head) + 1), axis=-1)
        # head_in over [DiT output, stem features, input frame] as two convolutions: the second
        # sees only the input frame's side, the same in every denoising pass of a frame (the
        # compiled step computes it once per frame).
        split = dit_bthwx.shape[-1]
        h = (_frames_apply(partial(_conv_part, self.head_in, 0, split, True), dit_bthwx)
             + _frames_apply(partial(_conv_part, self.head_in, split, None, False),
                             jnp.concatenate([feats_bthwf.astype(dtype),
                                              cond_bthwc.astype(dtype)], -1)))
        for i, conv in enumerate(self.head):
            h = self._block(conv, h, mods[2 * i], mods[2 * i + 1])
        x = modulate(layer_norm(h, self.eps), mods[-2], mods[-1])
        out = coarse_bthwc + _frames_apply(self.out, jax.nn.gelu(
            x, approximate=self.approximate)).astype(jnp.float32)
        return out + cond_bthwc.astype(jnp.float32) if self.residual else out


# `model.color_map="curves"`: hinge knots of the tone curve on the input frame's luma (BT.601
# weights), in model units ([-1, 1]); 1/16, 1/8, 1/4, 1/2 and 3/4 of the way up in [0, 1] units,
# denser in the shadows, where gamma-like curves bend most.
CURVE_KNOTS = (-0.875, -0.75, -0.5, 0.0, 0.5)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def color_features(cond_bthwc, kind: str):
    """Per-pixel features of the input frame for `model.color_map`: `[..., C]` -> `[..., f]` with
    the channels and a constant ("affine", f = C + 1), plus their squares and pairwise products
    ("quadratic", f = 2C + C(C-1)/2 + 1), plus a piecewise-linear tone curve of the luma, one hinge
    `max(luma - knot, 0)` per `CURVE_KNOTS` entry ("curves", RGB only: f = 15). Each kind's
    features are the previous kind's with new ones inserted before the constant, so a smaller map
    grows into a larger one without changing its function (`grow_color_map`)."""
    x = cond_bthwc.astype(jnp.float32)
    parts = [x]
    if kind in ("quadratic", "curves"):
        c = x.shape[-1]
        parts.append(x * x)
        parts.extend(x[..., i:i + 1] * x[..., j:j + 1] for i in range(c) for j in range(i + 1, c))
    if kind == "curves":
        luma = sum(w * x[..., i:i + 1] for i, w in enumerate(LUMA_WEIGHTS))
        parts.extend(jax.nn.relu(luma - k) for k in CURVE_KNOTS)
    parts.append(jnp.ones_like(x[..., :1]))
    return jnp.concatenate(parts, axis=-1)


def num_color_features(channels: int, kind: str) -> int:
    quadratic = 2 * channels + channels * (channels - 1) // 2 + 1
    return {"affine": channels + 1, "quadratic": quadratic,
            "curves": quadratic + len(CURVE_KNOTS)}[kind]


def grow_color_map(kernel_dk, bias_k, channels: int, old: str, new: str):
    """The `color_map` linear layer's kernel `[D, C*f_old]` and bias of a model with
    `model.color_map=old`, as those of `new` computing the same function: zero coefficients for
    the features `new` adds (the constant stays last). `new` must extend `old`."""
    if old not in COLOR_MAP_KINDS[1:] or (new != old and not color_map_grows(old, new)):
        raise ValueError(f"model.color_map={old!r} does not grow into {new!r}: expected one of "
                         f"{COLOR_MAP_KINDS[1:]} no earlier than {old!r}")
    f_old, f_new = num_color_features(channels, old), num_color_features(channels, new)
    # Coefficients [.., C, f]; the first f_old - 1 features keep their place, the constant moves.
    src = list(range(f_old - 1)) + [f_new - 1]

    def grow(a):
        a = a.reshape(*a.shape[:-1], channels, f_old)
        out = jnp.zeros((*a.shape[:-1], f_new), a.dtype).at[..., jnp.array(src)].set(a)
        return out.reshape(*a.shape[:-2], channels * f_new)

    return grow(kernel_dk), grow(bias_k)


class StreamContext(NamedTuple):
    """What one streamed frame's pass reads from the ring-buffer cache (never writes): the cache
    as stored, keys un-rotated, with each slot's age and validity. The attention implementation
    rotates a cached key of age `a` to window position `window - 1 - a`; the new frame sits at
    `window - 1` (`attention.temporal_cache`)."""

    k_lbskne: jnp.ndarray  # [layers, b, s, n, heads, head_dim], un-rotated
    v_lbskne: jnp.ndarray
    age_s: jnp.ndarray  # int32 [s]: 1 for the slot written last .. s
    valid_bs: jnp.ndarray  # bool [b, s]


def _make_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return Block(cfg, rngs=rngs)

    return create(rngs)


class DiT(nnx.Module):
    """The causal spatio-temporal DiT.

    `__call__(x_bthwc, time_bt, *, cond_bthwc, step_size_bt, prompt_bp, external_btx) -> pred_bthwc`
    where `time_bt` is the value fed to the noise-level sinusoid (`process.model_time(level)`) and
    `step_size_bt` the shortcut step size `d` (> 0) when `use_step_size`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        patch_in = p * p * (cfg.channels + cfg.cond_channels)
        self.x_embedder = _linear(cfg, patch_in, d, ("patch", "embed"), rngs=rngs)
        self.pixel = PixelPath(cfg, rngs=rngs) if cfg.pixel_channels else None
        self.pixel_embedder = (_linear(cfg, p * p * cfg.pixel_channels, d, ("patch", "embed"),
                                       rngs=rngs, zero=True) if cfg.pixel_channels else None)
        self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
        self.step_embedder = TimestepEmbedder(cfg, rngs=rngs) if cfg.use_step_size else None
        self.prompt_proj = (_linear(cfg, cfg.prompt_dim, d, ("prompt", "embed"), rngs=rngs)
                            if cfg.prompt_dim else None)
        self.external_cond = (_linear(cfg, cfg.external_cond_dim, d, ("external", "embed"),
                                      rngs=rngs) if cfg.external_cond_dim else None)
        self.blocks = _make_blocks(cfg, rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)
        # A per-frame colour map of the input frame, its coefficients made from the conditioning
        # vector (zero at initialisation): the function class of the per-pixel colour-map floor.
        self.color_map = (_linear(cfg, d, cfg.channels * num_color_features(
            cfg.cond_channels, cfg.color_map), ("embed", "pixel"), rngs=rngs, zero=True)
            if cfg.color_map != "none" else None)
        self.spatial_freqs = RopeFreqs(jnp.asarray(rope.spatial_frequencies(cfg.head_dim)))
        self.temporal_freqs = RopeFreqs(jnp.asarray(rope.temporal_frequencies(cfg.head_dim)))

    # ------------------------------------------------------------------ embedding / output

    def _check_inputs(self, x, cond, step_size, prompt, external):
        cfg = self.cfg
        if tuple(x.shape[-3:]) != cfg.frame_shape:
            raise ValueError(f"model input frames are {'x'.join(map(str, x.shape[-3:]))}, expected "
                             f"{'x'.join(map(str, cfg.frame_shape))} (HxWxC model space)")
        for name, value, needed in (("cond", cond, cfg.cond_channels > 0),
                                    ("step_size", step_size, cfg.use_step_size),
                                    ("prompt", prompt, cfg.prompt_dim > 0),
                                    ("external", external, cfg.external_cond_dim > 0)):
            if needed and value is None:
                raise ValueError(f"this model needs `{name}` (see its ModelConfig), got None")
            if not needed and value is not None:
                raise ValueError(f"this model takes no `{name}` input (see its ModelConfig)")
        if cond is not None and tuple(cond.shape) != (*x.shape[:-1], cfg.cond_channels):
            raise ValueError(f"cond frames are {'x'.join(map(str, cond.shape))}, expected "
                             f"{'x'.join(map(str, (*x.shape[:-1], cfg.cond_channels)))} "
                             f"(model.cond_channels={cfg.cond_channels})")
        if prompt is not None and tuple(prompt.shape) != (x.shape[0], cfg.prompt_dim):
            raise ValueError(f"prompt embedding is {'x'.join(map(str, prompt.shape))}, expected "
                             f"{x.shape[0]}x{cfg.prompt_dim} (batch x model.prompt_dim)")
        if external is not None and external.shape[-1] != cfg.external_cond_dim:
            raise ValueError(f"external vector has {external.shape[-1]} entries, expected "
                             f"model.external_cond_dim={cfg.external_cond_dim}")

    def _patchify(self, x_bthwc):
        """`[b, t, h, w, c] -> [b, t, n, p * p * c]` in the compute dtype."""
        b, t, h, w, c = x_bthwc.shape
        p = self.cfg.patch_size
        x = x_bthwc.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, (h // p) * (w // p), p * p * c).astype(dtype_of(self.cfg.dtype))

    def _embed(self, x_bthwc, cond_bthwc):
        """Tokens `[b, t, n, d]` of the frames (and input frames), and the pixel path's stem
        features `[b, t, h, w, F]` (None when it is off)."""
        feats_bthwf = None
        if self.pixel is not None:
            with jax.named_scope("pixel_stem"):
                feats_bthwf = self.pixel.stem_features(cond_bthwc.astype(dtype_of(self.cfg.dtype)))
        if cond_bthwc is None:
            tokens_btnd = self.x_embedder(self._patchify(x_bthwc))
        else:
            # The embedding of [frame, input frame] patches as two products, the input frame's
            # the same in every denoising pass of a frame (computed once per frame when streaming).
            p, c = self.cfg.patch_size, self.cfg.channels
            kernel = self.x_embedder.kernel[...].reshape(p * p, -1, self.cfg.hidden_size)
            flat = lambda k: k.reshape(-1, k.shape[-1]).astype(dtype_of(self.cfg.dtype))  # noqa: E731
            tokens_btnd = (self._patchify(x_bthwc) @ flat(kernel[:, :c])
                           + self._patchify(cond_bthwc) @ flat(kernel[:, c:])
                           + self.x_embedder.bias[...].astype(dtype_of(self.cfg.dtype)))
        if feats_bthwf is not None:
            tokens_btnd = tokens_btnd + self.pixel_embedder(self._patchify(feats_bthwf))
        return tokens_btnd, feats_bthwf

    def _condition(self, time_bt, step_size_bt, prompt_bp, external_btx):
        c_btd = self.t_embedder(time_bt)
        if self.step_embedder is not None:
            c_btd = c_btd + self.step_embedder(-jnp.log2(step_size_bt) * STEP_EMBED_SCALE)
        if self.prompt_proj is not None:
            c_btd = c_btd + self.prompt_proj(prompt_bp)[:, None, :]
        if self.external_cond is not None:
            c_btd = c_btd + self.external_cond(external_btx)
        return c_btd

    def _unpatchify(self, out_btnf):
        cfg = self.cfg
        p, (gh, gw) = cfg.patch_size, cfg.grid
        b, t = out_btnf.shape[:2]
        c = out_btnf.shape[-1] // (p * p)
        x = out_btnf.reshape(b, t, gh, gw, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, gh * p, gw * p, c)

    def _output(self, x_btnd, c_btd, feats_bthwf, cond_bthwc, norm: NormImpl):
        """The prediction `[b, t, h, w, C]` float32 from the last hidden states."""
        with jax.named_scope("final_layer"):
            out_bthwf = self._unpatchify(self.final_layer(x_btnd, c_btd, norm))
        if self.pixel is None:
            pred = out_bthwf.astype(jnp.float32)
        else:
            with jax.named_scope("pixel_head"):
                pred = self.pixel(out_bthwf, feats_bthwf, cond_bthwc, c_btd)
        with jax.named_scope("color_map"):
            return self._color_map(pred, c_btd, cond_bthwc)

    def _color_map(self, pred, c_btd, cond_bthwc):
        if self.color_map is not None:
            b, t = c_btd.shape[:2]
            feats_bthwk = color_features(cond_bthwc, self.cfg.color_map)
            coef_btck = self.color_map(jax.nn.silu(c_btd)).astype(jnp.float32).reshape(
                b, t, self.cfg.channels, feats_bthwk.shape[-1])
            pred = pred + jnp.einsum("btck,bthwk->bthwc", coef_btck, feats_bthwk)
        return pred

    # ------------------------------------------------------------------ blocks

    def _impls(self):
        """The attention and norm implementations the config selects (docs/DESIGN.md section 7)."""
        cfg = self.cfg
        return (get_attention(cfg.attention_impl, dtype=cfg.dtype),
                get_norm(cfg.norm_impl, dtype=cfg.dtype))

    def _run_blocks(self, x_btnd, c_btd, temporal_mix, layer_ctx, attention, norm):
        """Run all blocks; `temporal_mix(q, k, v, ctx)` gets this layer's slice of `layer_ctx`.

        Returns the final hidden states and the per-layer temporal (k, v), stacked `[layers, ...]`.
        """
        cfg = self.cfg
        spatial_angles_ne = rope.spatial_angles(self.spatial_freqs[...], *cfg.grid)

        def spatial_mix(q, k, v):
            return attention.spatial(q, k, v, angles=spatial_angles_ne,
                                     interleaved=cfg.rope_interleaved)

        graphdef, layers_state = nnx.split(self.blocks)

        def body(x, xs):
            layer_state, ctx = xs
            block = nnx.merge(graphdef, layer_state)
            x, kv = block(constrain_batch(x), c_btd, spatial_mix,
                          lambda q, k, v: temporal_mix(q, k, v, ctx), norm)
            return constrain_batch(x), kv

        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=_CHECKPOINT_POLICIES[cfg.remat_policy])
        if cfg.scan_layers:
            return jax.lax.scan(body, x_btnd, (layers_state, layer_ctx))
        kvs = []
        for i in range(cfg.depth):
            x_btnd, kv = body(x_btnd, jax.tree.map(lambda a, i=i: a[i], (layers_state, layer_ctx)))
            kvs.append(kv)
        return x_btnd, jax.tree.map(lambda *a: jnp.stack(a), *kvs)

    # ------------------------------------------------------------------ entry points

    def __call__(self, x_bthwc, time_bt, *, cond_bthwc=None, step_size_bt=None, prompt_bp=None,
                 external_btx=None):
        """Banded causal forward over a whole clip: frame i attends to frames i-window+1 .. i."""
        cfg = self.cfg
        self._check_inputs(x_bthwc, cond_bthwc, step_size_bt, prompt_bp, external_btx)
        attention, norm = self._impls()
        angles_te = rope.temporal_angles(self.temporal_freqs[...], jnp.arange(x_bthwc.shape[1]))

        def temporal_mix(q, k, v, _):
            return attention.temporal_band(q, k, v, window=cfg.window, angles=angles_te,
                                           interleaved=cfg.rope_interleaved)

        x, feats = self._embed(x_bthwc, cond_bthwc)
        c = self._condition(time_bt, step_size_bt, prompt_bp, external_btx)
        x, _ = self._run_blocks(x, c, temporal_mix, None, attention, norm)
        return self._output(x, c, feats, cond_bthwc, norm)

    def stream_pass(self, x_bhwc, time_b, ctx: StreamContext, *, cond_bhwc=None, step_size_b=None,
                    prompt_bp=None, external_bx=None):
        """One new frame per stream through every layer, reading the cache in `ctx`.

        Returns `(pred_bhwc, k_lbkne, v_lbkne)`: the prediction and the frame's un-rotated
        temporal keys/values per layer, ready to be written into the ring buffer.
        """
        cfg = self.cfg
        add_t = lambda a: None if a is None else a[:, None]  # noqa: E731
        x_bthwc, cond_bthwc = add_t(x_bhwc), add_t(cond_bhwc)
        self._check_inputs(x_bthwc, cond_bthwc, step_size_b, prompt_bp, external_bx)
        attention, norm = self._impls()
        # Angles of window positions 0 .. window-1: the new frame sits at window - 1.
        angles_we = rope.temporal_angles(self.temporal_freqs[...], jnp.arange(cfg.window))

        def temporal_mix(q, k, v, layer_ctx):
            k_cache_bskne, v_cache_bskne = layer_ctx
            return attention.temporal_cache(q, k, v, k_cache_bskne, v_cache_bskne,
                                            age=ctx.age_s, valid=ctx.valid_bs, angles=angles_we,
                                            interleaved=cfg.rope_interleaved)

        with jax.named_scope("embed"):
            x, feats = self._embed(x_bthwc, cond_bthwc)
        with jax.named_scope("condition"):
            c = self._condition(time_b[:, None], add_t(step_size_b), prompt_bp,
                                add_t(external_bx))
        x, (k_lbtkne, v_lbtkne) = self._run_blocks(
            x, c, temporal_mix, (ctx.k_lbskne, ctx.v_lbskne), attention, norm)
        pred_bhwc = self._output(x, c, feats, cond_bthwc, norm)[:, 0]
        return pred_bhwc, k_lbtkne[:, :, 0], v_lbtkne[:, :, 0]


def count_params(model_or_state) -> tuple[int, int]:
    """`(total, trainable)` element counts; total includes the fixed rotary frequencies."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    sizes = lambda s: sum(math.prod(x.shape) for x in jax.tree.leaves(s))  # noqa: E731
    return sizes(state), sizes(nnx.filter_state(state, nnx.Param))


def jitted_apply(model):
    """`model(x, time, **kwargs)` jitted with the weights as arguments (not baked-in constants)."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda state, *a, **k: nnx.merge(graphdef, state)(*a, **k))
    return lambda *a, **k: apply(state, *a, **k)


def abstract_model(cfg: ModelConfig) -> DiT:
    """The model with abstract (shape-only) arrays: no weights allocated."""
    return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def model_from_params(cfg: ModelConfig, params) -> DiT:
    """A model whose trained parameters are `params` (an `nnx.State` or nested dict of arrays
    shaped like `nnx.state(model, nnx.Param)`); the fixed rotary frequencies are recomputed.
    No other weights are allocated."""
    graphdef, _, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    rope_state = nnx.state(_RopeOnly(cfg))
    model = nnx.merge(graphdef, params, rope_state)
    return model


class _RopeOnly(nnx.Module):
    """The fixed variables of a DiT, at the same paths."""

    def __init__(self, cfg: ModelConfig):
        self.spatial_freqs = RopeFreqs(jnp.asarray(rope.spatial_frequencies(cfg.head_dim)))
        self.temporal_freqs = RopeFreqs(jnp.asarray(rope.temporal_frequencies(cfg.head_dim)))


def randomize(model: DiT, seed: int = 0, gain: float = 1.0) -> DiT:
    """Replace every trained parameter (zero-initialised ones included) with random values.

    Kernels get `N(0, gain^2 / fan_in)`, biases `N(0, 0.1^2)`. Used by tests and parity checks,
    where the adaLN-Zero initialisation would make every block the identity and hide errors.
    """
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = []
    for key, leaf in zip(keys, leaves, strict=True):
        if leaf.ndim >= 2 and leaf.shape[-2] > 1:
            std = gain / math.sqrt(leaf.shape[-2])
        else:
            std = 0.1
        new.append((std * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model
