"""Files a user keeps are replaced whole or not at all (`lsd_jax.atomic`).

- SIGKILL at random moments of `lsd export` over a good artifact, of `lsd eval drift` while it
  saves its checkpoints, and of `lsd train` while it rewrites `WORKDIR/model`: afterwards the
  previous file is intact or the new one is complete (it loads), and the next write removes the
  temporaries the killed process left.
- A full disk (ENOSPC, injected in process where the write happens) is one `lsd: error: no space
  left on device writing PATH` line, exit 2, the old file intact and no temporary left behind:
  for an artifact, a model directory, a drift checkpoint, reports and `lsd train`.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from lsd_jax.atomic import atomic_write_text
from lsd_jax.checkpoint import load_model, save_model
from lsd_jax.config import load_config
from lsd_jax.errors import WriteError
from lsd_jax.resolve import untrained_model

SMALL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=4",
         "diffusion.sample_steps=1"]
TINY_TRAIN = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
              "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
              "data.clip_frames=4", "train.batch_size=4", "train.warmup_steps=2",
              "train.sample_every=0", "train.log_every=1"]


def _env(cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _lsd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lsd_cli", *args]


def _kill(cmd: list[str], env: dict, *, ready, trigger, timeout_s: float = 600) -> int:
    """Run `cmd`; once `ready()` holds, SIGKILL it as soon as `trigger()` holds. Returns the exit
    status (-9 when killed, else how it ended on its own)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    armed = False
    while proc.poll() is None and time.monotonic() < deadline:
        armed = armed or ready()
        if armed and trigger():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    if proc.poll() is None and time.monotonic() >= deadline:
        proc.kill()
    return proc.wait(60)


def _after(seconds: float):
    """A trigger that holds `seconds` after it is first asked (once the run is ready)."""
    start = []

    def elapsed() -> bool:
        if not start:
            start.append(time.monotonic())
        return time.monotonic() - start[0] >= seconds

    return elapsed


def _exists(directory: Path, pattern: str):
    return lambda: any(directory.glob(pattern))


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _small_model(directory: Path, seed: int) -> Path:
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    return save_model(directory, cfg, untrained_model(cfg, seed=seed))


@pytest.mark.slow
def test_export_killed_at_random_moments_leaves_the_old_artifact_or_the_new_one(tmp_path):
    """`lsd export` of other weights over a good artifact, SIGKILLed at random moments of its run
    and once just as its temporary appears: the artifact is byte for byte the old one or a
    complete new one; a finished export then removes what the killed ones left."""
    from lsd_serve.artifact import load_artifact

    a, b = _small_model(tmp_path / "a", 1), _small_model(tmp_path / "b", 2)
    out = tmp_path / "art" / "model.lsdx"
    export = ["export", "--batch", "1", "--steps", "1", "--platforms", "cpu"]
    env = _env(tmp_path / "cache")
    t0 = time.monotonic()
    subprocess.run(_lsd(*export, "--checkpoint", str(a), "--out", str(out)), cwd=REPO_ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    full_s = time.monotonic() - t0
    old = out.read_bytes()
    rng = random.Random(26)
    outcomes = []
    for kind in ("temporary", "at", "at", "at"):
        trigger = (_exists(out.parent, ".model.lsdx.tmp-*") if kind == "temporary" else
                   _after(rng.uniform(0.4, 1.1) * full_s))
        before = out.read_bytes()
        status = _kill(_lsd(*export, "--checkpoint", str(b), "--out", str(out)), env,
                       ready=lambda: True, trigger=trigger)
        now = out.read_bytes()
        if now != before:  # then it is the new one, complete
            assert load_artifact(out).header["source"] == f"checkpoint {b}"
        outcomes.append((kind, status, now == before))
        assert _visible(out.parent) == ["model.lsdx"], outcomes
    # Killed just as the temporary appeared: before the rename, so the old file is there.
    assert outcomes[0] == ("temporary", -signal.SIGKILL, True), outcomes
    assert out.read_bytes() == old or load_artifact(out).header["source"] == f"checkpoint {b}"
    subprocess.run(_lsd(*export, "--checkpoint", str(b), "--out", str(out)), cwd=REPO_ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    assert load_artifact(out).header["source"] == f"checkpoint {b}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.lsdx"]


@pytest.mark.slow
def test_eval_drift_killed_while_it_checkpoints_keeps_a_complete_checkpoint(tmp_path):
    """`lsd eval drift --out` SIGKILLed at random moments after its first checkpoint, and once
    just as a checkpoint's temporary appears: the checkpoint in --out always loads (the one
    before, or the new one whole), and `--resume` continues from it to the end."""
    from lsd_train.evaluate import load_drift_checkpoint

    model = _small_model(tmp_path / "m", 3)
    out = tmp_path / "drift"
    ckpt = out / "drift_m_checkpoint.npz"
    drift = ["eval", "drift", "--checkpoint", f"m={model}", "--frames", "4000", "--period",
             "100", "--save-every", "25", "--steps", "1", "--out", str(out), "--no-progress"]
    env = _env(tmp_path / "cache")
    rng = random.Random(62)
    moments = [("temporary", _exists(out, ".drift_m_checkpoint.npz.tmp-*"))]
    moments += [("at", None) for _ in range(2)]
    for i, (kind, trigger) in enumerate(moments):
        if trigger is None:
            trigger = _after(rng.uniform(0.0, 3.0))
        status = _kill(_lsd(*drift, *(["--resume"] if i else [])), env,
                       ready=ckpt.is_file, trigger=trigger)
        assert status == -signal.SIGKILL, (kind, status)
        loaded = load_drift_checkpoint(ckpt)
        assert loaded["next_frame"] % 25 == 0 and loaded["next_frame"] > 0
        assert np.isfinite(loaded["psnr"]).all() and len(loaded["psnr"]) == loaded["next_frame"]
        assert _visible(out) == ["drift_m_checkpoint.npz"]
    last = load_drift_checkpoint(ckpt)["next_frame"]
    done = subprocess.run(_lsd(*drift, "--resume"), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"m: resuming at frame {last:,} of 4,000" in done.stderr
    assert np.load(out / "drift_m_psnr.npz")["psnr"].shape == (4000,)
    assert not ckpt.exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_train_killed_while_it_rewrites_its_model_directory(tmp_path):
    """`lsd train` saving every step, SIGKILLed just as `model.tmp` appears and at a random
    moment: `WORKDIR/model` is always a complete model directory (the old one or the new)."""
    workdir = tmp_path / "run"
    env = _env(tmp_path / "cache")
    train = ["train", "--config", "lsd_configs/tiny.py", "--workdir", str(workdir),
             "--no-progress", *TINY_TRAIN, "train.steps=2000", "train.save_every=1",
             "train.keep=2"]
    model = workdir / "model"
    rng = random.Random(7)

    def rewritten(since: float):  # a model this run wrote
        return lambda: (model / "config.json").is_file() and (
            (model / "config.json").stat().st_mtime > since)

    for i, trigger in enumerate([_exists(workdir, "model.tmp"), _after(rng.uniform(0, 1))]):
        status = _kill(_lsd(*train, *(["--resume"] if i else [])), env,
                       ready=rewritten(time.time()), trigger=trigger)
        assert status == -signal.SIGKILL, status
        cfg, _ = load_model(model)
        assert cfg.model.hidden_size == 32
        assert _visible(model) == ["config.json", "params"]


# ----------------------------------------------------------------------------- a full disk


class _FullDisk:
    """A file object over a real one whose writes after the first `allowed` bytes fail with
    ENOSPC, as on a disk that fills up while it is written."""

    def __init__(self, file, allowed: int):
        self._file, self._left = file, allowed

    def write(self, data) -> int:
        if len(data) > self._left:
            self._file.write(bytes(data[: self._left]))
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _full_disk_open(allowed: int):
    def fake_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by _FullDisk
        return _FullDisk(file, allowed) if "w" in mode else file

    return fake_open


def test_export_to_a_full_disk_is_one_line_and_keeps_the_old_artifact(tmp_path, capsys,
                                                                       monkeypatch):
    from lsd_cli.main import main
    from lsd_serve import export

    model = _small_model(tmp_path / "m", 4)
    out = tmp_path / "model.lsdx"
    out.write_bytes(b"the good artifact")
    monkeypatch.setattr(export, "open", _full_disk_open(4096), raising=False)
    assert main(["export", "--checkpoint", str(model), "--out", str(out), "--batch", "1",
                 "--steps", "1", "--platforms", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lsd: error: no space left on device writing {str(out)!r}"], err
    assert out.read_bytes() == b"the good artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "model.lsdx"]


def test_model_directory_on_a_full_disk_is_one_error_and_no_temporary(tmp_path, monkeypatch):
    """Orbax reports a full disk as a `ValueError` carrying the OS error code (seen on a full
    tmpfs); `save_model` makes it one `WriteError` naming the directory and leaves nothing."""
    from lsd_jax import checkpoint

    class FullDiskCheckpointer:
        def __init__(self):
            self.saved = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, path, params):
            path.mkdir(parents=True)
            (path / "half_written").write_bytes(b"\0" * 100)
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local '
                             f'file "{path}": Failed to write 749047 bytes to file 4: No space '
                             "left on device [os_error_code='28']")

        def wait_until_finished(self):
            pass

    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py", SMALL)
    model = untrained_model(cfg, seed=5)
    monkeypatch.setattr(checkpoint.ocp, "StandardCheckpointer", FullDiskCheckpointer)
    target = tmp_path / "models" / "new"
    with pytest.raises(WriteError) as info:
        save_model(target, cfg, model)
    assert str(info.value) == f"no space left on device writing {str(target.absolute())!r}"
    assert list((tmp_path / "models").iterdir()) == []


def test_drift_checkpoint_and_reports_on_a_full_disk_keep_the_old_files(tmp_path, monkeypatch):
    from lsd_jax import atomic
    from lsd_train import eval_report, evaluate

    ckpt = tmp_path / "drift_demo_checkpoint.npz"
    good = {"spec": "demo", "next_frame": 5, "psnr": np.arange(5, dtype=np.float32)}
    evaluate.save_drift_checkpoint(ckpt, good)
    old = ckpt.read_bytes()
    monkeypatch.setattr(np, "savez", lambda path, **arrays: (
        Path(path).write_bytes(b"PK\3\4 half"), _enospc()))
    with pytest.raises(WriteError, match=f"^no space left on device writing {str(ckpt)!r}$"):
        evaluate.save_drift_checkpoint(ckpt, {**good, "next_frame": 10})
    assert ckpt.read_bytes() == old

    report = tmp_path / "EVAL.md"
    report.write_text("# kept\n")
    eval_report.save_json(tmp_path / "drift.json", [{"a": 1}])
    monkeypatch.setattr(atomic, "open", _full_disk_open(3), raising=False)
    with pytest.raises(WriteError, match=f"^no space left on device writing {str(report)!r}$"):
        eval_report.replace_section(report, "drift", "a table")
    with pytest.raises(WriteError, match="writing .*drift.json'$"):
        eval_report.save_json(tmp_path / "drift.json", [{"a": 2}])
    with pytest.raises(WriteError):
        atomic_write_text(tmp_path / "new.txt", "text")
    assert report.read_text() == "# kept\n"
    assert (tmp_path / "drift.json").read_text() == '[\n  {\n    "a": 1\n  }\n]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "EVAL.md", "drift.json", "drift_demo_checkpoint.npz"]


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_cleans_its_temporaries(tmp_path, capsys,
                                                                    monkeypatch):
    """A save the disk has no room for is refused before anything is written; a disk that fills
    while the model is written ends the run with one line naming it, and neither `model.tmp`
    nor a half-written orbax checkpoint is left."""
    import shutil

    from lsd_cli.main import main
    from lsd_train import trainer

    run = ["train", "--config", "lsd_configs/tiny.py", "--no-progress", *TINY_TRAIN,
           "train.steps=4", "train.save_every=2"]
    workdir = tmp_path / "full"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(trainer.shutil, "disk_usage",
                        lambda path: usage._replace(free=3 * 2**20))
    assert main([*run, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lsd: error: no space left on device writing {str(workdir)!r}: "
                              "a save needs about "), err
    assert err[-1].endswith(" MiB, 3.0 MiB are free")
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "metrics.jsonl", "tb"]
    assert list((workdir / "checkpoints").iterdir()) == []
    monkeypatch.undo()

    def fills_up(directory, *args, **kwargs):
        (Path(directory) / "params").mkdir(parents=True)
        (Path(directory) / "params" / "half_written").write_bytes(b"\0" * 100)
        _enospc()

    monkeypatch.setattr(trainer, "write_model", fills_up)
    workdir = tmp_path / "fills"
    assert main([*run, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"lsd: error: no space left on device writing {str(workdir / 'model')!r}"
    assert not (workdir / "model.tmp").exists() and not (workdir / "model").exists()
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
