"""Serving benchmarks: `lsd bench serve` and `lsd bench long-stream`.

- `bench_serve`: the server on 127.0.0.1 (every variant compiled before the first client) and N
  WebSocket clients in this process, each sending its next frame when the last one's output
  arrives (closed loop: nothing is dropped, so the figures are of frames actually made).
  End-to-end latency is client send to output received, JPEG both ways included; aggregate FPS
  is every client's frames over the timed wall time.
- `bench_long_stream`: one stream of N frames through the step, blocking on each; the step
  latency at frame 100 and at the last frame (as streamed, and interleaved on kept states) and
  the process's resident memory at both. Flat means within 5%.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import cv2
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import Progress

from lsd_jax.stream_state import stream_frames
from lsd_serve.engine import Engine
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.options import ServerOptions
from lsd_serve.server import BackgroundServer


def _frame_pool(engine: Engine, count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Smooth random uint8 frames (upsampled noise, so JPEG sizes are those of real images)."""
    height, width = engine.frame_hw
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, max(1, height // 8), max(1, width // 8), 3), np.uint8)
    return [cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in small]


def _rss_mb() -> float:
    """Resident memory of this process now (not the peak), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def _client(url: str, jpegs: list[bytes], frames: int, warmup: int, steps: int,
                  warmed: asyncio.Event, start: asyncio.Event, timeout_s: float) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws") + "/ws") as ws:

            async def json_message():
                msg = await asyncio.wait_for(ws.receive(), timeout_s)
                return json.loads(msg.data)

            await json_message()  # ready
            await ws.send_str(json.dumps({"type": "steps", "steps": steps}))
            await json_message()  # ack
            latencies_s, batch_sizes = [], []
            for i in range(warmup + frames):
                if i == warmup:
                    warmed.set()
                    await start.wait()
                t0 = time.perf_counter()
                await ws.send_bytes(jpegs[i % len(jpegs)])
                meta = await json_message()
                await asyncio.wait_for(ws.receive(), timeout_s)  # the JPEG
                if i >= warmup:
                    latencies_s.append(time.perf_counter() - t0)
                    batch_sizes.append(meta["sessions_in_batch"])
            return {"latencies_s": latencies_s, "batch_sizes": batch_sizes,
                    "dropped": meta["dropped"], "steps_used": meta["steps"]}


async def _run_sessions(url: str, jpegs, sessions: int, frames: int, warmup: int, steps: int):
    start = asyncio.Event()
    warmed = [asyncio.Event() for _ in range(sessions)]
    tasks = [asyncio.create_task(_client(url, jpegs, frames, warmup, steps, w, start, 300))
             for w in warmed]
    # Warm-up compiles the batch sizes these sessions use; the timed phase starts once every
    # client is through it (clients that finish early wait at the start line).
    await asyncio.wait_for(asyncio.gather(*(w.wait() for w in warmed)), 600)
    t0 = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def bench_serve(engine: Engine, *, sessions=(1, 2, 4), frames: int = 200, steps: int | None = None,
                warmup: int = 10) -> dict:
    """End-to-end frame latency and aggregate FPS through the server, per session count."""
    steps = engine.max_steps if steps is None else steps
    jpegs = [encode_jpeg(f) for f in _frame_pool(engine)]
    runs = []
    with BackgroundServer(engine, ServerOptions(max_sessions=max(sessions),
                                                        precompile=True)) as server:
        for n in sessions:
            results, wall_s = asyncio.run(_run_sessions(server.url, jpegs, n, frames, warmup,
                                                        steps))
            ms = 1e3 * np.concatenate([r["latencies_s"] for r in results])
            batch_sizes = np.concatenate([r["batch_sizes"] for r in results])
            runs.append({
                "sessions": n,
                "ms_p50": float(np.percentile(ms, 50)),
                "ms_p99": float(np.percentile(ms, 99)),
                "ms_mean": float(ms.mean()),
                "aggregate_fps": len(ms) / wall_s,
                "fps_per_session": len(ms) / wall_s / n,
                "mean_sessions_per_step": float(batch_sizes.mean()),
                "dropped": int(sum(r["dropped"] for r in results)),
                "steps_used": sorted({r["steps_used"] for r in results}),
            })
    device = jax.devices()[0]
    return {"engine": engine.describe, "untrained": engine.untrained, "steps": steps,
            "frames": frames, "warmup": warmup, "frame_shape": [*engine.frame_hw, 3],
            "device": f"{device.platform} ({device.device_kind})", "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__, "runs": runs}


def _copy_state(state):
    """A copy of a stream state that a step can consume (the step donates its state)."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def bench_long_stream(engine: Engine, *, frames: int = 10_000, steps: int | None = None,
                      window: int = 100, reps: int = 200, show_progress: bool = True,
                      seed: int = 0) -> dict:
    """Stream `frames` frames through one stream; compare the step at frame 100 with the step at
    the last frame, and the resident memory at both.

    Two comparisons. Windowed: the p50 of the `window` frames around frame 100 against the last
    `window` frames, as streamed. Interleaved: the stream states entering frame 100 and entering
    the last frame are kept, and copies of the two are stepped alternately `reps` times each; on a
    shared machine whose load drifts over minutes this is the fair one (both see the same load).
    Flat means the interleaved p50 ratio is within 5%.
    """
    if frames < 100 + window:
        raise ValueError(f"frames={frames}, expected at least {100 + window} (frame 100 plus a "
                         f"window of {window})")
    steps = engine.max_steps if steps is None else steps
    pool = [f[None] for f in _frame_pool(engine, seed=seed)]
    state = engine.init_state(engine.pick_batch(1), seed)
    pad = state.batch - 1
    pool = [np.concatenate([f] * (1 + pad)) for f in pool]
    prompt_bp = engine.encode_prompts(["a watercolor painting"] * (1 + pad))
    latencies_s = np.zeros(frames)
    early_from = 100 - window // 2
    rss, kept = {}, {}
    bar = Progress(console=Console(stderr=True), refresh_per_second=1, transient=True,
                   disable=not show_progress)
    def step(state, frames_bhwc, prompt_bp):
        return engine.step(state, frames_bhwc, prompt_bp, steps)

    pool_frames = (pool[i % len(pool)] for i in range(frames))
    with bar:
        for item in bar.track(stream_frames(step, state, pool_frames, prompt_bp), total=frames,
                              description=f"streaming {frames} frames"):
            latencies_s[item.index] = item.seconds
            if item.index == 99:
                kept["early"] = _copy_state(item.state)  # the state entering frame 100
            if item.index == early_from + window - 1:
                rss["early"] = _rss_mb()
    rss["late"] = _rss_mb()
    kept["late"] = item.state
    paired_s = {"early": [], "late": []}
    for r in range(2 * reps):
        which = ("early", "late")[r % 2]
        trial = _copy_state(kept[which])
        t0 = time.perf_counter()
        _, out = engine.step(trial, pool[r % len(pool)], prompt_bp, steps)
        jax.block_until_ready(out)
        paired_s[which].append(time.perf_counter() - t0)
    early = 1e3 * latencies_s[early_from : early_from + window]
    late = 1e3 * latencies_s[frames - window :]
    paired_ratio = float(np.median(paired_s["late"]) / np.median(paired_s["early"]))
    return {
        "engine": engine.describe, "steps": steps, "frames": frames, "window": window,
        "early": {"frames": f"{early_from}..{early_from + window - 1}",
                  "ms_p50": float(np.median(early)), "ms_p99": float(np.percentile(early, 99)),
                  "rss_mb": rss["early"]},
        "late": {"frames": f"{frames - window}..{frames - 1}", "ms_p50": float(np.median(late)),
                 "ms_p99": float(np.percentile(late, 99)), "rss_mb": rss["late"]},
        "windowed_ratio": float(np.median(late) / np.median(early)),
        "interleaved": {"reps": reps, "frame_100_ms_p50": 1e3 * float(np.median(paired_s["early"])),
                        f"frame_{frames}_ms_p50": 1e3 * float(np.median(paired_s["late"]))},
        "ratio": paired_ratio,
        "flat": abs(paired_ratio - 1.0) <= 0.05,
        "rss_growth_mb": rss["late"] - rss["early"],
        "ms_p50_by_thousand": [float(np.median(1e3 * latencies_s[k : k + 1000]))
                               for k in range(0, frames - 999, 1000)],
        "device": f"{jax.devices()[0].platform}", "cpu_count": os.cpu_count(),
    }
