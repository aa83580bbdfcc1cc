"""The browser client end to end: headless Debian Chromium with a fake camera opens the page
served by `lsd serve`, streams frames over the WebSocket, and the test reads the received-frame
count and the latency the page shows.

Chromium is driven over the Chrome DevTools Protocol with the aiohttp WebSocket client the server
already depends on: no Node.js, no npm package and no browser download at test time, only the
Debian `chromium` package that `lsd_serve/ci_browser_setup.sh` installs. Without it this test fails
(it never skips): the browser client is part of what is tested.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request

import aiohttp
import pytest
from conftest import REPO_ROOT

from lsd_jax.config import load_config
from lsd_jax.resolve import untrained_model
from lsd_serve.model_engine import model_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer

FRAMES = 50
DEADLINE_S = 150  # compiles on a loaded machine plus 50 frames; the test never waits longer
# Flags that work on this machine (closed network: no background fetches, no QUIC, no sync).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  "--remote-debugging-port=0"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: run `bash lsd_serve/ci_browser_setup.sh` (Debian "
                "package chromium); the browser test does not skip without it")


class DevTools:
    """A minimal CDP client over one page's WebSocket: `evaluate(expression) -> value`, None when
    the expression throws."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def evaluate(self, expression: str):
        call_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": "Runtime.evaluate",
                                           "params": {"expression": expression,
                                                      "returnByValue": True}}))
        while True:
            msg = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if msg.get("id") == call_id:
                result = msg["result"]
                return None if "exceptionDetails" in result else result["result"].get("value")


def devtools_port(process: subprocess.Popen) -> int:
    """Read Chromium's stderr until it prints the DevTools address (bounded by time)."""
    start = time.monotonic()
    lines = []
    while time.monotonic() - start < 60:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
    pytest.fail("Chromium printed no DevTools address within 60 s:\n" + "".join(lines[-20:]))


@pytest.mark.slow
def test_page_streams_fake_camera(tmp_path):
    chromium = chromium_path()
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py",
                      ["model.hidden_size=64", "model.depth=1", "model.num_heads=2",
                       "model.window=4", "diffusion.sample_steps=2"])
    engine = model_engine(cfg, untrained_model(cfg, seed=1), describe="test model",
                          untrained=True)

    async def drive(url: str, port: int) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
            page = next(p for p in pages if p["url"].startswith(url))
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                start = time.monotonic()
                while time.monotonic() - start < DEADLINE_S:
                    shown = await tools.evaluate(
                        "({received: document.getElementById('received').textContent,"
                        " latency: document.getElementById('latency').textContent,"
                        " median: document.getElementById('latency-median').textContent,"
                        " fps: document.getElementById('fps').textContent,"
                        " steps: document.getElementById('steps-used').textContent,"
                        " status: document.getElementById('status').textContent,"
                        " error: document.getElementById('error').textContent})")
                    # None while the page is still loading (the expression throws).
                    if shown and (shown["error"] or int(shown["received"]) >= FRAMES):
                        return shown
                    await asyncio.sleep(0.25)
                return shown

    with BackgroundServer(engine, ServerOptions()) as server:
        process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             f"{server.url}/?autostart=camera"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            shown = asyncio.run(drive(server.url, devtools_port(process)))
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
                metrics = response.read().decode()
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert shown["error"] == "", shown
    assert int(shown["received"]) >= FRAMES, shown
    assert 0 < float(shown["latency"]) < 10_000 and 0 < float(shown["median"]) < 10_000, shown
    assert float(shown["fps"]) > 0 and shown["steps"] == "2/2", shown
    assert shown["status"].startswith("session 1: 64x64"), shown
    frames_out = float(re.search(r"^lsd_frames_out_total (\S+)$", metrics, re.M).group(1))
    assert frames_out >= int(shown["received"])
