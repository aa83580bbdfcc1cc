"""Failures a user meets in one line (`lsd: error: ...`, exit 2) or a clear refusal, instead of a
traceback, silence or a wrong result: drift checkpoints of other weights or damaged, latent
samples, codec shapes and output paths, damaged latent shards, warm starts checked before the
compile, duplicated export platforms, damaged weights, damaged checkpoints and videos."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from lsd_jax.checkpoint import save_model
from lsd_jax.config import apply_overrides, load_config
from lsd_jax.errors import ConfigError, DataError
from lsd_jax.resolve import untrained_model
from lsd_jax.vae import OasisVAE, VAEConfig, save_vae

SMALL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=1"]
SMALL_VAE = VAEConfig(frame_height=32, frame_width=32, patch_size=8, latent_dim=4, enc_dim=32,
                      enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)
LATENT_DIT = ["codec=oasis_vae", "model.frame_height=4", "model.frame_width=4",
              "model.channels=4", "model.cond_channels=4", "model.patch_size=1",
              "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
              "model.prompt_dim=16", "data.clip_frames=4", "train.batch_size=4"]
TINY_TRAIN = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
              "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
              "data.clip_frames=4", "train.batch_size=4", "train.warmup_steps=2",
              "train.sample_every=0"]


def _small_model(directory: Path, seed: int) -> Path:
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    return save_model(directory, cfg, untrained_model(cfg, seed=seed))


def _error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- drift


def test_drift_checkpoint_of_other_weights_at_the_same_path_is_refused(tmp_path, capsys):
    """A drift checkpoint records the weights' sha256: other weights at the same path are
    refused (one line naming the weights), not continued into one curve of two models."""
    from lsd_cli.main import main
    from lsd_train import evaluate

    path = tmp_path / "m"
    _small_model(path, 1)
    first = evaluate.resolve_model(str(path))
    ckpts = []
    evaluate.evaluate_drift(first, frames=16, period=8, steps=1, progress=False,
                            checkpoint_every=8, on_checkpoint=ckpts.append)
    out = tmp_path / "out"
    out.mkdir()
    evaluate.save_drift_checkpoint(out / "drift_m_checkpoint.npz", ckpts[0])
    import shutil

    shutil.rmtree(path)
    _small_model(path, 2)  # other weights, the same spec
    second = evaluate.resolve_model(str(path))
    with pytest.raises(ConfigError, match=r"not of this run: its weights=sha256:[0-9a-f]{12}\.\.\. "
                                          r"\(this run: sha256:[0-9a-f]{12}\.\.\.\); the model's "
                                          "weights changed since it was written"):
        evaluate.evaluate_drift(second, frames=16, period=8, steps=1, progress=False,
                                resume=evaluate.load_drift_checkpoint(
                                    out / "drift_m_checkpoint.npz"))
    assert main(["eval", "drift", "--checkpoint", f"m={path}", "--frames", "16", "--period", "8",
                 "--steps", "1", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = _error_lines(capsys)
    assert err[-1].startswith("lsd: error: drift checkpoint is not of this run: its weights="), err
    assert (out / "drift_m_checkpoint.npz").is_file()  # kept for the model that wrote it


def test_drift_resume_says_when_it_starts_over_and_damaged_checkpoints_are_one_line(tmp_path,
                                                                                 capsys):
    from lsd_cli.main import main

    model = _small_model(tmp_path / "m", 3)
    out = tmp_path / "out"
    drift = ["eval", "drift", "--checkpoint", f"m={model}", "--frames", "16", "--period", "8",
             "--steps", "1", "--out", str(out), "--resume", "--no-progress"]
    assert main(drift) == 0
    err = _error_lines(capsys)
    assert (f"m: --resume: no checkpoint {out / 'drift_m_checkpoint.npz'}; starting from "
            "frame 0") in err, err

    from lsd_train import evaluate

    ckpts = []
    evaluate.evaluate_drift(evaluate.resolve_model(f"m={model}"), frames=16, period=8, steps=1,
                            progress=False, checkpoint_every=8, on_checkpoint=ckpts.append)
    ckpt = out / "drift_m_checkpoint.npz"
    evaluate.save_drift_checkpoint(ckpt, ckpts[0])
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])
    assert main(drift) == 2
    assert _error_lines(capsys) == [
        f"lsd: error: drift checkpoint {str(ckpt)!r} is damaged (truncated or altered: "
        "BadZipFile: File is not a zip file): delete it to start again"]
    ckpt.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(len(whole))))
    assert main(drift) == 2
    assert _error_lines(capsys) == [
        f"lsd: error: drift checkpoint {str(ckpt)!r} is not an npz archive (damaged, or not "
        "written by lsd eval drift): delete it to start again"]


# ----------------------------------------------------------------------------- latent data


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A small random VAE and a latent dataset of 8 clips encoded by it."""
    from lsd_jax.codec import load_codec
    from lsd_train.latents_writer import encode_dataset

    root = tmp_path_factory.mktemp("latent")
    save_vae(root / "vae", SMALL_VAE, OasisVAE(SMALL_VAE, rngs=nnx.Rngs(0)))
    cfg = apply_overrides(load_config(REPO_ROOT / "lsd_configs" / "tiny.py"), LATENT_DIT)
    encode_dataset(cfg, load_codec(root / "vae"), root / "data", clips=8)
    return root


def _latent_cfg(root: Path, data: Path, *extra: str):
    return apply_overrides(load_config(REPO_ROOT / "lsd_configs" / "tiny.py"),
                           [*LATENT_DIT, "data.source=latents", f"data.latent_dir={data}",
                            f"data.codec_dir={root / 'vae'}", *extra])


def test_latent_run_samples_through_its_codec(latents, tmp_path, capsys):
    """A latent model's training sample (made every `train.sample_every` steps, 500 by default)
    streams the held-out clip at the codec's frame size through the codec; without
    `data.codec_dir` there is no sample, said once."""
    from lsd_train.metrics import Metrics

    cfg = _latent_cfg(latents, latents / "data")
    params = nnx.to_pure_dict(nnx.state(untrained_model(cfg, seed=1), nnx.Param))
    path = Metrics(tmp_path / "run", cfg, progress=False).sample(500, params)
    assert path == tmp_path / "run" / "samples" / "step_0000500.mp4"
    video = cv2.VideoCapture(str(path))
    ok, frame = video.read()
    assert ok and frame.shape == (32, 3 * 32, 3)  # input | output | target at the codec's size
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    no_codec = apply_overrides(cfg, ["data.codec_dir="])
    metrics = Metrics(tmp_path / "bare", no_codec, progress=False)
    assert metrics.sample(500, params) is None and metrics.sample(1000, params) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lsd train: no samples: codec='oasis_vae' decodes latents to frames only "
                   "with data.codec_dir=DIR"], err


def test_random_codec_refuses_bad_shapes_and_outputs_in_one_line(tmp_path, capsys):
    from lsd_cli.main import main

    out = tmp_path / "vae"
    cases = [(["vae.frame_height=0"], "vae.frame_height=0, expected a number > 0"),
             (["vae.latent_dim=-1"], "vae.latent_dim=-1, expected a number > 0"),
             (["vae.enc_depth=0"], "vae.enc_depth=0, expected a number > 0")]
    for fields, message in cases:
        assert main(["data", "random-codec", "--out", str(out), *fields]) == 2
        assert _error_lines(capsys) == [f"lsd: error: {message}"]
        assert not out.exists()
    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    small = [f"vae.{k}={v}" for k, v in vars(SMALL_VAE).items()]
    assert main(["data", "random-codec", "--out", str(afile), *small]) == 2
    assert _error_lines(capsys) == [f"lsd: error: {str(afile.absolute())!r} is a file, expected "
                                    "a directory to write the VAE into"]
    assert afile.read_text() == "keep me"


def test_encode_refuses_an_existing_file_or_folder_as_its_output(latents, tmp_path, capsys):
    from lsd_cli.main import main

    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    full = tmp_path / "full"
    (full / "notes").mkdir(parents=True)
    encode = ["data", "encode", "--config", "lsd_configs/tiny.py", "--codec-dir",
              str(latents / "vae"), "--clips", "2", *LATENT_DIT]
    assert main([*encode, "--out", str(afile)]) == 2
    assert main([*encode, "--out", str(full)]) == 2
    assert main([*encode, "--out", str(latents / "data")]) == 2
    assert _error_lines(capsys) == [
        f"lsd: error: --out {str(afile)!r} is a file, expected a new directory for the dataset",
        f"lsd: error: --out {str(full)!r} exists and is not empty, expected a new directory for "
        "the dataset",
        f"lsd: error: {str(latents / 'data')!r} already holds a latent dataset (latents.json)"]
    assert afile.read_text() == "keep me" and os.listdir(full) == ["notes"]


def test_damaged_latent_shard_is_named_in_one_line(latents, tmp_path, capsys):
    """A truncated shard (refused on opening) and a shard whose records are altered (refused at
    the record) are each a `DataError` naming the shard; `lsd train` says so in one line."""
    import shutil

    from lsd_cli.main import main
    from lsd_train.latents import LatentClips

    shard = "clips-00000.array_record"
    truncated, altered = tmp_path / "truncated", tmp_path / "altered"
    for damaged in (truncated, altered):
        shutil.copytree(latents / "data", damaged)
    data = (latents / "data" / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    rng = random.Random(1)
    (altered / shard).write_bytes(data[:2000] + bytes(rng.randrange(256) for _ in range(4000))
                                  + data[6000:])
    with pytest.raises(DataError, match=f"^latent shard {str(truncated / shard)!r} cannot be "
                                        "read: damaged or truncated"):
        LatentClips(_latent_cfg(latents, truncated))
    clips = LatentClips(_latent_cfg(latents, altered))
    with pytest.raises(DataError, match=rf"^latent shard {str(altered / shard)!r} \(record 0\) "
                                        "cannot be read: damaged or truncated \\(Corrupted "
                                        "Riegeli/records file"):
        clips[0]
    train = ["train", "--config", "lsd_configs/tiny.py", "--no-progress", *LATENT_DIT,
             "data.source=latents", f"data.codec_dir={latents / 'vae'}", "train.steps=2",
             "train.sample_every=0"]
    for damaged in (truncated, altered):
        assert main([*train, f"data.latent_dir={damaged}",
                     "--workdir", str(tmp_path / f"run_{damaged.name}")]) == 2
        err = _error_lines(capsys)
        assert err[-1].startswith(f"lsd: error: latent shard {str(damaged / shard)!r}"), err
        assert not any(line.startswith(("Traceback", "  File")) for line in err), err


# ----------------------------------------------------------------------------- warm starts


def test_init_from_is_checked_before_compiling_and_takes_a_work_directory(tmp_path, capsys,
                                                                          monkeypatch):
    from lsd_cli.main import main
    from lsd_train import trainer

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking train.init_from")

    monkeypatch.setattr(trainer, "build_step", no_compile)
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", TINY_TRAIN)
    work = tmp_path / "run"  # a training work directory: its model is WORKDIR/model
    save_model(work / "model", cfg, untrained_model(cfg, seed=4))
    wider = tmp_path / "wider"
    save_model(wider, apply_overrides(cfg, ["model.hidden_size=64"]),
               untrained_model(apply_overrides(cfg, ["model.hidden_size=64"]), seed=4))
    train = ["train", "--config", "lsd_configs/tiny.py", "--no-progress", *TINY_TRAIN]
    missing = tmp_path / "missing"
    for source, i in ((missing, 0), (wider, 1)):
        t0 = time.monotonic()
        assert main([*train, f"train.init_from={source}", "--workdir",
                     str(tmp_path / f"w{i}")]) == 2
        assert time.monotonic() - t0 < 60
    err = _error_lines(capsys)
    assert err == [
        f"lsd: error: train.init_from={str(missing)!r}: {str(missing)!r} does not exist "
        "(expected a model directory or a training work directory)",
        f"lsd: error: train.init_from={str(wider)!r} holds a model with model.hidden_size=64; "
        "this config has model.hidden_size=32: a warm start needs the same architecture "
        "(model.color_map may only grow, in the order ('none', 'affine', 'quadratic', "
        "'curves'))"], err
    source, saved, grows = trainer.check_warm_start(
        apply_overrides(cfg, [f"train.init_from={work}"]))
    assert source == work / "model" and saved.model == cfg.model and not grows


# ----------------------------------------------------------------------------- export, weights


def test_export_platforms_named_twice_are_refused(tmp_path, capsys):
    from lsd_cli.main import main

    model = _small_model(tmp_path / "m", 5)
    assert main(["export", "--checkpoint", str(model), "--out", str(tmp_path / "x.lsdx"),
                 "--platforms", "cpu,cpu"]) == 2
    assert _error_lines(capsys) == [
        "lsd: error: platforms='cpu,cpu', expected a comma-separated subset of "
        "cpu,cuda,rocm,tpu, each named once"]
    assert not (tmp_path / "x.lsdx").exists()


def test_damaged_weights_are_one_line_without_a_bound_method_repr(tmp_path, capsys):
    from lsd_cli.main import main

    model = _small_model(tmp_path / "m", 6)
    data = max((model / "params" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)
    data.write_bytes(bytes(random.Random(2).randrange(256) for _ in range(data.stat().st_size)))
    assert main(["stream", "--checkpoint", str(model), "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(
        f"lsd: error: {str(model)!r}: weights cannot be read (damaged files?): "), err
    assert "<bound method" not in err[0] and "TensorStore(" not in err[0]
    assert "in OCDBT database at local file" in err[0]


@pytest.mark.slow
def test_damaged_checkpoint_warning_is_one_line(tmp_path, capfd):
    """`lsd train --resume` past a damaged newest checkpoint: one `lsd: warning:` line naming
    it (no orbax ERROR log lines, no warning source line), and the run continues."""
    from lsd_cli.main import main

    workdir = tmp_path / "run"
    train = ["train", "--config", "lsd_configs/tiny.py", "--no-progress", "--workdir",
             str(workdir), *TINY_TRAIN, "train.save_every=2", "train.keep=5"]
    assert main([*train, "train.steps=4"]) == 0
    for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capfd.readouterr()
    assert main([*train, "train.steps=6", "--resume"]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    warned = [line for line in err if "cannot be restored" in line]
    assert len(warned) == 1 and warned[0].startswith(
        f"lsd: warning: checkpoint step 4 in {workdir.absolute() / 'checkpoints'} cannot be "
        "restored ("), err
    assert not [line for line in err if line.startswith(("ERROR:absl", "  warnings.warn",
                                                         "Traceback"))], err
    assert "resumed from step 2" in err


def test_damaged_video_is_the_reader_s_warning_not_ffmpeg_lines(tmp_path):
    """`lsd stream` of an mp4 damaged in its middle: no raw `[mpeg4 @ 0x...]` lines from FFmpeg,
    one warning giving the frames read and listed (a subprocess: FFmpeg's log level is read once
    per process)."""
    model = _small_model(tmp_path / "m", 7)
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 24, (64, 64))
    rng = np.random.default_rng(0)
    for _ in range(48):
        writer.write(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    writer.release()
    data = bytearray(clip.read_bytes())
    data[len(data) // 3: len(data) // 3 + 3000] = rng.integers(0, 256, 3000,
                                                               dtype=np.uint8).tobytes()
    clip.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "lsd_cli", "stream", "--checkpoint", str(model),
                           "--input", str(clip), "--prompt", "x", "--out",
                           str(tmp_path / "o.mp4"), "--no-progress"], cwd=REPO_ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert not [line for line in lines if line.startswith("[")], lines
    assert any(line.startswith("lsd stream: warning: input ") and "frames its container lists"
               in line for line in lines), lines

