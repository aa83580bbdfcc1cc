"""`lsd info`: what a config builds, from its shapes alone (no weights allocated).

    lsd info --config tiny [key.path=value ...] [--json]
    lsd info [key.path=value ...]           # the built-in demo model's config
"""

from __future__ import annotations

import argparse
import json

from lsd_cli.args import add_command, config_from_args
from lsd_cli.output import print_rows, si
from lsd_jax.config import Config
from lsd_jax.demo import demo_model_dir
from lsd_jax.flops import dit_flops, streamed_frame_flops
from lsd_jax.kernels import entry


def describe(cfg: Config) -> dict:
    """Parameter count (from shapes only: no weights allocated), FLOPs, tokens, window, steps."""
    from lsd_jax.model import abstract_model, count_params  # lazy: Flax, for this command only

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


def _config(args: argparse.Namespace) -> tuple[Config, str]:
    """The config `--config` names with the overrides, else the built-in demo model's (its
    stored config, the overrides applied); and where it came from."""
    if args.config is not None:
        return config_from_args(args), args.config
    from lsd_jax.checkpoint import load_config_from  # lazy: Flax, for the demo model's config

    directory = demo_model_dir()
    return load_config_from(directory, args.overrides), str(directory)


def _run_info(args: argparse.Namespace) -> int:
    cfg, source = _config(args)
    info = describe(cfg)
    if args.json:
        print(json.dumps({"config": source, **info}, indent=2))
        return 0
    gh, gw = info["grid"]
    shown = source if args.config is not None else f"built-in demo model {source}"
    print_rows([
        ("config", f"{info['name']} ({shown})"),
        ("parameters", f"{info['params_total']:,} total, {info['params_trainable']:,} trainable"),
        ("frame", f"{'x'.join(map(str, info['frame_shape']))} model space, codec {cfg.codec}"),
        ("tokens per frame", f"{info['tokens_per_frame']} ({gh}x{gw} grid of "
                             f"{info['patch_size']}x{info['patch_size']} patches)"),
        ("window", f"{info['window']} frames ({info['cache_frames']} cached per layer)"),
        ("steps", f"{info['steps']} denoising passes + 1 cache-write pass per frame"),
        ("FLOPs per pass", f"{info['flops_per_pass']:,} ({si(info['flops_per_pass'], 'FLOP')}):"
                           f" one frame, temporal attention over {info['window']} frames"),
        ("FLOPs per frame", f"{info['flops_per_frame']:,} ({si(info['flops_per_frame'], 'FLOP')})"
                            f": {info['steps']} denoising passes + the cache-write pass"),
    ])
    return 0


def register(commands) -> None:
    """Add `lsd info`."""
    info = add_command(commands, "info", _run_info,
                       "parameters, FLOPs, tokens per frame, window and steps of a config",
                       demo_default=True)
    info.add_argument("--json", action="store_true", help="print one JSON object")
