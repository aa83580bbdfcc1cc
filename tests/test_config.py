"""Config tree and `key.path=value` overrides: parsing, nesting, and errors that name the value."""

from __future__ import annotations

import dataclasses

import pytest

from lsd_configs import demo, lsd_base, mid, oasis_500m, tiny, tiny_dit, tiny_pixel
from lsd_jax.config import Config, apply_overrides, from_dict, load_config, override, to_dict
from lsd_jax.errors import ConfigError

CONFIG_MODULES = {"tiny": tiny, "mid": mid, "lsd_base": lsd_base, "oasis_500m": oasis_500m,
                  "demo": demo, "tiny_dit": tiny_dit, "tiny_pixel": tiny_pixel}


def test_nested_overrides_set_the_field(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.depth=2", "diffusion.history_aug.prob=0.25",
                                     "diffusion.process=ddpm_v", "diffusion.ctx_level=14",
                                     "seed=7"])
    assert cfg.model.depth == 2
    assert cfg.diffusion.history_aug.prob == 0.25
    assert cfg.diffusion.process == "ddpm_v"
    assert cfg.diffusion.ctx_level == 14.0
    assert cfg.seed == 7
    # Everything else is untouched.
    assert cfg.model.hidden_size == tiny_cfg.model.hidden_size
    assert cfg.diffusion.history_aug.blur == tiny_cfg.diffusion.history_aug.blur


def test_later_override_wins(tiny_cfg):
    assert apply_overrides(tiny_cfg, ["model.depth=2", "model.depth=3"]).model.depth == 3


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("OFF", False),
])
def test_bool_parsing(tiny_cfg, text, expected):
    assert apply_overrides(tiny_cfg, [f"model.qkv_bias={text}"]).model.qkv_bias is expected


@dataclasses.dataclass(frozen=True)
class _Shapes:
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, float] = (0, 0.0)
    maybe: int | None = None


@pytest.mark.parametrize("key, text, expected", [
    ("sizes", "2,4,8", (2, 4, 8)),
    ("sizes", "(2, 4)", (2, 4)),
    ("sizes", "[16]", (16,)),
    ("pair", "3,0.5", (3, 0.5)),
    ("maybe", "none", None),
    ("maybe", "5", 5),
])
def test_tuple_and_optional_parsing(key, text, expected):
    assert getattr(override(_Shapes(), key, text), key) == expected


def test_tuple_of_wrong_length_names_key_and_value():
    with pytest.raises(ConfigError, match=r"pair='1,2,3', expected 2 comma-separated values"):
        override(_Shapes(), "pair", "1,2,3")


@pytest.mark.parametrize("item, names", [
    ("model.dpth=2", ["model.dpth", "dpth", "depth"]),          # the fields are listed
    ("modle.depth=2", ["modle.depth", "modle"]),
    ("model.depth.x=2", ["model.depth.x", "'depth' is a value"]),
    ("model=2", ["'model' is a section"]),
])
def test_unknown_key_is_named(tiny_cfg, item, names):
    with pytest.raises(ConfigError) as err:
        apply_overrides(tiny_cfg, [item])
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("item, names", [
    ("model.depth=two", ["model.depth", "'two'", "int"]),
    ("model.mlp_ratio=wide", ["model.mlp_ratio", "'wide'", "float"]),
    ("model.qkv_bias=maybe", ["model.qkv_bias", "'maybe'", "bool"]),
    ("diffusion.sample_steps=3.5", ["diffusion.sample_steps", "'3.5'", "int"]),
])
def test_bad_type_is_named(tiny_cfg, item, names):
    with pytest.raises(ConfigError) as err:
        apply_overrides(tiny_cfg, [item])
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("item, values", [
    ("model.patch_size=7", ["model.frame_height=64", "model.patch_size=7"]),
    ("model.frame_width=62", ["model.frame_width=62", "model.patch_size=4"]),
    ("model.num_heads=3", ["model.hidden_size=128", "model.num_heads=3"]),
])
def test_divisibility_errors_name_both_values(tiny_cfg, item, values):
    with pytest.raises(ConfigError) as err:
        apply_overrides(tiny_cfg, [item])
    for value in values:
        assert value in str(err.value)


@pytest.mark.parametrize("item, names", [
    ("model.window=0", ["model.window=0", "expected >="]),
    ("diffusion.sample_steps=0", ["diffusion.sample_steps=0", "1..128"]),
    ("diffusion.process=ddim", ["diffusion.process='ddim'", "'rectified_flow'", "'ddpm_v'"]),
    ("codec=jpeg", ["codec='jpeg'", "'pixel'"]),
    ("model.pixel_residual=true", ["model.pixel_residual=True", "pixel_channels > 0 (got 0)"]),
    ("model.pixel_channels=-8", ["model.pixel_channels=-8", ">= 0"]),
    ("model.color_map=cubic", ["model.color_map='cubic'", "'affine'", "'quadratic'", "'curves'"]),
])
def test_bad_values_are_named(tiny_cfg, item, names):
    with pytest.raises(ConfigError) as err:
        apply_overrides(tiny_cfg, [item])
    for name in names:
        assert name in str(err.value)


def test_curves_colour_map_needs_an_rgb_input_frame(tiny_cfg):
    assert apply_overrides(tiny_cfg, ["model.color_map=curves"]).model.color_map == "curves"
    with pytest.raises(ConfigError, match=r"model.color_map='curves' .*RGB.*"
                                          r"model.cond_channels=4, expected 3"):
        apply_overrides(tiny_cfg, ["model.cond_channels=4", "model.color_map=curves"])


def test_override_without_equals_is_an_error(tiny_cfg):
    with pytest.raises(ConfigError, match=r"'model.depth' is not of the form key.path=value"):
        apply_overrides(tiny_cfg, ["model.depth"])


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ConfigError, match="nope.py"):
        load_config(missing)


def test_config_file_without_get_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"empty.py.*no get_config\(\)"):
        load_config(path)


@pytest.mark.parametrize("name", sorted(CONFIG_MODULES))
def test_packaged_configs_load_and_document_their_command(repo_root, name):
    cfg = load_config(repo_root / "lsd_configs" / f"{name}.py")
    assert isinstance(cfg, Config) and cfg.name == name
    # big_vision habit: each config's docstring holds the command that uses it.
    assert f"--config lsd_configs/{name}.py" in CONFIG_MODULES[name].__doc__


@pytest.mark.parametrize("name", sorted(CONFIG_MODULES))
def test_dict_round_trip(repo_root, name):
    cfg = load_config(repo_root / "lsd_configs" / f"{name}.py", ["model.depth=3"])
    assert from_dict(to_dict(cfg)) == cfg


def test_from_dict_names_unknown_keys(tiny_cfg):
    data = to_dict(tiny_cfg)
    data["model"]["depht"] = 2
    with pytest.raises(ConfigError, match="depht"):
        from_dict(data)
