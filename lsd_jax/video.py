"""Writing video files: the one mp4 writer (OpenCV, mp4v codec) every command uses.

    with Mp4Writer("out.mp4", fps=24, size=(width, height)) as video:
        for frame_hwc in frames:                  # RGB uint8 [height, width, 3]
            video.write(frame_hwc)
    video.frames                                  # how many were written

A path OpenCV cannot open for writing is a `VideoWriteError` naming it; a frame of another shape
or dtype a ValueError naming both. The file is removed again when the block raises, and when no
frame was written (a video of no frames is no output). OpenCV is imported on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsd_jax.errors import VideoWriteError


class Mp4Writer:
    """An mp4v video at `path`, `fps` frames per second, frames `size = (width, height)`."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]):
        import cv2

        self.path = Path(path)
        width, height = (int(s) for s in size)
        if width < 1 or height < 1 or not fps > 0:
            raise ValueError(f"video {str(self.path)!r}: {width}x{height} frames at {fps} fps, "
                             "expected a positive size and frame rate")
        self.fps, self.width, self.height = float(fps), width, height
        self.frames = 0
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                       (width, height))
        if not self._writer.isOpened():
            self._writer = None
            raise VideoWriteError(f"video {str(self.path)!r} cannot be opened for writing by "
                                  "OpenCV (expected a writable path in an existing folder, with a "
                                  "video extension such as .mp4)")

    def write(self, frame_hwc: np.ndarray) -> None:
        """Append one RGB uint8 `[height, width, 3]` frame."""
        if self._writer is None:
            raise ValueError(f"video {str(self.path)!r} is closed")
        frame_hwc = np.asarray(frame_hwc)
        if frame_hwc.shape != (self.height, self.width, 3) or frame_hwc.dtype != np.uint8:
            raise ValueError(f"video {str(self.path)!r}: frame {self.frames} is "
                             f"{frame_hwc.dtype} {list(frame_hwc.shape)}, expected uint8 "
                             f"{[self.height, self.width, 3]} (RGB)")
        self._writer.write(np.ascontiguousarray(frame_hwc[..., ::-1]))  # OpenCV takes BGR
        self.frames += 1

    def close(self, *, discard: bool = False) -> None:
        """Finish the file; remove it when `discard` or when it holds no frame."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            if discard or self.frames == 0:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(discard=exc_type is not None)
