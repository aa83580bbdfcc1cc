"""`lsd eval real`: the model on real video it never trained on, as pictures.

Two clips, both shipped inside scikit-image (nothing is downloaded):

- `gif`: `no_time_for_that_tiny.gif`, 24 frames of a person filmed outdoors;
- `faces`: a camera panning across the 100 faces of `lfw_subset` (Labeled Faces in the Wild,
  25x25 grey; tiled 10 x 10, each enlarged to the frame size, so about one face fills a frame).

Each clip is streamed under several prompts side by side (one batch, the jitted streaming step at
`steps` steps, what `lsd stream` runs). The tasks are functions of the input frames
(`lsd_train/tasks.py`), so a prompt that names a task has a target on real video too: per prompt,
the PSNR of the output against its task's target and the flicker ratio (the output's mean
frame-to-frame change over the target's; over the input's for a prompt that names no task). The
pictures show each clip's input and every prompt's output at evenly spaced frames.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from lsd_jax.codec import resize_and_crop
from lsd_jax.errors import ConfigError
from lsd_jax.prompt import make_prompt_encoder
from lsd_train.eval_report import labelled_row, save_jpeg
from lsd_train.evaluate import clip_psnr, frame_change, stream_batch
from lsd_train.tasks import TASKS

REAL_PROMPTS = ("a pencil sketch", "a thermal camera image", "a cartoon with bold outlines",
                "an old sepia photograph")
REAL_CLIPS = ("gif", "faces")
FACES_GRID = 10  # lfw_subset: images 0..99 are faces, 100..199 are not


def gif_clip(frame_hw: tuple[int, int]) -> np.ndarray:
    """scikit-image's animated GIF, each frame centre-cropped and resized: uint8 `[24, H, W, 3]`."""
    import imageio.v3 as iio
    import skimage

    path = Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"
    frames = np.asarray(iio.imread(path, index=None))[..., :3]
    return np.stack([resize_and_crop(np.ascontiguousarray(f), *frame_hw) for f in frames])


def faces_clip(frame_hw: tuple[int, int], frames: int = 48) -> np.ndarray:
    """A pan across scikit-image's LFW faces: uint8 `[frames, H, W, 3]` (grey in RGB).

    The 100 faces are tiled 10 x 10, each enlarged (bicubic) to `H x W`; a window of the frame's
    size moves right 2 pixels per frame along a row of faces, bobbing a tenth of a face height up
    and down once per 48 frames: a smooth camera path at the speed of the training clips, about
    one face in view at a time.
    """
    from skimage.data import lfw_subset

    h, w = frame_hw
    faces = lfw_subset()[:FACES_GRID * FACES_GRID]
    tiles = [cv2.resize((face * 255).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
             for face in faces]
    rows = [np.concatenate(tiles[r * FACES_GRID:(r + 1) * FACES_GRID], axis=1)
            for r in range(FACES_GRID)]
    mosaic = np.clip(np.concatenate(rows, axis=0), 0, 255).astype(np.uint8)
    out = []
    for i in range(frames):
        x = (2 * i) % (mosaic.shape[1] - w)
        y = int(round(4 * h + 0.1 * h * np.sin(2 * np.pi * i / 48)))
        out.append(np.repeat(mosaic[y:y + h, x:x + w, None], 3, axis=-1))
    return np.stack(out)


def real_clip(name: str, frame_hw: tuple[int, int]) -> np.ndarray:
    if name == "gif":
        return gif_clip(frame_hw)
    if name == "faces":
        return faces_clip(frame_hw)
    raise ConfigError(f"real clip {name!r}, expected one of {', '.join(REAL_CLIPS)}")


def evaluate_real(model, *, prompts=REAL_PROMPTS, clips=REAL_CLIPS, steps: int = 3,
                  seed: int = 0) -> dict:
    """Stream each clip of `clips` under every prompt of `prompts` (one batch per clip).

    Returns `{"model", "spec", "steps", "prompts", "clips": {name: {"frames", "prompts": {prompt:
    {"task", "psnr", "flicker_ratio"}}}}, "samples": {name: {"input": [T, H, W, 3], "outputs":
    [P, T, H, W, 3]}}}`; `task` and `psnr` are None for a prompt that names no task.
    """
    if not prompts:
        raise ConfigError("lsd eval real: expected at least one prompt")
    cfg = model.pixel_cfg
    frame_hw = (cfg.model.frame_height, cfg.model.frame_width)
    encoder = make_prompt_encoder(model.cfg)
    prompt_bp = None if encoder is None else np.stack(
        [np.asarray(encoder.encode(p), np.float32) for p in prompts])
    t0 = time.perf_counter()
    results, samples = {}, {}
    for name in clips:
        clip = real_clip(name, frame_hw)
        cond = np.repeat(clip[None], len(prompts), axis=0)
        outs = stream_batch(model, cond, prompt_bp, steps=steps, seed=seed)
        rows = {}
        for p, out in zip(prompts, outs, strict=True):
            task = next((t for t in TASKS if t.prompt == p), None)
            target = clip if task is None else task.fn(clip)
            rows[p] = {"task": None if task is None else task.name,
                       "psnr": None if task is None else clip_psnr(out, target),
                       "flicker_ratio": frame_change(out) / max(frame_change(target), 1e-6)}
        results[name] = {"frames": int(clip.shape[0]), "prompts": rows}
        samples[name] = {"input": clip, "outputs": outs}
    return {"model": model.label, "spec": model.spec, "steps": steps, "prompts": list(prompts),
            "clips": results, "seconds": time.perf_counter() - t0, "samples": samples}


def _gap(height: int) -> np.ndarray:
    """A white column 4 pixels wide between the frames of a strip."""
    return np.full((height, 4, 3), 255, np.uint8)


def real_strip(result: dict, name: str, path: Path, *, frames: int = 4, scale: int = 2) -> Path:
    """One picture for clip `name`: rows the input then each prompt's output, `frames` evenly
    spaced frames per row, upscaled `scale`x, each row labelled above."""
    sample = result["samples"][name]
    clip, outs = sample["input"], sample["outputs"]
    idx = np.linspace(0, clip.shape[0] - 1, frames).round().astype(int)
    labelled = []
    for label, seq in [("input", clip), *((f'"{p}"', o) for p, o in
                                           zip(result["prompts"], outs, strict=True))]:
        cells = []
        for i in idx:
            cells += [seq[i], _gap(seq.shape[1])]
        row = np.concatenate(cells[:-1], axis=1)
        labelled.append(labelled_row(row, f"{label}  (frames {', '.join(map(str, idx))})",
                                     scale=scale))
    return save_jpeg(labelled, path)


def real_markdown(results: list[dict], *, pictures: dict[str, str]) -> str:
    lines = []
    for r in results:
        lines.append(f"**{r['model']}** (`{r['spec']}`), {r['steps']} steps: per prompt, PSNR "
                     "(dB) against the task's target and the flicker ratio (the output's mean "
                     "frame-to-frame change over the target's).")
        lines.append("")
        names = list(r["clips"])
        lines.append("| prompt | " + " | ".join(f"{n}: PSNR | {n}: flicker ratio"
                                                  for n in names) + " |")
        lines.append("|---|" + "---:|---:|" * len(names))
        for p in r["prompts"]:
            cells = []
            for n in names:
                row = r["clips"][n]["prompts"][p]
                psnr = "n/a (no task)" if row["psnr"] is None else f"{row['psnr']:.2f}"
                cells.append(f"{psnr} | {row['flicker_ratio']:.2f}")
            lines.append(f"| {p} | {' | '.join(cells)} |")
        lines.append("")
    for title, path in pictures.items():
        lines.append(f"![{title}]({path})")
        lines.append("")
    return "\n".join(lines)
