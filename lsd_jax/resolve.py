"""Which model a command runs: the one resolver behind `lsd stream`, `lsd serve`, `lsd export` and
`lsd eval`.

    resolved = resolve_model(checkpoint)          # a model directory or a training work dir
    resolved = resolve_model()                    # the built-in demo model
    resolved = resolve_model(cfg=cfg, seed=0)     # an untrained model of `cfg` (random weights)

`resolved.describe` says where the weights come from, `resolved.untrained` is True for random
weights, and `resolved.trained_prompts` are the prompts recorded with the weights;
`resolved.name` names the model without a path (`demo`, the directory's base name).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from flax import nnx

from lsd_jax.checkpoint import load_model, load_trained_prompts
from lsd_jax.config import Config
from lsd_jax.demo import demo_model_dir
from lsd_jax.errors import CheckpointError
from lsd_jax.model import DiT, randomize


class ResolvedModel(NamedTuple):
    cfg: Config
    model: object  # lsd_jax.model.DiT
    describe: str
    untrained: bool
    trained_prompts: tuple[str, ...]
    codec_dir: Path | None = None  # a model directory holding its codec (vae.json), if any
    name: str = ""  # what a server tells its clients: "demo", a directory's base name, no path


def untrained_model(cfg: Config, seed: int = 0):
    """Random weights (`randomize`: the adaLN-Zero init would make the model the identity)."""
    return randomize(DiT(cfg.model, rngs=nnx.Rngs(seed)), seed=seed)


def model_directory(path: str | Path) -> Path:
    """A model checkpoint directory, given it or the training work directory holding it
    (`WORKDIR/model`); the error names the path and what was expected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist (expected a model directory or a "
                              "training work directory)")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def resolve_model(checkpoint: str | Path | None = None, *, cfg: Config | None = None,
                  seed: int = 0, overrides=()) -> ResolvedModel:
    """`checkpoint` (a model directory or a training work directory), else an untrained model of
    `cfg` with weights from `seed`, else the built-in demo model. `overrides` apply to a stored
    config (how the model runs, not its shapes)."""
    if checkpoint is not None:
        directory = model_directory(checkpoint)
        ckpt_cfg, model = load_model(directory, overrides)
        codec_dir = directory if (directory / "vae.json").is_file() else None
        return ResolvedModel(ckpt_cfg, model, f"checkpoint {checkpoint}", False,
                             load_trained_prompts(directory), codec_dir,
                             Path(checkpoint).absolute().name)
    if cfg is None:
        directory = demo_model_dir()
        demo_cfg, model = load_model(directory, overrides)
        return ResolvedModel(demo_cfg, model, f"built-in demo model {directory}", False,
                             load_trained_prompts(directory), name="demo")
    return ResolvedModel(cfg, untrained_model(cfg, seed),
                         f"UNTRAINED {cfg.name} model (random weights, seed {seed}): the output "
                         "shows the pipeline running, not a style", True, (),
                         name=f"untrained {cfg.name}")
