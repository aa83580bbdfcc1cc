"""FLOPs of the DiT: analytic counts, and the matmul FLOPs of a compiled XLA program.

Analytic (`dit_flops`, `frame_pass_flops`, `streamed_frame_flops`): matmul FLOPs only, `2*m*n*k`
per matmul, for one stream (multiply by the batch). Norms, activations, softmax and RoPE are
elementwise, `O(tokens * hidden)` against the matmuls' `O(tokens * hidden^2)`, and left out, as is
usual for model-FLOPs figures. Per frame and per pass, with `N` tokens per frame, `D` hidden size,
`M` MLP width, `K` frames each temporal query attends over:

- patch embed `2 N (p^2 C_in) D`; final layer `2 N D (p^2 C)` + adaLN `2 D 2D`;
- conditioning vector: noise-level MLP `2 (F D + D D)`, step-size MLP (same), external `2 E D`,
  prompt `2 P D` (once per clip: the prompt is per stream, not per frame);
- per block, spatial and temporal sub-block each: adaLN `2 D 6D`, qkv `2 N D 3A`, out `2 N A D`,
  MLP `2 N D M * 2`; attention scores + weighted sum `4 N N A` (spatial) or `4 N K A`
  (temporal), `A` the attention width (`num_heads * head_dim`, `D` unless heads were pruned);
- the pixel path (`model.pixel_channels = F > 0`, `P = H W` pixels, `L = pixel_depth`), whose
  convolutions are matmuls too: stem `2 P 9 C_cond F + (L-1) 2 P 9 F F`, its patch embed
  `2 N p^2 F D`, head `2 P 9 (2F + C_cond + C) F + L 2 P 9 F F + 2 P F C` + modulation
  `2 D 2F(L+1)`; the final layer then outputs `p^2 (C + F)` per token;
- the colour map (`model.color_map`, `K` features per pixel): coefficients `2 D C K`, applied
  `2 P C K` (making the features, a few elementwise operations per pixel, is not counted).

One streaming pass is one frame with `K = window` (the `window - 1` cached frames plus itself).
A streamed frame costs `steps` denoising passes plus one pass that writes its K/V to the cache
(`diffusion.cache_from="context"`; with "last_step" the last denoising pass's K/V are cached and
there is no such pass); that pass's prediction is unused, so it has no final layer (nor pixel
head). What depends on the input frame alone is computed once per frame: the prompt projection,
the pixel stem with its patch embed, the input frame's half of the patch embed, and the stem
features' and input frame's half of the pixel head's first convolution (XLA removes the dead
final layer and hoists the others out of the denoising loop, so the compiled step does exactly
this much matmul work). The temporal attention of a streamed pass (one query per token over `K`
keys: `4 N K A`) runs as elementwise products and sums on XLA, not as matmuls, and is left out of
the streamed count.

`hlo_matmul_flops` counts the dot and convolution FLOPs of a compiled program's HLO text, running
each while loop body its known trip count. XLA's own `cost_analysis()` counts a loop body once,
so for a program with `lax.scan` over layers or denoising steps its figure is several times low.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from lsd_jax.config import Config, ModelConfig


def dit_flops(cfg: ModelConfig, *, frames: int, keys_per_frame: int) -> dict[str, int]:
    """Matmul FLOPs of one DiT forward over `frames` frames of one stream, by component.

    `keys_per_frame` is how many frames each temporal query is computed against: the window
    `W` for a streaming pass, the clip length `T` for the masked dense full-clip forward.
    """
    n, d, p = cfg.tokens_per_frame, cfg.hidden_size, cfg.patch_size
    mlp, a = cfg.mlp_width, cfg.attention_width
    time_mlp = 2 * (cfg.freq_embed_dim * d + d * d)
    sub_block_linear = 2 * d * 6 * d + 2 * n * d * 3 * a + 2 * n * a * d + 2 * 2 * n * d * mlp
    counts = {
        "patch_embed": 2 * n * p * p * (cfg.channels + cfg.cond_channels) * d * frames,
        "conditioning": (time_mlp * (2 if cfg.use_step_size else 1)
                         + 2 * cfg.external_cond_dim * d) * frames,
        "prompt": 2 * cfg.prompt_dim * d,
        "block_linear": 2 * cfg.depth * sub_block_linear * frames,
        "spatial_attention": cfg.depth * 4 * n * n * a * frames,
        "temporal_attention": cfg.depth * 4 * n * keys_per_frame * a * frames,
        "final_layer": (2 * d * 2 * d + 2 * n * d * p * p * (cfg.channels + cfg.pixel_channels))
        * frames,
    }
    if cfg.color_map != "none":
        from lsd_jax.model import num_color_features

        k = num_color_features(cfg.cond_channels, cfg.color_map)
        counts["color_map"] = (2 * d * cfg.channels * k
                               + 2 * cfg.frame_height * cfg.frame_width * cfg.channels * k) * frames
    f, depth = cfg.pixel_channels, cfg.pixel_depth
    if f:
        pixels = cfg.frame_height * cfg.frame_width
        conv3 = lambda c_in, c_out: 2 * pixels * 9 * c_in * c_out  # noqa: E731
        counts["pixel_stem"] = (conv3(cfg.cond_channels, f) + (depth - 1) * conv3(f, f)) * frames
        counts["pixel_embed"] = 2 * n * p * p * f * d * frames
        counts["pixel_head"] = (conv3(2 * f + cfg.cond_channels + cfg.channels, f)
                                + depth * conv3(f, f) + 2 * pixels * f * cfg.channels
                                + 2 * d * 2 * f * (depth + 1)) * frames
    counts["total"] = sum(counts.values())
    return counts


def frame_pass_flops(cfg: ModelConfig) -> int:
    """One streaming pass of one frame: temporal attention over the `window` frames."""
    return dit_flops(cfg, frames=1, keys_per_frame=cfg.window)["total"]


def streamed_frame_flops(cfg: Config, steps: int | None = None) -> int:
    """One streamed frame: `steps` denoising passes (default the config's) + one cache-write pass
    (none with `diffusion.cache_from="last_step"`).

    The cache-write pass has no final layer nor pixel head; what depends on the input frame alone
    (the prompt projection, the pixel stem and its patch embed, the input frame's half of the patch
    embed and of the pixel head's first convolution) is counted once (see the module docstring).
    """
    m = cfg.model
    steps = cfg.diffusion.sample_steps if steps is None else steps
    parts = dit_flops(m, frames=1, keys_per_frame=m.window)
    once = (parts["prompt"] + parts.get("pixel_stem", 0) + parts.get("pixel_embed", 0)
            + 2 * m.tokens_per_frame * m.patch_size ** 2 * m.cond_channels * m.hidden_size)
    if m.pixel_channels:
        f = m.pixel_channels
        once += 2 * m.frame_height * m.frame_width * 9 * (f + m.cond_channels) * f
    # The streaming step's attention over the cache (one query per token) is products and sums,
    # not matmuls: elementwise work, left out like the rest (`attention.XLA.temporal_cache`).
    per_pass = parts["total"] - once - parts["temporal_attention"]
    output = parts["final_layer"] + parts.get("pixel_head", 0) + parts.get("color_map", 0)
    if m.pixel_channels:
        output -= 2 * m.frame_height * m.frame_width * 9 * (f + m.cond_channels) * f
    cache_pass = 0 if cfg.diffusion.cache_from == "last_step" else per_pass - output
    return steps * per_pass + cache_pass + once


# ----------------------------------------------------------------------------- compiled HLO


class HloFlops(NamedTuple):
    """Dot + convolution FLOPs of an HLO module; `unknown_trip_counts` while loops without a
    known trip count were counted once (their figure is then a lower bound)."""

    flops: int
    unknown_trip_counts: int


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _split_type(rest: str) -> tuple[str, str]:
    """`'f32[2,3]{1,0} dot(...)'` -> `('f32[2,3]{1,0}', 'dot(...)')`; tuple types are balanced."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _dims(type_text: str) -> tuple[int, ...] | None:
    match = _SHAPE.match(type_text)
    if match is None:
        return None
    return tuple(int(x) for x in match.group(1).split(",") if x)


def _operand_names(call_text: str) -> list[str]:
    """Operand names of `op(a, b), attr=...`: the text inside the first balanced parentheses."""
    depth, start = 0, call_text.index("(")
    for i in range(start, len(call_text)):
        depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(call_text[i], 0)
        if depth == 0:
            inner = call_text[start + 1 : i]
            break
    names, depth, token = [], 0, ""
    for ch in inner + ",":
        depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            names.append(token.strip().split()[-1].lstrip("%"))
            token = ""
        else:
            token += ch
    return names


def _attr(text: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=(\{{[^}}]*\}}|[^\s,]+)", text)
    return match.group(1) if match else None


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """An HLO module's text -> `({computation: [(instruction, result type, op text)]}, entry)`."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        match = _INSTRUCTION.match(line)
        if current is not None and match:
            type_text, op_text = _split_type(match.group(2))
            computations[current].append((match.group(1), type_text, op_text))
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def hlo_matmul_flops(hlo_text: str) -> HloFlops:
    """Dot and convolution FLOPs (`2 * out elements * contraction size`) of an HLO module text.

    Follows fusions and calls once, while bodies `known_trip_count` times (XLA annotates loops
    from `lax.scan`/`fori_loop` in optimized HLO), conditionals by their most expensive branch.
    Works on `compiled.as_text()` and on pre-optimization HLO.
    """
    computations, entry = parse_hlo(hlo_text)

    unknown = 0
    memo: dict[str, int] = {}

    def computation_flops(name: str) -> int:
        nonlocal unknown
        if name in memo:
            return memo[name]
        instructions = computations[name]
        shapes = {inst: _dims(type_text) for inst, type_text, _ in instructions}
        total = 0
        for _, type_text, op_text in instructions:
            op = op_text.split("(", 1)[0]
            if op == "dot":
                lhs = shapes[_operand_names(op_text)[0]]
                contracting = _attr(op_text, "lhs_contracting_dims").strip("{}")
                k = math.prod(lhs[int(i)] for i in contracting.split(",") if i)
                total += 2 * math.prod(_dims(type_text)) * k
            elif op == "convolution":
                rhs = shapes[_operand_names(op_text)[1]]
                rhs_labels = _attr(op_text, "dim_labels").split("_")[1].split("->")[0]
                out_features = rhs[rhs_labels.index("o")]
                total += 2 * math.prod(_dims(type_text)) * math.prod(rhs) // out_features
            elif op == "while":
                trip = _TRIP_COUNT.search(op_text)
                if trip is None:
                    unknown += 1
                total += (int(trip.group(1)) if trip else 1) * computation_flops(
                    _attr(op_text, "body").lstrip("%"))
            elif op == "conditional":
                branches = re.findall(r"%?([\w.\-]+)", _attr(op_text, "branch_computations") or "")
                branches += [_attr(op_text, a).lstrip("%") for a in
                             ("true_computation", "false_computation") if _attr(op_text, a)]
                total += max((computation_flops(b) for b in branches), default=0)
            else:
                # Fusions, calls and async wrappers run their computation once; the to_apply of
                # reduce/map/sort/scatter is a scalar function with no matmuls.
                callee = _attr(op_text, "calls") or (_attr(op_text, "to_apply")
                                                     if op == "call" else None)
                if callee:
                    total += computation_flops(callee.lstrip("%"))
        memo[name] = total
        return total

    flops = computation_flops(entry)
    return HloFlops(flops, unknown)
