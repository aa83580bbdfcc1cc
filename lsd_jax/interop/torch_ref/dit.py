"""The causal spatio-temporal DiT in PyTorch, written from docs/OASIS.md and docs/DESIGN.md
section 2.

Same function as `lsd_jax.model.DiT` for every `ModelConfig` option, with Oasis's module names, so
an Oasis-500M state dict loads into `TorchDiT(configs/oasis_500m)` as published:

    x_embedder.proj (Conv2d)     t_embedder.mlp.{0,2}         external_cond
    blocks.N.{s,t}_attn.to_qkv   blocks.N.{s,t}_attn.to_out   blocks.N.{s,t}_mlp.fc{1,2}
    blocks.N.{s,t}_adaLN_modulation.1   final_layer.linear   final_layer.adaLN_modulation.1

Options Oasis does not have get names in the same style: `step_embedder.mlp.{0,2}` (shortcut step
size, fed `-log2(d) * STEP_EMBED_SCALE`) and `prompt_proj` (prompt embedding -> hidden). The
input frame (`cond_channels`) is concatenated channel-wise before `x_embedder.proj`. Rotary
frequencies are buffers outside the state dict (recomputed, never loaded).

Entry points, frames NHWC as in the JAX model:
- `forward(x_bthwc, time_bt, cond_bthwc=, step_size_bt=, prompt_bp=, external_btx=)`: the whole
  clip, temporal attention banded-causal over `window` frames;
- `stream_pass(x_bhwc, time_b, k_lbskne, v_lbskne, valid_bs, ...)`: one new frame against a cache
  of already-rotated keys, returning its un-rotated temporal K/V per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsd_jax import rope
from lsd_jax.config import ModelConfig
from lsd_jax.model import CURVE_KNOTS, LUMA_WEIGHTS, STEP_EMBED_SCALE, num_color_features


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Oasis/DiT `cat(cos(t f), sin(t f))`, `f = exp(-ln(max_period) arange(dim/2) / (dim/2))`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last axis of `x` by pair `angles` `[..., e/2]` in float32 (GPT-J pairs
    `(2i, 2i+1)` when `interleaved`, else NeoX pairs `(i, i + e/2)`)."""
    dtype = x.dtype
    x = x.float()
    cos, sin = torch.cos(angles), torch.sin(angles)
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dtype)


def axial_angles(freqs_f: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Pair angles `[grid_h * grid_w, 2 * len(freqs)]`: rows `linspace(-1, 1, grid_h)` on the first
    half of the pairs, columns `linspace(-1, 1, grid_w)` on the second (rotary "pixel" axial)."""
    rows_hf = torch.linspace(-1.0, 1.0, grid_h)[:, None] * freqs_f
    cols_wf = torch.linspace(-1.0, 1.0, grid_w)[:, None] * freqs_f
    f = freqs_f.shape[0]
    return torch.cat([rows_hf[:, None, :].expand(grid_h, grid_w, f),
                      cols_wf[None, :, :].expand(grid_h, grid_w, f)], -1).reshape(-1, 2 * f)


class TimestepEmbedder(nn.Module):
    """Scalar per frame -> sinusoid -> `mlp.0`, SiLU, `mlp.2`: `[...] -> [..., d]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.freq_dim = cfg.freq_embed_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.freq_embed_dim, cfg.hidden_size), nn.SiLU(),
                                 nn.Linear(cfg.hidden_size, cfg.hidden_size))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t, self.freq_dim))


class Attention(nn.Module):
    """`to_qkv` (q, k, v chunks, each head-major) and `to_out`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.to_qkv = nn.Linear(cfg.hidden_size, 3 * cfg.attention_width, bias=cfg.qkv_bias)
        self.to_out = nn.Linear(cfg.attention_width, cfg.hidden_size)

    def qkv(self, x):
        """`[..., d]` -> q, k, v each `[..., heads, head_dim]`."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1))
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_width
        self.approximate = "tanh" if cfg.gelu_approximate else "none"
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _attend(q, k, v, mask):
    """q `[..., heads, q, e]`, k, v `[..., heads, k, e]`, bool mask (True = attend) -> like q.

    Leading axes are flattened to one batch axis (and a per-batch mask expanded to match):
    `torch.compile`'s attention decomposition mis-broadcasts 5-D inputs."""
    lead = q.shape[:-3]
    flat = lambda a: a.reshape(-1, *a.shape[-3:])  # noqa: E731
    if mask is not None and mask.ndim > 2:
        mask = flat(mask.expand(*lead, *mask.shape[-3:]))
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


class Block(nn.Module):
    """Spatial sub-block (`s_*`) then temporal sub-block (`t_*`), each adaLN-Zero."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.s_attn, self.s_mlp = Attention(cfg), Mlp(cfg)
        self.s_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.t_attn, self.t_mlp = Attention(cfg), Mlp(cfg)
        self.t_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def sub_block(self, which: str, x_btnd, c_btd, mix):
        """`mix(q, k, v)` (each `[b, t, n, heads, e]`, k un-rotated) -> attention output."""
        attn, mlp = getattr(self, f"{which}_attn"), getattr(self, f"{which}_mlp")
        mod = getattr(self, f"{which}_adaLN_modulation")(c_btd)[:, :, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        norm = lambda x: F.layer_norm(x, x.shape[-1:], eps=self.eps)  # noqa: E731
        q, k, v = attn.qkv(norm(x_btnd) * (1 + scale_msa) + shift_msa)
        x_btnd = x_btnd + gate_msa * attn.to_out(mix(q, k, v).flatten(-2))
        x_btnd = x_btnd + gate_mlp * mlp(norm(x_btnd) * (1 + scale_mlp) + shift_mlp)
        return x_btnd, k, v


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.eps = cfg.norm_eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, p * p * (cfg.channels + cfg.pixel_channels))

    def forward(self, x_btnd, c_btd):
        shift, scale = self.adaLN_modulation(c_btd)[:, :, None, :].chunk(2, dim=-1)
        x = F.layer_norm(x_btnd, x_btnd.shape[-1:], eps=self.eps)
        return self.linear(x * (1 + scale) + shift)


def color_features(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`lsd_jax.model.color_features` in torch: channels (+ squares and pairwise products for
    "quadratic" and "curves", + hinges of the luma for "curves") and a constant."""
    parts = [x]
    if kind in ("quadratic", "curves"):
        c = x.shape[-1]
        parts.append(x * x)
        parts.extend(x[..., i:i + 1] * x[..., j:j + 1] for i in range(c) for j in range(i + 1, c))
    if kind == "curves":
        luma = sum(w * x[..., i:i + 1] for i, w in enumerate(LUMA_WEIGHTS))
        parts.extend(F.relu(luma - k) for k in CURVE_KNOTS)
    parts.append(torch.ones_like(x[..., :1]))
    return torch.cat(parts, -1)


def _frames(conv: nn.Module, x_bthwc: torch.Tensor) -> torch.Tensor:
    """A Conv2d over NCHW applied to NHWC frames `[b, t, h, w, c]`."""
    b, t = x_bthwc.shape[:2]
    y = conv(x_bthwc.flatten(0, 1).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).unflatten(0, (b, t))


class PixelPath(nn.Module):
    """The full-resolution convolutional path (`model.pixel_channels > 0`), as
    `lsd_jax.model.PixelPath`: stem on the input frame, modulated head adding a pixel-resolution
    correction to the DiT's coarse prediction."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, depth = cfg.pixel_channels, cfg.pixel_depth
        self.eps, self.residual = cfg.norm_eps, cfg.pixel_residual
        self.approximate = "tanh" if cfg.gelu_approximate else "none"
        self.channels = cfg.channels
        self.stem_in = nn.Conv2d(cfg.cond_channels, f, 3, padding=1)
        self.stem = nn.ModuleList([nn.Conv2d(f, f, 3, padding=1) for _ in range(depth - 1)])
        self.head_in = nn.Conv2d(2 * f + cfg.cond_channels + cfg.channels, f, 3, padding=1)
        self.head = nn.ModuleList([nn.Conv2d(f, f, 3, padding=1) for _ in range(depth)])
        self.head_modulation = nn.Linear(cfg.hidden_size, 2 * f * (depth + 1))
        self.out = nn.Conv2d(f, cfg.channels, 1)

    def _norm(self, h):
        return F.layer_norm(h, h.shape[-1:], eps=self.eps)

    def _block(self, conv, h, shift=None, scale=None):
        x = self._norm(h)
        if shift is not None:
            x = x * (1 + scale) + shift
        return h + _frames(conv, F.gelu(x, approximate=self.approximate))

    def stem_features(self, cond_bthwc):
        h = _frames(self.stem_in, cond_bthwc)
        for conv in self.stem:
            h = self._block(conv, h)
        return h

    def forward(self, dit_bthwx, feats_bthwf, cond_bthwc, c_btd):
        coarse = dit_bthwx[..., :self.channels].float()
        mods = self.head_modulation(F.silu(c_btd))[:, :, None, None, :].chunk(
            2 * (len(self.head) + 1), dim=-1)
        h = _frames(self.head_in, torch.cat([dit_bthwx, feats_bthwf, cond_bthwc], -1))
        for i, conv in enumerate(self.head):
            h = self._block(conv, h, mods[2 * i], mods[2 * i + 1])
        x = self._norm(h) * (1 + mods[-1]) + mods[-2]
        out = coarse + _frames(self.out, F.gelu(x, approximate=self.approximate)).float()
        return out + cond_bthwc.float() if self.residual else out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int | None = None):
        super().__init__()
        p = cfg.patch_size
        in_channels = cfg.channels + cfg.cond_channels if in_channels is None else in_channels
        self.proj = nn.Conv2d(in_channels, cfg.hidden_size, p, stride=p)

    def forward(self, x_bthwc):
        """`[b, t, h, w, c]` -> tokens `[b, t, n, d]`, row-major over the patch grid."""
        b, t = x_bthwc.shape[:2]
        x = self.proj(x_bthwc.flatten(0, 1).permute(0, 3, 1, 2))
        return x.flatten(2).transpose(1, 2).unflatten(0, (b, t))


class TorchDiT(nn.Module):
    """The causal DiT (see the module docstring for names and entry points)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.step_embedder = TimestepEmbedder(cfg) if cfg.use_step_size else None
        self.prompt_proj = nn.Linear(cfg.prompt_dim, d) if cfg.prompt_dim else None
        self.external_cond = (nn.Linear(cfg.external_cond_dim, d) if cfg.external_cond_dim
                              else None)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.pixel = PixelPath(cfg) if cfg.pixel_channels else None
        self.color_map = (nn.Linear(d, cfg.channels * num_color_features(cfg.cond_channels,
                                                                         cfg.color_map))
                          if cfg.color_map != "none" else None)
        self.pixel_embedder = PatchEmbed(cfg, cfg.pixel_channels) if cfg.pixel_channels else None
        spatial_f = torch.from_numpy(rope.spatial_frequencies(cfg.head_dim))
        self.register_buffer("spatial_angles_ne", axial_angles(spatial_f, *cfg.grid)[:, None, :],
                             persistent=False)
        self.register_buffer("temporal_freqs",
                             torch.from_numpy(rope.temporal_frequencies(cfg.head_dim)),
                             persistent=False)

    # ------------------------------------------------------------------ shared parts

    def _condition(self, time_bt, step_size_bt, prompt_bp, external_btx):
        c_btd = self.t_embedder(time_bt)
        if self.step_embedder is not None:
            c_btd = c_btd + self.step_embedder(-torch.log2(step_size_bt) * STEP_EMBED_SCALE)
        if self.prompt_proj is not None:
            c_btd = c_btd + self.prompt_proj(prompt_bp)[:, None, :]
        if self.external_cond is not None:
            c_btd = c_btd + self.external_cond(external_btx)
        return c_btd

    def _embed(self, x_bthwc, cond_bthwc):
        """Tokens, and the pixel stem's features (None when the pixel path is off)."""
        feats = None if self.pixel is None else self.pixel.stem_features(cond_bthwc)
        if cond_bthwc is not None:
            x_bthwc = torch.cat([x_bthwc, cond_bthwc.to(x_bthwc.dtype)], dim=-1)
        tokens = self.x_embedder(x_bthwc)
        if feats is not None:
            tokens = tokens + self.pixel_embedder(feats)
        return tokens, feats

    def _spatial_mix(self, q, k, v):
        il = self.cfg.rope_interleaved
        q = rotate(q, self.spatial_angles_ne, il).transpose(-3, -2)
        k = rotate(k, self.spatial_angles_ne, il).transpose(-3, -2)
        return _attend(q, k, v.transpose(-3, -2), None).transpose(-3, -2)

    def _output(self, x_btnd, c_btd, feats, cond_bthwc):
        cfg = self.cfg
        p, (gh, gw) = cfg.patch_size, cfg.grid
        out = self.final_layer(x_btnd, c_btd)
        b, t = out.shape[:2]
        c = cfg.channels + cfg.pixel_channels
        x = out.reshape(b, t, gh, gw, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        x = x.reshape(b, t, gh * p, gw * p, c)
        pred = x.float() if self.pixel is None else self.pixel(x, feats, cond_bthwc, c_btd)
        if self.color_map is not None:
            feats_k = color_features(cond_bthwc.float(), cfg.color_map)
            coef = self.color_map(F.silu(c_btd)).float().unflatten(-1, (cfg.channels, -1))
            pred = pred + torch.einsum("btck,bthwk->bthwc", coef, feats_k)
        return pred

    # ------------------------------------------------------------------ entry points

    def forward(self, x_bthwc, time_bt, *, cond_bthwc=None, step_size_bt=None, prompt_bp=None,
                external_btx=None):
        """Banded causal forward over a clip: frame i attends to frames i-window+1 .. i."""
        cfg = self.cfg
        num_frames = x_bthwc.shape[1]
        pos_t = torch.arange(num_frames)
        offset_tt = pos_t[:, None] - pos_t[None, :]
        band_tt = (offset_tt >= 0) & (offset_tt < cfg.window)
        angles_te = (pos_t.float()[:, None] * self.temporal_freqs)[:, None, None, :]

        def temporal_mix(q, k, v):
            # [b, t, n, k, e] -> [b, n, k, t, e]: attend over frames at each token and head.
            to_t = lambda a: a.permute(0, 2, 3, 1, 4)  # noqa: E731
            q = to_t(rotate(q, angles_te, cfg.rope_interleaved))
            k = to_t(rotate(k, angles_te, cfg.rope_interleaved))
            return _attend(q, k, to_t(v), band_tt).permute(0, 3, 1, 2, 4)

        x, feats = self._embed(x_bthwc, cond_bthwc)
        c = self._condition(time_bt, step_size_bt, prompt_bp, external_btx)
        for block in self.blocks:
            x, _, _ = block.sub_block("s", x, c, self._spatial_mix)
            x, _, _ = block.sub_block("t", x, c, temporal_mix)
        return self._output(x, c, feats, cond_bthwc)

    def stream_pass(self, x_bhwc, time_b, k_lbskne, v_lbskne, valid_bs, *, cond_bhwc=None,
                    step_size_b=None, prompt_bp=None, external_bx=None):
        """One new frame per stream through every layer, reading cached keys `k_lbskne` (already
        rotated to window-relative positions) and values, `valid_bs` marking history slots.

        Returns `(pred_bhwc, k_lbkne, v_lbkne)`: prediction and the frame's un-rotated temporal K/V.
        """
        cfg = self.cfg
        add_t = lambda a: None if a is None else a[:, None]  # noqa: E731
        angles_e = (cfg.window - 1) * self.temporal_freqs
        # [b, 1 token, 1 head, 1 query, s + 1 keys]
        mask = torch.cat([valid_bs, torch.ones_like(valid_bs[:, :1])], 1)[:, None, None, None, :]
        new_k, new_v = [], []
        x, feats = self._embed(add_t(x_bhwc), add_t(cond_bhwc))
        c = self._condition(time_b[:, None], add_t(step_size_b), prompt_bp, add_t(external_bx))
        for layer, block in enumerate(self.blocks):

            def temporal_mix(q, k, v, layer=layer):
                new_k.append(k[:, 0])
                new_v.append(v[:, 0])
                q = rotate(q, angles_e, cfg.rope_interleaved)
                k = rotate(k, angles_e, cfg.rope_interleaved)
                # [b, s+1, n, k, e] -> [b, n, k, s+1, e]
                to_s = lambda a: a.permute(0, 2, 3, 1, 4)  # noqa: E731
                k_all = to_s(torch.cat([k_lbskne[layer].to(k.dtype), k], 1))
                v_all = to_s(torch.cat([v_lbskne[layer].to(v.dtype), v], 1))
                return _attend(to_s(q), k_all, v_all, mask).permute(0, 3, 1, 2, 4)

            x, _, _ = block.sub_block("s", x, c, self._spatial_mix)
            x, _, _ = block.sub_block("t", x, c, temporal_mix)
        return (self._output(x, c, feats, add_t(cond_bhwc))[:, 0], torch.stack(new_k),
                torch.stack(new_v))
