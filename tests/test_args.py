"""The argparse types of `lsd_cli.args`, alone and as the `lsd` commands use them."""

from __future__ import annotations

import argparse

import pytest

from lsd_cli.args import int_in, int_list, step_count, step_counts
from lsd_cli.main import build_parser, main


def test_int_in_bounds_and_messages():
    assert int_in(1)("1") == 1 and int_in(1)("123456") == 123456
    assert int_in(0, 65535)("0") == 0 and int_in(0, 65535)("65535") == 65535
    assert int_in(-3, 3)("-3") == -3
    for parse, text, message in [(int_in(1), "0", "0 is not >= 1"),
                                 (int_in(1), "-5", "-5 is not >= 1"),
                                 (int_in(0, 65535), "65536", "65536 is not in 0..65535"),
                                 (int_in(1), "2.5", "'2.5' is not an integer"),
                                 (int_in(1), "ten", "'ten' is not an integer")]:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse(text)
        assert str(info.value) == message


def test_int_list_sorted_unique_and_checked():
    assert int_list(1)("4,1,2,1") == (1, 2, 4)
    assert int_list(1)(" 8 , 3 ,") == (3, 8)
    assert step_counts("12,1,3") == (1, 3, 12)
    for parse, text, message in [
            (int_list(1), "1,0", "'1,0': 0 is not >= 1"),
            (int_list(1), "1,x", "'1,x': 'x' is not an integer"),
            (step_counts, "3,200", "'3,200': 200 is not in 1..128"),
            (int_list(1), ",", "',' holds no integers, expected comma-separated integers such "
                               "as 1,2,4")]:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse(text)
        assert str(info.value) == message


def test_step_count_is_the_config_range():
    assert step_count("1") == 1 and step_count("128") == 128
    with pytest.raises(argparse.ArgumentTypeError, match=r"^129 is not in 1\.\.128$"):
        step_count("129")


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


STREAM = ["stream", "--input", "demo", "--prompt", "x", "--out", "o.mp4"]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_stream_max_frames_must_be_positive(capsys, value):
    assert _parse_error(capsys, [*STREAM, "--max-frames", value]) == (
        f"lsd stream: error: argument --max-frames: {value} is not >= 1")


@pytest.mark.parametrize("argv, line", [
    (["bench", "train", "--config", "tiny", "--warmup", "-1"],
     "lsd bench train: error: argument --warmup: -1 is not >= 0"),
    (["bench", "train", "--config", "tiny", "--steps", "0"],
     "lsd bench train: error: argument --steps: 0 is not >= 1"),
    (["eval", "--steps", "3,0"],
     "lsd eval: error: argument --steps: '3,0': 0 is not in 1..128"),
    (["eval", "--clips", "0"], "lsd eval: error: argument --clips: 0 is not >= 1"),
    (["export", "--out", "m.lsdx", "--batch", "1,two"],
     "lsd export: error: argument --batch: '1,two': 'two' is not an integer"),
    (["export", "--out", "m.lsdx", "--steps", "1,129"],
     "lsd export: error: argument --steps: '1,129': 129 is not in 1..128"),
    (["serve", "--port", "70000"], "lsd serve: error: argument --port: 70000 is not in 0..65535"),
    (["serve", "--max-sessions", "0"],
     "lsd serve: error: argument --max-sessions: 0 is not >= 1"),
    (["bench", "serve", "--warmup", "-2"],
     "lsd bench serve: error: argument --warmup: -2 is not >= 0"),
    (["bench", "long-stream", "--reps", "0"],
     "lsd bench long-stream: error: argument --reps: 0 is not >= 1"),
    (["bench", "step", "--config", "tiny", "--peak-sizes", "512,0"],
     "lsd bench step: error: argument --peak-sizes: '512,0': 0 is not >= 1"),
    (["bench", "parity-speed", "--config", "tiny", "--steps", "0"],
     "lsd bench parity-speed: error: argument --steps: 0 is not in 1..128"),
    (["oasis", "--checkpoint", "c", "--start", "s.png", "--out", "o.mp4", "--frames", "1"],
     "lsd oasis: error: argument --frames: 1 is not >= 2"),
])
def test_commands_reject_out_of_range_integers(capsys, argv, line):
    assert _parse_error(capsys, argv) == line


def test_commands_parse_lists_and_bounds():
    parser = build_parser()
    assert parser.parse_args(["eval", "--steps", "12,3,1,3"]).steps == (1, 3, 12)
    assert parser.parse_args(["export", "--out", "m.lsdx", "--batch", "4,1"]).batch == (1, 4)
    args = parser.parse_args([*STREAM, "--max-frames", "1", "--steps", "128"])
    assert args.max_frames == 1 and args.steps == 128
    assert parser.parse_args(["serve", "--port", "0"]).port == 0
    assert parser.parse_args(["bench", "train", "--config", "tiny", "--warmup", "0"]).warmup == 0
