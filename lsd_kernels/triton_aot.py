"""Ahead-of-time compiles of the Triton kernels for a CUDA GPU, on any machine with the `triton`
wheel (no GPU, no driver): register, spill and shared-memory figures of each kernel.

`triton.compile` lowers the kernel, specialised the way `jax_triton.triton_call` specialises it
(pointers 16-byte aligned, scalar arguments equal to 1 made constants), down to PTX; the `ptxas`
shipped in the wheel then assembles that PTX with `-v`, and its report is parsed. Shared memory is
Triton's dynamic allocation (`metadata.shared`) plus any static `smem` ptxas reports.

    lsd kernels triton-aot     # a table of the ring kernel's variants for sm_90
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lsd_kernels import triton_ring

KERNELS = ("ring_attention",)
_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
H100_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum of one block on sm_90
MAX_REGISTERS = 255


def _ring_source(*, head_dim: int, dtype: str, cache_dtype: str, interleaved: bool,
                 tokens: int, block_n: int | None):
    """(ASTSource, block size) of the ring kernel for contiguous `[b, ., tokens, heads, e]`
    arrays, as `triton_call` would build it."""
    from triton.compiler import ASTSource

    fn = triton_ring.ring_kernel()
    heads, slots, window = 8, 7, 8
    q_shape = (2, 1, tokens, heads, head_dim)
    cache_shape = (2, slots, tokens, heads, head_dim)
    grid, scalars, meta = triton_ring.launch(
        q_shape, cache_shape, window, interleaved=interleaved,
        x_strides=triton_ring._strides(q_shape), cache_strides=triton_ring._strides(cache_shape),
        valid_strides=(slots, 1), angle_strides=(head_dim // 2, 1), block_n=block_n)
    x, c = _TRITON_TYPES[dtype], _TRITON_TYPES[cache_dtype]
    pointers = [f"*{x}"] * 3 + [f"*{c}"] * 2 + ["*i32", "*i32", "*fp32"]
    names = fn.arg_names
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = dict(meta)
    for name, ty in zip(names, pointers, strict=False):
        signature[name] = ty
    for name, value in zip(names[len(pointers):], scalars, strict=False):
        signature[name] = "constexpr" if value == 1 else "i32"
        if value == 1:
            constexprs[name] = 1
    signature[names[len(pointers) + len(scalars)]] = f"*{x}"  # out
    for name in meta:
        signature[name] = "constexpr"
    divisible = [["tt.divisibility", 16]]
    attrs = {(i,): divisible for i, name in enumerate(names) if signature[name].startswith("*")}
    return ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs), meta["BLOCK_N"]


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, spill stores/loads, stack and static shared bytes from `ptxas -v` output."""
    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    if not re.search(r"Used \d+ registers", log):
        raise ValueError(f"no register count in the ptxas report:\n{log}")
    return dict(registers=grab(r"Used (\d+) registers"),
                spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"),
                stack_bytes=grab(r"(\d+) bytes stack frame"),
                static_smem=grab(r"(\d+) bytes smem"))


def compile_stats(kernel: str = "ring_attention", *, head_dim: int = 64,
                  dtype: str = "bfloat16", cache_dtype: str | None = None,
                  interleaved: bool = True, tokens: int = 256, block_n: int | None = None,
                  num_warps: int = triton_ring.NUM_WARPS, num_stages: int = 1,
                  arch: int = 90) -> dict[str, Any]:
    """Compile `kernel` for compute capability `arch` (90: H100) and report `name`, `target`
    (`sm_90`), `registers`, `spill_stores`, `spill_loads` (bytes), `shared_bytes`, and the
    `block_n`, `num_warps`, `stack_bytes`, `ptxas` version behind them. Needs `triton`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    src, block = _ring_source(head_dim=head_dim, dtype=dtype, cache_dtype=cache_dtype or dtype,
                              interleaved=interleaved, tokens=tokens, block_n=block_n)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           enable_fp_fusion=True))  # as triton_call
    ptxas = get_ptxas(arch).path
    gpu_name = sm_arch_from_capability(arch)  # sm_90a: Triton's PTX targets the `a` variant
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        run = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}",
                              str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    report = parse_ptxas(run.stdout + run.stderr)
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return dict(name=compiled.metadata.name, target=f"sm_{arch}",
                registers=report["registers"], spill_stores=report["spill_stores"],
                spill_loads=report["spill_loads"],
                shared_bytes=compiled.metadata.shared + report["static_smem"],
                stack_bytes=report["stack_bytes"], block_n=block, num_warps=num_warps,
                ptxas=version.strip().splitlines()[-1] if version else "")
