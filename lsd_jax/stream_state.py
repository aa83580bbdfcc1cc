"""The state of the streaming step as a named contract, and how a server keeps streams apart.

`StreamState` is what `lsd_jax.streaming.make_step` takes and returns (donated) and, flattened in
the order of `STATE_FIELDS`, the state arguments of an exported step (`lsd_serve/artifact.py`). Code
outside this module uses its fields by name.

A server keeps each client's history on its own as a `SessionCache` and runs the clients that have
a frame together: `stack_sessions` makes one `StreamState` of them, the step runs, and
`split_sessions` gives each its cache back. `stream_frames` is the one frame-by-frame loop of
everything that streams a source (a file, an eval clip, a benchmark pool). This module needs JAX
only (an exported step runs without the model code).
"""

from __future__ import annotations

import time
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


class Streamed(NamedTuple):
    """One frame of `stream_frames`: its index, the state after it (donated to the next step:
    copy it to keep it), the step's output `[b, H, W, 3]` and the step's time in seconds (None
    when not timed)."""

    index: int
    state: StreamState
    out_bhwc: jax.Array
    seconds: float | None


def stream_frames(step, state: StreamState, frames, prompts=None, *, timed: bool = True):
    """The frame-by-frame loop every streaming consumer runs (`lsd stream`, `lsd eval`,
    `lsd bench long-stream`): for each item `frame_bhwc` of `frames`, `state, out =
    step(state, frame_bhwc, prompt_bp)`, yielding a `Streamed` per frame.

    `prompts` is None, one `[b, P]` array for every frame, or a callable `i -> [b, P]`. `timed`
    blocks on each output and measures the step alone; untimed, the output is yielded as the
    step returns it, so the caller's host work on frame i overlaps the step of frame i + 1.
    """
    for i, frame_bhwc in enumerate(frames):
        prompt_bp = prompts(i) if callable(prompts) else prompts
        t0 = time.perf_counter()
        state, out_bhwc = step(state, frame_bhwc, prompt_bp)
        seconds = None
        if timed:
            out_bhwc = jax.block_until_ready(out_bhwc)
            seconds = time.perf_counter() - t0
        yield Streamed(i, state, out_bhwc, seconds)
