"""An engine (`lsd_serve.engine.Engine`) running the streaming step in process, from a model: a
checkpoint, the built-in demo model or an untrained model of a config (`lsd_jax.resolve`).

    engine = model_engine(cfg, model, describe="...", untrained=False)
    engine = resolved_engine(checkpoint=DIR | cfg=Config)   # load_engine without an artifact

It compiles any batch size on first use (`engine.batches` is None) and any step count up to its
maximum.
"""

from __future__ import annotations

import jax
from flax import nnx

from lsd_jax.codec import make_codec
from lsd_jax.config import Config
from lsd_jax.prompt import make_prompt_encoder
from lsd_jax.resolve import resolve_model
from lsd_jax.streaming import init_stream, make_step
from lsd_serve.engine import Engine


def model_engine(cfg: Config, model, *, describe: str, untrained: bool,
                 max_steps: int | None = None, trained_prompts: tuple[str, ...] = (),
                 codec_dir=None, name: str = "") -> Engine:
    """An engine running `make_step` in process: any batch size, steps 1..`max_steps`;
    `trained_prompts` as recorded with the weights (`lsd_jax.checkpoint.load_trained_prompts`);
    frames through the codec stored in `codec_dir` (a latent model's directory), else the
    config's pixel codec; `name` what clients are told (default: the config's name)."""
    graphdef, params = nnx.split(model)
    # Weights and state committed to one device, as the step's outputs are: the state a step
    # returns then has the sharding of the one it was given, so the second frame does not compile
    # the step again (weights restored by orbax carry a one-device mesh sharding, a fresh state
    # none).
    device = jax.devices()[0]
    params = jax.device_put(params, device)
    max_steps = cfg.diffusion.sample_steps if max_steps is None else max_steps
    codec = make_codec(cfg, codec_dir)
    codec_params = jax.device_put(codec.params, device)  # an argument of the step, not constants
    steps = {k: make_step(cfg, graphdef, steps=k, codec=codec) for k in range(1, max_steps + 1)}

    def step_for(batch, k):
        return lambda state, frame, prompt, external: steps[k](params, state, frame, prompt,
                                                              external, codec_params)

    return Engine(frame_hw=codec.frame_hw, steps=tuple(steps), batches=None,
                  describe=describe, untrained=untrained, prompt_encoder=make_prompt_encoder(cfg),
                  external_dim=cfg.model.external_cond_dim,
                  _init_state=lambda batch, seed: jax.device_put(init_stream(cfg, batch, seed),
                                                                 device),
                  _step_for=step_for, trained_prompts=() if untrained else tuple(trained_prompts),
                  name=name or (f"untrained {cfg.name}" if untrained else cfg.name))


def resolved_engine(checkpoint: str | None = None, *, cfg: Config | None = None,
                    max_steps: int | None = None, seed: int = 0, overrides=()) -> Engine:
    """The engine of the model `lsd_jax.resolve.resolve_model` finds (`checkpoint`, else an
    untrained model of `cfg`, else the built-in demo model; `overrides` apply to a stored model's
    config)."""
    resolved = resolve_model(checkpoint, cfg=cfg, seed=seed, overrides=overrides)
    return model_engine(resolved.cfg, resolved.model, describe=resolved.describe,
                        untrained=resolved.untrained, max_steps=max_steps,
                        trained_prompts=resolved.trained_prompts, codec_dir=resolved.codec_dir,
                        name=resolved.name)
