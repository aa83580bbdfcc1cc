"""The `lsd` command: the parser of every subcommand, and `main`, which runs one.

    lsd info --config tiny [key.path=value ...] [--json]
    lsd bench step --config tiny [--steps 3] [--frames 200] [--batch 1] [--json]
    python -m lsd_cli ...                   # the same command

Every command that takes `--config` also takes trailing `key.path=value` overrides of any config
field (`lsd info --config tiny model.depth=2`). `--config` is a file path, or the name of a config
shipped in the `lsd_configs` package (`--config tiny`). A bad config, frame, prompt or file prints
one line, `lsd: error: ...`, to stderr and exits 2, as argparse does for bad arguments.

Adding a command: in the module of its group (`COMMANDS`), write `_run_NAME(args) -> int` and
register it in the module's `register(commands, bench)`, with `lsd_cli.args.add_command` for a
command taking `--config` and the overrides, plus its own arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from lsd_cli import bench, data, evaluate, info, interop, kernels, platforms, serve, train
from lsd_jax.errors import USER_ERRORS

# The groups whose `register(commands, bench)` adds their commands after `lsd info` and
# `lsd bench`, in the order `lsd --help` lists them.
COMMANDS = (interop, evaluate, train, serve, data, kernels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsd", description="Live-Stream Diffusion in JAX: a causal video DiT, frame by frame.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info.register(commands)
    benchmarks = bench.register(commands)
    for module in COMMANDS:
        module.register(commands, benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lsd` with `argv` (default `sys.argv[1:]`); returns the exit status."""
    # Before any command starts JAX: no TPU platform (and no libtpu probing) unless one is
    # attached or JAX_PLATFORMS asks for it (lsd_cli/platforms.py).
    platforms.choose()
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
