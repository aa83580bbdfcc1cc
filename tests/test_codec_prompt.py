"""Frame codec (uint8 <-> model space, checks, resize) and prompt encoders."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lsd_jax.codec import PixelCodec, check_frames, make_codec, resize_and_crop
from lsd_jax.config import apply_overrides
from lsd_jax.errors import CodecUnavailableError, FrameError, PromptError
from lsd_jax.prompt import HashedPromptEncoder, PrecomputedPromptEncoder, make_prompt_encoder

# ----------------------------------------------------------------------------- codec


def test_pixel_round_trip_is_exact(np_rng):
    codec = PixelCodec(64, 48)
    frames = np_rng.integers(0, 256, (2, 3, 64, 48, 3), dtype=np.uint8)
    x = codec.encode(frames)
    assert x.dtype == np.float32 and x.shape == frames.shape
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(codec.decode(x)), frames)


def test_pixel_encode_endpoints_and_decode_rounds_and_clips():
    codec = PixelCodec(1, 3)
    x = np.asarray(codec.encode(np.array([[[0, 128, 255]] * 3], np.uint8).transpose(0, 2, 1)))
    np.testing.assert_allclose(x[0, :, 0], [-1.0, 128 / 127.5 - 1.0, 1.0], rtol=0, atol=1e-7)
    # 0.3 of a level rounds down, 0.7 rounds up; out-of-range values clip to 0 and 255.
    levels = np.array([10.3, 10.7, -5.0, 300.0, 0.0, 255.0], np.float32)
    decoded = np.asarray(codec.decode(levels / 127.5 - 1.0))
    np.testing.assert_array_equal(decoded, [10, 11, 0, 255, 0, 255])
    assert decoded.dtype == np.uint8


def test_pixel_codec_runs_under_jit(np_rng):
    codec = PixelCodec(8, 8)
    frames = np_rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    out = jax.jit(lambda f: codec.decode(codec.encode(f)))(frames)
    np.testing.assert_array_equal(np.asarray(out), frames)


@pytest.mark.parametrize("shape, dtype, message", [
    ((480, 640, 4), np.uint8, "frame is 480x640x4 uint8, expected 64x64x3 uint8"),
    ((64, 64, 3), np.float32, "frame is 64x64x3 float32, expected 64x64x3 uint8"),
    ((64, 64), np.uint8, "frame is 64x64 uint8, expected 64x64x3 uint8"),
    ((2, 32, 64, 3), np.uint8, "frames are 2x32x64x3 uint8, expected 2x64x64x3 uint8"),
])
def test_bad_frames_are_named(shape, dtype, message):
    with pytest.raises(FrameError) as err:
        check_frames(np.ones(shape, dtype), (64, 64))
    assert str(err.value) == message
    with pytest.raises(FrameError):
        PixelCodec(64, 64).encode(np.ones(shape, dtype))


def test_check_frames_returns_good_frames(np_rng):
    frames = np_rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    assert check_frames(frames, (64, 64)) is frames


def test_make_codec(tiny_cfg):
    codec = make_codec(tiny_cfg)
    assert isinstance(codec, PixelCodec)
    assert codec.frame_shape == (64, 64, 3) == codec.latent_shape
    vae_cfg = dataclasses.replace(
        tiny_cfg, codec="oasis_vae",
        model=dataclasses.replace(tiny_cfg.model, frame_height=18, frame_width=32, channels=16,
                                  cond_channels=16, patch_size=2))
    with pytest.raises(CodecUnavailableError, match="oasis_vae.*converted vit-l-20 weights"):
        make_codec(vae_cfg)


def test_resize_and_crop_keeps_the_centre():
    # 100x300 frame: red left third, green centre third, blue right third. A square crop is the
    # centre 100x100, all green.
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :100, 0] = 255
    frame[:, 100:200, 1] = 255
    frame[:, 200:, 2] = 255
    out = resize_and_crop(frame, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8), out.shape))


def test_resize_and_crop_tall_frame_and_upscale(np_rng):
    frame = np_rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)
    assert resize_and_crop(frame, 360, 640).shape == (360, 640, 3)
    # Same size and aspect: returned unchanged.
    np.testing.assert_array_equal(resize_and_crop(frame, 90, 30), frame)


def test_resize_and_crop_rejects_non_rgb():
    with pytest.raises(FrameError, match="frame is 10x10x4 uint8, expected HxWx3 uint8"):
        resize_and_crop(np.zeros((10, 10, 4), np.uint8), 8, 8)


# ----------------------------------------------------------------------------- prompts


def test_hashed_encoder_is_deterministic_and_normalised():
    a = HashedPromptEncoder(64).encode("a watercolor painting")
    b = HashedPromptEncoder(64).encode("a watercolor painting")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(a), np.sqrt(64), rtol=1e-6)


def test_hashed_encoder_golden_values():
    # Pinned: trained models depend on these vectors, so the hash must never drift (the draw uses
    # SHAKE-256, not Python's salted hash() nor a library RNG stream).
    np.testing.assert_allclose(HashedPromptEncoder(8).encode("hello"), [
        -0.6142492890357971, 1.4556647539138794, -0.8282354474067688, 0.9316497445106506,
        -0.3361726701259613, -0.658577024936676, 1.3764325380325317, 1.2282061576843262,
    ], rtol=1e-6)


def test_hashed_encoder_same_in_a_fresh_process_with_another_hash_seed(repo_root):
    code = ("import json; from lsd_jax.prompt import HashedPromptEncoder; "
            "print(json.dumps(HashedPromptEncoder(64).encode('a watercolor painting').tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo_root, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    expected = HashedPromptEncoder(64).encode("a watercolor painting")
    np.testing.assert_array_equal(np.asarray(json.loads(out), np.float32), expected)


def test_hashed_encoder_different_prompts_differ():
    encoder = HashedPromptEncoder(64)
    prompts = ["a watercolor painting", "a neon cyberpunk city", "an oil painting", "snow"]
    vectors = np.stack([encoder.encode(p) for p in prompts]) / np.sqrt(64)
    cosines = vectors @ vectors.T
    assert cosines[~np.eye(len(prompts), dtype=bool)].max() < 0.9


def test_hashed_encoder_shared_words_give_related_vectors():
    # Word vectors are near-orthogonal in a wide space, so two 3-word prompts sharing one word have
    # cosine ~1/3 and prompts sharing none ~0 (deviations ~ 1/sqrt(dim) = 0.016 here).
    encoder = HashedPromptEncoder(4096)
    cosine = lambda a, b: float(encoder.encode(a) @ encoder.encode(b)) / 4096  # noqa: E731
    assert cosine("a watercolor painting", "an oil painting") == pytest.approx(1 / 3, abs=0.1)
    assert abs(cosine("a watercolor painting", "neon cyberpunk city")) < 0.1


def test_hashed_encoder_ignores_case_and_punctuation_and_embeds_empty_as_zero():
    encoder = HashedPromptEncoder(32)
    np.testing.assert_array_equal(encoder.encode("A Watercolor, painting!"),
                                  encoder.encode("a watercolor painting"))
    np.testing.assert_array_equal(encoder.encode(""), np.zeros(32, np.float32))
    np.testing.assert_array_equal(encoder.encode("?!"), np.zeros(32, np.float32))


def test_embeddings_are_cached_and_read_only():
    encoder = HashedPromptEncoder(16)
    first = encoder.encode("snow")
    assert encoder.encode("snow") is first
    with pytest.raises(ValueError):
        first[0] = 1.0


def test_encode_batch_stacks_rows():
    encoder = HashedPromptEncoder(16)
    batch = encoder.encode_batch(["snow", "rain", "snow"])
    assert batch.shape == (3, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], batch[2])
    np.testing.assert_array_equal(batch[1], encoder.encode("rain"))


def test_precomputed_encoder(np_rng):
    table = {"snow": np_rng.standard_normal(8), "rain": np_rng.standard_normal(8)}
    encoder = PrecomputedPromptEncoder(table)
    assert encoder.dim == 8
    np.testing.assert_allclose(encoder.encode("rain"), table["rain"].astype(np.float32))
    with pytest.raises(PromptError, match=r"unknown prompt 'hail'.*'rain', 'snow'"):
        encoder.encode("hail")


def test_precomputed_encoder_rejects_ragged_or_empty_tables():
    with pytest.raises(PromptError, match="one length"):
        PrecomputedPromptEncoder({"a": np.zeros(8), "b": np.zeros(9)})
    with pytest.raises(PromptError, match="empty"):
        PrecomputedPromptEncoder({})


def test_make_prompt_encoder(tiny_cfg, np_rng):
    encoder = make_prompt_encoder(tiny_cfg)
    assert isinstance(encoder, HashedPromptEncoder) and encoder.dim == tiny_cfg.model.prompt_dim
    assert make_prompt_encoder(apply_overrides(tiny_cfg, ["model.prompt_dim=0"])) is None
    table = {"snow": np_rng.standard_normal(tiny_cfg.model.prompt_dim)}
    assert isinstance(make_prompt_encoder(tiny_cfg, table), PrecomputedPromptEncoder)
    with pytest.raises(PromptError, match="length 5, expected model.prompt_dim=64"):
        make_prompt_encoder(tiny_cfg, {"snow": np.zeros(5)})
