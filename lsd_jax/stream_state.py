"""The state of the streaming step as a named contract, and how a server keeps streams apart.

`StreamState` is what `lsd_jax.streaming.make_step` takes and returns (donated) and, flattened in
the order of `STATE_FIELDS`, the state arguments of an exported step (`serve/export.py`). Code
outside this module uses its fields by name.

A server keeps each client's history on its own as a `SessionCache` and runs the clients that have
a frame together: `stack_sessions` makes one `StreamState` of them, the step runs, and
`split_sessions` gives each its cache back. This module needs JAX only (an exported step runs
without the model code).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


class StreamState(NamedTuple):
    """The state of `b` concurrent streams. Its fields, in this order, are also the flat state
    arguments of an exported step (`STATE_FIELDS`)."""

    cache_k: jnp.ndarray  # [layers, b, s, n, heads, head_dim], un-rotated keys
    cache_v: jnp.ndarray  # [layers, b, s, n, heads, head_dim]
    slot: jnp.ndarray  # int32 []: the ring slot the next frame is written to
    num_valid: jnp.ndarray  # int32 [b]: how many of the newest slots hold this stream's history
    rng: jnp.ndarray  # uint32 [2]

    @property
    def batch(self) -> int:
        """How many streams the state holds."""
        return int(self.num_valid.shape[0])


STATE_FIELDS: tuple[str, ...] = StreamState._fields


class SessionCache(NamedTuple):
    """One stream's history on its own, stored so that its next write slot is 0: every stored
    cache then agrees on `slot`, so any set of them stacks into one `StreamState`
    (`stack_sessions`) and splits back (`split_sessions`). A server keeps one per client and runs
    the clients that have a frame together."""

    cache_k: jnp.ndarray  # [layers, s, n, heads, head_dim]
    cache_v: jnp.ndarray  # [layers, s, n, heads, head_dim]
    num_valid: jnp.ndarray  # int32 []

    def reset(self) -> SessionCache:
        """The same cache with no valid history (the next frame starts a new stream)."""
        return self._replace(num_valid=jnp.zeros((), jnp.int32))


def empty_session(state: StreamState) -> SessionCache:
    """A session cache with no history, shaped like the streams of `state`."""
    return SessionCache(state.cache_k[:, 0], state.cache_v[:, 0], jnp.zeros((), jnp.int32))


@jax.jit
def stack_sessions(sessions: list[SessionCache], rng) -> StreamState:
    """One state of `len(sessions)` streams whose next write slot is 0."""
    return StreamState(cache_k=jnp.stack([s.cache_k for s in sessions], axis=1),
                       cache_v=jnp.stack([s.cache_v for s in sessions], axis=1),
                       slot=jnp.zeros((), jnp.int32),
                       num_valid=jnp.stack([s.num_valid for s in sessions]), rng=rng)


@partial(jax.jit, static_argnums=1)
def split_sessions(state: StreamState, rows: int) -> list[SessionCache]:
    """The first `rows` streams of a state stacked by `stack_sessions` and stepped once, as
    session caches again (rolled by one slot so that the next write slot is 0 again)."""
    cache_k, cache_v = (jnp.roll(c, -1, axis=2) for c in (state.cache_k, state.cache_v))
    return [SessionCache(cache_k[:, i], cache_v[:, i], state.num_valid[i]) for i in range(rows)]
