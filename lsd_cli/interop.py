"""`lsd` commands for the PyTorch reference, weight conversion and Oasis (`lsd_jax.interop`).

    lsd convert oasis --dit oasis500m.safetensors --vae vit-l-20.safetensors --out DIR
    lsd parity --config tiny [--torch-checkpoint PATH] [--json]
    lsd bench parity-speed --config tiny --json
    lsd oasis --checkpoint DIR --start frame.png [--actions actions.npy] [--frames 32]
              [--mode recompute|banded-cache] --out video.mp4

`convert oasis` reads the config `--config` (default `oasis_500m`) with trailing overrides;
overrides `vae.FIELD=value` set the ViT-VAE's shapes (`lsd_jax.vae.VAEConfig`, default
vit-l-20). A command that needs torch (the `torch` extra) says so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from lsd_cli.args import add_command, config_from_args, int_in, step_count
from lsd_cli.output import print_rows
from lsd_jax.config import load_config, resolve_config
from lsd_jax.errors import ConfigError


def _require(module: str, command: str) -> None:
    """A one-line error, not a traceback, when the torch extra is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{command} needs {module!r}, which is not installed: "
                          "pip install -e '.[torch]'")


def _parity(command: str):
    """`lsd_jax.interop.parity`, or the one-line error `_require` gives without torch."""
    _require("torch", command)
    from lsd_jax.interop import parity  # lazy: torch, the optional torch extra

    return parity


# ----------------------------------------------------------------------------- lsd convert oasis


def _run_convert_oasis(args: argparse.Namespace) -> int:
    _require("safetensors", "lsd convert oasis")
    from lsd_jax.interop.convert import convert_oasis  # lazy: Flax and orbax, for this command only

    cfg = load_config(resolve_config(args.config),
                      [o for o in args.overrides if not o.startswith("vae.")])
    summary = convert_oasis(cfg, [o for o in args.overrides if o.startswith("vae.")], args.dit,
                            args.vae, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print_rows([
        ("wrote", f"{summary['out']} (config.json, params/, vae.json, vae/)"),
        ("DiT", f"{summary['dit_keys']} tensors from {args.dit} "
                f"({summary['dit_rotary_entries_ignored']} rotary entries ignored), "
                f"{summary['dit_params_total']:,} parameters "
                f"({summary['dit_params_trainable']:,} trained)"),
        ("VAE", f"{summary['vae_keys']} tensors from {args.vae}, {summary['vae_params']:,} "
                "parameters"),
    ])
    return 0


# ----------------------------------------------------------------------------- lsd parity


def _run_parity(args: argparse.Namespace) -> int:
    parity = _parity("lsd parity")
    cfg = config_from_args(args)
    pair = parity.build_pair(cfg, args.torch_checkpoint, seed=args.seed)
    results = parity.run_parity(cfg, pair, seed=args.seed)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"config": cfg.name, "weights": pair.source, "passed": passed,
                          "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        print(f"{cfg.name}: JAX vs PyTorch reference, weights: {pair.source}")
        for r in results:
            verdict = "PASS" if r.passed else "FAIL"
            print(f"  {r.name:<10} max abs {r.max_abs:.3e}  rel {r.rel:.3e}  (tol {r.tol:.0e})  "
                  f"{verdict}  {r.detail}")
        print("PASS" if passed else "FAIL")
    return 0 if passed else 1


# ------------------------------------------------------------------------ lsd bench parity-speed


def _run_bench_parity_speed(args: argparse.Namespace) -> int:
    parity = _parity("lsd bench parity-speed")
    cfg = config_from_args(args)
    result = parity.bench_parity_speed(cfg, frames=args.frames, warmup=args.warmup,
                                       batch=args.batch, steps=args.steps, threads=args.threads,
                                       with_compile=not args.no_compile,
                                       interleave=not args.sequential)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("config", f"{result['config']}, {result['steps']} steps, batch {result['batch']}, "
                       f"torch threads {result['threads_torch']} of {result['cpu_count']} CPUs, "
                       f"{result['order']}")]
    for name, figures in result["ms_per_frame"].items():
        if "error" in figures:
            rows.append((name, f"unavailable: {figures['error']}"))
        else:
            rows.append((name, f"p50 {figures['p50']:.2f} ms  mean {figures['mean']:.2f} ms"))
    for name, ratio in result["ratios_p50"].items():
        rows.append((name, f"{ratio:.2f}x"))
    print_rows(rows)
    return 0


# ----------------------------------------------------------------------------- lsd oasis


def _run_oasis(args: argparse.Namespace) -> int:
    from lsd_jax.interop import oasis  # lazy: Flax and the model, for this command only

    cfg, model, codec = oasis.load_world_model(args.checkpoint, args.overrides)
    height, width, _ = codec.frame_shape
    start = oasis.load_start_frames(args.start, args.start_frames, height, width)
    actions = oasis.load_actions(args.actions, args.frames, cfg.model.external_cond_dim)
    video = oasis.generate(cfg, model, codec, start, actions, args.frames, args.mode,
                           seed=args.seed)
    oasis.write_video(args.out, video)
    summary = {"out": str(args.out), "mode": args.mode, "frames": args.frames,
               "start_frames": args.start_frames, "frame_shape": list(video.shape[1:]),
               "actions": str(args.actions) if args.actions else "zeros",
               "steps": cfg.diffusion.sample_steps, "window": cfg.model.window}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.out}: {args.frames} frames ({args.start_frames} start), mode "
              f"{args.mode}, {summary['steps']} DDIM steps, window {summary['window']}, actions "
              f"{summary['actions']}", file=sys.stdout)
    return 0


# ----------------------------------------------------------------------------- registration


def register(commands, bench) -> None:
    """Add `convert oasis`, `parity`, `bench parity-speed` and `oasis` to the `lsd` parser."""
    convert = commands.add_parser("convert", help="convert weights from other frameworks")
    kinds = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
    from_oasis = kinds.add_parser(
        "oasis", help="Oasis-500M DiT + ViT-VAE (torch state dicts) -> an lsd checkpoint",
        description="Convert Oasis-500M (oasis500m.safetensors) and its ViT-VAE "
                    "(vit-l-20.safetensors) into a checkpoint directory every lsd command reads.")
    from_oasis.add_argument("--dit", required=True, help="DiT weights (.safetensors or .pt)")
    from_oasis.add_argument("--vae", required=True, help="ViT-VAE weights (.safetensors or .pt)")
    from_oasis.add_argument("--out", required=True, help="checkpoint directory to create")
    from_oasis.add_argument("--config", default="oasis_500m",
                       help="DiT config (default oasis_500m)")
    from_oasis.add_argument("--json", action="store_true", help="print one JSON object")
    from_oasis.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="config overrides; vae.FIELD=value sets the VAE's shapes")
    from_oasis.set_defaults(run=_run_convert_oasis)

    parity = add_command(commands, "parity", _run_parity,
                         "JAX vs the PyTorch reference: forward, sampling trajectory, training "
                         "loss, streaming step; PASS/FAIL per check")
    parity.add_argument("--torch-checkpoint", default=None,
                        help="torch state dict with Oasis names (default: random weights)")
    parity.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    parity.add_argument("--json", action="store_true", help="print one JSON object")

    speed = add_command(bench, "parity-speed", _run_bench_parity_speed,
                        "per-frame streaming latency: jitted JAX step vs the PyTorch reference "
                        "(eager and torch.compile), same weights and thread count")
    speed.add_argument("--frames", type=int_in(1), default=50, help="frames timed")
    speed.add_argument("--warmup", type=int_in(0), default=5, help="untimed frames first")
    speed.add_argument("--batch", type=int_in(1), default=1, help="concurrent streams")
    speed.add_argument("--steps", type=step_count, default=None,
                       help="denoising steps per frame (default: the config's)")
    speed.add_argument("--threads", type=int_in(1), default=None,
                       help="torch threads (default: all CPUs, as XLA uses)")
    speed.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    speed.add_argument("--sequential", action="store_true",
                       help="time each implementation alone, one after the other (default: "
                            "frame by frame in turns, fairer on a shared machine)")
    speed.add_argument("--json", action="store_true", help="print one JSON object")

    world = commands.add_parser(
        "oasis", help="run an Oasis checkpoint as an action-conditioned world model",
        description="Generate video with Oasis from start frames and actions; mode 'recompute' "
                    "is exact Oasis (window recomputed every step), 'banded-cache' our "
                    "streaming cache.")
    world.add_argument("--checkpoint", required=True, help="directory from lsd convert oasis")
    world.add_argument("--start", required=True, help="start frames: a video or an image")
    world.add_argument("--start-frames", type=int_in(1), default=1,
                       help="how many start frames to take (default 1)")
    world.add_argument("--actions", default=None,
                       help="actions file (.npy [T, 25], or .pt); default all zeros")
    world.add_argument("--frames", type=int_in(2), default=32,
                       help="total frames, start frames included (default 32)")
    world.add_argument("--mode", default="recompute",
                       help="recompute (exact Oasis, default) or banded-cache")
    world.add_argument("--seed", type=int, default=0, help="noise seed")
    world.add_argument("--out", required=True, help="output video (.mp4)")
    world.add_argument("--json", action="store_true", help="print one JSON object")
    world.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="overrides of how the model runs, e.g. diffusion.sample_steps=5")
    world.set_defaults(run=_run_oasis)
