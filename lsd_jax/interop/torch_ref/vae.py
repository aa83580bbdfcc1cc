"""The Oasis ViT-VAE in PyTorch, written from docs/OASIS.md, with Oasis's state-dict names:

    patch_embed.proj (Conv2d 3 -> enc_dim, kernel = stride = patch)
    encoder.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}   enc_norm   quant_conv
    post_quant_conv   decoder.N.{...}   dec_norm   predictor

`encode(x_bchw)` takes `[-1, 1]` RGB in Oasis's NCHW layout and returns the posterior mean tokens
`[b, gh * gw, latent_dim]` (row-major); `decode(z_bnc)` returns `[b, 3, H, W]`. Axial RoPE as in
`lsd_jax.vae` (rule in its docstring), positions `torch.linspace(-1, 1, n)` as Oasis computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsd_jax.interop.torch_ref.dit import axial_angles, rotate
from lsd_jax.vae import VAEConfig, rope_frequencies


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_bnd, angles_nf):
        rot = 2 * angles_nf.shape[-1]
        q, k, v = self.qkv(x_bnd).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        angles = angles_nf[:, None, :]
        q = torch.cat([rotate(q[..., :rot], angles, True), q[..., rot:]], -1).transpose(1, 2)
        k = torch.cat([rotate(k[..., :rot], angles, True), k[..., rot:]], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).flatten(-2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x_bnd, angles_nf):
        x_bnd = x_bnd + self.attn(self.norm1(x_bnd), angles_nf)
        return x_bnd + self.mlp(self.norm2(x_bnd))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.enc_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x_bchw):
        return self.proj(x_bchw).flatten(2).transpose(1, 2)


class TorchVAE(nn.Module):
    """The ViT-VAE (see the module docstring)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        gh, gw = cfg.grid
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = nn.ModuleList(ViTBlock(cfg, cfg.enc_dim, cfg.enc_heads)
                                     for _ in range(cfg.enc_depth))
        self.enc_norm = nn.LayerNorm(cfg.enc_dim, eps=cfg.norm_eps)
        self.quant_conv = nn.Linear(cfg.enc_dim, 2 * cfg.latent_dim)
        self.post_quant_conv = nn.Linear(cfg.latent_dim, cfg.dec_dim)
        self.decoder = nn.ModuleList(ViTBlock(cfg, cfg.dec_dim, cfg.dec_heads)
                                     for _ in range(cfg.dec_depth))
        self.dec_norm = nn.LayerNorm(cfg.dec_dim, eps=cfg.norm_eps)
        self.predictor = nn.Linear(cfg.dec_dim, 3 * p * p)
        for name, dim, heads in (("enc", cfg.enc_dim, cfg.enc_heads),
                                 ("dec", cfg.dec_dim, cfg.dec_heads)):
            freqs = torch.from_numpy(rope_frequencies(dim // heads, gh, gw))
            self.register_buffer(f"{name}_angles_nf", axial_angles(freqs, gh, gw),
                                 persistent=False)

    @torch.no_grad()
    def encode(self, x_bchw):
        x = self.patch_embed(x_bchw)
        for block in self.encoder:
            x = block(x, self.enc_angles_nf)
        mean, _logvar = self.quant_conv(self.enc_norm(x)).chunk(2, dim=-1)
        return mean

    @torch.no_grad()
    def decode(self, z_bnc):
        cfg = self.cfg
        p, (gh, gw) = cfg.patch_size, cfg.grid
        x = self.post_quant_conv(z_bnc)
        for block in self.decoder:
            x = block(x, self.dec_angles_nf)
        out = self.predictor(self.dec_norm(x))
        # Per-token order (c, p, q), c outermost.
        out = out.reshape(-1, gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(-1, 3, gh * p, gw * p)
