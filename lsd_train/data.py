"""Grain input pipeline: clip sources, the paired-task layer, per-process sharding, batches.

Sources (random access: `len(source)`, `source[i] -> uint8 clip [T, H, W, 3]` or None):
- `ProceduralClips`: photographs bundled with scikit-image moved by a random camera path (pan,
  zoom, rotation) with moving sprites. Endless (2^62 items) and a pure function of
  `(seed, split, index)`; the "heldout" split uses other photographs and other camera seeds.
- `VideoFolderClips`: every video file under a folder, decoded with OpenCV into clips of
  `clip_frames` frames at `fps`, centre-cropped and resized. An unreadable file is skipped with a
  `DataWarning` naming it (when indexed, or None when it fails while a clip is read, and the
  pipeline drops that clip); an empty folder or a video shorter than one clip is a `DataError`.

`make_dataset` puts a source behind the paired-task layer (`PairedClips`: input clip, target clip,
prompt embedding, task id), shards it over processes and batches it. Element `k` of process `p`'s
stream is global element `(k // b) * B + p * b + k % b` (`B` the global batch, `b = B / count`),
so the rows of one global batch are the same whatever the process count. The iterator's
`get_state()` is what a checkpoint stores to resume exactly.
"""

from __future__ import annotations

import bisect
import functools
import sys
import warnings
from pathlib import Path

import cv2
import grain
import numpy as np

from lsd_jax.codec import resize_and_crop
from lsd_jax.config import Config
from lsd_jax.errors import ConfigError, DataError, DataWarning
from lsd_jax.prompt import make_prompt_encoder
from lsd_train.latents import LatentClips
from lsd_train.pairs import PairsClips, write_frames
from lsd_train.tasks import select_tasks

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")
# Colour photographs bundled with scikit-image (no download); the last `heldout_images` of them
# are the held-out split.
# ("cat" is left out: it is "chelsea" mirrored, and would leak across the split.)
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
               "colorwheel", "rocket")
# `data.photographs="extended"` adds these to the training split (never to the held-out one): more
# scenes and textures, colour and greyscale, all shipped inside scikit-image.
EXTRA_PHOTOGRAPHS = ("retina", "motorcycle", "camera", "coins", "brick", "gravel", "page")
PHOTOGRAPH_SETS = ("classic", "extended")
# The "unseen" split: two colour pictures that no split trains on or holds out, shipped inside the
# installed packages (matplotlib's sample portrait, scikit-image's logo), paired like the held-out
# split's photograph and graphic. Recipes are chosen on them when what matters is how a model
# carries to pictures it never trained on (the "validation" eval split reuses the training
# photographs under new camera seeds).
UNSEEN_PHOTOGRAPHS = ("grace_hopper", "logo")
SPLITS = ("train", "heldout", "unseen")
ENDLESS = 2**62




# ----------------------------------------------------------------------------- procedural


@functools.cache
def photograph(name: str, min_side: int) -> np.ndarray:
    """A scikit-image photograph, RGB uint8, resized (area) so its short side is `min_side`."""
    import skimage.data

    if name == "grace_hopper":
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    elif name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3])
    scale = min_side / min(image.shape[:2])
    size = (max(min_side, round(image.shape[1] * scale)), max(min_side, round(image.shape[0] *
                                                                               scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def split_photographs(split: str, heldout: int, photographs: str = "classic") -> tuple[str, ...]:
    """The photograph names of `split`: the last `heldout` of `PHOTOGRAPHS` for "heldout", the
    others for "train" (with `EXTRA_PHOTOGRAPHS` when `photographs` is "extended"),
    `UNSEEN_PHOTOGRAPHS` for "unseen"."""
    if split not in SPLITS:
        raise ConfigError(f"data split {split!r}, expected one of {SPLITS}")
    if not 0 < heldout < len(PHOTOGRAPHS):
        raise ConfigError(f"data.heldout_images={heldout}, expected 1..{len(PHOTOGRAPHS) - 1}")
    if photographs not in PHOTOGRAPH_SETS:
        raise ConfigError(f"data.photographs={photographs!r}, expected one of {PHOTOGRAPH_SETS}")
    if split == "heldout":
        return PHOTOGRAPHS[-heldout:]
    if split == "unseen":
        return UNSEEN_PHOTOGRAPHS
    extra = EXTRA_PHOTOGRAPHS if photographs == "extended" else ()
    return PHOTOGRAPHS[:-heldout] + extra


class ProceduralClips:
    """Endless random-access clips: `[clip_frames, height, width, 3]` uint8.

    Item `i` of split `s` draws everything from `np.random.default_rng((seed, s, i))`: a
    photograph of the split, a camera path whose view (30-80% of the photograph's short side)
    pans, zooms and rotates smoothly over the clip, and 1-3 antialiased sprites (discs and
    squares) moving in straight lines that bounce off the frame's edges.
    """

    def __init__(self, clip_frames: int, height: int, width: int, *, seed: int = 0,
                 split: str = "train", heldout_images: int = 2, photographs: str = "classic"):
        self.clip_frames, self.height, self.width = clip_frames, height, width
        self.names = split_photographs(split, heldout_images, photographs)
        self.seed, self.split_id = seed, SPLITS.index(split)

    def __len__(self) -> int:
        return ENDLESS

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.split_id, int(index)))
        t, h, w = self.clip_frames, self.height, self.width
        # Views span 30-80% of the short side, so 4x the frame keeps sampling above 1.2x.
        image = photograph(self.names[rng.integers(len(self.names))], 4 * max(h, w))
        ih, iw = image.shape[:2]
        view = rng.uniform(0.3, 0.8, 2) * min(ih, iw)  # start and end view size, pixels
        angle = rng.uniform(-30, 30) + rng.uniform(-20, 20, 1) * np.array([0.0, 1.0])
        margin = view.max() / 2  # the view stays inside the photograph (corners aside)
        center = rng.uniform([margin, margin], [iw - margin, ih - margin], (2, 2))
        u_t = np.linspace(0.0, 1.0, t)
        u_t = u_t * u_t * (3 - 2 * u_t)  # smoothstep: the camera eases in and out
        frames = []
        for i in range(t):
            scale = (view[0] + (view[1] - view[0]) * u_t[i]) / min(h, w)
            theta = np.deg2rad(angle[0] + (angle[1] - angle[0]) * u_t[i])
            cx, cy = center[0] + (center[1] - center[0]) * u_t[i]
            cos, sin = scale * np.cos(theta), scale * np.sin(theta)
            # Output pixel (x, y) samples the photograph at c + R(theta) s (x - w/2, y - h/2).
            m = np.array([[cos, -sin, cx - cos * w / 2 + sin * h / 2],
                          [sin, cos, cy - sin * w / 2 - cos * h / 2]], np.float64)
            frames.append(cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR
                                         | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT))
        clip_thwc = np.stack(frames)
        self._draw_sprites(rng, clip_thwc)
        return clip_thwc

    def _draw_sprites(self, rng: np.random.Generator, clip_thwc: np.ndarray) -> None:
        t, h, w = clip_thwc.shape[:3]
        for _ in range(rng.integers(1, 4)):
            radius = rng.uniform(0.06, 0.15) * min(h, w)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            pos = rng.uniform([radius, radius], [w - radius, h - radius])
            vel = rng.uniform(-0.08, 0.08, 2) * np.array([w, h])
            square = rng.random() < 0.5
            for i in range(t):
                # Reflect the straight path into the frame: bouncing off the edges.
                p = pos + vel * i
                span = np.array([w, h]) - 2 * radius
                p = radius + np.abs((p - radius + 2 * span) % (2 * span) - span)
                x, y, r = (int(round(v * 16)) for v in (p[0], p[1], radius))
                if square:
                    cv2.rectangle(clip_thwc[i], (x - r, y - r), (x + r, y + r), color, -1,
                                  cv2.LINE_AA, 4)
                else:
                    cv2.circle(clip_thwc[i], (x, y), r, color, -1, cv2.LINE_AA, 4)


# ----------------------------------------------------------------------------- video folder


class VideoFolderClips:
    """Non-overlapping clips of every readable video under `directory` (sorted, recursive).

    A clip is `clip_frames` frames taken every `stride = max(1, round(source_fps / fps))` source
    frames, RGB uint8, centre-cropped to the aspect of `height x width` and resized.
    """

    def __init__(self, directory: str | Path, clip_frames: int, height: int, width: int,
                 fps: float):
        self.directory = Path(directory)
        self.clip_frames, self.height, self.width, self.fps = clip_frames, height, width, fps
        if not self.directory.is_dir():
            raise DataError(f"data.video_dir={str(directory)!r} is not a directory")
        paths = sorted(p for p in self.directory.rglob("*")
                       if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not paths:
            raise DataError(f"data.video_dir={str(directory)!r} holds no video files (expected "
                            f"files ending in {', '.join(VIDEO_EXTENSIONS)})")
        self.videos: list[tuple[Path, int]] = []  # (path, stride)
        starts = [0]  # cumulative clip counts
        for path in paths:
            probe = self._probe(path)
            if probe is None:
                continue
            frames, stride = probe
            needed = (clip_frames - 1) * stride + 1
            if frames < needed:
                raise DataError(f"video {str(path)!r} has {frames} frames, shorter than one clip: "
                                f"data.clip_frames={clip_frames} at data.fps={fps} needs "
                                f"{needed} source frames (every {stride}th)")
            self.videos.append((path, stride))
            starts.append(starts[-1] + (frames - needed) // (clip_frames * stride) + 1)
        if not self.videos:
            raise DataError(f"data.video_dir={str(directory)!r}: none of its {len(paths)} video "
                            "files could be read")
        self._starts = starts

    def _probe(self, path: Path) -> tuple[int, int] | None:
        """`(frame count, stride)` of a readable video; None (with a warning) otherwise."""
        cap = cv2.VideoCapture(str(path))
        try:
            ok, frame = cap.read() if cap.isOpened() else (False, None)
            if not ok or frame is None:
                warnings.warn(f"skipping video {str(path)!r}: OpenCV cannot decode it",
                              DataWarning, stacklevel=3)
                return None
            frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if frames <= 0:  # containers without an index (some gifs, streams): count them
                frames = 1
                while cap.grab():
                    frames += 1
            source_fps = cap.get(cv2.CAP_PROP_FPS)
            stride = max(1, round(source_fps / self.fps)) if source_fps > 0 else 1
            return frames, stride
        finally:
            cap.release()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray | None:
        video = bisect.bisect_right(self._starts, index) - 1
        path, stride = self.videos[video]
        first = (index - self._starts[video]) * self.clip_frames * stride
        cap = cv2.VideoCapture(str(path))
        try:
            cap.set(cv2.CAP_PROP_POS_FRAMES, first)
            frames = []
            for j in range((self.clip_frames - 1) * stride + 1):
                ok, frame_bgr = cap.read()
                if not ok:
                    warnings.warn(f"skipping a clip of video {str(path)!r}: frame {first + j} "
                                  "cannot be decoded", DataWarning, stacklevel=2)
                    return None
                if j % stride == 0:
                    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
                    frames.append(resize_and_crop(rgb, self.height, self.width))
            return np.stack(frames)
        finally:
            cap.release()


# ----------------------------------------------------------------------------- paired tasks


class PairedClips:
    """`source[i]` -> `{"cond": input clip, "target": restyled clip (uint8 [T, H, W, 3]),
    "prompt": float32 [prompt_dim] (absent when the model takes none), "task": int32}`; the task
    (and, with `data.prompt_phrasings`, which of its phrasings is the prompt) is drawn from
    `rng((seed, i))`, so an item is a pure function of its index. None stays None."""

    def __init__(self, source, cfg: Config, seed: int):
        self.source, self.seed = source, seed
        self.phrasings = cfg.data.prompt_phrasings
        self.tasks = select_tasks(cfg.data.tasks)
        self.encoder = make_prompt_encoder(cfg)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        clip_thwc = self.source[index]
        if clip_thwc is None:
            return None
        rng = np.random.default_rng((self.seed, int(index)))
        task_id = int(rng.integers(len(self.tasks)))
        task = self.tasks[task_id]
        item = {"cond": clip_thwc, "target": task.fn(clip_thwc), "task": np.int32(task_id)}
        if self.encoder is not None:
            prompt = task.prompt
            if self.phrasings:
                choices = (task.prompt, *task.phrasings)
                prompt = choices[int(rng.integers(len(choices)))]
            item["prompt"] = self.encoder.encode(prompt)
        return item


def make_pairs_source(cfg: Config):
    """The training pairs of the manifest `data.pairs` at the model's frame size."""
    d, m = cfg.data, cfg.model
    return PairsClips(d.pairs, clip_frames=d.clip_frames, height=m.frame_height,
                      width=m.frame_width, fps=d.fps, seed=d.shuffle_seed,
                      encoder=make_prompt_encoder(cfg))


class MixedClips:
    """Item `i` from `pairs` with probability `fraction` (drawn from `rng((seed, 13, i))`), else
    from `base` (index taken modulo a finite base's length): a pure function of `i`, endless."""

    def __init__(self, base, pairs, fraction: float, seed: int):
        self.base, self.pairs, self.fraction, self.seed = base, pairs, fraction, seed

    def __len__(self) -> int:
        return ENDLESS

    def __getitem__(self, index: int):
        if np.random.default_rng((self.seed, 13, int(index))).random() < self.fraction:
            return self.pairs[index]
        return self.base[index % len(self.base)]


def make_source(cfg: Config, split: str = "train"):
    """The clip source `cfg.data` describes, at the model's frame size."""
    d, m = cfg.data, cfg.model
    if cfg.codec != "pixel":
        raise ConfigError(f"codec={cfg.codec!r}: data.source={d.source!r} gives pixel clips; for a "
                          "latent codec encode them once with `lsd data encode` and train with "
                          "data.source=latents data.latent_dir=DIR")
    if d.source == "procedural":
        return ProceduralClips(d.clip_frames, m.frame_height, m.frame_width, seed=d.shuffle_seed,
                               split=split, heldout_images=d.heldout_images,
                               photographs=d.photographs)
    if not d.video_dir:
        raise ConfigError("data.source='video_folder' needs data.video_dir=DIR")
    return VideoFolderClips(d.video_dir, d.clip_frames, m.frame_height, m.frame_width, d.fps)


def global_index(k: int, batch: int, process_index: int, process_count: int) -> int:
    """The global element behind element `k` of process `process_index`'s stream (module doc)."""
    local = batch // process_count
    return (k // local) * batch + process_index * local + k % local


def make_dataset(cfg: Config, *, split: str = "train", process_index: int = 0,
                 process_count: int = 1, batch_size: int | None = None) -> grain.IterDataset:
    """Batches of this process's rows: dicts of arrays with a leading `batch / process_count`.

    Finite sources (video folders) are shuffled by `data.shuffle_seed` and repeated forever.
    """
    batch = cfg.train.batch_size if batch_size is None else batch_size
    if batch % process_count:
        raise ConfigError(f"train.batch_size={batch} is not divisible by the process count "
                          f"{process_count}")
    if cfg.data.source == "latents":
        source = LatentClips(cfg)  # already paired and encoded
        items = grain.MapDataset.source(source)
    elif cfg.data.source == "pairs":
        source = make_pairs_source(cfg)
        items = grain.MapDataset.source(source)
    else:
        source = make_source(cfg, split)
        paired = PairedClips(source, cfg, cfg.data.shuffle_seed)
        if cfg.data.pairs_fraction:
            paired = MixedClips(paired, make_pairs_source(cfg), cfg.data.pairs_fraction,
                                cfg.data.shuffle_seed)
        items = grain.MapDataset.source(paired)
    if len(source) != ENDLESS:
        items = items.shuffle(seed=cfg.data.shuffle_seed).repeat(None)
    local = grain.MapDataset.range(sys.maxsize // batch).map(
        lambda k: items[global_index(k, batch, process_index, process_count)])
    options = grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=2 * batch)
    # Clips that failed to decode are None: the iter dataset drops them.
    return local.to_iter_dataset(options).batch(batch // process_count)


def write_procedural_videos(out_dir: str | Path, *, split: str = "train", count: int = 16,
                            frames: int = 48, size: int = 256, seed: int = 0,
                            heldout_images: int = 2, photographs: str = "classic",
                            progress=lambda done, total: None) -> list[Path]:
    """`count` clips of the procedural source (`train.data.ProceduralClips`: scikit-image
    photographs under camera paths with sprites) of `split`, `frames` frames of `size x size`,
    as PNG frame folders `out_dir/procedural_{split}_{i}`: input videos for `make_pairs` whose
    pictures and camera paths the split decides (the held-out split's are never trained on)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = ProceduralClips(frames, size, size, seed=seed, split=split,
                             heldout_images=heldout_images, photographs=photographs)
    written = []
    for i in range(count):
        folder = out_dir / f"procedural_{split}_{i:03d}"
        if folder.exists():
            raise DataError(f"{str(folder)!r} exists: give a new --out folder")
        write_frames(folder, source[i])
        written.append(folder)
        progress(i + 1, count)
    return written
