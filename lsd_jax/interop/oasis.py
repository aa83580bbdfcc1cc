"""Oasis-500M as an action-conditioned world model (docs/OASIS.md "Sampling loop"), two named modes.

    cfg, model, codec = load_world_model(checkpoint)   # written by `lsd convert oasis`
    frames = generate(cfg, model, codec, start_frames_thwc, actions_tx, num_frames,
                      mode="recompute", seed=0)

Start frames (from a video or an image) are encoded by the VAE codec and kept clean; every new
frame starts from clamped Gaussian noise and takes `diffusion.sample_steps` (10) deterministic
DDIM steps on the levels `linspace(-1, 999, 11)` (reversed); history frames are fed clean and
labelled with the stabilisation level minus one (`diffusion.ctx_level = 14`); actions (25 per
frame) come from a file or are zeros, with one zero action prepended so action `i` conditions
frame `i`. Modes:

- `"recompute"`: exactly Oasis. At every denoising step the last `window` (32) frames are run
  through the network again, temporal positions counted from the start of that window.
- `"banded-cache"`: our streaming step (`lsd_jax.streaming`): each frame's keys/values are
  computed once, at its own band, and kept in the ring-buffer cache. Once the window slides, a
  cached frame's activations no longer equal what Oasis recomputes over the slid window (they saw
  frames that have left it), so this mode is not Oasis-exact past `window` frames; up to `window`
  frames the two modes agree to float tolerance (tested).

Both modes draw the noise of frame `i` from the same key chain as the streaming step
(`rng, k_noise, k_ctx = split(rng, 3)` per generated frame), so their outputs are comparable.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax.checkpoint import load_model
from lsd_jax.codec import VAECodec, make_codec, resize_and_crop
from lsd_jax.config import Config
from lsd_jax.diffusion import initial_noise, make_process
from lsd_jax.errors import ConfigError, FrameError
from lsd_jax.model import jitted_apply
from lsd_jax.streaming import context_frame, init_stream, make_latent_step, read_cache, write_cache
from lsd_jax.video import Mp4Writer

MODES = ("recompute", "banded-cache")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------- inputs


def load_start_frames(path: str | Path, count: int, height: int, width: int) -> np.ndarray:
    """The first `count` frames of a video, or an image repeated `count` times, as uint8 RGB
    `[count, height, width, 3]` (centre-cropped to the aspect, then resized)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FrameError(f"{str(path)!r} is not a readable image")
        frames = [image] * count
    else:
        capture = cv2.VideoCapture(str(path))
        frames = []
        while len(frames) < count:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
        if len(frames) < count:
            raise FrameError(f"{str(path)!r} has {len(frames)} readable frames, expected at least "
                             f"{count} start frames (or an image: {', '.join(IMAGE_SUFFIXES)})")
    rgb = [resize_and_crop(np.ascontiguousarray(f[..., ::-1]), height, width) for f in frames]
    return np.stack(rgb)


def load_actions(path: str | Path | None, num_frames: int, dim: int) -> np.ndarray:
    """Per-frame actions `[num_frames, dim]` float32: one zero action, then the file's actions
    (`.npy` of shape `[T, dim]` or `[1, T, dim]`; `.pt` with torch) for frames 1.. ; all zeros
    when `path` is None. The file must hold at least `num_frames - 1` actions."""
    zeros = np.zeros((num_frames, dim), np.float32)
    if path is None:
        return zeros
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix == ".npy":
        actions = np.load(path)
    elif path.suffix == ".pt":
        import torch

        actions = torch.load(path, map_location="cpu", weights_only=True).float().numpy()
    else:
        raise ConfigError(f"actions file {str(path)!r} has suffix {path.suffix!r}, expected .npy "
                          "or .pt")
    if actions.ndim == 3 and actions.shape[0] == 1:
        actions = actions[0]
    if actions.ndim != 2 or actions.shape[1] != dim or actions.shape[0] < num_frames - 1:
        raise ConfigError(f"actions in {str(path)!r} are {'x'.join(map(str, actions.shape))}, "
                          f"expected Tx{dim} with T >= {num_frames - 1} (frames - 1)")
    zeros[1:] = actions[: num_frames - 1]
    return zeros


def _check(cfg: Config, mode: str, prompt_frames: int, num_frames: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(map(repr, MODES))}")
    if cfg.model.cond_channels or cfg.model.prompt_dim or cfg.model.use_step_size:
        raise ConfigError(f"config {cfg.name!r} is not an Oasis-style world model: it needs "
                          "model.cond_channels=0, model.prompt_dim=0, model.use_step_size=false")
    if not 1 <= prompt_frames < num_frames:
        raise ConfigError(f"{prompt_frames} start frames for {num_frames} frames, expected "
                          "1 <= start frames < frames")


# ----------------------------------------------------------------------------- samplers


def sample_recompute(cfg: Config, model, start_bthwc, actions_btx, num_frames: int, rng):
    """Exact Oasis: for each new frame and each DDIM step, the last `window` frames (clean
    history labelled t_ctx, then the new frame) through the full forward. Returns latents
    `[b, num_frames, h, w, c]` (the start frames first)."""
    process = make_process(cfg.diffusion)
    levels, _ = process.sampling_schedule(cfg.diffusion.sample_steps)
    window = cfg.model.window
    apply = jitted_apply(model)
    batch, prompt = start_bthwc.shape[:2]
    frames = [start_bthwc[:, j] for j in range(prompt)]
    ctx_time = float(process.model_time(cfg.diffusion.ctx_level))
    for i in range(prompt, num_frames):
        rng, k_noise, k_ctx = jax.random.split(rng, 3)
        x = initial_noise(k_noise, start_bthwc[:, 0].shape)
        start = max(0, i + 1 - window)
        history = frames[start:i]
        for t, t_next in zip(levels[:-1], levels[1:], strict=True):
            time_bt = jnp.broadcast_to(jnp.asarray(
                [ctx_time] * len(history) + [float(process.model_time(t))], jnp.float32),
                (batch, len(history) + 1))
            pred = apply(jnp.stack([*history, x], 1), time_bt,
                         external_btx=actions_btx[:, start : i + 1])
            x = process.denoise_step(x, pred[:, -1], t, t_next)
        frames.append(context_frame(cfg, process, x, k_ctx))
    return jnp.stack(frames, 1)


def sample_banded_cache(cfg: Config, model, start_bthwc, actions_btx, num_frames: int, rng):
    """Our streaming step: start frames written into the ring-buffer cache at t_ctx, then one
    jitted step per new frame. Returns latents `[b, num_frames, h, w, c]`."""
    process = make_process(cfg.diffusion)
    graphdef, params = nnx.split(model)
    batch, prompt = start_bthwc.shape[:2]
    state = init_stream(cfg, batch, rng)

    @jax.jit
    def prime(params, state, x_bhwc, external_bx):
        model = nnx.merge(graphdef, params)
        time_b = jnp.full((batch,), process.model_time(cfg.diffusion.ctx_level), jnp.float32)
        _, k, v = model.stream_pass(x_bhwc, time_b, read_cache(cfg, state),
                                    external_bx=external_bx)
        return write_cache(cfg, state, k, v)

    for j in range(prompt):
        state = prime(params, state, start_bthwc[:, j], actions_btx[:, j])
    step = jax.jit(make_latent_step(cfg, graphdef), donate_argnames="state")
    frames = [start_bthwc[:, j] for j in range(prompt)]
    for i in range(prompt, num_frames):
        state, x0 = step(params, state, None, None, actions_btx[:, i])
        frames.append(x0)
    return jnp.stack(frames, 1)


SAMPLERS = {"recompute": sample_recompute, "banded-cache": sample_banded_cache}


def load_world_model(checkpoint: str | Path, overrides=()):
    """`(cfg, model, codec)` of a checkpoint written by `lsd convert oasis`: the DiT with its
    config (`overrides`: how it runs, e.g. `diffusion.sample_steps=5`) and the ViT-VAE codec
    stored beside it."""
    cfg, model = load_model(checkpoint, overrides)
    return cfg, model, make_codec(cfg, checkpoint)


def generate(cfg: Config, model, codec, start_frames_thwc: np.ndarray, actions_tx: np.ndarray,
             num_frames: int, mode: str, seed: int = 0) -> np.ndarray:
    """uint8 RGB video `[num_frames, H, W, 3]`: the start frames (re-decoded) then generated ones.

    `start_frames_thwc` uint8 `[prompt, H, W, 3]` at the codec's frame size; `actions_tx`
    `[num_frames, external_cond_dim]` (as `load_actions` returns).
    """
    prompt = start_frames_thwc.shape[0]
    _check(cfg, mode, prompt, num_frames)
    if actions_tx.shape != (num_frames, cfg.model.external_cond_dim):
        raise ConfigError(f"actions are {'x'.join(map(str, actions_tx.shape))}, expected "
                          f"{num_frames}x{cfg.model.external_cond_dim}")
    # The VAE's weights go in as arguments, not as constants baked into the compiled code.
    graphdef, vae_state = nnx.split(codec.vae)
    encode_fn = jax.jit(lambda s, f: VAECodec(nnx.merge(graphdef, s)).encode(f))
    decode_fn = jax.jit(lambda s, z: VAECodec(nnx.merge(graphdef, s)).decode(z))

    def encode(frames):
        return encode_fn(vae_state, frames)

    def decode(latents):
        return decode_fn(vae_state, latents)

    start_bthwc = jnp.stack([encode(f[None]) for f in start_frames_thwc], 1)
    latents = SAMPLERS[mode](cfg, model, start_bthwc, jnp.asarray(actions_tx)[None], num_frames,
                             jax.random.PRNGKey(seed))
    return np.stack([np.asarray(decode(latents[:, i]))[0] for i in range(num_frames)])


def write_video(path: str | Path, frames_thwc: np.ndarray, fps: float = 20.0) -> None:
    """uint8 RGB `[T, H, W, 3]` to a video file (mp4v)."""
    _, h, w, _ = frames_thwc.shape
    with Mp4Writer(path, fps, (w, h)) as video:
        for frame in frames_thwc:
            video.write(frame)
