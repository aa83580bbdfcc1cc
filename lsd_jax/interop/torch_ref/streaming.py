"""The streaming step in PyTorch, with the ring-buffer cache of `lsd_jax.streaming`.

    state = init_stream(cfg, batch)
    step = make_stream_step(cfg, model)                      # optional torch.compile inside
    state, x0_bhwc = step(state, noise_bhwc, cond_bhwc, prompt_bp, external_bx, ctx_eps_bhwc)

Same semantics as the JAX step: the cache holds the un-rotated temporal keys/values of the last
`window - 1` frames per layer; a read rotates each cached key by its age to window-relative
position `window - 1 - age`; `slot` is the next ring slot written, `num_valid[b]` how many of the
newest slots hold stream b's history. One step: `k` denoising passes on the new frame from
`noise_bhwc` (read-only cache), then one pass of the result at `t_ctx` (clean, or noised with
`ctx_eps_bhwc`) whose K/V are written at `slot`. Noise is passed in so both implementations can
be given the same arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lsd_jax.interop.torch_ref.diffusion import TorchProcess, context_frame
from lsd_jax.interop.torch_ref.dit import TorchDiT, rotate


class TorchStreamState(NamedTuple):
    cache_k: torch.Tensor  # [layers, b, s, n, heads, head_dim], un-rotated keys
    cache_v: torch.Tensor
    slot: int  # the ring slot the next frame is written to
    num_valid: torch.Tensor  # int64 [b]


def init_stream(cfg, batch: int, start_frame: int = 0) -> TorchStreamState:
    m = cfg.model
    size = m.window - 1
    shape = (m.depth, batch, size, m.tokens_per_frame, m.num_heads, m.head_dim)
    return TorchStreamState(torch.zeros(shape), torch.zeros(shape), start_frame % size,
                            torch.zeros(batch, dtype=torch.long))


def read_cache(cfg, model: TorchDiT, state: TorchStreamState):
    """`(k_lbskne rotated by age, v_lbskne, valid_bs)`."""
    size = cfg.model.window - 1
    age_s = (state.slot - 1 - torch.arange(size)) % size + 1
    angles_se = (cfg.model.window - 1 - age_s).float()[:, None] * model.temporal_freqs
    k = rotate(state.cache_k, angles_se[None, None, :, None, None, :], cfg.model.rope_interleaved)
    return k, state.cache_v, age_s[None, :] <= state.num_valid[:, None]


def write_cache(cfg, state: TorchStreamState, k_lbkne, v_lbkne) -> TorchStreamState:
    size = cfg.model.window - 1
    cache_k, cache_v = state.cache_k.clone(), state.cache_v.clone()
    cache_k[:, :, state.slot] = k_lbkne
    cache_v[:, :, state.slot] = v_lbkne
    return TorchStreamState(cache_k, cache_v, (state.slot + 1) % size,
                            torch.clamp(state.num_valid + 1, max=size))


def make_stream_step(cfg, model: TorchDiT, *, steps: int | None = None, compile: bool = False):
    """The streaming step (see the module docstring). `compile=True` wraps the model's stream
    pass in `torch.compile` (the denoising loop stays Python, as in eager)."""
    process = TorchProcess(cfg.diffusion)
    levels, step_sizes = process.schedule(cfg.diffusion.sample_steps if steps is None else steps)
    m = cfg.model
    stream_pass = torch.compile(model.stream_pass) if compile else model.stream_pass
    ctx_time = float(process.model_time(cfg.diffusion.ctx_level))

    @torch.no_grad()
    def step(state, noise_bhwc, cond_bhwc=None, prompt_bp=None, external_bx=None,
             ctx_eps_bhwc=None):
        batch = noise_bhwc.shape[0]
        k, v, valid = read_cache(cfg, model, state)
        kwargs = dict(cond_bhwc=cond_bhwc, prompt_bp=prompt_bp, external_bx=external_bx)

        def full(value):
            return torch.full((batch,), float(value))

        def step_b(d):
            return full(d) if m.use_step_size else None

        x = noise_bhwc
        for t, t_next, d in zip(levels[:-1], levels[1:], step_sizes, strict=True):
            pred, _, _ = stream_pass(process.network_input(x, float(t)),
                                     full(process.model_time(float(t))), k, v, valid,
                                     step_size_b=step_b(d), **kwargs)
            x = process.denoise_step(x, pred, float(t), float(t_next))
        x_ctx = context_frame(cfg, process, x, ctx_eps_bhwc)
        x_ctx = process.network_input(x_ctx, cfg.diffusion.ctx_level)
        _, k_new, v_new = stream_pass(x_ctx, full(ctx_time), k, v, valid,
                                      step_size_b=step_b(process.min_step_size), **kwargs)
        return write_cache(cfg, state, k_new, v_new), x

    return step
