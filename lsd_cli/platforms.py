"""Which JAX platforms an `lsd` command may start, decided before JAX starts any.

With `libtpu` installed (the `kernels` extra: the Mosaic TPU kernels' ahead-of-time compiles),
JAX's default discovery loads it on every run, and on a machine without a TPU libtpu prints its
probing warnings (`TPU_ACCELERATOR_TYPE`, `TPU_WORKER_HOSTNAMES`, an `E0000 ... common_lib.cc`
line) before falling back to the CPU. `lsd` asks for a TPU only where one can be used:

- `JAX_PLATFORMS` set (to anything, `tpu` included): the user's choice, left as it is;
- a TPU attached to this host (a Google TPU PCI device, `/dev/accel*` or `/dev/vfio/<n>`):
  JAX's own discovery, TPU included;
- otherwise the platforms JAX would pick without the TPU: `cuda` where an NVIDIA GPU is visible and
  a CUDA plugin is installed, `rocm` likewise, and `cpu`.

Compiles for a TPU topology without a TPU (`lsd kernels tpu-aot`, `lsd bench kernels`) and
exports for `tpu` (`lsd export --platforms tpu`) use libtpu's compile-only client, which does not
need the TPU platform started, so they work either way.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import pkgutil
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
_AMD_DEVICES = ("/dev/kfd",)


def tpu_attached() -> bool:
    """Whether this host has a TPU chip: a Google PCI device, or TPU device files."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _plugin_names() -> list[str]:
    """Names of the installed JAX PJRT plugins (`jax_plugins` modules and entry points)."""
    names = []
    try:
        import jax_plugins  # noqa: F401 - a namespace package, present with any plugin

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    names += [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    return names


def platforms_without_tpu() -> str:
    """`jax_platforms` for this host without the TPU: e.g. "cuda,cpu" or "cpu"."""
    plugins = " ".join(_plugin_names())
    chosen = []
    if any(os.path.exists(d) for d in _NVIDIA_DEVICES) and "cuda" in plugins:
        chosen.append("cuda")
    if any(os.path.exists(d) for d in _AMD_DEVICES) and "rocm" in plugins:
        chosen.append("rocm")
    return ",".join([*chosen, "cpu"])


def choose(environ=os.environ) -> str | None:
    """Set `jax_platforms` for this process unless the user or the host asks for a TPU (see the
    module docstring); returns the value set, or None where JAX's own choice stands."""
    if "JAX_PLATFORMS" in environ or tpu_attached():
        return None
    import jax

    if jax.config.jax_platforms:  # set by the caller in this process
        return None
    value = platforms_without_tpu()
    jax.config.update("jax_platforms", value)
    return value
