"""The browser page shows the nearest trained prompt as the user types: headless Debian Chromium
(driven over the DevTools protocol, as in tests/test_browser.py) opens the page served by
`lsd serve`, the test types into the prompt box and reads the hint under it. Like the browser
test, it fails without Chromium (`bash lsd_serve/ci_browser_setup.sh`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import aiohttp
import numpy as np
import pytest
from conftest import REPO_ROOT
from test_browser import CHROMIUM_FLAGS, DevTools, chromium_path, devtools_port

from lsd_jax.config import load_config
from lsd_jax.prompt import HashedPromptEncoder
from lsd_jax.resolve import untrained_model
from lsd_serve.model_engine import model_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer
from lsd_train.tasks import TASKS

DEADLINE_S = 90


def expected_hint(prompt: str) -> str:
    """The hint text for `prompt` under the hashed encoder, from float64 numpy cosines."""
    known = [t.prompt for t in TASKS]
    encoder = HashedPromptEncoder(64)
    table = np.stack([encoder.encode(p) for p in known]).astype(np.float64)
    query = encoder.encode(prompt).astype(np.float64)
    cosines = table @ query / (np.linalg.norm(table, axis=1) * np.linalg.norm(query))
    nearest, similarity = known[int(np.argmax(cosines))], cosines.max()
    how = f"cosine similarity {similarity:.2f}, hashed encoder"
    if similarity >= 0.6:
        return f'reads as the trained prompt "{nearest}" ({how})'
    return f'far from every trained prompt; nearest: "{nearest}" ({how})'


@pytest.mark.slow
def test_page_shows_the_nearest_trained_prompt_while_typing(tmp_path):
    chromium = chromium_path()
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py",
                      ["model.hidden_size=64", "model.depth=1", "model.num_heads=2",
                       "model.window=4", "diffusion.sample_steps=1"])
    engine = model_engine(cfg, untrained_model(cfg, seed=1), describe="test model",
                          untrained=False, trained_prompts=tuple(t.prompt for t in TASKS))
    typed = {"neon lights in the dark": expected_hint("neon lights in the dark"),
             "an old photograph": expected_hint("an old photograph"),
             "A thermal camera image": "a prompt the model was trained on"}

    async def hint_after_typing(tools: DevTools, text: str, want: str) -> str | None:
        """Type `text` into the prompt box; the hint once it reads `want`, else the last one
        shown within the deadline."""
        await tools.evaluate(f"(() => {{ const box = document.getElementById('prompt');"
                             f" box.value = {json.dumps(text)};"
                             f" box.dispatchEvent(new Event('input')); }})()")
        start = time.monotonic()
        while time.monotonic() - start < DEADLINE_S:
            shown = await tools.evaluate("document.getElementById('nearest').textContent")
            if shown == want:
                break
            await asyncio.sleep(0.2)
        return shown

    async def drive(url: str, port: int) -> list:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
            page = next(p for p in pages if p["url"].startswith(url))
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                start = time.monotonic()
                while time.monotonic() - start < DEADLINE_S:
                    status = await tools.evaluate("document.getElementById('status').textContent")
                    if status and status.startswith("session"):
                        break
                    await asyncio.sleep(0.2)
                return [await hint_after_typing(tools, t, want) for t, want in typed.items()]

    with BackgroundServer(engine, ServerOptions()) as server:
        process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             f"{server.url}/?autostart=camera"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            shown = asyncio.run(drive(server.url, devtools_port(process)))
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert shown == list(typed.values()), shown
    assert shown[0] == ('far from every trained prompt; nearest: "glowing neon edges on a dark '
                        'scene" (cosine similarity 0.49, hashed encoder)')
    assert shown[1].startswith('reads as the trained prompt "an old sepia photograph"'), shown[1]
