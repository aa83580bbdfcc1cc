"""What the `lsd` commands parse alike: argparse `type=` callables, and `--config` with its
trailing `key.path=value` overrides (`add_command`, `config_from_args`).

    parser.add_argument("--frames", type=int_in(1))            # an int >= 1
    parser.add_argument("--port", type=int_in(0, 65535))       # an int in 0..65535
    parser.add_argument("--steps", type=step_count)            # denoising steps per frame
    parser.add_argument("--batch", type=int_list(1))           # "4,1,2" -> (1, 2, 4)

A bad value is argparse's one-line error naming the argument, the value and what is expected, e.g.
`lsd stream: error: argument --max-frames: 0 is not >= 1`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lsd_jax.config import MAX_SAMPLE_STEPS, Config, load_config, resolve_config

CONFIG_HELP = "config file (lsd_configs/tiny.py) or packaged config name (tiny)"


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in `[low, high]` (`high=None`: no upper bound), with an error
    naming the value and the range expected otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is not {bound}")
        return value

    return parse


def int_list(low: int = 1, high: int | None = None) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated ints, each in `[low, high]`, returned sorted and unique
    (`"4,1,2,1"` -> `(1, 2, 4)`)."""
    parse_one = int_in(low, high)

    def parse(text: str) -> tuple[int, ...]:
        parts = [s.strip() for s in text.split(",") if s.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} holds no integers, expected "
                                             "comma-separated integers such as 1,2,4")
        try:
            values = {parse_one(s) for s in parts}
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
        return tuple(sorted(values))

    return parse


# Denoising steps per frame, the range `diffusion.sample_steps` takes.
step_count = int_in(1, MAX_SAMPLE_STEPS)
step_counts = int_list(1, MAX_SAMPLE_STEPS)


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of `--config` (a file or a packaged config's name) with the trailing
    `key.path=value` overrides."""
    return load_config(resolve_config(args.config), args.overrides)


def add_command(subparsers, name: str, run: Callable[[argparse.Namespace], int], help: str, *,
                demo_default: bool = False) -> argparse.ArgumentParser:
    """A subcommand taking `--config` and trailing `key.path=value` overrides. `--config` is
    required, or with `demo_default` may be left out (None): the command then takes the built-in
    demo model's config."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--config", required=not demo_default, default=None,
                        help=CONFIG_HELP + ("; default: the built-in demo model's"
                                            if demo_default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override a config field, e.g. model.depth=2")
    parser.set_defaults(run=run)
    return parser
