"""Two processes (`jax.distributed` on 127.0.0.1) SIGKILLed and resumed equal an uninterrupted run.

Both runs go through a wrapper around `lsd train` in which two training clips fail to decode
(`ProceduralClips` returns None for global indices 6 and 14, as for an unreadable video frame):
both are rows of process 1, which skips them, so its data position runs 2 ahead of process 0's
and a resume from one process's position would repeat clips on the other. The wrapper also
appends the fingerprint (`batch_crc`) of every batch a process trains on to its own file.

Run A trains 12 steps; run B is SIGKILLed (both processes) once its step-4 checkpoint is
committed and resumed with `--resume`. Each process saved its own position; B's per-process
batch sequence, every step's loss and the step-12 params, optimiser state and EMA equal A's bit
for bit. A unit test checks when `lsd train` calls `jax.distributed.initialize()` with no
arguments (SLURM, Open MPI) and when it stays one process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO_ROOT

from lsd_jax.errors import ConfigError
from lsd_train.checkpointing import process_file

STEPS = 12
TINY = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
        "data.clip_frames=4", "train.batch_size=4", "train.warmup_steps=2", "train.lr=1e-3",
        f"train.steps={STEPS}", "train.save_every=4", "train.keep=10", "train.log_every=1",
        "train.sample_every=0", "mesh.data=2",
        # As in test_distributed: the objective's parts only add compile time here.
        "diffusion.shortcut=false", "diffusion.history_aug.enabled=false"]
DROPPED = (6, 14)  # global clip indices; rows 2 and 3 of each global batch of 4 are process 1's

WRAPPER = f"""
import sys

import lsd_train.data
import lsd_train.trainer

getitem = lsd_train.data.ProceduralClips.__getitem__
lsd_train.data.ProceduralClips.__getitem__ = lambda self, index: (
    None if self.split_id == 0 and int(index) in {DROPPED} else getitem(self, index))
crc, log = lsd_train.trainer.batch_crc, open(sys.argv[1], "a")


def batch_crc(batch):
    value = crc(batch)
    log.write(f"{{value}}\\n")
    log.flush()
    return value


lsd_train.trainer.batch_crc = batch_crc
from lsd_cli.main import main

sys.exit(main(sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, tag: str, env: dict, *extra: str) -> list[subprocess.Popen]:
    """Both processes of one `lsd train` run; process i logs its batch CRCs to
    `workdir/../crcs_{tag}_{i}.txt`."""
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(workdir.parent / f"crcs_{tag}_{i}.txt"), "train",
         "--config", "lsd_configs/tiny.py", "--workdir", str(workdir), "--no-progress",
         "--coordinator", address, "--num-processes", "2", "--process-id", str(i), *extra,
         *TINY],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs


def _crcs(root: Path, tag: str, i: int) -> list[int]:
    return [int(line) for line in (root / f"crcs_{tag}_{i}.txt").read_text().split()]


def _by_step(workdir: Path) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines)}


def _state(workdir: Path, step: int):
    """The train state of checkpoint `step` on this process's first device."""
    path = workdir.absolute() / "checkpoints" / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              ckptr.metadata(path).item_metadata)
        return ckptr.restore(path, target)


def _data_states(workdir: Path, step: int) -> list[dict]:
    data = workdir / "checkpoints" / str(step) / "data"
    return [json.loads((data / process_file(i, 2)).read_text()) for i in range(2)]


@pytest.mark.slow
def test_two_processes_resume_exactly_after_sigkill(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    a, b = tmp_path / "a", tmp_path / "b"
    _finish(_launch(a, "a", env))

    # Each process saved its own position: process 1 skipped the two clips that failed.
    for step in (4, 8, 12):
        assert _data_states(a, step) == [{"next_index": 2 * step},
                                         {"next_index": 2 * step + 2}], step

    procs = _launch(b, "b", env)
    committed = b / "checkpoints" / "4"
    deadline = time.monotonic() + 300
    while (not committed.is_dir() and all(p.poll() is None for p in procs)
           and time.monotonic() < deadline):
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, f"run B ended before the kill: {err[-2000:]}"
    assert committed.is_dir() and not (b / "checkpoints" / str(STEPS)).exists()

    errs = _finish(_launch(b, "b_resumed", env, "--resume"))
    # 4, or 8 when B committed that one too before it died.
    resumed = int(re.search(r"resumed from step (4|8)\n", errs[0])[1])

    for i in range(2):  # every process trained on the same batches, step by step
        expected = _crcs(tmp_path, "a", i)
        assert len(expected) == STEPS
        assert _crcs(tmp_path, "b", i)[:resumed] + _crcs(tmp_path, "b_resumed", i) == expected
    got, expected = _by_step(b), _by_step(a)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step]["batch_crcs"] == expected[step]["batch_crcs"], step
        assert got[step]["loss"] == expected[step]["loss"], step
    assert _data_states(b, STEPS) == _data_states(a, STEPS)
    pairs = jax.tree.leaves(jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
        _state(b, STEPS), _state(a, STEPS)))
    assert len(pairs) > 10 and all(pairs)


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"coordinator": None, "num_processes": None, "process_id": None,
                                 "devices": None, **flags})


def test_cluster_environments_initialize_with_no_arguments(monkeypatch):
    """Under `srun` with several tasks (or `mpirun`), `lsd train` calls
    `jax.distributed.initialize()` with nothing, or only what the flags name; elsewhere the
    flags are needed, and a count of 1 is one process."""
    from lsd_cli.train import _distributed_args

    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_"))]:
        monkeypatch.delenv(key)
    assert _distributed_args(_args()) is None
    with pytest.raises(ConfigError, match="without a coordinator"):
        _distributed_args(_args(num_processes=2, process_id=0))
    with pytest.raises(ConfigError, match="without the process count and id"):
        _distributed_args(_args(coordinator="127.0.0.1:1234"))
    assert _distributed_args(_args(coordinator="h:1", num_processes=2, process_id=1)) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}

    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert _distributed_args(_args()) == {}
    assert _distributed_args(_args(coordinator="node001:9999")) == {
        "coordinator_address": "node001:9999"}
    assert _distributed_args(_args(num_processes=1)) is None
    assert _distributed_args(_args(devices=8)) is None  # simulated devices: one process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert _distributed_args(_args()) is None

    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "123.0;tcp://10.0.0.1:5000")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert _distributed_args(_args()) == {}
