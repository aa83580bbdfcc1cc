"""What `lsd serve` guarantees against a hostile client or page: a message it cannot use is an
error to that client and its session goes on; `/`, `/healthz` and `/metrics` answer only requests
that name the server in their Host header (or carry the token); clients are told the model's name,
never a path on the server; an artifact exported for another platform is refused when loaded.

Every server binds 127.0.0.1 on a free port; every receive is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from lsd_jax.checkpoint import save_model
from lsd_jax.config import load_config
from lsd_jax.errors import ArtifactError
from lsd_jax.resolve import untrained_model
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.load import load_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer

TIMEOUT_S = 60
SMALL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small untrained model saved as the directory `my-model` (its base name)."""
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    return save_model(tmp_path_factory.mktemp("served") / "my-model", cfg,
                      untrained_model(cfg, seed=5))


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(checkpoint=str(model_dir))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT_S))


async def _json(ws) -> dict:
    msg = await asyncio.wait_for(ws.receive(), TIMEOUT_S)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a JSON message, got {msg}"
    return json.loads(msg.data)


def test_unusable_json_is_an_error_and_the_session_goes_on(engine):
    """A lone UTF-16 surrogate in a prompt is `bad_value`; a 5000-digit number, NaN, Infinity
    and 1e999 are `bad_json` (a browser cannot parse non-finite numbers echoed back); each
    reply is valid JSON, and the session is then still served."""
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    bad = [
        ('{"type": "prompt", "text": "a \\ud800 sketch"}', "bad_value"),
        ('{"type": "nearest", "text": "\\udfff"}', "bad_value"),
        ('{"type": "stats", "id": ' + "9" * 5000 + "}", "bad_json"),
        ('{"type": "stats", "id": NaN}', "bad_json"),
        ('{"type": "stats", "id": -Infinity}', "bad_json"),
        ('{"type": "stats", "id": 1e999}', "bad_json"),
    ]

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url.replace("http", "ws") + "/ws")
            await _json(ws)
            replies = []
            for text, _ in bad:
                await ws.send_str(text)
                msg = await asyncio.wait_for(ws.receive(), TIMEOUT_S)
                assert msg.type == aiohttp.WSMsgType.TEXT, (text[:40], msg)
                replies.append(json.loads(msg.data))  # strict JSON: no NaN
            await ws.send_str(json.dumps({"type": "stats", "id": 7}))
            stats = await _json(ws)
            await ws.send_bytes(encode_jpeg(frame))
            meta = await _json(ws)
            image = await asyncio.wait_for(ws.receive(), TIMEOUT_S)
            await ws.close()
            return replies, stats, meta, image

    with BackgroundServer(engine) as server:
        replies, stats, meta, image = run(scenario(server.url))
    for (text, code), reply in zip(bad, replies, strict=True):
        assert (reply["type"], reply["code"]) == ("error", code), (text[:40], reply)
    assert "surrogate" in replies[0]["message"]
    assert "5000 digits" in replies[2]["message"]
    assert "NaN" in replies[3]["message"] and "out of range" in replies[5]["message"]
    assert stats["type"] == "stats" and stats["id"] == 7
    assert meta["type"] == "frame" and meta["seq"] == 1
    assert image.type == aiohttp.WSMsgType.BINARY


def test_http_endpoints_answer_only_their_own_host_or_the_token(engine):
    """A DNS-rebinding page's requests carry its own name as Host: `/`, `/healthz` and `/metrics`
    refuse them (403) unless they carry the token; the loopback names of the bound port and the
    host of an --allow-origin are served."""
    token = "t0k"

    async def scenario(url, port):
        got = {}
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/healthz", "/metrics"):
                for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}",
                             f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                             "app.example"):
                    async with http.get(url + path, headers={"Host": host}) as response:
                        got[path, host] = response.status
                async with http.get(url + path + f"?token={token}",
                                    headers={"Host": f"evil.example:{port}"}) as response:
                    got[path, "token"] = response.status
                async with http.get(url + path, headers={
                        "Host": f"evil.example:{port}",
                        "Authorization": f"Bearer {token}"}) as response:
                    got[path, "bearer"] = response.status
        return got

    options = ServerOptions(token=token, allowed_origins=("http://app.example",))
    with BackgroundServer(engine, options) as server:
        got = run(scenario(server.url, server.port))
    port = server.port
    for path in ("/", "/healthz", "/metrics"):
        assert got[path, f"evil.example:{port}"] == 403, path
        assert got[path, f"127.0.0.1:{port + 1}"] == 403, path
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.example",
                     "token", "bearer"):
            assert got[path, host] == 200, (path, host)


def test_without_a_token_a_foreign_host_is_refused(engine):
    async def scenario(url, port):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz?token=x",
                                headers={"Host": f"evil.example:{port}"}) as response:
                return response.status, await response.text()

    with BackgroundServer(engine) as server:
        status, text = run(scenario(server.url, server.port))
    assert status == 403 and "evil.example" in text


def test_clients_are_told_the_model_name_not_a_server_path(engine, model_dir, tmp_path):
    """/healthz and the `ready` message name the model by its directory's base name (or the
    artifact file's), never by a path on the server."""
    from lsd_serve.engine import artifact_engine
    from lsd_serve.export import save_artifact

    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz") as response:
                health = await response.json()
            ws = await http.ws_connect(url.replace("http", "ws") + "/ws")
            ready = await _json(ws)
            await ws.close()
            return health, ready

    with BackgroundServer(engine) as server:
        health, ready = run(scenario(server.url))
    assert health["engine"] == ready["engine"] == "my-model"
    assert str(model_dir.parent) not in json.dumps([health, ready])

    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    graphdef, params = nnx.split(untrained_model(cfg, seed=5))
    path = save_artifact(tmp_path / "served.lsdx", cfg, graphdef, params, steps=(1,),
                         source=f"checkpoint {model_dir}")
    with BackgroundServer(artifact_engine(path)) as server:
        health, ready = run(scenario(server.url))
    assert health["engine"] == ready["engine"] == "served.lsdx"
    assert str(tmp_path) not in json.dumps([health, ready])


def test_artifact_for_another_platform_is_refused_at_load(tmp_path, capsys):
    """An artifact exported for cuda alone is refused by the engine on this cpu machine, in one
    line, before any frame (`lsd stream`; `lsd serve` loads it the same way)."""
    from lsd_cli.main import main
    from lsd_serve.export import save_artifact

    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    graphdef, params = nnx.split(untrained_model(cfg, seed=6))
    path = save_artifact(tmp_path / "cuda.lsdx", cfg, graphdef, params, steps=(1,),
                         platforms=("cuda",))
    with pytest.raises(ArtifactError, match="exported for cuda; this machine runs cpu"):
        load_engine(artifact=str(path))
    assert main(["stream", "--artifact", str(path), "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lsd: error: artifact {str(path)!r} was exported for cuda; this machine "
                   "runs cpu: export it again with --platforms cpu"], err
    assert not (tmp_path / "o.mp4").exists()
