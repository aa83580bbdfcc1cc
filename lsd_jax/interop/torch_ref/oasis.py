"""Oasis's sampling loop (its `generate.py`, docs/OASIS.md "Sampling loop") in PyTorch, formula for
formula, on the torch reference DiT: the check that `lsd_jax.interop.oasis` mode "recompute" is
exact."""

from __future__ import annotations

import torch

from lsd_jax.interop.torch_ref.diffusion import TorchProcess


@torch.no_grad()
def oasis_sample(cfg, model, start_bthwc, actions_btx, noise_tbhwc):
    """Latents `[b, prompt + new, h, w, c]`: the start frames, then one frame per entry of
    `noise_tbhwc` (already clamped to +-20), each denoised by DDIM over `noise_range =
    linspace(-1, T-1, steps+1)` with the last `window` frames recomputed at every step, context
    labelled `ctx_level` and fed clean, only the newest frame written back."""
    process = TorchProcess(cfg.diffusion)
    alphas_cumprod = process.alphas_cumprod
    steps, window = cfg.diffusion.sample_steps, cfg.model.window
    noise_range = torch.linspace(-1, cfg.diffusion.num_timesteps - 1, steps + 1).long()
    ctx_label = int(cfg.diffusion.ctx_level)
    x = start_bthwc.clone()
    batch, prompt = x.shape[:2]
    for i in range(prompt, prompt + noise_tbhwc.shape[0]):
        x = torch.cat([x, noise_tbhwc[i - prompt][:, None]], 1)
        start = max(0, i + 1 - window)
        for noise_idx in reversed(range(1, steps + 1)):
            t_ctx = torch.full((batch, i), ctx_label, dtype=torch.long)
            t = torch.full((batch, 1), int(noise_range[noise_idx]), dtype=torch.long)
            t_next = torch.full((batch, 1), int(noise_range[noise_idx - 1]), dtype=torch.long)
            t_next = torch.where(t_next < 0, t, t_next)
            t = torch.cat([t_ctx, t], 1)[:, start:]
            t_next = torch.cat([t_ctx, t_next], 1)[:, start:]
            x_curr = x[:, start:]
            v = model(x_curr, t.float(), external_btx=actions_btx[:, start : i + 1])
            abar = alphas_cumprod[t][..., None, None, None]
            x_start = abar.sqrt() * x_curr - (1 - abar).sqrt() * v
            x_noise = ((1 / abar).sqrt() * x_curr - x_start) / (1 / abar - 1).sqrt()
            abar_next = alphas_cumprod[t_next].clone()
            abar_next[:, :-1] = 1.0
            if noise_idx == 1:
                abar_next[:, -1:] = 1.0
            abar_next = abar_next[..., None, None, None]
            x_pred = abar_next.sqrt() * x_start + x_noise * (1 - abar_next).sqrt()
            x[:, -1:] = x_pred[:, -1:]
    return x
