"""Prompt encoders (docs/DESIGN.md section 5): a prompt string -> a float32 vector `[prompt_dim]`.

The model owns a learned Linear from `prompt_dim` to its hidden size, so a fixed encoder here plus
that projection is a prompt embedding learned with the model. Encoders are pluggable
(`prompt.encoder` in the config):

- `HashedPromptEncoder` ("hashed", identity `hashed-v1`): built in, no training and no download.
  Each lowercase word maps to a fixed pseudo-random unit vector drawn from a stable hash of the
  word; the prompt is their mean, L2-normalised and scaled to norm `sqrt(dim)` (entries of unit
  scale, like a normalised activation). Same prompt, same vector, on every machine and Python
  version.
- `lsd_jax.minilm.MiniLMPromptEncoder` ("minilm"): all-MiniLM-L6-v2 in Flax NNX, 384 wide, unit
  norm; its identity names the sha256 of the weights it runs.
- `PrecomputedPromptEncoder`: a table of embeddings made elsewhere (e.g. a frozen text encoder).

Every encoder derives from `PromptEncoder` (`lsd_jax.prompt_encoder`), which keeps a bounded LRU
cache of its embeddings per prompt string (`cache_size` entries), so switching prompts mid-stream
costs a dictionary lookup per frame and a prompt is run through the encoder once while it stays
among the recent ones. Cached vectors are read-only.

A model records the identity of the encoder it was trained with (`encoder_record`); loading it
with another one is an error (`check_encoder_record`). `nearest_prompt` finds, among the prompts
a model was trained on, the one whose embedding is nearest a new prompt's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lsd_jax.config import PROMPT_ENCODER_DIMS, Config
from lsd_jax.errors import PromptError
from lsd_jax.minilm_files import MINILM_ID
from lsd_jax.prompt_encoder import DEFAULT_CACHE_SIZE, PromptEncoder

_WORD = re.compile(r"[a-z0-9]+")
HASHED_ID = "hashed-v1"


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

    name, identity = "hashed", HASHED_ID

    def __init__(self, dim: int, cache_size: int = DEFAULT_CACHE_SIZE):
        if dim < 1:
            raise PromptError(f"prompt dim={dim}, expected >= 1")
        super().__init__(cache_size)
        self.dim = dim

    def _embed(self, prompt: str) -> np.ndarray:
        words = _WORD.findall(prompt.lower())
        if not words:
            return np.zeros(self.dim)
        mean = np.mean([_word_vector(w, self.dim) for w in words], axis=0)
        return mean * (math.sqrt(self.dim) / np.linalg.norm(mean))


class PrecomputedPromptEncoder(PromptEncoder):
    """Embeddings looked up in a table `{prompt: vector [dim]}`; prompts are matched exactly."""

    name = identity = "precomputed"

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


def _minilm_encoder():
    """The shared all-MiniLM-L6-v2 encoder (`lsd_jax.minilm`; its files fetched and verified on
    first use)."""
    from lsd_jax.minilm import load_minilm_encoder  # lazy: Flax, which hashed prompts skip

    return load_minilm_encoder()


def make_prompt_encoder(cfg: Config, table: Mapping[str, np.ndarray] | None = None):
    """The encoder for `cfg`: None when the model takes no prompt (`model.prompt_dim == 0`),
    `PrecomputedPromptEncoder(table)` when a table is given, else the one `prompt.encoder` names
    (`HashedPromptEncoder(model.prompt_dim)`, or the shared all-MiniLM-L6-v2 encoder)."""
    dim = cfg.model.prompt_dim
    if dim == 0:
        return None
    if table is None:
        if cfg.prompt.encoder == "minilm":
            encoder = _minilm_encoder()
        else:
            return HashedPromptEncoder(dim)
    else:
        encoder = PrecomputedPromptEncoder(table)
    if encoder.dim != dim:
        raise PromptError(f"{type(encoder).__name__} embeddings have length {encoder.dim}, "
                          f"expected model.prompt_dim={dim}")
    return encoder


def prompt_encoder_id(cfg: Config) -> str:
    """The identity of the encoder `cfg` names: "none" (no prompt), `HASHED_ID`, or
    all-MiniLM-L6-v2 with the sha256 of its weights file."""
    if cfg.model.prompt_dim == 0:
        return "none"
    if cfg.prompt.encoder == "minilm":
        return MINILM_ID
    return HASHED_ID


def encoder_record(cfg: Config) -> dict:
    """What a checkpoint or an artifact records about its prompt encoder:
    `{"encoder": "none" | "hashed" | "minilm", "id": str, "dim": int}`."""
    name = "none" if cfg.model.prompt_dim == 0 else cfg.prompt.encoder
    return {"encoder": name, "id": prompt_encoder_id(cfg), "dim": cfg.model.prompt_dim}


def legacy_encoder_record(prompt_dim: int) -> dict:
    """The record of a model saved before encoders were recorded: the hashed encoder (or none)."""
    if prompt_dim == 0:
        return {"encoder": "none", "id": "none", "dim": 0}
    return {"encoder": "hashed", "id": HASHED_ID, "dim": prompt_dim}


def check_encoder_record(record: dict, cfg: Config, what: str) -> None:
    """Raise `PromptError` when `cfg` would encode prompts with another encoder than the one
    `record` says the model `what` was trained with."""
    wanted = encoder_record(cfg)
    if record.get("id") != wanted["id"] or record.get("dim") != wanted["dim"]:
        raise PromptError(
            f"{what} was trained with the prompt encoder {record.get('encoder')!r} (id "
            f"{record.get('id')!r}, {record.get('dim')} wide); the config asks for "
            f"{wanted['encoder']!r} (id {wanted['id']!r}, {wanted['dim']} wide): a model only "
            f"understands the encoder it was trained with (prompt.encoder="
            f"{record.get('encoder')!r})")


def encoder_from_record(record: dict):
    """The encoder a record (`encoder_record`) names, or None for "none"; `PromptError` when this
    lsd computes no encoder of that identity and width."""
    name, identity, dim = record.get("encoder"), record.get("id"), record.get("dim")
    if name == "none":
        return None
    if name == "hashed" and identity == HASHED_ID and isinstance(dim, int) and dim > 0:
        return HashedPromptEncoder(dim)
    if name == "minilm" and identity == MINILM_ID and dim == PROMPT_ENCODER_DIMS["minilm"]:
        return _minilm_encoder()
    raise PromptError(f"prompt encoder {name!r} (id {identity!r}, {dim} wide) is not one this lsd "
                      f"computes, expected 'hashed' (id {HASHED_ID!r}) or 'minilm' (id "
                      f"{MINILM_ID!r}, {PROMPT_ENCODER_DIMS['minilm']} wide)")


def cosine_similarity(a_d: np.ndarray, b_d: np.ndarray) -> float:
    """Cosine of the angle between two vectors `[d]`; 0.0 when either is zero (no words)."""
    a_d, b_d = np.asarray(a_d, np.float64), np.asarray(b_d, np.float64)
    norms = np.linalg.norm(a_d) * np.linalg.norm(b_d)
    return float(a_d @ b_d / norms) if norms > 0 else 0.0


# A prompt whose cosine similarity with a trained prompt reaches this is read as a phrasing of it
# (a paraphrase); below, as far from everything the model was trained on. Under MiniLM the
# held-out paraphrases of `lsd_train/tasks.py` score 0.61-0.93 with their nearest trained prompt,
# and that prompt is always their own task's; unrelated prompts ("a cat wearing sunglasses", "a bowl
# of soup", "a photo of a dog") 0.21-0.48.
NEAR_SIMILARITY = 0.6


def nearest_prompt(encoder: PromptEncoder, prompt: str,
                   candidates: Sequence[str]) -> tuple[str, float]:
    """The candidate (e.g. a model's trained prompts) whose embedding under `encoder` has the
    largest cosine similarity with `prompt`'s, and that similarity in [-1, 1]; the first such
    candidate on a tie."""
    if not candidates:
        raise PromptError(f"no candidate prompts to compare {prompt!r} with, expected at least one")
    query_d = encoder.encode(prompt)
    sims = [cosine_similarity(query_d, encoder.encode(c)) for c in candidates]
    best = int(np.argmax(sims))
    return candidates[best], sims[best]
