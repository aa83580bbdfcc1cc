"""The train-step cost model (`lsd_train/cost_model.py`).

The HLO parser is checked on a hand-written module whose collectives, loop trip count and bytes
are known exactly; `predict` on hand-made costs. A subprocess with 8 forced CPU devices compiles a
tiny train step (shortcut and history augmentation off, so the analytic count is the plain
forward + backward) on a pure data-parallel mesh and on an fsdp mesh, and checks the FLOPs against
the analytic count, the gradient collectives against the parameter bytes and the prediction's
ranges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT, simulated_devices_env

from lsd_train.cost_model import HARDWARE, Hardware, hlo_costs, predict, replica_group_size

# A scan of 3 trips all-gathering a [1,256] f32 shard over groups of 4 and reading one row of
# stacked weights; outside it an all-reduce over pairs, a combined all-reduce over fsdp=4 whose
# first element is only dynamic-sliced to a quarter (a reduce-scatter on GPU/TPU) and whose
# second is read whole, an all-to-all over data x fsdp = 8 and a collective-permute.
# (A backslash ends a line that continues the HLO line above.)
MODULE = textwrap.dedent("""\
    HloModule snippet, num_partitions=8

    %add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %sum = f32[] add(%a, %b)
    }

    %row_of (p0: f32[10,256], p1: s32[]) -> f32[1,256] {
      %p0 = f32[10,256]{1,0} parameter(0)
      %p1 = s32[] parameter(1)
      %zero = s32[] constant(0)
      ROOT %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,256}
    }

    %body (carry: (s32[], f32[1,256], f32[10,256])) -> (s32[], f32[1,256], f32[10,256]) {
      %carry = (s32[], f32[1,256]{1,0}, f32[10,256]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%carry), index=0
      %shard = f32[1,256]{1,0} get-tuple-element(%carry), index=1
      %stack = f32[10,256]{1,0} get-tuple-element(%carry), index=2
      %gathered = f32[4,256]{1,0} all-gather(%shard), channel_id=1, \
          replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
      %weight = f32[1,256]{1,0} fusion(%stack, %i), kind=kLoop, calls=%row_of
      %row = f32[1,256]{1,0} slice(%gathered), slice={[0:1], [0:256]}
      %one = s32[] constant(1)
      %next = s32[] add(%i, %one)
      ROOT %out = (s32[], f32[1,256]{1,0}, f32[10,256]{1,0}) tuple(%next, %row, %stack)
    }

    %cond (carry: (s32[], f32[1,256], f32[10,256])) -> pred[] {
      %carry = (s32[], f32[1,256]{1,0}, f32[10,256]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%carry), index=0
      %n = s32[] constant(3)
      ROOT %lt = pred[] compare(%i, %n), direction=LT
    }

    ENTRY %main (p0: f32[1,256], p1: f32[1024], p2: bf16[8,128], p3: f32[10,256]) \
        -> (f32[1,256], f32[1024], f32[256], bf16[8,128]) {
      %p0 = f32[1,256]{1,0} parameter(0)
      %p1 = f32[1024]{0} parameter(1)
      %p2 = bf16[8,128]{1,0} parameter(2)
      %p3 = f32[10,256]{1,0} parameter(3)
      %zero = s32[] constant(0)
      %init = (s32[], f32[1,256]{1,0}, f32[10,256]{1,0}) tuple(%zero, %p0, %p3)
      %loop = (s32[], f32[1,256]{1,0}, f32[10,256]{1,0}) while(%init), condition=%cond, \
          body=%body, backend_config={"known_trip_count":{"n":"3"}}
      %last = f32[1,256]{1,0} get-tuple-element(%loop), index=1
      %ar = f32[1024]{0} all-reduce(%p1), channel_id=2, \
          replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
      %ar2 = (f32[1024]{0}, /*index=1*/f32[1024]{0}) all-reduce(%p1, %ar), channel_id=3, \
          replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, use_global_device_ids=true, \
          to_apply=%add
      %g0 = f32[1024]{0} get-tuple-element(%ar2), index=0
      %g1 = f32[1024]{0} get-tuple-element(%ar2), index=1
      %offset = s32[] constant(256)
      %quarter = f32[256]{0} dynamic-slice(%g0, %offset), dynamic_slice_sizes={256}
      %a2a = bf16[8,128]{1,0} all-to-all(%p2), channel_id=4, \
          replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}, dimensions={0}
      %cp = bf16[8,128]{1,0} collective-permute(%a2a), channel_id=5, \
          source_target_pairs={{0,1},{1,2}}
      ROOT %result = (f32[1,256]{1,0}, f32[1024]{0}, f32[256]{0}, bf16[8,128]{1,0}) \
          tuple(%last, %g1, %quarter, %cp)
    }
    """)


@pytest.mark.parametrize("text,size", [
    ("replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, dimensions={1}", 8),
    ("replica_groups=mesh['data'=2,'fsdp'=4,'tensor'=2] {'data','tensor'}, to_apply=%add", 4),
    ("replica_groups=mesh['fsdp'=8] {'fsdp':(2)4}, dimensions={0}", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", 2),
    ("replica_groups={{0,1,2},{3,4,5}}, to_apply=%add", 3),
    ("replica_groups={}, to_apply=%add", 16),
    ("channel_id=1, to_apply=%add", 16),
])
def test_replica_group_size(text, size):
    assert replica_group_size(text, 16) == size


def test_collectives_and_bytes_of_a_hand_written_module():
    from jax._src.lib import xla_client

    parse = getattr(getattr(xla_client, "hlo", None), "hlo_module_from_text", None)
    if parse is not None:
        parse(MODULE)  # the module is valid HLO
    costs = hlo_costs(MODULE, 8)
    c = costs["collectives"]
    assert costs["unknown_trip_counts"] == 0
    # 3 trips x a gathered [4,256] f32 buffer (4096 bytes) over groups of 4: 3/4 of it on the wire.
    assert c["all-gather"] == {"ops": 3, "bytes": 3 * 4096, "wire_bytes": 3 * 4096 * 3 / 4,
                               "by_group": {4: {"ops": 3, "bytes": 12288,
                                                "wire_bytes": 9216.0}}}
    # %ar over pairs (2 x 1/2 x 4096) and %ar2's second element over fsdp=4 (2 x 3/4 x 4096).
    assert c["all-reduce"]["by_group"] == {2: {"ops": 1, "bytes": 4096, "wire_bytes": 4096.0},
                                           4: {"ops": 1, "bytes": 4096, "wire_bytes": 6144.0}}
    # %ar2's first element is only sliced to a quarter: a reduce-scatter (3/4 x 4096).
    assert c["reduce-scatter"]["by_group"] == {4: {"ops": 1, "bytes": 4096,
                                                   "wire_bytes": 3072.0}}
    assert c["all-to-all"]["by_group"] == {8: {"ops": 1, "bytes": 2048, "wire_bytes": 1792.0}}
    assert c["collective-permute"]["by_group"] == {2: {"ops": 1, "bytes": 2048,
                                                       "wire_bytes": 2048.0}}
    # HBM bytes per trip: the fusion reads one 1 KiB row of the stacked weights (not all 10 KiB)
    # and the s32 index, writes 1 KiB; the slice reads and writes 1 KiB; the add 4 + 4 + 4.
    # Outside the loop the dynamic-slice reads and writes 1 KiB.
    per_trip = (1024 + 4 + 1024) + 2 * 1024 + 12
    assert costs["hbm_bytes"] == 3 * per_trip + 2 * 1024
    assert costs["matmul_flops"] == 0
    assert hlo_costs(MODULE, 8, loops=False)["hbm_bytes"] == per_trip + 2 * 1024


def test_predict_formulas():
    hw = Hardware("test", peak_flops=1e12, hbm_bw=1e9, hbm_bytes=1e9, link_bw=1e8, domain_size=4,
                  scaleout_bw=1e7)
    # Two kernels: a matmul of 2e9 FLOPs over 2e5 bytes (above the ridge of 1000 FLOP/byte) and
    # an elementwise one of 8e5 bytes.
    kernels = [[0.0, 0.0, 8e5], [1e4, 2e9, 2e5]]
    costs = {"devices": 8, "flops": 2e9, "hbm_bytes": 1e6, "model_flops": 8e9, "kernels": kernels,
             "collectives": {"all-gather": {"by_group": {4: {"wire_bytes": 5e4}}},
                             "all-reduce": {"by_group": {8: {"wire_bytes": 1e4}}}}}
    p = predict(costs, hw)
    assert p["compute_s"] == pytest.approx(2e-3)
    assert p["memory_s"] == pytest.approx(1e-3)
    # 5e4 bytes within the 4-device domain at 1e8 B/s, 1e4 beyond it at 1e7 B/s.
    assert p["collective_s"] == pytest.approx(0.5e-3 + 1e-3)
    assert p["step_s_no_overlap"] == pytest.approx(2e-3 + 1.5e-3)
    assert p["step_s_overlap"] == pytest.approx(2e-3)
    assert p["mfu_no_overlap"] == pytest.approx(8e9 / (3.5e-3 * 1e12 * 8))
    assert p["mfu_overlap"] == pytest.approx(0.5)
    assert p["roofline_s"] == pytest.approx(2e-3 + 0.8e-3)
    assert p["step_s_kernels"] == pytest.approx(2.8e-3)
    assert p["bound"] == "compute"
    assert set(HARDWARE) == {"h100_sxm", "tpu_v5p"}


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from lsd_jax.config import MeshConfig, load_config
    from lsd_train import sharding, trainer
    from lsd_train.cost_model import predict, step_costs, train_step_flops

    cfg = load_config("lsd_configs/tiny.py", json.loads(sys.argv[1]))
    params = jax.eval_shape(lambda: trainer.init_state(cfg)["params"])
    out = {"devices": jax.device_count(),
           "param_bytes": int(sum(4 * np.prod(p.shape) for p in jax.tree.leaves(params))),
           "model_flops": train_step_flops(cfg)}
    for data, fsdp in ((8, 1), (1, 8)):
        mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=1))
        compiled, _ = trainer.compile_step(cfg, trainer.build_step(cfg, mesh))
        costs = step_costs(compiled, cfg=cfg)
        costs["predictions"] = {hw: predict(costs, hw) for hw in ("h100_sxm", "tpu_v5p")}
        out[f"{data}x{fsdp}"] = costs
    print(json.dumps(out))
""")

TINY = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
        "model.depth=2", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
        "data.clip_frames=4", "train.batch_size=8", "diffusion.shortcut=false",
        "diffusion.history_aug.enabled=false"]


@pytest.fixture(scope="module")
def compiled_costs():
    env = simulated_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8x1", "1x8"])
def test_compiled_flops_match_analytic(compiled_costs, mesh):
    """Without the objective's extra passes the step is forward + backward; the compiled step's
    matmuls, every scan at its trip count, equal the analytic count (the slack is for matmuls with
    a unit dimension that XLA lowers to multiply + reduce)."""
    out = compiled_costs
    costs = out[mesh]
    assert out["devices"] == 8 and costs["devices"] == 8
    assert costs["unknown_trip_counts"] == 0
    assert costs["model_flops"] == out["model_flops"]["total"] == out["model_flops"]["train"]
    assert 8 * costs["flops"] == pytest.approx(costs["model_flops"], rel=2e-3)
    # The per-kernel matmul FLOPs (the roofline's) add up to the module's.
    assert sum(f for _, f, _ in costs["kernels"]) == costs["flops"]
    assert sum(b for _, _, b in costs["kernels"]) == pytest.approx(costs["hbm_bytes"])
    # XLA's own count runs each scan body once: well below.
    assert costs["xla_flops_loops_once"] < 0.9 * costs["flops"]
    # The loop-scaled bytes exceed the once-counted ones, which follow XLA's own figure.
    assert costs["hbm_bytes"] > costs["hbm_bytes_loops_once"]
    assert 0.75 < costs["hbm_bytes_loops_once"] / costs["xla_bytes_accessed_loops_once"] < 1.25
    for p in costs["predictions"].values():
        for key in ("compute_s", "memory_s", "collective_s", "step_s_overlap"):
            assert p[key] > 0, (key, p)
        # Kernels in sequence at their rooflines take at least the all-overlapped time and at
        # most compute + memory time.
        assert p["step_s_overlap"] <= p["step_s_kernels"] * (1 + 1e-9)
        assert p["roofline_s"] <= (p["compute_s"] + p["memory_s"]) * (1 + 1e-9)
        for key in ("mfu_no_overlap", "mfu_overlap", "mfu_kernels"):
            assert 0 < p[key] <= 1
            assert p[key] <= p[key.replace("mfu", "hfu")] * 1.002


@pytest.mark.slow
def test_gradient_collectives_are_the_parameter_bytes(compiled_costs):
    """tiny computes in f32: each parameter's gradient (4 bytes) is reduced over the batch axes
    exactly once; the only other reduced values are the loss and metric scalars (< 1%)."""
    params = compiled_costs["param_bytes"]
    dp = compiled_costs["8x1"]["collectives"]
    # Pure data parallel: the state is replicated, so the gradient is all-reduced whole and no
    # weight is gathered.
    assert 1.0 <= dp["all-reduce"]["bytes"] / params <= 1.01, dp
    assert "reduce-scatter" not in dp and "all-gather" not in dp, dp
    fsdp = compiled_costs["1x8"]["collectives"]
    # fsdp: weights are gathered for the forward (and again for the backward, unless XLA keeps
    # them), gradients reduce-scattered; a weight with no dimension divisible by 8 stays whole
    # and its gradient is all-reduced.
    assert fsdp["all-gather"]["ops"] > 0 and 1.0 <= fsdp["all-gather"]["bytes"] / params <= 2.5
    assert fsdp["reduce-scatter"]["bytes"] >= 0.9 * params, fsdp
    reduced = fsdp["reduce-scatter"]["bytes"] + fsdp.get("all-reduce", {}).get("bytes", 0)
    assert 1.0 <= reduced / params <= 1.01, fsdp
    assert set(fsdp["reduce-scatter"]["by_group"]) == {"8"}
