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
import functools
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


class _StepRig:
    """A randomly initialised model of `cfg`, its jitted streaming step compiled ahead of time for
    `batch` streams, and a pool of random uint8 frames: what `bench_step` and `profile_step`
    time."""

    def __init__(self, cfg: Config, *, steps: int, batch: int, frames: int,
                 prompt: str = "a watercolor painting"):
        from flax import nnx

        from lsd_jax.codec import make_codec
        from lsd_jax.model import DiT, randomize
        from lsd_jax.prompt import make_prompt_encoder
        from lsd_jax.streaming import init_stream, make_step

        self.codec = make_codec(cfg)
        # Random weights everywhere: the adaLN-Zero init would make every block the identity.
        model = randomize(DiT(cfg.model, rngs=nnx.Rngs(cfg.seed)), seed=cfg.seed)
        graphdef, self.params = nnx.split(model)
        self.state = init_stream(cfg, batch, cfg.seed)
        step = make_step(cfg, graphdef, steps=steps)
        rng = np.random.default_rng(cfg.seed)
        # A small pool of distinct random frames, cycled: enough to defeat any caching.
        self.pool_bhwc = rng.integers(0, 256, (min(frames, 16), batch, *self.codec.frame_shape),
                                      dtype=np.uint8)
        encoder = make_prompt_encoder(cfg)
        self.prompt_bp = (None if encoder is None
                          else jnp.asarray(encoder.encode_batch([prompt] * batch)))
        self.external_bx = None
        if cfg.model.external_cond_dim:
            self.external_bx = jnp.asarray(
                rng.standard_normal((batch, cfg.model.external_cond_dim)), jnp.float32)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.params, self.state, self.pool_bhwc[0], self.prompt_bp,
                                   self.external_bx).compile()
        self.compile_s = time.perf_counter() - t0
        self.calls = 0

    def run(self):
        """One step, blocked on: the next frame of the pool for every stream."""
        self.state, out_bhwc = self.compiled(self.params, self.state,
                                             self.pool_bhwc[self.calls % len(self.pool_bhwc)],
                                             self.prompt_bp, self.external_bx)
        jax.block_until_ready((self.state, out_bhwc))
        self.calls += 1


def profile_step(cfg: Config, *, steps: int | None = None, frames: int = 50, batch: int = 1,
                 warmup: int = 10) -> dict:
    """Where the streaming step of `cfg` spends its time (`lsd_jax.profile`), as a JSON-ready
    dict: milliseconds per step by component, the step's wall time, and the setting."""
    from lsd_jax.profile import profile_compiled

    steps = cfg.diffusion.sample_steps if steps is None else steps
    rig = _StepRig(cfg, steps=steps, batch=batch, frames=frames)
    result = profile_compiled(rig.compiled, rig.run, frames=frames, warmup=warmup)
    return {"config": cfg.name, "steps": steps, "batch": batch, **result,
            "device": f"{jax.devices()[0].platform}", "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__}


def bench_step(cfg: Config, *, steps: int | None = None, frames: int = 200, batch: int = 1,
               warmup: int = 10, prompt: str = "a watercolor painting",
               peak_sizes=(512, 1024, 2048), show_progress: bool = True) -> dict:
    """Benchmark the streaming step of `cfg`; returns the figures as a JSON-ready dict.

    Latencies are of one step call, which makes one frame for each of the `batch` streams.
    """
    if frames < 1 or batch < 1 or warmup < 0:
        raise ValueError(f"frames={frames}, batch={batch}, warmup={warmup}: expected frames >= 1, "
                         "batch >= 1, warmup >= 0")
    steps = cfg.diffusion.sample_steps if steps is None else steps
    rig = _StepRig(cfg, steps=steps, batch=batch, frames=frames, prompt=prompt)
    compiled, compile_s, codec = rig.compiled, rig.compile_s, rig.codec

    def run(_):
        rig.run()

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



def bench_cache(cfg: Config, *, steps_list=(3, 10), frames: int = 30, warmup: int = 3) -> dict:
    """The cached streaming step against recomputing the window (`lsd bench cache`).

    Per frame in model space (no codec), batch 1, random weights, with a full window of history:
    the cached step (`make_latent_step`: `steps` passes of the new frame reading the ring-buffer
    cache, plus the cache-write pass unless `diffusion.cache_from="last_step"`) against what a
    model without a cache does (Oasis's own sampler, `interop.oasis.sample_recompute`): `steps`
    full banded forwards over the last `window` frames (history labelled `t_ctx`, then the new
    frame). Both jitted, blocking on every frame; medians. Returns per step count the two p50s
    and their ratio, which ideally is `steps * window / passes`.
    """
    from flax import nnx

    from lsd_jax.diffusion import initial_noise, make_process
    from lsd_jax.model import DiT, randomize
    from lsd_jax.streaming import init_stream, make_latent_step

    m = cfg.model
    model = randomize(DiT(m, rngs=nnx.Rngs(cfg.seed)), seed=cfg.seed)
    graphdef, params = nnx.split(model)
    process = make_process(cfg.diffusion)
    rng = np.random.default_rng(cfg.seed)
    w = m.window

    def array(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    cond_bthwc = array(1, w, m.frame_height, m.frame_width, m.cond_channels) if (
        m.cond_channels) else None
    prompt_bp = array(1, m.prompt_dim) if m.prompt_dim else None
    external_btx = array(1, w, m.external_cond_dim) if m.external_cond_dim else None
    history_bthwc = array(1, w - 1, *m.frame_shape)

    def at_last(a):
        return None if a is None else a[:, -1]

    def timed(fn, *args):
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
        times = []
        for _ in range(frames):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times))

    def recompute(params, history, key, levels, step_sizes):
        model = nnx.merge(graphdef, params)
        x = initial_noise(key, (1, *m.frame_shape))
        ctx = [process.model_time(cfg.diffusion.ctx_level)] * (w - 1)
        for t, t_next, d in zip(levels[:-1], levels[1:], step_sizes, strict=True):
            level_bt = jnp.asarray([[cfg.diffusion.ctx_level] * (w - 1) + [t]], jnp.float32)
            clip = process.network_input(jnp.concatenate([history, x[:, None]], 1), level_bt)
            time_bt = jnp.asarray([[*ctx, process.model_time(t)]], jnp.float32)
            step_bt = jnp.asarray([[process.min_step_size] * (w - 1) + [d]], jnp.float32)
            pred = model(clip, time_bt, cond_bthwc=cond_bthwc, prompt_bp=prompt_bp,
                         step_size_bt=step_bt if m.use_step_size else None,
                         external_btx=external_btx)[:, -1]
            x = process.denoise_step(x, pred, t, t_next)
        return x

    out = {"config": cfg.name, "window": w, "cache_from": cfg.diffusion.cache_from,
           "device": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "steps": {}}
    for steps in steps_list:
        levels, step_sizes = process.sampling_schedule(steps)
        step = jax.jit(make_latent_step(cfg, graphdef, steps=steps))
        state = init_stream(cfg, 1, cfg.seed)._replace(num_valid=jnp.full((1,), w - 1, jnp.int32))
        cached_ms = timed(step, params, state, at_last(cond_bthwc), prompt_bp,
                          at_last(external_btx))

        recompute_ms = timed(jax.jit(functools.partial(
            recompute, levels=tuple(map(float, levels)), step_sizes=tuple(map(float, step_sizes)))),
            params, history_bthwc, jax.random.PRNGKey(0))
        passes = steps + (0 if cfg.diffusion.cache_from == "last_step" else 1)
        out["steps"][str(steps)] = {"cached_ms_p50": cached_ms, "recompute_ms_p50": recompute_ms,
                                    "speedup": recompute_ms / cached_ms,
                                    "ideal_speedup": steps * w / passes}
    return out
