"""`lsd eval`: quality of a trained model on the held-out split, and long-stream drift.

Models are named by a spec (`resolve_model`): `demo` (the weights shipped in the package), a
model checkpoint directory (`config.json` + `params/`), a training work directory (its EMA model,
`WORKDIR/model`), or `WORKDIR@STEP` (the EMA weights of that training checkpoint). `NAME=SPEC`
labels it in tables and plots.

Quality (`evaluate_quality`): clips of the procedural held-out split (photographs and camera seeds
never used in training), each restyled by every paired task of `lsd_train/tasks.py`, streamed frame
by frame through the jitted streaming step (what `lsd stream` runs) at each step count. Per task and
step count: PSNR and SSIM of every output frame against the target frame (scikit-image, 8-bit data
range), and temporal flicker `mean |(out_i - out_{i-1}) - (target_i - target_{i-1})|` in 8-bit
levels.

Drift (`evaluate_drift`): one endless held-out camera path (`EndlessPath`), streamed for N frames;
PSNR of every frame. The path is periodic (`period` frames: camera and sprites return exactly to
where they were), so the first and the last `period` frames show the model the same input and any
difference between their mean PSNR is the model's own drift.
"""

from __future__ import annotations

import hashlib
import math
import time
import zipfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lsd_jax import resolve
from lsd_jax.atomic import atomic_path
from lsd_jax.checkpoint import load_config_from
from lsd_jax.codec import make_codec
from lsd_jax.config import Config
from lsd_jax.errors import CheckpointError, ConfigError
from lsd_jax.model import model_from_params
from lsd_jax.progress import progress_bar
from lsd_jax.prompt import make_prompt_encoder
from lsd_jax.stream_state import StreamState, stream_frames
from lsd_jax.streaming import init_stream, make_step
from lsd_train.baselines import (
    BASELINES,
    COLOR_MAPS,
    apply_color_map,
    baseline_outputs,
    fit_baselines,
    fit_color_map,
    floor_of,
)
from lsd_train.eval_data import EndlessPath, heldout_pairs
from lsd_train.latents import pixel_twin
from lsd_train.pairs import check_pair, read_frames, read_manifest
from lsd_train.tasks import task_named
from lsd_train.trainer import init_state

QUALITY_STEPS = (1, 2, 3, 4, 8, 12)
TEMPORAL_TASKS = ("motion_trails",)


# ----------------------------------------------------------------------------- models


class EvalModel(NamedTuple):
    """A model to evaluate: its label, the spec it came from, config, graph and weights, and the
    codec its frames go through (`None`: the config's pixel codec; a latent model's VAE codec is
    stored beside its weights)."""

    label: str
    spec: str
    cfg: Config
    graphdef: object
    state: object
    codec: object = None

    @property
    def pixel_cfg(self) -> Config:
        """The config the evaluation clips are drawn for: the model's own, or for a latent model
        the pixel-space twin at its codec's frame size."""
        if self.codec is None or self.codec.name == "pixel":
            return self.cfg
        return pixel_twin(self.cfg, self.codec.frame_hw)

    def step(self, steps: int):
        """The jitted streaming step at `steps` denoising steps, bound to these weights (and the
        codec's): `(state, frame_bhwc, prompt_bp=None) -> (state, out_bhwc)`."""
        step = make_step(self.cfg, self.graphdef, steps=steps, codec=self.codec)
        if self.codec is None:
            return partial(step, self.state)
        return partial(step, self.state, codec_params=self.codec.params)


def resolve_model(spec: str, overrides=()) -> EvalModel:
    """The model named by `spec` (see the module docstring); errors name the spec. `overrides`
    (`key.path=value`) apply to its stored config: how it runs, not its shapes."""
    label, _, path_spec = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path_spec = path_spec.strip()
    if not path_spec:
        raise CheckpointError(f"model spec {spec!r} names no model, expected 'demo', a model "
                              "directory, a training work directory or WORKDIR@STEP")

    codec_dir = None
    if path_spec == "demo":
        cfg, model = resolve.resolve_model(overrides=overrides)[:2]
    elif "@" in path_spec:
        workdir, _, step_text = path_spec.rpartition("@")
        try:
            step = int(step_text)
        except ValueError:
            raise CheckpointError(f"model spec {spec!r}: {step_text!r} is not a step number "
                                  "(expected WORKDIR@STEP)") from None
        cfg, model = load_training_step(Path(workdir), step, overrides)
        if (Path(workdir) / "model" / "vae.json").is_file():
            codec_dir = Path(workdir) / "model"
    else:
        try:
            resolved = resolve.resolve_model(path_spec, overrides=overrides)
        except CheckpointError as err:
            raise CheckpointError(f"model spec {spec!r}: {err}") from None
        cfg, model, codec_dir = resolved.cfg, resolved.model, resolved.codec_dir
    codec = None
    if cfg.codec != "pixel":
        codec = make_codec(cfg, codec_dir)
    graphdef, state = nnx.split(model)
    return EvalModel(label or path_spec, path_spec, cfg, graphdef, state, codec)


def load_training_step(workdir: Path, step: int, overrides=()):
    """`(cfg, model)` holding the EMA weights of training checkpoint `step` in `workdir`."""
    if not (workdir / "model" / "config.json").is_file():
        raise CheckpointError(f"{str(workdir)!r} is not a training work directory (no "
                              "model/config.json)")
    cfg = load_config_from(workdir / "model", overrides)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    steps = manager.all_steps()
    if step not in steps:
        raise CheckpointError(f"{str(workdir)!r} has no checkpoint at step {step} (it has "
                              f"{sorted(steps)})")
    abstract = jax.eval_shape(lambda: init_state(cfg))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    manager.close()
    return cfg, model_from_params(cfg.model, restored.state["ema"])


# ----------------------------------------------------------------------------- metrics


def frame_psnr(target_hwc: np.ndarray, out_hwc: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(target_hwc, out_hwc):
        return 100.0  # identical frames: PSNR is infinite; capped so means stay finite
    return float(peak_signal_noise_ratio(target_hwc, out_hwc, data_range=255))


def frame_ssim(target_hwc: np.ndarray, out_hwc: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(target_hwc, out_hwc, channel_axis=-1, data_range=255))


def flicker(out_thwc: np.ndarray, target_thwc: np.ndarray) -> float:
    """`mean |(out_i - out_{i-1}) - (target_i - target_{i-1})|` over i >= 1, in 8-bit levels."""
    out = out_thwc.astype(np.float32)
    tgt = target_thwc.astype(np.float32)
    return float(np.mean(np.abs(np.diff(out, axis=0) - np.diff(tgt, axis=0))))


def clip_psnr(out_thwc: np.ndarray, target_thwc: np.ndarray) -> float:
    """Mean per-frame PSNR of one clip against its target."""
    return float(np.mean([frame_psnr(t, o) for t, o in zip(target_thwc, out_thwc, strict=True)]))


def frame_change(clip_thwc: np.ndarray) -> float:
    """`mean |x_i - x_{i-1}|` over i >= 1, in 8-bit levels: how much a clip changes per frame."""
    return float(np.mean(np.abs(np.diff(clip_thwc.astype(np.float32), axis=0))))


def clip_metrics(out_thwc: np.ndarray, target_thwc: np.ndarray) -> dict[str, float]:
    """Mean per-frame PSNR and SSIM, flicker, and the frame-to-frame change of the output and
    of the target, of one streamed clip against its target."""
    return {"psnr": clip_psnr(out_thwc, target_thwc),
            "ssim": float(np.mean([frame_ssim(t, o) for t, o in zip(target_thwc, out_thwc,
                                                                    strict=True)])),
            "flicker": flicker(out_thwc, target_thwc),
            "change": frame_change(out_thwc), "target_change": frame_change(target_thwc)}


# ----------------------------------------------------------------------------- streaming


def stream_batch(model: EvalModel, cond_bthwc: np.ndarray, prompt_bp: np.ndarray | None, *,
                 steps: int, seed: int = 0, on_frame=None) -> np.ndarray:
    """Stream `b` uint8 clips `[b, T, H, W, 3]` side by side through the jitted streaming step
    at `steps` denoising steps; returns the uint8 outputs `[b, T, H, W, 3]`."""
    batch, frames = cond_bthwc.shape[:2]
    outs = []
    for item in stream_frames(model.step(steps), init_stream(model.cfg, batch, seed),
                              (cond_bthwc[:, i] for i in range(frames)), prompt_bp, timed=False):
        outs.append(item.out_bhwc)
        if on_frame is not None:
            on_frame()
    return np.stack([np.asarray(o) for o in outs], axis=1)


# ----------------------------------------------------------------------------- quality


def evaluate_quality(model: EvalModel, *, steps_list=QUALITY_STEPS, clips: int = 4,
                     frames: int = 24, seed: int = 0, tasks: str = "all",
                     split: str = "heldout", progress: bool = True,
                     baselines: bool = True) -> dict:
    """Per task and step count: PSNR, SSIM, flicker on held-out clips (module docstring).

    With `baselines`, every task also gets the PSNR of the floors of `lsd_train/baselines.py`
    (`"baselines": {kind: psnr}`, `"floor"`: the PSNR to reach, 1 dB over the best of them, at
    most 40 dB) and every step count the model's `margin` over the floor and whether it
    `meets_floor` (margin >= 0); the summary counts the tasks meeting their floor and gives the
    baselines' per-frame means.

    Returns `{"model", "clips", "frames", "tasks": {name: {"prompt", "steps": {k: metrics}}},
    "summary": {k: {"per_frame_psnr", "temporal_psnr", ...}}, "samples": {k: uint8 arrays}}`;
    `samples` (first clip of every task, 3 steps or the nearest) feeds the strip picture.
    """
    if clips < 1 or frames < 2:
        raise ConfigError(f"eval clips={clips}, frames={frames}: expected clips >= 1 and "
                          "frames >= 2")
    names, prompts, cond, target, prompt_bp = heldout_pairs(model.pixel_cfg, clips=clips,
                                                            frames=frames, seed=seed,
                                                            tasks=tasks, split=split)
    results = {name: {"prompt": p, "steps": {}} for name, p in zip(names, prompts, strict=True)}
    sample_k = min(steps_list, key=lambda k: abs(k - 3))
    samples = {}
    t0 = time.perf_counter()
    with progress_bar(f"eval {model.label}", len(steps_list) * frames,
                      enabled=progress) as tracker:
        for k in steps_list:
            out = stream_batch(model, cond, prompt_bp, steps=k, seed=seed, on_frame=tracker.advance)
            for ti, name in enumerate(names):
                rows = range(ti * clips, (ti + 1) * clips)
                per_clip = [clip_metrics(out[r], target[r]) for r in rows]
                metrics = {key: float(np.mean([c[key] for c in per_clip])) for key in per_clip[0]}
                # the output's frame-to-frame change over the target's (1: as steady as it)
                metrics["flicker_ratio"] = metrics["change"] / max(metrics["target_change"], 1e-6)
                results[name]["steps"][k] = metrics
            if k == sample_k:
                samples = {"cond": cond[::clips], "out": out[::clips], "target": target[::clips]}
    if baselines:
        fits = fit_baselines(model.pixel_cfg, tasks)
        for ti, name in enumerate(names):
            rows = range(ti * clips, (ti + 1) * clips)
            per_clip = [baseline_outputs(fits[name], cond[r]) for r in rows]
            results[name]["baselines"] = {
                kind: float(np.mean([clip_psnr(outs[kind], target[r])
                                     for outs, r in zip(per_clip, rows, strict=True)]))
                for kind in BASELINES}
            results[name]["floor"] = floor_of(results[name]["baselines"])
            for k in steps_list:
                step = results[name]["steps"][k]
                step["margin"] = step["psnr"] - results[name]["floor"]
                step["meets_floor"] = bool(step["margin"] >= 0)
    summary = {}
    for k in steps_list:
        per_frame = [r["steps"][k]["psnr"] for n, r in results.items() if n not in TEMPORAL_TASKS]
        temporal = [r["steps"][k]["psnr"] for n, r in results.items() if n in TEMPORAL_TASKS]
        summary[k] = {
            "per_frame_psnr": float(np.mean(per_frame)) if per_frame else math.nan,
            "temporal_psnr": float(np.mean(temporal)) if temporal else math.nan,
            "mean_ssim": float(np.mean([r["steps"][k]["ssim"] for r in results.values()])),
            "mean_flicker": float(np.mean([r["steps"][k]["flicker"] for r in results.values()])),
            "max_flicker_ratio": max(r["steps"][k]["flicker_ratio"] for r in results.values()),
        }
        if baselines:
            summary[k]["tasks_meeting_floor"] = sum(
                r["steps"][k]["meets_floor"] for r in results.values())
    baseline_summary = None
    if baselines:
        baseline_summary = {
            "per_frame_psnr": {kind: float(np.mean([r["baselines"][kind] for n, r in
                                                    results.items() if n not in TEMPORAL_TASKS]))
                               for kind in BASELINES},
            "per_frame_best_psnr": float(np.mean([max(r["baselines"].values()) for n, r in
                                                  results.items() if n not in TEMPORAL_TASKS])),
        }
    return {"model": model.label, "spec": model.spec, "config": model.cfg.name,
            "clips": clips, "frames": frames, "seed": seed, "split": split,
            "steps_list": list(steps_list),
            "sample_steps": sample_k, "seconds": time.perf_counter() - t0, "tasks": results,
            "summary": summary, "baseline_summary": baseline_summary, "samples": samples}


# ----------------------------------------------------------------------------- drift


def drift_run_key(model: EvalModel, *, frames: int, steps: int, task: str, period: int,
                  seed: int) -> dict:
    """What makes two drift runs the same stream (a checkpoint resumes only its own run): the
    model's spec and weights (`weights_digest`), the stream's length, steps, task, period, seed
    and noise."""
    return {"spec": model.spec, "weights": weights_digest(model), "frames": frames,
            "steps": steps, "task": task, "period": period, "seed": seed,
            "frame_noise": model.cfg.diffusion.frame_noise}


def weights_digest(model: EvalModel) -> str:
    """sha256 of the model's weights and its codec's (every array's dtype, shape and bytes)."""
    digest = hashlib.sha256()
    leaves = jax.tree.leaves(model.state)
    if model.codec is not None:
        leaves += jax.tree.leaves(model.codec.params)
    for leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()



def save_drift_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write `evaluate_drift`'s checkpoint atomically (a stop while writing keeps the last one)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **checkpoint)


def load_drift_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_drift_checkpoint`, as `evaluate_drift(resume=...)` takes it;
    a damaged file or another kind of file is a `CheckpointError` naming it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"drift checkpoint {str(path)!r} is unreadable: "
                              f"{err.strerror or err}") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"drift checkpoint {str(path)!r} is not an npz archive (damaged, "
                              "or not written by lsd eval drift): delete it to start again")
    try:
        with np.load(path, allow_pickle=False) as data:
            ckpt = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"drift checkpoint {str(path)!r} is damaged (truncated or "
                              f"altered: {type(err).__name__}: {first}): delete it to start "
                              "again") from None
    missing = sorted({"spec", "frames", "steps", "task", "period", "seed", "next_frame", "psnr",
                      "has_carry", "carry", "seconds"} - set(ckpt))
    if missing:
        raise CheckpointError(f"drift checkpoint {str(path)!r} lacks {', '.join(missing)}: "
                              "not written by lsd eval drift")
    for k in ("spec", "task", "weights", "frame_noise"):
        if k in ckpt:
            ckpt[k] = str(ckpt[k])
    for k in ("frames", "steps", "period", "seed", "next_frame"):
        ckpt[k] = int(ckpt[k])
    ckpt["has_carry"] = bool(ckpt["has_carry"])
    return ckpt


def _shown(key: str, value) -> str:
    if key == "weights" and isinstance(value, str):
        return f"sha256:{value[:12]}..."
    return repr(value)


def evaluate_drift(model: EvalModel, *, frames: int, steps: int = 3, task: str = "motion_trails",
                   period: int = 1000, seed: int = 0, progress: bool = True,
                   keep_frames: tuple[int, ...] = (), checkpoint_every: int = 0,
                   on_checkpoint: Callable[[dict], None] | None = None,
                   resume: dict | None = None) -> dict:
    """Stream `frames` frames of the endless held-out path restyled by `task`; PSNR per frame.

    A stream of hours survives being stopped: with `on_checkpoint`, every `checkpoint_every`
    frames it is called with a dict of numpy arrays and numbers (`drift_run_key`'s fields, the
    PSNR so far, the stream state, the task's carry, the seconds so far); passing that dict back
    as `resume` continues the stream from there, and the result equals an uninterrupted run's
    bit for bit (the state holds the step's random key).

    Returns `{"psnr": float32 [frames], "first_mean", "last_mean", "delta_db", ...}` with
    first/last over `period` frames each (the same input frames when `frames` is a multiple of
    `period`), and `frames_kept` {i: (input, output, target)} for the indices in `keep_frames`.
    """
    if frames < 2 * period:
        raise ConfigError(f"drift frames={frames}, expected >= 2 * period ({2 * period}) so the "
                          "first and last periods do not overlap")
    key = drift_run_key(model, frames=frames, steps=steps, task=task, period=period, seed=seed)
    path = EndlessPath(model.pixel_cfg, seed=seed, period=period)
    task_def = task_named(task)
    encoder = make_prompt_encoder(model.cfg)
    prompt_bp = None if encoder is None else np.asarray(
        encoder.encode(task_def.prompt), np.float32)[None]
    step = model.step(steps)
    psnr = np.empty(frames, np.float32)
    start, carry, seconds_before = 0, None, 0.0
    state = init_stream(model.cfg, 1, seed)
    if resume is not None:
        differ = [f"{k}={_shown(k, resume.get(k))} (this run: {_shown(k, key[k])})"
                  for k in key if resume.get(k) != key[k]]
        if differ:
            raise ConfigError("drift checkpoint is not of this run: its " + ", ".join(differ)
                              + ("; the model's weights changed since it was written"
                                 if resume.get("weights") not in (None, key["weights"])
                                 else ""))
        start = int(resume["next_frame"])
        psnr[:start] = resume["psnr"][:start]
        state = StreamState(*(jnp.asarray(resume[f"state_{name}"]) for name in state._fields))
        carry = resume["carry"] if resume["has_carry"] else None
        seconds_before = float(resume["seconds"])
    kept, keep = {}, set(keep_frames)
    t0 = time.perf_counter()
    with progress_bar(f"drift {model.label}", frames, start=start,
                      enabled=progress) as tracker:
        pending = None  # overlap: score frame i-1 while the step of frame i runs

        def finish(j, out, target, frame):
            out_np = np.asarray(out[0])
            psnr[j] = frame_psnr(target, out_np)
            if j in keep:
                kept[j] = (frame, out_np, target)

        current = {}

        def path_frames():
            nonlocal carry
            for i in range(start, frames):
                frame = path.frame(i)
                target, carry = task_def.step(frame, carry)
                current["frame"], current["target"] = frame, target
                yield frame[None]

        for item in stream_frames(step, state, path_frames(), prompt_bp, timed=False):
            j = start + item.index
            if pending is not None:
                finish(*pending)
            pending = (j, item.out_bhwc, current["target"], current["frame"])
            if item.index == 0:
                item.out_bhwc.block_until_ready()
                t0 = time.perf_counter()  # frame 0 compiled the step: time the others
            tracker.advance()
            if (on_checkpoint is not None and checkpoint_every and (j + 1) % checkpoint_every == 0
                    and j + 1 < frames):
                finish(*pending)
                pending = None
                # item.state is the state after frame j, not yet donated to the next step
                on_checkpoint({**key, "next_frame": j + 1, "psnr": psnr[:j + 1].copy(),
                               **{f"state_{name}": np.asarray(value)
                                  for name, value in zip(item.state._fields, item.state,
                                                         strict=True)},
                               "has_carry": carry is not None,
                               "carry": np.asarray(0 if carry is None else carry),
                               "seconds": seconds_before + time.perf_counter() - t0})
        if pending is not None:
            finish(*pending)
    seconds = seconds_before + time.perf_counter() - t0
    timed = max(frames - 1 - (1 if start else 0), 1)  # each process compiles on its first frame
    first, last = float(psnr[:period].mean()), float(psnr[-period:].mean())
    return {"model": model.label, "spec": model.spec, "task": task, "prompt":
            task_def.prompt, "frames": frames, "steps": steps, "period": period,
            "seed": seed, "first_mean": first, "last_mean": last, "delta_db": last - first,
            "same_input": frames % period == 0, "min": float(psnr.min()),
            "seconds": seconds, "ms_per_frame": 1000 * seconds / timed, "psnr": psnr,
            "frames_kept": kept}


# ----------------------------------------------------------------------------- the user's pairs


def evaluate_pairs(model: EvalModel, manifest: str, *, steps_list=(3,), frames: int = 24,
                   split: str | None = None, progress: bool = True) -> dict:
    """Per prompt of a pairs manifest (`train/pairs.py`; only pairs of `split` when given): PSNR,
    SSIM, flicker and flicker ratio of the model streaming each pair's input (its first `frames`
    frames at the model's frame size) against its target, with the same floors as `lsd eval`:
    copy the input, and the best per-pixel colour map (affine or quadratic, least squares on the
    evaluated pairs of that prompt themselves: the best any colour map could do there). The
    result has `evaluate_quality`'s layout (tasks keyed by prompt), so the same report reads it.
    """

    pairs = [p for p in read_manifest(manifest) if split is None or p.split == split]
    if not pairs:
        raise ConfigError(f"pairs manifest {manifest!r} holds no {split} pairs")
    m = model.pixel_cfg.model
    length = min(frames, *(check_pair(p) for p in pairs))
    if length < 2:
        raise ConfigError(f"pairs of {manifest!r} have {length} frames, expected >= 2")
    cond = np.stack([read_frames(p.input, m.frame_height, m.frame_width)[:length] for p in pairs])
    target = np.stack([read_frames(p.target, m.frame_height, m.frame_width)[:length]
                       for p in pairs])
    prompts = sorted({p.prompt for p in pairs}, key=[p.prompt for p in pairs].index)
    prompt_bp = None
    if model.cfg.model.prompt_dim:
        encoder = make_prompt_encoder(model.cfg)
        prompt_bp = np.stack([np.asarray(encoder.encode(p.prompt), np.float32) for p in pairs])
    rows = {prompt: [i for i, p in enumerate(pairs) if p.prompt == prompt] for prompt in prompts}
    results = {prompt: {"prompt": prompt, "pairs": len(rows[prompt]), "steps": {}}
               for prompt in prompts}
    t0 = time.perf_counter()
    with progress_bar(f"eval {model.label} on pairs", len(steps_list) * length,
                      enabled=progress) as tracker:
        for k in steps_list:
            out = stream_batch(model, cond, prompt_bp, steps=k, on_frame=tracker.advance)
            if k == min(steps_list, key=lambda s: abs(s - 3)):
                sample_out = out
            for prompt in prompts:
                per_pair = [clip_metrics(out[r], target[r]) for r in rows[prompt]]
                metrics = {key: float(np.mean([c[key] for c in per_pair])) for key in per_pair[0]}
                metrics["flicker_ratio"] = metrics["change"] / max(metrics["target_change"], 1e-6)
                results[prompt]["steps"][k] = metrics
    for prompt in prompts:
        c, t = cond[rows[prompt]], target[rows[prompt]]
        outs = {"copy_input": c}
        outs.update({kind: apply_color_map(fit_color_map(c, t, kind), c, kind)
                     for kind in COLOR_MAPS})
        base = {kind: float(np.mean([clip_psnr(outs[kind][i], t[i]) for i in range(len(c))]))
                for kind in BASELINES}
        results[prompt].update(baselines=base, floor=floor_of(base))
        for k in steps_list:
            step = results[prompt]["steps"][k]
            step["margin"] = step["psnr"] - results[prompt]["floor"]
            step["meets_floor"] = bool(step["margin"] >= 0)
    summary = {k: {
        "per_frame_psnr": float(np.mean([r["steps"][k]["psnr"] for r in results.values()])),
        "temporal_psnr": math.nan,
        "mean_ssim": float(np.mean([r["steps"][k]["ssim"] for r in results.values()])),
        "mean_flicker": float(np.mean([r["steps"][k]["flicker"] for r in results.values()])),
        "max_flicker_ratio": max(r["steps"][k]["flicker_ratio"] for r in results.values()),
        "tasks_meeting_floor": sum(r["steps"][k]["meets_floor"] for r in results.values()),
    } for k in steps_list}
    baseline_summary = {
        "per_frame_psnr": {kind: float(np.mean([r["baselines"][kind] for r in results.values()]))
                           for kind in BASELINES},
        "per_frame_best_psnr": float(np.mean([max(r["baselines"].values())
                                              for r in results.values()])),
    }
    sample_k = min(steps_list, key=lambda k: abs(k - 3))
    first = [rows[p][0] for p in prompts]
    return {"model": model.label, "spec": model.spec, "config": model.cfg.name,
            "clips": len(pairs), "frames": length, "seed": 0, "split": "pairs",
            "manifest": str(manifest), "steps_list": list(steps_list), "sample_steps": sample_k,
            "seconds": time.perf_counter() - t0, "tasks": results, "summary": summary,
            "baseline_summary": baseline_summary,
            "samples": {"cond": cond[first], "out": sample_out[first], "target": target[first]}}
