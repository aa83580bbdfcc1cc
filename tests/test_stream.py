"""`lsd stream`: the packaged demo clip, prompt schedules, side-by-side output, the same stream from
an exported artifact, and one-line errors for bad inputs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lsd_cli.main import main
from lsd_jax.errors import StreamInputError
from lsd_serve.stream import demo_clip, parse_prompt_schedule, prompt_at


def read_video(path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def test_prompt_schedule():
    assert parse_prompt_schedule(None, "0:pencil sketch,120:thermal") == [
        (0, "pencil sketch"), (120, "thermal")]
    schedule = parse_prompt_schedule("oil paint", "30: ink ,90:neon")
    assert schedule == [(0, "oil paint"), (30, "ink"), (90, "neon")]
    assert [prompt_at(schedule, f) for f in (0, 29, 30, 89, 90, 10_000)] == [
        "oil paint", "oil paint", "ink", "ink", "neon", "neon"]
    assert parse_prompt_schedule("a", "0:b") == [(0, "b")]
    for prompt, text, message in [(None, "5:ink", "no prompt for frame 0"),
                                  (None, None, "no prompt for frame 0"),
                                  ("a", "ten:ink", "entry 'ten:ink', expected FRAME:PROMPT"),
                                  ("a", "9:", "entry '9:'"),
                                  ("a", "9:x,4:y", r"frames \[0, 9, 4\], expected strictly")]:
        with pytest.raises(StreamInputError, match=message):
            parse_prompt_schedule(prompt, text)


def test_demo_clip_is_packaged():
    """The clip ships with the package: under 1 MB, 192 frames of 192x144 at 24 fps."""
    path = demo_clip()
    assert path.is_file() and path.stat().st_size < 1_000_000
    frames = read_video(path)
    assert len(frames) == 192 and frames[0].shape == (144, 192, 3)
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) == 24
    assert np.abs(frames[0].astype(int) - frames[100].astype(int)).mean() > 20


@pytest.mark.slow
def test_stream_demo_side_by_side_json(tmp_path, capsys):
    """`lsd stream --input demo` with a schedule, side by side, and no model named: the built-in
    demo model streams 24 frames of 128x64, the left half the model's input (the clip cropped
    and scaled), the right half its output, and the JSON says the model is trained."""
    out = tmp_path / "demo.mp4"
    assert main(["stream", "--input", "demo", "--prompt-schedule", "0:pencil sketch,12:thermal",
                 "--out", str(out), "--side-by-side", "--max-frames", "24", "--steps", "2",
                 "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "built-in demo model" in captured.err and "UNTRAINED" not in captured.err
    assert not result["untrained"] and result["frames"] == 24 and result["steps"] == 2
    assert result["prompt_schedule"] == [[0, "pencil sketch"], [12, "thermal"]]
    assert 0 < result["ms_per_frame"]["p50"] <= result["ms_per_frame"]["p99"]
    assert result["fps"] > 0 and result["first_frame_s"] > 0
    frames = read_video(out)
    assert len(frames) == 24 and frames[0].shape == (64, 128, 3)
    from lsd_jax.codec import resize_and_crop

    clip = read_video(demo_clip())[:24]
    for frame, source in zip(frames, clip, strict=True):
        left, right = frame[:, :64].astype(int), frame[:, 64:].astype(int)
        # mp4v at 64 pixels is lossy (mean errors of 5 to 15 levels beside the restyled output
        # half): the left half is the scaled input within that, and far from the output half.
        input_err = np.abs(left - resize_and_crop(source, 64, 64)).mean()
        assert input_err < 20 and 4 * input_err < np.abs(left - right).mean()


@pytest.mark.slow
def test_stream_from_artifact_equals_the_model_in_process(tmp_path, capsys):
    """A video file of another size (cropped and scaled on the way in) streamed through an
    exported artifact gives the same frames as the same model run in process: the built-in demo
    model for both, as neither command names a model; and `--config tiny` is an untrained
    model, said so."""
    rng = np.random.default_rng(3)
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (150, 100))
    for small in rng.integers(0, 256, (10, 10, 15, 3), dtype=np.uint8):
        writer.write(cv2.resize(small, (150, 100), interpolation=cv2.INTER_CUBIC))
    writer.release()
    artifact = tmp_path / "tiny.lsdx"
    assert main(["export", "--out", str(artifact), "--platforms", "cpu", "--steps", "1",
                 "--seed", "4"]) == 0
    common = ["--input", str(video), "--prompt", "ink", "--steps", "1", "--seed", "4",
              "--no-progress"]
    assert main(["stream", "--artifact", str(artifact), "--out", str(tmp_path / "a.mp4"),
                 *common]) == 0
    assert main(["stream", "--out", str(tmp_path / "m.mp4"), *common]) == 0
    printed = capsys.readouterr().out
    assert printed.count("10 frames") == 2 and "UNTRAINED" not in printed
    assert main(["stream", "--config", "tiny", "--out", str(tmp_path / "u.mp4"), *common]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    from_artifact, in_process = read_video(tmp_path / "a.mp4"), read_video(tmp_path / "m.mp4")
    assert len(from_artifact) == len(in_process) == 10
    for a, b in zip(from_artifact, in_process, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stream_bad_input_is_one_line(tmp_path, capsys):
    assert main(["stream", "--input", str(tmp_path / "none.mp4"), "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    assert main(["stream", "--input", str(not_video), "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    assert main(["stream", "--input", "demo", "--prompt-schedule", "3:x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lsd: error: ")]
    assert len(errors) == 3, err
    assert "none.mp4" in errors[0] and "no such file" in errors[0]
    assert "notes.mp4" in errors[1]
    assert "no prompt for frame 0" in errors[2]


def test_stream_overrides_of_a_stored_model(tmp_path, capsys):
    """Overrides after the demo model (no --config) change how it runs and are checked; with an
    exported artifact they are refused, not ignored."""
    out = str(tmp_path / "o.mp4")
    assert main(["stream", "--input", "demo", "--prompt", "x", "--out", out, "--max-frames", "2",
                 "diffusion.frame_noise=bogus"]) == 2
    assert main(["stream", "--artifact", str(tmp_path / "m.lsdx"), "--input", "demo",
                 "--prompt", "x", "--out", out, "diffusion.frame_noise=fixed"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lsd: error")]
    assert len(err) == 2, err
    assert "diffusion.frame_noise='bogus'" in err[0] and "'fixed'" in err[0]
    assert "diffusion.frame_noise=fixed with --artifact" in err[1]
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_stream_compiles_the_step_once(tmp_path, compile_log):
    """The demo model's step compiles on the first frame only: the state it returns has the
    placement of the state it was given, so frames 2..5 reuse the compiled step."""
    assert main(["stream", "--input", "demo", "--prompt", "a pencil sketch", "--out",
                 str(tmp_path / "o.mp4"), "--max-frames", "5", "--steps", "1",
                 "--no-progress"]) == 0
    assert compile_log.count("jit(step)") == 1, compile_log


def test_stream_arguments_checked_before_streaming(tmp_path, capsys):
    """Steps outside 1..128, an output OpenCV cannot write and an output that is the input are
    one-line errors naming the value, before any model is loaded; the input is left intact."""
    for steps in ("200", "0"):
        with pytest.raises(SystemExit) as info:
            main(["stream", "--input", "demo", "--prompt", "x", "--out", str(tmp_path / "o.mp4"),
                  "--steps", steps])
        assert info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"lsd stream: error: argument --steps: {steps} is not in 1..128")
    video = _video(tmp_path / "in.mp4", 4)
    before = video.read_bytes()
    assert main(["stream", "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "out.txt")]) == 2
    assert main(["stream", "--input", str(video), "--prompt", "x", "--out", str(video)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lsd: error: output {str(tmp_path / 'out.txt')!r}: extension '.txt', "
                   "expected one of .mp4, .m4v, .mov, .mkv, .avi",
                   f"lsd: error: output {str(video)!r} is the input file: writing it would "
                   "overwrite the input; expected another path"]
    assert video.read_bytes() == before and not (tmp_path / "out.txt").exists()


def _video(path, frames: int):
    rng = np.random.default_rng(5)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (64, 64))
    for small in rng.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8):
        writer.write(cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR))
    writer.release()
    return path


SMALL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=1"]


@pytest.mark.slow
def test_stream_damaged_inputs(tmp_path, capfd):
    """A video whose middle is overwritten streams the frames that decode, with a warning giving
    both counts; one that gives no frame leaves no output file; a checkpoint whose weight data is
    overwritten is one `lsd: error:` line (no traceback, no closed-event-loop noise)."""
    data = _video(tmp_path / "clip.mp4", 48).read_bytes()
    rng = np.random.default_rng(0)
    middle = bytearray(data)
    middle[len(data) // 2 : len(data) // 2 + 2000] = rng.integers(0, 256, 2000, np.uint8).tobytes()
    (tmp_path / "middle.mp4").write_bytes(middle)
    readable = len(read_video(tmp_path / "middle.mp4"))
    assert 0 < readable < 48
    start = data.find(b"mdat") + 4
    (tmp_path / "none.mp4").write_bytes(data[:start] + bytes(len(data) // 2)
                                        + data[start + len(data) // 2 :])
    assert read_video(tmp_path / "none.mp4") == []
    common = ["--prompt", "x", "--config", "tiny", *SMALL, "--no-progress"]

    assert main(["stream", "--input", str(tmp_path / "middle.mp4"),
                 "--out", str(tmp_path / "a.mp4"), *common]) == 0
    err = capfd.readouterr().err
    assert (f"lsd stream: warning: input {str(tmp_path / 'middle.mp4')!r}: read {readable} of "
            "the 48 frames its container lists") in err
    assert len(read_video(tmp_path / "a.mp4")) == readable

    assert main(["stream", "--input", str(tmp_path / "none.mp4"),
                 "--out", str(tmp_path / "b.mp4"), *common]) == 2
    assert "gave no frames (no output written)" in capfd.readouterr().err
    assert not (tmp_path / "b.mp4").exists()

    from lsd_jax.checkpoint import save_model
    from lsd_jax.config import load_config
    from lsd_jax.resolve import untrained_model

    cfg = load_config("lsd_configs/tiny.py", SMALL)
    model_dir = save_model(tmp_path / "model", cfg, untrained_model(cfg))
    damaged = list((model_dir / "params").glob("ocdbt.process_0/d/*"))
    assert damaged
    for path in damaged:
        path.write_bytes(rng.integers(0, 256, path.stat().st_size, np.uint8).tobytes())
    capfd.readouterr()
    assert main(["stream", "--checkpoint", str(model_dir), "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "c.mp4"), "--no-progress"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err[:20]
    assert err[0].startswith(f"lsd: error: {str(model_dir)!r}: weights cannot be read "
                             "(damaged files?)"), err[0]


def test_make_demo_clip_help_only_prints_help(tmp_path, repo_root):
    """`lsd data demo-clip --help` prints its usage and leaves the packaged clip alone; `--out`
    writes the clip elsewhere."""
    import subprocess
    import sys

    before = demo_clip().stat().st_mtime_ns
    shown = subprocess.run([sys.executable, "-m", "lsd_cli", "data", "demo-clip", "--help"],
                           cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: lsd data demo-clip")
    assert demo_clip().stat().st_mtime_ns == before
    made = subprocess.run([sys.executable, "-m", "lsd_cli", "data", "demo-clip", "--out",
                           str(tmp_path / "clip.mp4")], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert demo_clip().stat().st_mtime_ns == before
    assert len(read_video(tmp_path / "clip.mp4")) == 192
