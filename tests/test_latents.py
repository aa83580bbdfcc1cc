"""Latent training: clips encoded once by a small Oasis-VAE-shaped codec (random weights) with
`lsd data encode`, written as ArrayRecord shards, read by grain without the codec; a small latent
DiT trains on them and its loss falls; datasets of another codec, encoder or clip length are
refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from lsd_jax.vae import OasisVAE, VAEConfig, save_vae

SMALL_VAE = VAEConfig(frame_height=32, frame_width=32, patch_size=8, latent_dim=4, enc_dim=32,
                      enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)
LATENT_DIT = ["codec=oasis_vae", "model.frame_height=4", "model.frame_width=4",
              "model.channels=4", "model.cond_channels=4", "model.patch_size=1",
              "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
              "model.prompt_dim=16", "data.clip_frames=4", "train.batch_size=4"]


def _lsd(*args, cwd=REPO_ROOT, check=True):
    proc = subprocess.run([sys.executable, "-m", "lsd_jax.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    for name, seed in (("vae_a", 0), ("vae_b", 1)):
        save_vae(root / name, SMALL_VAE, OasisVAE(SMALL_VAE, rngs=nnx.Rngs(seed)))
    proc = _lsd("data", "encode", "--config", "configs/tiny.py", "--codec-dir",
                str(root / "vae_a"), "--out", str(root / "data"), "--clips", "24", *LATENT_DIT)
    assert "wrote 24 clips of 4 frames" in proc.stdout, proc.stdout
    return root


def test_encoded_records_are_the_codec_latents(encoded):
    """Each record holds the codec's latents of the clip (shape, and values equal to encoding the
    same pixel clip again), and the metadata names the codec's weights."""
    from lsd_jax.codec import load_codec
    from lsd_jax.config import apply_overrides, load_config
    from train.data import PairedClips, make_source
    from train.latents import LatentClips, codec_identity, pixel_twin

    cfg = apply_overrides(load_config(REPO_ROOT / "configs/tiny.py"),
                          [*LATENT_DIT, "data.source=latents",
                           f"data.latent_dir={encoded / 'data'}"])
    clips = LatentClips(cfg)
    codec = load_codec(encoded / "vae_a")
    assert len(clips) == 24
    assert clips.meta["codec"] == codec_identity(codec)
    item = clips[5]
    assert item["target"].shape == (4, 4, 4, 4) and item["cond"].dtype == np.float32
    assert item["prompt"].shape == (16,)
    twin = pixel_twin(cfg, (32, 32))
    pixels = PairedClips(make_source(twin), twin, cfg.data.shuffle_seed)[5]
    np.testing.assert_allclose(np.asarray(codec.encode(pixels["cond"])), item["cond"],
                               rtol=1e-5, atol=1e-5)
    assert float(np.std(item["target"])) > 0.05


def test_latent_dit_trains_on_the_dataset(encoded):
    """`lsd train` with data.source=latents: the loss falls over 60 steps (mean of the last 10
    logs below 0.8x the first), the codec never runs."""
    work = encoded / "run"
    _lsd("train", "--config", "configs/tiny.py", "--workdir", str(work), "--no-progress",
         *LATENT_DIT, "data.source=latents", f"data.latent_dir={encoded / 'data'}",
         f"data.codec_dir={encoded / 'vae_a'}", "train.steps=60", "train.log_every=2",
         "train.lr=3e-3", "train.warmup_steps=5", "train.sample_every=0")
    losses = [json.loads(line)["loss"] for line in
              (work / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:3]), losses


def test_dataset_of_another_codec_is_refused(encoded):
    """Another codec's weights, another latent shape, another clip length: one-line errors."""
    base = ["train", "--config", "configs/tiny.py", "--workdir", str(encoded / "refused"),
            "--no-progress", *LATENT_DIT, "data.source=latents",
            f"data.latent_dir={encoded / 'data'}", "train.steps=2"]
    cases = [
        ([f"data.codec_dir={encoded / 'vae_b'}"], "encoded by codec weights sha256"),
        (["model.channels=8"], "holds latents of shape (4, 4, 4)"),
        (["data.clip_frames=6"], "holds clips of 4 frames"),
    ]
    for extra, message in cases:
        proc = _lsd(*base, *extra, check=False)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)


def test_latent_model_streams_through_its_codec(encoded):
    """The trained latent model's directory holds its codec, so `lsd stream` encodes the input
    frames and decodes the outputs through it (32x32 frames out of 4x4x4 latents)."""
    import cv2

    work = encoded / "run"
    if not (work / "model").exists():
        pytest.skip("needs test_latent_dit_trains_on_the_dataset's run")
    assert (work / "model" / "vae.json").is_file() and (work / "model" / "vae").is_dir()
    out = encoded / "stream.mp4"
    proc = _lsd("stream", "--checkpoint", str(work), "--input", "demo", "--prompt",
                "a pencil sketch", "--out", str(out), "--max-frames", "6", "--no-progress")
    assert out.stat().st_size > 0, proc.stdout
    video = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 6 and frames[0].shape[:2] == (32, 32), (len(frames), frames[0].shape)
    assert float(np.std(np.stack(frames))) > 1.0
