"""The streaming-step benchmark (`lsd bench step`) and the machine's measured matmul peak.

`bench_step` builds a randomly initialised model, compiles the jitted step ahead of time (timed),
warms it up, then streams random uint8 frames through it, blocking on every result so each
latency is the real per-frame latency (host->device transfer of the frame included, as in a live
stream). FLOPs per frame are the matmul FLOPs of the compiled step's HLO, each `lax.scan` loop
body counted its trip count (`flops.hlo_matmul_flops`); XLA's own `cost_analysis()` figure,
which counts each loop body once, is reported beside it. The achieved rate is set against the
float32 matmul rate measured in the same run, since a shared machine's peak is not a constant.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import Progress

from lsd_jax.config import Config
from lsd_jax.flops import hlo_matmul_flops, streamed_frame_flops


@dataclasses.dataclass(frozen=True)
class MatmulPeak:
    """Median float32 matmul rate per square size; `gflops` is the best size's median."""

    gflops: float
    size: int
    by_size: dict[int, float]


def measure_matmul_peak(sizes=(512, 1024, 2048), *, min_reps: int = 5,
                        min_seconds: float = 0.5) -> MatmulPeak:
    """Time jitted `[n, n] @ [n, n]` float32 matmuls on the default device for each `n`.

    Each size runs at least `min_reps` times and at least `min_seconds` (at most 100 times); its
    rate is `2 n^3 / median time`. Medians, because other work on a shared machine adds outliers.
    """
    by_size = {}
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        key_a, key_b = jax.random.split(jax.random.PRNGKey(n))
        a_nn = jax.random.normal(key_a, (n, n), jnp.float32)
        b_nn = jax.random.normal(key_b, (n, n), jnp.float32)
        matmul(a_nn, b_nn).block_until_ready()  # compile and warm up
        times, start = [], time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < min_seconds
                                        and len(times) < 100):
            t0 = time.perf_counter()
            matmul(a_nn, b_nn).block_until_ready()
            times.append(time.perf_counter() - t0)
        by_size[n] = 2 * n**3 / statistics.median(times) / 1e9
    best = max(by_size, key=by_size.get)
    return MatmulPeak(by_size[best], best, by_size)


def cost_analysis_flops(compiled) -> float | None:
    """XLA's `flops` for a compiled executable (a dict, or a list of one dict in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost else float(cost.get("flops", 0.0))


def bench_step(cfg: Config, *, steps: int | None = None, frames: int = 200, batch: int = 1,
               warmup: int = 10, prompt: str = "a watercolor painting",
               peak_sizes=(512, 1024, 2048), show_progress: bool = True) -> dict:
    """Benchmark the streaming step of `cfg`; returns the figures as a JSON-ready dict.

    Latencies are of one step call, which makes one frame for each of the `batch` streams.
    """
    from flax import nnx

    from lsd_jax.codec import make_codec
    from lsd_jax.model import DiT, randomize
    from lsd_jax.prompt import make_prompt_encoder
    from lsd_jax.streaming import init_stream, make_step

    if frames < 1 or batch < 1 or warmup < 0:
        raise ValueError(f"frames={frames}, batch={batch}, warmup={warmup}: expected frames >= 1, "
                         "batch >= 1, warmup >= 0")
    steps = cfg.diffusion.sample_steps if steps is None else steps
    codec = make_codec(cfg)
    # Random weights everywhere: the adaLN-Zero init would make every block the identity.
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(cfg.seed)), seed=cfg.seed)
    graphdef, params = nnx.split(model)
    state = init_stream(cfg, batch, cfg.seed)
    step = make_step(cfg, graphdef, steps=steps)

    rng = np.random.default_rng(cfg.seed)
    # A small pool of distinct random frames, cycled: enough to defeat any caching, small in memory.
    pool_bhwc = rng.integers(0, 256, (min(frames, 16), batch, *codec.frame_shape), dtype=np.uint8)
    encoder = make_prompt_encoder(cfg)
    prompt_bp = None if encoder is None else jnp.asarray(encoder.encode_batch([prompt] * batch))
    external_bx = None
    if cfg.model.external_cond_dim:
        external_bx = jnp.asarray(rng.standard_normal((batch, cfg.model.external_cond_dim)),
                                  jnp.float32)

    t0 = time.perf_counter()
    compiled = step.lower(params, state, pool_bhwc[0], prompt_bp, external_bx).compile()
    compile_s = time.perf_counter() - t0

    def run(i):
        nonlocal state
        state, out_bhwc = compiled(params, state, pool_bhwc[i % len(pool_bhwc)], prompt_bp,
                                   external_bx)
        jax.block_until_ready((state, out_bhwc))

    for i in range(warmup):
        run(i)
    latencies_s = []
    # A slow refresh: the bar's thread shares the cores being measured.
    bar = Progress(console=Console(stderr=True), refresh_per_second=2, transient=True,
                   disable=not show_progress)
    with bar:
        for i in bar.track(range(frames), description=f"streaming {frames} frames"):
            t0 = time.perf_counter()
            run(i)
            latencies_s.append(time.perf_counter() - t0)

    hlo = hlo_matmul_flops(compiled.as_text())
    xla_flops = cost_analysis_flops(compiled)
    p50_s = float(np.percentile(latencies_s, 50))
    mean_s = float(np.mean(latencies_s))
    achieved_gflops = hlo.flops / p50_s / 1e9
    peak = measure_matmul_peak(peak_sizes)
    device = jax.devices()[0]
    return {
        "config": cfg.name,
        "steps": steps,
        "batch": batch,
        "frames": frames,
        "warmup": warmup,
        "frame_shape": list(codec.frame_shape),
        "device": f"{device.platform} ({device.device_kind})",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "compile_s": compile_s,
        "ms_per_frame": {
            "p50": 1e3 * p50_s,
            "p99": 1e3 * float(np.percentile(latencies_s, 99)),
            "mean": 1e3 * mean_s,
            "min": 1e3 * float(np.min(latencies_s)),
        },
        "fps": batch / mean_s,
        "fps_per_stream": 1.0 / mean_s,
        "flops_per_frame": hlo.flops / batch,
        "flops_per_frame_exact": hlo.unknown_trip_counts == 0,
        "flops_per_frame_analytic": streamed_frame_flops(cfg, steps),
        "xla_cost_analysis_flops_per_frame": None if xla_flops is None else xla_flops / batch,
        "achieved_gflops": achieved_gflops,
        "matmul_peak_gflops": peak.gflops,
        "matmul_peak_size": peak.size,
        "matmul_gflops_by_size": {str(n): g for n, g in peak.by_size.items()},
        "percent_of_peak": 100.0 * achieved_gflops / peak.gflops,
    }

