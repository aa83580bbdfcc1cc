"""The attention seam (docs/DESIGN.md section 7): entry points that carry the structure of each
attention the model runs, never a dense mask, selected by `model.attention_impl` from the kernel
table (`lsd_jax.kernels`).

An implementation is an `AttentionImpl` of three functions. Arrays are in the model's layout,
`[b, t, n, heads, e]` (frames, then tokens of a frame, then heads); queries and keys arrive
**un-rotated** with the rotary angles beside them, so an implementation may rotate inside its
kernel. Scale is `1/sqrt(e)`; the output has the queries' shape and dtype.

- `spatial(q, k, v, *, angles, interleaved)`: every token attends to every token of its own
  frame. `angles` `[n, e/2]` float32 are the token grid's 2-D axial angles.
- `temporal_band(q, k, v, *, window, angles, interleaved)`: each token position attends over the
  same position in frames `i - window + 1 .. i` (causal, banded). `angles` `[t, e/2]` are the
  angles of frame positions `0 .. t-1`.
- `temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved)`: one new
  frame (`q, k_new, v_new` `[b, 1, n, heads, e]`) attends over itself and one layer's ring-buffer
  cache read in place: `cache_k, cache_v` `[b, s, n, heads, e]` in the cache's dtype, keys
  un-rotated; `age` int32 `[s]` the age of each slot (1 .. s), `valid` bool `[b, s]` which slots
  hold each stream's history. `angles` `[window, e/2]` are the angles of window positions
  `0 .. window-1`: the new frame sits at `window - 1`, a cached frame of age `a` at
  `window - 1 - a`. Invalid slots are masked out.

`reference(attend)` builds the three from a dense-mask core
`attend(q_...qhd, k_...khd, v_...khd, mask) -> out_...qhd` (any leading axes, mask None or boolean
broadcastable to `[..., heads, q, k]`): it rotates, joins the cache and the new frame, and builds
the masks. "xla" is that around `xla_attention` (float32 logits and softmax) and is the reference
every other implementation is tested against; "jax_nn" is that around
`jax.nn.dot_product_attention`; "cudnn" is "xla" with the spatial entry around
`jax.nn.dot_product_attention(implementation="cudnn")`, the vendor bar for the spatial kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lsd_jax import rope


class AttentionImpl(NamedTuple):
    spatial: Callable[..., jnp.ndarray]
    temporal_band: Callable[..., jnp.ndarray]
    temporal_cache: Callable[..., jnp.ndarray]


def get_attention(name: str, *, dtype: str | None = None,
                  platform: str | None = None) -> AttentionImpl:
    """The implementation `model.attention_impl = name` (`kernels.select`)."""
    from lsd_jax.kernels import select

    return select("attention", name, dtype=dtype, platform=platform)


def xla_attention(q, k, v, mask=None):
    """Softmax attention, heads moved ahead of tokens for the two products (XLA:CPU runs
    `[heads, q, e] x [heads, k, e]` faster than the token-major layout), float32 logits, and the
    softmax's division applied to the `[q, heads, e]` output rather than the `[heads, q, k]`
    weights (flash attention's order: fewer divisions, the same result)."""
    scale = q.shape[-1] ** -0.5
    heads_first = lambda a: jnp.swapaxes(a, -2, -3)  # noqa: E731  [..., n, h, e] -> [..., h, n, e]
    logits = jnp.einsum("...hqd,...hkd->...hqk", heads_first(q), heads_first(k),
                        preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("...hqk,...hkd->...hqd", weights.astype(v.dtype), heads_first(v),
                     preferred_element_type=jnp.float32) / total
    return heads_first(out).astype(v.dtype)


def jax_nn_attention(q, k, v, mask=None):
    """`jax.nn.dot_product_attention` (XLA's fused path where it has one), leading axes flat."""
    lead = q.shape[:-3]
    flat = lambda a: a.reshape(-1, *a.shape[-3:])  # noqa: E731
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*lead, q.shape[-2], q.shape[-3], k.shape[-3]))
        mask = mask.reshape(-1, *mask.shape[-3:])
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


def cudnn_attention(q, k, v, mask=None):
    """`jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention
    (forward and backward; CUDA, 16-bit inputs), leading axes flat. No mask: used for the
    spatial entry only."""
    if mask is not None:
        raise ValueError("cudnn_attention takes no mask (the spatial entry has none)")
    lead = q.shape[:-3]
    flat = lambda a: a.reshape(-1, *a.shape[-3:])  # noqa: E731
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation="cudnn")
    return out.reshape(*lead, *out.shape[-3:])


def band_mask(num_frames: int, window: int) -> jnp.ndarray:
    """bool `[t, t]`: query frame `i` may attend to key frame `j` when `0 <= i - j < window`."""
    pos_t = jnp.arange(num_frames)
    offset_tt = pos_t[:, None] - pos_t[None, :]
    return (offset_tt >= 0) & (offset_tt < window)


def reference(attend) -> AttentionImpl:
    """The three entry points around the dense-mask core `attend` (see the module docstring)."""

    def spatial(q, k, v, *, angles, interleaved):
        angles_n1e = angles[:, None, :]
        q = rope.apply_rope(q, angles_n1e, interleaved=interleaved)
        k = rope.apply_rope(k, angles_n1e, interleaved=interleaved)
        return attend(q, k, v, None)

    def temporal_band(q, k, v, *, window, angles, interleaved):
        angles_t11e = angles[:, None, None, :]
        band_tt = band_mask(q.shape[1], window)
        # Attend over frames at each token: move tokens ahead of frames.
        q = rope.apply_rope(q, angles_t11e, interleaved=interleaved).swapaxes(1, 2)
        k = rope.apply_rope(k, angles_t11e, interleaved=interleaved).swapaxes(1, 2)
        return attend(q, k, v.swapaxes(1, 2), band_tt).swapaxes(1, 2)

    def temporal_cache(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles, interleaved):
        new_pos = angles.shape[0] - 1
        angles_e = angles[new_pos]
        angles_s11e = angles[new_pos - age][:, None, None, :]
        q = rope.apply_rope(q, angles_e, interleaved=interleaved)
        k_new = rope.apply_rope(k_new, angles_e, interleaved=interleaved)
        k_cache = rope.apply_rope(cache_k, angles_s11e, interleaved=interleaved)
        k_all = jnp.concatenate([k_cache.astype(k_new.dtype), k_new], axis=1).swapaxes(1, 2)
        v_all = jnp.concatenate([cache_v.astype(v_new.dtype), v_new], axis=1).swapaxes(1, 2)
        # [b, 1 query, s + 1 keys], broadcast over tokens and heads.
        mask_b11qk = jnp.concatenate(
            [valid, jnp.ones_like(valid[:, :1])], axis=1)[:, None, None, None, :]
        return attend(q.swapaxes(1, 2), k_all, v_all, mask_b11qk).swapaxes(1, 2)

    return AttentionImpl(spatial, temporal_band, temporal_cache)


def temporal_cache_elementwise(q, k_new, v_new, cache_k, cache_v, *, age, valid, angles,
                               interleaved):
    """`temporal_cache` as products and sums over the `s + 1` keys of each token and head: with
    one query per token the attention is too small for matrix products, which only add layout
    copies. Computes what `reference(...).temporal_cache` computes."""
    new_pos = angles.shape[0] - 1
    q = rope.apply_rope(q, angles[new_pos], interleaved=interleaved)
    k_new = rope.apply_rope(k_new, angles[new_pos], interleaved=interleaved)
    k_cache = rope.apply_rope(cache_k, angles[new_pos - age][:, None, None, :],
                              interleaved=interleaved)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    q = f32(q) * q.shape[-1] ** -0.5  # [b, 1, n, h, e]
    logits_cache = jnp.sum(q * f32(k_cache), axis=-1)  # [b, s, n, h]
    logits_cache = jnp.where(valid[:, :, None, None], logits_cache, -jnp.inf)
    logits_new = jnp.sum(q * f32(k_new), axis=-1)  # [b, 1, n, h]
    top = jnp.maximum(jnp.max(logits_cache, axis=1, keepdims=True), logits_new)
    w_cache, w_new = jnp.exp(logits_cache - top), jnp.exp(logits_new - top)
    total = jnp.sum(w_cache, axis=1, keepdims=True) + w_new
    out = (jnp.sum(w_cache[..., None] * f32(cache_v), axis=1, keepdims=True)
           + w_new[..., None] * f32(v_new)) / total[..., None]
    return out.astype(v_new.dtype)


# The dense-mask form of all three entry points: the plainest statement of what they compute.
DENSE = reference(xla_attention)
XLA = DENSE._replace(temporal_cache=temporal_cache_elementwise)
JAX_NN = reference(jax_nn_attention)
# The vendor's flash attention for the spatial entry, the reference's XLA paths for the temporal
# ones (a handful of keys per query: nothing for a fused attention to win).
CUDNN = XLA._replace(spatial=reference(cudnn_attention).spatial)
