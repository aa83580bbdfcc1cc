"""The Oasis ViT-VAE (`vit-l-20`, docs/OASIS.md) in Flax NNX, and the frame codec built on it.

    vae = OasisVAE(VAEConfig(), rngs=nnx.Rngs(0))
    mean_bhwc = vae.encode(frames_bhwc)      # [-1, 1] RGB [b, 360, 640, 3] -> [b, 18, 32, 16]
    frames_bhwc = vae.decode(latent_bhwc)    # [b, 18, 32, 16] -> [b, 360, 640, 3]

Encode: a patch embed (`p x p` patches, per-patch order `(p, q, c)`, `c` fastest, as the DiT's
`x_embedder`) -> `enc_depth` pre-LN ViT blocks -> `enc_norm` -> `quant_conv` (mean, logvar); the
mean is returned, tokens row-major as `[gh, gw, latent_dim]`. Decode: `post_quant_conv` ->
`dec_depth` blocks -> `dec_norm` -> `predictor` -> unpatchify with per-token order `(c, p, q)`,
`c` outermost (Oasis's). Blocks: LayerNorm with affine (eps 1e-6), attention with a biased `qkv`
and `proj`, non-causal, axial RoPE on the first half of each head (the rest passes through),
MLP `fc1`, exact GELU, `fc2`. Blocks are stacked (leading layer axis) and run with `lax.scan`.

RoPE rule (docs/OASIS.md gives the full-size values; small test VAEs follow the same rule): a rotary
"pixel" embedding of dim `head_dim / 4` with `max_freq = grid_h * grid_w`, i.e. `head_dim / 8`
frequencies `linspace(1, grid_h * grid_w / 2, head_dim / 8) * pi`; rows on head dims
`[0, head_dim/4)`, columns on `[head_dim/4, head_dim/2)`, interleaved pairs. For vit-l-20:
8 frequencies `linspace(1, 288, 8) * pi` on the first 32 of 64 head dims.

`VAECodec` is the `oasis_vae` frame codec: uint8 `[..., 360, 640, 3]` <-> latents
`[..., 18, 32, 16]` scaled by `scaling_factor` (0.07843137255). `save_vae`/`load_vae` keep the VAE
beside a model checkpoint (`DIR/vae.json`, `DIR/vae/`), as `lsd convert oasis` writes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax import rope
from lsd_jax.atomic import atomic_path, atomic_write_text
from lsd_jax.checkpoint import restore_params, save_params
from lsd_jax.errors import CheckpointError, ConfigError


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shapes of a ViT-VAE; the defaults are Oasis's `vit-l-20` (229.2M parameters)."""

    frame_height: int = 360
    frame_width: int = 640
    patch_size: int = 20
    latent_dim: int = 16
    enc_dim: int = 1024
    enc_depth: int = 6
    enc_heads: int = 16
    dec_dim: int = 1024
    dec_depth: int = 12
    dec_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    scaling_factor: float = 0.07843137255

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"vae.{f.name}={value!r}, expected a number > 0")
            if f.type in (int, "int") and not isinstance(value, int):
                raise ConfigError(f"vae.{f.name}={value!r}, expected an integer > 0")
        for name, size in (("frame_height", self.frame_height), ("frame_width", self.frame_width)):
            if size % self.patch_size:
                raise ConfigError(f"vae.{name}={size} is not divisible by "
                                  f"vae.patch_size={self.patch_size}")
        for dim, heads in (("enc", self.enc_heads), ("dec", self.dec_heads)):
            width = getattr(self, f"{dim}_dim")
            if width % heads or (width // heads) % 8:
                raise ConfigError(f"vae.{dim}_dim={width} / vae.{dim}_heads={heads} must be a "
                                  "head dim divisible by 8 (axial RoPE on half the head)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame_height // self.patch_size, self.frame_width // self.patch_size


def rope_frequencies(head_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """`head_dim/8` frequencies `linspace(1, grid_h * grid_w / 2, head_dim/8) * pi` float32."""
    return (np.linspace(1.0, grid_h * grid_w / 2, head_dim // 8) * np.pi).astype(np.float32)


def rope_angles(head_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Pair angles `[grid_h * grid_w, head_dim/4]` float32: rows then columns (row-major grid)."""
    freqs_f = rope_frequencies(head_dim, grid_h, grid_w)
    rows_hf = rope.torch_linspace(-1.0, 1.0, grid_h)[:, None] * freqs_f
    cols_wf = rope.torch_linspace(-1.0, 1.0, grid_w)[:, None] * freqs_f
    f = freqs_f.shape[0]
    return np.concatenate([np.broadcast_to(rows_hf[:, None], (grid_h, grid_w, f)),
                           np.broadcast_to(cols_wf[None, :], (grid_h, grid_w, f))],
                          -1).reshape(grid_h * grid_w, 2 * f)


def _layer_norm(cfg, dim, rngs):
    return nnx.LayerNorm(dim, epsilon=cfg.norm_eps, rngs=rngs)


class ViTBlock(nnx.Module):
    """Pre-LN ViT block: `x + proj(attn(norm1 x))`, then `x + fc2(gelu(fc1(norm2 x)))`."""

    def __init__(self, cfg: VAEConfig, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        hidden = int(dim * cfg.mlp_ratio)
        self.norm1 = _layer_norm(cfg, dim, rngs)
        self.attn = nnx.Dict(qkv=nnx.Linear(dim, 3 * dim, rngs=rngs),
                             proj=nnx.Linear(dim, dim, rngs=rngs))
        self.norm2 = _layer_norm(cfg, dim, rngs)
        self.mlp = nnx.Dict(fc1=nnx.Linear(dim, hidden, rngs=rngs),
                            fc2=nnx.Linear(hidden, dim, rngs=rngs))

    def __call__(self, x_bnd, angles_nf):
        rot = 2 * angles_nf.shape[-1]
        qkv = self.attn["qkv"](self.norm1(x_bnd)).reshape(*x_bnd.shape[:-1], 3, self.heads, -1)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        angles = angles_nf[:, None, :]
        q = jnp.concatenate([rope.apply_rope(q[..., :rot], angles), q[..., rot:]], -1)
        k = jnp.concatenate([rope.apply_rope(k[..., :rot], angles), k[..., rot:]], -1)
        logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) * q.shape[-1] ** -0.5
        o = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(logits, -1), v)
        x_bnd = x_bnd + self.attn["proj"](o.reshape(x_bnd.shape))
        hidden = jax.nn.gelu(self.mlp["fc1"](self.norm2(x_bnd)), approximate=False)
        return x_bnd + self.mlp["fc2"](hidden)


def _stack(cfg, depth, dim, heads, rngs):
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return ViTBlock(cfg, dim, heads, rngs=rngs)

    return create(rngs)


def _run(blocks, x_bnd, angles_nf):
    graphdef, state = nnx.split(blocks)

    def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, angles_nf), None

    return jax.lax.scan(body, x_bnd, state)[0]


class OasisVAE(nnx.Module):
    """The ViT-VAE (module docstring). Parameter paths mirror Oasis's state-dict names."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nnx.Linear(p * p * 3, cfg.enc_dim, rngs=rngs)
        self.encoder = _stack(cfg, cfg.enc_depth, cfg.enc_dim, cfg.enc_heads, rngs)
        self.enc_norm = _layer_norm(cfg, cfg.enc_dim, rngs)
        self.quant_conv = nnx.Linear(cfg.enc_dim, 2 * cfg.latent_dim, rngs=rngs)
        self.post_quant_conv = nnx.Linear(cfg.latent_dim, cfg.dec_dim, rngs=rngs)
        self.decoder = _stack(cfg, cfg.dec_depth, cfg.dec_dim, cfg.dec_heads, rngs)
        self.dec_norm = _layer_norm(cfg, cfg.dec_dim, rngs)
        self.predictor = nnx.Linear(cfg.dec_dim, 3 * p * p, rngs=rngs)

    def _angles(self, dim, heads):
        return jnp.asarray(rope_angles(dim // heads, *self.cfg.grid))

    def encode(self, frames_bhwc):
        """`[b, H, W, 3]` in [-1, 1] -> posterior mean `[b, gh, gw, latent_dim]` (unscaled)."""
        cfg = self.cfg
        p, (gh, gw) = cfg.patch_size, cfg.grid
        b = frames_bhwc.shape[0]
        x = frames_bhwc.astype(jnp.float32).reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x_bnd = self.patch_embed(x.reshape(b, gh * gw, p * p * 3))
        x_bnd = self.enc_norm(_run(self.encoder, x_bnd, self._angles(cfg.enc_dim, cfg.enc_heads)))
        mean_bnc = self.quant_conv(x_bnd)[..., : cfg.latent_dim]
        return mean_bnc.reshape(b, gh, gw, cfg.latent_dim)

    def decode(self, latent_bhwc):
        """`[b, gh, gw, latent_dim]` (unscaled) -> frames `[b, H, W, 3]` (about [-1, 1])."""
        cfg = self.cfg
        p, (gh, gw) = cfg.patch_size, cfg.grid
        b = latent_bhwc.shape[0]
        x_bnd = self.post_quant_conv(latent_bhwc.astype(jnp.float32).reshape(b, gh * gw, -1))
        x_bnd = self.dec_norm(_run(self.decoder, x_bnd, self._angles(cfg.dec_dim, cfg.dec_heads)))
        out = self.predictor(x_bnd).reshape(b, gh, gw, 3, p, p).transpose(0, 1, 4, 2, 5, 3)
        return out.reshape(b, gh * p, gw * p, 3)


VAE_FORMAT = "lsd-jax-vae"


def save_vae(directory: str | Path, cfg: VAEConfig, vae: OasisVAE) -> None:
    """Write `DIR/vae/` (orbax params) and then `DIR/vae.json` (config) beside a model checkpoint,
    each whole or not at all (`lsd_jax.atomic`): a VAE is there once its `vae.json` is."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file, expected a directory to write the "
                              "VAE into")
    if (directory / "vae.json").exists():
        raise CheckpointError(f"{str(directory / 'vae.json')!r} already exists")
    with atomic_path(directory / "vae") as tmp:  # replaces the rest of an interrupted write
        save_params(tmp, nnx.state(vae, nnx.Param))
    atomic_write_text(directory / "vae.json", json.dumps(
        {"format": VAE_FORMAT, "version": 1, "config": dataclasses.asdict(cfg)}, indent=2))


def load_vae(directory: str | Path) -> OasisVAE:
    """The VAE stored in a checkpoint directory by `save_vae`."""
    directory = Path(directory).absolute()
    meta_path = directory / "vae.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{str(directory)!r} holds no VAE (no vae.json); write one with "
                              "`lsd convert oasis --dit ... --vae ... --out DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != VAE_FORMAT or meta.get("version") != 1:
        raise CheckpointError(f"{str(meta_path)!r} has format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, expected {VAE_FORMAT!r} version 1")
    cfg = VAEConfig(**meta["config"])
    abstract = nnx.eval_shape(lambda: OasisVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, restore_params(directory / "vae", abstract_params, "vae.json"))
