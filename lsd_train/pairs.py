"""The user's own video pairs: a manifest, a clip source that trains on it, and teachers that make
pairs from any folder of videos.

Manifest (JSON lines, one pair per line; paths relative to the manifest's folder):

    {"input": "clips/a.mp4", "target": "targets/a", "prompt": "a colour pencil sketch"}
    {"input": "clips/b", "target": "targets/b.mp4", "prompt": "...", "split": "validation"}

An input or target is a video file (anything OpenCV reads) or a folder of image frames (sorted by
name). Input and target must have the same number of frames, frame `i` of one matching frame `i`
of the other. `split` ("train" or "validation") keeps pairs out of training; without it a pair is
in validation when the hash of its input path falls there (one in `VALIDATION_ONE_IN`).

`PairsClips` (`data.source=pairs`, or mixed into another source by `data.pairs_fraction`) is an
endless random-access source: item `i` is a pure function of `(data.shuffle_seed, i)`: a training
pair, then a clip of `data.clip_frames` frames at a random offset (every `stride`th frame, the
input's frame rate brought to `data.fps`), both resized and centre-cropped to the model's frame.

Teachers (`lsd data pairs --teacher NAME`) make the target of a clip: the nine tasks of
`train/tasks.py` and OpenCV filters they do not use (`TEACHERS`), or the user's own function
(`--teacher module:function`, `fn(clip_thwc uint8) -> clip_thwc uint8`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from lsd_jax.atomic import atomic_path, atomic_write_text
from lsd_jax.codec import resize_and_crop
from lsd_jax.errors import ConfigError, DataError
from lsd_train.tasks import TASKS, trained_prompts

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PAIR_SPLITS = ("train", "validation")
VALIDATION_ONE_IN = 10
# Pair items carry this task id: no built-in task (a teacher model knows none of their prompts).
PAIR_TASK = -1


class Pair(NamedTuple):
    input: Path
    target: Path
    prompt: str
    split: str
    line: int  # 1-based line of the manifest, for messages


def hashed_split(input_path: str) -> str:
    digest = int(hashlib.sha256(input_path.encode()).hexdigest(), 16)
    return "validation" if digest % VALIDATION_ONE_IN == 0 else "train"


def read_manifest(path: str | Path) -> list[Pair]:
    """Every pair of a manifest; a `DataError` naming the line and what is wrong with it (bad
    JSON, a missing or mistyped field, a path that does not exist, an unknown split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs manifest {str(path)!r} does not exist")
    pairs = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(text)
        except ValueError as err:
            raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with input, target and prompt")
        for key in ("input", "target", "prompt"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DataError(f"{where}: {key}={item.get(key)!r}, expected a non-empty string")
        split = item.get("split", hashed_split(item["input"]))
        if split not in PAIR_SPLITS:
            raise DataError(f"{where}: split={split!r}, expected one of {PAIR_SPLITS}")
        files = {key: path.parent / item[key] for key in ("input", "target")}
        for key, file in files.items():
            if not file.exists():
                raise DataError(f"{where}: {key} {str(file)!r} does not exist")
        pairs.append(Pair(files["input"], files["target"], item["prompt"].strip(), split,
                          number))
    if not pairs:
        raise DataError(f"pairs manifest {str(path)!r} holds no pairs")
    return pairs


def frame_rate(path: Path) -> float | None:
    """A video file's frame rate (None for a frame folder or when unknown)."""
    if path.is_dir():
        return None
    cap = cv2.VideoCapture(str(path))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    finally:
        cap.release()
    return fps if fps > 0 else None


@functools.lru_cache(maxsize=1024)
def read_frames(path: Path, height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 RGB `[T, H, W, 3]` of a video file or a frame folder, resized and centre-cropped to
    `height x width` when given (kept in memory: clips at a model's frame size are small). A
    `DataError` names a file that cannot be read."""
    if height is None:
        return _decode(path)
    return np.stack([resize_and_crop(f, height, width) for f in _decode(path)])


@functools.lru_cache(maxsize=4096)
def frame_count(path: Path) -> int:
    if path.is_dir():
        return len(_decode(path, count_only=True))
    return len(_decode(path))


def _decode(path: Path, count_only: bool = False):
    frames = []
    if path.is_dir() and count_only:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"frame folder {str(path)!r} holds no images (expected files ending "
                            f"in {', '.join(IMAGE_EXTENSIONS)})")
        return files
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"frame folder {str(path)!r} holds no images (expected files ending "
                            f"in {', '.join(IMAGE_EXTENSIONS)})")
        for file in files:
            bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DataError(f"frame {str(file)!r} cannot be decoded as an image")
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    else:
        cap = cv2.VideoCapture(str(path))
        try:
            while cap.isOpened():
                ok, bgr = cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        finally:
            cap.release()
        if not frames:
            raise DataError(f"video {str(path)!r} cannot be decoded (no frame read)")
    if len({f.shape for f in frames}) > 1:
        raise DataError(f"{str(path)!r}: its frames differ in size")
    return np.stack(frames)


def check_pair(pair: Pair) -> int:
    """The pair's frame count; a `DataError` naming the pair when input and target disagree in
    frame count or frame rate."""
    n_in, n_out = frame_count(pair.input), frame_count(pair.target)
    where = f"pair on line {pair.line} ({pair.input.name} -> {pair.target.name})"
    if n_in != n_out:
        raise DataError(f"{where}: the input has {n_in} frames, the target {n_out}; they must "
                        "be aligned frame for frame")
    rates = (frame_rate(pair.input), frame_rate(pair.target))
    if None not in rates and abs(rates[0] - rates[1]) > 0.01 * rates[0]:
        raise DataError(f"{where}: the input runs at {rates[0]:g} fps, the target at "
                        f"{rates[1]:g}; they must be aligned in time")
    return n_in


class PairsClips:
    """Endless paired clips of a manifest's pairs of one split (module docstring): `source[i]`
    -> `{"cond", "target": uint8 [T, H, W, 3], "prompt": float32 [P] (with an encoder),
    "task": PAIR_TASK}`."""

    def __init__(self, manifest: str | Path, *, clip_frames: int, height: int, width: int,
                 fps: float, seed: int, encoder=None, split: str = "train"):
        self.pairs = [p for p in read_manifest(manifest) if p.split == split]
        if not self.pairs:
            raise DataError(f"pairs manifest {str(manifest)!r} holds no {split} pairs")
        self.clip_frames, self.height, self.width, self.seed = clip_frames, height, width, seed
        self.encoder = encoder
        self.strides, self.prompts = [], {}
        for pair in self.pairs:
            frames = check_pair(pair)
            source_fps = frame_rate(pair.input)
            stride = max(1, round(source_fps / fps)) if source_fps else 1
            needed = (clip_frames - 1) * stride + 1
            if frames < needed:
                raise DataError(f"pair on line {pair.line} ({pair.input.name}) has {frames} "
                                f"frames, shorter than one clip: data.clip_frames={clip_frames} "
                                f"at data.fps={fps} needs {needed}")
            self.strides.append(stride)
        if encoder is not None:
            for prompt in sorted({p.prompt for p in self.pairs}):
                self.prompts[prompt] = np.asarray(encoder.encode(prompt), np.float32)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, 7, int(index)))
        which = int(rng.integers(len(self.pairs)))
        pair, stride = self.pairs[which], self.strides[which]
        cond = read_frames(pair.input, self.height, self.width)
        target = read_frames(pair.target, self.height, self.width)
        span = (self.clip_frames - 1) * stride + 1
        start = int(rng.integers(len(cond) - span + 1))
        rows = slice(start, start + span, stride)
        item = {"cond": cond[rows], "target": target[rows], "task": np.int32(PAIR_TASK)}
        if self.encoder is not None:
            item["prompt"] = self.prompts[pair.prompt]
        return item


def manifest_prompts(manifest: str | Path) -> tuple[str, ...]:
    """The distinct prompts of a manifest's training pairs, in order of first appearance."""
    seen = []
    for pair in read_manifest(manifest):
        if pair.split == "train" and pair.prompt not in seen:
            seen.append(pair.prompt)
    return tuple(seen)


# ----------------------------------------------------------------------------- teachers


class Teacher(NamedTuple):
    """`fn(clip_thwc uint8) -> clip_thwc uint8` and the prompt(s) naming it (the first is the
    manifest's)."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    prompts: tuple[str, ...]


def _frames(fn_hwc):
    return lambda clip_thwc: np.stack([fn_hwc(frame) for frame in clip_thwc])


def _color_pencil(rgb_hwc):
    _, color = cv2.pencilSketch(rgb_hwc, sigma_s=30, sigma_r=0.07, shade_factor=0.05)
    return color


def _detail_enhance(rgb_hwc):
    return cv2.detailEnhance(rgb_hwc, sigma_s=10, sigma_r=0.15)


def _edge_preserving(rgb_hwc):
    return cv2.edgePreservingFilter(rgb_hwc, flags=cv2.RECURS_FILTER, sigma_s=60, sigma_r=0.4)


def _builtin_teachers() -> dict[str, Teacher]:
    teachers = {task.name: Teacher(task.name, task.fn, (task.prompt, *task.phrasings))
                for task in TASKS}
    teachers.update({
        "color_pencil": Teacher("color_pencil", _frames(_color_pencil),
                                ("a colour pencil drawing", "drawn with coloured pencils",
                                 "a coloured pencil sketch")),
        "detail_enhance": Teacher("detail_enhance", _frames(_detail_enhance),
                                  ("crisp enhanced details", "a sharpened high-detail photo",
                                   "vivid detail enhancement")),
        "edge_preserving": Teacher("edge_preserving", _frames(_edge_preserving),
                                   ("a smooth airbrushed look", "soft edge-preserving smoothing",
                                    "an airbrushed painting")),
    })
    return teachers


def teacher_names() -> tuple[str, ...]:
    return tuple(_builtin_teachers())


def get_teacher(spec: str, prompt: str | None = None) -> Teacher:
    """A built-in teacher by name, or `module:function` (the user's; `prompt` required). A
    `ConfigError` names the spec and what was expected."""
    builtin = _builtin_teachers()
    if spec in builtin:
        teacher = builtin[spec]
        return teacher._replace(prompts=(prompt, *teacher.prompts)) if prompt else teacher
    if ":" not in spec:
        raise ConfigError(f"--teacher {spec!r}: not a built-in teacher ({', '.join(builtin)}) "
                          "nor module:function")
    module_name, _, attribute = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--teacher {spec!r} cannot be loaded: {type(err).__name__}: "
                          f"{err}") from None
    if not callable(fn):
        raise ConfigError(f"--teacher {spec!r} is not a function")
    if not prompt:
        raise ConfigError(f"--teacher {spec!r} is the user's own: give its prompt with --prompt")
    return Teacher(attribute, fn, (prompt,))


def video_inputs(directory: str | Path) -> list[Path]:
    """Every video file and frame folder under `directory` (sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--input {str(directory)!r} is not a directory")
    found = sorted(p for p in directory.rglob("*") if p.is_file()
                   and p.suffix.lower() in VIDEO_EXTENSIONS)
    found += sorted(p for p in directory.rglob("*") if p.is_dir() and any(
        q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()))
    if not found:
        raise DataError(f"--input {str(directory)!r} holds no video files or frame folders")
    return found


def write_frames(folder: Path, clip_thwc: np.ndarray) -> None:
    """A clip as a folder of lossless PNG frames (written beside and renamed into place)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for i, frame in enumerate(clip_thwc):
            if not cv2.imwrite(str(tmp / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise DataError(f"cannot write a frame into {str(folder)!r}")


def make_pairs(input_dir: str | Path, out_dir: str | Path, teachers: list[Teacher], *,
               max_side: int = 256, split: str | None = None,
               progress=lambda done, total: None) -> Path:
    """Run every teacher on every video under `input_dir`; write the target frames (PNG folders
    under `out_dir/targets/`) and the manifest `out_dir/pairs.jsonl`, paths relative to it (a
    pair per video and teacher). Frames larger than `max_side` are first scaled down (the inputs
    are then written beside the targets as PNG folders too, so a pair is aligned pixel for
    pixel). `split` is written into every line when given. Returns the manifest's path."""
    out_dir = Path(out_dir)
    manifest = out_dir / "pairs.jsonl"
    if manifest.exists():
        raise DataError(f"{str(manifest)!r} exists: give a new --out folder")
    if split is not None and split not in PAIR_SPLITS:
        raise ConfigError(f"--split {split!r}, expected one of {PAIR_SPLITS}")
    inputs = video_inputs(input_dir)
    (out_dir / "targets").mkdir(parents=True, exist_ok=True)
    lines, done, total = [], 0, len(inputs) * len(teachers)
    for i, source in enumerate(inputs):
        clip = _decode(source)
        input_path = source
        scale = max_side / max(clip.shape[1:3])
        if scale < 1:
            size = (round(clip.shape[2] * scale), round(clip.shape[1] * scale))
            clip = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in clip])
            input_path = out_dir / "inputs" / f"{i:04d}_{source.stem}"
            if not input_path.exists():
                write_frames(input_path, clip)
        for teacher in teachers:
            target = teacher.fn(clip)
            if target.shape != clip.shape or target.dtype != np.uint8:
                raise DataError(f"teacher {teacher.name!r} returned {target.dtype} "
                                f"{'x'.join(map(str, target.shape))} for {source.name}, expected "
                                f"uint8 {'x'.join(map(str, clip.shape))}")
            target_path = out_dir / "targets" / f"{i:04d}_{source.stem}_{teacher.name}"
            write_frames(target_path, target)
            item = {"input": _relative(input_path, out_dir),
                    "target": _relative(target_path, out_dir), "prompt": teacher.prompts[0]}
            if split is not None:
                item["split"] = split
            lines.append(json.dumps(item))
            done += 1
            progress(done, total)
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.absolute(), start.absolute())



def config_prompts(cfg) -> tuple[str, ...]:
    """Every prompt `lsd train` gives a model of `cfg`: the built-in tasks' (`trained_prompts`)
    unless it trains on pairs alone, then those of its pairs manifest's training pairs."""
    d = cfg.data
    if cfg.model.prompt_dim == 0:
        return ()
    builtin = () if d.source == "pairs" else trained_prompts(cfg.model.prompt_dim, d.tasks,
                                                             d.prompt_phrasings)
    pairs = manifest_prompts(d.pairs) if d.pairs else ()
    return builtin + tuple(p for p in pairs if p not in builtin)
