"""`lsd serve`: the application (`lsd_serve.app`) run until interrupted, or in a thread.

    app = make_app(engine, ServerOptions(...))        # aiohttp application (lsd_serve.app)
    serve_forever(engine, options)                    # lsd serve
    with BackgroundServer(engine, options) as server: # tests and benchmarks: a thread, a free port
        server.url

The server's parts, one job each: `options` (what `lsd serve` takes), `app` (routes and handlers),
`access` (token and Origin checks), `protocol` (one client's WebSocket messages, PROTOCOL.md),
`sessions` (a client's state), `frame_loop` (the one model loop all sessions share), `jpeg` (the
frames' encoding), `metrics` (Prometheus).
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from lsd_serve.app import make_app
from lsd_serve.engine import Engine
from lsd_serve.options import ServerOptions


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
