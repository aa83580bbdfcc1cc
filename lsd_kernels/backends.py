"""Where a Pallas kernel runs: one `Backend` per compiler, swappable per kernel.

The kernels of this package are written once against `pl.pallas_call` with block specs and
`jax.numpy` bodies; a `Backend` supplies what differs between compilers (the `compiler_params`
or the interpreter, the platform, block-size limits). Upstream is moving the GPU path from the
Triton backend to Mosaic GPU: a Mosaic GPU backend is one more row here, chosen kernel by kernel
(`lsd_kernels.impls`), without touching the kernel bodies.

- `triton`: Pallas' Triton backend (`cuda`): every array in a kernel has power-of-two sizes and
  matrix products have sides >= 16, so block sizes are powers of two;
- `mosaic_tpu`: Mosaic TPU (`tpu`): blocks' last two dims divisible by (8, 128) or whole;
- `interpret`: the Pallas interpreter on the host (`cpu`), the same kernels run as jaxprs: the
  numerics check on machines without an accelerator;
- `tpu_interpret`: the TPU interpreter (`cpu`) with race detection over two simulated cores that
  split the parallel grid axes (one on a host process limited to one CPU, `simulated_cores`): the
  TPU kernels' grid, DMA and memory-space semantics emulated on the host.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    platform: str  # the jax.export platform its kernels run on
    interpret: bool = False
    tpu_interpret: bool = False

    def params(self, semantics: Sequence[str]) -> dict:
        """`pallas_call` keyword arguments: interpreter or compiler parameters; `semantics` are
        the grid axes' `parallel` / `arbitrary` (used by Mosaic TPU)."""
        if self.tpu_interpret:
            from jax.experimental.pallas import tpu as pltpu

            # Two cores split the parallel grid axes (as on a megacore chip), so the race
            # detector sees programs that would run concurrently.
            return {"interpret": pltpu.InterpretParams(detect_races=True,
                                                       num_cores_or_threads=simulated_cores()),
                    "compiler_params": pltpu.CompilerParams(
                        dimension_semantics=tuple(semantics))}
        if self.interpret:
            return {"interpret": True}
        if self.name == "triton":
            from jax.experimental.pallas import triton as pltriton

            return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=2)}
        if self.name == "mosaic_tpu":
            from jax.experimental.pallas import tpu as pltpu

            return {"compiler_params": pltpu.CompilerParams(
                dimension_semantics=tuple(semantics))}
        raise ValueError(f"backend {self.name!r} has no pallas_call parameters")


def simulated_cores() -> int:
    """Cores the TPU interpreter simulates: 2 when this process may run on two CPUs, else 1.

    On one CPU, XLA's CPU client has a single thread, and the interpreter's two core threads
    (each running its programs through that client) wait on each other for ever inside a jitted
    step; one simulated core runs the same kernels without race detection across cores.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cpus or 1) >= 2 else 1


TRITON = Backend("triton", "cuda")
MOSAIC_TPU = Backend("mosaic_tpu", "tpu")
INTERPRET = Backend("interpret", "cpu", interpret=True)
TPU_INTERPRET = Backend("tpu_interpret", "cpu", tpu_interpret=True)
BACKENDS = {b.name: b for b in (TRITON, MOSAIC_TPU, INTERPRET, TPU_INTERPRET)}


def block_size(n: int, cap: int, minimum: int = 8) -> int:
    """The block along an axis of size `n`: the largest power of two <= `cap` that divides `n`
    (at least `minimum`: 8 where the axis is a TPU tile's sublanes), else the whole axis."""
    size = 1 << (max(cap, 1).bit_length() - 1)
    while size >= minimum:
        if n % size == 0:
            return size
        size //= 2
    return n


def full_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array as one block at every grid point."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
