"""The aiohttp application of `lsd serve`: `/` (the browser page), `/static/*`, `/ws` (the frame
protocol, PROTOCOL.md), `/healthz` and Prometheus `/metrics`, around one frame loop that all
sessions share (`FrameLoop`, started with the application).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from aiohttp import web

from lsd_serve.access import authorised, host_allowed, origin_allowed
from lsd_serve.engine import Engine
from lsd_serve.frame_loop import FrameLoop
from lsd_serve.metrics import Metrics
from lsd_serve.options import ServerOptions
from lsd_serve.protocol import Client
from lsd_serve.sessions import error_message

STATIC = Path(__file__).resolve().parent / "static"


class ServerApp:
    """The request handlers of one server, its metrics and its frame loop."""

    def __init__(self, engine: Engine, options: ServerOptions):
        self.engine, self.options = engine, options
        self.metrics = Metrics()
        self.loop: FrameLoop | None = None
        self.task: asyncio.Task | None = None
        self.ids = itertools.count(1)

    async def on_startup(self, app: web.Application) -> None:
        self.loop = FrameLoop(self.engine, self.options, self.metrics)
        if self.options.precompile:
            await asyncio.get_running_loop().run_in_executor(self.loop.executor,
                                                             self.loop.precompile)
        self.task = asyncio.create_task(self.loop.run())

    async def on_cleanup(self, app: web.Application) -> None:
        self.task.cancel()
        self.loop.executor.shutdown(wait=True)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    @web.middleware
    async def check_host(self, request: web.Request, handler):
        """Every HTTP request but the WebSocket's (which checks its Origin) must name this server
        in its Host header, or carry the token (`lsd_serve.access.host_allowed`)."""
        if request.path != "/ws" and not host_allowed(request, self.options):
            return web.Response(status=403, text=f"Host {request.headers.get('Host', '')!r} is "
                                                 "not this server's (its address or an "
                                                 "--allow-origin)\n")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        engine = self.engine
        return web.json_response({"status": "ok", "sessions": len(self.loop.sessions),
                                  "max_sessions": self.options.max_sessions,
                                  "frames_out": self.loop.frames_done, "engine": engine.name,
                                  "untrained": engine.untrained})

    async def metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        options = self.options
        if not authorised(request, options.token):
            return web.Response(status=401, text="missing or wrong access token (?token=...)\n")
        if not origin_allowed(request, options):
            return web.Response(status=403, text=f"Origin {request.headers['Origin']!r} is not "
                                                 "allowed (same origin or --allow-origin)\n")
        # The transport drops a connection sending more than twice the limit (it never buffers
        # more); between the limit and that, the client gets an error and the session goes on.
        ws = web.WebSocketResponse(max_msg_size=2 * options.max_message_bytes)
        await ws.prepare(request)
        if len(self.loop.sessions) >= options.max_sessions:
            self.metrics.sessions_refused.inc()
            await ws.send_str(json.dumps(error_message(
                "server_full", f"the server is full: {options.max_sessions} sessions are "
                               "connected; try again later")))
            await ws.close(code=1013, message=b"server full")
            return ws
        session = self.loop.new_session(next(self.ids), ws, options.default_prompt,
                                        transport=request.transport)
        client = Client(session, self.loop, self.engine, options, self.metrics)
        await client.hello()
        try:
            await client.converse()
        finally:
            self.loop.drop_session(session)
        return ws


def make_app(engine: Engine, options: ServerOptions) -> web.Application:
    """The aiohttp application: `/` (the page), `/static/*`, `/ws`, `/healthz`, `/metrics`."""
    server = ServerApp(engine, options)
    app = web.Application(middlewares=[server.check_host])
    app.router.add_get("/", server.index)
    app.router.add_get("/healthz", server.healthz)
    app.router.add_get("/metrics", server.metrics_page)
    app.router.add_get("/ws", server.websocket)
    app.router.add_static("/static", STATIC)
    app.on_startup.append(server.on_startup)
    app.on_cleanup.append(server.on_cleanup)
    return app
