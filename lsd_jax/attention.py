"""Attention implementations selectable by config (`model.attention_impl`).

Every implementation has the signature

    attend(q_...qhd, k_...khd, v_...khd, mask) -> out_...qhd

with any number of leading batch axes, sequence before heads, and `mask` either None or a boolean
array broadcastable to `[..., heads, q, k]` (True = may attend). Scale is `1/sqrt(head_dim)`.
"xla" is the pure-JAX reference (logits and softmax in float32); kernels in `pallas_kernels/`
register themselves here under their own names, so the model never changes to use them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jnp.ndarray]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str, fn: AttentionFn) -> None:
    _REGISTRY[name] = fn


def get_attention(name: str) -> AttentionFn:
    if name not in _REGISTRY and name.startswith("pallas"):
        import pallas_kernels  # noqa: F401  (registers its kernels on import)
    if name not in _REGISTRY:
        from lsd_jax.errors import ConfigError

        raise ConfigError(f"model.attention_impl={name!r} is not one of "
                          f"{', '.join(map(repr, sorted(_REGISTRY)))}")
    return _REGISTRY[name]


def xla_attention(q, k, v, mask=None):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


def jax_nn_attention(q, k, v, mask=None):
    """`jax.nn.dot_product_attention` (XLA's fused path where it has one), leading axes flat."""
    lead = q.shape[:-3]
    flat = lambda a: a.reshape(-1, *a.shape[-3:])  # noqa: E731
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*lead, q.shape[-2], q.shape[-3], k.shape[-3]))
        mask = mask.reshape(-1, *mask.shape[-3:])
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


register("xla", xla_attention)
register("jax_nn", jax_nn_attention)
