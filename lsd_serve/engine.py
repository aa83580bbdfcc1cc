"""One streaming step behind `lsd stream` and `lsd serve`, from a checkpoint, an artifact or an
untrained model.

    engine = load_engine(checkpoint=DIR | artifact=FILE | config=Config)
    state = engine.init_state(batch)
    state, out_bhwc_uint8 = engine.step(state, frames_bhwc_uint8, prompt_bp, steps)

`engine.nearest_trained(prompt)` names the prompt the model was trained on (as recorded with its
weights by the trainer) that is nearest `prompt` under the model's encoder.

The state is a `lsd_jax.stream_state.StreamState` (used by field name) and is donated.
An artifact holds fixed (batch, steps) variants (`engine.batches`, `engine.steps`); a model built
in process compiles any batch size on first use (`engine.batches` is None) and any step count up to
its maximum.

A server keeps each session's cache on its own and runs the sessions that have a frame together
through `lsd_jax.stream_state.stack_sessions` / `split_sessions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from lsd_jax.config import Config
from lsd_jax.resolve import resolve_model
from lsd_jax.stream_state import StreamState


@dataclass
class Engine:
    """A streaming step and what a frame loop needs to know about it.

    `describe` says where the weights come from; `untrained` is True for random weights;
    `trained_prompts` are the prompts it was trained on (empty when unknown or untrained).
    """

    frame_hw: tuple[int, int]
    steps: tuple[int, ...]
    batches: tuple[int, ...] | None
    describe: str
    untrained: bool
    prompt_encoder: object
    external_dim: int
    _init_state: object
    _step_for: object
    trained_prompts: tuple[str, ...] = ()

    @property
    def max_steps(self) -> int:
        return max(self.steps)

    def init_state(self, batch: int, seed: int = 0) -> StreamState:
        return self._init_state(batch, seed)

    def encode_prompts(self, prompts) -> np.ndarray | None:
        """float32 `[len(prompts), prompt_dim]`, or None when the model takes no prompt."""
        if self.prompt_encoder is None:
            return None
        return self.prompt_encoder.encode_batch(list(prompts))

    def nearest_trained(self, prompt: str) -> dict | None:
        """`{"nearest": str, "similarity": float, "trained": bool, "near": bool}`: the trained
        prompt whose embedding is nearest `prompt`'s (cosine similarity), whether the embeddings
        are equal (the prompt is a trained one, up to what the encoder ignores) and whether it is
        near enough to read as a phrasing of it (`lsd_jax.prompt.NEAR_SIMILARITY`); None when
        the model takes no prompt or its trained prompts are unknown."""
        from lsd_jax.prompt import NEAR_SIMILARITY, nearest_prompt

        if self.prompt_encoder is None or not self.trained_prompts:
            return None
        nearest, similarity = nearest_prompt(self.prompt_encoder, prompt, self.trained_prompts)
        trained = bool(np.array_equal(self.prompt_encoder.encode(prompt),
                                      self.prompt_encoder.encode(nearest)))
        return {"nearest": nearest, "similarity": similarity, "trained": trained,
                "near": trained or similarity >= NEAR_SIMILARITY}

    def step(self, state, frames_bhwc, prompt_bp=None, steps: int | None = None):
        """One frame for each of the `b` streams: `(state, out_bhwc_uint8)`; `state` is donated."""
        steps = self.max_steps if steps is None else steps
        if steps not in self.steps:
            raise ValueError(f"steps={steps}, expected one of {list(self.steps)}")
        external_bx = None
        if self.external_dim:
            # A model with per-frame external inputs (Oasis actions) gets "no action" when streamed
            # from a camera or a file.
            external_bx = np.zeros((len(frames_bhwc), self.external_dim), np.float32)
        return self._step_for(state.batch, steps)(state, frames_bhwc, prompt_bp, external_bx)

    def pick_batch(self, n: int) -> int:
        """The smallest batch size this engine runs that holds `n` streams."""
        if self.batches is None:
            return n
        fits = [b for b in self.batches if b >= n]
        if not fits:
            raise ValueError(f"{n} streams, expected at most {max(self.batches)} (the largest "
                             f"batch size of this engine: {list(self.batches)})")
        return min(fits)


def model_engine(cfg: Config, model, *, describe: str, untrained: bool,
                 max_steps: int | None = None, trained_prompts: tuple[str, ...] = (),
                 codec_dir=None) -> Engine:
    """An engine running `make_step` in process: any batch size, steps 1..`max_steps`;
    `trained_prompts` as recorded with the weights (`lsd_jax.checkpoint.load_trained_prompts`);
    frames through the codec stored in `codec_dir` (a latent model's directory), else the
    config's pixel codec."""
    from flax import nnx

    from lsd_jax.codec import make_codec
    from lsd_jax.prompt import make_prompt_encoder
    from lsd_jax.streaming import init_stream, make_step

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
                  _step_for=step_for, trained_prompts=() if untrained else tuple(trained_prompts))


def artifact_engine(path: str | Path) -> Engine:
    """An engine running an exported `.lsdx` step (no model code involved)."""
    from lsd_serve.artifact import load_artifact

    art = load_artifact(path)
    untrained = bool(art.header["untrained"])
    source = art.header["source"] or "unknown weights"
    known = () if untrained else art.trained_prompts
    return Engine(frame_hw=art.frame_hw, steps=art.steps, batches=art.batches,
                  describe=f"artifact {path} ({source}; batches {list(art.batches)}, steps "
                           f"{list(art.steps)})",
                  untrained=untrained, prompt_encoder=art.prompt_encoder(),
                  external_dim=art.header["config"]["model"]["external_cond_dim"],
                  _init_state=art.init_state,
                  _step_for=lambda batch, k: art.step(batch, k), trained_prompts=known)


def load_engine(*, checkpoint: str | None = None, artifact: str | None = None,
                cfg: Config | None = None, max_steps: int | None = None, seed: int = 0,
                overrides=()) -> Engine:
    """The engine a command asked for: `artifact`, else the model `lsd_jax.resolve.resolve_model`
    finds (`checkpoint`, else an untrained model of `cfg`, else the built-in demo model;
    `overrides` apply to a stored model's config)."""
    if artifact is not None:
        return artifact_engine(artifact)
    resolved = resolve_model(checkpoint, cfg=cfg, seed=seed, overrides=overrides)
    return model_engine(resolved.cfg, resolved.model, describe=resolved.describe,
                        untrained=resolved.untrained, max_steps=max_steps,
                        trained_prompts=resolved.trained_prompts, codec_dir=resolved.codec_dir)
