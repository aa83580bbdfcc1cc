"""The interface every prompt encoder implements (`lsd_jax.prompt` lists them): a prompt string ->
a float32 vector `[dim]`, behind a bounded LRU cache of the embeddings per prompt string.
"""

from __future__ import annotations

import abc
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from lsd_jax.errors import PromptError

DEFAULT_CACHE_SIZE = 1024


class PromptEncoder(abc.ABC):
    """Base: `encode(prompt) -> [dim]` (LRU-cached), `encode_batch(prompts) -> [len(prompts), dim]`.

    `name` is short, for messages; `identity` names the function the encoder computes (recorded
    with trained models); the cache holds the `cache_size` most recently used prompts;
    `cache_info()` counts hits and misses.
    """

    dim: int
    name: str = "unnamed"
    identity: str = "unnamed"

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE):
        if cache_size < 1:
            raise PromptError(f"prompt cache_size={cache_size}, expected >= 1")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    @abc.abstractmethod
    def _embed(self, prompt: str) -> np.ndarray:
        """The embedding `[dim]` of one prompt (uncached)."""

    def encode(self, prompt: str) -> np.ndarray:
        """float32 `[dim]`, read-only; computed once while `prompt` stays in the LRU cache."""
        with self._lock:
            vector = self._cache.get(prompt)
            if vector is not None:
                self._cache.move_to_end(prompt)
                self._hits += 1
                return vector
        vector = np.array(self._embed(prompt), np.float32)
        vector.flags.writeable = False
        with self._lock:
            self._misses += 1
            self._cache[prompt] = vector
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vector

    def encode_batch(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 `[len(prompts), dim]`: one row per stream."""
        return np.stack([self.encode(p) for p in prompts])

    def cache_info(self) -> dict:
        """`{"hits", "misses", "size", "max_size"}` of the embedding cache."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "size": len(self._cache),
                    "max_size": self.cache_size}
