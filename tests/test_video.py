"""`lsd_jax.video.Mp4Writer`: the one mp4 writer, read back with OpenCV."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

from lsd_jax.errors import VideoWriteError
from lsd_jax.video import Mp4Writer

UNWRITABLE = "/sys/lsd_video_test.mp4"  # not even root may create files under /sys


def _read(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame_bgr = capture.read()
        if not ok:
            break
        frames.append(frame_bgr)
    capture.release()
    return frames


def test_frames_round_trip_in_rgb(tmp_path):
    """Frames go in RGB and come back (BGR, from OpenCV) with the count, size and colours."""
    path = tmp_path / "clip.mp4"
    colours = [(220, 30, 10), (10, 200, 40), (20, 30, 230)] * 3
    with Mp4Writer(path, 12, (80, 48)) as video:
        for rgb in colours:
            video.write(np.full((48, 80, 3), rgb, np.uint8))
    assert video.frames == len(colours)
    frames = _read(path)
    assert len(frames) == len(colours)
    for frame_bgr, rgb in zip(frames, colours, strict=True):
        assert frame_bgr.shape == (48, 80, 3)
        np.testing.assert_allclose(frame_bgr[24, 40, ::-1], rgb, atol=12)
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) == pytest.approx(12)


def test_non_contiguous_frames_are_written(tmp_path):
    big = np.zeros((64, 128, 3), np.uint8)
    big[..., 0] = 200
    with Mp4Writer(tmp_path / "c.mp4", 10, (64, 64)) as video:
        video.write(big[:, ::2])
    frames = _read(tmp_path / "c.mp4")
    assert len(frames) == 1 and abs(int(frames[0][32, 32, 2]) - 200) < 12


def test_no_frame_no_file(tmp_path):
    path = tmp_path / "empty.mp4"
    with Mp4Writer(path, 10, (32, 32)) as video:
        assert path.exists()
    assert video.frames == 0 and not path.exists()
    video.close()  # closing twice is harmless


def test_error_in_block_removes_partial_file(tmp_path):
    path = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="model failed"):
        with Mp4Writer(path, 10, (32, 32)) as video:
            video.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("model failed")
    assert not path.exists()


def test_close_keeps_written_frames(tmp_path):
    """`close()` outside a `with` block keeps what was written (a stream ended by Ctrl-C)."""
    video = Mp4Writer(tmp_path / "kept.mp4", 10, (32, 32))
    for _ in range(3):
        video.write(np.zeros((32, 32, 3), np.uint8))
    video.close()
    assert len(_read(tmp_path / "kept.mp4")) == 3
    with pytest.raises(ValueError, match="is closed"):
        video.write(np.zeros((32, 32, 3), np.uint8))


@pytest.mark.parametrize("frame, shown", [
    (np.zeros((32, 48, 3), np.uint8), "uint8 [32, 48, 3]"),
    (np.zeros((48, 32), np.uint8), "uint8 [48, 32]"),
    (np.zeros((48, 32, 3), np.float32), "float32 [48, 32, 3]"),
])
def test_wrong_frame_is_an_error_naming_it(tmp_path, frame, shown):
    path = tmp_path / "v.mp4"
    with pytest.raises(ValueError) as info:
        with Mp4Writer(path, 10, (32, 48)) as video:
            video.write(np.zeros((48, 32, 3), np.uint8))
            video.write(frame)
    assert str(info.value) == (f"video {str(path)!r}: frame 1 is {shown}, expected uint8 "
                               "[48, 32, 3] (RGB)")
    assert not path.exists()


@pytest.mark.parametrize("where", ["missing_folder", "sys"])
def test_unwritable_path_is_an_error_naming_it(tmp_path, where):
    path = tmp_path / "no" / "such" / "v.mp4" if where == "missing_folder" else UNWRITABLE
    with pytest.raises(VideoWriteError) as info:
        Mp4Writer(path, 10, (32, 32))
    assert isinstance(info.value, OSError)
    assert str(info.value).startswith(f"video {str(path)!r} cannot be opened for writing")


def test_bad_size_or_rate(tmp_path):
    with pytest.raises(ValueError, match=r"0x32 frames at 10 fps"):
        Mp4Writer(tmp_path / "v.mp4", 10, (0, 32))
    with pytest.raises(ValueError, match=r"32x32 frames at 0 fps"):
        Mp4Writer(tmp_path / "v.mp4", 0, (32, 32))


def test_stream_output_that_cannot_be_written_is_a_stream_error():
    """`lsd stream` turns the writer's error into its own one-line error, before any step runs."""
    from lsd_jax.errors import StreamInputError
    from lsd_serve.stream import run_stream

    engine = types.SimpleNamespace(max_steps=1, steps=(1,), frame_hw=(16, 16), describe="none")
    with pytest.raises(StreamInputError) as info:
        run_stream(engine, "demo", UNWRITABLE, [(0, "x")], show_progress=False)
    assert str(info.value) == (f"output {UNWRITABLE!r} cannot be written by OpenCV (expected a "
                               "writable .mp4 path)")
