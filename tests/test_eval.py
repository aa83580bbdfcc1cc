"""`lsd eval`: metrics, the endless drift path, reports, and the built-in demo model's figures.

The demo-model tests assert the shipped weights reach measured quality on held-out clips (figures
of EVAL.md, on fewer clips here), that they beat an untrained model and follow the prompt, that
3 steps are as good as 12, and that a short stream does not drift.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO_ROOT

from lsd_jax.config import load_config
from lsd_jax.errors import CheckpointError, ConfigError
from lsd_train import eval_data, eval_report, evaluate
from lsd_train.tasks import TASK_NAMES


def test_psnr_and_flicker_match_their_formulas():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = np.clip(target.astype(int) + rng.integers(-20, 21, target.shape), 0, 255).astype(
        np.uint8)
    mse = np.mean((target[0].astype(np.float64) - out[0]) ** 2)
    assert evaluate.frame_psnr(target[0], out[0]) == pytest.approx(10 * np.log10(255**2 / mse),
                                                                   rel=1e-9)
    assert evaluate.frame_psnr(target[0], target[0]) == 100.0
    # Flicker: a constant offset does not flicker; an offset alternating in sign by frame does.
    shifted = (target.astype(np.int32) // 2 + 10).astype(np.uint8)
    base = (target.astype(np.int32) // 2).astype(np.uint8)
    assert evaluate.flicker(shifted, base) == 0.0
    alternating = base.astype(np.int32) + np.array([0, 6, 0, 6, 0])[:, None, None, None]
    assert evaluate.flicker(alternating.astype(np.uint8), base) == pytest.approx(6.0)
    expected = np.mean(np.abs(np.diff(out.astype(np.float64), axis=0)
                              - np.diff(target.astype(np.float64), axis=0)))
    assert evaluate.flicker(out, target) == pytest.approx(expected, rel=1e-6)
    metrics = evaluate.clip_metrics(out, target)
    assert 20 < metrics["psnr"] < 30 and 0 < metrics["ssim"] < 1
    # Frame-to-frame change (the flicker ratio is the output's over the target's).
    assert metrics["change"] == pytest.approx(
        np.mean(np.abs(np.diff(out.astype(np.float64), axis=0))), rel=1e-6)
    assert metrics["target_change"] == pytest.approx(
        np.mean(np.abs(np.diff(target.astype(np.float64), axis=0))), rel=1e-6)
    assert evaluate.frame_change(np.repeat(target[:1], 4, axis=0)) == 0.0


def test_endless_path_is_periodic_smooth_and_heldout():
    cfg = load_config("lsd_configs/tiny.py")
    path = eval_data.EndlessPath(cfg, seed=3, period=120)
    frames = np.stack([path.frame(i) for i in range(121)])
    assert frames.shape == (121, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0], frames[120])
    np.testing.assert_array_equal(path.frame(5), path.frame(5 + 120 * 417))
    steps = np.abs(np.diff(frames.astype(np.int32), axis=0)).mean(axis=(1, 2, 3))
    # Moving every frame, never cutting: consecutive frames differ, by far less than unrelated
    # frames of the path do.
    far = np.abs(frames[0].astype(np.int32) - frames[60]).mean()
    assert steps.min() > 0.5 and steps.max() < far / 2
    with pytest.raises(ConfigError, match="period=4"):
        eval_data.EndlessPath(cfg, period=4)


def test_task_streams_frame_by_frame_equal_the_clip_tasks():
    """A task streamed one frame at a time (as `lsd eval drift` scores a stream) equals its clip
    form, the temporal task included."""
    from lsd_train.tasks import TASKS, task_named

    cfg = load_config("lsd_configs/tiny.py")
    path = eval_data.EndlessPath(cfg, seed=1, period=50)
    clip = np.stack([path.frame(i) for i in range(12)])
    trails = task_named("motion_trails").stream()
    np.testing.assert_array_equal(np.stack([trails(f) for f in clip]),
                                  task_named("motion_trails").fn(clip))
    assert np.abs(np.diff(clip.astype(int), axis=0)).mean() > 1  # the path moves
    sketch = task_named("pencil_sketch").stream()
    np.testing.assert_array_equal(sketch(clip[3]), TASKS[0].fn(clip[3:4])[0])
    with pytest.raises(ConfigError, match="'oil'"):
        task_named("oil")


def test_validation_and_heldout_clips_are_not_training_clips():
    """Held-out clips come from the held-out photographs; validation clips from the training
    photographs under other camera seeds; unseen clips from pictures no split uses: none equals a
    clip the training stream yields."""
    from lsd_train.data import ProceduralClips

    cfg = load_config("lsd_configs/demo.py")
    training = ProceduralClips(8, 64, 64, seed=cfg.data.shuffle_seed, split="train")
    train_clips = [training[i] for i in range(6)]
    for split in ("heldout", "validation", "unseen"):
        _, _, cond, target, prompts = eval_data.heldout_pairs(cfg, clips=3, frames=8,
                                                             tasks="sepia", split=split)
        assert cond.shape == (3, 8, 64, 64, 3) and prompts.shape == (3, cfg.model.prompt_dim)
        for clip in cond:
            assert all(np.abs(clip.astype(int) - c).mean() > 5 for c in train_clips)
    with pytest.raises(ConfigError, match="'test'"):
        eval_data.heldout_pairs(cfg, clips=1, frames=8, split="test")


def test_model_spec_errors_name_the_spec(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate.resolve_model(str(tmp_path / "none"))
    with pytest.raises(CheckpointError, match="'x' is not a step number"):
        evaluate.resolve_model(f"{tmp_path}@x")
    with pytest.raises(CheckpointError, match="not a training work directory"):
        evaluate.resolve_model(f"{tmp_path}@10")
    with pytest.raises(CheckpointError, match="names no model"):
        evaluate.resolve_model("label=")
    # `lsd eval`'s trailing overrides reach the stored config, checked
    assert evaluate.resolve_model("demo").cfg.diffusion.frame_noise == "fixed"  # as shipped
    fresh = evaluate.resolve_model("demo", ["diffusion.frame_noise=fresh"])
    assert fresh.cfg.diffusion.frame_noise == "fresh"
    with pytest.raises(ConfigError, match="diffusion.frame_noise='still'"):
        evaluate.resolve_model("demo", ["diffusion.frame_noise=still"])


def test_eval_command_checks_its_kind_and_overrides(capsys):
    """`lsd eval` names a misspelt kind; an override may stand where the kind would (quality) or
    follow it, and reaches the model's config, checked."""
    from lsd_cli.main import main

    assert main(["eval", "qualty"]) == 2
    assert main(["eval", "diffusion.frame_noise=still"]) == 2
    assert main(["eval", "drift", "--frames", "300", "diffusion.frame_noise=still"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lsd: error")]
    assert len(err) == 3, err
    assert "'qualty', expected one of quality, drift, paraphrase, real" in err[0]
    assert "diffusion.frame_noise='still'" in err[1] and "diffusion.frame_noise='still'" in err[2]


def test_report_sections_are_replaced_and_the_rest_kept(tmp_path):
    report = tmp_path / "EVAL.md"
    report.write_text("# Evaluation\n\nHand-written notes.\n")
    eval_report.replace_section(report, "quality", "table one")
    eval_report.replace_section(report, "drift", "drift table")
    eval_report.replace_section(report, "quality", "table two")
    text = report.read_text()
    assert text.startswith("# Evaluation\n\nHand-written notes.\n")
    assert "table two" in text and "table one" not in text and "drift table" in text
    assert text.index("table two") < text.index("drift table")


# ----------------------------------------------------------------------------- the demo model

# Measured on the shipped weights with these exact settings (1 held-out clip of 12 frames per
# task, seed 0): per-frame tasks 28.60 dB and temporal task 25.69 dB at 3 steps (28.52 / 24.80 at
# 12 steps), weakest task pencil_sketch 13.92 dB; the short drift stream (500 frames,
# period 100) 26.16 dB over its first period, 26.14 dB over its last.
# The bounds sit 0.15-0.6 dB under those figures (the clip-to-clip spread is large), so a changed
# model or pipeline that loses quality fails. EVAL.md has the full evaluation.
QUALITY_CLIPS, QUALITY_FRAMES = 1, 12
DEMO_PER_FRAME_PSNR_3 = 28.1
DEMO_TEMPORAL_PSNR_3 = 25.2
DEMO_TASK_PSNR_FLOOR = 13.4
DEMO_DRIFT_PSNR_FLOOR = 25.7
# Flicker ratio at 3 steps (the output's frame-to-frame change over the target's), same run:
# per-frame tasks 0.82 .. 1.13; motion trails 1.30 here, 1.16 over 4 clips x 24 frames (EVAL.md).
# Both are held to the 1.5 goal.
DEMO_FLICKER_RATIO_MAX = 1.5
DEMO_TEMPORAL_FLICKER_RATIO_MAX = 1.5
# Tasks whose held-out paraphrases the shipped model reads as their own task (margin over the
# nearest other task, 1 clip x 8 frames at 3 steps: 0.33 .. 26.4 dB) by more than 0.5 dB. Every
# paraphrase of every task reads as its task at these settings; the pencil sketch's "a black and
# white sketch" by 0.59 dB and the cartoon's "a cartoon" by 0.33 dB, so those two tasks are held to
# 0.2 dB (EVAL.md "Paraphrases", 2 clips x 12 frames: 18 of 18, "a black and white sketch" +0.01).
PARAPHRASED_TASKS = ("stylise", "thermal", "night_vision", "sepia", "negative", "edge_glow",
                     "motion_trails")


@pytest.fixture(scope="module")
def demo():
    return evaluate.resolve_model("demo")


@pytest.fixture(scope="module")
def demo_quality(demo):
    return evaluate.evaluate_quality(demo, steps_list=(3, 12), clips=QUALITY_CLIPS,
                                     frames=QUALITY_FRAMES, progress=False)


@pytest.mark.slow
def test_demo_model_restyles_heldout_clips(demo_quality):
    s = demo_quality["summary"]
    assert set(demo_quality["tasks"]) == set(TASK_NAMES)
    assert s[3]["per_frame_psnr"] >= DEMO_PER_FRAME_PSNR_3
    assert s[3]["temporal_psnr"] >= DEMO_TEMPORAL_PSNR_3
    for name, task in demo_quality["tasks"].items():
        assert task["steps"][3]["psnr"] >= DEMO_TASK_PSNR_FLOOR, name
        ratio = task["steps"][3]["flicker_ratio"]
        if name in evaluate.TEMPORAL_TASKS:
            assert ratio <= DEMO_TEMPORAL_FLICKER_RATIO_MAX, (name, ratio)
        else:
            assert ratio <= DEMO_FLICKER_RATIO_MAX, (name, ratio)


@pytest.mark.slow
def test_demo_model_three_steps_match_twelve(demo_quality):
    """Shortcut self-consistency: 3 steps are no more than 0.5 dB worse than 12 (on the demo
    model they are better)."""
    s = demo_quality["summary"]
    assert s[3]["per_frame_psnr"] >= s[12]["per_frame_psnr"] - 0.5
    assert s[3]["temporal_psnr"] >= s[12]["temporal_psnr"] - 0.5


@pytest.mark.slow
def test_demo_model_follows_the_prompt(demo):
    """The same held-out clips streamed under swapped prompts: each output is far closer to the
    target of the prompt it was given than to the other one."""
    names, prompts, cond, target, prompt_bp = eval_data.heldout_pairs(
        demo.cfg, clips=1, frames=8, tasks="sepia,negative")
    swapped = prompt_bp[::-1].copy()
    out = evaluate.stream_batch(demo, cond, swapped, steps=3)
    # Row 0 has the sepia clip under the negative prompt; row 1 the reverse.
    def psnr(target_thwc, out_thwc):
        return np.mean([evaluate.frame_psnr(t, o) for t, o in zip(target_thwc, out_thwc,
                                                                  strict=True)])

    np.testing.assert_array_equal(cond[0], cond[1])  # one source clip, two tasks
    for row, other in ((0, 1), (1, 0)):
        given, not_given = psnr(target[other], out[row]), psnr(target[row], out[row])
        assert given > not_given + 6.0, (names[row], given, not_given)


@pytest.mark.slow
def test_eval_cli_writes_quality_report(tmp_path, capsys):
    from lsd_cli.main import main

    report = tmp_path / "EVAL.md"
    report.write_text("# Notes kept\n")
    assert main(["eval", "--clips", "1", "--frames", "6", "--steps", "1,2", "--tasks",
                 "sepia,motion_trails", "--out", str(tmp_path / "out"), "--report",
                 str(report), "--no-progress", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload[0]["model"] == "demo" and set(payload[0]["tasks"]) == {"sepia",
                                                                          "motion_trails"}
    metrics = payload[0]["tasks"]["sepia"]["steps"]["2"]
    assert set(metrics) == {"psnr", "ssim", "flicker", "change", "target_change",
                            "flicker_ratio", "margin", "meets_floor"}
    assert 5 < metrics["psnr"] < 60
    assert metrics["flicker_ratio"] == pytest.approx(metrics["change"] / metrics["target_change"])
    assert payload[0]["summary"]["2"]["max_flicker_ratio"] == pytest.approx(max(
        t["steps"]["2"]["flicker_ratio"] for t in payload[0]["tasks"].values()))
    sepia = payload[0]["tasks"]["sepia"]
    assert sepia["floor"] == pytest.approx(min(40.0, max(sepia["baselines"].values()) + 1))
    assert metrics["margin"] == pytest.approx(metrics["psnr"] - sepia["floor"])
    assert metrics["meets_floor"] == (metrics["margin"] >= 0)
    # A colour map is close to exact for sepia (a 3x3 matrix, clipped).
    assert sepia["baselines"]["affine"] > 30 > sepia["baselines"]["copy_input"]
    assert json.loads((tmp_path / "out" / "quality.json").read_text()) == payload
    text = report.read_text()
    assert text.startswith("# Notes kept\n") and "| sepia | an old sepia photograph |" in text
    for name in ("quality_psnr.png", "quality_strips.jpg", "quality.json"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    # Without --out and --report nothing is written; a report needs --out.
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["eval", "--clips", "1", "--frames", "3", "--steps", "1", "--tasks", "negative",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(["eval", "--report", str(report)]) == 2
    assert "also give --out" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_drift_short_stream_does_not_degrade(tmp_path, capsys):
    """The CI version of `lsd eval drift`: 500 frames of a path with period 100; the last period
    (the same input frames as the first) is within 0.5 dB of the first."""
    from lsd_cli.main import main

    out = tmp_path / "out"
    assert main(["eval", "drift", "--frames", "500", "--period", "100", "--out", str(out),
                 "--report", str(tmp_path / "EVAL.md"), "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["same_input"] and result["frames"] == 500
    assert abs(result["delta_db"]) <= 0.5
    assert result["first_mean"] >= DEMO_DRIFT_PSNR_FLOOR
    psnr = np.load(out / "drift_demo_psnr.npz")["psnr"]
    assert psnr.shape == (500,) and np.isfinite(psnr).all()
    assert psnr[-100:].mean() - psnr[:100].mean() == pytest.approx(result["delta_db"], abs=1e-4)
    assert (out / "drift.png").stat().st_size > 1000
    assert main(["eval", "drift", "--frames", "150", "--period", "100"]) == 2


def test_drift_stopped_and_resumed_equals_an_uninterrupted_stream(tmp_path):
    """A drift stream checkpoints every `checkpoint_every` frames; resumed from a checkpoint (read
    back from disk), its per-frame PSNR equals the uninterrupted stream's bit for bit; a
    checkpoint of another run is refused."""
    from lsd_train import evaluate

    model = evaluate.resolve_model("demo")
    ckpts = []
    whole = evaluate.evaluate_drift(model, frames=250, period=100, progress=False,
                                    checkpoint_every=100, on_checkpoint=ckpts.append)
    assert [c["next_frame"] for c in ckpts] == [100, 200]
    path = tmp_path / "drift_checkpoint.npz"
    evaluate.save_drift_checkpoint(path, ckpts[0])
    resumed = evaluate.evaluate_drift(model, frames=250, period=100, progress=False,
                                      resume=evaluate.load_drift_checkpoint(path))
    np.testing.assert_array_equal(resumed["psnr"], whole["psnr"])
    assert np.isfinite(whole["psnr"]).all() and whole["psnr"].min() > 15
    # the command: `lsd eval drift --resume` picks up the checkpoint in --out, then removes it
    from lsd_cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    evaluate.save_drift_checkpoint(out / "drift_demo_checkpoint.npz", ckpts[1])
    assert main(["eval", "drift", "--frames", "250", "--period", "100", "--out", str(out),
                 "--resume", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(out / "drift_demo_psnr.npz")["psnr"], whole["psnr"])
    assert not (out / "drift_demo_checkpoint.npz").exists()
    assert main(["eval", "drift", "--frames", "250", "--period", "100", "--resume"]) == 2
    with pytest.raises(ConfigError, match="not of this run"):
        evaluate.evaluate_drift(model, frames=300, period=100, progress=False, resume=ckpts[0])
    fresh = evaluate.resolve_model("demo", ["diffusion.frame_noise=fresh"])
    with pytest.raises(ConfigError, match="not of this run"):
        evaluate.evaluate_drift(fresh, frames=250, period=100, progress=False, resume=ckpts[0])


def test_browser_page_offers_the_trained_prompts():
    """The page's prompt list is the demo model's training prompts, exactly."""
    import re

    from lsd_train.tasks import TASKS

    page = (REPO_ROOT / "lsd_serve" / "static" / "index.html").read_text()
    block = page.split('<datalist id="known-prompts">')[1].split("</datalist>")[0]
    assert re.findall(r'<option value="([^"]+)">', block) == [t.prompt for t in TASKS]


def test_progress_without_a_terminal_prints_tenths(capsys):
    """Logs and CI get one line per 10% (rich draws nothing there)."""
    from lsd_jax.progress import progress_bar

    with progress_bar("drift x", 50) as tracker:
        for _ in range(50):
            tracker.advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("drift x")]
    assert len(lines) == 10 and lines[0].startswith("drift x: 5/50 (10%)")
    assert lines[-1].startswith("drift x: 50/50 (100%)")
    # A resumed run: tenths of the remaining work, with the note (the loss).
    with progress_bar("train", 400, start=300) as tracker:
        for step in range(301, 401):
            tracker.update(step, f"loss {1 / step:.4f}")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train")]
    assert len(lines) == 10 and lines[0].startswith("train: 310/400 (78%)")
    assert lines[-1].startswith("train: 400/400 (100%)") and lines[-1].endswith("loss 0.0025")


def test_progress_without_a_terminal_prints_at_least_every_interval(capsys, monkeypatch):
    """A long run's log is not silent between tenths: a line whenever the interval has passed."""
    from lsd_jax import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    with progress.progress_bar("train", 20_000) as tracker:
        for step in range(1, 6):
            tracker.update(step, f"loss {step}")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train")]
    assert [line.split(" (")[0] for line in lines] == [f"train: {i}/20000" for i in range(1, 6)]


@pytest.mark.slow
def test_demo_model_reads_paraphrases_as_their_task(demo):
    """Every trained prompt's output is closer to its own task's target than to any other
    task's; so are the outputs of every held-out paraphrase (never trained on), by more than
    0.5 dB for the tasks in PARAPHRASED_TASKS."""
    from lsd_train.eval_paraphrase import evaluate_paraphrases

    result = evaluate_paraphrases(demo, steps=3, clips=1, frames=8, progress=False)
    for name, task in result["tasks"].items():
        assert task["prompt"]["margin"] > 0.2, (name, task["prompt"])
        for row in task["paraphrases"]:
            assert row["margin"] > (0.5 if name in PARAPHRASED_TASKS else 0.2), (name, row)



def test_real_clips_are_scikit_image_footage():
    """The faces clip starts on LFW face 40 enlarged to the frame, then pans smoothly; the GIF is
    scikit-image's 24 frames, cropped and resized."""
    import cv2
    from skimage.data import lfw_subset

    from lsd_train.eval_real import faces_clip, gif_clip

    faces = faces_clip((64, 64))
    assert faces.shape == (48, 64, 64, 3) and faces.dtype == np.uint8
    face40 = cv2.resize((lfw_subset()[40] * 255).astype(np.float32), (64, 64),
                        interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(faces[0, ..., 0], np.clip(face40, 0, 255).astype(np.uint8))
    assert (faces[..., 0] == faces[..., 2]).all()
    step = np.abs(np.diff(faces.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert 0 < step.max() < 40, step
    gif = gif_clip((64, 64))
    assert gif.shape == (24, 64, 64, 3) and gif.dtype == np.uint8 and gif.std() > 20


@pytest.mark.slow
def test_eval_real_restyles_real_video(demo, tmp_path, capsys):
    """`lsd eval real`: on scikit-image's GIF and LFW faces (never trained on) the demo model's
    sepia output is within reach of the sepia target (40.0 / 39.2 dB measured) and as steady as
    it (flicker ratio 1.02 / 1.01), and the report
    gets its table and both pictures."""
    from lsd_cli.main import main

    assert main(["eval", "real", "--prompt", "an old sepia photograph", "--prompt",
                 "a rainy day", "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "EVAL.md"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    for clip in ("gif", "faces"):
        sepia = result["clips"][clip]["prompts"]["an old sepia photograph"]
        assert sepia["task"] == "sepia" and sepia["psnr"] >= 38.7, (clip, sepia)
        assert 0.5 < sepia["flicker_ratio"] <= 1.5, (clip, sepia)
        other = result["clips"][clip]["prompts"]["a rainy day"]
        assert other["task"] is None and other["psnr"] is None and other["flicker_ratio"] > 0
        assert (tmp_path / "out" / f"real_{clip}.jpg").stat().st_size > 5000
    text = (tmp_path / "EVAL.md").read_text()
    assert "| an old sepia photograph |" in text and "n/a (no task)" in text
