"""Where the streaming step's time goes (`lsd bench profile`), from XLA's own profile and HLO.

The compiled step runs under `jax.profiler` for `frames` frames. XLA:CPU records one trace event
per executed HLO instruction (a thunk); each instruction carries the name scope of the JAX code
that made it (`jax.named_scope` in `lsd_jax/model.py` and `lsd_jax/streaming.py`) in its HLO
metadata. An instruction without metadata (some dots and copies XLA adds) takes the scope of the
nearest operand that has one. Loop and call thunks, whose time is that of the instructions inside
them, are not counted twice.

`profile_step` returns per component the milliseconds per step (the mean over the profiled
frames) and the step's wall time; what the device events do not cover is the runtime's own work
(dispatch, argument handling, waiting). `plot_profile` draws it as one horizontal bar per
component.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

# Scope paths (as `profile_step` normalises them) -> the component they belong to; the first
# matching prefix wins.
COMPONENTS = (
    ("cache_write", "cache-write pass (a DiT pass of the finished frame)"),
    ("denoise/spatial/attention/mix", "spatial attention: softmax(QK)V"),
    ("denoise/spatial/attention", "spatial attention: qkv, RoPE, out projection"),
    ("denoise/spatial/mlp", "spatial MLP"),
    ("denoise/temporal/attention/mix", "temporal attention over the cache: softmax(QK)V"),
    ("denoise/temporal/attention", "temporal attention: qkv, RoPE, out projection"),
    ("denoise/temporal/mlp", "temporal MLP"),
    ("denoise/spatial/modulation", "adaLN modulation"),
    ("denoise/temporal/modulation", "adaLN modulation"),
    ("denoise/pixel_head", "pixel path: head (64x64 convolutions)"),
    ("denoise/embed/pixel_stem", "pixel path: stem (once per frame)"),
    ("denoise/embed", "patch embedding"),
    ("denoise/final_layer", "final layer"),
    ("denoise/color_map", "colour map"),
    ("denoise/condition", "conditioning (noise level, step size, prompt)"),
    ("denoise", "denoising loop: scan over layers, sampler update"),
    ("", "step glue: codec, noise, cache write"),
)
RUNTIME = "runtime: dispatch, arguments, waiting"
_CONTROL = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def _scopes_of(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the name scope it was made under (nearest operand's if none)."""
    own, operands = {}, {}
    for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)", hlo_text, re.M):
        name, rest = match.group(1), match.group(2)
        meta = re.search(r'op_name="([^"]*)"', rest)
        own[name] = meta.group(1) if meta else None
        operands[name] = re.findall(r"%([\w.\-]+)", rest.split("),")[0])

    def find(name, depth=0):
        if own.get(name) or depth > 8 or name not in operands:
            return own.get(name)
        for operand in operands[name]:
            found = find(operand, depth + 1)
            if found:
                return found
        return None

    return {name: find(name) or "" for name in own}


def _normalise(op_name: str) -> str:
    """`jit(step)/while/body/closed_call/denoise/spatial/attention/dot_general` ->
    `denoise/spatial/attention` (the scope, without JAX's own frames and the op itself)."""
    parts = [p for p in op_name.split("/")[:-1]
             if p not in ("while", "body", "cond", "closed_call") and not p.startswith("jit(")]
    return "/".join(parts)


def component_of(scope: str) -> str:
    for prefix, component in COMPONENTS:
        if scope == prefix or scope.startswith(prefix + "/") or not prefix:
            return component
    return COMPONENTS[-1][1]


def profile_compiled(compiled, run_step, *, frames: int = 50, warmup: int = 10,
                     module: str | None = None) -> dict:
    """Profile `run_step()` (one blocking step of the executable `compiled`) over `frames` calls.

    Returns `{"ms_per_step": {component: ms}, "step_ms": mean wall ms, "device_ms": the sum of
    the instructions' times, "frames"}` (components sorted by time)."""
    import jax

    scopes = _scopes_of(compiled.as_text())
    for _ in range(warmup):
        run_step()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(frames):
            run_step()
        wall_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
        traces = glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
        with gzip.open(traces[0]) as f:
            events = json.load(f)["traceEvents"]
    per_component = collections.Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("ph") != "X" or "hlo_op" not in args:
            continue
        if module is not None and args.get("hlo_module") != module:
            continue
        name = args["hlo_op"]
        if _CONTROL.match(name) or name not in scopes:
            continue
        per_component[component_of(_normalise(scopes[name]))] += event["dur"] / 1e3  # us -> ms
    step_ms = 1e3 * wall_s / frames
    ms = {k: v / frames for k, v in per_component.most_common()}
    device_ms = sum(ms.values())
    ms[RUNTIME] = max(step_ms - device_ms, 0.0)
    return {"ms_per_step": ms, "step_ms": step_ms, "device_ms": device_ms, "frames": frames}


def plot_profile(result: dict, path: str | Path, title: str) -> Path:
    """One horizontal bar per component, milliseconds per step, largest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(result["ms_per_step"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("ms per step")
    ax.set_title(f"{title}: {result['step_ms']:.1f} ms per step", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def share_table(result: dict) -> list[tuple[str, float, float]]:
    """`(component, ms per step, share of the step)` rows, largest first."""
    total = result["step_ms"]
    rows = sorted(result["ms_per_step"].items(), key=lambda kv: -kv[1])
    return [(k, v, v / total if total else float(np.nan)) for k, v in rows]
