"""What `lsd eval` streams: paired clips of the held-out or validation split, and the endless
held-out camera path of the drift test. Both are pure functions of their seeds.
"""

from __future__ import annotations

import numpy as np

from lsd_jax.config import Config
from lsd_jax.errors import ConfigError
from lsd_jax.prompt import make_prompt_encoder
from lsd_train.data import ProceduralClips, photograph, split_photographs
from lsd_train.tasks import select_tasks

EVAL_SPLITS = ("heldout", "validation", "unseen")
# "validation": the training photographs under camera seeds training never draws; "unseen":
# pictures no split trains on or holds out (`lsd_train.data.UNSEEN_PHOTOGRAPHS`). Recipe choices are
# made on these two, so the held-out split stays untouched.
VALIDATION_SEED_OFFSET = 1_000_003


def heldout_pairs(cfg: Config, *, clips: int, frames: int, seed: int = 0, tasks: str = "all",
                  split: str = "heldout"):
    """`(task_names, prompts, cond, target, prompt_vecs)` for every task x held-out clip (or x
    validation clip: `split="validation"`, training photographs under unseen camera seeds; or x
    unseen clip: `split="unseen"`, pictures no split trains on or holds out).

    cond/target uint8 `[n_tasks * clips, frames, H, W, 3]` (task-major); prompt vectors
    `[n_tasks * clips, P]` or None for a model without prompts."""
    m = cfg.model
    if split not in EVAL_SPLITS:
        raise ConfigError(f"eval split {split!r}, expected one of {EVAL_SPLITS}")
    if split == "validation":
        source = ProceduralClips(frames, m.frame_height, m.frame_width,
                                 seed=cfg.data.shuffle_seed + VALIDATION_SEED_OFFSET + seed,
                                 split="train", heldout_images=cfg.data.heldout_images)
    else:
        source = ProceduralClips(frames, m.frame_height, m.frame_width, seed=seed,
                                 split=split, heldout_images=cfg.data.heldout_images)
    sources = [source[i] for i in range(clips)]
    chosen = select_tasks(tasks)
    encoder = make_prompt_encoder(cfg)
    cond, target, prompts = [], [], []
    for task in chosen:
        vec = None if encoder is None else np.asarray(encoder.encode(task.prompt), np.float32)
        for clip in sources:
            cond.append(clip)
            target.append(task.fn(clip))
            prompts.append(vec)
    prompt_bp = None if encoder is None else np.stack(prompts)
    return ([t.name for t in chosen], [t.prompt for t in chosen], np.stack(cond),
            np.stack(target), prompt_bp)


class EndlessPath:
    """An endless, smooth, periodic camera path over a held-out photograph, with sprites.

    `frame(i)` is uint8 `[H, W, 3]`, a pure function of `(seed, i)` and periodic in `i` with
    period `period`: the camera centre, view size and angle are sums of sinusoids whose periods
    divide `period`, and each sprite bounces between the frame edges a whole number of times per
    period. Speeds are those of the training clips (a few pixels per frame).
    """

    def __init__(self, cfg: Config, *, seed: int = 0, period: int = 1000):
        if period < 8:
            raise ConfigError(f"drift period={period}, expected >= 8 frames")
        m = cfg.model
        self.height, self.width, self.period = m.frame_height, m.frame_width, period
        rng = np.random.default_rng((seed, 1, 2**31 - 1))
        names = split_photographs("heldout", cfg.data.heldout_images)
        # The seed picks the photograph: even seeds the last held-out one (a real photograph).
        self.image = photograph(names[::-1][seed % len(names)], 4 * max(self.height,
                                                                       self.width))
        ih, iw = self.image.shape[:2]
        short = min(ih, iw)
        # Harmonics k of the base frequency 1/period; a few cycles per period keep it smooth.
        self.harmonics = np.array([max(1, period // 160), max(2, period // 60),
                                   max(3, period // 36)], np.float64)
        self.phase = rng.uniform(0, 2 * np.pi, (4, 3))
        self.view_mean, self.view_amp = 0.5 * short, 0.15 * short
        margin = (self.view_mean + self.view_amp) / 2
        self.center_mid = np.array([iw / 2, ih / 2])
        self.center_amp = np.maximum(np.array([iw / 2, ih / 2]) - margin, 0.0) / 2.0
        self.angle_amp = 20.0
        self.sprites = []
        for _ in range(2):
            radius = rng.uniform(0.06, 0.12) * min(self.height, self.width)
            span = np.array([self.width, self.height]) - 2 * radius
            trips = rng.integers(max(1, period // 120), max(2, period // 40) + 1, 2)
            self.sprites.append((radius, tuple(int(c) for c in rng.integers(0, 256, 3)),
                                 rng.uniform(0, 2 * span), span, trips, rng.random() < 0.5))

    def _wave(self, row: int, i: int) -> float:
        u = 2 * np.pi * (i % self.period) / self.period
        return float(np.mean(np.sin(self.harmonics * u + self.phase[row])))

    def frame(self, i: int) -> np.ndarray:
        import cv2

        h, w = self.height, self.width
        view = self.view_mean + self.view_amp * self._wave(0, i)
        cx = self.center_mid[0] + self.center_amp[0] * 2 * self._wave(1, i)
        cy = self.center_mid[1] + self.center_amp[1] * 2 * self._wave(2, i)
        theta = np.deg2rad(self.angle_amp * 2 * self._wave(3, i))
        scale = view / min(h, w)
        cos, sin = scale * np.cos(theta), scale * np.sin(theta)
        mat = np.array([[cos, -sin, cx - cos * w / 2 + sin * h / 2],
                        [sin, cos, cy - sin * w / 2 - cos * h / 2]], np.float64)
        frame = cv2.warpAffine(self.image, mat, (w, h), flags=cv2.INTER_LINEAR
                               | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
        u = (i % self.period) / self.period
        for radius, color, offset, span, trips, square in self.sprites:
            # Distance travelled `offset + 2 * span * trips * u`, reflected into [0, span].
            p = radius + np.abs((offset + 2 * span * trips * u) % (2 * span) - span)
            x, y, r = (int(round(v * 16)) for v in (p[0], p[1], radius))
            if square:
                cv2.rectangle(frame, (x - r, y - r), (x + r, y + r), color, -1, cv2.LINE_AA, 4)
            else:
                cv2.circle(frame, (x, y), r, color, -1, cv2.LINE_AA, 4)
        return frame
