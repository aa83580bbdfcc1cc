"""`lsd train`: exact resume after SIGKILL, a damaged checkpoint falls back, the loss falls.

- resume: run A trains 20 steps uninterrupted; run B (same config) is SIGKILLed once its step-10
  checkpoint is committed (while it streams its step-10 sample), then `--resume` continues it to
  20. Final parameters, optimiser state and EMA of both agree to 1e-6, every step's loss agrees,
  and every step saw the same batch (CRC of its clips). Runs share a compilation cache.
- SIGTERM: the run saves the step it reached (a checkpoint that restores to that step, the EMA
  model) and exits with 128 + 15.
- a truncated newest checkpoint is skipped with a warning naming its step; the previous restores.
- the loss of a small DiT falls on the paired procedural data: the mean flow-matching loss of the
  last 40 of 200 steps is below 0.6x that of the first 20.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO_ROOT, rel_err

from lsd_jax.config import load_config

TINY = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.window=4", "model.prompt_dim=16",
        "data.clip_frames=4", "train.batch_size=4", "train.warmup_steps=2"]
RESUME = [*TINY, "train.steps=20", "train.save_every=5", "train.keep=10", "train.log_every=1",
          "train.sample_every=10"]


def _env(cache_dir: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train_cmd(workdir: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "lsd_cli", "train", "--config", "lsd_configs/tiny.py",
            "--workdir", str(workdir), "--no-progress", *extra, *overrides]


def _by_step(workdir: Path) -> dict[int, dict]:
    """The last metrics line logged for each step (a resumed run rewrites the killed steps)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines)}


def _restore_state(workdir: Path, step: int):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(workdir.absolute() / "checkpoints" / str(step) / "state")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A: 20 steps without interruption; returns its work directory."""
    root = tmp_path_factory.mktemp("resume")
    workdir = root / "a"
    proc = subprocess.run(_train_cmd(workdir, RESUME), cwd=REPO_ROOT, env=_env(root / "cache"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_trained_model_records_its_prompts_and_serving_reads_them(uninterrupted):
    """The model `lsd train` writes records the prompts it was trained on; the engine built from
    it (and from its export) knows them, and serving never imports the trainer."""
    from lsd_train.tasks import TASKS

    saved = json.loads((uninterrupted / "model" / "config.json").read_text())
    assert saved["trained_prompts"] == [t.prompt for t in TASKS]
    script = f"""
import sys
from lsd_serve.load import load_engine
engine = load_engine(checkpoint={str(uninterrupted)!r})
print(len(engine.trained_prompts), engine.nearest_trained("a pencil sketch!")["trained"],
      sorted(m for m in sys.modules if m == "lsd_train" or m.startswith("lsd_train.")))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    assert out == [str(len(TASKS)), "True", "[]"], out


def test_ship_demo_copies_a_finished_run_with_its_record(uninterrupted, tmp_path):
    """`lsd ship-demo` copies the run's model with its trained prompts, and writes
    TRAINING.md with the recipe, the parameter count and the steps; an unfinished run is refused."""
    from lsd_jax.checkpoint import load_config_from, load_model, load_trained_prompts
    from lsd_jax.errors import CheckpointError
    from lsd_train.ship_demo import ship
    from lsd_train.tasks import TASKS

    dest = ship(uninterrupted, "lsd train --config lsd_configs/tiny.py", dest=tmp_path / "demo")
    assert load_trained_prompts(dest) == tuple(t.prompt for t in TASKS)
    _, model = load_model(dest)
    from flax import nnx

    count = sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    text = (dest / "TRAINING.md").read_text()
    assert f"{count:,} parameters" in text and "| steps | 20 " in text and "`tiny` recipe" in text
    short = tmp_path / "short"
    shutil.copytree(uninterrupted, short)
    meta = json.loads((short / "model" / "config.json").read_text())
    meta["config"]["train"]["steps"] = 40
    (short / "model" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="stopped at step 20 of 40"):
        ship(short, "x", dest=tmp_path / "demo2")
    # overrides of how it runs are stored and recorded; ones that change its shapes are refused
    assert load_config_from(dest).diffusion.frame_noise == "fresh"
    fixed = ship(uninterrupted, "x", dest=tmp_path / "fixed",
                 overrides=("diffusion.frame_noise=fixed",))
    assert load_config_from(fixed).diffusion.frame_noise == "fixed"
    assert load_trained_prompts(fixed) == load_trained_prompts(dest)
    record = (fixed / "TRAINING.md").read_text()
    assert "Shipped to run with `diffusion.frame_noise=fixed`" in record
    with pytest.raises(CheckpointError, match="change the model .model.depth."):
        ship(uninterrupted, "x", dest=tmp_path / "deep", overrides=("model.depth=7",))
    assert not (tmp_path / "deep").exists()


def test_warm_start_takes_the_weights_of_a_model_directory(uninterrupted, monkeypatch):
    """`train.init_from` starts step 0 from a model directory's weights (params and EMA equal to
    them, optimiser fresh), named by a path relative to the working directory as a user types it;
    a different architecture is a ConfigError naming the key."""
    from flax import nnx

    from lsd_jax.checkpoint import load_model
    from lsd_jax.config import apply_overrides
    from lsd_jax.errors import ConfigError
    from lsd_train import sharding
    from lsd_train.trainer import build_step, warm_start

    monkeypatch.chdir(uninterrupted)
    source = uninterrupted / "model"
    cfg = apply_overrides(load_config(REPO_ROOT / "lsd_configs/tiny.py"),
                          [*RESUME, "train.init_from=model", "model.attention_impl=jax_nn"])
    sharded = build_step(cfg, sharding.make_mesh(cfg.mesh))
    fresh = sharded.init()
    started = warm_start(cfg, sharded, fresh)
    _, model = load_model(source)
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert int(started["step"]) == 0
    for name in ("params", "ema"):
        pairs = zip(jax.tree.leaves(started[name]), jax.tree.leaves(expected), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs)
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(expected), strict=True)]
    assert sum(moved) > len(moved) // 2  # the fresh initialisation is not the source's
    wider = apply_overrides(cfg, ["model.hidden_size=48"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size=32.*model\.hidden_size=48"):
        warm_start(wider, build_step(wider, sharding.make_mesh(wider.mesh)), fresh)
    # the colour map may grow: the source's weights, the new layer at zero, the same function
    curves = apply_overrides(cfg, ["model.color_map=curves"])
    sharded = build_step(curves, sharding.make_mesh(curves.mesh))
    messages = []
    grown = warm_start(curves, sharded, sharded.init(), messages.append)
    assert messages == ["model.color_map grows from 'none' to 'curves' (the added features start "
                        "at zero)"]
    params = dict(grown["params"])
    assert params.pop("color_map")["kernel"].shape == (32, 3 * 15)
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(expected), strict=True))
    from lsd_jax.model import model_from_params

    x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, *cfg.model.frame_shape))
    cond = jax.random.uniform(jax.random.PRNGKey(1), x.shape, minval=-1, maxval=1)
    time_bt = jnp.full((1, 2), 500.0)
    step_bt = jnp.full((1, 2), 0.5) if cfg.model.use_step_size else None
    out_grown, out_source = (
        m(x, time_bt, cond_bthwc=cond, step_size_bt=step_bt,
          prompt_bp=jax.random.normal(jax.random.PRNGKey(2), (1, cfg.model.prompt_dim)),
          external_btx=None)
        for m in (model_from_params(curves.model, grown["params"]), model))
    assert rel_err(out_grown, out_source) < 1e-6


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(uninterrupted, repo_root):
    root = uninterrupted.parent
    workdir = root / "b"
    env = _env(root / "cache")
    proc = subprocess.Popen(_train_cmd(workdir, RESUME), cwd=repo_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    committed = workdir / "checkpoints" / "10"
    deadline = time.monotonic() + 300
    while not committed.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run B ended before the kill: {stderr[-2000:]}"
    assert committed.is_dir() and not (workdir / "checkpoints" / "20").exists()

    resumed = subprocess.run(_train_cmd(workdir, RESUME, "--resume"), cwd=repo_root, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # 10, or 15 when B committed that one too before it died.
    assert re.search(r"resumed from step (10|15)\n", resumed.stderr), resumed.stderr[-2000:]

    expected, got = _by_step(uninterrupted), _by_step(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step]["batch_crcs"] == expected[step]["batch_crcs"], step
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=0, abs=1e-6), step
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        _restore_state(workdir, 20), _restore_state(uninterrupted, 20)))
    assert max(diffs) <= 1e-6, max(diffs)
    assert (workdir / "model" / "config.json").is_file()
    assert (workdir / "samples" / "step_0000020.mp4").is_file()
    assert (workdir / "plots" / "loss.png").is_file()
    assert list((workdir / "tb").iterdir())


@pytest.mark.slow
def test_sigterm_saves_and_stops(uninterrupted, repo_root):
    root = uninterrupted.parent
    workdir = root / "term"
    proc = subprocess.Popen(_train_cmd(workdir, RESUME), cwd=repo_root, env=_env(root / "cache"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "5").is_dir() and proc.poll() is None and (
            time.monotonic() < deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = int(re.search(r"SIGTERM received: saving step (\d+) and stopping", stderr)[1])
    assert 5 <= stopped < 20
    state = _restore_state(workdir, stopped)
    assert int(state["step"]) == stopped
    expected = _by_step(uninterrupted)[stopped]["loss"]
    assert _by_step(workdir)[stopped]["loss"] == pytest.approx(expected, rel=0, abs=1e-6)
    assert (workdir / "model" / "config.json").is_file()


def test_damaged_newest_checkpoint_falls_back(uninterrupted, tmp_path):
    from lsd_train import trainer

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", workdir / "checkpoints")
    for path in (workdir / "checkpoints" / "20" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = load_config("lsd_configs/tiny.py", RESUME)
    sharded = trainer.build_step(cfg, trainer.sharding.make_mesh(cfg.mesh))
    manager = trainer.checkpoint_manager(workdir, cfg)
    with pytest.warns(UserWarning, match="checkpoint step 20 .* cannot be restored"):
        step, state, data_state = trainer.restore_checkpoint(manager, sharded.abstract_state)
    manager.close()
    assert step == 15 and int(state["step"]) == 15
    assert data_state == {"next_index": 15 * 4}
    reference = _restore_state(uninterrupted, 15)
    np.testing.assert_array_equal(
        state["params"]["x_embedder"]["kernel"], reference["params"]["x_embedder"]["kernel"])


@pytest.mark.slow
def test_loss_falls_on_paired_procedural_data(tmp_path, repo_root):
    overrides = [*TINY, "model.hidden_size=64", "train.batch_size=8", "train.steps=200",
                 "train.warmup_steps=10", "train.lr=2e-3", "train.save_every=0",
                 "train.sample_every=0", "train.log_every=1"]
    proc = subprocess.run(_train_cmd(tmp_path / "run", overrides), cwd=repo_root,
                          env=_env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [entry["loss/flow_matching"] for _, entry in sorted(_by_step(tmp_path /
                                                                          "run").items())]
    first, last = np.mean(losses[:20]), np.mean(losses[-40:])
    assert last < 0.6 * first, (first, last)


@pytest.mark.slow
def test_eval_loads_the_ema_of_a_training_step(uninterrupted):
    """`lsd eval --checkpoint WORKDIR@STEP` evaluates exactly the EMA weights of that checkpoint;
    a step that was not saved is an error naming the steps there are."""
    from flax import nnx

    from lsd_jax.errors import CheckpointError
    from lsd_train.evaluate import resolve_model

    model = resolve_model(f"ema10={uninterrupted}@10")
    assert model.label == "ema10" and model.cfg.model.hidden_size == 32
    ema = _restore_state(uninterrupted, 10)["ema"]
    got = nnx.to_pure_dict(nnx.state(nnx.merge(model.graphdef, model.state), nnx.Param))
    flat_got, flat_ema = jax.tree.leaves(got), jax.tree.leaves(ema)
    assert len(flat_got) == len(flat_ema) > 0
    for a, b in zip(flat_got, flat_ema, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .*\[5, 10, 15, 20\]"):
        resolve_model(f"{uninterrupted}@7")


@pytest.mark.slow
def test_resume_moves_a_damaged_checkpoint_aside_and_keeps_the_saved_config(tmp_path, repo_root,
                                                                             capsys):
    """`--resume` with no checkpoint says so and starts at 0. After its step-8 checkpoint is
    overwritten with random bytes, `--resume train.steps=12` (without the run's
    train.batch_size=4 on the command line) restores step 4 with the saved batch size, moves step 8
    aside, trains to 12 and saves 8 and 12 again; metrics.jsonl holds each step once. Overrides
    that conflict with the saved config are one-line errors naming both values."""
    from lsd_cli.main import main

    workdir, env = tmp_path / "run", _env(tmp_path / "cache")
    overrides = [*TINY, "train.save_every=4", "train.keep=10", "train.log_every=1",
                 "train.sample_every=0"]
    first = subprocess.run(_train_cmd(workdir, [*overrides, "train.steps=8"], "--resume"),
                           cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (f"--resume: no checkpoint in {workdir.absolute() / 'checkpoints'}; starting from "
            "step 0\n") in first.stderr
    rng = np.random.default_rng(0)
    for path in (workdir / "checkpoints" / "8").rglob("*"):
        if path.is_file():
            path.write_bytes(rng.integers(0, 256, max(path.stat().st_size, 16), np.uint8)
                             .tobytes())

    without_batch = [o for o in overrides if not o.startswith("train.batch_size=")]
    for conflict, saved in [("train.batch_size=2", "train.batch_size=4"),
                            ("model.depth=2", "model.depth=1")]:
        assert main(["train", "--config", "lsd_configs/tiny.py", "--workdir", str(workdir),
                     *without_batch, conflict, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"lsd: error: {conflict} conflicts with the run being resumed, which has {saved} "), err

    resumed = subprocess.run(_train_cmd(workdir, [*without_batch, "train.steps=12"], "--resume"),
                             cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4\n" in resumed.stderr
    assert "moved the damaged checkpoint step 8 aside to " in resumed.stderr
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names[:3] == ["12", "4", "8"] and len(names) == 4
    assert re.fullmatch(r"8\.damaged-\d{8}T\d{6}", names[3]), names
    assert int(_restore_state(workdir, 12)["step"]) == 12
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    saved = json.loads((workdir / "model" / "config.json").read_text())["config"]
    assert saved["train"]["batch_size"] == 4 and saved["train"]["steps"] == 12


def test_unwritable_workdir_is_one_line(capsys):
    """A work directory that cannot be written (under /sys: even root cannot) is one line naming
    it, exit 2, before any data or compile."""
    from lsd_cli.main import main

    workdir = "/sys/lsd-test-workdir"
    assert main(["train", "--config", "lsd_configs/tiny.py", "--workdir", workdir, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lsd: error: work directory {workdir!r} is not writable: Operation not "
                   "permitted"], err
