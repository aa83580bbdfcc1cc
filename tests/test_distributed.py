"""Two processes through `jax.distributed` on 127.0.0.1 train together like one.

`lsd train` runs as two processes (one CPU device each, a `data`=2 mesh, each loading its half
of every batch, gloo collectives) for 3 steps, and as one process on one device. Every step's
loss and the final parameters, optimiser state and EMA (from the checkpoints both write) agree to
1e-5 (the losses of random-level batches could not agree unless both saw the same rows in the
same order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO_ROOT

TINY = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
        "data.clip_frames=4", "train.batch_size=4", "train.warmup_steps=0", "train.lr=1e-3",
        "train.steps=3", "train.save_every=0", "train.sample_every=0", "train.log_every=1",
        # The objective's parts are checked by test_sharding; here they would only add compile
        # time to three processes sharing two cores.
        "diffusion.shortcut=false", "diffusion.history_aug.enabled=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lsd_cli", "train", "--config", "lsd_configs/tiny.py",
            "--workdir", str(workdir), "--no-progress", *extra, *TINY]


def _final_state(workdir: Path):
    """The step-3 train state on this process's first device, whatever mesh saved it."""
    path = workdir / "checkpoints" / "3" / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              ckptr.metadata(path).item_metadata)
        return ckptr.restore(path, target)


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    single = subprocess.run(_cmd(tmp_path / "single"), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        _cmd(tmp_path / "multi", "--coordinator", address, "--num-processes", "2",
             "--process-id", str(i), "mesh.data=2"),
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                               rtol=0, atol=1e-5)
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        _final_state(tmp_path / "multi"), _final_state(tmp_path / "single")))
    assert max(diffs) <= 1e-5, max(diffs)
