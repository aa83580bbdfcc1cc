"""The nearest trained prompt where users see it: the `nearest` WebSocket message of `lsd serve`
(a real client on 127.0.0.1), the note `lsd stream` prints, and the prompts an engine knows."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from conftest import CONFIGS

from lsd_cli.main import main
from lsd_cli.serve import _note_untrained_prompts
from lsd_jax.config import load_config
from lsd_jax.prompt import HashedPromptEncoder
from lsd_jax.resolve import untrained_model
from lsd_serve.model_engine import model_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer
from lsd_train.tasks import TASKS

SMALL = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=1"]
KNOWN = [t.prompt for t in TASKS]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def engines():
    """`(trained, untrained)`: the same small model, once described as trained by `lsd train`
    on every task of `lsd_train/tasks.py` (so its trained prompts are known), once as untrained."""
    cfg = load_config(CONFIGS / "tiny.py", SMALL)
    model = untrained_model(cfg, seed=3)
    return (model_engine(cfg, model, describe="test model", untrained=False,
                         trained_prompts=tuple(KNOWN)),
            model_engine(cfg, model, describe="test model", untrained=True))


def reference(prompt: str) -> tuple[str, float]:
    """The nearest trained prompt and its cosine, from the hashed vectors in float64 numpy."""
    encoder = HashedPromptEncoder(64)
    table = np.stack([encoder.encode(p) for p in KNOWN]).astype(np.float64)
    query = encoder.encode(prompt).astype(np.float64)
    cosines = table @ query / (np.linalg.norm(table, axis=1) * np.linalg.norm(query))
    return KNOWN[int(np.argmax(cosines))], float(cosines.max())


def test_engine_knows_its_trained_prompts(engines):
    trained, untrained = engines
    assert trained.trained_prompts == tuple(KNOWN) and untrained.trained_prompts == ()
    near = trained.nearest_trained("neon lights in the dark")
    want, similarity = reference("neon lights in the dark")
    assert near["nearest"] == want and not near["trained"]
    assert near["similarity"] == pytest.approx(similarity, rel=1e-9) and 0.2 < similarity < 1
    assert trained.nearest_trained("A Pencil Sketch!")["trained"]
    assert untrained.nearest_trained("a pencil sketch") is None


def test_nearest_message_over_the_websocket(engines):
    trained, untrained = engines

    async def ask(url, messages):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url.replace("http", "ws") + "/ws")
            replies = [json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT_S)).data)]
            for message in messages:
                await ws.send_str(json.dumps(message))
                replies.append(json.loads((await asyncio.wait_for(ws.receive(),
                                                                  TIMEOUT_S)).data))
            await ws.close()
            return replies

    def run(engine, messages):
        with BackgroundServer(engine, ServerOptions()) as server:
            return asyncio.run(ask(server.url, messages))

    ready, near, same, bad, unknown = run(trained, [
        {"type": "nearest", "text": "an old photograph of neon lights", "id": 7},
        {"type": "nearest", "text": "Glowing neon edges on a dark scene."},
        {"type": "nearest", "text": 5},
        {"type": "hint"}])
    assert ready["type"] == "ready"
    want, similarity = reference("an old photograph of neon lights")
    assert near == {"type": "nearest", "of": "nearest", "id": 7,
                    "text": "an old photograph of neon lights", "nearest": want,
                    "similarity": pytest.approx(similarity, rel=1e-9), "trained": False,
                    "near": similarity >= 0.6, "encoder": "hashed"}
    assert near["near"]  # 0.66 with "an old sepia photograph": shares "an old ... photograph"
    assert same["nearest"] == "glowing neon edges on a dark scene" and same["trained"]
    assert same["similarity"] == pytest.approx(1.0, abs=1e-9)
    assert bad["code"] == "bad_value" and "nearest text 5" in bad["message"]
    assert unknown["code"] == "unknown_type" and "prompt, nearest, reset" in unknown["message"]
    _, none = run(untrained, [{"type": "nearest", "text": "a pencil sketch"}])
    assert (none["nearest"], none["similarity"], none["trained"], none["near"]) == (None,) * 4


def test_stream_note_names_the_nearest_trained_prompt(engines, capsys):
    """Nothing for a trained prompt; what a near prompt reads as; a warning for a far one."""
    trained, untrained = engines
    _note_untrained_prompts(trained, ["a pencil sketch", "neon lights in the dark",
                                      "neon lights in the dark",
                                      "an old photograph of neon lights"])
    far, far_sim = reference("neon lights in the dark")
    near, near_sim = reference("an old photograph of neon lights")
    assert far_sim < 0.6 <= near_sim
    assert capsys.readouterr().err.splitlines() == [
        f"lsd stream: warning: 'neon lights in the dark' is far from every prompt the model was "
        f"trained on: the nearest is {far!r} (cosine similarity {far_sim:.2f} under the hashed "
        f"encoder, below 0.6); the output blends trained styles",
        f"lsd stream: 'an old photograph of neon lights' reads as the trained prompt {near!r} "
        f"(cosine similarity {near_sim:.2f} under the hashed encoder)"]
    _note_untrained_prompts(untrained, ["neon lights in the dark"])
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_lsd_stream_prints_the_note_for_the_demo_model(tmp_path, capsys):
    """A held-out paraphrase of a trained prompt reads as that prompt (no warning); an unrelated
    prompt is reported far from everything trained."""
    from lsd_jax.resolve import resolve_model
    from lsd_train.tasks import PARAPHRASES

    demo = resolve_model()
    paraphrase = PARAPHRASES["thermal"][0]
    assert main(["stream", "--input", "demo", "--prompt-schedule",
                 f"0:a pencil sketch,1:{paraphrase},2:a cat wearing sunglasses", "--out",
                 str(tmp_path / "o.mp4"), "--max-frames", "3", "--steps", "1",
                 "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines()
             if "trained" in line and "built-in" not in line]
    assert len(lines) == 2, lines
    if demo.cfg.prompt.encoder == "minilm":
        assert lines[0].startswith(f"lsd stream: {paraphrase!r} reads as the trained prompt "
                                   "'a thermal camera image'")
    assert lines[1].startswith("lsd stream: warning: 'a cat wearing sunglasses' is far from "
                               "every prompt the model was trained on")
