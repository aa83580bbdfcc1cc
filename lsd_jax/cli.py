"""The `lsd` command.

    lsd info --config lsd_configs/tiny.py [key.path=value ...] [--json]
    lsd bench step --config lsd_configs/tiny.py [--steps 3] [--frames 200] [--batch 1] [--json]

Every command that takes `--config` also takes trailing `key.path=value` overrides of any config
field (`lsd info --config lsd_configs/tiny.py model.depth=2`). `--config` is a file path, or the
name of a config shipped in the `lsd_configs` package (`--config tiny`). A bad config, frame,
prompt or file prints one line, `lsd: error: ...`, to stderr and exits 2, as argparse does for bad
arguments.

Adding a command: write `_run_NAME(args) -> int`, and register it in `build_parser` with
`_add_command` (which adds `--config` and the overrides), plus its own arguments. Commands that
belong to another package live there, in a module listed in `COMMAND_MODULES` whose
`register(commands, add_command, bench)` adds them (heavy imports stay inside the run functions);
those modules take what they share with this one from `lsd_jax.args` and `lsd_jax.config`, never
from this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from lsd_jax.args import config_from_args, int_in, int_list, step_count
from lsd_jax.config import Config
from lsd_jax.errors import USER_ERRORS
from lsd_jax.interop import parity_cli
from lsd_serve import cli as serve_cli
from lsd_train import cli as train_cli
from lsd_train import latents

# The modules whose `register(commands, add_command, bench)` adds their commands.
COMMAND_MODULES = (parity_cli, train_cli, serve_cli, latents)



# ----------------------------------------------------------------------------- output


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")


# ----------------------------------------------------------------------------- lsd info


def describe(cfg: Config) -> dict:
    """Parameter count (from shapes only: no weights allocated), FLOPs, tokens, window, steps."""
    from lsd_jax.flops import dit_flops, streamed_frame_flops
    from lsd_jax.kernels import entry
    from lsd_jax.model import abstract_model, count_params

    m = cfg.model
    # An unknown implementation is an error here, not at run time; one for another platform (a
    # GPU kernel described on a CPU machine) is not: nothing runs.
    entry("attention", m.attention_impl)
    total, trainable = count_params(abstract_model(m))
    per_pass = dit_flops(m, frames=1, keys_per_frame=m.window)
    return {
        "name": cfg.name,
        "params_total": total,
        "params_trainable": trainable,
        "frame_shape": list(m.frame_shape),
        "codec": cfg.codec,
        "tokens_per_frame": m.tokens_per_frame,
        "grid": list(m.grid),
        "patch_size": m.patch_size,
        "window": m.window,
        "cache_frames": m.window - 1,
        "steps": cfg.diffusion.sample_steps,
        "flops_per_pass": per_pass["total"],
        "flops_per_pass_by_part": {k: v for k, v in per_pass.items() if k != "total"},
        "flops_per_frame": streamed_frame_flops(cfg),
    }


def _run_info(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    info = describe(cfg)
    if args.json:
        print(json.dumps({"config": args.config, **info}, indent=2))
        return 0
    gh, gw = info["grid"]
    _print_rows([
        ("config", f"{info['name']} ({args.config})"),
        ("parameters", f"{info['params_total']:,} total, {info['params_trainable']:,} trainable"),
        ("frame", f"{'x'.join(map(str, info['frame_shape']))} model space, codec {cfg.codec}"),
        ("tokens per frame", f"{info['tokens_per_frame']} ({gh}x{gw} grid of "
                             f"{info['patch_size']}x{info['patch_size']} patches)"),
        ("window", f"{info['window']} frames ({info['cache_frames']} cached per layer)"),
        ("steps", f"{info['steps']} denoising passes + 1 cache-write pass per frame"),
        ("FLOPs per pass", f"{info['flops_per_pass']:,} ({_si(info['flops_per_pass'], 'FLOP')}):"
                           f" one frame, temporal attention over {info['window']} frames"),
        ("FLOPs per frame", f"{info['flops_per_frame']:,} ({_si(info['flops_per_frame'], 'FLOP')})"
                            f": {info['steps']} denoising passes + the cache-write pass"),
    ])
    return 0


# ----------------------------------------------------------------------------- lsd bench step


def _run_bench_step(args: argparse.Namespace) -> int:
    from lsd_jax.bench import bench_step

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
    _print_rows([
        ("config", f"{result['config']}, {result['steps']} steps, batch {result['batch']}, "
                   f"{'x'.join(map(str, result['frame_shape']))} frames"),
        ("device", f"{result['device']}, {result['cpu_count']} CPUs, jax {result['jax_version']}"),
        ("compile", f"{result['compile_s']:.2f} s"),
        ("ms per frame", f"p50 {ms['p50']:.2f}  p99 {ms['p99']:.2f}  mean {ms['mean']:.2f}  "
                         f"(over {result['frames']} frames after {result['warmup']} warm-up)"),
        ("FPS", f"{result['fps']:.1f} frames/s ({result['fps_per_stream']:.1f} per stream)"),
        ("FLOPs per frame", f"{_si(result['flops_per_frame'], 'FLOP')} (matmuls of the compiled "
                            f"step, loops at their trip counts){bound}"),
        ("  cross-checks", f"analytic {_si(result['flops_per_frame_analytic'], 'FLOP')}" + (
            "" if xla is None else
            f"; XLA cost_analysis {_si(xla, 'FLOP')} (counts each loop body once)")),
        ("achieved", f"{result['achieved_gflops']:.2f} GFLOP/s at p50"),
        ("matmul peak", f"{result['matmul_peak_gflops']:.2f} GFLOP/s (float32 "
                        f"{result['matmul_peak_size']}^2 matmul, median; by size: "
                        + ", ".join(f"{n}: {g:.1f}" for n, g in
                                    result["matmul_gflops_by_size"].items()) + ")"),
        ("of peak", f"{result['percent_of_peak']:.1f}%"),
    ])
    return 0


# ----------------------------------------------------------------------------- lsd bench kernels


def _run_bench_kernels(args: argparse.Namespace) -> int:
    from lsd_kernels.bench import bench_kernels

    cfg = config_from_args(args)
    result = bench_kernels(cfg, frames=args.frames, repeats=args.repeats, tpu=not args.no_tpu,
                           progress=lambda name: print(f"bench kernels: {name}",
                                                       file=sys.stderr, flush=True))
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


# ----------------------------------------------------------------------------- parser


def _add_command(subparsers, name: str, run: Callable[[argparse.Namespace], int],
                 help: str) -> argparse.ArgumentParser:
    """A subcommand taking `--config` and trailing `key.path=value` overrides."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--config", required=True,
                        help="config file (lsd_configs/tiny.py) or packaged config name (tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override a config field, e.g. model.depth=2")
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsd", description="Live-Stream Diffusion in JAX: a causal video DiT, frame by frame.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = _add_command(commands, "info", _run_info,
                        "parameters, FLOPs, tokens per frame, window and steps of a config")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="benchmark", required=True, metavar="BENCHMARK")
    step = _add_command(bench, "step", _run_bench_step,
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

    kern = _add_command(bench, "kernels", _run_bench_kernels,
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

    for module in COMMAND_MODULES:
        module.register(commands, _add_command, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lsd` with `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow later options (`--config x --json a.b=1`); argparse leaves those.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no config overrides: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = str(err) if not isinstance(err, FileNotFoundError) else (
            f"{err.strerror}: {err.filename}")
        print(f"lsd: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`lsd info | head`); send the rest nowhere instead of a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
