"""Oasis as a world model: inputs, the two sampler modes, the exact-Oasis check against Oasis's
loop in torch, and the `lsd convert oasis` / `lsd oasis` commands end to end."""

from __future__ import annotations

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, rel_err
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.errors import ConfigError
from lsd_jax.interop.oasis import (
    load_actions,
    load_start_frames,
    sample_banded_cache,
    sample_recompute,
)

# Oasis-shaped and small; window 3 so a 5-frame video slides the window twice.
SMALL_OASIS = ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.window=3",
               "diffusion.sample_steps=3"]


@pytest.fixture(scope="module")
def world():
    from lsd_jax.interop.convert import dit_from_torch, dit_torch_shapes, random_state_dict
    from lsd_jax.model import model_from_params

    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS)
    model = model_from_params(cfg.model, dit_from_torch(
        cfg.model, random_state_dict(dit_torch_shapes(cfg.model), seed=0)))
    rng = np.random.default_rng(0)
    start = jnp.asarray(rng.standard_normal((1, 1, *cfg.model.frame_shape)), jnp.float32)
    actions = jnp.asarray(rng.standard_normal((1, 5, 25)), jnp.float32)
    return cfg, model, start, actions


def test_actions_align_with_frames(tmp_path):
    assert not load_actions(None, 4, 25).any()
    actions = np.arange(3 * 25, dtype=np.float32).reshape(3, 25) + 1
    np.save(tmp_path / "a.npy", actions[None])
    out = load_actions(tmp_path / "a.npy", 4, 25)
    assert out.shape == (4, 25) and not out[0].any()  # one zero action first
    np.testing.assert_array_equal(out[1:], actions)
    with pytest.raises(ConfigError, match=r"are 3x25, expected Tx25 with T >= 4"):
        load_actions(tmp_path / "a.npy", 5, 25)


def test_start_frames_from_image_and_video(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "f.png"), frames[0][..., ::-1])
    image = load_start_frames(tmp_path / "f.png", 2, 36, 64)
    assert image.shape == (2, 36, 64, 3) and image.dtype == np.uint8
    assert (image[0] == image[1]).all()
    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (64, 48))
    for frame in frames:
        writer.write(frame[..., ::-1].copy())
    writer.release()
    video = load_start_frames(tmp_path / "v.avi", 2, 36, 64)
    assert video.shape == (2, 36, 64, 3) and not (video[0] == video[1]).all()
    with pytest.raises(ValueError, match=r"has 3 readable frames, expected at least 4"):
        load_start_frames(tmp_path / "v.avi", 4, 36, 64)


def test_modes_agree_until_the_window_slides(world):
    """Up to `window` frames the banded cache holds exactly what Oasis recomputes."""
    cfg, model, start, actions = world
    key = jax.random.PRNGKey(7)
    n = cfg.model.window
    recompute = sample_recompute(cfg, model, start, actions[:, :n], n, key)
    cached = sample_banded_cache(cfg, model, start, actions[:, :n], n, key)
    assert recompute.shape == (1, n, *cfg.model.frame_shape)
    assert float(jnp.std(recompute[:, 1:])) > 0.1
    assert rel_err(cached, recompute) <= 1e-4


def test_recompute_is_oasis_loop(world):
    """Mode "recompute" against Oasis's own sampling loop (torch, formula for formula) with the
    window sliding twice."""
    torch = pytest.importorskip("torch")
    from lsd_jax.interop.parity import build_pair, frame_noise
    from lsd_jax.interop.torch_ref.oasis import oasis_sample

    cfg, model, start, actions = world
    torch.set_num_threads(1)
    torch_model = build_pair(cfg, seed=0).torch_model  # the same weights as `model` (seed 0)
    np.testing.assert_array_equal(
        torch_model.final_layer.linear.weight.detach().numpy().T,
        np.asarray(model.final_layer.linear.kernel[...]))
    key = jax.random.PRNGKey(3)
    frames = 5
    ours = sample_recompute(cfg, model, start, actions, frames, key)
    noise, _ = frame_noise(key, 1, cfg.model.frame_shape, frames - 1)
    theirs = oasis_sample(cfg, torch_model, torch.from_numpy(np.array(start)),
                          torch.from_numpy(np.array(actions)), torch.from_numpy(np.array(noise)))
    assert rel_err(ours, theirs.numpy()) <= 1e-4


SMALL_VAE = ["vae.frame_height=36", "vae.frame_width=64", "vae.patch_size=2", "vae.enc_dim=64",
             "vae.enc_depth=1", "vae.enc_heads=2", "vae.dec_dim=64", "vae.dec_depth=1",
             "vae.dec_heads=2"]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Small random Oasis-layout DiT and VAE files (with a rotary entry Oasis files may hold)."""
    pytest.importorskip("safetensors")
    from lsd_jax.interop.convert import (
        dit_torch_shapes,
        random_state_dict,
        save_safetensors,
        vae_config,
        vae_torch_shapes,
    )

    root = tmp_path_factory.mktemp("oasis_files")
    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS)
    vae_cfg = vae_config(SMALL_VAE)
    for name, shapes in (("dit", dit_torch_shapes(cfg.model)), ("vae", vae_torch_shapes(vae_cfg))):
        state_dict = random_state_dict(shapes, seed=0)
        if name == "dit":
            state_dict["blocks.0.t_attn.rotary_emb.freqs"] = np.ones(16, np.float32)
        save_safetensors(root / f"{name}.safetensors", state_dict)
    return root


def _lsd(capsys, *argv):
    from lsd_cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_convert_then_run_both_modes(capsys, tmp_path, weight_files):
    from lsd_jax.checkpoint import load_config_from
    from lsd_jax.codec import make_codec

    code, out, err = _lsd(capsys, "convert", "oasis", "--dit", weight_files / "dit.safetensors",
                          "--vae", weight_files / "vae.safetensors", "--out", tmp_path / "ckpt",
                          "--config", CONFIGS / "oasis_500m.py", *SMALL_OASIS, *SMALL_VAE,
                          "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["dit_rotary_entries_ignored"] == 1 and summary["vae_params"] > 0
    codec = make_codec(load_config_from(tmp_path / "ckpt"), tmp_path / "ckpt")
    assert codec.name == "oasis_vae" and codec.frame_hw == (36, 64)
    frames = np.random.default_rng(2).integers(0, 256, (2, 3, 36, 64, 3), dtype=np.uint8)
    assert codec.decode(codec.encode(frames)).shape == frames.shape

    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / "start.png"), rng.integers(0, 256, (72, 128, 3), dtype=np.uint8))
    np.save(tmp_path / "actions.npy", rng.standard_normal((3, 25)).astype(np.float32))
    for mode in ("recompute", "banded-cache"):
        video = tmp_path / f"{mode}.mp4"
        code, out, err = _lsd(capsys, "oasis", "--checkpoint", tmp_path / "ckpt", "--start",
                              tmp_path / "start.png", "--actions", tmp_path / "actions.npy",
                              "--frames", 4, "--mode", mode, "--out", video, "--json")
        assert code == 0, err
        assert json.loads(out)["frame_shape"] == [36, 64, 3]
        capture = cv2.VideoCapture(str(video))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
        capture.release()


def test_convert_names_a_renamed_key(capsys, tmp_path, weight_files):
    from lsd_jax.interop.convert import load_state_dict, save_safetensors

    state_dict = load_state_dict(weight_files / "dit.safetensors")
    state_dict["blocks.1.s_attn.qkv.weight"] = state_dict.pop("blocks.1.s_attn.to_qkv.weight")
    save_safetensors(tmp_path / "renamed.safetensors", state_dict)
    code, _, err = _lsd(capsys, "convert", "oasis", "--dit", tmp_path / "renamed.safetensors",
                        "--vae", weight_files / "vae.safetensors", "--out", tmp_path / "ckpt",
                        "--config", CONFIGS / "oasis_500m.py", *SMALL_OASIS, *SMALL_VAE)
    assert code == 2
    assert "lsd: error: unknown key 'blocks.1.s_attn.qkv.weight'" in err
    assert not (tmp_path / "ckpt").exists()


def test_full_size_vae_codec_shapes():
    """vit-l-20 from shapes only: 360x640 uint8 frames <-> 18x32x16 latents."""
    from lsd_jax.codec import VAECodec
    from lsd_jax.vae import OasisVAE, VAEConfig

    graphdef, state = nnx.split(nnx.eval_shape(lambda: OasisVAE(VAEConfig(), rngs=nnx.Rngs(0))))
    codec = lambda s: VAECodec(nnx.merge(graphdef, s))  # noqa: E731
    latents = jax.eval_shape(lambda s, f: codec(s).encode(f), state,
                             jax.ShapeDtypeStruct((2, 360, 640, 3), jnp.uint8))
    assert latents.shape == (2, 18, 32, 16)
    frames = jax.eval_shape(lambda s, z: codec(s).decode(z), state, latents)
    assert frames.shape == (2, 360, 640, 3) and frames.dtype == jnp.uint8
