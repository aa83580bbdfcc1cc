"""The `.lsdx` artifact: round trip against the in-process step, lowering for cpu, cuda and tpu
together on this CPU machine, loading without the model code, and clear errors for a truncated or
altered file or another version."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.errors import ArtifactError
from lsd_jax.resolve import untrained_model
from lsd_jax.streaming import init_stream, make_step
from lsd_serve.artifact import MAGIC, load_artifact
from lsd_serve.export import save_artifact


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny config's step (random weights) exported for batches 1, 2 and steps 1, 3."""
    cfg = load_config(REPO_ROOT / "lsd_configs" / "tiny.py")
    graphdef, params = nnx.split(untrained_model(cfg, seed=11))
    path = save_artifact(tmp_path_factory.mktemp("export") / "tiny.lsdx", cfg, graphdef, params,
                         batches=(1, 2), steps=(1, 3), platforms=("cpu", "cuda", "tpu"),
                         untrained=True, source="test")
    return cfg, graphdef, params, path


def test_round_trip_equals_in_process_step(exported):
    """Six frames through the artifact equal the in-process jitted step: outputs exactly, every
    state array within 1e-6 (relative to its largest entry)."""
    cfg, graphdef, params, path = exported
    art = load_artifact(path)
    assert art.header["platforms"] == ["cpu", "cuda", "tpu"]
    assert art.header["prompt"]["encoder"] == "hashed" and art.header["prompt"]["dim"] == 64
    rng = np.random.default_rng(0)
    frames_tbhwc = rng.integers(0, 256, (6, 2, 64, 64, 3), dtype=np.uint8)
    prompt_bp = art.prompt_encoder().encode_batch(["pencil sketch", "thermal camera"])
    step = make_step(cfg, graphdef, steps=3)
    ref_state, art_state = init_stream(cfg, 2, 4), art.init_state(2, 4)
    art_step = art.step(2, 3)
    for frames_bhwc in frames_tbhwc:
        ref_state, ref_out = step(params, ref_state, frames_bhwc, prompt_bp)
        art_state, art_out = art_step(art_state, frames_bhwc, prompt_bp)
        np.testing.assert_array_equal(np.asarray(art_out), np.asarray(ref_out))
        for name, a, b in zip(art_state._fields, art_state, ref_state, strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.abs(a - b).max() <= 1e-6 * max(1.0, np.abs(b).max()), name
    assert np.asarray(ref_state.cache_k).std() > 0.1  # the cache holds real history
    assert np.unique(np.asarray(ref_out)).size > 50


def test_loads_and_runs_without_model_code(exported):
    """A fresh interpreter loads the artifact and steps it without importing lsd_jax.model,
    lsd_jax.streaming or flax; its output equals this process's step."""
    cfg, graphdef, params, path = exported
    frames_bhwc = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    script = f"""
import sys, numpy as np
from lsd_serve.artifact import load_artifact
art = load_artifact({str(path)!r})
state = art.init_state(1, 0)
raw = bytes.fromhex({frames_bhwc.tobytes().hex()!r})
frames = np.frombuffer(raw, np.uint8).reshape(1, 64, 64, 3)
state, out = art.step(1, 1)(state, frames, art.prompt_encoder().encode_batch(["ink"]))
loaded = [m for m in ("lsd_jax.model", "lsd_jax.streaming", "flax") if m in sys.modules]
print(loaded, np.asarray(out).tobytes().hex())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120, check=True)
    loaded, out_hex = result.stdout.strip().rsplit(" ", 1)
    assert loaded == "[]", result.stdout
    from lsd_jax.prompt import make_prompt_encoder

    state, ref = make_step(cfg, graphdef, steps=1)(
        params, init_stream(cfg, 1, 0), frames_bhwc, make_prompt_encoder(cfg).encode_batch(["ink"]))
    assert bytes.fromhex(out_hex) == np.asarray(ref).tobytes()


def test_multi_platform_lowering_holds_each_platform(exported):
    """Each exported variant is lowered for cpu, cuda and tpu in one module (jax.export's
    multi-platform lowering), runs here on cpu, and refuses a variant it does not hold."""
    _, _, _, path = exported
    art = load_artifact(path)
    for name, exp in art._exported.items():
        assert exp.platforms == ("cpu", "cuda", "tpu"), name
        assert exp.nr_devices == 1
    assert sorted(art._exported) == ["step_b1_k1", "step_b1_k3", "step_b2_k1", "step_b2_k3"]
    with pytest.raises(ArtifactError, match=r"no step for batch 4 with 3 steps.*\[1, 2\]"):
        art.step(4, 3)
    with pytest.raises(ArtifactError, match=r"no step for batch 1 with 2 steps.*\[1, 3\]"):
        art.step(1, 2)
    assert jax.devices()[0].platform == "cpu"


def _rewrite_header(data: bytes, edit) -> bytes:
    """The file with its header edited and re-hashed (a well-formed file of another version)."""
    import hashlib

    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[48 : 48 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + hashlib.sha256(raw).digest() + raw + data[48 + n:]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[: len(d) // 2], "truncated: the header lists"),
    (lambda d: d[:30], "does not start with the"),
    (lambda d: d[:60], "truncated: the header should be"),
    (lambda d: b"PK\x03\x04" + d[4:], "does not start with the"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "header does not match its sha256"),
    (lambda d: d[:-1000] + bytes([d[-1000] ^ 1]) + d[-999:], "does not match its sha256"),
    (lambda d: d + b"\0", "trailing bytes"),
    (lambda d: _rewrite_header(d, lambda h: h.update(version=2)),
     "version 2, this lsd reads format 'lsd-jax-step' version 1"),
    (lambda d: _rewrite_header(d, lambda h: h.update(format="onnx")), "format 'onnx'"),
])
def test_damaged_file_is_a_clear_error(exported, tmp_path, damage, message):
    _, _, _, path = exported
    bad = tmp_path / "bad.lsdx"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError, match=message) as info:
        load_artifact(bad)
    assert str(bad) in str(info.value)


def _drop(*keys):
    def edit(header):
        for key in keys[:-1]:
            header = header[key]
        del header[keys[-1]]
    return edit


@pytest.mark.parametrize("edit, field, expected", [
    (_drop("frame_shape"), "frame_shape", "is missing"),
    (_drop("config", "model"), "config.model.prompt_dim", "is missing"),
    (_drop("blobs", "step_b2_k3"), "blobs.step_b2_k3.offset", "is missing"),
    (_drop("inputs_by_batch", "1"), "inputs_by_batch.1.cache_k.shape", "is missing"),
    (lambda h: h.update(batches="1,2"), "batches", 'is "1,2", expected a non-empty list'),
    (lambda h: h.update(prompt=None), "prompt.encoder", "is missing"),
    (lambda h: h["params"][0].update(dtype="float33"), "params[0].dtype",
     'is "float33", expected a numpy dtype name'),
    (lambda h: h["params"][1].update(shape=[10**6, 10**6]), "params[1]", "lies outside"),
    (lambda h: h["blobs"]["weights"].update(offset="0"), "blobs.weights.offset",
     'is "0", expected an integer >= 0'),
    (lambda h: h.update(untrained="yes"), "untrained", 'is "yes", expected bool'),
])
def test_edited_header_is_an_error_naming_the_field(exported, tmp_path, capsys, edit, field,
                                                    expected):
    """A hand-edited header with its sha256 recomputed: `lsd stream --artifact` exits 2 with one
    `lsd: error:` line naming the field and what was wrong (no KeyError, TypeError, ValueError)."""
    from lsd_cli.main import main

    _, _, _, path = exported
    bad = tmp_path / "edited.lsdx"
    bad.write_bytes(_rewrite_header(path.read_bytes(), edit))
    assert main(["stream", "--artifact", str(bad), "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lsd: error: {str(bad)!r} is not a usable lsd step artifact: "
                             f"header field {field!r} {expected}"), err[0]


def test_lsd_export_command_reports_errors_in_one_line(tmp_path, capsys):
    """`lsd stream --artifact` on a damaged file and `lsd export` to an unknown platform exit 2
    with one `lsd: error:` line."""
    from lsd_cli.main import main

    bad = tmp_path / "x.lsdx"
    bad.write_bytes(b"garbage")
    assert main(["stream", "--artifact", str(bad), "--input", "demo", "--prompt", "x",
                 "--out", str(tmp_path / "o.mp4")]) == 2
    assert main(["export", "--out", str(tmp_path / "m.lsdx"), "--platforms", "cpu,metal"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("lsd: error: ") and "not a usable lsd step artifact" in err[0]
    assert err[-1].startswith("lsd: error: platforms='cpu,metal'")
