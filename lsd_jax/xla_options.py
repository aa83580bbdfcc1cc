"""XLA compiler options of the streaming step, chosen by measurement (BENCHMARKS.md, "Where the
step's time goes").

On XLA:CPU the YNNPACK fusions (`xla_cpu_experimental_ynn_fusion_type`) route small dots,
convolutions and their elementwise neighbours through YNNPACK; for the streaming step's shapes
(256 tokens x 128 wide, 64x64 pixel convolutions) XLA's own emitters are faster, so the step turns
them off. The options apply to CPU compiles only; another backend, or a JAX whose XLA no longer
knows the option, compiles with none.
"""

from __future__ import annotations

import functools

import jax

CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=dict(options))
    except Exception:  # an XLA without the option: compile with the defaults
        return False
    return True


def step_compiler_options(platform: str | None = None) -> dict[str, str]:
    """Compiler options for the streaming step on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return {}
    items = tuple(sorted(CPU_STEP_OPTIONS.items()))
    return dict(items) if _cpu_accepts(items) else {}
