"""Diffusion processes: rectified flow (our default) and Oasis-compatible DDPM v-prediction.

`make_process(cfg)` returns a `Process`; both kinds share one interface so training objectives and
the streaming sampler never branch on the process:

- frames are `[..., H, W, C]` and noise levels are arrays shaped like the leading dims (`level_bt`
  for `x_bthwc`), broadcast over the trailing three axes;
- levels are in the process's own units: rectified flow `t in [0, 1]` (1 = pure noise), DDPM the
  integer timestep `0 .. num_timesteps - 1` carried as float (a negative level means clean);
- `add_noise`, `target` (what the network predicts), `predict_x0`, `denoise_step` and `model_time`
  (what the network's sinusoidal noise-level embedding is fed) are pure `jnp` and jit-able;
- `sampling_schedule(n)` returns host-side numpy levels and step sizes for `n` denoising steps.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.config import DiffusionConfig

# Oasis clamps the starting noise of every sampled frame to +-20: a no-op in practice (float32
# standard normal draws stay far inside), kept so our samplers and Oasis's agree bit for bit.
INITIAL_NOISE_CLAMP = 20.0


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The noise a sampled frame starts from: float32 standard normal, clamped as Oasis does."""
    return jnp.clip(jax.random.normal(key, shape, jnp.float32), -INITIAL_NOISE_CLAMP,
                    INITIAL_NOISE_CLAMP)


def _expand(level: jax.Array, x: jax.Array) -> jax.Array:
    """Level shaped like the leading dims of `x` -> broadcastable over its trailing [H, W, C]."""
    return jnp.asarray(level, x.dtype)[..., None, None, None]


class Process(abc.ABC):
    """One diffusion process. Attributes: `name`, `max_level` (pure noise), `ctx_level` (history
    level t_ctx used while streaming), `min_step_size` (the smallest step the network is trained
    at, fed to step-size conditioning for plain denoising)."""

    name: str
    max_level: float
    ctx_level: float
    min_step_size: float

    @abc.abstractmethod
    def add_noise(self, x0: jax.Array, eps: jax.Array, level: jax.Array) -> jax.Array:
        """Noised frames `x_t` at `level` from clean `x0` and standard normal `eps`."""

    @abc.abstractmethod
    def target(self, x0: jax.Array, eps: jax.Array, level: jax.Array) -> jax.Array:
        """What the network is trained to predict for `add_noise(x0, eps, level)`."""

    @abc.abstractmethod
    def predict_x0(self, x_t: jax.Array, pred: jax.Array, level: jax.Array) -> jax.Array:
        """Clean-frame estimate from noised frames and the network's prediction."""

    @abc.abstractmethod
    def denoise_step(self, x_t: jax.Array, pred: jax.Array, level: jax.Array,
                     next_level: jax.Array) -> jax.Array:
        """One deterministic sampler step from `level` down to `next_level`."""

    @abc.abstractmethod
    def model_time(self, level: jax.Array) -> jax.Array:
        """The value fed to the network's sinusoidal noise-level embedding."""

    @abc.abstractmethod
    def signal_scale(self, level: jax.Array) -> jax.Array:
        """The weight of the clean frame in `add_noise` (1 - t; sqrt(abar) for DDPM)."""

    def network_input(self, x_t: jax.Array, level: jax.Array) -> jax.Array:
        """What the network is fed for noised frames `x_t` at `level`: `x_t` itself
        (`diffusion.input_scale="unit"`), or `x_t` times the clean frame's weight ("signal"), so
        pure noise enters as zeros and the first of a few sampling steps predicts from the input
        frame and the history alone, with nothing of the starting noise to copy."""
        if self.input_scale == "unit":
            return x_t
        return x_t * _expand(self.signal_scale(level), x_t)

    @abc.abstractmethod
    def sampling_schedule(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """`(levels [n+1], step_sizes [n])` float32 numpy, from pure noise down to clean."""

    @abc.abstractmethod
    def sample_levels(self, rng: jax.Array, shape: tuple[int, ...],
                      high: float | None = None) -> jax.Array:
        """Uniform training levels in `[0, high]` (default `max_level`), float32 of `shape`."""


class RectifiedFlow(Process):
    """`x_t = (1 - t) x0 + t eps`; Euler sampling on the shortcut-model schedule of power-of-two
    step sizes.

    `diffusion.prediction` says what the network outputs: "velocity" (`eps - x0`, the default and
    Oasis-style choice) or "x0" (the clean frame; the velocity is then `(x_t - x0) / t`, and the
    loss is the x0 regression error). With "x0" the network never has to reproduce the noise in
    its output, which a small network does poorly: on a deterministic paired task the prediction
    can ignore the noise altogether.
    """

    name = "rectified_flow"
    max_level = 1.0

    def __init__(self, cfg: DiffusionConfig):
        self.ctx_level = float(cfg.ctx_level)
        self.min_step_size = 1.0 / cfg.shortcut_max_steps
        self.prediction = cfg.prediction
        self.level_shift = float(cfg.level_shift)
        self.input_scale = cfg.input_scale

    def add_noise(self, x0, eps, level):
        t = _expand(level, x0)
        return (1.0 - t) * x0 + t * eps

    def target(self, x0, eps, level):
        return x0 if self.prediction == "x0" else eps - x0

    def predict_x0(self, x_t, pred, level):
        if self.prediction == "x0":
            return pred
        return x_t - _expand(level, x_t) * pred

    def denoise_step(self, x_t, pred, level, next_level):
        level, next_level = jnp.asarray(level), jnp.asarray(next_level)
        if self.prediction == "x0":
            # The Euler step along v = (x_t - x0) / t: x_next = x0 + (t_next / t) (x_t - x0).
            ratio = _expand(next_level / level, x_t)
            return pred + ratio * (x_t - pred)
        return x_t - _expand(level - next_level, x_t) * pred

    def output_for_step(self, x_t, x_end, level, step):
        """The network output whose single step of size `step` from `x_t` at `level` lands on
        `x_end` (the shortcut target's form in the network's output space)."""
        step_x = _expand(step, x_t)
        if self.prediction == "x0":
            t = _expand(level, x_t)
            return (t * x_end - (t - step_x) * x_t) / step_x
        return (x_t - x_end) / step_x

    def model_time(self, level):
        # The embedding's frequencies were designed for integer timesteps 0..999 (DiT, Oasis).
        return jnp.asarray(level, jnp.float32) * 1000.0

    def signal_scale(self, level):
        return 1.0 - jnp.asarray(level, jnp.float32)

    def sampling_schedule(self, n_steps):
        """Shortcut-model schedule: start from one step of size 1 and repeatedly split the largest
        step in two until there are `n_steps`; sizes sorted largest first, so every step size is a
        power of two the network was trained at and the levels (1 -> 0) are exact in float32."""
        if not 1 <= n_steps <= 128:
            raise ValueError(f"n_steps={n_steps}, expected 1..128 for rectified flow")
        # Splitting the largest step leaves sizes 2^-k and 2^-(k+1) only: k = floor(log2 n).
        k = n_steps.bit_length() - 1
        n_small = 2 * (n_steps - 2**k)
        n_large = n_steps - n_small
        step_sizes = np.array([2.0**-k] * n_large + [2.0 ** -(k + 1)] * n_small, np.float64)
        levels = 1.0 - np.concatenate([[0.0], np.cumsum(step_sizes)])
        return levels.astype(np.float32), step_sizes.astype(np.float32)

    def sample_levels(self, rng, shape, high=None):
        """Uniform `u` in `[0, high]`, time-shifted by `s = diffusion.level_shift` to
        `s u / (1 + (s - 1) u)` (s > 1 trains more at high noise, where the first of a few
        sampling steps starts; `s = 1` is uniform; 0 and 1 stay fixed)."""
        high = self.max_level if high is None else high
        u = jax.random.uniform(rng, shape, jnp.float32, 0.0, high)
        if self.level_shift == 1.0:
            return u
        s = self.level_shift
        return s * u / (1.0 + (s - 1.0) * u)


def sigmoid_alphas_cumprod(num_timesteps: int, start: float, end: float, tau: float) -> np.ndarray:
    """`abar [num_timesteps]` float64 of the sigmoid beta schedule (Oasis, Jabri et al. 2022)."""
    t = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64) / num_timesteps

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    abar = (-sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    abar = abar / abar[0]
    betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


class DDPMV(Process):
    """DDPM with v-prediction and deterministic DDIM sampling, as Oasis (docs/OASIS.md).

    `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`, `v = sqrt(abar) eps - sqrt(1 - abar) x0`; integer
    levels index `alphas_cumprod`; a negative level means `abar = 1` (clean).
    """

    name = "ddpm_v"
    min_step_size = 1.0

    def __init__(self, cfg: DiffusionConfig):
        self.num_timesteps = cfg.num_timesteps
        self.input_scale = cfg.input_scale
        self.max_level = float(cfg.num_timesteps - 1)
        self.ctx_level = float(cfg.ctx_level)
        self.alphas_cumprod = sigmoid_alphas_cumprod(
            cfg.num_timesteps, cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_tau,
        ).astype(np.float32)

    def abar(self, level: jax.Array) -> jax.Array:
        """`alphas_cumprod` at integer-valued `level` (rounded, so float noise cannot shift the
        index); 1 where `level < 0`."""
        level = jnp.asarray(level, jnp.float32)
        index = jnp.clip(jnp.round(level), 0, self.num_timesteps - 1).astype(jnp.int32)
        return jnp.where(level < 0, 1.0, jnp.asarray(self.alphas_cumprod)[index])

    def add_noise(self, x0, eps, level):
        a = _expand(self.abar(level), x0)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps

    def target(self, x0, eps, level):
        a = _expand(self.abar(level), x0)
        return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0

    def predict_x0(self, x_t, pred, level):
        a = _expand(self.abar(level), x_t)
        return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * pred

    def denoise_step(self, x_t, pred, level, next_level):
        """Oasis's DDIM step, formula for formula; `level` must be >= 0, `next_level < 0` returns
        the clean estimate x0."""
        a = _expand(self.abar(level), x_t)
        a_next = _expand(self.abar(next_level), x_t)
        x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * pred
        eps = (x_t / jnp.sqrt(a) - x0) / jnp.sqrt(1.0 / a - 1.0)
        return jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps

    def model_time(self, level):
        # Oasis feeds the raw integer timestep to its embedding.
        return jnp.asarray(level, jnp.float32)

    def signal_scale(self, level):
        return jnp.sqrt(self.abar(level))

    def sampling_schedule(self, n_steps):
        """Oasis `noise_range = linspace(-1, T-1, n+1)`, reversed (T-1 -> -1) and truncated to
        integers as Oasis's `.long()` does; step sizes are ones (DDIM has no step conditioning)."""
        if not 1 <= n_steps <= self.num_timesteps:
            raise ValueError(f"n_steps={n_steps}, expected 1..{self.num_timesteps} for DDPM")
        levels = np.trunc(np.linspace(-1, self.num_timesteps - 1, n_steps + 1))[::-1]
        return levels.astype(np.float32), np.ones(n_steps, np.float32)

    def sample_levels(self, rng, shape, high=None):
        high = self.max_level if high is None else high
        return jax.random.randint(rng, shape, 0, int(high) + 1).astype(jnp.float32)


def make_process(cfg: DiffusionConfig) -> Process:
    """The process named by `cfg.process`."""
    if cfg.process == "rectified_flow":
        return RectifiedFlow(cfg)
    if cfg.process == "ddpm_v":
        return DDPMV(cfg)
    raise ValueError(f"diffusion.process={cfg.process!r}, expected 'rectified_flow' or 'ddpm_v'")
