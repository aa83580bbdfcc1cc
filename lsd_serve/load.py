"""Which engine a command runs (`lsd stream`, `lsd serve`, the serving benchmarks): an exported
artifact's (`lsd_serve.engine.artifact_engine`, without Flax or the model code), else that of the
model `lsd_jax.resolve.resolve_model` finds (`lsd_serve.model_engine`).
"""

from __future__ import annotations

from lsd_jax.config import Config
from lsd_serve.engine import Engine, artifact_engine


def load_engine(*, checkpoint: str | None = None, artifact: str | None = None,
                cfg: Config | None = None, max_steps: int | None = None, seed: int = 0,
                overrides=()) -> Engine:
    """The engine a command asked for: `artifact`, else the model `lsd_jax.resolve.resolve_model`
    finds (`checkpoint`, else an untrained model of `cfg`, else the built-in demo model;
    `overrides` apply to a stored model's config)."""
    if artifact is not None:
        return artifact_engine(artifact)
    from lsd_serve.model_engine import resolved_engine  # lazy: an artifact needs no Flax or model

    return resolved_engine(checkpoint, cfg=cfg, max_steps=max_steps, seed=seed,
                           overrides=overrides)
