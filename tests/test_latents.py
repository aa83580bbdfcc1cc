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
    proc = subprocess.run([sys.executable, "-m", "lsd_cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    for name, seed in (("vae_a", 0), ("vae_b", 1)):
        save_vae(root / name, SMALL_VAE, OasisVAE(SMALL_VAE, rngs=nnx.Rngs(seed)))
    proc = _lsd("data", "encode", "--config", "lsd_configs/tiny.py", "--codec-dir",
                str(root / "vae_a"), "--out", str(root / "data"), "--clips", "24", *LATENT_DIT)
    assert "wrote 24 clips of 4 frames" in proc.stdout, proc.stdout
    return root


def test_encoded_records_are_the_codec_latents(encoded):
    """Each record holds the codec's latents of the clip (shape, and values equal to encoding the
    same pixel clip again), and the metadata names the codec's weights."""
    from lsd_jax.codec import load_codec
    from lsd_jax.config import apply_overrides, load_config
    from lsd_train.data import PairedClips, make_source
    from lsd_train.latents import LatentClips, codec_identity, pixel_twin

    cfg = apply_overrides(load_config(REPO_ROOT / "lsd_configs/tiny.py"),
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
    _lsd("train", "--config", "lsd_configs/tiny.py", "--workdir", str(work), "--no-progress",
         *LATENT_DIT, "data.source=latents", f"data.latent_dir={encoded / 'data'}",
         f"data.codec_dir={encoded / 'vae_a'}", "train.steps=60", "train.log_every=2",
         "train.lr=3e-3", "train.warmup_steps=5", "train.sample_every=0")
    losses = [json.loads(line)["loss"] for line in
              (work / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:3]), losses


def test_dataset_of_another_codec_is_refused(encoded):
    """Another codec's weights, another latent shape, another clip length: one-line errors."""
    base = ["train", "--config", "lsd_configs/tiny.py", "--workdir", str(encoded / "refused"),
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


def _trained_run(encoded):
    work = encoded / "run"
    if not (work / "model").exists():
        pytest.skip("needs test_latent_dit_trains_on_the_dataset's run")
    return work


def test_lsd_eval_scores_a_latent_model_at_its_codec_frame_size(encoded):
    """`lsd eval` on a latent model draws the held-out clips at its codec's 32x32 frame size and
    decodes the outputs through the codec: the copy-input baseline it reports equals the one
    computed from those clips directly, and the model's PSNR is a finite score of 32x32 frames."""
    from lsd_jax.config import apply_overrides, load_config
    from lsd_train.eval_data import heldout_pairs
    from lsd_train.evaluate import frame_psnr
    from lsd_train.latents import pixel_twin

    work = _trained_run(encoded)
    proc = _lsd("eval", "--checkpoint", str(work), "--steps", "1", "--clips", "1", "--frames",
                "4", "--tasks", "negative,sepia", "--no-progress", "--json")
    result = json.loads(proc.stdout)[0]
    twin = pixel_twin(apply_overrides(load_config(REPO_ROOT / "lsd_configs/tiny.py"), LATENT_DIT),
                      (32, 32))
    _, _, cond, target, _ = heldout_pairs(twin, clips=1, frames=4, tasks="negative,sepia")
    assert cond.shape == (2, 4, 32, 32, 3)
    for i, name in enumerate(("negative", "sepia")):
        task = result["tasks"][name]
        copy = np.mean([frame_psnr(t, c) for t, c in zip(target[i], cond[i], strict=True)])
        assert task["baselines"]["copy_input"] == pytest.approx(copy, abs=1e-4)
        psnr = task["steps"]["1"]["psnr"]
        assert np.isfinite(psnr) and 3.0 < psnr < 60.0, psnr


def _largest_constant(module_text: str) -> int:
    """Elements of the largest `stablehlo.constant` in a StableHLO module's text."""
    import re

    sizes = [int(np.prod([int(d) for d in dims.split("x")[:-1]] or [1]))
             for dims in re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([^>]*)>",
                                    module_text)]
    return max(sizes, default=0)


def test_exported_latent_step_takes_the_codec_weights_as_arguments(encoded, tmp_path):
    """`lsd export` of a latent model stores the VAE's weights after the model's and passes them
    to the step as arguments: the serialized step holds no constant as large as one VAE weight
    (the same encode with the weights closed over does), and the artifact's outputs equal the
    in-process step's bit for bit."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lsd_jax.codec import load_codec
    from lsd_jax.resolve import resolve_model
    from lsd_jax.streaming import init_stream, make_step
    from lsd_serve.artifact import load_artifact

    work = _trained_run(encoded)
    out = tmp_path / "latent.lsdx"
    _lsd("export", "--checkpoint", str(work), "--out", str(out), "--steps", "2")
    art = load_artifact(out)
    codec = load_codec(work / "model")
    vae_leaves = jax.tree.leaves(codec.params)
    assert art.header["codec"] == {"name": "oasis_vae", "params": len(vae_leaves),
                                   "bytes": sum(leaf.nbytes for leaf in vae_leaves)}
    assert art.header["frame_shape"] == [32, 32, 3]
    biggest_weight = max(leaf.size for leaf in vae_leaves)
    module = jax.export.deserialize(art._exported["step_b1_k2"].serialize()).mlir_module()
    assert _largest_constant(module) < biggest_weight
    baked = jax.export.export(jax.jit(codec.encode))(
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)).mlir_module()
    assert _largest_constant(baked) >= biggest_weight  # the check sees closed-over weights

    resolved = resolve_model(str(work))
    graphdef, params = nnx.split(resolved.model)
    step = make_step(resolved.cfg, graphdef, steps=2, codec=codec)
    frames = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32, 3), dtype=np.uint8)
    prompt = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    state_a, state_b = art.init_state(1, 0), init_stream(resolved.cfg, 1, 0)
    art_step = art.step(1, 2)
    for frame in frames:
        state_a, out_a = art_step(state_a, frame, prompt)
        state_b, out_b = step(params, state_b, frame, prompt, codec_params=codec.params)
        np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
    with pytest.raises(Exception, match="codec_params=codec.params"):
        step(params, init_stream(resolved.cfg, 1, 0), frames[0], prompt)


def test_random_codec_writes_a_loadable_vae(tmp_path):
    """`lsd data random-codec` writes a randomly initialised VAE of the shapes asked for (the
    vit-l-20 ones otherwise); bad fields are one-line errors."""
    import jax

    from lsd_jax.codec import load_codec

    args = ["data", "random-codec", "--out", str(tmp_path / "vae"), "--seed", "3",
            *(f"vae.{k}={v}" for k, v in [("frame_height", 32), ("frame_width", 32),
                                           ("patch_size", 8), ("latent_dim", 4), ("enc_dim", 32),
                                           ("enc_depth", 1), ("enc_heads", 2), ("dec_dim", 32),
                                           ("dec_depth", 1), ("dec_heads", 2)])]
    proc = _lsd(*args)
    codec = load_codec(tmp_path / "vae")
    assert codec.latent_shape == (4, 4, 4) and codec.frame_shape == (32, 32, 3)
    count = sum(leaf.size for leaf in jax.tree.leaves(codec.params))
    assert f"{count / 1e6:.1f}M parameters" in proc.stdout, proc.stdout
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert float(np.std(np.asarray(codec.encode(frames)))) > 0.01
    bad = _lsd("data", "random-codec", "--out", str(tmp_path / "x"), "vae.depth=2", check=False)
    assert bad.returncode == 2 and "FIELD one of frame_height" in bad.stderr
