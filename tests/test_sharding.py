"""Sharded train step == dense single-device step, on simulated 8-device CPU meshes.

A subprocess with 8 forced CPU devices runs 2 train steps (full objective: Diffusion Forcing,
history augmentation with self-prediction, shortcut targets) from the same initial state on the
same random batch: once with a plain `jax.jit` on one device (the dense reference), then with the
sharded step on the 2x4 and 4x2 `data` x `fsdp` meshes (asymmetric, so a swapped axis shows).
Losses and every updated parameter, optimiser moment and EMA weight must agree to 1e-5, and the
weights must really be split (a kernel's `embed` axis over `fsdp`). The rule table is checked
directly in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import simulated_devices_env
from jax.sharding import PartitionSpec

from lsd_train import sharding

TINY = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
        "data.clip_frames=4", "train.batch_size=8", "train.warmup_steps=0", "train.lr=1e-3"]

SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np
    from lsd_jax.config import MeshConfig, load_config
    from lsd_train import sharding, trainer

    overrides = json.loads(sys.argv[1])
    cfg = load_config("lsd_configs/tiny.py", overrides)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.clip_frames
    batch = {"target": rng.uniform(-1, 1, (b, t, 16, 16, 3)).astype(np.float32),
             "cond": rng.uniform(-1, 1, (b, t, 16, 16, 3)).astype(np.float32),
             "prompt": rng.standard_normal((b, 16)).astype(np.float32)}
    state0 = jax.device_get(jax.jit(functools.partial(trainer.init_state, cfg))())

    def run(step, state, put_batch):
        losses = []
        for _ in range(2):
            state, metrics = step(state, put_batch(batch))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state)

    ref_losses, ref_state = run(jax.jit(trainer.make_train_step(cfg)),
                                jax.device_put(state0, jax.devices()[0]), lambda x: x)
    out = {"devices": jax.device_count(), "ref_losses": ref_losses}
    for data, fsdp, tensor in ((2, 4, 1), (4, 2, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        sharded = trainer.build_step(cfg, mesh)
        compiled, _ = trainer.compile_step(cfg, sharded)
        state = jax.device_put(state0, sharded.state_shardings)
        losses, final = run(compiled, state, functools.partial(trainer.global_batch, sharded))
        diffs = jax.tree.leaves(jax.tree.map(
            lambda a, r: float(np.max(np.abs(np.asarray(a, np.float64) - r))), final, ref_state))
        fc1 = sharded.state_shardings["params"]["blocks"]["spatial"]["mlp"]["fc1"]["kernel"]
        qkv = sharded.state_shardings["params"]["blocks"]["spatial"]["attn"]["to_qkv"]["kernel"]
        out[f"{data}x{fsdp}x{tensor}"] = {"losses": losses, "max_state_diff": max(diffs),
                                          "leaves": len(diffs), "fc1_spec": str(fc1.spec),
                                          "qkv_spec": str(qkv.spec)}
    print(json.dumps(out))
""")


def test_rule_table_maps_logical_axes():
    mesh = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
    spec = sharding.logical_to_spec(("layers", "embed", "mlp"), (3, 64, 256), mesh)
    assert spec == PartitionSpec(None, "fsdp", "tensor")
    # 6 is not divisible by fsdp=4: that dimension stays whole instead of failing to compile.
    assert sharding.logical_to_spec(("embed", "heads"), (6, 8), mesh) == PartitionSpec(
        None, "tensor")
    with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
        sharding.logical_to_spec(("bogus",), (4,), mesh)


@pytest.mark.slow
def test_sharded_step_matches_single_device(repo_root):
    env = simulated_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY)], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    ref_losses = out["ref_losses"]
    assert ref_losses[0] != ref_losses[1]
    for mesh in ("2x4x1", "4x2x1", "2x2x2"):
        result = out[mesh]
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=0, atol=1e-5)
        assert result["max_state_diff"] <= 1e-5, (mesh, result)
    assert out["2x4x1"]["fc1_spec"] == "P(None, 'fsdp', None)", out["2x4x1"]
    # With a tensor axis the MLP's hidden dimension and the attention heads are split over it.
    assert out["2x2x2"]["fc1_spec"] == "P(None, 'fsdp', 'tensor')", out["2x2x2"]
    assert "'tensor'" in out["2x2x2"]["qkv_spec"], out["2x2x2"]


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from lsd_jax.config import MeshConfig, load_config
    from lsd_train import sharding, trainer
    out = {}
    for fsdp in (2, 8):
        cfg = load_config("lsd_configs/tiny.py", json.loads(sys.argv[1]) + [
            f"train.batch_size={fsdp}"])
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1),
                                  jax.devices()[:fsdp])
        _, report = trainer.compile_step(cfg, trainer.build_step(cfg, mesh))
        out[fsdp] = {k: report[k] for k in ("temp_bytes", "argument_bytes")}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_per_device_memory_does_not_grow_with_the_mesh(repo_root):
    """One clip per device on 2 and on 8 fsdp devices: temporaries do not grow (they did, by the
    activations of the whole fsdp group, before the hidden states were pinned to the batch axes:
    `lsd_jax.activation_sharding`), and the state's shard shrinks about as 1/fsdp."""
    tiny = ["model.frame_height=32", "model.frame_width=32", "model.hidden_size=64",
            "model.depth=2", "model.num_heads=4", "model.window=4", "model.prompt_dim=16",
            "data.clip_frames=4"]
    env = simulated_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(tiny)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = out["2"], out["8"]
    assert large["temp_bytes"] <= small["temp_bytes"], out
    assert large["argument_bytes"] <= 0.4 * small["argument_bytes"], out


def test_sub_batches_split_over_the_axes_that_divide_them():
    """A full batch splits over data x fsdp; the shortcut sub-batch (a quarter) over the largest
    set of batch axes whose devices divide it."""
    from lsd_jax.activation_sharding import split_axes

    class FakeMesh:  # split_axes reads only .shape
        shape = {"data": 16, "fsdp": 8, "tensor": 2}

    assert split_axes(FakeMesh, ("data", "fsdp"), 256) == ("data", "fsdp")
    assert split_axes(FakeMesh, ("data", "fsdp"), 64) == ("data",)
    assert split_axes(FakeMesh, ("data", "fsdp"), 8) == ("fsdp",)
    assert split_axes(FakeMesh, ("data", "fsdp"), 3) == ()
