"""Weight conversion between torch state dicts (Oasis key layout) and our NNX parameters."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.interop.convert import (
    ConversionError,
    dit_from_torch,
    dit_to_torch,
    dit_torch_shapes,
    vae_from_params,
    vae_from_torch,
    vae_to_torch,
    vae_torch_shapes,
)
from lsd_jax.model import model_from_params
from lsd_jax.vae import VAEConfig

SMALL_OASIS = ["model.depth=2", "model.hidden_size=128", "model.num_heads=4", "model.window=4"]
ALL_OPTIONS = ["model.frame_height=16", "model.frame_width=16", "model.patch_size=4",
               "model.hidden_size=64", "model.num_heads=4", "model.depth=2", "model.prompt_dim=8",
               "model.external_cond_dim=5", "model.qkv_bias=true"]
SMALL_VAE = VAEConfig(frame_height=36, frame_width=64, patch_size=2, enc_dim=64, enc_depth=2,
                      enc_heads=2, dec_dim=64, dec_depth=2, dec_heads=2)


def random_state_dict(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_oasis_500m_key_layout():
    """The exact docs/OASIS.md keys and shapes, and 607,943,744 trained parameters (+ 48 rotary)."""
    shapes = dit_torch_shapes(load_config(CONFIGS / "oasis_500m.py").model)
    assert len(shapes) == 2 + 4 + 2 + 16 * 2 * 9 + 4
    assert sum(math.prod(s) for s in shapes.values()) == 607_943_792 - 48
    expected = {
        "x_embedder.proj.weight": (1024, 16, 2, 2), "x_embedder.proj.bias": (1024,),
        "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.2.weight": (1024, 1024),
        "external_cond.weight": (1024, 25), "external_cond.bias": (1024,),
        "blocks.15.s_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.t_attn.to_out.weight": (1024, 1024), "blocks.0.t_attn.to_out.bias": (1024,),
        "blocks.3.s_mlp.fc1.weight": (4096, 1024), "blocks.3.t_mlp.fc2.weight": (1024, 4096),
        "blocks.7.s_adaLN_modulation.1.weight": (6144, 1024),
        "blocks.7.t_adaLN_modulation.1.bias": (6144,),
        "final_layer.linear.weight": (64, 1024), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2048, 1024),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "blocks.0.s_attn.to_qkv.bias" not in shapes  # Oasis's qkv has no bias


def test_vit_l_20_key_layout():
    shapes = vae_torch_shapes(VAEConfig())
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 1) == 229.2
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 20, 20)
    assert shapes["encoder.5.attn.qkv.bias"] == (3072,)
    assert shapes["decoder.11.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["quant_conv.weight"] == (32, 1024)
    assert shapes["post_quant_conv.weight"] == (1024, 16)
    assert shapes["predictor.weight"] == (1200, 1024)
    assert shapes["enc_norm.weight"] == shapes["dec_norm.bias"] == (1024,)
    assert "encoder.6.norm1.weight" not in shapes and "decoder.11.norm2.weight" in shapes


@pytest.mark.parametrize("overrides", [SMALL_OASIS, ALL_OPTIONS], ids=["oasis", "all-options"])
def test_dit_round_trip_is_exact(overrides):
    """torch layout -> JAX model -> torch layout gives identical tensors."""
    base = "oasis_500m.py" if overrides is SMALL_OASIS else "tiny.py"
    cfg = load_config(CONFIGS / base, overrides).model
    state_dict = random_state_dict(dit_torch_shapes(cfg))
    model = model_from_params(cfg, dit_from_torch(cfg, state_dict))
    back = dit_to_torch(cfg, nnx.state(model, nnx.Param))
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)



def test_conv_layout_matches_patch_order():
    """A Conv2d weight `(O, I, kh, kw)` becomes our `(kh * kw * I, O)` kernel in patch order
    `(p, q, c)`, c fastest: the kernel row of patch position (p, q) and channel c."""
    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS).model
    state_dict = random_state_dict(dit_torch_shapes(cfg))
    kernel = np.asarray(dit_from_torch(cfg, state_dict)["x_embedder"]["kernel"])
    weight = state_dict["x_embedder.proj.weight"]
    channels = weight.shape[1]
    for p, q, c in [(0, 0, 0), (0, 1, 3), (1, 0, 15), (1, 1, 7)]:
        np.testing.assert_array_equal(kernel[(p * 2 + q) * channels + c], weight[:, c, p, q])


def test_vae_round_trip_is_exact():
    state_dict = random_state_dict(vae_torch_shapes(SMALL_VAE))
    vae = vae_from_params(SMALL_VAE, vae_from_torch(SMALL_VAE, state_dict))
    back = vae_to_torch(SMALL_VAE, nnx.state(vae, nnx.Param))
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert vae.encode(jnp.zeros((1, 36, 64, 3))).shape == (1, 18, 32, 16)


def test_rotary_freqs_are_ignored():
    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS).model
    state_dict = random_state_dict(dit_torch_shapes(cfg))
    state_dict["blocks.0.s_attn.rotary_emb.freqs"] = np.ones(8, np.float32)
    state_dict["blocks.0.t_attn.rotary_emb.freqs"] = np.ones(16, np.float32)
    dit_from_torch(cfg, state_dict)


def test_unknown_missing_and_misshaped_keys_are_named():
    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS).model
    good = random_state_dict(dit_torch_shapes(cfg))

    renamed = dict(good)
    renamed["blocks.1.t_mlp.fc_1.weight"] = renamed.pop("blocks.1.t_mlp.fc1.weight")
    with pytest.raises(ConversionError, match=r"unknown key 'blocks\.1\.t_mlp\.fc_1\.weight'"):
        dit_from_torch(cfg, renamed, "oasis.safetensors")

    missing = dict(good)
    del missing["final_layer.adaLN_modulation.1.bias"]
    with pytest.raises(ConversionError,
                       match=r"missing key 'final_layer\.adaLN_modulation\.1\.bias'"):
        dit_from_torch(cfg, missing)

    misshaped = dict(good)
    misshaped["blocks.0.s_attn.to_qkv.weight"] = np.ones((384, 64), np.float32)
    with pytest.raises(ConversionError, match=r"'blocks\.0\.s_attn\.to_qkv\.weight' has shape "
                                              r"\(384, 64\) in the state dict, expected "
                                              r"\(384, 128\)"):
        dit_from_torch(cfg, misshaped)


def test_safetensors_written_by_torch_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from lsd_jax.interop.convert import load_state_dict, save_safetensors
    from lsd_jax.interop.torch_ref.dit import TorchDiT

    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS).model
    torch.manual_seed(0)
    model = TorchDiT(cfg)
    path = tmp_path / "oasis.safetensors"
    save_file(model.state_dict(), str(path))
    params = dit_from_torch(cfg, load_state_dict(path), str(path))
    back = dit_to_torch(cfg, params)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    # Our writer's file loads strictly into the torch reference.
    save_safetensors(tmp_path / "ours.safetensors", back)
    from safetensors.torch import load_file

    TorchDiT(cfg).load_state_dict(load_file(str(tmp_path / "ours.safetensors")), strict=True)

    # bfloat16 files (read through torch, numpy has no bfloat16) convert too.
    save_file({k: v.bfloat16() for k, v in model.state_dict().items()},
              str(tmp_path / "bf16.safetensors"))
    bf16 = dit_from_torch(cfg, load_state_dict(tmp_path / "bf16.safetensors"))
    assert bf16["x_embedder"]["kernel"].dtype == jnp.float32


def test_renamed_key_in_a_file_fails_with_its_name(tmp_path):
    pytest.importorskip("safetensors")
    from lsd_jax.interop.convert import load_state_dict, save_safetensors

    cfg = load_config(CONFIGS / "oasis_500m.py", SMALL_OASIS).model
    state_dict = random_state_dict(dit_torch_shapes(cfg))
    state_dict["x_embedder.conv.weight"] = state_dict.pop("x_embedder.proj.weight")
    save_safetensors(tmp_path / "bad.safetensors", state_dict)
    with pytest.raises(ConversionError, match=r"unknown key 'x_embedder\.conv\.weight' in "
                                              r".*bad\.safetensors"):
        dit_from_torch(cfg, load_state_dict(tmp_path / "bad.safetensors"),
                       str(tmp_path / "bad.safetensors"))
