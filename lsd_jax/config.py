"""Typed configuration tree, config files and `key.path=value` overrides.

A config file is a Python file under `configs/` with a `get_config() -> Config` function; its
docstring holds the command that uses it and the figures it is expected to reach. Every field of the
tree can be overridden from the command line as `section.field=value`; the value is parsed with the
field's declared type, and an unknown key or a badly typed value raises `ConfigError` naming both.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

from lsd_jax.errors import ConfigError
from lsd_jax.kernels import kernel_names


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r}, expected a value {bound}")


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
# Denoising steps per frame: `diffusion.sample_steps` and the commands' `--steps`.
MAX_SAMPLE_STEPS = 128


def dtype_of(name: str):
    """The numpy dtype called `name`: a config's `model.dtype`/`model.param_dtype` (`DTYPES`) or
    any numpy dtype name, `bfloat16` included (numpy alone has none). TypeError for other names."""
    import jax.numpy as jnp
    import numpy as np

    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)

# `model.color_map` kinds, each a superset of the one before (`lsd_jax.model.grow_color_map`).
COLOR_MAP_KINDS = ("none", "affine", "quadratic", "curves")


def color_map_grows(old, new) -> bool:
    """Whether a model with `model.color_map=old` grows into `new`: both kinds, `new` later."""
    return (old in COLOR_MAP_KINDS and new in COLOR_MAP_KINDS
            and COLOR_MAP_KINDS.index(old) < COLOR_MAP_KINDS.index(new))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The causal spatio-temporal DiT (docs/DESIGN.md section 2).

    A frame in model space is `[frame_height, frame_width, channels]` (NHWC); the live input frame,
    in the same space, is concatenated channel-wise (`cond_channels`, 0 turns it off).
    """

    frame_height: int = 64
    frame_width: int = 64
    channels: int = 3
    cond_channels: int = 3
    patch_size: int = 8
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    # Width of one attention head: 0 is `hidden_size / num_heads`; set apart from it, the
    # attention's inner width `num_heads * head_width` differs from `hidden_size` (a model whose
    # heads were pruned by `lsd prune` keeps its head width).
    head_width: int = 0
    mlp_ratio: float = 4.0
    window: int = 8
    # Full-resolution convolutional path around the DiT (`PixelPath` in model.py): its width
    # (0: off, the plain DiT), its depth in 3x3 convolutions (stem and head each), and whether the
    # prediction is a residual over the input frame.
    pixel_channels: int = 0
    pixel_depth: int = 2
    pixel_residual: bool = False
    # A per-frame colour map of the input frame added to the prediction, its coefficients made from
    # the conditioning vector: "none", "affine" or "quadratic" in the input frame's channels, or
    # "curves" (quadratic plus a piecewise-linear tone curve of the luma; an RGB input frame).
    color_map: str = "none"
    # Per-frame conditioning vector: noise level (always), step size, prompt, external vector.
    freq_embed_dim: int = 256
    use_step_size: bool = True
    prompt_dim: int = 0
    external_cond_dim: int = 0
    # Conventions (the Oasis ones are the defaults; see docs/OASIS.md).
    rope_interleaved: bool = True
    gelu_approximate: bool = True
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    # Implementation choices that do not change the function computed.
    attention_impl: str = "xla"
    # The norm seam (LayerNorm + adaLN modulate), by name in lsd_jax/kernels.py.
    norm_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("frame_height", "frame_width", "channels", "patch_size", "hidden_size",
                     "depth", "num_heads", "freq_embed_dim"):
            _check_positive(f"model.{name}", getattr(self, name))
        for name in ("cond_channels", "prompt_dim", "external_cond_dim", "pixel_channels"):
            _check_positive(f"model.{name}", getattr(self, name), allow_zero=True)
        if self.pixel_channels:
            _check_positive("model.pixel_depth", self.pixel_depth)
            if not self.cond_channels:
                raise ConfigError(f"model.pixel_channels={self.pixel_channels} needs an input "
                                  "frame: model.cond_channels=0")
        _check_choice("model.color_map", self.color_map, COLOR_MAP_KINDS)
        if self.color_map != "none" and not self.cond_channels:
            raise ConfigError(f"model.color_map={self.color_map!r} needs an input frame: "
                              "model.cond_channels=0")
        if self.color_map == "curves" and self.cond_channels != 3:
            raise ConfigError(f"model.color_map='curves' takes the luma of an RGB input frame: "
                              f"model.cond_channels={self.cond_channels}, expected 3")
        if self.pixel_residual and (not self.pixel_channels
                                    or self.cond_channels != self.channels):
            raise ConfigError(f"model.pixel_residual=True needs model.pixel_channels > 0 (got "
                              f"{self.pixel_channels}) and model.cond_channels == model.channels "
                              f"(got {self.cond_channels} and {self.channels})")
        _check_positive("model.mlp_ratio", self.mlp_ratio)
        for name, size in (("frame_height", self.frame_height), ("frame_width", self.frame_width)):
            if size % self.patch_size:
                raise ConfigError(
                    f"model.{name}={size} is not divisible by model.patch_size={self.patch_size}")
        _check_positive("model.head_width", self.head_width, allow_zero=True)
        if not self.head_width and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads} (or set model.head_width)")
        if self.head_dim % 4:
            raise ConfigError(f"head dim {self.head_dim} (model.head_width, or model.hidden_size "
                              "/ model.num_heads) must be divisible by 4 for the 2-D axial rotary "
                              "embedding")
        if self.hidden_size * self.mlp_ratio != self.mlp_width:
            raise ConfigError(f"model.mlp_ratio={self.mlp_ratio} gives an MLP width of "
                              f"{self.hidden_size * self.mlp_ratio} at model.hidden_size="
                              f"{self.hidden_size}, expected a whole number of channels")
        if self.freq_embed_dim % 2:
            raise ConfigError(f"model.freq_embed_dim={self.freq_embed_dim} must be even")
        if self.window < 2:
            raise ConfigError(f"model.window={self.window}, expected >= 2 frames (the current "
                              "frame and at least one history frame)")
        _check_choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("model.norm_impl", self.norm_impl, kernel_names("norm"))
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.param_dtype", self.param_dtype, DTYPES)

    @property
    def head_dim(self) -> int:
        return self.head_width or self.hidden_size // self.num_heads

    @property
    def attention_width(self) -> int:
        """The attention's inner width: queries, keys and values of all heads."""
        return self.num_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame_height // self.patch_size, self.frame_width // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.frame_height, self.frame_width, self.channels


@dataclasses.dataclass(frozen=True)
class HistoryAugConfig:
    """Corruptions applied to history frames during training (docs/DESIGN.md section 3).

    Each kind is a switch; `prob` is the chance that a history frame is corrupted at all, and a
    corrupted frame gets one kind drawn uniformly among the enabled ones with a random strength
    up to the kind's maximum.
    """

    enabled: bool = True
    prob: float = 0.5
    blur: bool = True
    blur_max_sigma: float = 1.5
    color: bool = True
    color_max_shift: float = 0.15
    jpeg: bool = True
    jpeg_max_step: float = 0.25
    shift: bool = True
    shift_max_pixels: int = 2
    noise: bool = True
    noise_max_std: float = 0.1
    self_prediction: bool = True

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"diffusion.history_aug.prob={self.prob!r}, expected 0 <= prob <= 1")
        for name in ("blur_max_sigma", "color_max_shift", "jpeg_max_step", "shift_max_pixels",
                     "noise_max_std"):
            _check_positive(f"diffusion.history_aug.{name}", getattr(self, name), allow_zero=True)


PROCESSES = ("rectified_flow", "ddpm_v")
NOISE_SAMPLERS = ("independent", "clip", "history_low")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion process, training objective and sampling (docs/DESIGN.md sections 3 and 4).

    Noise levels are in the process's own units: `t in [0, 1]` for rectified flow (1 = noise), the
    integer timestep 0..num_timesteps-1 for DDPM.
    """

    process: str = "rectified_flow"
    # DDPM v-prediction: sigmoid beta schedule.
    num_timesteps: int = 1000
    sigmoid_start: float = -3.0
    sigmoid_end: float = 3.0
    sigmoid_tau: float = 1.0
    # Denoising steps per streamed frame, and the history (context) noise level t_ctx.
    sample_steps: int = 3
    prediction: str = "velocity"  # rectified flow: the network predicts "velocity" or "x0".
    ctx_level: float = 0.02
    context_noise: str = "label"  # "label": clean frame labelled t_ctx; "noised": really noised.
    # The starting noise of each streamed frame: "fresh" (a new draw per frame) or "fixed" (the
    # stream's key does not advance: every frame starts from the same noise, which trades a little
    # PSNR for less flicker; sampling only, training is unchanged).
    frame_noise: str = "fresh"
    # What the ring buffer caches of a finished frame: "context" (one more pass of the finished
    # frame at t_ctx, whose K/V are written) or "last_step" (the K/V of the last denoising pass,
    # the frame at the last step's level: one pass fewer per frame).
    cache_from: str = "context"
    # Training objective.
    noise_sampler: str = "independent"
    # Rectified flow: training levels u ~ U[0, 1] shifted to s u / (1 + (s - 1) u) (1: uniform).
    level_shift: float = 1.0
    # What the network sees of a noised frame: "unit" (x_t) or "signal" (x_t times the clean
    # frame's weight, so pure noise enters as zeros; `Process.network_input`).
    input_scale: str = "unit"
    history_low_max: float = 0.1
    shortcut: bool = True
    shortcut_fraction: float = 0.25
    shortcut_max_steps: int = 128
    shortcut_target: str = "online"  # or "ema"
    history_aug: HistoryAugConfig = dataclasses.field(default_factory=HistoryAugConfig)

    def __post_init__(self):
        _check_choice("diffusion.process", self.process, PROCESSES)
        _check_choice("diffusion.noise_sampler", self.noise_sampler, NOISE_SAMPLERS)
        _check_choice("diffusion.context_noise", self.context_noise, ("label", "noised"))
        _check_choice("diffusion.frame_noise", self.frame_noise, ("fresh", "fixed"))
        _check_choice("diffusion.cache_from", self.cache_from, ("context", "last_step"))
        _check_choice("diffusion.prediction", self.prediction, ("velocity", "x0"))
        if self.prediction == "x0" and self.process != "rectified_flow":
            raise ConfigError(f"diffusion.prediction='x0' with diffusion.process="
                              f"{self.process!r}: x0 prediction is offered for rectified_flow")
        _check_choice("diffusion.shortcut_target", self.shortcut_target, ("online", "ema"))
        if not 1 <= self.sample_steps <= MAX_SAMPLE_STEPS:
            raise ConfigError(f"diffusion.sample_steps={self.sample_steps}, expected "
                              f"1..{MAX_SAMPLE_STEPS}")
        if self.shortcut_max_steps < 1 or self.shortcut_max_steps & (self.shortcut_max_steps - 1):
            raise ConfigError(f"diffusion.shortcut_max_steps={self.shortcut_max_steps}, expected a "
                              "power of two")
        if not 0.0 <= self.shortcut_fraction < 1.0:
            raise ConfigError(f"diffusion.shortcut_fraction={self.shortcut_fraction}, expected "
                              "0 <= fraction < 1")
        if self.ctx_level < 0:
            raise ConfigError(f"diffusion.ctx_level={self.ctx_level}, expected >= 0")
        _check_positive("diffusion.level_shift", self.level_shift)
        _check_choice("diffusion.input_scale", self.input_scale, ("unit", "signal"))
        if self.process == "ddpm_v" and self.ctx_level >= self.num_timesteps:
            raise ConfigError(f"diffusion.ctx_level={self.ctx_level}, expected < "
                              f"diffusion.num_timesteps={self.num_timesteps}")
        if self.process == "rectified_flow" and self.ctx_level > 1:
            raise ConfigError(f"diffusion.ctx_level={self.ctx_level}, expected a rectified-flow "
                              "level in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training clips (docs/DESIGN.md section 6, `train/data.py`).

    `source`: "procedural" (scikit-image photographs moved by random camera paths, with sprites;
    nothing to download) or "video_folder" (every video file under `video_dir`, decoded with
    OpenCV). Clips are `clip_frames` frames at the model's frame size, sampled at `fps` (video
    files only). `tasks` are the paired tasks drawn uniformly per clip ("all": every task in
    `train/tasks.py`). `photographs`: the procedural training photographs, "classic" (five colour
    photographs) or "extended" (seven more scenes and textures); the held-out photographs are the
    same for both, and the validation split of `lsd eval` always uses the classic five, so recipes
    on either are compared on the same clips. `prompt_phrasings`: a clip's prompt is drawn among
    its task's prompt and the task's other phrasings (`train/tasks.py`), so a model with a language
    encoder learns the task, not one sentence. "latents": clips already encoded by a codec
    (`lsd data encode`, `train/latents.py`) in `latent_dir`, read without running the codec;
    `codec_dir`, when set, names the codec weights the dataset must have been encoded with.
    "pairs": the user's own input/target video pairs listed in the JSON-lines manifest `pairs`
    (`train/pairs.py`); with another source, `pairs_fraction` of the clips come from `pairs`
    instead (a model learns new prompts from pairs while keeping the built-in tasks).
    """

    source: str = "procedural"
    video_dir: str = ""
    fps: float = 8.0
    clip_frames: int = 8
    tasks: str = "all"
    shuffle_seed: int = 0
    read_threads: int = 2
    heldout_images: int = 2
    photographs: str = "classic"
    prompt_phrasings: bool = False
    latent_dir: str = ""
    codec_dir: str = ""
    pairs: str = ""
    pairs_fraction: float = 0.0

    def __post_init__(self):
        _check_choice("data.source", self.source, ("procedural", "video_folder", "latents",
                                                   "pairs"))
        if self.source == "pairs" and not self.pairs:
            raise ConfigError("data.source='pairs' needs data.pairs=MANIFEST (a JSON-lines file "
                              "of input/target/prompt pairs)")
        if not 0.0 <= self.pairs_fraction < 1.0:
            raise ConfigError(f"data.pairs_fraction={self.pairs_fraction}, expected 0 <= "
                              "fraction < 1")
        if self.pairs_fraction and (not self.pairs or self.source in ("pairs", "latents")):
            raise ConfigError(f"data.pairs_fraction={self.pairs_fraction} mixes data.pairs into "
                              f"a procedural or video_folder source: data.source="
                              f"{self.source!r}, data.pairs={self.pairs!r}")
        _check_positive("data.fps", self.fps)
        if self.clip_frames < 2:
            raise ConfigError(f"data.clip_frames={self.clip_frames}, expected >= 2 frames")
        _check_positive("data.read_threads", self.read_threads)
        _check_positive("data.heldout_images", self.heldout_images)
        _check_choice("data.photographs", self.photographs, ("classic", "extended"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimiser, schedule, EMA, checkpoints and metrics of `lsd train` (`train/trainer.py`).

    `batch_size` is global (all processes); 0 means one clip per `data` x `fsdp` slice of the
    mesh. The learning rate warms up linearly for
    `warmup_steps`, then follows a cosine to `lr * final_lr_fraction` at `steps`. Checkpoints are
    saved every `save_every` steps (0: only at the end and on SIGTERM/SIGINT), `keep` of them.
    `init_from` (a model directory: a run's `WORKDIR/model` or the work directory holding it, the
    built-in demo's, an `lsd convert` output) starts a new run from those weights (params and
    EMA) with a fresh optimiser at step 0; the model's architecture and prompt encoder must be the
    config's, checked before the step compiles.
    `distill_from` (a model directory, a training work directory, or "demo") is a teacher: every
    batch's input clips are streamed through it (its own streaming step, as `lsd stream` runs it)
    and its outputs are a second regression target of the flow-matching items, weighted by
    `distill_weight`, beside the task's own target (the recovery of a pruned model, `lsd prune`).
    """

    steps: int = 1000
    batch_size: int = 0
    lr: float = 3e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    sample_every: int = 500
    seed: int = 0
    init_from: str = ""
    distill_from: str = ""
    distill_weight: float = 1.0

    def __post_init__(self):
        _check_positive("train.distill_weight", self.distill_weight, allow_zero=True)
        for name in ("steps", "keep", "log_every"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("batch_size", "warmup_steps", "save_every", "sample_every", "weight_decay",
                     "grad_clip"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _check_positive("train.lr", self.lr)
        for name in ("final_lr_fraction", "b1", "b2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"train.{name}={value!r}, expected a value in [0, 1]")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes `data`, `fsdp`, `tensor` (`train/sharding.py`); their product must be the
    device count. -1 on one axis takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh sizes data={self.data} fsdp={self.fsdp} "
                              f"tensor={self.tensor}, expected positive sizes, at most one -1")


PROMPT_ENCODERS = ("hashed", "minilm")
# Embedding width of the encoders that have a fixed one ("hashed" takes any model.prompt_dim).
PROMPT_ENCODER_DIMS = {"minilm": 384}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """The prompt encoder (`lsd_jax/prompt.py`): a prompt string -> a vector `[model.prompt_dim]`
    that the model's learned `prompt_proj` maps into its conditioning.

    "hashed": the built-in bag-of-words hash, any width, nothing to download. "minilm":
    all-MiniLM-L6-v2 in Flax NNX (`lsd_jax/minilm.py`), 384 wide, its two files fetched once
    (`lsd_jax/minilm_files.py`). A model understands only the encoder it was trained with.
    """

    encoder: str = "hashed"

    def __post_init__(self):
        _check_choice("prompt.encoder", self.encoder, PROMPT_ENCODERS)


@dataclasses.dataclass(frozen=True)
class Config:
    """A named configuration: model, diffusion, frame codec and prompt encoder."""

    name: str = "unnamed"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    codec: str = "pixel"  # "pixel" ([-1, 1] RGB) or "oasis_vae" (latents, 360x640 frames).
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    seed: int = 0
    # Training (`lsd train`); other commands ignore these sections.
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        _check_choice("codec", self.codec, ("pixel", "oasis_vae"))
        if self.codec == "pixel" and self.model.channels != 3:
            raise ConfigError(f"model.channels={self.model.channels}, the pixel codec needs 3 "
                              "(RGB)")
        width = PROMPT_ENCODER_DIMS.get(self.prompt.encoder)
        if width is not None and self.model.prompt_dim not in (0, width):
            raise ConfigError(
                f"prompt.encoder={self.prompt.encoder!r} gives {width}-wide embeddings but "
                f"model.prompt_dim={self.model.prompt_dim}; expected model.prompt_dim={width} "
                f"(overrides apply in order: set model.prompt_dim={width} before prompt.encoder)")


# ----------------------------------------------------------------------------- overrides


def _parse_scalar(key: str, text: str, typ: Any) -> Any:
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text, 0)
        if typ is float:
            return float(text)
        if typ is str:
            return text
    except ValueError:
        pass
    else:
        raise ConfigError(f"{key} has unsupported type {typ!r}")
    raise ConfigError(f"{key}={text!r} is not a valid {typ.__name__}")


def _parse_value(key: str, text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (tuple,):
        args = typing.get_args(typ)
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_scalar(key, s.strip(), args[0]) for s in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={text!r}, expected {len(args)} comma-separated values")
        return tuple(_parse_scalar(key, s.strip(), a) for s, a in zip(items, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() == "none":
            return None
        return _parse_value(key, text, args[0])
    return _parse_scalar(key, text, typ)


def _changed(cfg: Any, items: list[tuple[str, str, str]]) -> Any:
    """`cfg` with every `(full key, key below cfg, text)` applied at once: one
    `dataclasses.replace` per section, so checks across a section's fields see all of its new
    values together (`data.source=pairs data.pairs=FILE` in either order)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes, nested = {}, {}
    for full, key, text in items:
        head, _, rest = key.partition(".")
        if head not in fields:
            raise ConfigError(f"unknown config key {full!r}: {type(cfg).__name__} has no field "
                              f"{head!r} (fields: {', '.join(fields)})")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"unknown config key {full!r}: {head!r} is a value, not a "
                                  "section")
            nested.setdefault(head, []).append((full, rest, text))
        elif dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full!r} is a section; set one of its fields "
                              f"({', '.join(f.name for f in dataclasses.fields(current))})")
        else:
            changes[head] = (full, _parse_value(full, text, hints[head]))
    for head, sub in nested.items():
        changes[head] = (sub[-1][0], _changed(getattr(cfg, head), sub))
    try:
        return dataclasses.replace(cfg, **{k: v for k, (_, v) in changes.items()})
    except ConfigError as err:
        msg = str(err)
        keys = [full for full, _ in changes.values()]
        if any(k in msg for k in keys) or not keys:
            raise
        raise ConfigError(f"{keys[-1]}: {msg}") from None


def override(cfg: Any, key: str, text: str) -> Any:
    """Return `cfg` with the field at dotted `key` set to `text` parsed with the field's type."""
    return _changed(cfg, [(key, key, text)])


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `key.path=value` strings (a later one of the same key wins), each section's together;
    the key path is reported in full on error."""
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        items.append((key.strip(), key.strip(), text))
    return _changed(cfg, items) if items else cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `get_config()` from a Python config file, or the stored config of a model directory
    (`config.json`, e.g. what `lsd prune` writes), and apply overrides."""
    path = Path(path)
    if (path / "config.json").is_file():
        import json

        try:
            stored = json.loads((path / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(path / 'config.json')!r} holds no readable config: "
                              f"{type(err).__name__}: {err}") from None
        return apply_overrides(from_dict(stored), list(overrides))
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (expected e.g. "
                          "configs/tiny.py)")
    spec = importlib.util.spec_from_file_location(f"_lsd_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected Config")
    return apply_overrides(cfg, list(overrides))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config) -> Any:
    """Inverse of `to_dict`; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(value, typ)
        elif typing.get_origin(typ) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the `lsd_configs` package."""
    root = importlib.resources.files("lsd_configs")
    return sorted(p.name[:-3] for p in root.iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def resolve_config(spec: str) -> Path:
    """A config file path, or a packaged config's name (`tiny`, `lsd_configs/tiny.py` outside the
    repo).

    An existing file wins; otherwise a bare name or a path under a `lsd_configs/` folder (or
    `configs/`, its former name) is looked up by its stem in the `lsd_configs` package.
    """
    path = Path(spec)
    if path.is_file() or (path / "config.json").is_file():
        return path
    if path.suffix in ("", ".py") and (len(path.parts) == 1
                                       or path.parent.name in ("lsd_configs", "configs")):
        packaged = importlib.resources.files("lsd_configs").joinpath(f"{path.stem}.py")
        if packaged.is_file():
            return Path(str(packaged))
    raise ConfigError(f"config {spec!r} not found: no such file, and no packaged config of that "
                      f"name (packaged: {', '.join(packaged_configs())})")
