"""Paired tasks: a source clip -> (input clip, target clip, prompt).

In:  a uint8 RGB clip `[T, H, W, 3]`. Out: the restyled clip, uint8 `[T, H, W, 3]`, and the prompt
that names the restyle. The input clip is the source clip itself, so a task is "restyle this
stream as the prompt says".

Per-frame restyles are built from OpenCV (pencil sketch, stylisation, cartoon, thermal colour
map, night vision, sepia, negative, edge glow). `motion_trails` is temporal: its target depends on
its own past output, `y_i = a * y_{i-1} + (1 - a) * f(x_i)`, so a model can only reproduce it by
using its history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np

from lsd_jax.errors import ConfigError


class Task(NamedTuple):
    """A restyle defined once per frame: `step(frame_hwc uint8, carry) -> (out_hwc uint8, carry)`
    (carry None on the first frame; only a temporal task keeps one), the prompt that names it,
    and other phrasings of that prompt a model may be trained on (`data.prompt_phrasings`).
    `fn(clip)` (training pairs) and `stream()` (one frame at a time, as a live stream is) are
    both that step run over frames."""

    name: str
    prompt: str
    step: Callable[[np.ndarray, object], tuple[np.ndarray, object]]
    phrasings: tuple[str, ...] = ()

    def fn(self, clip_thwc: np.ndarray) -> np.ndarray:
        """The restyled clip, uint8 `[T, H, W, 3]`."""
        stream = self.stream()
        return np.stack([stream(frame_hwc) for frame_hwc in clip_thwc])

    def stream(self) -> Callable[[np.ndarray], np.ndarray]:
        """A fresh stream of this task: call it on each frame in order."""
        carry = None

        def next_frame(frame_hwc: np.ndarray) -> np.ndarray:
            nonlocal carry
            out_hwc, carry = self.step(frame_hwc, carry)
            return out_hwc

        return next_frame


def _per_frame(fn_hwc: Callable[[np.ndarray], np.ndarray]):
    return lambda frame_hwc, carry: (fn_hwc(frame_hwc), None)


def _pencil_sketch(rgb_hwc: np.ndarray) -> np.ndarray:
    gray_hw, _ = cv2.pencilSketch(rgb_hwc, sigma_s=20, sigma_r=0.08, shade_factor=0.06)
    return cv2.cvtColor(gray_hw, cv2.COLOR_GRAY2RGB)


def _stylise(rgb_hwc: np.ndarray) -> np.ndarray:
    return cv2.stylization(rgb_hwc, sigma_s=20, sigma_r=0.45)


def _cartoon(rgb_hwc: np.ndarray) -> np.ndarray:
    smooth = cv2.bilateralFilter(rgb_hwc, d=5, sigmaColor=60, sigmaSpace=5)
    # Flat colour regions: quantise to 6 levels per channel.
    flat = (smooth // 43) * 43 + 21
    gray_hw = cv2.medianBlur(cv2.cvtColor(rgb_hwc, cv2.COLOR_RGB2GRAY), 3)
    edges_hw = cv2.adaptiveThreshold(gray_hw, 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                     cv2.THRESH_BINARY, 7, 4)
    return (flat * (edges_hw[..., None] > 0)).astype(np.uint8)


def _thermal(rgb_hwc: np.ndarray) -> np.ndarray:
    gray_hw = cv2.cvtColor(rgb_hwc, cv2.COLOR_RGB2GRAY)
    bgr = cv2.applyColorMap(cv2.GaussianBlur(gray_hw, (3, 3), 0), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _night_vision(rgb_hwc: np.ndarray) -> np.ndarray:
    gray_hw = cv2.cvtColor(rgb_hwc, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    # Amplified low light: a gamma lift, then green phosphor.
    lifted_hw = np.sqrt(gray_hw)
    out = np.stack([0.25 * lifted_hw, lifted_hw, 0.25 * lifted_hw], axis=-1)
    return np.clip(255.0 * out, 0, 255).astype(np.uint8)


_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]],
                  np.float32)


def _sepia(rgb_hwc: np.ndarray) -> np.ndarray:
    return np.clip(rgb_hwc.astype(np.float32) @ _SEPIA.T, 0, 255).astype(np.uint8)


def _negative(rgb_hwc: np.ndarray) -> np.ndarray:
    return 255 - rgb_hwc


def _edge_glow(rgb_hwc: np.ndarray) -> np.ndarray:
    gray_hw = cv2.cvtColor(rgb_hwc, cv2.COLOR_RGB2GRAY)
    edges_hw = cv2.Canny(gray_hw, 60, 150)
    glow_hw = cv2.GaussianBlur(cv2.dilate(edges_hw, np.ones((2, 2), np.uint8)), (5, 5), 0)
    dark = (rgb_hwc.astype(np.float32) * 0.3)
    neon = np.stack([glow_hw, 0.6 * glow_hw, glow_hw], axis=-1).astype(np.float32)
    return np.clip(dark + 1.5 * neon, 0, 255).astype(np.uint8)


TRAIL_DECAY = 0.7
TRAIL_TINT = np.array([1.1, 0.95, 0.8], np.float32)


def trail_tint(frames: np.ndarray) -> np.ndarray:
    """`f` of `motion_trails`: a warm tint, float32 in [0, 255], any leading shape."""
    return np.clip(frames.astype(np.float32) * TRAIL_TINT, 0, 255)


def _motion_trails_step(frame_hwc: np.ndarray, trail):
    """`y_0 = f(x_0)`, `y_i = decay * y_{i-1} + (1 - decay) * f(x_i)` with `f` a warm tint:
    moving things leave fading trails behind them. The recursion is carried in float32 and each
    output frame is rounded once."""
    f_hwc = trail_tint(frame_hwc)
    trail = f_hwc if trail is None else TRAIL_DECAY * trail + (1 - TRAIL_DECAY) * f_hwc
    return np.round(trail).astype(np.uint8), trail


TASKS: tuple[Task, ...] = (
    Task("pencil_sketch", "a pencil sketch", _per_frame(_pencil_sketch),
         ("a graphite pencil drawing", "hand-drawn with a pencil", "a sketch in grey pencil")),
    Task("stylise", "a watercolor painting", _per_frame(_stylise),
         ("painted in watercolours", "a soft watercolour artwork", "an aquarelle painting")),
    Task("cartoon", "a cartoon with bold outlines", _per_frame(_cartoon),
         ("a comic book style image", "cel-shaded animation",
          "a cartoon drawing with flat colours")),
    Task("thermal", "a thermal camera image", _per_frame(_thermal),
         ("infrared heat vision", "a heat map from an infrared camera", "thermal imaging")),
    Task("night_vision", "green night vision footage", _per_frame(_night_vision),
         ("seen through night-vision goggles", "a green low-light military camera",
          "night vision")),
    Task("sepia", "an old sepia photograph", _per_frame(_sepia),
         ("a vintage brown-toned photo", "sepia toned", "an antique photograph from the 1900s")),
    Task("negative", "a photographic negative", _per_frame(_negative),
         ("inverted colours", "a film negative", "the colours reversed")),
    Task("edge_glow", "glowing neon edges on a dark scene", _per_frame(_edge_glow),
         ("neon outlines in the dark", "glowing edge lines", "a dark scene traced in neon light")),
    Task("motion_trails", "long exposure motion trails", _motion_trails_step,
         ("a long-exposure photograph", "moving things leave ghostly trails",
          "motion blur trails")),
)
# Paraphrases of each task's prompt that no model is trained on: they test whether a model with a
# language encoder (prompt.encoder=minilm) understands a prompt it never saw (`lsd eval
# paraphrase`). Never add them to `phrasings`.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "pencil_sketch": ("a pencil drawing", "a black and white sketch"),
    "stylise": ("a watercolour picture", "an artwork made with watercolor paint"),
    "cartoon": ("a cartoon", "an animated cartoon with thick black lines"),
    "thermal": ("an infrared thermal image", "as seen by a heat camera"),
    "night_vision": ("night vision goggles view", "green night-time surveillance footage"),
    "sepia": ("a sepia photo", "an old brownish photograph"),
    "negative": ("a negative image", "inverted photo colours"),
    "edge_glow": ("neon glowing edges", "bright neon lines on black"),
    "motion_trails": ("motion trails", "long exposure light trails"),
}
TASK_NAMES = tuple(task.name for task in TASKS)


def task_named(name: str) -> Task:
    """The task called `name` (one of `TASK_NAMES`)."""
    if name not in TASK_NAMES:
        raise ConfigError(f"task {name!r}, expected one of {', '.join(TASK_NAMES)}")
    return TASKS[TASK_NAMES.index(name)]


def select_tasks(spec: str) -> tuple[Task, ...]:
    """The tasks named in `spec`: "all", or comma-separated names from `TASK_NAMES`."""
    if spec.strip() == "all":
        return TASKS
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise ConfigError(f"data.tasks={spec!r}: unknown task(s) {unknown}, expected 'all' or "
                         f"comma-separated names from {', '.join(TASK_NAMES)}")
    return tuple(task_named(n) for n in names)


def trained_prompts(prompt_dim: int, tasks: str, phrasings: bool = False) -> tuple[str, ...]:
    """The prompts `lsd train` gives a model with `model.prompt_dim`, `data.tasks` and
    `data.prompt_phrasings` (those of the tasks it selects, with their other phrasings when it
    trains on them); () when the model takes no prompt. The trainer records them in the model's
    checkpoint (and `lsd export` in the artifact), so serving knows them without the trainer."""
    if prompt_dim == 0:
        return ()
    return tuple(p for task in select_tasks(tasks)
                 for p in (task.prompt, *(task.phrasings if phrasings else ())))
