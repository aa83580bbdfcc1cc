"""The built-in demo model: the tiny config trained by `lsd train --config demo`
(see `lsd_jax/demo_model/TRAINING.md` for the exact command, time and figures).

`lsd stream`, `lsd serve`, `lsd export` and `lsd eval` use it when no checkpoint is given
(`lsd_jax.resolve.resolve_model`).
"""

from __future__ import annotations

from pathlib import Path

from lsd_jax.errors import CheckpointError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def demo_model_dir() -> Path:
    """The directory of the shipped weights (a model checkpoint: `config.json` + `params/`)."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "params").is_dir():
        raise CheckpointError(f"the built-in demo model is missing from {str(DEMO_MODEL_DIR)!r} "
                              "(a damaged install?); reinstall lsd-jax or pass --checkpoint DIR")
    return DEMO_MODEL_DIR
