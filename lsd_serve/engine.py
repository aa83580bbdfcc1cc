"""One streaming step behind `lsd stream` and `lsd serve`, from a checkpoint, an artifact or an
untrained model: the `Engine` interface, and the engine of an artifact (`artifact_engine`, no model
code); the engine of a model is `lsd_serve.model_engine`, the one a command asks for
`lsd_serve.load.load_engine`.

    engine = load_engine(checkpoint=DIR | artifact=FILE | cfg=Config)
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

import numpy as np

from lsd_jax.errors import ArtifactError
from lsd_jax.kernels import current_platform
from lsd_jax.prompt import NEAR_SIMILARITY, nearest_prompt
from lsd_jax.stream_state import StreamState
from lsd_serve.artifact import load_artifact


@dataclass
class Engine:
    """A streaming step and what a frame loop needs to know about it.

    `describe` says where the weights come from (for the operator: it may hold paths); `name`
    names the model for clients (`demo`, a directory's or file's base name, never a path);
    `untrained` is True for random weights; `trained_prompts` are the prompts it was trained on
    (empty when unknown or untrained).
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
    name: str = "model"

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


def artifact_engine(path: str | Path) -> Engine:
    """An engine running an exported `.lsdx` step (no model code involved); an artifact not
    exported for this machine's platform is an `ArtifactError` here, not at its first frame."""
    art = load_artifact(path)
    here = current_platform()
    if here not in art.header["platforms"]:
        raise ArtifactError(f"artifact {str(path)!r} was exported for "
                            f"{','.join(art.header['platforms'])}; this machine runs {here}: "
                            f"export it again with --platforms {here}")
    untrained = bool(art.header["untrained"])
    source = art.header["source"] or "unknown weights"
    known = () if untrained else art.trained_prompts
    return Engine(frame_hw=art.frame_hw, steps=art.steps, batches=art.batches,
                  describe=f"artifact {path} ({source}; batches {list(art.batches)}, steps "
                           f"{list(art.steps)})",
                  untrained=untrained, prompt_encoder=art.prompt_encoder(),
                  external_dim=art.header["config"]["model"]["external_cond_dim"],
                  _init_state=art.init_state,
                  _step_for=lambda batch, k: art.step(batch, k), trained_prompts=known,
                  name=Path(path).name)
