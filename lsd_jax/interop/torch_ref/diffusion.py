"""Diffusion formulas, the plain autoregressive sampler and the training loss, in PyTorch.

The processes take their constants (schedule, `alphas_cumprod`) from `lsd_jax.diffusion`, which
computes them in numpy, and redo every formula in torch. All noise is passed in, so a torch run
and a JAX run given the same arrays compute the same thing.
"""

from __future__ import annotations

import torch

from lsd_jax.config import DiffusionConfig
from lsd_jax.diffusion import make_process


def _expand(level, x):
    return torch.as_tensor(level, dtype=x.dtype)[..., None, None, None]


class TorchProcess:
    """`add_noise`, `target`, `denoise_step`, `model_time` of `lsd_jax.diffusion.make_process(cfg)`
    in torch; `schedule(n)` is the JAX process's own `sampling_schedule(n)` (numpy)."""

    def __init__(self, cfg: DiffusionConfig):
        self.jax_process = make_process(cfg)
        self.name = self.jax_process.name
        self.min_step_size = self.jax_process.min_step_size
        self.prediction = getattr(self.jax_process, "prediction", "velocity")
        self.input_scale = cfg.input_scale
        if self.name == "ddpm_v":
            self.alphas_cumprod = torch.from_numpy(self.jax_process.alphas_cumprod)

    def schedule(self, n_steps: int):
        return self.jax_process.sampling_schedule(n_steps)

    def abar(self, level):
        level = torch.as_tensor(level, dtype=torch.float32)
        index = torch.clamp(torch.round(level), 0, len(self.alphas_cumprod) - 1).long()
        return torch.where(level < 0, torch.ones_like(level), self.alphas_cumprod[index])

    def add_noise(self, x0, eps, level):
        if self.name == "rectified_flow":
            t = _expand(level, x0)
            return (1.0 - t) * x0 + t * eps
        a = _expand(self.abar(level), x0)
        return torch.sqrt(a) * x0 + torch.sqrt(1.0 - a) * eps

    def target(self, x0, eps, level):
        if self.name == "rectified_flow":
            return x0 if self.prediction == "x0" else eps - x0
        a = _expand(self.abar(level), x0)
        return torch.sqrt(a) * eps - torch.sqrt(1.0 - a) * x0

    def denoise_step(self, x_t, pred, level, next_level):
        """Euler step (rectified flow) or Oasis's DDIM step (`next_level < 0` gives x0)."""
        if self.name == "rectified_flow" and self.prediction == "x0":
            ratio = torch.as_tensor(next_level) / torch.as_tensor(level)
            return pred + _expand(ratio, x_t) * (x_t - pred)
        if self.name == "rectified_flow":
            return x_t - _expand(torch.as_tensor(level) - torch.as_tensor(next_level), x_t) * pred
        a = _expand(self.abar(level), x_t)
        a_next = _expand(self.abar(next_level), x_t)
        x0 = torch.sqrt(a) * x_t - torch.sqrt(1.0 - a) * pred
        eps = (x_t / torch.sqrt(a) - x0) / torch.sqrt(1.0 / a - 1.0)
        return torch.sqrt(a_next) * x0 + torch.sqrt(1.0 - a_next) * eps

    def model_time(self, level):
        scale = 1000.0 if self.name == "rectified_flow" else 1.0
        return torch.as_tensor(level, dtype=torch.float32) * scale

    def network_input(self, x_t, level):
        """`x_t`, or `x_t` times the clean frame's weight (`diffusion.input_scale="signal"`)."""
        if self.input_scale == "unit":
            return x_t
        level = torch.as_tensor(level, dtype=torch.float32)
        signal = 1.0 - level if self.name == "rectified_flow" else torch.sqrt(self.abar(level))
        return x_t * _expand(signal, x_t)


def context_frame(cfg, process: TorchProcess, x0, ctx_eps):
    """A finished frame as history: clean (labelled t_ctx) or noised to t_ctx with `ctx_eps`."""
    if cfg.diffusion.context_noise == "label":
        return x0
    level = torch.full(x0.shape[:-3], cfg.diffusion.ctx_level)
    return process.add_noise(x0, ctx_eps, level)


@torch.no_grad()
def reference_sample(cfg, model, noise_tbhwc, ctx_eps_tbhwc=None, *, cond_bthwc=None,
                     steps=None, prompt_bp=None, external_btx=None):
    """`lsd_jax.streaming.reference_sample` in torch: each frame from its initial noise
    `noise_tbhwc[i]`, every denoising step re-running the banded full forward over the history
    (at t_ctx) plus the new frame. `ctx_eps_tbhwc[i]` noises frame i as history when
    `context_noise == "noised"`. Returns x0 `[b, t, h, w, c]`."""
    process = TorchProcess(cfg.diffusion)
    levels, step_sizes = process.schedule(cfg.diffusion.sample_steps if steps is None else steps)
    m = cfg.model
    num_frames, batch = noise_tbhwc.shape[:2]
    ctx_time = float(process.model_time(cfg.diffusion.ctx_level))
    history, outputs = [], []
    for i in range(num_frames):
        x = noise_tbhwc[i]
        for t, t_next, d in zip(levels[:-1], levels[1:], step_sizes, strict=True):
            level_bt = torch.tensor([cfg.diffusion.ctx_level] * i + [float(t)]).expand(batch, i + 1)
            clip = process.network_input(torch.stack([*history, x], 1), level_bt)
            time_bt = torch.tensor([ctx_time] * i + [float(process.model_time(float(t)))])
            step_bt = torch.tensor([process.min_step_size] * i + [float(d)])
            pred = model(
                clip, time_bt.expand(batch, i + 1),
                cond_bthwc=None if cond_bthwc is None else cond_bthwc[:, : i + 1],
                step_size_bt=step_bt.expand(batch, i + 1) if m.use_step_size else None,
                prompt_bp=prompt_bp,
                external_btx=None if external_btx is None else external_btx[:, : i + 1],
            )[:, -1]
            x = process.denoise_step(x, pred, float(t), float(t_next))
        outputs.append(x)
        history.append(context_frame(cfg, process, x,
                                     None if ctx_eps_tbhwc is None else ctx_eps_tbhwc[i]))
    return torch.stack(outputs, 1)


@torch.no_grad()
def flow_matching_loss(cfg, model, x0_bthwc, eps_bthwc, level_bt, *, cond_bthwc=None,
                       prompt_bp=None, external_btx=None):
    """Diffusion Forcing loss on given noise and per-frame levels (no shortcut clips, no history
    augmentation): `mean((model(add_noise(x0, eps, level)) - target(x0, eps, level))^2)`."""
    process = TorchProcess(cfg.diffusion)
    x_t = process.add_noise(x0_bthwc, eps_bthwc, level_bt)
    step_bt = torch.full(level_bt.shape, process.min_step_size)
    pred = model(process.network_input(x_t, level_bt), process.model_time(level_bt),
                 cond_bthwc=cond_bthwc,
                 step_size_bt=step_bt if cfg.model.use_step_size else None, prompt_bp=prompt_bp,
                 external_btx=external_btx)
    return torch.mean(torch.square(pred - process.target(x0_bthwc, eps_bthwc, level_bt)))
