"""`lsd bench`: the group every benchmark joins, and the benchmarks of the core and its kernels.

    lsd bench step --config tiny [--steps 3] [--frames 200] [--batch 1] [--json]
    lsd bench kernels --config lsd_base_gpu [--frames 2] [--repeats 20] [--no-tpu] [--json]

The other groups add theirs (`lsd bench train`, `lsd bench serve`, `lsd bench long-stream`,
`lsd bench parity-speed`) to the subparsers `register` returns.
"""

from __future__ import annotations

import argparse
import json
import sys

from lsd_cli.args import add_command, config_from_args, int_in, int_list, step_count
from lsd_cli.output import print_rows, si


def _run_bench_step(args: argparse.Namespace) -> int:
    from lsd_jax.bench import bench_step  # lazy: Flax and the model, for this command only

    cfg = config_from_args(args)
    result = bench_step(cfg, steps=args.steps, frames=args.frames, batch=args.batch,
                        warmup=args.warmup, prompt=args.prompt, peak_sizes=args.peak_sizes,
                        show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = result["ms_per_frame"]
    xla = result["xla_cost_analysis_flops_per_frame"]
    bound = "" if result["flops_per_frame_exact"] else " (a lower bound: a loop of unknown length)"
    print_rows([
        ("config", f"{result['config']}, {result['steps']} steps, batch {result['batch']}, "
                   f"{'x'.join(map(str, result['frame_shape']))} frames"),
        ("device", f"{result['device']}, {result['cpu_count']} CPUs, jax {result['jax_version']}"),
        ("compile", f"{result['compile_s']:.2f} s"),
        ("ms per frame", f"p50 {ms['p50']:.2f}  p99 {ms['p99']:.2f}  mean {ms['mean']:.2f}  "
                         f"(over {result['frames']} frames after {result['warmup']} warm-up)"),
        ("FPS", f"{result['fps']:.1f} frames/s ({result['fps_per_stream']:.1f} per stream)"),
        ("FLOPs per frame", f"{si(result['flops_per_frame'], 'FLOP')} (matmuls of the compiled "
                            f"step, loops at their trip counts){bound}"),
        ("  cross-checks", f"analytic {si(result['flops_per_frame_analytic'], 'FLOP')}" + (
            "" if xla is None else
            f"; XLA cost_analysis {si(xla, 'FLOP')} (counts each loop body once)")),
        ("achieved", f"{result['achieved_gflops']:.2f} GFLOP/s at p50"),
        ("matmul peak", f"{result['matmul_peak_gflops']:.2f} GFLOP/s (float32 "
                        f"{result['matmul_peak_size']}^2 matmul, median; by size: "
                        + ", ".join(f"{n}: {g:.1f}" for n, g in
                                    result["matmul_gflops_by_size"].items()) + ")"),
        ("of peak", f"{result['percent_of_peak']:.1f}%"),
    ])
    return 0


def _say_kernel(name: str) -> None:
    print(f"bench kernels: {name}", file=sys.stderr, flush=True)


def _run_bench_kernels(args: argparse.Namespace) -> int:
    from lsd_kernels.bench import bench_kernels  # lazy: the model and kernels, this command only

    cfg = config_from_args(args)
    result = bench_kernels(cfg, frames=args.frames, repeats=args.repeats, tpu=not args.no_tpu,
                           progress=_say_kernel)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"config {result['config']}, {result['dtype']}, {result['frames']} frames; predicted "
          "H100 time at the stated efficiencies (--json: assumptions)")
    print(f"{'kernel':<24}{'max_rel_err':>12}{'GFLOP':>9}{'MB':>9}{'bound':>8}{'H100 us':>9}"
          "  custom calls (cuda | tpu); TPU compile")
    for k in result["kernels"]:
        tpu = k["tpu_compile"]
        tpu_text = tpu.get("skipped") or f"compiled for {tpu.get('topology')}"
        print(f"{k['name']:<24}{k['max_rel_err']:>12.2e}{k['flops'] / 1e9:>9.3f}"
              f"{k['bytes'] / 1e6:>9.2f}{k['bound']:>8}{k['predicted_h100_us']:>9.2f}  "
              f"{','.join(k['custom_calls']['cuda'])} | {','.join(k['custom_calls']['tpu'])}; "
              f"{tpu_text}")
        if isinstance(k["timing"], dict):
            t = k["timing"]
            print(f"{'':<24}kernel {t['kernel_ms']:.3f} ms, XLA {t['xla_ms']:.3f} ms "
                  f"({t['speedup']:.2f}x), {t['tflops']:.1f} TFLOP/s")
    sm90 = result["sm_90"]
    print("sm_90 (jax-triton ring kernel): " + (sm90.get("skipped") or ", ".join(
        f"{key} {sm90[key]}" for key in ("registers", "spill_stores", "spill_loads",
                                         "shared_bytes") if key in sm90)))
    timing = result["kernels"][0]["timing"]
    if isinstance(timing, str):
        print(f"timing: {timing}")
    return 0


def register(commands):
    """Add `lsd bench` with `step` and `kernels`; returns its subparsers, for the other groups'
    benchmarks."""
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="benchmark", required=True, metavar="BENCHMARK")
    step = add_command(bench, "step", _run_bench_step,
                       "latency, FPS and FLOP rate of the jitted streaming step")
    step.add_argument("--steps", type=step_count, default=None,
                      help="denoising steps per frame (default: the config's)")
    step.add_argument("--frames", type=int_in(1), default=200, help="frames timed after warm-up")
    step.add_argument("--batch", type=int_in(1), default=1, help="concurrent streams")
    step.add_argument("--warmup", type=int_in(0), default=10,
                      help="untimed frames after compiling")
    step.add_argument("--prompt", default="a watercolor painting",
                      help="prompt (for configs with a prompt)")
    step.add_argument("--peak-sizes", type=int_list(1), default=(512, 1024, 2048),
                      help="square float32 matmul sizes timed for the machine's peak "
                           "(default 512,1024,2048)")
    step.add_argument("--no-progress", action="store_true", help="no progress bar")
    step.add_argument("--json", action="store_true", help="print one JSON object")

    kern = add_command(bench, "kernels", _run_bench_kernels,
                       "every Pallas kernel at a config's shapes: error against the reference "
                       "(interpreted), custom calls of its cuda and tpu lowerings, TPU and "
                       "sm_90 compile stats, roofline; timed against XLA on a GPU or TPU")
    kern.add_argument("--frames", type=int_in(1), default=2,
                      help="frames for the spatial and norm kernels (default 2)")
    kern.add_argument("--repeats", type=int_in(1), default=20,
                      help="timed runs per kernel on a GPU/TPU (median)")
    kern.add_argument("--no-tpu", action="store_true",
                      help="skip the TPU ahead-of-time compile (needs libtpu)")
    kern.add_argument("--json", action="store_true", help="print one JSON object")
    return bench
