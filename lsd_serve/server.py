"""`lsd serve`: the browser page, the WebSocket frame protocol (lsd_serve/PROTOCOL.md), `/healthz`
and Prometheus `/metrics`, around one model loop that all sessions share.

    app = make_app(engine, ServerOptions(...))        # aiohttp application
    serve_forever(engine, options)                    # lsd serve
    with BackgroundServer(engine, options) as server: # tests and benchmarks: a thread, a free port
        server.url

The frame loop (`FrameLoop`): each session holds at most one pending input frame (latest frame
wins: a frame arriving while another waits replaces it and is counted as dropped, so latency never
builds up). The loop takes every pending frame at once, groups the sessions by their requested step
count, stacks each group's caches along the batch axis (padded to the smallest fixed batch size that
holds it), runs the jitted step in a worker thread (the event loop keeps receiving meanwhile), and
sends each session its output. A session's cache lives in the session (a `SessionCache`), so
it is freed with the session on disconnect; a prompt switch or a reset applies from the next frame
the loop takes. With a deadline, the loop picks the most steps (up to the requested count) whose
measured step time fits what is left of the oldest frame's deadline, else the fewest it has.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import jax
import numpy as np
from aiohttp import WSMsgType, web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lsd_jax.stream_state import SessionCache, empty_session, split_sessions, stack_sessions
from lsd_serve.engine import Engine
from lsd_serve.scheduler import StepScheduler

STATIC = Path(__file__).resolve().parent / "static"
PROTOCOL_VERSION = 1
MAX_PROMPT_CHARS = 500
# Batch sizes an in-process model is padded to (an artifact has its own): a few fixed shapes, so
# the step compiles at most this many times per step count however sessions come and go.
DEFAULT_BATCHES = (1, 2, 4)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ServerOptions:
    """What `lsd serve` takes besides the model. `allowed_origins` are browser origins allowed on
    the WebSocket besides the page's own; `deadline_ms` None turns adaptive steps off;
    `precompile` compiles every (batch, steps, sessions) variant before accepting clients, so no
    client waits for a compile when another joins; `gather_ms` > 0 makes the loop, woken by one
    session's frame, wait that long for the other sessions' frames so they share the step (more
    frames per step where a batch costs little more than one stream, at that much latency);
    a session that sends no frame for `idle_timeout_s` seconds is closed, freeing its slot (None:
    never)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 4
    max_message_bytes: int = 1 << 20
    deadline_ms: float | None = None
    default_prompt: str = "a watercolor painting"
    seed: int = 0
    precompile: bool = False
    gather_ms: float = 0.0
    idle_timeout_s: float | None = 60.0


class Metrics:
    """The Prometheus series of one server (its own registry, so servers in one process don't
    share counts)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("lsd_frames_in", "frames received", registry=r)
        self.frames_out = Counter("lsd_frames_out", "frames sent back", registry=r)
        self.frames_dropped = Counter(
            "lsd_frames_dropped", "frames replaced by a newer one before the loop took them",
            registry=r)
        self.sessions = Gauge("lsd_sessions", "connected sessions", registry=r)
        self.sessions_refused = Counter("lsd_sessions_refused", "clients refused: server full",
                                        registry=r)
        self.errors = Counter("lsd_client_errors", "bad client messages by error code", ["code"],
                              registry=r)
        self.step_seconds = Histogram(
            "lsd_step_seconds", "one batched step (all sessions of a group)", ["batch", "steps"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
            registry=r)
        self.frame_seconds = Histogram(
            "lsd_frame_latency_seconds", "frame arrival to output sent, per frame",
            buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12), registry=r)
        self.steps_used = Counter("lsd_frames_by_steps", "frames made, by denoising steps used",
                                  ["steps"], registry=r)
        self.steps_reduced = Counter(
            "lsd_frames_steps_reduced", "frames made with fewer steps than requested (deadline)",
            registry=r)


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


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from a JPEG's start-of-frame header, without decoding it; None when no
    start-of-frame segment comes before the image data (not a readable JPEG)."""
    i = 2  # after FF D8
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    return None


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """RGB uint8 frame of a JPEG, or None when OpenCV cannot decode it."""
    frame_bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if frame_bgr is None else cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)


def encode_jpeg(frame_hwc: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame_hwc, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, "OpenCV failed to encode a uint8 RGB frame as JPEG"
    return buf.tobytes()


class FrameLoop:
    """The one model loop: batches the sessions' pending frames through the engine's step."""

    def __init__(self, engine: Engine, options: ServerOptions, metrics: Metrics):
        self.engine, self.options, self.metrics = engine, options, metrics
        self.batches = engine.batches or DEFAULT_BATCHES
        self.sessions: dict[int, Session] = {}
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lsd-step")
        state = engine.init_state(min(self.batches), options.seed)
        self.rng = state.rng
        self.empty = empty_session(state)
        self.scheduler = StepScheduler(self.batches, engine.steps, options.deadline_ms)
        self.sends: set[asyncio.Task] = set()
        self.frames_done = 0

    def new_session(self, session_id: int, ws, prompt: str) -> Session:
        session = Session(session_id, ws, prompt, self._prompt_vec(prompt), self.engine.max_steps,
                          self.empty)
        self.sessions[session_id] = session
        self.metrics.sessions.set(len(self.sessions))
        return session

    def drop_session(self, session: Session) -> None:
        """Forget a session: its cache arrays go with it."""
        session.open = False
        self.sessions.pop(session.id, None)
        self.metrics.sessions.set(len(self.sessions))

    def _prompt_vec(self, prompt: str):
        vec = self.engine.encode_prompts([prompt])
        return None if vec is None else vec[0]

    def set_prompt(self, session: Session, prompt: str) -> None:
        session.prompt, session.prompt_vec = prompt, self._prompt_vec(prompt)

    async def set_prompt_async(self, session: Session, prompt: str) -> None:
        """`set_prompt` with the encoding in a worker thread: a new prompt through a neural
        encoder does not hold up the event loop (and every other session) meanwhile."""
        vec = await asyncio.to_thread(self._prompt_vec, prompt)
        session.prompt, session.prompt_vec = prompt, vec

    def put_frame(self, session: Session, frame_hwc: np.ndarray) -> None:
        """Latest frame wins: replace a frame still waiting, counting it as dropped."""
        session.frames_in += 1
        self.metrics.frames_in.inc()
        if session.pending is not None:
            session.dropped += 1
            self.metrics.frames_dropped.inc()
        session.pending = (frame_hwc, session.frames_in, time.perf_counter())
        self.wake.set()

    def precompile(self) -> int:
        """Run every variant once on empty rows (in the worker thread); returns how many. The
        loop's rng is restored, so the outputs that follow are as without it."""
        rng, count = self.rng, 0
        frame_hwc = np.zeros((*self.engine.frame_hw, 3), np.uint8)
        prompt = self._prompt_vec(self.options.default_prompt)
        for batch, real, steps in self.scheduler.precompile_plan():
            rows = [self.empty] * batch
            prompt_bp = None if prompt is None else np.stack([prompt] * batch)
            _, _, step_s = self._run_step(rows, np.stack([frame_hwc] * batch), prompt_bp, steps,
                                          real)
            self._record(batch, steps, step_s)
            count += 1
        self.rng = rng
        return count

    # ------------------------------------------------------------------------- the loop

    async def run(self) -> None:
        """Forever: wait for frames, step every group, send the outputs."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            if self.options.gather_ms > 0 and any(s.pending is None
                                                  for s in self.sessions.values()):
                await asyncio.sleep(self.options.gather_ms / 1e3)
            self.wake.clear()
            taken = [s for s in self.sessions.values() if s.pending is not None]
            for session in taken:
                if session.reset_requested:
                    session.cache = session.cache.reset()
                    session.reset_requested = False
            for requested, chunk in self.scheduler.groups(taken, steps_of=lambda s: s.steps):
                try:
                    await self._step_group(loop, chunk, requested)
                except Exception as err:  # a failed step must not end the loop for everyone
                    logging.getLogger("lsd.serve").exception("step failed")
                    for session in chunk:
                        self._spawn(session.send(_error(
                            "internal", f"the step failed on this frame: {err}")))

    async def _step_group(self, loop, group: list[Session], requested: int) -> None:
        jobs = [(s, *s.pending) for s in group]
        for s in group:
            s.pending = None
        batch = self.scheduler.batch_for(len(group))
        waited_s = time.perf_counter() - min(arrival for *_, arrival in jobs)
        steps = self.scheduler.choose_steps(batch, requested, waited_s)
        rows = [s.cache for s in group] + [self.empty] * (batch - len(group))
        frames_bhwc = np.stack([frame for _, frame, _, _ in jobs]
                               + [jobs[0][1]] * (batch - len(group)))
        prompt_bp = None
        if group[0].prompt_vec is not None:
            prompt_bp = np.stack([s.prompt_vec for s in group]
                                 + [group[0].prompt_vec] * (batch - len(group)))
        new_rows, outs, step_s = await loop.run_in_executor(
            self.executor, self._run_step, rows, frames_bhwc, prompt_bp, steps, len(group))
        self._record(batch, steps, step_s)
        now = time.perf_counter()
        for (session, _, seq, arrival), cache, jpeg in zip(jobs, new_rows, outs, strict=True):
            if not session.open:
                continue
            session.cache = cache
            session.frames_out += 1
            self.frames_done += 1
            self.metrics.frames_out.inc()
            self.metrics.steps_used.labels(str(steps)).inc()
            if steps < requested:
                self.metrics.steps_reduced.inc()
            self.metrics.frame_seconds.observe(now - arrival)
            meta = {"type": "frame", "seq": seq, "steps": steps, "requested_steps": requested,
                    "batch": batch, "sessions_in_batch": len(group),
                    "latency_ms": 1e3 * (now - arrival), "step_ms": 1e3 * step_s,
                    "dropped": session.dropped, "frames_out": session.frames_out}
            self._spawn(session.send(meta, jpeg))

    def _spawn(self, coro) -> None:
        """A send that runs on its own (a slow client must not hold up the loop); the task is
        kept until done, as asyncio only holds weak references to tasks."""
        task = asyncio.create_task(coro)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    def _record(self, batch: int, steps: int, step_s: float) -> None:
        self.metrics.step_seconds.labels(str(batch), str(steps)).observe(step_s)
        self.scheduler.record(batch, steps, step_s)

    def _run_step(self, rows, frames_bhwc, prompt_bp, steps: int, real: int):
        """In the worker thread: stack, step, split; returns (rows, JPEGs, step seconds)."""
        t0 = time.perf_counter()
        state = stack_sessions(list(rows), self.rng)
        state, out_bhwc = self.engine.step(state, frames_bhwc, prompt_bp, steps)
        out_bhwc = np.asarray(jax.block_until_ready(out_bhwc))
        self.rng = state.rng
        new_rows = split_sessions(state, real)
        step_s = time.perf_counter() - t0
        return new_rows, [encode_jpeg(out_bhwc[i]) for i in range(real)], step_s


# ----------------------------------------------------------------------------- the application


def _error(code: str, message: str, **extra) -> dict:
    return {"type": "error", "code": code, "message": message, **extra}


def own_origins(request: web.Request, bound_host: str) -> set[str]:
    """The origins of the page as this server serves it: the address it was bound to (`--host`)
    and the local address the connection arrived at, with the port it is listening on; for a
    loopback address also localhost, 127.0.0.1 and [::1]. Never the request's Host header, which
    the client chooses (a DNS-rebinding page sends its own name there)."""
    local_ip, port = request.transport.get_extra_info("sockname")[:2]
    hosts = {local_ip}
    if bound_host not in ("", "0.0.0.0", "::"):
        hosts.add(bound_host)
    loopback = bound_host == "localhost"
    for host in list(hosts):
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
    if loopback:
        hosts |= {"localhost", "127.0.0.1", "::1"}
    bracket = lambda h: f"[{h}]" if ":" in h else h  # noqa: E731
    return {f"{request.scheme}://{bracket(h)}:{port}" for h in hosts}


def _origin_allowed(request: web.Request, options: ServerOptions) -> bool:
    """No Origin (a non-browser client), the page's own origin (`own_origins`) or one given by
    --allow-origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in options.allowed_origins or origin in own_origins(request, options.host)


def make_app(engine: Engine, options: ServerOptions) -> web.Application:
    """The aiohttp application: `/` (the page), `/static/*`, `/ws`, `/healthz`, `/metrics`."""
    metrics = Metrics()
    app = web.Application()
    state = {"loop": None, "ids": itertools.count(1)}
    height, width = engine.frame_hw

    def authorised(request: web.Request) -> bool:
        if options.token is None:
            return True
        bearer = request.headers.get("Authorization", "")
        return (request.query.get("token") == options.token
                or bearer == f"Bearer {options.token}")

    async def on_startup(app):
        state["loop"] = FrameLoop(engine, options, metrics)
        if options.precompile:
            await asyncio.get_running_loop().run_in_executor(state["loop"].executor,
                                                             state["loop"].precompile)
        state["task"] = asyncio.create_task(state["loop"].run())

    async def on_cleanup(app):
        state["task"].cancel()
        state["loop"].executor.shutdown(wait=True)

    async def index(request):
        return web.FileResponse(STATIC / "index.html")

    async def healthz(request):
        loop: FrameLoop = state["loop"]
        return web.json_response({"status": "ok", "sessions": len(loop.sessions),
                                  "max_sessions": options.max_sessions,
                                  "frames_out": loop.frames_done, "engine": engine.describe,
                                  "untrained": engine.untrained})

    async def metrics_page(request):
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def websocket(request):
        if not authorised(request):
            return web.Response(status=401, text="missing or wrong access token (?token=...)\n")
        if not _origin_allowed(request, options):
            return web.Response(status=403, text=f"Origin {request.headers['Origin']!r} is not "
                                                 "allowed (same origin or --allow-origin)\n")
        loop: FrameLoop = state["loop"]
        # The transport drops a connection sending more than twice the limit (it never buffers
        # more); between the limit and that, the client gets an error and the session goes on.
        ws = web.WebSocketResponse(max_msg_size=2 * options.max_message_bytes)
        await ws.prepare(request)
        if len(loop.sessions) >= options.max_sessions:
            metrics.sessions_refused.inc()
            await ws.send_str(json.dumps(_error(
                "server_full", f"the server is full: {options.max_sessions} sessions are "
                               "connected; try again later")))
            await ws.close(code=1013, message=b"server full")
            return ws
        session = loop.new_session(next(state["ids"]), ws, options.default_prompt)
        await session.send({
            "type": "ready", "protocol": PROTOCOL_VERSION, "session": session.id,
            "frame_width": width, "frame_height": height, "steps": session.steps,
            "step_choices": list(engine.steps), "prompt": session.prompt,
            "max_message_bytes": options.max_message_bytes, "deadline_ms": options.deadline_ms,
            "engine": engine.describe, "untrained": engine.untrained})
        idle_s = options.idle_timeout_s
        last_frame = time.monotonic()
        try:
            while True:
                wait_s = None if idle_s is None else idle_s - (time.monotonic() - last_frame)
                try:
                    msg = await ws.receive(timeout=None if wait_s is None else max(wait_s, 1e-3))
                except TimeoutError:
                    await reply_error(session, "idle", f"no frame for {idle_s:g} s (the "
                                      "server's --idle-timeout): closing this session")
                    await ws.close(code=1000, message=b"idle timeout")
                    break
                if msg.type == WSMsgType.BINARY:
                    last_frame = time.monotonic()
                    await _on_frame(loop, session, msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await _on_control(loop, session, msg.data)
                else:  # closing, closed or a transport error
                    break
        finally:
            loop.drop_session(session)
        return ws

    async def reply_error(session: Session, code: str, message: str) -> None:
        metrics.errors.labels(code).inc()
        await session.send(_error(code, message))

    async def _on_frame(loop: FrameLoop, session: Session, data: bytes) -> None:
        if len(data) > options.max_message_bytes:
            return await reply_error(session, "too_large", f"message of {len(data)} bytes, "
                                     f"expected at most {options.max_message_bytes}")
        if data[:2] != b"\xff\xd8":
            return await reply_error(session, "bad_jpeg", "binary message is not a JPEG "
                                     "(expected bytes starting FF D8)")
        size = jpeg_size(data)
        if size is None:
            return await reply_error(session, "bad_jpeg", f"JPEG of {len(data)} bytes has no "
                                     "readable frame header (SOF) before its image data")
        # The size is checked on the header: a small file can declare a huge image, whose
        # decoding would take seconds; decoding runs off the event loop, which serves everyone.
        if size != (width, height):
            return await reply_error(session, "bad_size", f"frame is {size[0]}x{size[1]} (WxH), "
                                     f"expected {width}x{height}")
        frame_hwc = await asyncio.to_thread(_decode_jpeg, data)
        if frame_hwc is None or frame_hwc.shape[:2] != (height, width):
            return await reply_error(session, "bad_jpeg", f"JPEG of {len(data)} bytes cannot be "
                                     "decoded")
        loop.put_frame(session, frame_hwc)

    async def _on_control(loop: FrameLoop, session: Session, text: str) -> None:
        if len(text.encode()) > options.max_message_bytes:
            return await reply_error(session, "too_large", f"message of {len(text.encode())} "
                                     f"bytes, expected at most {options.max_message_bytes}")
        try:
            message = json.loads(text)
        except json.JSONDecodeError as err:
            return await reply_error(session, "bad_json", f"text message is not JSON: {err}")
        except RecursionError:
            return await reply_error(session, "bad_json", "text message nests arrays or objects "
                                     "too deeply to parse, expected a flat {\"type\": ...} object")
        if not isinstance(message, dict):
            return await reply_error(session, "bad_json", "text message is JSON but not an "
                                     "object, expected {\"type\": ...}")
        kind, msg_id = message.get("type"), message.get("id")
        ack = {"type": "ack", "of": kind, "id": msg_id}
        if kind == "prompt":
            prompt = message.get("text")
            if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
                return await reply_error(session, "bad_value", f"prompt text {prompt!r:.60}, "
                                         f"expected a string of at most {MAX_PROMPT_CHARS} chars")
            await loop.set_prompt_async(session, prompt)
            return await session.send({**ack, "prompt": prompt})
        if kind == "nearest":
            text = message.get("text")
            if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
                return await reply_error(session, "bad_value", f"nearest text {text!r:.60}, "
                                         f"expected a string of at most {MAX_PROMPT_CHARS} chars")
            near = await asyncio.to_thread(engine.nearest_trained, text)
            near = near or {"nearest": None, "similarity": None, "trained": None, "near": None}
            encoder = engine.prompt_encoder
            return await session.send({**ack, "type": "nearest", "text": text, **near,
                                       "encoder": None if encoder is None else encoder.name})
        if kind == "reset":
            session.reset_requested = True
            return await session.send(ack)
        if kind == "steps":
            steps = message.get("steps")
            if type(steps) is not int or steps not in engine.steps:
                return await reply_error(session, "bad_value", f"steps {steps!r}, expected one "
                                         f"of {list(engine.steps)}")
            session.steps = steps
            return await session.send({**ack, "steps": steps})
        if kind == "stats":
            return await session.send({
                **ack, "type": "stats", "frames_in": session.frames_in,
                "frames_out": session.frames_out, "dropped": session.dropped,
                "prompt": session.prompt, "steps": session.steps,
                "sessions": len(loop.sessions)})
        return await reply_error(session, "unknown_type", f"message type {kind!r}, expected one "
                                 "of prompt, nearest, reset, steps, stats")

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static", STATIC)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def serve_forever(engine: Engine, options: ServerOptions) -> None:
    """`lsd serve`: run until interrupted."""
    where = f"http://{options.host}:{options.port}/"
    if options.token:
        where += f"?token={options.token}"
    web.run_app(make_app(engine, options), host=options.host, port=options.port,
                print=lambda _: print(f"lsd serve: open {where}  (Ctrl-C stops)", flush=True))


class BackgroundServer:
    """The server in a daemon thread on 127.0.0.1 and a free port (tests, benchmarks).

    `with BackgroundServer(engine, options) as server: ... server.url ...`; stops on exit.
    """

    def __init__(self, engine: Engine, options: ServerOptions | None = None):
        self.engine = engine
        self.options = options or ServerOptions()
        self.port: int | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="lsd-serve")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(make_app(self.engine, self.options))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(600):
            raise RuntimeError("the background server did not start within 600 s")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
