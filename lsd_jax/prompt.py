"""Prompt encoders (DESIGN.md section 5): a prompt string -> a float32 vector `[prompt_dim]`.

The model owns a learned Linear from `prompt_dim` to its hidden size, so a fixed encoder here plus
that projection is a prompt embedding learned with the model. Encoders are pluggable:

- `HashedPromptEncoder`: built in, no training and no download. Each lowercase word maps to a fixed
  pseudo-random unit vector drawn from a stable hash of the word; the prompt is their mean,
  L2-normalised and scaled to norm `sqrt(dim)` (entries of unit scale, like a normalised
  activation). Same prompt, same vector, on every machine and Python version.
- `PrecomputedPromptEncoder`: a table of embeddings made elsewhere (e.g. a frozen text encoder).

Every encoder caches its embedding per prompt string, so switching prompts mid-stream costs a
dictionary lookup per frame. Cached vectors are read-only.
"""

from __future__ import annotations

import abc
import hashlib
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lsd_jax.config import Config

_WORD = re.compile(r"[a-z0-9]+")


class PromptError(ValueError):
    """A prompt an encoder cannot embed; the message names it and what the encoder knows."""


class PromptEncoder(abc.ABC):
    """Base: `encode(prompt) -> [dim]` (cached), `encode_batch(prompts) -> [len(prompts), dim]`."""

    dim: int

    def __init__(self):
        self._cache: dict[str, np.ndarray] = {}

    @abc.abstractmethod
    def _embed(self, prompt: str) -> np.ndarray:
        """The embedding `[dim]` of one prompt (uncached)."""

    def encode(self, prompt: str) -> np.ndarray:
        """float32 `[dim]`, read-only, computed once per prompt string."""
        if prompt not in self._cache:
            vector = np.array(self._embed(prompt), np.float32)
            vector.flags.writeable = False
            self._cache[prompt] = vector
        return self._cache[prompt]

    def encode_batch(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 `[len(prompts), dim]`: one row per stream."""
        return np.stack([self.encode(p) for p in prompts])


def _word_vector(word: str, dim: int) -> np.ndarray:
    """A unit vector `[dim]` determined by `word` alone.

    Gaussian entries by Box-Muller from SHAKE-256 output, so the draw depends on no random number
    generator whose stream could change between library versions.
    """
    bits = np.frombuffer(hashlib.shake_256(word.encode()).digest(8 * dim), "<u4")
    u1, u2 = ((bits.reshape(2, dim).astype(np.float64) + 0.5) / 2.0**32)
    gauss = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return gauss / np.linalg.norm(gauss)


class HashedPromptEncoder(PromptEncoder):
    """Deterministic bag-of-words embedding: mean of per-word hash vectors, norm `sqrt(dim)`.

    Words are runs of `[a-z0-9]` after lowercasing, so case and punctuation do not matter. A prompt
    with no words ("" or "!!") is the zero vector: no prompt.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise PromptError(f"prompt dim={dim}, expected >= 1")
        super().__init__()
        self.dim = dim

    def _embed(self, prompt: str) -> np.ndarray:
        words = _WORD.findall(prompt.lower())
        if not words:
            return np.zeros(self.dim)
        mean = np.mean([_word_vector(w, self.dim) for w in words], axis=0)
        return mean * (math.sqrt(self.dim) / np.linalg.norm(mean))


class PrecomputedPromptEncoder(PromptEncoder):
    """Embeddings looked up in a table `{prompt: vector [dim]}`; prompts are matched exactly."""

    def __init__(self, table: Mapping[str, np.ndarray]):
        if not table:
            raise PromptError("precomputed prompt table is empty, expected at least one prompt")
        shapes = {p: np.shape(v) for p, v in table.items()}
        first = next(iter(shapes.values()))
        bad = {p: s for p, s in shapes.items() if s != first or len(s) != 1}
        if bad:
            raise PromptError(f"precomputed prompt embeddings must all be vectors of one length; "
                              f"got {first} and {bad}")
        super().__init__()
        self.dim = first[0]
        self._table = dict(table)

    def _embed(self, prompt: str) -> np.ndarray:
        if prompt not in self._table:
            known = ", ".join(repr(p) for p in sorted(self._table)[:10])
            more = "" if len(self._table) <= 10 else f" and {len(self._table) - 10} more"
            raise PromptError(f"unknown prompt {prompt!r}; the precomputed table has {known}{more}")
        return self._table[prompt]


def make_prompt_encoder(cfg: Config, table: Mapping[str, np.ndarray] | None = None):
    """The encoder for `cfg`: None when the model takes no prompt (`model.prompt_dim == 0`),
    `PrecomputedPromptEncoder(table)` when a table is given, else `HashedPromptEncoder`."""
    dim = cfg.model.prompt_dim
    if dim == 0:
        return None
    if table is None:
        return HashedPromptEncoder(dim)
    encoder = PrecomputedPromptEncoder(table)
    if encoder.dim != dim:
        raise PromptError(f"precomputed prompt embeddings have length {encoder.dim}, expected "
                          f"model.prompt_dim={dim}")
    return encoder
