"""The train-step benchmark (`lsd bench train`): frames/s and FLOP utilisation.

The sharded step of `cfg` (mesh over all local devices) is compiled ahead of time (timed), warmed
up, then run `steps` times on random model-space batches, blocking on each. FLOPs per step are the
matmul FLOPs of the compiled step's HLO with every loop at its trip count
(`lsd_jax.flops.hlo_matmul_flops`: forward, backward, the self-prediction and shortcut-target
passes: everything the objective runs), set against the float32 matmul peak measured in the same
run (`lsd_jax.bench.measure_matmul_peak`).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np

from lsd_jax.bench import cost_analysis_flops, measure_matmul_peak
from lsd_jax.config import Config
from lsd_jax.flops import hlo_matmul_flops
from lsd_train import sharding, trainer


def bench_train(cfg: Config, *, steps: int = 20, warmup: int = 3,
                peak_sizes=(512, 1024, 2048)) -> dict:
    """Benchmark the train step of `cfg`; returns the figures as a JSON-ready dict."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: expected steps >= 1, warmup >= 0")
    mesh = sharding.make_mesh(cfg.mesh)
    cfg = trainer.resolve_batch_size(cfg, mesh)
    sharded = trainer.build_step(cfg, mesh)
    compiled, report = trainer.compile_step(cfg, sharded)
    state = sharded.init()
    rng = np.random.default_rng(cfg.seed)
    batches = [trainer.global_batch(sharded, {
        k: rng.uniform(-1, 1, a.shape).astype(np.float32)
        for k, a in trainer.abstract_batch(cfg).items()}) for _ in range(2)]
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
    times_s = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        times_s.append(time.perf_counter() - t0)
    hlo = hlo_matmul_flops(compiled.as_text())
    xla_flops = cost_analysis_flops(compiled)
    step_s = statistics.median(times_s)
    frames = cfg.train.batch_size * cfg.data.clip_frames
    # The HLO is one device's program: the step's FLOPs are that times the device count.
    flops = hlo.flops * mesh.size
    peak = measure_matmul_peak(peak_sizes)
    achieved = flops / step_s / 1e9
    device = jax.devices()[0]
    return {
        "config": cfg.name, "batch": cfg.train.batch_size, "clip_frames": cfg.data.clip_frames,
        "frame_shape": list(cfg.model.frame_shape), "devices": mesh.size,
        "device": f"{device.platform} ({device.device_kind})", "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "compile_s": report["compile_s"],
        "peak_bytes_per_device": report.get("peak_bytes"),
        "step_ms": {"p50": 1e3 * step_s, "min": 1e3 * min(times_s),
                    "mean": 1e3 * statistics.fmean(times_s)},
        "frames_per_s": frames / step_s,
        "tokens_per_s": frames * cfg.model.tokens_per_frame / step_s,
        "flops_per_step": flops, "flops_per_step_exact": hlo.unknown_trip_counts == 0,
        "xla_cost_analysis_flops_per_step": None if xla_flops is None else xla_flops * mesh.size,
        "achieved_gflops": achieved, "matmul_peak_gflops": peak.gflops,
        "matmul_peak_size": peak.size,
        "matmul_gflops_by_size": {str(n): g for n, g in peak.by_size.items()},
        "percent_of_peak": 100.0 * achieved / (peak.gflops * mesh.size),
        "steps": steps, "warmup": warmup,
    }
