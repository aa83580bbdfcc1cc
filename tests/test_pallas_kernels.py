"""The Pallas kernels (`lsd_kernels/`) at sizes where their blocks loop (several query, key
and token blocks), under the Pallas interpreter and the TPU interpreter with race detection,
against the pure-JAX reference; and the model's streaming and train steps exported for `cuda`
(Triton backend) and `tpu` (Mosaic) with the kernels selected, serialized and deserialized, with
the kernels' custom calls in the modules. `tests/test_attention_seam.py` runs every kernel-table
row at the seam's small shapes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, rel_err

from lsd_jax import kernels, rope
from lsd_jax.attention import XLA
from lsd_jax.config import apply_overrides, load_config
from lsd_jax.errors import ArtifactError, ConfigError
from lsd_jax.norm import XLA as NORM_XLA
from lsd_kernels import flash_spatial, impls, ring_temporal
from lsd_kernels.backends import block_size

TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # the policy of tests/test_attention_seam.py
INTERPRETERS = {"interpret": (impls.PALLAS_INTERPRET, impls.NORM_INTERPRET),
                "tpu_interpret": (impls.PALLAS_TPU_INTERPRET, impls.NORM_TPU_INTERPRET)}
TARGETS = {"cuda": ("pallas_triton", "__gpu$xla.gpu.triton"), "tpu": ("pallas_tpu",
                                                                      "tpu_custom_call")}


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def _races_found() -> bool:
    """Whether the TPU interpreter's race detection flagged a race in the last interpreted
    kernels (jax reports it as `races.races_found` of its TPU interpreter)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

    races = getattr(tpu_interpreter, "races", None)
    return bool(races is not None and races.races_found)


@pytest.fixture
def no_races(request):
    """After a test that ran kernels under the TPU interpreter: no race was detected."""
    yield
    if request.node.callspec.params.get("interp") == "tpu_interpret":
        assert not _races_found(), "the TPU interpreter detected a race"


def test_race_detection_catches_a_racy_kernel():
    """The check the fixture above relies on can fail: two programs of a parallel grid axis
    writing one output block are a race under the TPU interpreter's two simulated cores."""
    from jax.experimental import pallas as pl

    from lsd_kernels.backends import TPU_INTERPRET, simulated_cores

    if simulated_cores() < 2:
        pytest.skip("one CPU: the TPU interpreter simulates one core, so no cross-core race")

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    x = _normal(0, (16, 128))
    jax.block_until_ready(pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((8, 128), x.dtype), grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        **TPU_INTERPRET.params(("parallel",)))(x))
    assert _races_found()
    jax.block_until_ready(impls.NORM_TPU_INTERPRET.norm_modulate(
        _normal(1, (1, 2, 16, 128)), _normal(2, (1, 2, 1, 128)), _normal(3, (1, 2, 1, 128)),
        eps=1e-6))
    assert not _races_found()  # the flag is per interpreted call


def test_blocks_loop_at_these_sizes():
    """The cases below run more than one block per axis (else the online softmax and the
    backward's loops would be checked on one block only)."""
    assert 128 // block_size(128, flash_spatial.BLOCK_Q) == 2
    assert 128 // block_size(128, flash_spatial.BLOCK_K) == 2
    assert 48 // block_size(48, ring_temporal.TOKEN_BLOCK) == 3


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("interp", list(INTERPRETERS))
def test_flash_spatial_over_several_blocks(interp, dtype, interleaved, no_races):
    """16 x 8 tokens (two query and two key blocks), forward and gradient of q, k, v."""
    attention, _ = INTERPRETERS[interp]
    shape = (1, 2, 128, 2, 16)
    arrays = tuple(_normal(i, shape, dtype) for i in range(3))
    angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(16)), 16, 8)
    cot = _normal(7, shape)

    def loss(impl):
        def fn(*a):
            out = impl.spatial(*a, angles=angles, interleaved=interleaved)
            return jnp.sum(out.astype(jnp.float32) * cot), out
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss(attention)(*arrays)
    (_, ref), ref_grads = loss(XLA)(*(a.astype(jnp.float32) for a in arrays))
    assert out.dtype == jnp.dtype(dtype) and rel_err(out, ref) <= TOL[dtype]
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.dtype(dtype) and rel_err(g, r) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("interp", list(INTERPRETERS))
def test_ring_attention_over_several_token_blocks(interp, dtype, no_races):
    """48 tokens (three blocks), a ring of 5 slots written up to slot 3, streams with full,
    partial and no history."""
    attention, _ = INTERPRETERS[interp]
    s, window, n, batch = 5, 6, 48, 3
    new = tuple(_normal(i, (batch, 1, n, 4, 16), dtype) for i in range(3))
    cache = tuple(_normal(3 + i, (batch, s, n, 4, 16), dtype) for i in range(2))
    age = ((3 - 1 - jnp.arange(s)) % s + 1).astype(jnp.int32)
    valid = age[None, :] <= jnp.asarray([s, 2, 0])[:, None]
    angles = rope.temporal_angles(jnp.asarray(rope.temporal_frequencies(16)), jnp.arange(window))
    kw = dict(age=age, valid=valid, angles=angles, interleaved=True)
    out = jax.jit(lambda *a: attention.temporal_cache(*a, **kw))(*new, *cache)
    ref = jax.jit(lambda *a: XLA.temporal_cache(*a, **kw))(
        *(a.astype(jnp.float32) for a in (*new, *cache)))
    assert out.dtype == jnp.dtype(dtype) and rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("interp", list(INTERPRETERS))
def test_norm_over_several_token_blocks(interp, dtype, no_races):
    """512 tokens (two blocks of 256), per-frame shift/scale/gate and a per-token residual."""
    _, norm = INTERPRETERS[interp]
    x, y = _normal(0, (2, 2, 512, 64), dtype), _normal(1, (2, 2, 512, 64), dtype)
    gate, shift, scale = (_normal(2 + i, (2, 2, 1, 64), dtype) for i in range(3))

    def run(impl, *a):
        return jax.jit(lambda *a: impl.residual_norm_modulate(*a, eps=1e-6))(*a)

    got = run(norm, x, gate, y, shift, scale)
    want = run(NORM_XLA, *(a.astype(jnp.float32) for a in (x, gate, y, shift, scale)))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.dtype(dtype) and rel_err(g, w) <= TOL[dtype]


def test_kernel_for_another_platform_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"pallas_triton'? cannot run on cpu: it runs on cuda"):
        kernels.select("attention", "pallas_triton")
    with kernels.lowering_for("tpu"):
        assert kernels.select("norm", "pallas_tpu") is impls.NORM_TPU


def _custom_calls(exported) -> set[str]:
    return set(re.findall(r"custom_call @([^(\s]+)\(", exported.mlir_module()))


def _with_kernels(name: str, *extra: str):
    cfg = load_config(CONFIGS / "tiny.py")
    return apply_overrides(cfg, [f"model.attention_impl={name}", f"model.norm_impl={name}",
                                 *extra])


@pytest.mark.parametrize("platform", list(TARGETS))
def test_streaming_step_exports_with_kernels(platform, tmp_path):
    """`lsd export`'s artifact for one platform with kernels selected: the header names them and
    the custom call, and the deserialized step holds it; two platforms at once are refused."""
    from flax import nnx

    from lsd_jax.model import DiT
    from lsd_serve.artifact import load_artifact
    from lsd_serve.export import save_artifact

    name, target = TARGETS[platform]
    cfg = _with_kernels(name)
    graphdef, params = nnx.split(DiT(cfg.model, rngs=nnx.Rngs(0)))
    path = save_artifact(tmp_path / "k.lsdx", cfg, graphdef, params, platforms=(platform,))
    art = load_artifact(path)
    assert art.header["kernels"] == {"selected": {"attention": name, "norm": name},
                                     "custom_calls": [target]}
    assert all(target in _custom_calls(exp) for exp in art._exported.values())
    with pytest.raises(ArtifactError, match=f"export it for that one platform .--platforms "
                                            f"{platform}"):
        save_artifact(tmp_path / "two.lsdx", cfg, graphdef, params, platforms=("cpu", platform))


@pytest.mark.parametrize("platform", list(TARGETS))
def test_train_step_exports_with_kernels(platform):
    """The train step (objective, gradient through the kernels' custom VJPs, AdamW, EMA) lowered
    for one platform, serialized and deserialized, holds the kernels' custom calls, and the
    backward's kernels are among them (more calls than the forward's)."""
    from lsd_jax.lowering import UNGUARANTEED_CALLS
    from lsd_train.trainer import abstract_batch, init_state, make_train_step

    name, target = TARGETS[platform]
    cfg = _with_kernels(name, "data.clip_frames=4", "train.batch_size=2")
    state = jax.eval_shape(lambda: init_state(cfg))
    leaves, treedef = jax.tree.flatten(state)
    step = make_train_step(cfg)

    def flat_step(leaves, batch):  # flat arrays in and out: optax's state types stay out
        new_state, metrics = step(jax.tree.unflatten(treedef, leaves), batch)
        return jax.tree.leaves(new_state), metrics

    with kernels.lowering_for(platform):
        exported = jax.export.export(jax.jit(flat_step), platforms=(platform,),
                                     disabled_checks=UNGUARANTEED_CALLS)(leaves,
                                                                         abstract_batch(cfg))
    back = jax.export.deserialize(bytearray(exported.serialize()))
    assert target in _custom_calls(back)
    calls = exported.mlir_module().count(f"custom_call @{target}(")
    # Per layer: spatial forward, dkdv, dq; 2 norms x (forward); depth 2 scanned = one body.
    assert calls >= 5, calls


def test_bf16_rounding_is_the_only_difference_from_the_reference():
    """float32 kernels agree to 1e-5 at a non-trivial scale (logits of size ~10, so the softmax
    is peaked), not only on unit-normal inputs."""
    q, k, v = (_normal(i, (1, 1, 64, 2, 32)) * (3.0 if i < 2 else 1.0) for i in range(3))
    angles = rope.spatial_angles(jnp.asarray(rope.spatial_frequencies(32)), 8, 8)
    out = impls.PALLAS_INTERPRET.spatial(q, k, v, angles=angles, interleaved=True)
    ref = XLA.spatial(q, k, v, angles=angles, interleaved=True)
    assert rel_err(out, ref) <= 1e-5
    assert float(np.max(np.abs(np.asarray(out)))) > 0.5


def test_bench_kernels_reports_every_kernel(capsys):
    """`lsd bench kernels --json` on the tiny config: one entry per kernel with its interpreted
    error against the reference, the custom calls of both lowerings and a roofline."""
    import json

    from lsd_cli.main import main

    assert main(["bench", "kernels", "--config", str(CONFIGS / "tiny.py"), "--no-tpu",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [k["name"] for k in result["kernels"]]
    assert names == ["flash_spatial", "flash_spatial_bwd", "ring_temporal", "norm_modulate",
                     "residual_norm_modulate"]
    for k in result["kernels"]:
        assert 0 <= k["max_rel_err"] <= 1e-5, k
        assert k["custom_calls"] == {"cuda": ["__gpu$xla.gpu.triton"], "tpu": ["tpu_custom_call"]}
        assert k["flops"] > 0 and k["bytes"] > 0 and k["predicted_h100_us"] > 0
        assert k["timing"].startswith("no GPU or TPU here")


def test_bench_kernels_json_with_the_tpu_compile(capsys):
    """`lsd bench kernels --json` with the TPU ahead-of-time compile on (its report once held the
    compiled executable, which `json.dumps` refused): one JSON object, each kernel's compile
    reported as data."""
    import json

    from lsd_cli.main import main

    pytest.importorskip("libtpu", reason="libtpu is not installed (the kernels extra)")
    from lsd_kernels import tpu_aot

    try:
        tpu_aot.topology_devices("v5e:2x2")
    except tpu_aot.TpuCompileUnavailable as err:
        pytest.skip(str(err))
    assert main(["bench", "kernels", "--config", str(CONFIGS / "tiny.py"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for k in result["kernels"]:
        tpu = k["tpu_compile"]
        assert tpu.get("compiled") is True, tpu
        assert "executable" not in tpu and tpu["memory"]["argument"] > 0


@pytest.mark.parametrize("preset", ["lsd_base_gpu", "oasis_500m_gpu"])
def test_gpu_presets_select_the_triton_kernels(preset):
    """The gpu presets differ from their base config only in the kernels and bf16 compute, and
    their selection is refused on this host but accepted when lowering for cuda."""
    from lsd_jax.config import to_dict

    cfg = load_config(CONFIGS / f"{preset}.py")
    base = load_config(CONFIGS / f"{preset.removesuffix('_gpu')}.py")
    assert kernels.selected(cfg.model) == {"attention": "pallas_triton", "norm": "pallas_triton"}
    changed = {k for k, v in to_dict(cfg.model).items() if to_dict(base.model)[k] != v}
    assert changed <= {"attention_impl", "norm_impl", "dtype"}
    with kernels.lowering_for("cuda"):
        assert kernels.select("attention", cfg.model.attention_impl) is impls.PALLAS_TRITON


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_long_ring_fits_tpu_vmem(dtype):
    """Oasis' ring of 31 slots (window 32) at 144 tokens: the token block shrinks with the ring
    so the Mosaic compile for v5e stays inside its 16 MiB of scoped VMEM (at 16 tokens per block
    the float32 ring does not)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (the kernels extra)")
    from lsd_kernels import tpu_aot

    try:
        tpu_aot.topology_devices("v5e:2x2")
    except tpu_aot.TpuCompileUnavailable as err:
        pytest.skip(str(err))
    fn, args = tpu_aot.kernel_cases(jnp.dtype(dtype), n=144, slots=31, window=32)["ring"]
    report = tpu_aot.compile_for_tpu(fn, *args, topology="v5e:2x2")
    assert "tpu_custom_call" in report["custom_calls"]


@pytest.mark.parametrize("name", ["pallas_interpret"])  # the TPU interpreter: 4 min, kernel-level
def test_streaming_step_with_kernels_equals_the_reference_path(name):
    """The whole streaming step (spatial flash attention, the ring kernel over a ring that wraps,
    fused norms) with the kernels interpreted equals the XLA path over 2 * window + 1 frames of
    two streams (float32, <= 1e-5 relative to the outputs' range)."""
    from flax import nnx

    from lsd_jax.model import DiT, randomize
    from lsd_jax.streaming import init_stream, make_latent_step

    small = ["model.frame_height=16", "model.frame_width=16", "model.patch_size=4",
             "model.hidden_size=64", "model.num_heads=4", "model.depth=2", "model.window=3",
             "model.prompt_dim=8"]
    outs = {}
    for impl in ("xla", name):
        cfg = apply_overrides(load_config(CONFIGS / "tiny.py"),
                              [*small, f"model.attention_impl={impl}", f"model.norm_impl={impl}"])
        model = randomize(DiT(cfg.model, rngs=nnx.Rngs(0)), seed=3, gain=0.7)
        graphdef, params = nnx.split(model)
        step = jax.jit(make_latent_step(cfg, graphdef, steps=2))
        rng = np.random.default_rng(1)
        cond = rng.standard_normal((7, 2, 16, 16, 3)).astype(np.float32)
        prompt = rng.standard_normal((2, 8)).astype(np.float32)
        state, frames = init_stream(cfg, 2, 0), []
        for cond_bhwc in cond:
            state, x0 = step(params, state, cond_bhwc, prompt)
            frames.append(x0)
        outs[impl] = np.stack(frames)
    assert float(np.std(outs["xla"])) > 0.1
    assert rel_err(outs[name], outs["xla"]) <= 1e-5
