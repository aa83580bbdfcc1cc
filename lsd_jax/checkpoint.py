"""Model checkpoints: the weights and the config that built them, in one directory.

    DIR/config.json   the full config tree (`lsd_jax.config.to_dict`), a format version and the
                      prompt encoder the model was trained with (`prompt_encoder`: its name,
                      identity and width, `lsd_jax.prompt.encoder_record`) and the prompts
                      it was trained on (`trained_prompts`; serving offers and compares them)
    DIR/params/       an orbax checkpoint of `nnx.state(model, nnx.Param)`

This is what `lsd convert`, `lsd export`, `lsd stream`, `lsd serve` and `lsd eval` read, and what
training writes for its (EMA) weights. `load_model` restores straight into a model built from the
stored config, so no weights are allocated twice. A checkpoint written before encoders were
recorded was trained with the hashed encoder and is read as such; loading a checkpoint with a
config (after overrides) whose prompt encoder differs from the recorded one is a `CheckpointError`.
A model directory is written whole or not at all (`lsd_jax.atomic`); a full disk is one
`WriteError` line naming it.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lsd_jax.atomic import atomic_path, storage_os_error
from lsd_jax.config import Config, apply_overrides, from_dict, to_dict
from lsd_jax.errors import CheckpointError, ConfigError, PromptError
from lsd_jax.model import DiT, abstract_model, model_from_params
from lsd_jax.prompt import check_encoder_record, encoder_record, legacy_encoder_record

__all__ = ["CheckpointError", "load_config_from", "load_model", "save_model"]

FORMAT = "lsd-jax-model"
VERSION = 1


def save_model(directory: str | Path, cfg: Config, model: DiT, *,
               trained_prompts: tuple[str, ...] = ()) -> Path:
    """Write `cfg` and the model's trained parameters to `directory` (created; must not exist or
    be empty), with the prompts it was trained on (`trained_prompts`, empty when none or
    unknown). The directory appears complete or not at all; a failed write (a full disk) is a
    `WriteError` naming it and leaves no temporary behind."""
    directory = Path(directory).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"checkpoint directory {str(directory)!r} exists and is not empty")
    with atomic_path(directory) as tmp:
        write_model(tmp, cfg, model, trained_prompts=trained_prompts)
    return directory


def write_model(directory: Path, cfg: Config, model: DiT, *,
                trained_prompts: tuple[str, ...] = ()) -> None:
    """`save_model`'s files written in place into `directory`, for a caller that makes the
    directory appear whole itself (the trainer, whose processes all write one directory)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory / "params", nnx.state(model, nnx.Param))
    (directory / "config.json").write_text(json.dumps(
        {"format": FORMAT, "version": VERSION, "config": to_dict(cfg),
         "prompt_encoder": encoder_record(cfg), "trained_prompts": list(trained_prompts)},
        indent=2))


def save_params(path: Path, params) -> None:
    """An orbax checkpoint of `params` at `path`. A storage failure is an `OSError` (a full disk:
    ENOSPC) with orbax's log lines and tracebacks of its writer threads held back."""
    path = Path(path).absolute()
    with stderr_held() as held, ocp.StandardCheckpointer() as ckptr:
        try:
            ckptr.save(path, params)
            ckptr.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - orbax reports storage errors as ValueError
            os_error = storage_os_error(err, path)
            if os_error is None:
                held.release()
                raise
            failure = os_error
        else:
            held.release()
            return
    raise failure from None


def load_trained_prompts(directory: str | Path) -> tuple[str, ...]:
    """The prompts the checkpoint's model was trained on, as recorded by `save_model`; () for a
    checkpoint that records none."""
    meta_path = Path(directory) / "config.json"
    try:
        prompts = json.loads(meta_path.read_text()).get("trained_prompts", [])
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(meta_path)!r} cannot be read: {first_line(err)}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise CheckpointError(f"{str(meta_path)!r}: trained_prompts={prompts!r}, expected a list "
                              "of strings")
    return tuple(prompts)


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
    a mismatch or damaged data is a `CheckpointError` naming the directory."""
    path = Path(path).absolute()  # orbax refuses relative paths
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    with stderr_held() as held, ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path, target)
        except ValueError as err:
            shapes = "shape" in str(err)
            failure = (f"weights do not fit {described_by}" if shapes else
                       "weights cannot be read (damaged files?)") + f": {first_line(err)}"
        # Damaged data surfaces as many types (tensorstore's plain Exception, OSError, KeyError).
        except Exception as err:  # noqa: BLE001
            failure = (f"weights cannot be read (damaged files?): {type(err).__name__}: "
                       f"{first_line(err)}")
        else:
            held.release()
            return params
    raise CheckpointError(f"{str(path.parent)!r}: {failure}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message, for a one-line report: tensorstore's "See full
    TensorStore details: <bound method ...>" (an object's repr, not a detail) is replaced by the
    error it was raised from."""
    text = str(err)
    if "See full TensorStore details" in text:
        text = text.split("See full TensorStore details")[0].strip().rstrip(".")
        cause = err.__cause__ or err.__context__
        if cause is not None:
            text += f": {first_line(cause)}"
    text = re.sub(r"<bound method [^>]*>?", "", text)
    return (text.strip().splitlines() or [""])[0][:300]


class stderr_held:
    """Holds what is written to file descriptor 2 meanwhile: `release()` writes it out. A failed
    orbax restore leaves reads in flight whose callbacks print tracebacks of its closed event
    loop; when the restore fails, those are dropped (the `CheckpointError` says what failed)."""

    GRACE_S = 0.5

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)
        self._released = False
        return self

    def release(self) -> None:
        self._released = True

    def __exit__(self, *exc):
        if not self._released:
            time.sleep(self.GRACE_S)  # the abandoned reads finish, their callbacks fail here
            hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
            try:
                gc.collect()  # and their never-awaited coroutines are collected here
            finally:
                sys.unraisablehook = hook
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if self._released:
            self._file.seek(0)
            text = self._file.read()
            if text:
                sys.stderr.buffer.write(text)
                sys.stderr.flush()
        self._file.close()
