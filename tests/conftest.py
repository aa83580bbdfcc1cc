"""Shared fixtures and helpers: the repository root and configs directory (`REPO_ROOT`,
`CONFIGS`), the relative error of the tolerance policy (`rel_err`), the tiny config, a seeded
numpy generator, a log of the jit compiles a test makes. Test modules import the helpers with
`from conftest import CONFIGS, REPO_ROOT, rel_err`."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from lsd_jax.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "lsd_configs"


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64: the relative error of the tolerance policy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(CONFIGS / "tiny.py")


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(0)


class _CompileLog(logging.Handler):
    """Collects the names (`jit(step)`) of the computations JAX compiles while attached."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


@pytest.fixture
def compile_log() -> list[str]:
    """The names of the computations compiled during the test, in order (`jax_log_compiles`)."""
    handler = _CompileLog()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(handler)
    try:
        yield handler.names
    finally:
        logger.removeHandler(handler)
        jax.config.update("jax_log_compiles", previous)


def simulated_devices_env(count: int) -> dict:
    """The environment of a subprocess that sees `count` simulated CPU devices."""
    import os

    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={count}"}
