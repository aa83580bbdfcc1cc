"""Model checkpoints: the weights and the config that built them, in one directory.

    DIR/config.json   the full config tree (`lsd_jax.config.to_dict`), a format version and the
                      prompt encoder the model was trained with (`prompt_encoder`: its name,
                      identity and width, `lsd_jax.prompt.encoder_record`)
    DIR/params/       an orbax checkpoint of `nnx.state(model, nnx.Param)`

This is what `lsd convert`, `lsd export`, `lsd stream`, `lsd serve` and `lsd eval` read, and what
training writes for its (EMA) weights. `load_model` restores straight into a model built from the
stored config, so no weights are allocated twice. A checkpoint written before encoders were
recorded was trained with the hashed encoder and is read as such; loading a checkpoint with a
config (after overrides) whose prompt encoder differs from the recorded one is a `CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lsd_jax.config import (
    CheckpointError,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    to_dict,
)
from lsd_jax.model import DiT, abstract_model, model_from_params
from lsd_jax.prompt import (
    PromptError,
    check_encoder_record,
    encoder_record,
    legacy_encoder_record,
)

__all__ = ["CheckpointError", "load_config_from", "load_model", "save_model"]

FORMAT = "lsd-jax-model"
VERSION = 1


def save_model(directory: str | Path, cfg: Config, model: DiT) -> Path:
    """Write `cfg` and the model's trained parameters to `directory` (created; must not exist)."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"checkpoint directory {str(directory)!r} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nnx.state(model, nnx.Param))
    (directory / "config.json").write_text(json.dumps(
        {"format": FORMAT, "version": VERSION, "config": to_dict(cfg),
         "prompt_encoder": encoder_record(cfg)}, indent=2))
    return directory


def load_config_from(directory: str | Path, overrides=()) -> Config:
    """The stored config with `overrides` applied; its prompt encoder must be the recorded one."""
    directory = Path(directory)
    meta_path = directory / "config.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a model checkpoint: no config.json "
                              "(expected a directory written by lsd convert / lsd train)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(meta_path)!r} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{str(meta_path)!r} has format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    try:
        cfg = from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as err:
        raise CheckpointError(f"{str(meta_path)!r} holds a config this version cannot read: "
                              f"{err}") from None
    record = meta.get("prompt_encoder") or legacy_encoder_record(cfg.model.prompt_dim)
    cfg = apply_overrides(cfg, list(overrides))
    try:
        check_encoder_record(record, cfg, f"checkpoint {str(directory)!r}")
    except PromptError as err:
        raise CheckpointError(str(err)) from None
    return cfg


def load_model(directory: str | Path, overrides=()) -> tuple[Config, DiT]:
    """Config and model from a checkpoint directory.

    Overrides may change how the model runs (`model.attention_impl`, `diffusion.sample_steps`),
    not its shapes: a shape change is reported by orbax as a mismatch.
    """
    directory = Path(directory).absolute()
    cfg = load_config_from(directory, overrides)
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{str(directory)!r} has no params/ directory")
    params = restore_params(directory / "params", nnx.state(abstract_model(cfg.model), nnx.Param),
                            "the config")
    return cfg, model_from_params(cfg.model, params)


def restore_params(path: Path, abstract_params, described_by: str):
    """Restore an orbax checkpoint of parameters onto the shapes/dtypes of `abstract_params`;
    a mismatch is a `CheckpointError` naming the directory and what the shapes came from."""
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, target)
        except ValueError as err:
            raise CheckpointError(f"{str(path.parent)!r}: weights do not fit {described_by}: "
                                  f"{err}") from None
