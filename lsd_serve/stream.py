"""`lsd stream`: a video file, a webcam or the packaged demo clip through the streaming step.

    result = run_stream(engine, "demo" | "webcam" | PATH, "out.mp4", prompt_schedule, ...)

Frames are read with OpenCV, centre-cropped and resized to the model's frame size, streamed one at
a time through `engine.step` (a batch of one stream) and written to an mp4 (mp4v), optionally beside
the model's input. The result dict holds the frame count, throughput and per-frame step latency;
the first frame (which compiles the step) is timed apart from the others.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.progress import Progress

from lsd_jax.codec import resize_and_crop
from lsd_jax.errors import StreamInputError, VideoWriteError
from lsd_jax.stream_state import stream_frames
from lsd_jax.video import Mp4Writer

# Containers OpenCV writes with the mp4v codec.
OUTPUT_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi")


def check_output(out: str | Path, source: str) -> Path:
    """The output path, checked before anything is opened: a video extension OpenCV writes, and
    not the input file itself."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise StreamInputError(f"output {str(out)!r}: extension {out.suffix or '(none)'!r}, "
                               f"expected one of {', '.join(OUTPUT_EXTENSIONS)}")
    if source not in ("demo", "webcam") and Path(source).exists() and (
            out.absolute() == Path(source).absolute()
            or (out.exists() and out.samefile(source))):
        raise StreamInputError(f"output {str(out)!r} is the input file: writing it would "
                               "overwrite the input; expected another path")
    return out


def demo_clip() -> Path:
    """The sample clip shipped in the package (`lsd_serve/assets/demo.mp4`, 192 frames, 24 fps)."""
    return Path(str(importlib.resources.files("lsd_serve").joinpath("assets/demo.mp4")))


def parse_prompt_schedule(prompt: str | None, schedule: str | None) -> list[tuple[int, str]]:
    """`"0:pencil sketch,120:thermal"` -> `[(0, "pencil sketch"), (120, "thermal")]`.

    Entries are `FRAME:PROMPT`, frames strictly increasing; `prompt` holds from frame 0 until the
    first entry (the schedule must start at 0 when no prompt is given).
    """
    entries = [] if prompt is None else [(0, prompt)]
    if schedule:
        for part in schedule.split(","):
            frame, sep, text = part.partition(":")
            if not sep or not frame.strip().isdigit() or not text.strip():
                raise StreamInputError(f"prompt schedule entry {part!r}, expected FRAME:PROMPT "
                                       "such as 120:thermal")
            entries.append((int(frame), text.strip()))
        if prompt is not None and entries[1][0] == 0:
            entries.pop(0)
    if not entries or entries[0][0] != 0:
        raise StreamInputError("no prompt for frame 0: give --prompt, or a --prompt-schedule "
                               "starting with 0:PROMPT")
    frames = [f for f, _ in entries]
    if frames != sorted(set(frames)):
        raise StreamInputError(f"prompt schedule frames {frames}, expected strictly increasing")
    return entries


def prompt_at(schedule: list[tuple[int, str]], frame: int) -> str:
    return [p for f, p in schedule if f <= frame][-1]


def open_source(spec: str):
    """`(capture, fps, frame_count or None, name)` for `demo`, `webcam` or a video file path."""
    if spec == "webcam":
        capture, name = cv2.VideoCapture(0), "webcam 0"
    else:
        path = demo_clip() if spec == "demo" else Path(spec)
        if not path.is_file():
            raise StreamInputError(f"input {spec!r}: no such file (expected a video file, "
                                   "'webcam' or 'demo')")
        capture, name = cv2.VideoCapture(str(path)), str(path)
    if not capture.isOpened():
        raise StreamInputError(f"input {name!r} cannot be opened by OpenCV (expected a readable "
                               "video file or a camera at /dev/video0)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    return capture, fps, (count if count > 0 and spec != "webcam" else None), name


def run_stream(engine, source: str, out: str | Path, schedule: list[tuple[int, str]], *,
               steps: int | None = None, side_by_side: bool = False,
               max_frames: int | None = None, show_progress: bool = True, seed: int = 0) -> dict:
    """Stream `source` through `engine` into the video `out`; returns the figures as a dict.

    `steps` is the denoising steps per frame (default the engine's maximum); `max_frames` stops
    early (a webcam runs until it or Ctrl-C). Latencies are of the step alone, blocked on.
    """
    steps = engine.max_steps if steps is None else steps
    if steps not in engine.steps:
        raise StreamInputError(f"--steps {steps}, expected one of {list(engine.steps)} for "
                               f"{engine.describe}")
    out = check_output(out, source)
    capture, fps, count, name = open_source(source)
    total = count if max_frames is None else min(count or max_frames, max_frames)
    height, width = engine.frame_hw
    out.parent.mkdir(parents=True, exist_ok=True)
    out_w = 2 * width if side_by_side else width
    try:
        video = Mp4Writer(out, fps, (out_w, height))
    except VideoWriteError:
        capture.release()
        raise StreamInputError(f"output {str(out)!r} cannot be written by OpenCV (expected a "
                               "writable .mp4 path)") from None
    state = engine.init_state(engine.pick_batch(1), seed)
    pad = state.batch - 1  # an artifact without batch 1 runs its smallest batch, padded
    latencies_s, first_frame_s, frames, interrupted = [], None, 0, False
    bar = Progress(console=Console(stderr=True), refresh_per_second=4, transient=True,
                   disable=not show_progress)
    task = bar.add_task(f"{name} -> {out.name}", total=total)
    shown_input = {}

    def source_frames():
        while max_frames is None or frames < max_frames:
            ok, frame_bgr = capture.read()
            if not ok:
                return
            frame_hwc = resize_and_crop(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB), height, width)
            shown_input["frame"] = frame_hwc
            yield np.concatenate([frame_hwc[None]] * (1 + pad))

    def step(state, frames_bhwc, prompt_bp):
        return engine.step(state, frames_bhwc, prompt_bp, steps)

    def prompts(i):
        return engine.encode_prompts([prompt_at(schedule, i)] * (1 + pad))

    start = time.perf_counter()
    try:
        with bar:
            for item in stream_frames(step, state, source_frames(), prompts):
                out_hwc = np.asarray(item.out_bhwc)[0]
                if first_frame_s is None:
                    first_frame_s = item.seconds
                else:
                    latencies_s.append(item.seconds)
                frame_hwc = shown_input["frame"]
                shown = np.concatenate([frame_hwc, out_hwc], axis=1) if side_by_side else out_hwc
                video.write(shown)
                frames += 1
                bar.update(task, advance=1)
    except KeyboardInterrupt:
        interrupted = True  # a webcam stream ends with Ctrl-C; what was streamed is written
    finally:
        wall_s = time.perf_counter() - start
        capture.release()
        video.close()  # with no frame written it removes the output: an empty video is no output
    if frames == 0:
        raise StreamInputError(f"input {name!r} gave no frames (no output written)")
    warning = None
    if count is not None and frames < min(count, max_frames or count) and not interrupted:
        warning = (f"input {name!r}: read {frames} of the {count} frames its container lists; "
                   "the rest could not be decoded (a damaged or truncated file?)")
    ms = 1e3 * np.asarray(latencies_s or [first_frame_s])
    return {
        "input": name,
        "out": str(out),
        "frames": frames,
        "frame_shape": [height, width, 3],
        "steps": steps,
        "engine": engine.describe,
        "untrained": engine.untrained,
        "prompt_schedule": [[f, p] for f, p in schedule],
        "side_by_side": side_by_side,
        "first_frame_s": first_frame_s,
        "ms_per_frame": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                         "mean": float(ms.mean())},
        "step_fps": float(1e3 / ms.mean()),
        "fps": frames / wall_s,
        "wall_s": wall_s,
        "frames_in_container": count,
        "warning": warning,
    }
