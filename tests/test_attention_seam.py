"""The kernel seam (docs/DESIGN.md section 7): every implementation in the kernel table against
the reference, for every attention the model runs (spatial, banded temporal, the ring-buffer
cache with a rotated ring and invalid slots) and the norm + modulate, in float32 and bfloat16,
forward and, where training uses it, gradient. The reference itself is checked against a plain
float64 oracle that rotates, orders and drops history frames by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from lsd_jax import kernels, rope
from lsd_jax.attention import DENSE, XLA, AttentionImpl
from lsd_jax.config import ModelConfig
from lsd_jax.errors import ConfigError
from lsd_jax.norm import XLA as NORM_XLA
from lsd_jax.norm import NormImpl

ATTENTION_IMPLS = kernels.kernel_names("attention")
NORM_IMPLS = kernels.kernel_names("norm")
# The policy: float32 to 1e-5 relative; bfloat16 (8 significant bits, 2^-8 = 3.9e-3 per rounding,
# a handful of roundings between input and output) to 2e-2, against the float32 reference on the
# same bfloat16-rounded inputs.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
HEADS, HEAD_DIM = 2, 8
GRID = (3, 4)
BAND_FRAMES, WINDOW = 7, 4


def _normal(key, shape, dtype):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def _case(kind: str, dtype, interleaved: bool):
    """(entry point name, array arguments, static keyword arguments) of one attention kind."""
    dt = jnp.dtype(dtype)
    n = GRID[0] * GRID[1]
    if kind == "spatial":
        shape = (2, 2, n, HEADS, HEAD_DIM)
        arrays = tuple(_normal(i, shape, dt) for i in range(3))
        angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(HEAD_DIM)), *GRID)
        return "spatial", arrays, dict(angles=angles, interleaved=interleaved)
    freqs = jnp.asarray(rope.temporal_frequencies(HEAD_DIM))
    if kind == "temporal_band":
        shape = (2, BAND_FRAMES, 3, HEADS, HEAD_DIM)
        arrays = tuple(_normal(i, shape, dt) for i in range(3))
        angles = rope.temporal_angles(freqs, jnp.arange(BAND_FRAMES))
        return "temporal_band", arrays, dict(window=WINDOW, angles=angles, interleaved=interleaved)
    # The ring of s = WINDOW - 1 slots after the next write slot has moved to 2 (a rotated ring);
    # stream 0 has a full history, stream 1 one frame, stream 2 none.
    s, batch = WINDOW - 1, 3
    new = tuple(_normal(i, (batch, 1, 3, HEADS, HEAD_DIM), dt) for i in range(3))
    cache = tuple(_normal(3 + i, (batch, s, 3, HEADS, HEAD_DIM), dt) for i in range(2))
    slot = 2
    age = ((slot - 1 - jnp.arange(s)) % s + 1).astype(jnp.int32)
    valid = age[None, :] <= jnp.asarray([s, 1, 0])[:, None]
    angles = rope.temporal_angles(freqs, jnp.arange(WINDOW))
    return "temporal_cache", (*new, *cache), dict(age=age, valid=valid, angles=angles,
                                                  interleaved=interleaved)


# ----------------------------------------------------------------------------- float64 oracle


def _rot(x, angles, interleaved):
    """Rotate the last axis of float64 `x` by `angles` (broadcastable `[..., e/2]`)."""
    cos, sin = np.cos(angles), np.sin(angles)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softmax_attend(q_qhe, k_khe, v_khe):
    logits = np.einsum("qhe,khe->hqk", q_qhe, k_khe) / np.sqrt(q_qhe.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hqk,khe->qhe", weights, v_khe)


def _oracle(kind, arrays, kw):
    a = [np.asarray(x, np.float64) for x in arrays]
    angles = np.asarray(kw["angles"], np.float64)
    il = kw["interleaved"]
    if kind == "spatial":
        q, k, v = a
        q, k = _rot(q, angles[:, None, :], il), _rot(k, angles[:, None, :], il)
        out = np.empty_like(q)
        for b in range(q.shape[0]):
            for t in range(q.shape[1]):
                out[b, t] = _softmax_attend(q[b, t], k[b, t], v[b, t])
        return out
    if kind == "temporal_band":
        q, k, v = a
        q, k = _rot(q, angles[:, None, None, :], il), _rot(k, angles[:, None, None, :], il)
        out = np.empty_like(q)
        for i in range(q.shape[1]):
            lo = max(0, i - kw["window"] + 1)
            for b in range(q.shape[0]):
                for j in range(q.shape[2]):
                    out[b, i, j] = _softmax_attend(q[b, i, j][None], k[b, lo:i + 1, j],
                                                   v[b, lo:i + 1, j])[0]
        return out
    # The cache: each stream's valid history in time order (oldest first), then the new frame.
    q, k_new, v_new, cache_k, cache_v = a
    age, valid = np.asarray(kw["age"]), np.asarray(kw["valid"])
    window = angles.shape[0]
    out = np.empty_like(q)
    for b in range(q.shape[0]):
        slots = [j for j in np.argsort(-age) if valid[b, j]]
        keys = [_rot(cache_k[b, j], angles[window - 1 - age[j]], il) for j in slots]
        keys.append(_rot(k_new[b, 0], angles[window - 1], il))
        values = [cache_v[b, j] for j in slots] + [v_new[b, 0]]
        qb = _rot(q[b, 0], angles[window - 1], il)
        k_tnhe, v_tnhe = np.stack(keys), np.stack(values)
        for j in range(q.shape[2]):
            out[b, 0, j] = _softmax_attend(qb[j][None], k_tnhe[:, j], v_tnhe[:, j])[0]
    return out


KINDS = ("spatial", "temporal_band", "temporal_cache")
TRAINED = ("spatial", "temporal_band")  # the cache is read by the streaming step only


@pytest.mark.parametrize("impl", ["xla", "dense"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_float64_oracle(kind, interleaved, impl):
    """The "xla" row (its ring-buffer attention written as products and sums) and the dense-mask
    form of all three entry points, against the float64 oracle."""
    name, arrays, kw = _case(kind, "float32", interleaved)
    ref = {"xla": XLA, "dense": DENSE}[impl]
    out = jax.jit(lambda *a: getattr(ref, name)(*a, **kw))(*arrays)
    assert out.shape == arrays[0].shape and out.dtype == jnp.float32
    assert rel_err(out, _oracle(kind, arrays, kw)) <= TOL["float32"]


def test_cache_slots_never_valid_do_not_matter():
    """A stream with no history attends to its new frame alone, whatever the ring holds."""
    name, arrays, kw = _case("temporal_cache", "float32", True)
    q, k_new, v_new, cache_k, cache_v = arrays
    fn = jax.jit(lambda *a: XLA.temporal_cache(*a, **kw))
    base = fn(*arrays)
    other = fn(q, k_new, v_new, cache_k * 3.0 + 1.0, -cache_v)
    np.testing.assert_array_equal(np.asarray(base[2]), np.asarray(other[2]))
    np.testing.assert_allclose(np.asarray(base[2]), np.asarray(v_new[2]), rtol=1e-6)
    assert float(jnp.abs(base[:2] - other[:2]).max()) > 1e-3


# ----------------------------------------------------------------------------- every implementation


def _impl(kind: str, name: str, dtype: str):
    """The implementation `name`; a skip that says why where it cannot run here in `dtype`."""
    row, platform = kernels.entry(kind, name), kernels.current_platform()
    if platform not in row.platforms or dtype not in row.dtypes:
        pytest.skip(f"{kind} {name!r} runs on {', '.join(row.platforms)} in "
                    f"{', '.join(row.dtypes)}, not on {platform} in {dtype}")
    impl = kernels.select(kind, name, dtype=dtype)
    assert isinstance(impl, AttentionImpl if kind == "attention" else NormImpl)
    return impl


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl_name", ATTENTION_IMPLS)
def test_attention_impl_matches_reference(impl_name, kind, dtype):
    """Forward (and gradient, for the kinds training runs) against the reference computed in
    float32 on the same inputs."""
    impl = _impl("attention", impl_name, dtype)
    name, arrays, kw = _case(kind, dtype, True)
    ref_arrays = tuple(a.astype(jnp.float32) for a in arrays)
    fn = lambda impl: lambda *a: getattr(impl, name)(*a, **kw)  # noqa: E731
    out = jax.jit(fn(impl))(*arrays)
    assert out.shape == arrays[0].shape and out.dtype == jnp.dtype(dtype)
    assert rel_err(out, jax.jit(fn(XLA))(*ref_arrays)) <= TOL[dtype]
    if kind not in TRAINED:
        return
    cot = _normal(9, arrays[0].shape, jnp.float32)
    loss = lambda impl: lambda *a: jnp.sum(fn(impl)(*a).astype(jnp.float32) * cot)  # noqa: E731
    grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(*arrays)
    ref_grads = jax.jit(jax.grad(loss(XLA), argnums=(0, 1, 2)))(*ref_arrays)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.dtype(dtype)
        assert rel_err(g, ref) <= TOL[dtype]


def _norm_oracle(x, shift, scale, eps):
    x, shift, scale = (np.asarray(a, np.float64) for a in (x, shift, scale))
    mean = x.mean(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(np.square(x - mean).mean(-1, keepdims=True) + eps)
    return normed * (1 + scale) + shift


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl_name", NORM_IMPLS)
def test_norm_impl_matches_reference(impl_name, dtype):
    """`norm_modulate` and `residual_norm_modulate` on DiT-shaped inputs (per-frame shift, scale,
    gate), forward and gradient, against the reference in float32; the reference against the
    float64 formula."""
    impl, eps, dt = _impl("norm", impl_name, dtype), 1e-6, jnp.dtype(dtype)
    x = _normal(0, (2, 3, 5, 32), dt) * 3.0 + 1.0
    y = _normal(1, x.shape, dt)
    gate, shift, scale = (_normal(2 + i, (2, 3, 1, 32), dt) for i in range(3))
    args = (x, gate, y, shift, scale)
    ref_args = tuple(a.astype(jnp.float32) for a in args)

    def both(impl):
        def run(x, gate, y, shift, scale):
            h = impl.norm_modulate(x, shift, scale, eps=eps)
            r, h2 = impl.residual_norm_modulate(x, gate, y, shift, scale, eps=eps)
            return h, r, h2
        return run

    outs = jax.jit(both(impl))(*args)
    refs = jax.jit(both(NORM_XLA))(*ref_args)
    r64 = np.asarray(ref_args[0], np.float64) + np.asarray(gate, np.float64) * np.asarray(y)
    oracle = (_norm_oracle(ref_args[0], shift, scale, eps), r64,
              _norm_oracle(r64, shift, scale, eps))
    for out, ref, exact in zip(outs, refs, oracle, strict=True):
        assert out.shape == x.shape and out.dtype == dt
        assert rel_err(out, ref) <= TOL[dtype]
        assert rel_err(ref, exact) <= TOL["float32"]

    cots = tuple(_normal(7 + i, x.shape, jnp.float32) for i in range(3))
    loss = lambda impl: lambda *a: sum(  # noqa: E731
        jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(both(impl)(*a), cots, strict=True))
    grads = jax.jit(jax.grad(loss(impl), argnums=tuple(range(5))))(*args)
    ref_grads = jax.jit(jax.grad(loss(NORM_XLA), argnums=tuple(range(5))))(*ref_args)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == dt
        assert rel_err(g, ref) <= TOL[dtype]


# ----------------------------------------------------------------------------- the table


def test_table_rows_are_complete():
    seen = set()
    for k in kernels.TABLE:
        assert k.kind in kernels.KINDS and (k.kind, k.name) not in seen
        seen.add((k.kind, k.name))
        assert set(k.platforms) <= set(kernels.PLATFORMS) and k.platforms
        assert set(k.dtypes) <= {"float32", "bfloat16"} and k.dtypes
    assert {"xla", "jax_nn"} <= set(ATTENTION_IMPLS) and "xla" in NORM_IMPLS
    assert kernels.current_platform() in kernels.PLATFORMS


def test_selection_errors_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"model.attention_impl='magic' is not one of .*'xla'"):
        kernels.select("attention", "magic")
    with pytest.raises(ConfigError, match=r"model.norm_impl='magic' is not one of 'xla'"):
        ModelConfig(norm_impl="magic")
    row = kernels.Kernel("attention", "elsewhere", "lsd_jax.attention:XLA", ("tpu",),
                         ("bfloat16",), "a kernel for another platform")
    monkeypatch.setattr(kernels, "TABLE", (*kernels.TABLE, row))
    with pytest.raises(ConfigError) as err:
        kernels.select("attention", "elsewhere", platform="cpu")
    assert str(err.value) == ("model.attention_impl='elsewhere' cannot run on cpu: it runs on "
                              "tpu")
    with pytest.raises(ConfigError, match="does not support model.dtype='float32'") as err:
        kernels.select("attention", "elsewhere", dtype="float32", platform="tpu")
    assert "\n" not in str(err.value)
    assert kernels.select("attention", "elsewhere", dtype="bfloat16", platform="tpu") is XLA
