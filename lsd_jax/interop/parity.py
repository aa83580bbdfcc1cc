"""Parity of the JAX model with the PyTorch reference (`lsd parity`), given the same weights. Needs
torch (the `torch` extra).

    models = build_pair(cfg, torch_checkpoint=None, seed=0)   # random weights unless a file
    results = run_parity(cfg, models)                         # list of CheckResult

Checks, all on the same random inputs and the same noise for both implementations:
- `forward`: the banded full-clip forward over `2 * window` frames (float32, rel <= 1e-5);
- `trajectory`: the plain autoregressive sampler (`streaming.reference_sample`, no cache) over
  `window + 1` frames with the config's sampler (rel <= 1e-4: a composite of many passes);
- `loss`: one Diffusion Forcing training-loss evaluation (`objectives.loss_fn` with shortcut
  clips and history augmentation off, which the torch reference does not implement) (<= 1e-5);
- `streaming`: the jitted streaming step against the torch streaming step over `3 * window`
  frames, ring-buffer cache in both (rel <= 1e-5).

Noise: JAX draws it from keys (`reference_sample` and the streaming step split their key per
frame as `rng, k_noise, k_ctx = split(rng, 3)`); `frame_noise` replays those draws in numpy for
torch. Relative error is `max|jax - torch| / max|torch|`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from lsd_jax.config import Config
from lsd_jax.diffusion import initial_noise, make_process
from lsd_jax.interop.convert import (
    dit_from_torch,
    dit_torch_shapes,
    load_state_dict,
    random_state_dict,
    to_numpy,
)
from lsd_jax.interop.torch_ref import streaming as torch_streaming
from lsd_jax.interop.torch_ref.diffusion import flow_matching_loss
from lsd_jax.interop.torch_ref.diffusion import reference_sample as torch_reference_sample
from lsd_jax.interop.torch_ref.dit import TorchDiT
from lsd_jax.model import jitted_apply, model_from_params
from lsd_jax.objectives import apply_model, loss_fn, sample_noise_levels
from lsd_jax.streaming import init_stream, make_latent_step, reference_sample

TOLERANCES = {"forward": 1e-5, "trajectory": 1e-4, "loss": 1e-5, "streaming": 1e-5}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    max_abs: float
    rel: float
    tol: float
    detail: str

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel)) and self.rel <= self.tol

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def compare(name: str, jax_value, torch_value, detail: str) -> CheckResult:
    a = np.asarray(jax_value, np.float64)
    b = np.asarray(torch_value.detach().numpy() if hasattr(torch_value, "detach") else torch_value,
                   np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: JAX result is {a.shape}, torch result is {b.shape}")
    max_abs = float(np.abs(a - b).max())
    return CheckResult(name, max_abs, max_abs / float(np.abs(b).max()), TOLERANCES[name], detail)


@dataclasses.dataclass
class ModelPair:
    jax_model: object
    torch_model: object
    source: str


def build_pair(cfg: Config, torch_checkpoint: str | Path | None = None, seed: int = 0,
               gain: float = 0.7) -> ModelPair:
    """The JAX DiT and the torch reference holding the same weights: those of
    `torch_checkpoint` (a torch state dict with Oasis names, `.safetensors` or `.pt`), or random
    ones (`random_state_dict`)."""
    if torch_checkpoint is None:
        state_dict = random_state_dict(dit_torch_shapes(cfg.model), seed, gain)
        source = f"random weights (seed {seed})"
    else:
        state_dict = load_state_dict(torch_checkpoint)
        source = str(torch_checkpoint)
    jax_model = model_from_params(cfg.model, dit_from_torch(cfg.model, state_dict, source))
    torch_model = TorchDiT(cfg.model)
    # Strict load, with the rotary entries a real Oasis file may hold left out (recomputed).
    torch_model.load_state_dict({k: torch.from_numpy(np.array(to_numpy(v), np.float32))
                                 for k, v in state_dict.items()
                                 if not k.endswith("rotary_emb.freqs")})
    return ModelPair(jax_model, torch_model.eval(), source)


def random_conditioning(cfg: Config, rng: np.random.Generator, batch: int, frames: int) -> dict:
    """Input frames, prompt embeddings and external vectors the config needs (numpy, or None)."""
    m = cfg.model
    return {
        "cond_bthwc": (rng.uniform(-1, 1, (batch, frames, m.frame_height, m.frame_width,
                                           m.cond_channels)).astype(np.float32)
                       if m.cond_channels else None),
        "prompt_bp": (rng.standard_normal((batch, m.prompt_dim)).astype(np.float32)
                      if m.prompt_dim else None),
        "external_btx": (rng.standard_normal((batch, frames, m.external_cond_dim))
                         .astype(np.float32) if m.external_cond_dim else None),
    }


def frame_noise(rng, batch: int, frame_shape, frames: int, *, fixed: bool = False):
    """`(noise_tbhwc, ctx_eps_tbhwc)` numpy: the initial noise and context noise the streaming
    step and `reference_sample` draw from key `rng` for `frames` frames (`fixed`: with
    `diffusion.frame_noise="fixed"`, the key does not advance)."""
    noise, ctx_eps = [], []
    for _ in range(frames):
        rng_next, k_noise, k_ctx = jax.random.split(rng, 3)
        rng = rng if fixed else rng_next
        noise.append(initial_noise(k_noise, (batch, *frame_shape)))
        ctx_eps.append(jax.random.normal(k_ctx, (batch, *frame_shape), jnp.float32))
    return np.asarray(jnp.stack(noise)), np.asarray(jnp.stack(ctx_eps))


def _torch(a):
    return None if a is None else torch.from_numpy(np.array(a))


def _frame(a, i: int):
    """Frame `i` of per-frame inputs `[b, t, ...]` (None stays None)."""
    return None if a is None else a[:, i]


def _jnp(a):
    return None if a is None else jnp.asarray(a)


def _time_steps(cfg: Config, batch: int, frames: int, rng: np.random.Generator):
    """Random per-frame network inputs: model time of a random level and a shortcut step size."""
    process = make_process(cfg.diffusion)
    level_bt = np.asarray(process.sample_levels(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                                                (batch, frames)))
    time_bt = np.asarray(process.model_time(level_bt), np.float32)
    step_bt = (2.0 ** -rng.integers(0, 7, (batch, frames))).astype(np.float32)
    return time_bt, step_bt if cfg.model.use_step_size else None


def check_forward(cfg: Config, pair: ModelPair, seed: int = 0, batch: int = 2) -> CheckResult:
    rng = np.random.default_rng(seed)
    frames = 2 * cfg.model.window
    x = rng.standard_normal((batch, frames, *cfg.model.frame_shape)).astype(np.float32)
    time_bt, step_bt = _time_steps(cfg, batch, frames, rng)
    cond = random_conditioning(cfg, rng, batch, frames)
    out_jax = jitted_apply(pair.jax_model)(
        jnp.asarray(x), jnp.asarray(time_bt), step_size_bt=_jnp(step_bt),
        **{k: _jnp(v) for k, v in cond.items()})
    with torch.no_grad():
        out_torch = pair.torch_model(_torch(x), _torch(time_bt), step_size_bt=_torch(step_bt),
                                     **{k: _torch(v) for k, v in cond.items()})
    return compare("forward", out_jax, out_torch,
                   f"{batch} clips x {frames} frames (window {cfg.model.window})")


def check_trajectory(cfg: Config, pair: ModelPair, seed: int = 0, batch: int = 1,
                     frames: int | None = None) -> CheckResult:
    frames = cfg.model.window + 1 if frames is None else frames
    cond = random_conditioning(cfg, np.random.default_rng(seed), batch, frames)
    key = jax.random.PRNGKey(seed)
    out_jax = reference_sample(cfg, jitted_apply(pair.jax_model), key, _jnp(cond["cond_bthwc"]),
                               prompt_bp=_jnp(cond["prompt_bp"]),
                               external_btx=_jnp(cond["external_btx"]))
    noise, ctx_eps = frame_noise(key, batch, cfg.model.frame_shape, frames,
                                 fixed=cfg.diffusion.frame_noise == "fixed")
    out_torch = torch_reference_sample(cfg, pair.torch_model, _torch(noise), _torch(ctx_eps),
                                       **{k: _torch(v) for k, v in cond.items()})
    return compare("trajectory", out_jax, out_torch,
                   f"{frames} frames x {cfg.diffusion.sample_steps} {cfg.diffusion.process} steps,"
                   " full forward re-run every step")


def loss_config(cfg: Config) -> Config:
    """`cfg` with the parts of the objective the torch reference lacks turned off."""
    diffusion = dataclasses.replace(
        cfg.diffusion, shortcut=False,
        history_aug=dataclasses.replace(cfg.diffusion.history_aug, enabled=False))
    return dataclasses.replace(cfg, diffusion=diffusion)


def check_loss(cfg: Config, pair: ModelPair, seed: int = 0, batch: int = 2) -> CheckResult:
    cfg = loss_config(cfg)
    process = make_process(cfg.diffusion)
    rng = np.random.default_rng(seed)
    frames = cfg.model.window
    x0 = rng.uniform(-1, 1, (batch, frames, *cfg.model.frame_shape)).astype(np.float32)
    cond = random_conditioning(cfg, rng, batch, frames)
    batch_dict = {"target": jnp.asarray(x0), "cond": _jnp(cond["cond_bthwc"]),
                  "prompt": _jnp(cond["prompt_bp"]), "external": _jnp(cond["external_btx"])}
    graphdef, params, rest = nnx.split(pair.jax_model, nnx.Param, ...)
    model_apply = functools.partial(apply_model, graphdef, rest_state=rest)
    key = jax.random.PRNGKey(seed)
    loss_jax, _ = jax.jit(lambda p, b, k: loss_fn(model_apply, p, b, k, cfg, process))(
        params, batch_dict, key)
    # `training_targets` splits its key as (levels, eps, augmentation, shortcut).
    k_level, k_eps, _, _ = jax.random.split(key, 4)
    level_bt = sample_noise_levels(cfg.diffusion.noise_sampler, k_level, batch, frames, process,
                                   cfg.diffusion)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    loss_torch = flow_matching_loss(cfg, pair.torch_model, _torch(x0), _torch(eps),
                                    _torch(level_bt), **{k: _torch(v) for k, v in cond.items()})
    return compare("loss", loss_jax, loss_torch,
                   f"{cfg.diffusion.process}, {cfg.diffusion.noise_sampler} levels, {batch} clips x"
                   f" {frames} frames (no shortcut, no history augmentation)")


def check_streaming(cfg: Config, pair: ModelPair, seed: int = 0, batch: int = 2,
                    frames: int | None = None) -> CheckResult:
    frames = 3 * cfg.model.window if frames is None else frames
    cond = random_conditioning(cfg, np.random.default_rng(seed), batch, frames)
    key = jax.random.PRNGKey(seed)

    graphdef, state_params = nnx.split(pair.jax_model)
    step = jax.jit(make_latent_step(cfg, graphdef), donate_argnames="state")
    state = init_stream(cfg, batch, key)
    out_jax = []
    for i in range(frames):
        state, x0 = step(state_params, state, _jnp(_frame(cond["cond_bthwc"], i)),
                         _jnp(cond["prompt_bp"]), _jnp(_frame(cond["external_btx"], i)))
        out_jax.append(np.asarray(x0))

    noise, ctx_eps = frame_noise(key, batch, cfg.model.frame_shape, frames,
                                 fixed=cfg.diffusion.frame_noise == "fixed")
    torch_step = torch_streaming.make_stream_step(cfg, pair.torch_model)
    torch_state = torch_streaming.init_stream(cfg, batch)
    out_torch = []
    for i in range(frames):
        torch_state, x0 = torch_step(torch_state, _torch(noise[i]),
                                     _torch(_frame(cond["cond_bthwc"], i)),
                                     _torch(cond["prompt_bp"]),
                                     _torch(_frame(cond["external_btx"], i)), _torch(ctx_eps[i]))
        out_torch.append(x0.numpy())
    return compare("streaming", np.stack(out_jax, 1), np.stack(out_torch, 1),
                   f"{batch} streams x {frames} frames, {cfg.diffusion.sample_steps} steps + "
                   f"cache write, ring of {cfg.model.window - 1}")


CHECKS = {"forward": check_forward, "trajectory": check_trajectory, "loss": check_loss,
          "streaming": check_streaming}


def run_parity(cfg: Config, pair: ModelPair, seed: int = 0, checks=tuple(CHECKS)) -> list:
    return [CHECKS[name](cfg, pair, seed=seed) for name in checks]


# ----------------------------------------------------------------------------- speed


def _summary(latencies_s) -> dict:
    return {"p50": 1e3 * float(np.percentile(latencies_s, 50)),
            "mean": 1e3 * float(np.mean(latencies_s)),
            "min": 1e3 * float(np.min(latencies_s))}


def bench_parity_speed(cfg: Config, *, frames: int = 50, warmup: int = 5, batch: int = 1,
                       steps: int | None = None, threads: int | None = None, seed: int = 0,
                       with_compile: bool = True, interleave: bool = True) -> dict:
    """Per-frame latency of the jitted JAX streaming step and of the torch reference step doing
    the same work (same weights, same config, same cache; model space in and out, no codec):
    torch eager, and `torch.compile` of the stream pass where it works. Every frame blocks on its
    result; the implementations take turns frame by frame (`interleave`) or run one after the
    other. `threads` (default: all CPUs) is given to torch; XLA's CPU client uses all CPUs."""
    threads = os.cpu_count() if threads is None else threads
    torch.set_num_threads(threads)
    steps = cfg.diffusion.sample_steps if steps is None else steps
    pair = build_pair(cfg, seed=seed)
    pool = 8
    cond = random_conditioning(cfg, np.random.default_rng(seed), batch, pool)

    graphdef, params = nnx.split(pair.jax_model)
    step = jax.jit(make_latent_step(cfg, graphdef, steps=steps), donate_argnames="state")
    jax_inputs = [(_jnp(_frame(cond["cond_bthwc"], i)), _jnp(cond["prompt_bp"]),
                   _jnp(_frame(cond["external_btx"], i))) for i in range(pool)]
    state = init_stream(cfg, batch, seed)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, *jax_inputs[0]).compile()
    jax_compile_s = time.perf_counter() - t0

    def run_jax(i):
        nonlocal state
        state, x0 = compiled(params, state, *jax_inputs[i % pool])
        jax.block_until_ready(x0)

    runners = {"jax_jit": run_jax}
    results = {"jax_jit": {"compile_s": jax_compile_s}}

    noise, ctx_eps = torch.randn(2, pool, batch, *cfg.model.frame_shape)
    torch_inputs = [(noise[i], _torch(_frame(cond["cond_bthwc"], i)), _torch(cond["prompt_bp"]),
                     _torch(_frame(cond["external_btx"], i)), ctx_eps[i]) for i in range(pool)]
    variants = [("torch_eager", False)] + ([("torch_compile", True)] if with_compile else [])
    for name, use_compile in variants:
        torch_step = torch_streaming.make_stream_step(cfg, pair.torch_model, steps=steps,
                                                      compile=use_compile)
        torch_states = [torch_streaming.init_stream(cfg, batch)]

        def run_torch(i, torch_step=torch_step, torch_states=torch_states):
            torch_states[0], _ = torch_step(torch_states[0], *torch_inputs[i % pool])

        try:
            t0 = time.perf_counter()
            run_torch(0)
            results[name] = {"first_frame_s": time.perf_counter() - t0}
            runners[name] = run_torch
        except Exception as err:  # torch.compile needs a C++ toolchain; report why it failed
            if not use_compile:
                raise
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}

    # Interleaved (one frame of each per round) every implementation meets the same background
    # load on a shared machine, but torch's OpenMP workers keep spinning after each torch frame
    # and slow the JAX frame after it; one implementation at a time avoids that on an idle one.
    latencies = {name: [] for name in runners}
    rounds = [list(runners.items())] * (warmup + frames) if interleave else [
        [item] * (warmup + frames) for item in runners.items()]
    for i, turns in enumerate(rounds):
        for j, (name, run) in enumerate(turns):
            frame = i if interleave else j
            t0 = time.perf_counter()
            run(frame)
            if frame >= warmup:
                latencies[name].append(time.perf_counter() - t0)
    for name, values in latencies.items():
        results[name].update(_summary(values))
    jax_p50 = results["jax_jit"]["p50"]
    ratios = {f"{name}_over_jax": results[name]["p50"] / jax_p50
              for name, _ in variants if "p50" in results[name]}
    device = jax.devices()[0]
    return {
        "config": cfg.name, "steps": steps, "batch": batch, "frames": frames, "warmup": warmup,
        "frame_shape": list(cfg.model.frame_shape), "threads_torch": threads,
        "cpu_count": os.cpu_count(), "device": f"{device.platform} ({device.device_kind})",
        "order": "interleaved" if interleave else "sequential",
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "ms_per_frame": results, "ratios_p50": ratios,
        "goal_2x_eager": ratios.get("torch_eager_over_jax", 0.0) >= 2.0,
        "goal_faster_than_compile": (ratios["torch_compile_over_jax"] > 1.0
                                     if "torch_compile_over_jax" in ratios else None),
    }
