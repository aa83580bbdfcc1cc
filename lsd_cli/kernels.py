"""`lsd kernels`: the fused kernels (`lsd_kernels`) compiled ahead of time for hardware this machine
need not have.

    lsd kernels tpu-aot [TOPOLOGY ...] [bf16|f32 ...]   # Mosaic TPU kernels: VMEM and HBM use
    lsd kernels triton-aot                             # the Triton ring kernel for sm_90

`tpu-aot` compiles every Mosaic TPU kernel at the Oasis shape for each topology (`v5e`, `v6e`,
`v5p`, `v7x` or a libtpu topology string; default v5e and v6e) and dtype (default both), with the
`libtpu` wheel (the `kernels` extra). `triton-aot` assembles each variant of the jax-triton ring
kernel for H100 with the `ptxas` of the `triton` wheel: registers, spills, shared memory. The
kernel benchmark is `lsd bench kernels`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from lsd_kernels import triton_aot

TPU_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def _run_tpu_aot(args: argparse.Namespace) -> int:
    """Print a table of every kernel's compile for the topologies and dtypes asked for."""
    from lsd_kernels import tpu_aot  # lazy: importing it sets libtpu's environment variables

    topologies = [a for a in args.targets if a not in TPU_DTYPES] or ["v5e", "v6e"]
    chosen = [TPU_DTYPES[a] for a in args.targets if a in TPU_DTYPES] or list(TPU_DTYPES.values())
    print(f"libtpu {tpu_aot.libtpu_version()}, jax {jax.__version__}; HBM bytes, shape "
          f"{tpu_aot.OASIS}")
    print(f"{'topology':12} {'dtype':9} {'kernel':23} {'result':8} {'s':>5} {'argument':>9} "
          f"{'output':>9} {'temp':>9} {'code':>8}")
    for topology in topologies:
        for dtype in chosen:
            for name, (fn, fn_args) in tpu_aot.kernel_cases(dtype).items():
                head = f"{topology:12} {jnp.dtype(dtype).name:9} {name:23}"
                try:
                    r = tpu_aot.compile_for_tpu(fn, *fn_args, topology=topology)
                except tpu_aot.TpuCompileUnavailable:
                    raise
                except Exception as err:  # Mosaic / XLA:TPU rejected it
                    print(f"{head} FAILED   {str(err).splitlines()[0][:200]}")
                    continue
                m = r["memory"]
                print(f"{head} ok       {r['seconds']:5.1f} {m['argument']:>9} {m['output']:>9} "
                      f"{m['temp']:>9} {m['code']:>8}")
    return 0


def _run_triton_aot(args: argparse.Namespace) -> int:
    """Print a table of the ring kernel's variants compiled for sm_90."""
    print(f"{'kernel':16} {'e':>4} {'dtype':9} {'pairs':11} {'block':>5} {'regs':>4} "
          f"{'spill st/ld':>11} {'smem':>6}")
    for head_dim in (64, 128):
        for dtype in ("bfloat16", "float32"):
            for interleaved in (True, False):
                s = triton_aot.compile_stats(head_dim=head_dim, dtype=dtype,
                                             interleaved=interleaved)
                pairs = "interleaved" if interleaved else "half split"
                print(f"{'ring_attention':16} {head_dim:>4} {dtype:9} {pairs:11} "
                      f"{s['block_n']:>5} {s['registers']:>4} "
                      f"{s['spill_stores']:>5}/{s['spill_loads']:<5} {s['shared_bytes']:>6}")
    print(f"target {s['target']}, {s['num_warps']} warps, {s['ptxas']}")
    return 0


def register(commands, bench) -> None:
    """Add `lsd kernels tpu-aot` and `lsd kernels triton-aot` (`lsd bench kernels` is
    `lsd_cli.bench`'s)."""
    del bench
    kernels = commands.add_parser("kernels", help="the fused kernels compiled ahead of time for "
                                  "TPU and H100").add_subparsers(
        dest="kernels_command", required=True, metavar="ACTION")
    tpu = kernels.add_parser("tpu-aot", help="compile every Mosaic TPU kernel for TPU topologies "
                             "(needs libtpu, the kernels extra)",
                             description="Compile every Mosaic TPU kernel at the Oasis shape for "
                             "TPU topologies without a TPU (libtpu's compile-only client); print "
                             "each compile's HBM use.")
    tpu.add_argument("targets", nargs="*", metavar="TOPOLOGY|DTYPE",
                     help="topologies (v5e, v6e, v5p, v7x or a libtpu topology such as v5e:2x2; "
                          "default v5e v6e) and dtypes (bf16, f32; default both)")
    tpu.set_defaults(run=_run_tpu_aot)
    triton = kernels.add_parser("triton-aot", help="registers, spills and shared memory of the "
                                "jax-triton ring kernel compiled for sm_90 (needs triton)",
                                description="Compile each variant of the jax-triton ring kernel "
                                "for H100 (sm_90) with the triton wheel's ptxas and print its "
                                "registers, spills and shared memory.")
    triton.set_defaults(run=_run_triton_aot)
