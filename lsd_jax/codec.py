"""Frames <-> model space (docs/DESIGN.md section 5): one interface for every codec.

A codec turns uint8 RGB frames `[..., H, W, 3]` (the stream's pixels) into the model's frame space
`[..., h, w, c]` float32 and back. `encode`/`decode` are pure `jnp`, so they run inside the jitted
streaming step; the shape and dtype checks are on static shapes, so they also run at trace time.

- `PixelCodec`: the model space is the pixel grid itself, RGB mapped to `[-1, 1]` (small configs).
- `oasis_vae`: the Oasis ViT-VAE (360x640 frames -> 16x18x32 latents), `VAECodec` over
  `lsd_jax.vae.OasisVAE`, loaded from a checkpoint written by `lsd convert oasis`
  (`make_codec(cfg, checkpoint)`).

`resize_and_crop` fits a camera or video frame of any size to the codec's frame size on the host.
"""

from __future__ import annotations

import cv2
import jax.numpy as jnp
import numpy as np

from lsd_jax.config import Config
from lsd_jax.errors import CodecUnavailableError, FrameError


def _describe(shape, dtype) -> str:
    return f"{'x'.join(map(str, shape))} {np.dtype(dtype).name}"


def check_frames(frames, expected_hw: tuple[int, int]):
    """Check uint8 RGB frames `[..., H, W, 3]` against `expected_hw = (H, W)`; return them.

    Raises `FrameError` naming the frame's shape and dtype and the expected ones, e.g.
    `frame is 480x640x4 uint8, expected 64x64x3 uint8`. Leading (batch, time) axes are free.
    """
    shape = tuple(frames.shape)
    expected = (*expected_hw, 3)
    if shape[-3:] == expected and np.dtype(frames.dtype) == np.uint8:
        return frames
    if len(shape) <= 3:
        raise FrameError(f"frame is {_describe(shape, frames.dtype)}, "
                         f"expected {_describe(expected, np.uint8)}")
    lead = shape[:-3]
    raise FrameError(f"frames are {_describe(shape, frames.dtype)}, "
                     f"expected {_describe((*lead, *expected), np.uint8)}")


class PixelCodec:
    """Pixel-space codec: uint8 RGB `[..., H, W, 3]` <-> float32 `[..., H, W, 3]` in `[-1, 1]`.

    `decode` rounds to the nearest level and clips, so `decode(encode(frames)) == frames` exactly.
    """

    name = "pixel"

    def __init__(self, height: int, width: int):
        self.frame_hw = (height, width)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """The uint8 frame a stream must deliver: `(H, W, 3)`."""
        return (*self.frame_hw, 3)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The model-space frame: `(H, W, 3)` (the pixel grid itself)."""
        return (*self.frame_hw, 3)

    @property
    def params(self) -> dict:
        """The codec's weights: none."""
        return {}

    def bind(self, params) -> PixelCodec:
        """This codec (it has no weights to bind)."""
        return self

    def encode(self, frames_uint8):
        """uint8 `[..., H, W, 3]` -> float32 `[..., H, W, 3]` in `[-1, 1]`."""
        check_frames(frames_uint8, self.frame_hw)
        return jnp.asarray(frames_uint8, jnp.float32) / 127.5 - 1.0

    def decode(self, x):
        """float `[..., H, W, 3]` (any range) -> uint8 `[..., H, W, 3]`, rounded and clipped."""
        levels = jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5)
        return jnp.clip(levels, 0, 255).astype(jnp.uint8)


class VAECodec:
    """The `oasis_vae` codec: uint8 `[..., H, W, 3]` <-> scaled latents `[..., gh, gw, c]`.

    Same interface as `PixelCodec` (`frame_hw`, `frame_shape`, `latent_shape`,
    `encode`, `decode`, pure `jnp`); `decode` maps `[-1, 1]` to uint8 by rounding and clipping.
    `params` are the VAE's weights and `bind(params)` the codec computing with `params` instead:
    a jitted step takes the weights as an argument and binds them inside (`make_step`), so they
    are not folded into the compiled program as constants.
    """

    name = "oasis_vae"

    def __init__(self, vae):  # lsd_jax.vae.OasisVAE
        from flax import nnx

        self.vae = vae
        self.cfg = vae.cfg
        self._graphdef, self._params = nnx.split(vae)

    @property
    def params(self):
        """The VAE's weights (an `nnx.State`)."""
        return self._params

    def bind(self, params) -> VAECodec:
        """The codec computing with `params` (a state of this VAE's structure, e.g. traced)."""
        from flax import nnx

        return VAECodec(nnx.merge(self._graphdef, params))

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.cfg.frame_height, self.cfg.frame_width

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (*self.frame_hw, 3)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.cfg.grid, self.cfg.latent_dim)

    def encode(self, frames_uint8):
        check_frames(frames_uint8, self.frame_hw)
        lead = frames_uint8.shape[:-3]
        x = jnp.asarray(frames_uint8, jnp.float32).reshape(-1, *self.frame_shape) / 127.5 - 1.0
        return (self.vae.encode(x) * self.cfg.scaling_factor).reshape(*lead, *self.latent_shape)

    def decode(self, latent):
        lead = latent.shape[:-3]
        z = jnp.asarray(latent, jnp.float32).reshape(-1, *self.latent_shape)
        x = self.vae.decode(z / self.cfg.scaling_factor).reshape(*lead, *self.frame_shape)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def load_codec(directory) -> VAECodec:
    """The `oasis_vae` codec of a checkpoint directory written by `lsd convert oasis`."""
    from lsd_jax.vae import load_vae  # lazy: Flax; the pixel codec and artifacts run without it

    return VAECodec(load_vae(directory))


def make_codec(cfg: Config, checkpoint=None) -> PixelCodec | VAECodec:
    """The codec `cfg.codec` names, sized for `cfg.model`. `oasis_vae` is the ViT-VAE stored in
    the model checkpoint directory `checkpoint` by `lsd convert oasis` (`VAECodec`)."""
    if cfg.codec == "pixel":
        return PixelCodec(cfg.model.frame_height, cfg.model.frame_width)
    if cfg.codec == "oasis_vae":
        if checkpoint is not None:
            return load_codec(checkpoint)
        raise CodecUnavailableError(
            "codec 'oasis_vae' (the Oasis ViT-VAE: 360x640 frames -> 16x18x32 latents) needs the "
            "converted vit-l-20 weights: a checkpoint written by `lsd convert oasis`, or use a "
            "pixel-space config such as lsd_configs/tiny.py")
    raise CodecUnavailableError(f"codec {cfg.codec!r} is not one of 'pixel', 'oasis_vae'")


def resize_and_crop(frame_hwc, height: int, width: int) -> np.ndarray:
    """Centre-crop a uint8 `[h, w, 3]` frame to the aspect of `height x width`, then resize.

    Returns uint8 `[height, width, 3]`. Area interpolation when shrinking (no aliasing), linear
    when enlarging.
    """
    frame_hwc = np.asarray(frame_hwc)
    if frame_hwc.ndim != 3 or frame_hwc.shape[-1] != 3 or frame_hwc.dtype != np.uint8:
        raise FrameError(f"frame is {_describe(frame_hwc.shape, frame_hwc.dtype)}, "
                         "expected HxWx3 uint8")
    src_h, src_w = frame_hwc.shape[:2]
    # Compare aspects with integer cross-multiplication so equal aspects never crop a pixel.
    if src_w * height > width * src_h:
        crop_w = max(1, round(src_h * width / height))
        x0 = (src_w - crop_w) // 2
        frame_hwc = frame_hwc[:, x0 : x0 + crop_w]
    elif src_w * height < width * src_h:
        crop_h = max(1, round(src_w * height / width))
        y0 = (src_h - crop_h) // 2
        frame_hwc = frame_hwc[y0 : y0 + crop_h]
    if frame_hwc.shape[:2] == (height, width):
        return np.ascontiguousarray(frame_hwc)
    shrinking = frame_hwc.shape[0] > height
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(frame_hwc), (width, height), interpolation=interpolation)
