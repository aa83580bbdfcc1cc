"""One client of the server: what it asked for, its stream's cache, and how messages reach it.

Every send is bounded in time (`send_timeout_s`): a client that stops reading is disconnected
(its transport aborted) instead of holding its slot, and a session has at most one output frame
on its way (`outputs_in_flight`): a frame made while the previous one is still unsent is dropped,
so the server never queues work for a client that does not take it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from lsd_jax.stream_state import SessionCache


def error_message(code: str, message: str, **extra) -> dict:
    """The protocol's error message (PROTOCOL.md): `{"type": "error", "code", "message"}`."""
    return {"type": "error", "code": code, "message": message, **extra}


@dataclass(eq=False)
class Session:
    """One client: its prompt, requested steps, cache row, pending frame and counters.

    `cache` is the session's stream when it is not in the frame loop's resident batch (None while
    it is: the loop keeps the batch it stepped last and reuses it as long as the same sessions
    step together). The prompt fields coalesce prompt changes: `prompt_wanted` is the newest
    asked for, `prompt_asked`/`prompt_applied` count requests and the last one applied."""

    id: int
    ws: web.WebSocketResponse
    prompt: str
    prompt_vec: np.ndarray | None
    steps: int
    cache: SessionCache | None
    transport: asyncio.BaseTransport | None = None
    send_timeout_s: float | None = 10.0
    pending: tuple | None = None  # (frame_hwc uint8 RGB, seq, arrival perf_counter)
    reset_requested: bool = False
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    outputs_dropped: int = 0
    outputs_in_flight: int = 0
    prompt_wanted: str = ""
    prompt_asked: int = 0
    prompt_applied: int = 0
    prompt_encoded_at: float = float("-inf")
    prompt_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    prompt_task: asyncio.Task | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = True

    async def send(self, *messages) -> bool:
        """Send JSON dicts and binary payloads in order; False (nothing more is sent) when the
        client left, or did not take them within `send_timeout_s` (then it is disconnected)."""
        async with self.send_lock:
            return await self.send_locked(*messages)

    async def send_locked(self, *messages) -> bool:
        """`send` for a caller already holding `send_lock`."""
        try:
            await asyncio.wait_for(self._send_all(messages), self.send_timeout_s)
        except TimeoutError:
            self.abort()
            return False
        except ConnectionError:
            return False
        return not self.ws.closed

    async def _send_all(self, messages) -> None:
        for message in messages:
            if self.ws.closed:
                return
            if isinstance(message, bytes | bytearray):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_str(json.dumps(message))

    async def close(self, code: int, message: bytes) -> None:
        """Close the WebSocket; a client that does not answer within the send timeout is cut."""
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message),
                                   self.send_timeout_s)
        except (TimeoutError, ConnectionError):
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once (its blocked sends fail, its receive loop ends)."""
        self.open = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
