"""Copy a finished `lsd train` run into the package as the built-in demo model.

    lsd ship-demo --workdir runs/demo [--command "lsd train ..."] [key.path=value ...]

Writes `lsd_jax/demo_model/`: the run's EMA model (`config.json`, `params/`), `loss.png`, and
`TRAINING.md` with the command, the steps, the measured training time and throughput, and the
final losses from the run's `metrics.jsonl`. Overrides change how the shipped model runs (its
stored config, e.g. `diffusion.frame_noise=fixed`), never its shapes, and are recorded in
TRAINING.md. Refuses a run that has not reached its last step, or weights over 20 MB.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from lsd_jax.checkpoint import load_config_from
from lsd_jax.config import to_dict
from lsd_jax.demo import DEMO_MODEL_DIR
from lsd_jax.errors import CheckpointError
from lsd_jax.model import abstract_model, count_params

MAX_BYTES = 20 * 2**20


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize(workdir: Path) -> dict:
    """Steps, time spent in steps, throughput and the last logged losses of a run."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config_from(workdir / "model")
    frames_per_step = cfg.train.batch_size * cfg.data.clip_frames
    seconds, prev = 0.0, 0
    for entry in lines:
        seconds += (entry["step"] - prev) * frames_per_step / entry["frames_per_s"]
        prev = entry["step"]
    tail = lines[-10:]
    return {"config": cfg.name, "steps": lines[-1]["step"], "target_steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size, "clip_frames": cfg.data.clip_frames,
            "step_seconds": seconds,
            "frames_per_s": prev * frames_per_step / seconds if seconds else 0.0,
            "loss_last_10": sum(e["loss"] for e in tail) / len(tail),
            "flow_matching_last_10": sum(e["loss/flow_matching"] for e in tail) / len(tail),
            "loss_first": lines[0]["loss"]}


def ship(workdir: Path, command: str, dest: Path = DEMO_MODEL_DIR, overrides=()) -> Path:
    """Copy the finished run in `workdir` to `dest` (the package's demo model) with its
    TRAINING.md; `command` is what trained it, `overrides` how the shipped model runs."""
    model = workdir / "model"
    if not (model / "config.json").is_file():
        raise CheckpointError(f"{str(workdir)!r} has no exported model (model/config.json)")
    summary = summarize(workdir)
    if summary["steps"] < summary["target_steps"]:
        raise CheckpointError(f"{str(workdir)!r} stopped at step {summary['steps']} of "
                              f"{summary['target_steps']}; finish it with --resume first")
    size = dir_bytes(model)
    if size > MAX_BYTES:
        raise CheckpointError(f"model of {str(workdir)!r} is {size:,} bytes, over the "
                              f"{MAX_BYTES:,} allowed in the package")
    trained_cfg = load_config_from(model)
    cfg = load_config_from(model, overrides)
    if cfg.model != trained_cfg.model:
        changed = [f"model.{k}" for k, v in vars(cfg.model).items()
                   if v != getattr(trained_cfg.model, k)]
        raise CheckpointError(f"overrides {' '.join(overrides)} change the model "
                              f"({', '.join(changed)}): the shipped weights would not fit; "
                              "expected overrides of how it runs (diffusion.*)")
    trainable = count_params(abstract_model(cfg.model))[1]
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest)
    if overrides:
        meta = json.loads((dest / "config.json").read_text())
        meta["config"] = to_dict(cfg)
        (dest / "config.json").write_text(json.dumps(meta, indent=2))
    runs_with = ("" if not overrides else "\nShipped to run with " + ", ".join(
        f"`{o}`" for o in overrides) + " (set at shipping: how it samples, not its weights).\n")
    if (workdir / "plots" / "loss.png").is_file():
        shutil.copy(workdir / "plots" / "loss.png", dest / "loss.png")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    s = summary
    (dest / "TRAINING.md").write_text(f"""# The built-in demo model

Made by

    {command}

from the `{cfg.name}` recipe (`lsd_configs/{cfg.name}.py`; {trainable:,} parameters,
{cfg.prompt.encoder} prompt encoder), at commit {commit}, shipped
{datetime.now(UTC):%Y-%m-%d} from a {platform.machine()} machine with
{os.cpu_count()} CPU cores ({platform.python_implementation()}
{platform.python_version()}).
{runs_with}
| | |
|---|---|
| steps | {s['steps']:,} (batch {s['batch_size']} clips x {s['clip_frames']} frames) |
| time in train steps | {s['step_seconds'] / 60:.1f} min ({s['frames_per_s']:.1f} frames/s) |
| loss: first log -> mean of the last 10 logs | {s['loss_first']:.3f} -> {s['loss_last_10']:.3f} |
| flow-matching loss, mean of the last 10 logs | {s['flow_matching_last_10']:.3f} |
| weights | EMA (`train.ema_decay`), {dir_bytes(dest / 'params'):,} bytes (orbax) |

Data: the procedural training split (scikit-image photographs under random camera paths with
sprites) paired with the nine tasks of `lsd_train/tasks.py`. Evaluation on the held-out split:
EVAL.md (`lsd eval`). Loss curve: `loss.png`.
""")
    return dest
