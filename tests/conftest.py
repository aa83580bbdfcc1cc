"""Shared fixtures: the repository root, the tiny config, a seeded numpy generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lsd_jax.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(REPO_ROOT / "configs" / "tiny.py")


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(0)
