"""`lsd serve` with real WebSocket clients on 127.0.0.1: exactness of the batched frame loop,
concurrent sessions, prompt switch, reset, latest-frame-wins, adaptive steps, limits and bad input.

Every server here binds 127.0.0.1 on a free port, every client loop is bounded (a fixed number of
frames, each receive under a timeout), and the server stops when its `with` block ends.
"""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT

from lsd_jax.config import load_config
from lsd_jax.resolve import untrained_model
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.model_engine import model_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer

TIMEOUT_S = 60  # a first frame compiles the step; on a loaded 2-core machine that takes seconds
# A small model of the tiny config's frame size: each compile of a (batch, steps) variant is short.
SMALL = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=2"]


@pytest.fixture(scope="module")
def engine():
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    return model_engine(cfg, untrained_model(cfg, seed=3), describe="test model", untrained=True)


def random_frames(n: int, seed: int, hw=(64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Smooth random images (upsampled noise): JPEG keeps them close, unlike per-pixel noise.
    small = rng.integers(0, 256, (n, hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    return [cv2.resize(f, hw[::-1], interpolation=cv2.INTER_LINEAR) for f in small]


def decode(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


class Client:
    """A bounded test client: every receive waits at most TIMEOUT_S."""

    def __init__(self, http: aiohttp.ClientSession, ws):
        self.http, self.ws = http, ws

    @classmethod
    async def connect(cls, http, url, **kwargs) -> tuple[Client, dict]:
        ws = await http.ws_connect(url.replace("http", "ws") + "/ws", **kwargs)
        client = cls(http, ws)
        return client, await client.json()

    async def receive(self):
        return await asyncio.wait_for(self.ws.receive(), TIMEOUT_S)

    async def json(self) -> dict:
        msg = await self.receive()
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a JSON message, got {msg}"
        return json.loads(msg.data)

    async def control(self, message: dict) -> dict:
        await self.ws.send_str(json.dumps(message))
        return await self.json()

    async def frame(self, frame_hwc: np.ndarray) -> tuple[dict, np.ndarray]:
        """Send one frame, return its output's metadata and pixels."""
        await self.ws.send_bytes(encode_jpeg(frame_hwc))
        return await self.output()

    async def output(self) -> tuple[dict, np.ndarray]:
        meta = await self.json()
        assert meta["type"] == "frame", meta
        msg = await self.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY
        return meta, decode(msg.data)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT_S))


def test_one_session_equals_the_step_with_prompt_switch_and_reset(engine):
    """Through the server (per-session cache rows rolled and stacked every frame, JPEG both ways)
    a session's outputs equal the engine's own batch-1 stream fed the same decoded frames, with a
    prompt switch at frame 5 and a reset at frame 9 (12 frames: the 3-frame cache wraps 4 times)."""
    frames = random_frames(12, seed=1)
    seen = [decode(encode_jpeg(f)) for f in frames]  # what the server decodes

    async def client(url):
        async with aiohttp.ClientSession() as http:
            c, ready = await Client.connect(http, url)
            assert (ready["frame_width"], ready["frame_height"], ready["steps"]) == (64, 64, 2)
            assert (await c.control({"type": "prompt", "text": "pencil sketch", "id": 1})) == {
                "type": "ack", "of": "prompt", "id": 1, "prompt": "pencil sketch"}
            outs = []
            for i, frame in enumerate(frames):
                if i == 5:
                    assert (await c.control({"type": "prompt", "text": "thermal camera"}))[
                        "of"] == "prompt"
                if i == 9:
                    assert (await c.control({"type": "reset", "id": 9}))["of"] == "reset"
                meta, out = await c.frame(frame)
                assert (meta["seq"], meta["steps"], meta["batch"]) == (i + 1, 2, 1)
                outs.append(out)
            return outs

    with BackgroundServer(engine, ServerOptions(seed=5)) as server:
        outs = run(client(server.url))

    state = engine.init_state(1, seed=5)
    for i, frame in enumerate(seen):
        if i == 9:
            state = state._replace(num_valid=state.num_valid.at[0].set(0))
        prompt = "pencil sketch" if i < 5 else "thermal camera"
        state, ref = engine.step(state, frame[None], engine.encode_prompts([prompt]), 2)
        want, got = decode(encode_jpeg(np.asarray(ref[0]))), outs[i]
        # The server's cache rows are rolled, so attention sums run in another order: a float
        # rounding can move a pixel by one level before JPEG; nothing larger.
        diff = np.abs(want.astype(int) - got.astype(int))
        assert diff.max() <= 3 and (diff == 0).mean() > 0.98, (i, diff.max(), (diff == 0).mean())
    assert np.abs(outs[4].astype(int) - outs[5].astype(int)).mean() > 1.0  # the stream moves


def test_two_sessions_batched_different_prompts(engine):
    """Two concurrent sessions with different prompts, sending each frame together, are stepped
    together (batch 2, with a 200 ms gather window) and each gets its own outputs, which differ."""
    frames = random_frames(8, seed=2)

    async def both(url):
        async with aiohttp.ClientSession() as http:
            (a, _), (b, _) = [await Client.connect(http, url) for _ in range(2)]
            await a.control({"type": "prompt", "text": "pencil sketch"})
            await b.control({"type": "prompt", "text": "thermal"})
            results = []
            for f in frames:
                results.append(await asyncio.gather(a.frame(f), b.frame(f)))
            return results, await a.control({"type": "stats"}), await b.control({"type": "stats"})

    with BackgroundServer(engine, ServerOptions(gather_ms=200)) as server:
        results, stats_a, stats_b = run(both(server.url))
    assert stats_a["frames_out"] == stats_b["frames_out"] == 8
    assert (stats_a["prompt"], stats_b["prompt"]) == ("pencil sketch", "thermal")
    batched = [meta_a["sessions_in_batch"] == meta_b["sessions_in_batch"] == 2
               for (meta_a, _), (meta_b, _) in results]
    assert sum(batched) >= 6, results  # the first frame may be split by the first compile
    gap = [np.abs(x.astype(int) - y.astype(int)).mean() for (_, x), (_, y) in results]
    assert min(gap) > 1.0, gap


def test_bad_inputs_answered_and_both_sessions_still_served(engine):
    """Each bad input gets an error naming it, to that client only; then both sessions (the one
    that sent them and a bystander) are still served, and a message over twice the limit closes
    only the sender's connection (1009)."""
    limit = 64 * 1024
    frame = random_frames(1, seed=3)[0]
    wrong_size = encode_jpeg(random_frames(1, seed=4, hw=(48, 80))[0])
    corrupt = encode_jpeg(frame)[:200] + bytes(range(256)) * 4
    bad = [
        ("bytes", corrupt, "bad_jpeg"),
        ("bytes", b"\x89PNG\r\n\x1a\n" + bytes(100), "bad_jpeg"),
        ("bytes", wrong_size, "bad_size"),
        ("bytes", b"\xff\xd8" + bytes(limit + 10), "too_large"),
        ("str", "not json", "bad_json"),
        ("str", "[1, 2]", "bad_json"),
        ("str", json.dumps({"type": "teleport"}), "unknown_type"),
        ("str", json.dumps({"type": "steps", "steps": 7}), "bad_value"),
        ("str", json.dumps({"type": "steps", "steps": 2.0}), "bad_value"),
        ("str", json.dumps({"type": "prompt", "text": 3}), "bad_value"),
        ("str", json.dumps({"type": "prompt", "text": "x" * (limit + 1)}), "too_large"),
    ]

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            bad_client, _ = await Client.connect(http, url)
            bystander, _ = await Client.connect(http, url)
            for kind, payload, code in bad:
                await (bad_client.ws.send_bytes(payload) if kind == "bytes"
                       else bad_client.ws.send_str(payload))
                reply = await bad_client.json()
                assert (reply["type"], reply["code"]) == ("error", code), (payload[:20], reply)
                assert reply["message"]
            for c in (bad_client, bystander):
                meta, out = await c.frame(frame)
                assert meta["seq"] == 1 and out.shape == (64, 64, 3)
            await bad_client.ws.send_bytes(b"\xff\xd8" + bytes(2 * limit + 10))
            closing = await bad_client.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR)
            assert bad_client.ws.close_code == 1009
            meta, _ = await bystander.frame(frame)
            assert meta["seq"] == 2
            async with http.get(url + "/metrics") as response:
                return await response.text()

    with BackgroundServer(engine, ServerOptions(max_message_bytes=limit)) as server:
        metrics = run(scenario(server.url))
    for code, count in [("bad_jpeg", 2), ("bad_size", 1), ("too_large", 2), ("bad_json", 2),
                        ("unknown_type", 1), ("bad_value", 3)]:
        assert f'lsd_client_errors_total{{code="{code}"}} {count:.1f}' in metrics


def test_latest_frame_wins_limits_token_origin_health_metrics(engine):
    """Frames sent faster than the loop are dropped, never queued (frames_in = out + dropped);
    the session limit, the token and the Origin check refuse clearly; a disconnect frees the
    session; /healthz and /metrics report it all."""
    frames = random_frames(20, seed=6)
    token = "s3cret"

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            for query, headers, status in [("", {}, 401), ("?token=nope", {}, 401),
                                           (f"?token={token}", {"Origin": "http://evil.example"},
                                            403)]:
                async with http.get(url + "/ws" + query, headers=headers) as response:
                    assert response.status == status
                    assert ("token" if status == 401 else "Origin") in await response.text()
            ws_url = url + f"/ws?token={token}"
            a = Client(http, await http.ws_connect(ws_url.replace("http", "ws"),
                                                   origin=url))
            await a.json()
            b = Client(http, await http.ws_connect(ws_url.replace("http", "ws"),
                                                   headers={"Authorization": f"Bearer {token}"}))
            await b.json()
            refused = await http.ws_connect(ws_url.replace("http", "ws"))
            msg = json.loads((await asyncio.wait_for(refused.receive(), TIMEOUT_S)).data)
            assert msg["code"] == "server_full" and "2 sessions" in msg["message"]
            await asyncio.wait_for(refused.receive(), TIMEOUT_S)
            assert refused.close_code == 1013
            await a.frame(frames[0])  # compiled; now flood
            for f in frames[1:]:
                await a.ws.send_bytes(encode_jpeg(f))
            last_seq = 0
            while last_seq < len(frames):
                meta, _ = await a.output()
                last_seq = meta["seq"]
            stats = await a.control({"type": "stats"})
            await b.ws.close()
            await a.ws.close()
            for _ in range(100):
                async with http.get(url + "/healthz") as response:
                    health = await response.json()
                if health["sessions"] == 0:
                    break
                await asyncio.sleep(0.05)
            async with http.get(url + "/metrics") as response:
                return stats, health, await response.text()

    options = ServerOptions(token=token, max_sessions=2)
    with BackgroundServer(engine, options) as server:
        stats, health, metrics = run(scenario(server.url))
    assert stats["frames_in"] == 20 and stats["dropped"] > 0
    assert stats["frames_out"] + stats["dropped"] == stats["frames_in"]
    assert health["sessions"] == 0
    assert health["frames_out"] == stats["frames_out"]
    assert "lsd_frames_in_total 20.0" in metrics
    assert f"lsd_frames_dropped_total {stats['dropped']:.1f}" in metrics
    assert "lsd_sessions_refused_total 1.0" in metrics
    assert "lsd_sessions 0.0" in metrics
    assert 'lsd_step_seconds_count{batch="1",steps="2"}' in metrics


def test_deadline_makes_frames_with_fewer_steps(engine):
    """With a deadline no step count can meet, frames come with the fewest steps, not late at the
    requested count; the steps used are in each frame's metadata and in /metrics."""
    frames = random_frames(6, seed=7)

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            c, ready = await Client.connect(http, url)
            assert ready["deadline_ms"] == 0.5
            metas = [(await c.frame(f))[0] for f in frames]
            async with http.get(url + "/metrics") as response:
                return metas, await response.text()

    with BackgroundServer(engine, ServerOptions(deadline_ms=0.5)) as server:
        metas, metrics = run(scenario(server.url))
    # Frame 1 compiles the 2-step variant (no estimate yet), frame 2 measures it; from then on
    # the estimate is over the deadline and 1 step is used (its first call compiles it).
    assert [m["requested_steps"] for m in metas] == [2] * 6
    assert [m["steps"] for m in metas[-3:]] == [1, 1, 1], metas
    reduced = sum(m["steps"] < 2 for m in metas)
    assert f"lsd_frames_steps_reduced_total {reduced:.1f}" in metrics
    assert f'lsd_frames_by_steps_total{{steps="1"}} {reduced:.1f}' in metrics


def test_huge_jpeg_refused_on_its_header_and_frames_decoded_off_the_loop(engine, monkeypatch):
    """An 8000x8000 JPEG of 0.75 MB (under the message limit) is refused as `bad_size` from its
    header, never decoded; a frame of the right size is decoded in a worker thread, not on the
    event loop every session shares. Deeply nested JSON is `bad_json`, and the session goes on."""
    ok, huge = cv2.imencode(".jpg", np.full((8000, 8000), 128, np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, 5])
    assert ok and len(huge) < 1 << 20
    decoded = []  # (thread name, decoded shape) of every decode in this process
    imdecode = cv2.imdecode

    def recording_imdecode(buf, flags):
        image = imdecode(buf, flags)
        decoded.append((threading.current_thread().name,
                        None if image is None else image.shape[:2]))
        return image

    monkeypatch.setattr(cv2, "imdecode", recording_imdecode)
    frame = random_frames(1, seed=11)[0]

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            c, _ = await Client.connect(http, url)
            await c.ws.send_bytes(huge.tobytes())
            reply = await c.json()
            await c.ws.send_str("[" * 200_000)
            nested = await c.json()
            meta, out = await c.frame(frame)
            return reply, nested, meta, out

    with BackgroundServer(engine) as server:
        reply, nested, meta, out = run(scenario(server.url))
    assert (reply["code"], reply["message"]) == ("bad_size",
                                                 "frame is 8000x8000 (WxH), expected 64x64")
    assert nested["code"] == "bad_json" and "deeply" in nested["message"]
    assert meta["seq"] == 1 and out.shape == (64, 64, 3)
    assert (8000, 8000) not in [shape for _, shape in decoded]
    server_decodes = [name for name, shape in decoded if name != "MainThread"]
    assert server_decodes and "lsd-serve" not in server_decodes, decoded


def test_idle_session_is_closed_and_frees_its_slot(engine):
    """With `idle_timeout_s=1`, a session that sends no frame (control messages do not count) gets
    an `idle` error and is closed about a second after connecting; its slot is free again."""

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            t0 = asyncio.get_running_loop().time()
            a, _ = await Client.connect(http, url)
            await asyncio.sleep(0.3)
            stats = await a.control({"type": "stats"})
            error = await asyncio.wait_for(a.json(), 10)
            closed = await asyncio.wait_for(a.ws.receive(), 10)
            elapsed = asyncio.get_running_loop().time() - t0
            b, ready = await Client.connect(http, url)
            async with http.get(url + "/healthz") as response:
                health = await response.json()
            await b.ws.close()
            return stats, error, closed, elapsed, ready, health

    options = ServerOptions(idle_timeout_s=1.0, max_sessions=1)
    with BackgroundServer(engine, options) as server:
        stats, error, closed, elapsed, ready, health = run(scenario(server.url))
    assert stats["type"] == "stats" and stats["sessions"] == 1
    assert error["code"] == "idle" and "no frame for 1 s" in error["message"]
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert 1.0 <= elapsed < 10
    assert ready["type"] == "ready" and health["sessions"] == 1


def test_origin_checked_against_the_bound_address_not_the_host_header(engine):
    """A DNS-rebinding page (its own name in both Host and Origin) is refused; the loopback names
    of the bound port and an --allow-origin are accepted; another port is refused."""

    async def scenario(url, port):
        async with aiohttp.ClientSession() as http:
            statuses = {}
            for origin, host in [(f"http://evil.example:{port}", f"evil.example:{port}"),
                                 (f"http://127.0.0.1:{port + 1}", f"127.0.0.1:{port + 1}")]:
                async with http.get(url + "/ws", headers={"Origin": origin,
                                                          "Host": host}) as response:
                    statuses[origin] = response.status
            accepted = []
            for origin in (f"http://localhost:{port}", f"http://[::1]:{port}",
                           f"http://127.0.0.1:{port}", "http://app.example"):
                c, ready = await Client.connect(http, url, origin=origin)
                accepted.append(ready["type"])
                await c.ws.close()
            return statuses, accepted

    options = ServerOptions(allowed_origins=("http://app.example",))
    with BackgroundServer(engine, options) as server:
        statuses, accepted = run(scenario(server.url, server.port))
    assert list(statuses.values()) == [403, 403], statuses
    assert accepted == ["ready"] * 4


def test_precompile_compiles_each_variant_once(tmp_path, compile_log):
    """A checkpoint's model (weights restored by orbax) served with `precompile`: each (batch,
    steps) variant compiles exactly once before the first client, and a session's frames then
    compile nothing."""
    from lsd_jax.checkpoint import save_model
    from lsd_serve.load import load_engine

    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    save_model(tmp_path / "model", cfg, untrained_model(cfg, seed=2))
    engine = load_engine(checkpoint=str(tmp_path / "model"))
    frames = random_frames(4, seed=12)

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            c, _ = await Client.connect(http, url)
            return [(await c.frame(f))[0]["seq"] for f in frames]

    with BackgroundServer(engine, ServerOptions(precompile=True)) as server:
        at_start = compile_log.count("jit(step)")
        seqs = run(scenario(server.url))
    assert at_start == 3 * 2  # batches 1, 2, 4 x steps 1, 2
    assert seqs == [1, 2, 3, 4]
    assert compile_log.count("jit(step)") == at_start, compile_log
