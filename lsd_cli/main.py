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
import warnings
from pathlib import Path

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


_OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in (
    "lsd_cli", "lsd_jax", "lsd_train", "lsd_serve", "lsd_kernels", "lsd_configs"))


def _one_line_warnings(previous):
    """A `warnings.showwarning`: `lsd: warning: ...` on one line for a warning LSD's code raises
    (no source line); any other as `previous` shows it."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not str(Path(filename).resolve()).startswith(_OWN_CODE):
            return previous(message, category, filename, lineno, file, line)
        print(f"lsd: warning: {message}", file=file or sys.stderr)

    return show


def _quiet_exit() -> None:
    """Nothing more from background threads' logs or unraisable exceptions once the error line is
    out: the writer threads of a save that failed (a full disk), collected as the process exits,
    would otherwise print their copies of the same error after it."""
    import logging

    for name in ("asyncio", "absl"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda _: None


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
    # A damaged video is the reader's to report (a warning naming it), not FFmpeg's raw
    # `[mpeg4 @ 0x...]` lines; LSD's own warnings are one line each, like its errors.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.run(args)
    except USER_ERRORS as err:
        message = str(err) if not isinstance(err, FileNotFoundError) else (
            f"{err.strerror}: {err.filename}")
        print(f"lsd: error: {message}", file=sys.stderr)
        if argv is None:  # the process's own command: it ends here
            _quiet_exit()
        return 2
    except BrokenPipeError:
        # The reader went away (`lsd info | head`); send the rest nowhere instead of a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
