"""PyTorch state dicts / safetensors <-> our Flax NNX parameters, both ways, exact Oasis key layout.

    params = dit_from_torch(model_cfg, state_dict)      # nested dict, `model_from_params`-ready
    state_dict = dit_to_torch(model_cfg, params)        # {torch key: numpy array}
    state_dict = random_state_dict(dit_torch_shapes(model_cfg), seed=0)  # random weights
    vae_params = vae_from_torch(vae_cfg, state_dict); vae_to_torch(vae_cfg, vae_params)
    state_dict = load_state_dict(path)                  # .safetensors, or a torch .pt/.pth/.bin
    save_safetensors(path, state_dict)
    summary = convert_oasis(cfg, ["vae.enc_depth=2"], dit_path, vae_path, out)   # lsd convert oasis

Layout rules (docs/OASIS.md): a torch Linear weight is `(out, in)`, our kernel `(in, out)`; a Conv2d
patch embed weight `(O, I, kh, kw)` is our kernel `(kh * kw * I, O)` in patch order `(p, q, c)`;
LayerNorm `weight` is our `scale`; our per-layer parameters are stacked on a leading axis, so
`blocks.N.s_*` <-> `blocks.spatial.*[N]`, `blocks.N.t_*` <-> `blocks.temporal.*[N]` (and
`encoder.N.*` <-> `encoder.*[N]` in the VAE). Names of the options Oasis lacks are the torch
reference's (`step_embedder.mlp.{0,2}`, `prompt_proj`).

Reading is strict: `*rotary_emb.freqs` entries are ignored (fixed, recomputed); any other key we do
not expect, a key we expect that is absent, or a shape that differs is a `ConversionError`
naming the key (and both shapes). Values are converted exactly (transposes and reshapes only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lsd_jax.checkpoint import save_model
from lsd_jax.config import Config, ModelConfig
from lsd_jax.errors import ConfigError, ConversionError
from lsd_jax.model import abstract_model, count_params, model_from_params
from lsd_jax.vae import OasisVAE, VAEConfig, save_vae

IGNORED_SUFFIX = "rotary_emb.freqs"


# ----------------------------------------------------------------------------- key tables

# (torch module prefix, our path, kind, layer or None); kinds: "linear", "conv", "norm".
Module = tuple[str, tuple[str, ...], str, int | None]


def _dit_modules(cfg: ModelConfig) -> Iterator[Module]:
    yield "x_embedder.proj", ("x_embedder",), "conv", None
    for name in ("t_embedder", "step_embedder"):
        if name == "t_embedder" or cfg.use_step_size:
            yield f"{name}.mlp.0", (name, "mlp_0"), "linear", None
            yield f"{name}.mlp.2", (name, "mlp_2"), "linear", None
    if cfg.prompt_dim:
        yield "prompt_proj", ("prompt_proj",), "linear", None
    if cfg.external_cond_dim:
        yield "external_cond", ("external_cond",), "linear", None
    for n in range(cfg.depth):
        for short, ours in (("s", "spatial"), ("t", "temporal")):
            base = ("blocks", ours)
            yield f"blocks.{n}.{short}_attn.to_qkv", (*base, "attn", "to_qkv"), "linear", n
            yield f"blocks.{n}.{short}_attn.to_out", (*base, "attn", "to_out"), "linear", n
            yield f"blocks.{n}.{short}_mlp.fc1", (*base, "mlp", "fc1"), "linear", n
            yield f"blocks.{n}.{short}_mlp.fc2", (*base, "mlp", "fc2"), "linear", n
            yield (f"blocks.{n}.{short}_adaLN_modulation.1", (*base, "adaLN_modulation"),
                   "linear", n)
    yield "final_layer.linear", ("final_layer", "linear"), "linear", None
    yield "final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), "linear", None
    if cfg.pixel_channels:
        yield "pixel_embedder.proj", ("pixel_embedder",), f"conv:{cfg.pixel_channels}", None
        yield "pixel.stem_in", ("pixel", "stem_in"), "kernel2d", None
        for i in range(cfg.pixel_depth - 1):
            yield f"pixel.stem.{i}", ("pixel", "stem", i), "kernel2d", None
        yield "pixel.head_in", ("pixel", "head_in"), "kernel2d", None
        for i in range(cfg.pixel_depth):
            yield f"pixel.head.{i}", ("pixel", "head", i), "kernel2d", None
        yield "pixel.head_modulation", ("pixel", "head_modulation"), "linear", None
        yield "pixel.out", ("pixel", "out"), "kernel2d", None
    if cfg.color_map != "none":
        yield "color_map", ("color_map",), "linear", None


def _vae_modules(cfg) -> Iterator[Module]:
    yield "patch_embed.proj", ("patch_embed",), "conv", None
    for stack, depth in (("encoder", cfg.enc_depth), ("decoder", cfg.dec_depth)):
        if stack == "decoder":
            yield "enc_norm", ("enc_norm",), "norm", None
            yield "quant_conv", ("quant_conv",), "linear", None
            yield "post_quant_conv", ("post_quant_conv",), "linear", None
        for n in range(depth):
            yield f"{stack}.{n}.norm1", (stack, "norm1"), "norm", n
            yield f"{stack}.{n}.attn.qkv", (stack, "attn", "qkv"), "linear", n
            yield f"{stack}.{n}.attn.proj", (stack, "attn", "proj"), "linear", n
            yield f"{stack}.{n}.norm2", (stack, "norm2"), "norm", n
            yield f"{stack}.{n}.mlp.fc1", (stack, "mlp", "fc1"), "linear", n
            yield f"{stack}.{n}.mlp.fc2", (stack, "mlp", "fc2"), "linear", n
    yield "dec_norm", ("dec_norm",), "norm", None
    yield "predictor", ("predictor",), "linear", None


# Entry: (torch key, our leaf path, layer, transform); transforms: "linear", "conv", "copy".
Entry = tuple[str, tuple[str, ...], int | None, str]


def _get(tree: Mapping, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _entries(modules: Iterator[Module], expected: Mapping) -> list[Entry]:
    entries = []
    for prefix, path, kind, layer in modules:
        node = _get(expected, path)
        weight = "scale" if kind == "norm" else "kernel"
        entries.append((f"{prefix}.weight", (*path, weight), layer,
                        "copy" if kind == "norm" else kind))
        if "bias" in node:
            entries.append((f"{prefix}.bias", (*path, "bias"), layer, "copy"))
    return entries


def _patch_size(kernel_shape, in_channels: int) -> int:
    return int(round((kernel_shape[0] // in_channels) ** 0.5))


def _to_torch_layout(array: np.ndarray, transform: str, in_channels: int) -> np.ndarray:
    """Transforms: "linear"; "conv" (a patch embed over `in_channels`, or "conv:I" over `I`);
    "kernel2d" (an `nnx.Conv` kernel `[kh, kw, I, O]` <-> a Conv2d weight `[O, I, kh, kw]`);
    "copy"."""
    if transform == "linear":
        return array.T
    if transform == "kernel2d":
        return array.transpose(3, 2, 0, 1)
    if transform.startswith("conv"):
        in_channels = int(transform[5:]) if transform.startswith("conv:") else in_channels
        p = _patch_size(array.shape, in_channels)
        return array.reshape(p, p, in_channels, array.shape[-1]).transpose(3, 2, 0, 1)
    return array


def _from_torch_layout(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "kernel2d":
        return array.transpose(2, 3, 1, 0)
    if transform.startswith("conv"):
        o, i, kh, kw = array.shape
        return array.transpose(2, 3, 1, 0).reshape(kh * kw * i, o)
    return array


def _torch_shape(shape, transform: str, in_channels: int) -> tuple[int, ...]:
    return _to_torch_layout(np.empty(shape, np.bool_), transform, in_channels).shape


def to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 widened to float32: numpy has none) or an array -> numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def _from_torch(entries: list[Entry], expected: Mapping, state_dict: Mapping, in_channels: int,
                what: str, source: str) -> dict:
    keys = {key for key, *_ in entries}
    unknown = sorted(k for k in state_dict if k not in keys and not k.endswith(IGNORED_SUFFIX))
    if unknown:
        raise ConversionError(f"unknown key {unknown[0]!r} in {source} ({len(unknown)} unknown in "
                              f"all): not a parameter of {what}")
    missing = [key for key, *_ in entries if key not in state_dict]
    if missing:
        raise ConversionError(f"missing key {missing[0]!r} in {source} ({len(missing)} missing in "
                              f"all), needed by {what}")
    stacked: dict[tuple[str, ...], list] = {}
    out: dict = {}
    for key, path, layer, transform in entries:
        leaf = _get(expected, path)
        layer_shape = leaf.shape if layer is None else leaf.shape[1:]
        want = _torch_shape(layer_shape, transform, in_channels)
        value = to_numpy(state_dict[key])
        if tuple(value.shape) != tuple(want):
            raise ConversionError(f"{key!r} has shape {tuple(value.shape)} in {source}, expected "
                                  f"{tuple(want)} for {what}")
        value = _from_torch_layout(value, transform).astype(leaf.dtype)
        if layer is None:
            _set(out, path, value)
        else:
            stacked.setdefault(path, [None] * leaf.shape[0])[layer] = value
    for path, layers in stacked.items():
        _set(out, path, np.stack(layers))
    return jax.tree.map(jax.numpy.asarray, out)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _to_torch(entries: list[Entry], params: Mapping, in_channels: int) -> dict[str, np.ndarray]:
    out = {}
    for key, path, layer, transform in entries:
        value = np.asarray(_get(params, path))
        value = value if layer is None else value[layer]
        out[key] = np.array(_to_torch_layout(value, transform, in_channels), order="C")
    return out


def _torch_shapes(modules, expected: Mapping, in_channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, path, layer, transform in _entries(modules, expected):
        shape = _get(expected, path).shape
        shapes[key] = _torch_shape(shape if layer is None else shape[1:], transform, in_channels)
    return shapes


def _pure(params) -> dict:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


# ----------------------------------------------------------------------------- DiT


def _dit_expected(cfg: ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


def dit_torch_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The torch state-dict keys of the DiT of `cfg` and their shapes (from shapes only)."""
    return _torch_shapes(_dit_modules(cfg), _dit_expected(cfg), cfg.channels + cfg.cond_channels)


def dit_from_torch(cfg: ModelConfig, state_dict: Mapping, source: str = "the state dict") -> dict:
    """Our DiT parameters (nested dict of jax arrays, for `model_from_params(cfg, ...)`) from a
    torch state dict with Oasis names (`source` names the file in error messages)."""
    expected = _dit_expected(cfg)
    entries = _entries(_dit_modules(cfg), expected)
    return _from_torch(entries, expected, state_dict, cfg.channels + cfg.cond_channels,
                       f"the DiT of this config (depth {cfg.depth}, hidden {cfg.hidden_size})",
                       source)


def dit_to_torch(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """A torch-layout state dict `{key: numpy array}` from our DiT parameters (an `nnx.State` of
    `nnx.Param`s or its pure dict)."""
    params = _pure(params)
    return _to_torch(_entries(_dit_modules(cfg), params), params, cfg.channels + cfg.cond_channels)


def random_state_dict(shapes: dict, seed: int = 0, gain: float = 0.7) -> dict:
    """Random torch-layout weights for `shapes` (`dit_torch_shapes`), distributed as
    `model.randomize` draws them: weights `N(0, gain^2 / fan_in)`, biases `N(0, 0.1^2)`. Every
    parameter is random, adaLN-Zero ones included, so no block is the identity."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        std = 0.1 if len(shape) == 1 else gain / np.sqrt(np.prod(shape[1:]))
        out[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- VAE


def _vae_expected(cfg) -> dict:
    abstract = nnx.eval_shape(lambda: OasisVAE(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def vae_torch_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The torch state-dict keys of the ViT-VAE of `cfg` and their shapes (from shapes only)."""
    return _torch_shapes(_vae_modules(cfg), _vae_expected(cfg), 3)


def vae_from_torch(cfg, state_dict: Mapping, source: str = "the state dict") -> dict:
    """Our ViT-VAE parameters (nested dict) from a torch state dict with Oasis names."""
    expected = _vae_expected(cfg)
    entries = _entries(_vae_modules(cfg), expected)
    return _from_torch(entries, expected, state_dict, 3,
                       f"the ViT-VAE of this config (enc {cfg.enc_dim}x{cfg.enc_depth}, dec "
                       f"{cfg.dec_dim}x{cfg.dec_depth})", source)


def vae_to_torch(cfg, params) -> dict[str, np.ndarray]:
    params = _pure(params)
    return _to_torch(_entries(_vae_modules(cfg), params), params, 3)


def vae_from_params(cfg, params):
    """An `OasisVAE` holding `params` (a nested dict as `vae_from_torch` returns)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: OasisVAE(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str | Path) -> dict:
    """`{key: array}` from a `.safetensors` file (numpy; bfloat16 needs torch) or a torch
    `.pt`/`.pth`/`.bin` file of a plain state dict (needs torch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except TypeError:
            # numpy has no bfloat16: read through torch, converted to float32 by `to_numpy`.
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if path.suffix in (".pt", ".pth", ".bin"):
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise ConversionError(f"{str(path)!r} does not hold a plain state dict "
                                  "(a mapping of names to tensors)")
        return dict(state)
    raise ConversionError(f"{str(path)!r} has suffix {path.suffix!r}, expected .safetensors, "
                          ".pt, .pth or .bin")


def save_safetensors(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))


# ----------------------------------------------------------------------------- Oasis checkpoint


def vae_config(overrides: Sequence[str]) -> VAEConfig:
    """A `VAEConfig` from `vae.FIELD=value` overrides, all set at once (so the order of e.g.
    `vae.frame_height` and `vae.patch_size` does not matter)."""
    defaults = dataclasses.asdict(VAEConfig())
    values = {}
    for item in overrides:
        key, _, text = item.partition("=")
        name = key[len("vae."):]
        if name not in defaults:
            raise ConfigError(f"unknown config key {key!r}: VAEConfig has no field {name!r} "
                              f"(fields: {', '.join(defaults)})")
        kind = type(defaults[name])
        try:
            values[name] = kind(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__}") from None
    return VAEConfig(**values)


def convert_oasis(cfg: Config, vae_overrides: Sequence[str], dit: str | Path, vae: str | Path,
                  out: str | Path) -> dict:
    """Write the checkpoint directory `out` (every lsd command reads it) of the Oasis DiT of
    `cfg` (codec `oasis_vae`) and its ViT-VAE, shaped by `vae_overrides` (`vae.FIELD=value`,
    `vae_config`), from their torch state dicts in the files `dit` and `vae`. Returns a summary:
    tensors read, rotary entries ignored, parameters, the VAE's config."""
    if cfg.codec != "oasis_vae":
        raise ConfigError(f"config {cfg.name!r} has codec {cfg.codec!r}, expected 'oasis_vae'")
    vae_cfg = vae_config(vae_overrides)
    if (*vae_cfg.grid, vae_cfg.latent_dim) != cfg.model.frame_shape:
        raise ConfigError(f"the VAE makes {vae_cfg.grid[0]}x{vae_cfg.grid[1]}x"
                          f"{vae_cfg.latent_dim} latents, the DiT takes "
                          f"{'x'.join(map(str, cfg.model.frame_shape))} frames")
    dit_sd = load_state_dict(dit)
    model = model_from_params(cfg.model, dit_from_torch(cfg.model, dit_sd, str(dit)))
    vae_sd = load_state_dict(vae)
    vae_model = vae_from_params(vae_cfg, vae_from_torch(vae_cfg, vae_sd, str(vae)))
    out = save_model(out, cfg, model)
    save_vae(out, vae_cfg, vae_model)
    total, trainable = count_params(model)
    ignored = sum(k.endswith(IGNORED_SUFFIX) for k in dit_sd)
    vae_params = sum(x.size for x in jax.tree.leaves(nnx.state(vae_model, nnx.Param)))
    return {"out": str(out), "config": cfg.name, "dit_keys": len(dit_sd) - ignored,
            "dit_rotary_entries_ignored": ignored, "dit_params_total": total,
            "dit_params_trainable": trainable, "vae_keys": len(vae_sd),
            "vae_params": vae_params, "vae_config": dataclasses.asdict(vae_cfg)}
