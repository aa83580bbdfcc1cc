"""`lsd train`: train a config, or only compile its sharded step (`--aot-only`).

    lsd train --config lsd_configs/tiny.py --workdir runs/tiny [key.path=value ...] [--resume]
    lsd train --aot-only --config lsd_configs/lsd_base.py --devices 64 mesh.data=8 mesh.fsdp=8 \
        train.batch_size=64

Several processes (`jax.distributed`): `--coordinator HOST:PORT --num-processes N --process-id I`,
or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; with
none of them, under SLURM (`srun`), Open MPI (`mpirun`) and on Cloud TPU VMs / GKE TPU pods
`jax.distributed.initialize()` finds them itself (`cluster_env`).
`--devices N` simulates N CPU devices (compile and memory planning without the hardware).
Exit status 0 when the run finished, 128 + the signal number when SIGTERM/SIGINT stopped it
(after saving).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from functools import partial

from lsd_jax.args import int_in, step_counts


def register(commands, add_command, bench) -> None:
    """Add `lsd train`, `lsd eval` and `lsd bench train` to the `lsd` command (see
    `lsd_jax/cli.py`)."""
    _register_eval(commands)
    bench_train = add_command(bench, "train", _run_bench_train,
                              "frames/s and FLOP utilisation of the sharded train step")
    bench_train.add_argument("--steps", type=int_in(1), default=20, help="timed steps")
    bench_train.add_argument("--warmup", type=int_in(0), default=3,
                             help="untimed steps after compiling")
    bench_train.add_argument("--json", action="store_true", help="print one JSON object")
    parser = add_command(commands, "train", _run_train,
                         "train a config (grain data, sharded step, orbax checkpoints)")
    parser.add_argument("--workdir", help="checkpoints, model, metrics (required unless "
                                          "--aot-only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in --workdir, with "
                             "the run's saved config (WORKDIR/model/config.json): overrides may "
                             "change train.steps and mesh.*, another value is an error; with no "
                             "checkpoint there yet, it says so and starts from step 0 (so one "
                             "command both starts and continues a run)")
    parser.add_argument("--aot-only", action="store_true",
                        help="lower and compile the step, report per-device memory, do not run")
    parser.add_argument("--devices", type=int_in(1), default=None,
                        help="simulate this many CPU devices")
    parser.add_argument("--coordinator", default=None, help="jax.distributed coordinator "
                                                            "HOST:PORT")
    parser.add_argument("--num-processes", type=int_in(1), default=None)
    parser.add_argument("--process-id", type=int_in(0), default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _distributed_args(args) -> dict | None:
    """`jax.distributed.initialize` arguments: the flags, else the environment variables, else
    `{}` (JAX detects everything) in a managed cluster of several processes (`cluster_env`; not
    looked for with `--devices`); None for a single process (no coordinator named, no cluster,
    or a process count of 1)."""
    env = os.environ
    address = args.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    count = args.num_processes or env.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else env.get("JAX_PROCESS_ID")
    if count is not None and int(count) == 1:
        return None
    cluster = None if getattr(args, "devices", None) is not None else cluster_env()
    if address is None and cluster is None:
        if count is None and pid is None:
            return None
        from lsd_jax.errors import ConfigError

        raise ConfigError("--num-processes/--process-id (or JAX_NUM_PROCESSES/JAX_PROCESS_ID) "
                          "given without a coordinator (--coordinator HOST:PORT or "
                          "JAX_COORDINATOR_ADDRESS)")
    if cluster is None and (count is None or pid is None):
        from lsd_jax.errors import ConfigError

        raise ConfigError(f"coordinator {address!r} given without the process count and id "
                          "(--num-processes/--process-id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    # What is not given here, jax.distributed.initialize() reads from the cluster.
    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    return {k: v if k == "coordinator_address" else int(v) for k, v in given.items()
            if v is not None}


def cluster_env() -> str | None:
    """The managed cluster `jax.distributed.initialize()` configures itself from with no
    arguments, when this process is one of several: "slurm" (a task of `srun`), "openmpi"
    (`mpirun`) or "tpu" (the workers of a Cloud TPU pod slice, on TPU VMs or GKE); else None."""
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    # Set when `import jax` found TPU chips and libtpu.
    from jax._src import cloud_tpu_init

    if cloud_tpu_init.running_in_cloud_tpu_vm:
        try:  # the workers of every slice: TPU_WORKER_HOSTNAMES on GKE, else the VM's metadata
            from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster, GkeTpuCluster

            if any(c.is_env_present() and c.get_process_count() > 1
                   for c in (GkeTpuCluster, GceTpuCluster)):
                return "tpu"
        except (ImportError, AttributeError):  # another JAX: let initialize() decide
            return "tpu"
    return None


def _run_train(args: argparse.Namespace) -> int:
    import jax

    from lsd_jax.args import config_from_args
    from lsd_jax.errors import ConfigError

    if args.devices is not None:
        # Before the backend starts: simulated CPU devices for compiling without the hardware.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    cfg = config_from_args(args)
    dist = _distributed_args(args)
    if dist is not None:
        jax.distributed.initialize(**dist)

    from lsd_train import sharding, trainer

    if args.aot_only:
        mesh = sharding.make_mesh(cfg.mesh)
        cfg = trainer.resolve_batch_size(cfg, mesh)
        _, report = trainer.compile_step(cfg, trainer.build_step(cfg, mesh))
        report = {"config": cfg.name, "batch_size": cfg.train.batch_size,
                  "clip_frames": cfg.data.clip_frames, **report}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for key, value in report.items():
                shown = f"{value / 2**30:.3f} GiB" if key.endswith("_bytes") else value
                print(f"{key:<22} {shown}")
        return 0
    if not args.workdir:
        raise ConfigError("lsd train needs --workdir DIR (or --aot-only)")
    if args.resume:
        from pathlib import Path

        cfg = trainer.resume_config(Path(args.workdir), cfg, args.overrides)
    log = (lambda msg: print(msg, file=sys.stderr)) if jax.process_index() == 0 else (
        lambda msg: None)
    result = trainer.train(cfg, args.workdir, resume=args.resume,
                           progress=not args.no_progress, log=log)
    from pathlib import Path

    log(f"step {result['step']}: model (EMA weights) written to "
        f"{Path(args.workdir) / 'model'}; checkpoints in {Path(args.workdir) / 'checkpoints'}")
    if args.json and jax.process_index() == 0:
        print(json.dumps(result, indent=2))
    if result["stopped_by"] is not None:
        return 128 + signal.Signals[result["stopped_by"]].value
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from lsd_jax.args import config_from_args
    from lsd_train.bench import bench_train

    result = bench_train(config_from_args(args), steps=args.steps, warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = result["step_ms"]
    rows = [
        ("config", f"{result['config']}, batch {result['batch']} x {result['clip_frames']} "
                   f"frames of {'x'.join(map(str, result['frame_shape']))}"),
        ("device", f"{result['devices']} x {result['device']}, {result['cpu_count']} CPUs, "
                   f"jax {result['jax_version']}"),
        ("compile", f"{result['compile_s']:.1f} s"),
        ("step", f"p50 {ms['p50']:.1f} ms  min {ms['min']:.1f}  mean {ms['mean']:.1f}"),
        ("throughput", f"{result['frames_per_s']:.1f} frames/s, "
                       f"{result['tokens_per_s']:.0f} tokens/s"),
        ("FLOPs per step", f"{result['flops_per_step'] / 1e9:.2f} GFLOP (compiled HLO matmuls)"),
        ("achieved", f"{result['achieved_gflops']:.2f} GFLOP/s"),
        ("matmul peak", f"{result['matmul_peak_gflops']:.2f} GFLOP/s (float32 "
                        f"{result['matmul_peak_size']}^2)"),
        ("of peak", f"{result['percent_of_peak']:.1f}%"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")
    return 0


# ----------------------------------------------------------------------------- lsd eval


EVAL_KINDS = ("quality", "drift", "paraphrase", "real")


def _register_eval(commands) -> None:
    parser = commands.add_parser(
        "eval", help="held-out quality (PSNR/SSIM/flicker by steps), long-stream drift, "
                     "paraphrases, real video",
        description="lsd eval [quality]: PSNR, SSIM and flicker per prompt on held-out clips at "
                    "several step counts. lsd eval drift: PSNR over an endless held-out stream. "
                    "lsd eval paraphrase: held-out phrasings of the prompts. lsd eval real: "
                    "scikit-image's GIF and LFW faces (real video never trained on) under "
                    "several prompts, as pictures. Tables and plots go to --out and into a "
                    "section of --report. Trailing key.path=value overrides apply to every "
                    "model's stored config: how it runs (diffusion.frame_noise=fixed), not its "
                    "shapes.")
    # No argparse choices: an override (`lsd eval diffusion.frame_noise=fixed`) may take this
    # optional positional's place; `_run_eval` checks it.
    parser.add_argument("what", nargs="?", metavar="{" + ",".join(EVAL_KINDS) + "}",
                        default="quality")
    parser.add_argument("--checkpoint", action="append", metavar="[NAME=]SPEC",
                        help="model: 'demo' (built in, the default), a model directory, a "
                             "training work directory, or WORKDIR@STEP; repeat to compare")
    parser.add_argument("--steps", type=step_counts, default=None,
                        help="denoising steps: a list for quality (default 1,2,3,4,8,12), one "
                             "count for drift (default 3)")
    parser.add_argument("--clips", type=int_in(1), default=4,
                        help="held-out clips per task (quality)")
    parser.add_argument("--frames", type=int_in(1), default=None,
                        help="frames per clip (quality, default 24) or in the stream (drift, "
                             "default 3000)")
    parser.add_argument("--tasks", default="all", help="tasks (quality): all or names")
    parser.add_argument("--split", choices=("heldout", "validation", "unseen"),
                        default="heldout",
                        help="quality and paraphrase clips: heldout (photographs never trained "
                             "on; the reported figures), validation (training photographs, unseen "
                             "camera seeds; for choosing recipes) or unseen (two pictures no split "
                             "trains on or holds out; for choosing recipes by how they carry to "
                             "new pictures)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="real: a prompt to stream the clips under (repeat; default: a "
                             "pencil sketch, a thermal camera image, a cartoon with bold "
                             "outlines, an old sepia photograph)")
    parser.add_argument("--task", default="motion_trails",
                        help="task of the drift stream (default motion_trails, the task that "
                             "depends on the model's own past outputs)")
    parser.add_argument("--period", type=int_in(1), default=1000,
                        help="period of the drift camera path, frames (first/last windows)")
    parser.add_argument("--save-every", type=int_in(1), default=5_000,
                        help="drift with --out: checkpoint the stream every N frames "
                             "(<section>_<model>_checkpoint.npz: the PSNR so far and the stream's "
                             "state), so a stream of hours can be stopped and resumed")
    parser.add_argument("--resume", action="store_true",
                        help="drift: continue from the checkpoint in --out (the same run: model, "
                             "frames, steps, task, period, seed); the result equals an "
                             "uninterrupted run's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="directory for JSON, PNG and npz (default: write no files)")
    parser.add_argument("--report", default=None,
                        help="markdown file whose section --section is (re)written (needs "
                             "--out for its pictures; default: no report)")
    parser.add_argument("--section", default=None,
                        help="name of the report section and file prefix (default: quality or "
                             "drift)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(run=_run_eval, overrides=[])


def _run_eval(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import numpy as np

    from lsd_jax.errors import ConfigError
    from lsd_train import eval_report, evaluate

    if "=" in args.what:  # an override in the optional positional's place
        args.overrides, args.what = [args.what, *args.overrides], "quality"
    if args.what not in EVAL_KINDS:
        raise ConfigError(f"lsd eval {args.what!r}, expected one of {', '.join(EVAL_KINDS)} "
                          "(or key.path=value overrides)")
    specs = args.checkpoint or ["demo"]
    if args.report and not args.out:
        raise ConfigError(f"lsd eval --report {args.report}: also give --out DIR for the "
                          "report's pictures and JSON")
    out_dir = Path(args.out) if args.out else None
    report = Path(args.report) if args.report else None
    section = args.section or args.what
    models = [evaluate.resolve_model(spec, args.overrides) for spec in specs]

    def rel(path: Path) -> str:
        base = report.absolute().parent if report else Path.cwd()
        return os.path.relpath(path.absolute(), base)

    if args.what == "quality":
        steps = args.steps or evaluate.QUALITY_STEPS
        results = [evaluate.evaluate_quality(m, steps_list=steps, clips=args.clips,
                                             frames=args.frames or 24, seed=args.seed,
                                             tasks=args.tasks, split=args.split,
                                             progress=not args.no_progress)
                   for m in models]
        pictures = {}
        if out_dir:
            plot = eval_report.plot_quality(results, out_dir / f"{section}_psnr.png")
            strips = eval_report.strips_picture(results[0], out_dir / f"{section}_strips.jpg")
            pictures = {"PSNR by denoising steps": rel(plot),
                        f"input | output | target, {results[0]['model']}": rel(strips)}
        body = eval_report.quality_markdown(results, pictures=pictures)
        k3 = 3 if 3 in steps else steps[0]
        kmax = max(steps)
        for r in results:
            s = r["summary"]
            print(f"{r['model']}: per-frame tasks {s[k3]['per_frame_psnr']:.2f} dB, temporal "
                  f"{s[k3]['temporal_psnr']:.2f} dB at {k3} steps; per-frame "
                  f"{s[kmax]['per_frame_psnr']:.2f} dB at {kmax} steps", file=sys.stderr)
    elif args.what == "real":
        from lsd_train.eval_real import (
            REAL_CLIPS,
            REAL_PROMPTS,
            evaluate_real,
            real_markdown,
            real_strip,
        )

        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval real --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        results = [evaluate_real(m, prompts=tuple(args.prompt or REAL_PROMPTS),
                                 steps=args.steps[0] if args.steps else 3, seed=args.seed)
                   for m in models]
        pictures = {}
        if out_dir:
            for name in REAL_CLIPS:
                strip = real_strip(results[0], name, out_dir / f"{section}_{name}.jpg")
                pictures[f"{name}: input, then each prompt's output"] = rel(strip)
        body = real_markdown(results, pictures=pictures)
        for r in results:
            print(f"{r['model']}: streamed {', '.join(r['clips'])} under {len(r['prompts'])} "
                  f"prompts in {r['seconds']:.0f} s", file=sys.stderr)
    elif args.what == "paraphrase":
        from lsd_train.eval_paraphrase import evaluate_paraphrases, paraphrase_markdown

        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval paraphrase --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        results = [evaluate_paraphrases(m, steps=args.steps[0] if args.steps else 3,
                                        clips=args.clips, frames=args.frames or 12,
                                        seed=args.seed, split=args.split,
                                        progress=not args.no_progress) for m in models]
        for r in results:
            closer = sum(p["margin"] > 0 for t in r["tasks"].values() for p in t["paraphrases"])
            total = sum(len(t["paraphrases"]) for t in r["tasks"].values())
            print(f"{r['model']}: {closer} of {total} paraphrases closer to their own task "
                  f"(smallest margin {r['min_margin']:+.2f} dB)", file=sys.stderr)
        body = paraphrase_markdown(results)
    else:
        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval drift --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        steps = args.steps[0] if args.steps else 3
        frames = args.frames or 3000
        results = []
        if args.resume and not out_dir:
            raise ConfigError("lsd eval drift --resume: expected --out, the directory holding "
                              "the run's checkpoint")
        for m in models:
            on_checkpoint, resume, ckpt_path = None, None, None
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
                ckpt_path = out_dir / f"{section}_{_slug(m.label)}_checkpoint.npz"
                on_checkpoint = partial(evaluate.save_drift_checkpoint, ckpt_path)
                if args.resume and ckpt_path.is_file():
                    resume = evaluate.load_drift_checkpoint(ckpt_path)
                    print(f"{m.label}: resuming at frame {resume['next_frame']:,} of {frames:,} "
                          f"from {ckpt_path}", file=sys.stderr)
            r = evaluate.evaluate_drift(m, frames=frames, steps=steps, task=args.task,
                                        period=args.period, seed=args.seed,
                                        progress=not args.no_progress,
                                        checkpoint_every=args.save_every,
                                        on_checkpoint=on_checkpoint, resume=resume)
            if out_dir:
                np.savez_compressed(out_dir / f"{section}_{_slug(m.label)}_psnr.npz",
                                    psnr=r["psnr"])
                ckpt_path.unlink(missing_ok=True)
            results.append(r)
            print(f"{m.label}: PSNR first {args.period} {r['first_mean']:.2f} dB, last "
                  f"{r['last_mean']:.2f} dB ({r['delta_db']:+.2f}) over {frames:,} frames",
                  file=sys.stderr)
        pictures = {}
        if out_dir:
            plot = eval_report.plot_drift(results, out_dir / f"{section}.png")
            pictures = {"PSNR over the stream": rel(plot)}
        body = eval_report.drift_markdown(results, pictures=pictures)
    payload = [eval_report.json_ready(r) for r in results]
    if out_dir:
        eval_report.save_json(out_dir / f"{section}.json", payload)
        print(f"wrote {out_dir}/{section}*", file=sys.stderr)
    if report:
        import shlex

        command = "lsd eval " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else ""
        if command:
            body = f"`{command}`\n\n" + body
        eval_report.replace_section(report, section, body)
        print(f"wrote {report} (section {section})", file=sys.stderr)
    if args.json:
        print(json.dumps(payload, indent=2))
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
