"""What the Mosaic GPU kernels (`mosaic_flash`, `mosaic_ring`) share: how they run (on a Hopper GPU
or under JAX's Mosaic GPU interpreter on the host), the tile pipeline their memory warpgroup
runs, and the figures of a lowered kernel that can be read without a GPU.

**Running.** A kernel is `plgpu.kernel(body, ..., interpret=interpret_params(interpret))`: on CUDA
it lowers to one `mosaic_gpu_v2` custom call; with `interpret=True` JAX's Mosaic GPU interpreter
(`jax._src.pallas.mosaic_gpu.interpret`, jax 0.10.2) runs the same body on the CPU, simulating
shared memory, the warpgroups of a block as threads, barriers, TMA copies and WGMMA. In that
jax version the interpreter has no rule for `plgpu.layout_cast` (a no-op on values: it only tells
the lowering which register layout to use), so `interpret_params` registers the identity for
it on `cpu`; and it cannot interpret a WGMMA whose left operand is in registers, a transposed
shared-memory operand (`plgpu.transpose_ref`) or `pl.run_state`. The kernels are written within
those limits, so the body checked on the CPU is the body the GPU runs: every WGMMA operand is a
shared-memory tile (a probability tile is stored to shared memory before its product), operands
needed transposed are passed transposed by XLA, and accumulators are scoped per product and added
in registers.

**Tiles.** `Stream`s are the operands the memory warpgroup copies in, one tile per step, into
`slots` buffers (TMA, one barrier per buffer); `produce` issues them `slots` steps ahead of the
compute warpgroups, which wait on a tile's barrier and release its buffer (`free` barrier, one
arrival per compute warpgroup) when done with it.

**Figures without a GPU** (`lowered_stats`): the block's threads (128 per warpgroup), its shared
memory (the kernel's scratch plus Mosaic's own), the register budget that `setmaxnreg` fixes per
warpgroup, the grid, and the blocks that fit on one H100 SM by shared memory, registers and
threads. Registers a kernel actually uses and spills are known only after `ptxas` runs, which
happens inside the CUDA runtime (`lsd bench device` on a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# H100 SXM per SM (CUDA occupancy limits for compute capability 9.0).
H100_SMEM_PER_SM = 228 * 1024
H100_SMEM_PER_BLOCK = 227 * 1024
H100_REGISTERS_PER_SM = 65536
H100_THREADS_PER_SM = 2048
H100_MAX_BLOCKS_PER_SM = 32
H100_SMS = 132
WARPGROUP_THREADS = 128
SWIZZLE = 128  # bytes: the widest swizzle, the one WGMMA tiles of 64 bf16 use


class InterpreterUnavailable(RuntimeError):
    """This jax has no Mosaic GPU interpreter (it is in `jax._src`, jax >= 0.10)."""


@functools.cache
def _interpret_params_class():
    try:
        from jax._src.interpreters import mlir
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:
        raise InterpreterUnavailable(
            f"jax {jax.__version__} has no Mosaic GPU interpreter "
            f"(jax._src.pallas.mosaic_gpu.interpret): {err}") from err

    def _layout_cast_on_cpu(ctx, x, *, new_layout):
        del ctx, new_layout
        return [x]

    mlir.register_lowering(gpu_core.layout_cast_p, _layout_cast_on_cpu, platform="cpu")
    return InterpretGPUParams


def interpret_params(interpret: bool) -> Any:
    """`plgpu.kernel`'s `interpret` argument: None (compile for the GPU) or the interpreter's
    parameters (race detection off: the kernels' buffers are ordered by barriers)."""
    if not interpret:
        return None
    return _interpret_params_class()()


def interpreter_available() -> str | None:
    """None if the Mosaic GPU interpreter can run here, else why not."""
    try:
        _interpret_params_class()
    except InterpreterUnavailable as err:
        return str(err)
    return None


def tile_transforms(dtype) -> tuple:
    """Tiling and swizzle of a 2-D shared-memory tile whose rows are WGMMA operand rows."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lane = SWIZZLE // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, lane)), plgpu.SwizzleTransform(SWIZZLE))


def lane_multiple(dtype) -> int:
    """Elements of one swizzled row: a tile's minor dimension is a multiple of it."""
    return SWIZZLE // jnp.dtype(dtype).itemsize


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Stream:
    """One operand the memory warpgroup copies in: `source(step)` is the GMEM view of the step's
    tile, `buffers` the `[slots, ...]` shared-memory ref, `ready` and `free` `[slots]` barriers."""
    source: Callable[[Any], Any]
    buffers: Any
    ready: Any
    free: Any


def produce(streams: Sequence[Stream], steps: int, slots: int) -> None:
    """The memory warpgroup: copy each stream's tile of step `j` into buffer `j % slots` once the
    compute warpgroups have freed it, `slots` steps ahead, then wait until the last tiles are
    released (so every phase of every barrier is observed before the block ends)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def issue(j):
        slot = lax.rem(j, slots) if not isinstance(j, int) else j % slots
        for s in streams:
            plgpu.copy_gmem_to_smem(s.source(j), s.buffers.at[slot], s.ready.at[slot])

    for j in range(min(slots, steps)):
        issue(j)
    if steps > slots:
        @pl.loop(slots, steps)
        def _(j):
            slot = lax.rem(j, slots)
            for s in streams:
                plgpu.barrier_wait(s.free.at[slot])
            issue(j)
    for j in range(max(steps - slots, 0), steps):
        for s in streams:
            plgpu.barrier_wait(s.free.at[j % slots])


def stream_scratch(shape: tuple[int, ...], dtype, slots: int, consumers: int,
                   transforms: tuple = ()) -> tuple:
    """(buffers, ready, free) scratch types of one `Stream`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return (plgpu.SMEM((slots, *shape), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots))


# ----------------------------------------------------------------------------- lowered figures

_MOSAIC_ATTR = re.compile(r'module = "((?:[^"\\]|\\.)*)"')


def lowered_modules(fn: Callable, *args) -> list[str]:
    """The Mosaic GPU modules (MLIR text) of every `mosaic_gpu_v2` call in `jax.jit(fn)` lowered for
    `cuda` on this machine (no GPU needed)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

    exported = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args)
    text = exported.mlir_module()
    modules = []
    for found in _MOSAIC_ATTR.finditer(text):
        raw = _unescape_mlir_bytes(found.group(1))
        with jax_mlir.make_ir_context() as ctx:
            mgpu_dialect.register_dialect(ctx)
            ctx.allow_unregistered_dialects = True
            modules.append(str(ir.Module.parse(raw)))
    return modules


def _unescape_mlir_bytes(text: str) -> bytes:
    """The bytes of an MLIR string attribute as printed (`\\XX` hex escapes, `\\\\`, `\\"`)."""
    out, i = bytearray(), 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            if nxt in '\\"':
                out.append(ord(nxt))
                i += 2
                continue
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
            continue
        out += c.encode()
        i += 1
    return bytes(out)


def lowered_stats(fn: Callable, *args) -> list[dict[str, Any]]:
    """Per Mosaic GPU kernel in `jax.jit(fn)(*args)` lowered for `cuda` (see the module
    docstring): `grid`, `threads` per block, `warpgroups`, `smem_bytes` (dynamic shared memory of
    one block), `registers_per_thread` by warpgroup role where `setmaxnreg` fixes them (else
    None: ptxas decides), `wgmma` (the `wgmma.mma_async` shapes issued) and `tma_loads`, and
    `blocks_per_sm_by` the limits of one H100 SM (shared memory, threads, registers where
    known), `blocks_per_sm` the least of them and `warps_per_sm` what that holds resident."""
    return [_stats_of(module) for module in lowered_modules(fn, *args)]


_CONST = re.compile(r'(%\d+) = "stable_mosaic_gpu\.(?:arith|llvm\.mlir)\.constant"\(\) '
                    r"\{value = (-?\d+) : \w+\}")
_LAUNCH = re.compile(r'"stable_mosaic_gpu\.gpu\.launch"\(([^)]*)\)')
_MAXREG = re.compile(r"setmaxregister\"\(\) \{action = #nvvm<action (\w+)>, regCount = (\d+)")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)")


def _stats_of(module: str) -> dict[str, Any]:
    consts = dict(_CONST.findall(module))
    launch = _LAUNCH.search(module)
    if launch is None:
        raise ValueError("no gpu.launch in the lowered Mosaic GPU module")
    values = [int(consts.get(a.strip(), 0)) for a in launch.group(1).split(",")[1:]]
    grid, block = values[0:3], values[3:6]
    smem_bytes = values[6] if len(values) > 6 else 0
    threads = math.prod(block)
    warpgroups = threads // WARPGROUP_THREADS
    regs = {action: int(count) for action, count in _MAXREG.findall(module)}
    per_block = None
    if "increase" in regs and "decrease" in regs and warpgroups >= 2:
        per_block = WARPGROUP_THREADS * (regs["increase"] * (warpgroups - 1) + regs["decrease"])
    limits = {
        # One KiB of each block's shared memory is reserved by the CUDA runtime on sm_90.
        "smem": H100_SMEM_PER_SM // (smem_bytes + 1024),
        "threads": H100_THREADS_PER_SM // threads,
        "registers": None if per_block is None else H100_REGISTERS_PER_SM // per_block,
    }
    blocks = min([v for v in limits.values() if v is not None] + [H100_MAX_BLOCKS_PER_SM])
    return dict(
        grid=grid, threads=threads, warpgroups=warpgroups, smem_bytes=smem_bytes,
        smem_fits_one_block=smem_bytes <= H100_SMEM_PER_BLOCK,
        registers_per_thread=({"compute": regs["increase"], "memory": regs["decrease"]}
                              if per_block else None),
        registers_per_block=per_block,
        wgmma=sorted({".".join(m) for m in _WGMMA.findall(module)}),
        tma_loads=module.count("cp.async.bulk.tensor.shared.cluster.global\""),
        blocks_per_sm_by=limits, blocks_per_sm=blocks,
        warps_per_sm=blocks * threads // 32,
        waves=math.prod(grid) / (blocks * H100_SMS) if blocks else None,
    )
