"""Make `lsd_serve/assets/demo.mp4`, the clip `lsd stream --input demo` plays (no download at run
time).

    lsd data demo-clip                  # needs scikit-image (the `test` extra)
    lsd data demo-clip --out clip.mp4

A virtual camera pans and zooms across four of scikit-image's photographs (astronaut, chelsea,
coffee, rocket), 48 frames each, with a short cross-fade between them: 192 frames of 192x144 at
24 fps, written with OpenCV's mp4v codec. Every frame is a deterministic function of the photos,
so the same scikit-image and OpenCV versions make the same file.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lsd_jax.video import Mp4Writer

OUT = Path(__file__).resolve().parent / "assets" / "demo.mp4"
WIDTH, HEIGHT, FPS, FRAMES_PER_PHOTO, FADE = 192, 144, 24, 48, 8
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def camera_frame(photo_hwc: np.ndarray, t: float) -> np.ndarray:
    """The view at time `t` in [0, 1] of a slow pan (left to right) with a zoom in, RGB uint8."""
    h, w = photo_hwc.shape[:2]
    zoom = 1.0 + 0.35 * t
    crop_h = int(min(h, w * HEIGHT / WIDTH) / zoom)
    crop_w = int(crop_h * WIDTH / HEIGHT)
    x0 = int((w - crop_w) * (0.2 + 0.6 * t))
    y0 = int((h - crop_h) * (0.5 - 0.2 * np.sin(np.pi * t)))
    view = photo_hwc[y0 : y0 + crop_h, x0 : x0 + crop_w]
    return cv2.resize(view, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


def demo_frames() -> list[np.ndarray]:
    """The clip's frames, RGB uint8 `[HEIGHT, WIDTH, 3]`."""
    from skimage import data

    photos = [getattr(data, name)() for name in PHOTOS]
    frames = []
    for i, photo in enumerate(photos):
        for j in range(FRAMES_PER_PHOTO):
            frame = camera_frame(photo, j / (FRAMES_PER_PHOTO - 1))
            if j >= FRAMES_PER_PHOTO - FADE and i + 1 < len(photos):
                # Cross-fade into the next photo's first view, as a camera cut would not.
                alpha = (j - (FRAMES_PER_PHOTO - FADE) + 1) / (FADE + 1)
                frame = cv2.addWeighted(frame, 1 - alpha, camera_frame(photos[i + 1], 0.0), alpha,
                                        0)
            frames.append(frame)
    return frames


def write_demo_clip(out: Path = OUT) -> Path:
    """Write the clip (`demo_frames`, mp4v at `FPS`) to `out`, its folder made; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(out, FPS, (WIDTH, HEIGHT)) as video:
        for frame in demo_frames():
            video.write(frame)
    return out
