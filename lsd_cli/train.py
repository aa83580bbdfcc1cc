"""The training commands of `lsd` (`lsd_train`):

    lsd train --config tiny --workdir runs/tiny [key.path=value ...] [--resume]
    lsd train --aot-only --config lsd_base --devices 64 mesh.data=8 mesh.fsdp=8 \
        train.batch_size=64
    lsd bench train --config tiny train.batch_size=8 [--steps 20] [--json]
    lsd ship-demo --workdir runs/demo [--command "lsd train ..."] [key.path=value ...]
    lsd cost-model [--configs lsd_base,oasis_500m] [--mesh 1,8,1] [--batch-sizes 0] [--json]

`lsd train` trains a config, or only compiles its sharded step (`--aot-only`). `lsd ship-demo`
copies a finished run into the package as the built-in demo model (`lsd_train.ship_demo`);
`lsd cost-model` predicts the train step's time and MFU on H100 and TPU v5p from its compile on
simulated CPU devices (`lsd_train.cost_model`).

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
from pathlib import Path

import jax

from lsd_cli.args import add_command, config_from_args, int_in
from lsd_cli.output import print_rows
from lsd_jax.errors import ConfigError


def register(commands, bench) -> None:
    """Add `lsd bench train`, `lsd train`, `lsd ship-demo` and `lsd cost-model`."""
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

    ship = commands.add_parser("ship-demo", help="copy a finished training run into the package "
                               "as the built-in demo model",
                               description="Copy a finished lsd train run (its EMA model, loss "
                               "plot and a TRAINING.md) into the package as the built-in demo "
                               "model.")
    ship.add_argument("--workdir", required=True, type=Path, help="the run's work directory")
    ship.add_argument("--command", default="lsd train --config tiny_pixel --workdir "
                                           "runs/tiny_pixel",
                      help="the command that trained the run, written into TRAINING.md")
    ship.add_argument("overrides", nargs="*", metavar="key.path=value",
                      help="how the shipped model runs (its stored config), e.g. "
                           "diffusion.frame_noise=fixed")
    ship.set_defaults(run=_run_ship_demo)

    cost = commands.add_parser("cost-model", help="predicted train-step time and MFU on H100 and "
                               "TPU v5p, from the step compiled on simulated CPU devices",
                               description="A cost model of the sharded train step: each "
                               "config's step compiled on simulated CPU devices, its FLOPs, HBM "
                               "bytes and collectives, and the step time and MFU predicted on 8 "
                               "H100 SXM and on a TPU v5p-16, as a Markdown table.")
    cost.add_argument("--configs", default="lsd_base,oasis_500m",
                      help="comma-separated config names (lsd_configs/NAME.py) or files")
    cost.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    cost.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor")
    cost.add_argument("--batch-sizes", default="0",
                      help="comma-separated global batch sizes (0: one clip per device row)")
    cost.add_argument("--json", action="store_true", help="print the rows as JSON")
    cost.add_argument("overrides", nargs="*", metavar="key.path=value",
                      help="key.path=value config overrides")
    cost.set_defaults(run=_run_cost_model)


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
        raise ConfigError("--num-processes/--process-id (or JAX_NUM_PROCESSES/JAX_PROCESS_ID) "
                          "given without a coordinator (--coordinator HOST:PORT or "
                          "JAX_COORDINATOR_ADDRESS)")
    if cluster is None and (count is None or pid is None):
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


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _log_nothing(message: str) -> None:
    del message


def _run_train(args: argparse.Namespace) -> int:
    if args.devices is not None:
        # Before the backend starts: simulated CPU devices for compiling without the hardware.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    cfg = config_from_args(args)
    dist = _distributed_args(args)
    if dist is not None:
        jax.distributed.initialize(**dist)

    from lsd_train import sharding, trainer  # lazy: Flax, optax, orbax, grain: this command only

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
        cfg = trainer.resume_config(Path(args.workdir), cfg, args.overrides)
    log = _log if jax.process_index() == 0 else _log_nothing
    result = trainer.train(cfg, args.workdir, resume=args.resume,
                           progress=not args.no_progress, log=log)
    log(f"step {result['step']}: model (EMA weights) written to "
        f"{Path(args.workdir) / 'model'}; checkpoints in {Path(args.workdir) / 'checkpoints'}")
    if args.json and jax.process_index() == 0:
        print(json.dumps(result, indent=2))
    if result["stopped_by"] is not None:
        return 128 + signal.Signals[result["stopped_by"]].value
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from lsd_train.bench import bench_train  # lazy: the trainer, for this command only

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
    print_rows(rows)
    return 0


# ----------------------------------------------------------------------------- lsd ship-demo


def _run_ship_demo(args: argparse.Namespace) -> int:
    from lsd_train.ship_demo import dir_bytes, ship  # lazy: Flax and the model, this command only

    dest = ship(args.workdir, args.command, overrides=tuple(args.overrides))
    print(f"wrote {dest} ({dir_bytes(dest):,} bytes)")
    return 0


# ----------------------------------------------------------------------------- lsd cost-model


def _run_cost_model(args: argparse.Namespace) -> int:
    from lsd_train.cost_model import cost_table  # lazy: the trainer, for this command only

    # Before the backend starts: simulated CPU devices for compiling without the hardware.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    mesh = tuple(int(x) for x in args.mesh.split(","))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    table, rows = cost_table(args.configs.split(","), devices=args.devices, mesh=mesh,
                             batch_sizes=batches, overrides=args.overrides)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(table)
    return 0
