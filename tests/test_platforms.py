"""`lsd` starts no TPU platform on a machine without a TPU unless asked (`lsd_cli/platforms.py`):
libtpu's probing warnings never reach an ordinary command's output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from lsd_cli import platforms

# What libtpu prints when it probes for a TPU that is not there.
NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "E0000", "libtpu",
         "Logging before InitGoogle")


def _without_jax_platforms() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    path = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path}


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=_without_jax_platforms(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def no_tpu_here():
    if platforms.tpu_attached():
        pytest.skip("a TPU is attached to this host: JAX's own discovery is kept")


def test_lsd_info_prints_no_tpu_probing(no_tpu_here):
    """`python -m lsd_cli info` without JAX_PLATFORMS: the demo model's description, and not one
    line of libtpu's probing, on stdout or stderr."""
    run = _run("-m", "lsd_cli", "info")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "parameters" in run.stdout
    for line in (run.stdout + run.stderr).splitlines():
        assert not any(word in line for word in NOISE), line


def test_a_command_that_starts_jax_prints_no_tpu_probing(no_tpu_here):
    """The entry point chooses the platforms before any backend starts: a command followed by
    `jax.devices()` (which starts every platform allowed) in the same process runs on this host's
    non-TPU platform, quietly."""
    code = ("import sys, jax; from lsd_cli.main import main; rc = main(['info', '--config', "
            "'tiny', '--json']); print('platforms', jax.config.jax_platforms, "
            "jax.devices()[0].platform); sys.exit(rc)")
    run = _run("-c", code)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "platforms " in run.stdout and " tpu" not in run.stdout.splitlines()[-1]
    assert not any(word in run.stdout + run.stderr for word in NOISE), run.stderr[-2000:]


def test_jax_platforms_set_by_the_user_is_kept(monkeypatch):
    """JAX_PLATFORMS in the environment (tpu included) is the user's choice: untouched."""
    assert platforms.choose({"JAX_PLATFORMS": "tpu"}) is None
    assert platforms.choose({"JAX_PLATFORMS": ""}) is None


def test_platforms_without_tpu_end_with_cpu():
    value = platforms.platforms_without_tpu()
    assert value.endswith("cpu") and "tpu" not in value.split(",")
