"""Architecture-aware structured pruning (`lsd prune`): a trained model cut to narrower widths that
fit a target's tiles, written as a smaller model directory to be recovered by distillation
(`train.distill_from`).

What is cut (each a set of units scored and kept whole):

    mlp     the hidden channels of every MLP, per layer and sub-block     -> model.mlp_ratio
    heads   the attention heads of every sub-block, per layer             -> model.num_heads
            (the head width stays: model.head_width)
    pixel   the pixel path's three channel sets (its stem's residual stream, its head's residual
            stream, the DiT's feature channels feeding the head)          -> model.pixel_channels

Widths are uniform over layers (the blocks are stacked and scanned), but every layer keeps its own
best units. A width must be a multiple of `align`, the target's tile along that axis: 16 float32
lanes of an AVX-512 register, 64 or 128 for H100 tensor-core tiles, 128 for the TPU's MXU (for
heads, the attention width `heads * head_width`).

Scores (`score_units`):
- "taylor" (default): the first-order change of the training loss when a unit is removed
  (Molchanov et al. 2019): a unit scales its output by a gate `g = 1`, `dL/dg` is the sum of
  `W * dL/dW` over the weights that write the unit's output, and the score is its square summed
  over validation batches. The loss is the Diffusion Forcing loss on the validation split (no
  shortcut items, no history augmentation: a deterministic loss of the model's own task).
- "magnitude": the L2 norm of the weights writing each unit; needs no data (for models this
  machine cannot run a backward pass of).

Cutting a unit of a residual stream that passes through a LayerNorm (the pixel path's) changes the
norm's statistics, so the pruned model is not the unpruned one minus small terms: it is the start
of a recovery run, not a finished model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax import objectives
from lsd_jax.codec import PixelCodec
from lsd_jax.config import Config
from lsd_jax.diffusion import make_process
from lsd_jax.errors import ConfigError
from lsd_train.eval_data import heldout_pairs
from lsd_train.trainer import model_apply_fn

SCORES = ("taylor", "magnitude")
SUB_BLOCKS = ("spatial", "temporal")


class Widths(NamedTuple):
    """The widths to cut to; None keeps a width as it is."""

    mlp: int | None = None
    heads: int | None = None
    pixel: int | None = None


# ----------------------------------------------------------------------------- units


def _gate_terms(params: dict, grads: dict, cfg: Config) -> dict[str, np.ndarray]:
    """`dL/dg` of every unit's gate, from the weights writing its output and their gradients:
    `{"mlp": [L, 2, M], "heads": [L, 2, H], "pixel_stem"/"pixel_head"/"pixel_dit": [F]}`.
    With `grads = params` it is the weights' squared norm instead (the magnitude score)."""
    m = cfg.model
    out = {}
    prod = jax.tree.map(lambda w, g: np.asarray(w, np.float64) * np.asarray(g, np.float64),
                        params, grads)
    mlp, heads = [], []
    for sub in SUB_BLOCKS:
        block = prod["blocks"][sub]
        mlp.append(block["mlp"]["fc2"]["kernel"].sum(axis=-1))  # [L, M]
        to_out = block["attn"]["to_out"]["kernel"]  # [L, H * e, d]
        heads.append(to_out.reshape(m.depth, m.num_heads, m.head_dim, -1).sum(axis=(-2, -1)))
    out["mlp"] = np.stack(mlp, axis=1)
    out["heads"] = np.stack(heads, axis=1)
    if m.pixel_channels:
        pix, f, c = prod["pixel"], m.pixel_channels, m.channels

        def writes(convs):  # sum over every weight writing output channel j, plus its bias
            return sum(conv["kernel"].reshape(-1, f).sum(axis=0) + conv["bias"] for conv in convs)

        out["pixel_stem"] = writes([pix["stem_in"], *pix["stem"].values()])
        out["pixel_head"] = writes([pix["head_in"], *pix["head"].values()])
        p2 = m.patch_size ** 2
        final = prod["final_layer"]["linear"]
        out["pixel_dit"] = (final["kernel"].reshape(-1, p2, c + f)[..., c:].sum(axis=(0, 1))
                            + final["bias"].reshape(p2, c + f)[:, c:].sum(axis=0))
    return out


def score_units(cfg: Config, params: dict, *, score: str = "taylor", clips: int = 2,
                frames: int = 8, batch_clips: int = 6, seed: int = 0,
                progress=lambda done, total: None) -> dict[str, np.ndarray]:
    """Importance of every prunable unit (module docstring): larger is more important.
    `params` is the model's pure dict of trained parameters. Taylor scores stream `clips`
    validation clips of every task, `frames` frames each, `batch_clips` clips per gradient."""
    if score not in SCORES:
        raise ConfigError(f"prune score {score!r}, expected one of {SCORES}")
    if score == "magnitude":
        return {k: np.sqrt(np.abs(v)) for k, v in _gate_terms(params, params, cfg).items()}
    if cfg.codec != "pixel":
        raise ConfigError(f"taylor scores read validation clips in pixel space; this model's "
                          f"codec is {cfg.codec!r}: use --score magnitude")
    _, _, cond, target, prompt_bp = heldout_pairs(cfg, clips=clips, frames=frames, seed=seed,
                                                  split="validation")
    codec = PixelCodec(cfg.model.frame_height, cfg.model.frame_width)
    plain = dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, shortcut=False,
        history_aug=dataclasses.replace(cfg.diffusion.history_aug, enabled=False)))
    apply, process = model_apply_fn(plain), make_process(plain.diffusion)

    @jax.jit
    def grad_fn(p, batch, rng):
        return jax.grad(lambda q: objectives.loss_fn(apply, q, batch, rng, plain, process)[0])(p)

    totals = None
    starts = list(range(0, len(cond), batch_clips))
    for i, start in enumerate(starts):
        rows = slice(start, start + batch_clips)
        batch = {"target": codec.encode(target[rows]), "cond": codec.encode(cond[rows])}
        if prompt_bp is not None:
            batch["prompt"] = jnp.asarray(prompt_bp[rows])
        grads = grad_fn(params, batch, jax.random.PRNGKey(seed * 7919 + i))
        terms = {k: v ** 2 for k, v in _gate_terms(params, jax.device_get(grads), cfg).items()}
        totals = terms if totals is None else {k: totals[k] + terms[k] for k in totals}
        progress(i + 1, len(starts))
    return totals


# ----------------------------------------------------------------------------- plan and cut


def check_widths(cfg: Config, widths: Widths, align: int) -> None:
    """Every width to cut to is positive, no wider than today's, and a multiple of `align` (for
    heads: the attention width `heads * head_width`); else a `ConfigError` naming it."""
    m = cfg.model
    if align < 1:
        raise ConfigError(f"--align {align}, expected a tile width >= 1")
    checks = (("--mlp-width", widths.mlp, m.mlp_width, 1),
              ("--heads", widths.heads, m.num_heads, m.head_dim),
              ("--pixel-channels", widths.pixel, m.pixel_channels, 1))
    for flag, width, today, unit in checks:
        if width is None:
            continue
        if not 1 <= width <= today:
            raise ConfigError(f"{flag} {width}, expected 1..{today} (this model's width)")
        if (width * unit) % align:
            what = f"{width} heads x {unit} wide = {width * unit}" if unit > 1 else str(width)
            raise ConfigError(f"{flag} {width}: {what} is not a multiple of --align {align}")


def keep_indices(scores: dict[str, np.ndarray], widths: Widths) -> dict[str, np.ndarray]:
    """The units each group keeps: the `width` best of every layer (ascending index order)."""
    def top(s, k):
        return np.sort(np.argsort(-s, axis=-1, kind="stable")[..., :k], axis=-1)

    keep = {}
    if widths.mlp is not None:
        keep["mlp"] = top(scores["mlp"], widths.mlp)
    if widths.heads is not None:
        keep["heads"] = top(scores["heads"], widths.heads)
    if widths.pixel is not None:
        for name in ("pixel_stem", "pixel_head", "pixel_dit"):
            keep[name] = top(scores[name], widths.pixel)
    return keep


def pruned_config(cfg: Config, widths: Widths) -> Config:
    m = cfg.model
    model = dataclasses.replace(
        m,
        mlp_ratio=m.mlp_ratio if widths.mlp is None else widths.mlp / m.hidden_size,
        num_heads=m.num_heads if widths.heads is None else widths.heads,
        head_width=m.head_width if widths.heads is None else m.head_dim,
        pixel_channels=m.pixel_channels if widths.pixel is None else widths.pixel)
    return dataclasses.replace(cfg, model=model)


def cut(cfg: Config, params: dict, keep: dict[str, np.ndarray]) -> dict:
    """`params` (a pure dict) with only the kept units: the weights of the pruned model."""
    m = cfg.model
    p = jax.tree.map(np.asarray, params)
    take = np.take_along_axis

    for si, sub in enumerate(SUB_BLOCKS):
        block = p["blocks"][sub]
        if "mlp" in keep:
            idx = keep["mlp"][:, si]  # [L, k]
            fc1, fc2 = block["mlp"]["fc1"], block["mlp"]["fc2"]
            fc1["kernel"] = take(fc1["kernel"], idx[:, None, :], axis=2)
            fc1["bias"] = take(fc1["bias"], idx, axis=1)
            fc2["kernel"] = take(fc2["kernel"], idx[:, :, None], axis=1)
        if "heads" in keep:
            idx = keep["heads"][:, si]  # [L, k]
            attn, e, d = block["attn"], m.head_dim, m.hidden_size
            qkv = attn["to_qkv"]["kernel"].reshape(m.depth, d, 3, m.num_heads, e)
            qkv = take(qkv, idx[:, None, None, :, None], axis=3)
            attn["to_qkv"]["kernel"] = qkv.reshape(m.depth, d, -1)
            if "bias" in attn["to_qkv"]:
                bias = attn["to_qkv"]["bias"].reshape(m.depth, 3, m.num_heads, e)
                attn["to_qkv"]["bias"] = take(bias, idx[:, None, :, None], axis=2).reshape(
                    m.depth, -1)
            out = attn["to_out"]["kernel"].reshape(m.depth, m.num_heads, e, d)
            attn["to_out"]["kernel"] = take(out, idx[:, :, None, None], axis=1).reshape(
                m.depth, -1, d)

    if any(k.startswith("pixel") for k in keep):
        pix, f, c, cc = p["pixel"], m.pixel_channels, m.channels, m.cond_channels
        stem, head, dit = keep["pixel_stem"], keep["pixel_head"], keep["pixel_dit"]
        p2 = m.patch_size ** 2

        def conv(layer, inputs, outputs):
            layer["kernel"] = layer["kernel"][:, :, inputs][..., outputs]
            layer["bias"] = layer["bias"][outputs]

        conv(pix["stem_in"], np.arange(cc), stem)
        for layer in pix["stem"].values():
            conv(layer, stem, stem)
        head_inputs = np.concatenate([np.arange(c), c + dit, c + f + stem,
                                      c + 2 * f + np.arange(cc)])
        conv(pix["head_in"], head_inputs, head)
        for layer in pix["head"].values():
            conv(layer, head, head)
        mod = pix["head_modulation"]
        chunks = 2 * (len(pix["head"]) + 1)
        mod["kernel"] = mod["kernel"].reshape(-1, chunks, f)[..., head].reshape(m.hidden_size, -1)
        mod["bias"] = mod["bias"].reshape(chunks, f)[:, head].reshape(-1)
        pix["out"]["kernel"] = pix["out"]["kernel"][:, :, head]
        emb = p["pixel_embedder"]
        emb["kernel"] = emb["kernel"].reshape(p2, f, -1)[:, stem].reshape(-1, m.hidden_size)
        final = p["final_layer"]["linear"]
        columns = np.concatenate([np.arange(c), c + dit])
        final["kernel"] = final["kernel"].reshape(m.hidden_size, p2, c + f)[..., columns].reshape(
            m.hidden_size, -1)
        final["bias"] = final["bias"].reshape(p2, c + f)[:, columns].reshape(-1)
    return p


def prune(cfg: Config, params: dict, widths: Widths, *, align: int = 16,
          score: str = "taylor", clips: int = 2, frames: int = 8, seed: int = 0,
          progress=lambda done, total: None) -> tuple[Config, dict, dict]:
    """`(pruned config, pruned params, record)`; `record` holds the widths before and after and
    the share of each group's score the kept units carry."""
    check_widths(cfg, widths, align)
    scores = score_units(cfg, params, score=score, clips=clips, frames=frames, seed=seed,
                         progress=progress)
    keep = keep_indices(scores, widths)
    new_cfg = pruned_config(cfg, widths)
    record = {"score": score, "align": align, "groups": {}}
    for name, idx in keep.items():
        s = scores[name]
        kept = np.take_along_axis(s, idx, axis=-1).sum()
        record["groups"][name] = {"before": int(s.shape[-1]), "after": int(idx.shape[-1]),
                                  "score_kept": float(kept / max(s.sum(), 1e-30)),
                                  "kept": idx.tolist()}
    return new_cfg, cut(cfg, params, keep), record
