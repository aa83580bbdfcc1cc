"""The WebSocket frame protocol (PROTOCOL.md) with one client: its `ready` message, then the JPEG
frames and JSON control messages it sends, each checked and answered, until it leaves or sends
no frame for `--idle-timeout` seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from aiohttp import WSMsgType

from lsd_serve.engine import Engine
from lsd_serve.frame_loop import FrameLoop
from lsd_serve.jpeg import decode_jpeg, jpeg_size
from lsd_serve.metrics import Metrics
from lsd_serve.options import ServerOptions
from lsd_serve.sessions import Session, error_message

PROTOCOL_VERSION = 1
MAX_PROMPT_CHARS = 500
MAX_INT_DIGITS = 100


class Client:
    """The conversation of one connected session with the server's frame loop."""

    def __init__(self, session: Session, loop: FrameLoop, engine: Engine,
                 options: ServerOptions, metrics: Metrics):
        self.session, self.loop, self.engine = session, loop, engine
        self.options, self.metrics = options, metrics

    async def hello(self) -> None:
        """The `ready` message: the session, the frame size and what the client may ask for."""
        engine, options, session = self.engine, self.options, self.session
        height, width = engine.frame_hw
        await session.send({
            "type": "ready", "protocol": PROTOCOL_VERSION, "session": session.id,
            "frame_width": width, "frame_height": height, "steps": session.steps,
            "step_choices": list(engine.steps), "prompt": session.prompt,
            "max_message_bytes": options.max_message_bytes, "deadline_ms": options.deadline_ms,
            "engine": engine.name, "untrained": engine.untrained})

    async def converse(self) -> None:
        """Answer the client's messages until it leaves or idles out."""
        ws = self.session.ws
        idle_s = self.options.idle_timeout_s
        last_frame = time.monotonic()
        while True:
            wait_s = None if idle_s is None else idle_s - (time.monotonic() - last_frame)
            try:
                msg = await ws.receive(timeout=None if wait_s is None else max(wait_s, 1e-3))
            except TimeoutError:
                await self.reply_error("idle", f"no frame for {idle_s:g} s (the server's "
                                       "--idle-timeout): closing this session")
                # bounded: a client that does not read is cut instead of holding its slot
                await self.session.close(code=1000, message=b"idle timeout")
                break
            if msg.type == WSMsgType.BINARY:
                last_frame = time.monotonic()
                await self.on_frame(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await self.on_control(msg.data)
            else:  # closing, closed or a transport error
                break

    async def reply_error(self, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        await self.session.send(error_message(code, message))

    async def on_frame(self, data: bytes) -> None:
        """A JPEG frame: checked on its header, decoded off the event loop, handed to the loop."""
        max_bytes = self.options.max_message_bytes
        height, width = self.engine.frame_hw
        if len(data) > max_bytes:
            return await self.reply_error("too_large", f"message of {len(data)} bytes, expected "
                                          f"at most {max_bytes}")
        if data[:2] != b"\xff\xd8":
            return await self.reply_error("bad_jpeg", "binary message is not a JPEG (expected "
                                          "bytes starting FF D8)")
        size = jpeg_size(data)
        if size is None:
            return await self.reply_error("bad_jpeg", f"JPEG of {len(data)} bytes has no readable "
                                          "frame header (SOF) before its image data")
        # The size is checked on the header: a small file can declare a huge image, whose
        # decoding would take seconds; decoding runs off the event loop, which serves everyone.
        if size != (width, height):
            return await self.reply_error("bad_size", f"frame is {size[0]}x{size[1]} (WxH), "
                                          f"expected {width}x{height}")
        frame_hwc = await asyncio.to_thread(decode_jpeg, data)
        if frame_hwc is None or frame_hwc.shape[:2] != (height, width):
            return await self.reply_error("bad_jpeg", f"JPEG of {len(data)} bytes cannot be "
                                          "decoded")
        self.loop.put_frame(self.session, frame_hwc)

    async def on_control(self, text: str) -> None:
        """A JSON control message: prompt, nearest, reset, steps or stats."""
        max_bytes = self.options.max_message_bytes
        if len(text.encode()) > max_bytes:
            return await self.reply_error("too_large", f"message of {len(text.encode())} bytes, "
                                          f"expected at most {max_bytes}")
        try:
            message = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                                 parse_int=_short_int)
        except ValueError as err:  # JSONDecodeError, a non-finite or too long number
            return await self.reply_error("bad_json", f"text message is not JSON: {err}")
        except RecursionError:
            return await self.reply_error("bad_json", "text message nests arrays or objects too "
                                          "deeply to parse, expected a flat {\"type\": ...} "
                                          "object")
        if not isinstance(message, dict):
            return await self.reply_error("bad_json", "text message is JSON but not an object, "
                                          "expected {\"type\": ...}")
        bad = _invalid_text(message)
        if bad is not None:
            return await self.reply_error("bad_value", f"text {bad!a:.60} holds a lone UTF-16 "
                                          "surrogate, expected valid Unicode")
        kind, msg_id = message.get("type"), message.get("id")
        ack = {"type": "ack", "of": kind, "id": msg_id}
        handlers = {"prompt": self._prompt, "nearest": self._nearest, "reset": self._reset,
                    "steps": self._steps, "stats": self._stats}
        handler = handlers.get(kind) if isinstance(kind, str) else None  # "type" may be any JSON
        if handler is None:
            return await self.reply_error("unknown_type", f"message type {kind!r}, expected one "
                                          "of prompt, nearest, reset, steps, stats")
        return await handler(message, ack)

    async def _prompt(self, message: dict, ack: dict) -> None:
        prompt = message.get("text")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            return await self.reply_error("bad_value", f"prompt text {prompt!r:.60}, expected a "
                                          f"string of at most {MAX_PROMPT_CHARS} chars")
        # Acknowledged once it (or a newer prompt of this session) applies; meanwhile the client's
        # next messages are read, so a burst of prompts collapses into its newest.
        applied = self.loop.set_prompt_async(self.session, prompt)
        self.loop.spawn(self._ack_prompt(applied, ack))

    async def _ack_prompt(self, applied, ack: dict) -> None:
        await self.session.send({**ack, "prompt": await applied})

    async def _nearest(self, message: dict, ack: dict) -> None:
        text = message.get("text")
        if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
            return await self.reply_error("bad_value", f"nearest text {text!r:.60}, expected a "
                                          f"string of at most {MAX_PROMPT_CHARS} chars")
        near = await asyncio.to_thread(self.engine.nearest_trained, text)
        near = near or {"nearest": None, "similarity": None, "trained": None, "near": None}
        encoder = self.engine.prompt_encoder
        return await self.session.send({**ack, "type": "nearest", "text": text, **near,
                                        "encoder": None if encoder is None else encoder.name})

    async def _reset(self, message: dict, ack: dict) -> None:
        self.session.reset_requested = True
        return await self.session.send(ack)

    async def _steps(self, message: dict, ack: dict) -> None:
        steps = message.get("steps")
        if type(steps) is not int or steps not in self.engine.steps:
            return await self.reply_error("bad_value", f"steps {steps!r}, expected one of "
                                          f"{list(self.engine.steps)}")
        self.session.steps = steps
        return await self.session.send({**ack, "steps": steps})

    async def _stats(self, message: dict, ack: dict) -> None:
        session = self.session
        return await session.send({
            **ack, "type": "stats", "frames_in": session.frames_in,
            "frames_out": session.frames_out, "dropped": session.dropped,
            "prompt": session.prompt, "steps": session.steps,
            "sessions": len(self.loop.sessions)})


def _refuse_constant(name: str):
    """`json.loads` hook: NaN, Infinity and -Infinity are not JSON (a browser cannot parse them
    back), so a message holding one is refused."""
    raise ValueError(f"{name} is not a JSON number, expected a finite number")


def _finite_float(text: str) -> float:
    """`json.loads` hook: a number too large for a float (1e999) is refused, not made infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range, expected a finite number")
    return value


def _short_int(text: str) -> int:
    """`json.loads` hook: an integer of more than `MAX_INT_DIGITS` digits is refused (no message
    needs one; converting a long one costs time)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits, expected at most "
                         f"{MAX_INT_DIGITS}")
    return int(text)


def _invalid_text(message) -> str | None:
    """The first string (key or value) in a parsed message holding a lone UTF-16 surrogate
    (`"\\ud800"` parses to one; it has no UTF-8 encoding), else None."""
    stack = [message]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return item
    return None
