"""`lsd serve` under load and abuse: clients that never read their outputs lose their slot within
the send timeout and a new client is served; a flood of prompts from one client is coalesced
(bounded encoder work) and the last prompt applies; sessions that step together stay in one batch
and reuse the resident batch state, with outputs equal to stepping them one at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
from conftest import REPO_ROOT
from test_server import SMALL, Client, random_frames, run

from lsd_jax.config import load_config
from lsd_jax.resolve import untrained_model
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.model_engine import model_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer


@pytest.fixture(scope="module")
def engine():
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    return model_engine(cfg, untrained_model(cfg, seed=3), describe="test model", untrained=True)


def _masked_frame(payload: bytes, opcode: int) -> bytes:
    """A client-to-server WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _deaf_client(host: str, port: int) -> socket.socket:
    """A raw WebSocket client with a tiny receive buffer that never reads after the handshake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0], response
    return sock


def test_clients_that_never_read_lose_their_slots(engine):
    """Four clients send frames and never read: each is cut once a send to it blocks for the send
    timeout, so a fifth client is served; they never made the server queue more than one output
    each (the rest are dropped)."""
    options = ServerOptions(max_sessions=4, idle_timeout_s=30.0, send_timeout_s=2.0)
    jpeg = encode_jpeg(random_frames(1, 41)[0])
    with BackgroundServer(engine, options) as server:
        host, port = server.url.removeprefix("http://").split(":")
        deaf = [_deaf_client(host, int(port)) for _ in range(4)]
        t0 = time.monotonic()
        cut = set()
        while len(cut) < 4 and time.monotonic() - t0 < 60:
            for i, sock in enumerate(deaf):
                if i in cut:
                    continue
                try:
                    sock.sendall(_masked_frame(jpeg, 0x2))
                except OSError:  # reset by the server: the session was cut
                    cut.add(i)
            time.sleep(0.02)
        assert len(cut) == 4, f"only {len(cut)} of 4 deaf clients were disconnected in 60 s"
        cut_after_s = time.monotonic() - t0

        async def fifth():
            async with aiohttp.ClientSession() as http:
                client, ready = await Client.connect(http, server.url)
                assert ready["type"] == "ready"
                meta, out = await client.frame(random_frames(1, 42)[0])
                return meta, out

        meta, out = run(fifth())
        assert meta["type"] == "frame" and out.shape == (64, 64, 3)
        with urllib.request.urlopen(server.url + "/healthz", timeout=10) as response:
            health = json.loads(response.read())
        assert health["sessions"] <= 1
    for sock in deaf:
        sock.close()
    assert cut_after_s < 60


def test_prompt_flood_is_coalesced_and_the_last_prompt_applies(engine, monkeypatch):
    """200 distinct prompts as fast as one client can send them: every message is answered, the
    encoder runs at most PROMPT_RATE times a second for it (plus one), and the session ends on the
    last prompt sent; a second client's frames keep coming meanwhile."""
    from lsd_serve import frame_loop

    calls = []
    original = frame_loop.FrameLoop._prompt_vec

    def counting(self, prompt):
        calls.append((time.monotonic(), prompt))
        return original(self, prompt)

    monkeypatch.setattr(frame_loop.FrameLoop, "_prompt_vec", counting)
    prompts = [f"prompt number {i} of a flood" for i in range(200)]

    async def flood_and_stream(url):
        async with aiohttp.ClientSession() as http:
            flood, _ = await Client.connect(http, url)
            other, _ = await Client.connect(http, url)
            calls.clear()
            t0 = time.monotonic()
            for i, text in enumerate(prompts):
                await flood.ws.send_str(json.dumps({"type": "prompt", "text": text, "id": i}))
            frames = random_frames(8, 43)
            other_outputs = 0
            for f in frames:
                meta, _ = await other.frame(f)
                other_outputs += meta["type"] == "frame"
            acks = [await flood.json() for _ in prompts]
            seconds = time.monotonic() - t0
            stats = await flood.control({"type": "stats"})
            return acks, stats, other_outputs, seconds

    with BackgroundServer(engine, ServerOptions()) as server:
        acks, stats, other_outputs, seconds = run(flood_and_stream(server.url))
    assert [a["id"] for a in acks] == list(range(200)) and all(a["type"] == "ack" for a in acks)
    assert acks[-1]["prompt"] == prompts[-1] and stats["prompt"] == prompts[-1]
    assert other_outputs == 8
    flood_calls = [c for c in calls if c[1].startswith("prompt number")]
    assert len(flood_calls) <= frame_loop.PROMPT_RATE * seconds + 1, (len(flood_calls), seconds)
    assert len(flood_calls) < 50  # far fewer than the 200 asked for


def test_sessions_in_step_share_one_resident_batch(engine):
    """Three closed-loop clients (each sends its next frame when its output arrives): once in
    step they share every batch, so the loop steps them together on its resident batch."""
    frames = [random_frames(12, 50 + i) for i in range(3)]

    async def closed_loop(url):
        async with aiohttp.ClientSession() as http:
            clients = [(await Client.connect(http, url))[0] for _ in range(3)]

            async def one(client, clip):
                metas = []
                for f in clip:
                    meta, out = await client.frame(f)
                    assert out.shape == (64, 64, 3)
                    metas.append(meta)
                return metas

            return await asyncio.gather(*(one(c, clip) for c, clip in zip(clients, frames,
                                                                          strict=True)))

    with BackgroundServer(engine, ServerOptions(seed=5)) as server:
        results = run(closed_loop(server.url))
    shared = [m["sessions_in_batch"] for metas in results for m in metas[4:]]
    assert np.mean(shared) >= 2.5, shared
