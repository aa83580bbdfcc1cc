"""The JAX model against the PyTorch reference (`lsd_jax.interop.torch_ref`), same weights, same
inputs.

A small Oasis-shaped config (depth 2, hidden 128, 4 heads, 18x32x16 latents in patches of 2: the
9x16 token grid; 25 action entries; DDPM-v with 3 DDIM steps; window 4 so the band is crossed),
and a config that switches on every option Oasis lacks. Relative error is
max|jax - torch| / max|torch|.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from conftest import CONFIGS  # noqa: E402

from lsd_jax.config import load_config  # noqa: E402
from lsd_jax.interop import parity  # noqa: E402

SMALL_OASIS = ["model.depth=2", "model.hidden_size=128", "model.num_heads=4", "model.window=4",
               "diffusion.sample_steps=3"]
# Every option the Oasis config leaves off, and the non-Oasis conventions.
ALL_OPTIONS = ["model.frame_height=16", "model.frame_width=16", "model.patch_size=4",
               "model.hidden_size=64", "model.num_heads=4", "model.depth=2", "model.window=3",
               "model.prompt_dim=8", "model.external_cond_dim=5", "model.qkv_bias=true",
               "model.rope_interleaved=false", "model.gelu_approximate=false",
               "model.pixel_channels=8", "model.pixel_depth=2", "model.pixel_residual=true",
               "model.color_map=curves",
               "diffusion.context_noise=noised", "diffusion.ctx_level=0.1",
               "diffusion.input_scale=signal", "diffusion.frame_noise=fixed"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oasis_cfg():
    return load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS)


@pytest.fixture(scope="module")
def oasis_pair(oasis_cfg):
    return parity.build_pair(oasis_cfg, seed=0)


def test_small_config_is_oasis_shaped(oasis_cfg):
    m = oasis_cfg.model
    assert m.grid == (9, 16) and m.frame_shape == (18, 32, 16) and m.external_cond_dim == 25
    assert (m.depth, m.hidden_size, m.num_heads) == (2, 128, 4)


def test_dit_forward(oasis_cfg, oasis_pair):
    result = parity.check_forward(oasis_cfg, oasis_pair)
    assert result.rel <= 1e-5, result


def test_ddim_trajectory_3_steps(oasis_cfg, oasis_pair):
    assert oasis_cfg.diffusion.process == "ddpm_v" and oasis_cfg.diffusion.sample_steps == 3
    result = parity.check_trajectory(oasis_cfg, oasis_pair, frames=3)
    assert result.rel <= 1e-4, result


@pytest.mark.parametrize("process,prediction", [("ddpm_v", "velocity"),
                                               ("rectified_flow", "velocity"),
                                               ("rectified_flow", "x0")],
                         ids=["diffusion-forcing-v", "flow-matching", "flow-matching-x0"])
def test_training_loss(oasis_cfg, oasis_pair, process, prediction):
    diffusion = dataclasses.replace(oasis_cfg.diffusion, process=process, prediction=prediction,
                                    ctx_level=14.0 if process == "ddpm_v" else 0.02)
    cfg = dataclasses.replace(oasis_cfg, diffusion=diffusion)
    assert cfg.diffusion.noise_sampler == "independent"  # Diffusion Forcing: a level per frame
    result = parity.check_loss(cfg, oasis_pair)
    assert result.rel <= 1e-5, result


def test_streaming_step(oasis_cfg, oasis_pair):
    """Torch ring-buffer step vs the jitted JAX step over 3W frames, the same noise."""
    result = parity.check_streaming(oasis_cfg, oasis_pair)
    assert result.rel <= 1e-5, result


@pytest.fixture(scope="module")
def options_cfg():
    return load_config(CONFIGS / "tiny.py", ALL_OPTIONS)


@pytest.fixture(scope="module")
def options_pair(options_cfg):
    return parity.build_pair(options_cfg, seed=3)


def test_all_options_forward(options_cfg, options_pair):
    """Input frame, prompt, step size, actions, qkv bias, NeoX RoPE, exact GELU."""
    result = parity.check_forward(options_cfg, options_pair, seed=3)
    assert result.rel <= 1e-5, result


@pytest.mark.slow
def test_all_options_streaming(options_cfg, options_pair):
    """Rectified flow with shortcut step sizes, really-noised context frames and the same
    starting noise for every frame."""
    result = parity.check_streaming(options_cfg, options_pair, seed=3)
    assert result.rel <= 1e-5, result


@pytest.mark.slow
def test_demo_recipe_streaming():
    """The demo config (rectified flow, x0 prediction, prompt, input frame): torch ring-buffer
    step vs the jitted JAX step over 3W frames."""
    cfg = load_config(CONFIGS / "demo.py")
    assert cfg.diffusion.prediction == "x0"
    result = parity.check_streaming(cfg, parity.build_pair(cfg, seed=5), seed=5)
    assert result.rel <= 1e-5, result


def test_frame_noise_is_what_the_jax_step_draws(oasis_cfg):
    """`frame_noise` replays the streaming step's own draw for each frame's key."""
    import jax

    from lsd_jax.diffusion import initial_noise

    key = jax.random.PRNGKey(5)
    noise, _ = parity.frame_noise(key, 2, oasis_cfg.model.frame_shape, 2)
    _, k_noise, _ = jax.random.split(key, 3)
    np.testing.assert_array_equal(noise[0], np.asarray(initial_noise(k_noise, noise[0].shape)))
    assert float(np.abs(noise[1] - noise[0]).mean()) > 0.5  # a new draw per frame
    fixed, fixed_ctx = parity.frame_noise(key, 2, oasis_cfg.model.frame_shape, 3, fixed=True)
    np.testing.assert_array_equal(fixed[0], noise[0])
    np.testing.assert_array_equal(fixed[2], fixed[0])  # the key does not advance
    np.testing.assert_array_equal(fixed_ctx[2], fixed_ctx[0])


def test_vae_encode_decode():
    from lsd_jax.interop.convert import vae_from_params, vae_from_torch
    from lsd_jax.interop.torch_ref.vae import TorchVAE
    from lsd_jax.vae import VAEConfig

    cfg = VAEConfig(frame_height=36, frame_width=64, patch_size=2, enc_dim=64, enc_depth=2,
                    enc_heads=2, dec_dim=64, dec_depth=2, dec_heads=2)
    torch.manual_seed(0)
    torch_vae = TorchVAE(cfg)
    for name, value in torch_vae.state_dict().items():
        # Random affine LayerNorms too (the default ones and zeros would hide a swap).
        value.copy_(torch.randn_like(value) * (0.1 if value.ndim == 1 else value[0].numel() ** -0.5)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    state_dict = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    vae = vae_from_params(cfg, vae_from_torch(cfg, state_dict))
    rng = np.random.default_rng(0)
    x_bhwc = rng.uniform(-1, 1, (2, 36, 64, 3)).astype(np.float32)
    z_bhwc = rng.standard_normal((2, 18, 32, 16)).astype(np.float32)

    mean_jax = np.asarray(vae.encode(jnp.asarray(x_bhwc)))
    mean_torch = torch_vae.encode(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2)).numpy()
    assert parity.compare("forward", mean_jax, mean_torch.reshape(2, 18, 32, 16), "").rel <= 1e-5
    out_jax = np.asarray(vae.decode(jnp.asarray(z_bhwc)))
    out_torch = torch_vae.decode(torch.from_numpy(z_bhwc).reshape(2, -1, 16)).permute(0, 2, 3, 1)
    assert parity.compare("forward", out_jax, out_torch.numpy(), "").rel <= 1e-5


def test_rope_positions_are_torch_linspace():
    from lsd_jax.rope import torch_linspace

    for n in range(1, 80):
        np.testing.assert_array_equal(torch_linspace(-1.0, 1.0, n),
                                      torch.linspace(-1.0, 1.0, n).numpy())


@pytest.mark.slow
def test_parity_command(capsys, tmp_path):
    """`lsd parity` on a torch checkpoint file: weights from the file, every check PASS."""
    import json

    from safetensors.torch import save_file

    from lsd_cli.main import main
    from lsd_jax.interop.torch_ref.dit import TorchDiT

    cfg = load_config(CONFIGS / "tiny.py", ALL_OPTIONS)
    torch.manual_seed(1)
    model = TorchDiT(cfg.model)
    for value in model.state_dict().values():
        fan_in = value[0].numel()
        value.copy_(torch.randn_like(value) * (0.1 if value.ndim == 1 else 0.7 * fan_in**-0.5))
    save_file(model.state_dict(), str(tmp_path / "dit.safetensors"))
    code = main(["parity", "--config", str(CONFIGS / "tiny.py"), *ALL_OPTIONS,
                 "--torch-checkpoint", str(tmp_path / "dit.safetensors"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"], out
    assert [c["name"] for c in out["checks"]] == ["forward", "trajectory", "loss", "streaming"]
    assert out["weights"].endswith("dit.safetensors")


@pytest.mark.slow
def test_bench_parity_speed_reports_every_implementation(options_cfg):
    result = parity.bench_parity_speed(options_cfg, frames=2, warmup=1, threads=1,
                                       with_compile=False, interleave=False)
    assert result["order"] == "sequential" and result["threads_torch"] == 1
    assert set(result["ms_per_frame"]) == {"jax_jit", "torch_eager"}
    assert result["ms_per_frame"]["jax_jit"]["p50"] > 0
    assert result["ratios_p50"]["torch_eager_over_jax"] > 0
