"""One client of the server: what it asked for, its stream's cache, and how messages reach it."""

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
    """One client: its prompt, requested steps, cache row, pending frame and counters."""

    id: int
    ws: web.WebSocketResponse
    prompt: str
    prompt_vec: np.ndarray | None
    steps: int
    cache: SessionCache
    pending: tuple | None = None  # (frame_hwc uint8 RGB, seq, arrival perf_counter)
    reset_requested: bool = False
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = True

    async def send(self, *messages) -> None:
        """Send JSON dicts and binary payloads in order; a client that left is ignored."""
        async with self.send_lock:
            for message in messages:
                if self.ws.closed:
                    return
                try:
                    if isinstance(message, bytes | bytearray):
                        await self.ws.send_bytes(message)
                    else:
                        await self.ws.send_str(json.dumps(message))
                except ConnectionError:
                    return
