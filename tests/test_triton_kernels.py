"""The Triton ring-buffer attention (`lsd_kernels.triton_ring`) on a CPU machine: the
`@triton.jit` body under Triton's interpreter on torch CPU tensors against
`lsd_jax.attention.XLA.temporal_cache`, its `jax.export` for cuda (where jax_triton imports), and
its ahead-of-time compile for sm_90 (`lsd_kernels.triton_aot`): registers, spills, shared
memory. Each part skips, naming the package, where triton, torch or jax_triton is missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, rel_err
from test_attention_seam import TOL, _case

from lsd_jax import rope
from lsd_jax.attention import XLA

DTYPES = ("float32", "bfloat16")
CASES = ("seam", "strided")

# Runs in a fresh interpreter with TRITON_INTERPRET=1 (read when triton is imported). Each case's
# cache is one layer of a [b, s, layers, n, heads, e] ring whose other layer is NaN, so the kernel
# reads it in place through non-contiguous strides, and a wrong slot or layer shows.
_INTERPRET = """
import sys

import numpy as np
import torch

from lsd_kernels import triton_ring

torch.set_num_threads(1)
data, results = np.load(sys.argv[1]), {}
for key in sorted({name.split("/")[0] for name in data.files}):
    get = lambda name: data[f"{key}/{name}"]
    dtype = getattr(torch, str(get("dtype")))
    q, k_new, v_new = (torch.from_numpy(get(n)).to(dtype) for n in ("q", "k_new", "v_new"))
    b, s, n, heads, e = get("cache_k").shape
    ring = torch.full((2, b, s, 2, n, heads, e), float("nan"), dtype=dtype)
    ring[0, :, :, 1] = torch.from_numpy(get("cache_k")).to(dtype)
    ring[1, :, :, 1] = torch.from_numpy(get("cache_v")).to(dtype)
    cache_k, cache_v = ring[0, :, :, 1], ring[1, :, :, 1]
    age, angles = torch.from_numpy(get("age")), torch.from_numpy(get("angles"))
    valid = torch.from_numpy(get("valid").astype(np.int32))
    out = torch.empty_like(q)
    block_n = int(get("block_n")) or None
    grid, scalars, meta = triton_ring.launch(
        q.shape, cache_k.shape, angles.shape[0], interleaved=bool(get("interleaved")),
        x_strides=q.stride(), cache_strides=cache_k.stride(), valid_strides=valid.stride(),
        angle_strides=angles.stride(), block_n=block_n)
    triton_ring.ring_kernel()[grid](q, k_new, v_new, cache_k, cache_v, age, valid, angles,
                                    *scalars, out, **meta)
    results[key] = out.float().numpy()
np.savez(sys.argv[2], **results)
"""


def _strided_case(dtype: str, interleaved: bool):
    """21 tokens in blocks of 8 (a masked tail), e = 32, a ring of 5 slots whose next write slot
    is 3, stream 0 with 2 frames of history and stream 1 with all 5."""
    dt, (b, s, n, heads, e) = jnp.dtype(dtype), (2, 5, 21, 3, 32)
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dt)  # noqa: E731
    new = tuple(normal(keys[i], (b, 1, n, heads, e)) for i in range(3))
    cache = tuple(normal(keys[3 + i], (b, s, n, heads, e)) for i in range(2))
    age = ((3 - 1 - jnp.arange(s)) % s + 1).astype(jnp.int32)
    valid = age[None, :] <= jnp.asarray([2, s])[:, None]
    angles = rope.temporal_angles(jnp.asarray(rope.temporal_frequencies(e)), jnp.arange(s + 1))
    return (*new, *cache), dict(age=age, valid=valid, angles=angles, interleaved=interleaved), 8


def _cases():
    """{key: (arrays, keyword arguments, block_n or 0)} of every checked combination."""
    cases = {}
    for dtype in DTYPES:
        for interleaved in (True, False):
            _, arrays, kw = _case("temporal_cache", dtype, interleaved)
            cases[f"seam-{dtype}-{interleaved}"] = (arrays, kw, 0)
            cases[f"strided-{dtype}-{interleaved}"] = _strided_case(dtype, interleaved)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases, the kernel's outputs) from one interpreter run in a subprocess."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: Triton's interpreter runs on torch CPU tensors")
    cases, tmp = _cases(), tmp_path_factory.mktemp("triton_interpret")
    names = ("q", "k_new", "v_new", "cache_k", "cache_v")
    inputs = {}
    for key, (arrays, kw, block_n) in cases.items():
        for name, a in zip(names, arrays, strict=True):
            inputs[f"{key}/{name}"] = np.asarray(a.astype(jnp.float32))
        inputs[f"{key}/dtype"] = np.asarray(str(arrays[0].dtype))
        for name in ("age", "valid", "angles", "interleaved"):
            inputs[f"{key}/{name}"] = np.asarray(kw[name])
        inputs[f"{key}/block_n"] = np.asarray(block_n)
    np.savez(tmp / "in.npz", **inputs)
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", _INTERPRET, str(tmp / "in.npz"),
                          str(tmp / "out.npz")], env=env, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    with np.load(tmp / "out.npz") as out:
        return cases, dict(out)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel_matches_reference(interpreted, case, dtype, interleaved):
    """The kernel body under the interpreter against the reference in float32 on the same
    (for bfloat16, bfloat16-rounded) inputs: a rotated ring, invalid slots, a stream with no
    history (seam case), several token blocks with a masked tail (strided case)."""
    cases, outputs = interpreted
    key = f"{case}-{dtype}-{interleaved}"
    arrays, kw, _ = cases[key]
    ref = jax.jit(lambda *a: XLA.temporal_cache(*a, **kw))(
        *(a.astype(jnp.float32) for a in arrays))
    out = outputs[key]
    assert out.shape == arrays[0].shape and np.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]


def test_module_imports_without_triton():
    """Neither triton nor jax_triton is imported until a kernel is built or called."""
    code = ("import sys; import lsd_kernels.triton_ring, lsd_kernels.triton_aot; "
            "assert not {'triton', 'jax_triton'} & set(sys.modules), sorted(sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]


def _jax_triton():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    try:
        return pytest.importorskip("jax_triton",
                                   reason="jax_triton is not installed (pip install jax-triton)")
    except ImportError as err:
        why = str(err).splitlines()[0]
        pytest.skip("jax_triton is installed but does not import without jaxlib's CUDA plugin "
                    "(jax-cuda12-plugin, from jax[cuda12]): its _triton extension builds and "
                    f"serializes the kernel call, and a CPU-only jaxlib has none: {why}")


def test_export_for_cuda_holds_the_triton_call():
    """Lowered for cuda on this machine (the compute capability fixed at 90), the exported step
    holds the Triton custom call and survives serialization."""
    _jax_triton()
    from lsd_kernels import triton_ring

    _, arrays, kw = _case("temporal_cache", "bfloat16", True)
    fn = jax.jit(lambda *a: triton_ring.temporal_cache_for(90)(*a, **kw))
    target = "triton_kernel_call"  # Triton kernels carry no compatibility guarantee
    exported = jax.export.export(
        fn, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*arrays)
    assert f"stablehlo.custom_call @{target}(" in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == ("cuda",)
    assert restored.out_avals == (jax.core.ShapedArray(arrays[0].shape, jnp.bfloat16),)
    assert restored.in_avals == tuple(jax.core.ShapedArray(a.shape, a.dtype) for a in arrays)


def test_parse_ptxas():
    from lsd_kernels.triton_aot import parse_ptxas

    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 48 registers, used 1 barriers, 64 bytes smem, 464 bytes cmem[0]\n")
    assert parse_ptxas(log) == dict(registers=48, spill_stores=8, spill_loads=12, stack_bytes=8,
                                    static_smem=64)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_kernel_compiles_for_sm90_without_spills(head_dim, dtype, tmp_path, monkeypatch):
    """Compiled for H100 with the triton wheel's ptxas: no spills, at most 255 registers, shared
    memory within the 227 KiB a block may have."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from lsd_kernels import triton_aot

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    stats = triton_aot.compile_stats("ring_attention", head_dim=head_dim, dtype=dtype)
    assert stats["target"] == "sm_90" and stats["name"] == "_ring_attention_kernel"
    assert stats["spill_stores"] == 0 and stats["spill_loads"] == 0, stats
    assert 0 < stats["registers"] <= triton_aot.MAX_REGISTERS, stats
    assert stats["shared_bytes"] <= triton_aot.H100_SHARED_PER_BLOCK, stats
