"""The exported streaming step's file (docs/DESIGN.md section 4): one `.lsdx` file, loaded and run
without model code (`lsd_serve.export` writes it).

    artifact = load_artifact(path)
    state = artifact.init_state(batch, seed)
    state, out_bhwc_uint8 = artifact.step(batch, steps)(state, frame_bhwc_uint8, prompt_bp)

File layout (all integers little-endian):

    8 bytes   magic b"LSDX\\r\\n\\x1a\\n" (a text-mode transfer or a truncation to 0 shows up here)
    8 bytes   uint64 header length H
    32 bytes  sha256 of the header
    H bytes   header: UTF-8 JSON (format, version, config, shapes, dtypes, prompt handling, blobs)
    blobs     back to back: "weights" (every parameter's raw bytes, C order) and one serialized
              `jax.export.Exported` per (batch, steps) variant; each blob's offset, size and sha256
              are in the header, so a truncated or altered file is an error naming what is wrong.

Each exported function takes flat arrays only (the parameters as a list: the model's, then its
codec's, if the codec has weights; the stream state as five arrays), so deserializing it needs no
Flax pytree types and no model code. A latent model's VAE weights are thus arguments of the step
like the model's, stored in the "weights" blob, not constants inside each serialized step:

    fn(params_list, cache_k, cache_v, slot, num_valid, rng, frame_bhwc_uint8[, prompt_bp]
       [, external_bx]) -> (cache_k, cache_v, slot, num_valid, rng, out_bhwc_uint8)

Prompts are strings at serve time and a string cannot be an array input, so the prompt encoder runs
on the host, outside the artifact: the header's `prompt` names it, its identity and its width
(`hashed`, id `hashed-v1`: the built-in `HashedPromptEncoder`, pure numpy and deterministic on
every machine; `minilm`, id naming the sha256 of its weights: all-MiniLM-L6-v2, whose Flax NNX
encoder and verified files `lsd_jax.minilm` loads on the host) and the loader rebuilds it; an
identity this lsd cannot rebuild is an `ArtifactError`. A header without an id (written before
ids were recorded) means the hashed encoder.
The state is that of `lsd_jax.streaming.StreamState` (same fields, same order); a stream is reset by
setting its `num_valid` entry to 0.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.config import dtype_of
from lsd_jax.errors import ArtifactError, PromptError
from lsd_jax.prompt import encoder_from_record, legacy_encoder_record
from lsd_jax.stream_state import STATE_FIELDS, StreamState
from lsd_jax.xla_options import step_compiler_options

MAGIC = b"LSDX\r\n\x1a\n"
FORMAT = "lsd-jax-step"
VERSION = 1
PREFIX = len(MAGIC) + 8 + 32


def variant_name(batch: int, steps: int) -> str:
    """The name of the blob holding the step for `batch` streams at `steps` denoising steps."""
    return f"step_b{batch}_k{steps}"


@dataclass
class Artifact:
    """A loaded `.lsdx`: the header, the weights and the deserialized step of each variant."""

    path: Path
    header: dict
    params_list: list
    _exported: dict = field(repr=False)
    _compiled: dict = field(default_factory=dict, repr=False)

    @property
    def frame_hw(self) -> tuple[int, int]:
        return tuple(self.header["frame_shape"][:2])

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(self.header["batches"])

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(self.header["steps"])

    @property
    def trained_prompts(self) -> tuple[str, ...]:
        """The prompts the weights were trained on (() when the artifact records none)."""
        return tuple(self.header.get("trained_prompts", ()))

    def prompt_encoder(self):
        """The host-side prompt encoder the header names, or None when the model takes none;
        `ArtifactError` when its identity is not one this lsd can rebuild."""
        prompt = self.header["prompt"]
        record = prompt if "id" in prompt else legacy_encoder_record(prompt["dim"])
        try:
            return encoder_from_record(record)
        except PromptError as err:
            raise ArtifactError(f"{str(self.path)!r}: {err}") from None

    def init_state(self, batch: int, seed: int = 0) -> StreamState:
        """An empty stream state for `batch` streams."""
        shapes = self._inputs(batch)

        def zeros(name: str):
            return jnp.zeros(shapes[name]["shape"], dtype_of(shapes[name]["dtype"]))

        return StreamState(cache_k=zeros("cache_k"), cache_v=zeros("cache_v"), slot=zeros("slot"),
                           num_valid=zeros("num_valid"), rng=jax.random.PRNGKey(seed))

    def _inputs(self, batch: int) -> dict:
        shapes = self.header["inputs_by_batch"].get(str(batch))
        if shapes is None:
            raise ArtifactError(f"{str(self.path)!r} holds batch sizes {list(self.batches)}, "
                                f"not {batch}")
        return shapes

    def step(self, batch: int, steps: int):
        """The jitted step for `batch` streams and `steps` denoising steps, the state donated:
        `(state, frame_bhwc_uint8, prompt_bp=None, external_bx=None) -> (state, out_bhwc)`."""
        key = (batch, steps)
        if key not in self._compiled:
            name = variant_name(batch, steps)
            if name not in self._exported:
                raise ArtifactError(
                    f"{str(self.path)!r} holds no step for batch {batch} with {steps} steps; it "
                    f"holds batches {list(self.batches)} x steps {list(self.steps)}")
            call = self._exported[name].call
            params_list = self.params_list

            def run(state, frame_bhwc, prompt_bp=None, external_bx=None):
                extra = [a for a in (prompt_bp, external_bx) if a is not None]
                *new_state, out_bhwc = call(params_list, *state, frame_bhwc, *extra)
                return StreamState(*new_state), out_bhwc

            # Compiled as the in-process step is (lsd_jax.xla_options), so outputs are the same.
            self._compiled[key] = jax.jit(run, donate_argnums=0,
                                          compiler_options=step_compiler_options())
        return self._compiled[key]


def _fail(path: Path, why: str):
    raise ArtifactError(f"{str(path)!r} is not a usable lsd step artifact: {why}")


_MISSING = object()


def _field(path: Path, header: dict, name: str, kind, *, check=None, expected: str = ""):
    """`header[a][b]...` for `name` "a.b...", of type `kind` (and passing `check`); anything else
    is an `ArtifactError` naming the field."""
    value = header
    for key in name.split("."):
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            _fail(path, f"header field {name!r} is missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or (
            check is not None and not check(value)):
        _fail(path, f"header field {name!r} is {json.dumps(value)[:80]}, expected "
                    f"{expected or getattr(kind, '__name__', kind)}")
    return value


def _int_list(value, length: int | None = None) -> bool:
    return (all(type(v) is int and v >= 0 for v in value)
            and (length is None or len(value) == length))


def _dtype_ok(name: str) -> bool:
    try:
        dtype_of(name)
    except TypeError:
        return False
    return True


def _check_header(path: Path, header: dict) -> None:
    """Every header field `load_artifact` and the engine read, with its type: a hand-edited
    header (re-hashed) fails here, naming the field, not later with a KeyError."""
    nonneg = {"check": lambda v: v >= 0, "expected": "an integer >= 0"}
    positive_ints = {"check": lambda v: v and _int_list(v) and min(v) > 0,
                     "expected": "a non-empty list of positive integers"}
    for name in ("source", "jax_version"):
        _field(path, header, name, str)
    _field(path, header, "untrained", bool)
    _field(path, header, "platforms", list,
           check=lambda v: v and all(isinstance(p, str) for p in v),
           expected="a non-empty list of platform names")
    if "trained_prompts" in header:
        _field(path, header, "trained_prompts", list,
               check=lambda v: all(isinstance(p, str) for p in v), expected="a list of strings")
    _field(path, header, "frame_shape", list, check=lambda v: _int_list(v, 3) and min(v) > 0,
           expected="[height, width, channels], positive integers")
    batches = _field(path, header, "batches", list, **positive_ints)
    steps = _field(path, header, "steps", list, **positive_ints)
    for name in ("model.prompt_dim", "model.external_cond_dim"):
        _field(path, header, f"config.{name}", int, **nonneg)
    _field(path, header, "prompt.encoder", str)
    _field(path, header, "prompt.dim", int, **nonneg)
    blobs = _field(path, header, "blobs", dict)
    for name in ["weights", *(variant_name(b, k) for b in batches for k in steps)]:
        for key in ("offset", "nbytes"):
            _field(path, header, f"blobs.{name}.{key}", int, **nonneg)
        _field(path, header, f"blobs.{name}.sha256", str)
    for name in blobs:
        _field(path, header, f"blobs.{name}", dict)
    params = _field(path, header, "params", list)
    for i, p in enumerate(params):
        entry = {f"params[{i}]": p}
        _field(path, entry, f"params[{i}].shape", list, check=_int_list,
               expected="a list of integers >= 0")
        _field(path, entry, f"params[{i}].dtype", str, check=_dtype_ok,
               expected="a numpy dtype name")
        _field(path, entry, f"params[{i}].offset", int, **nonneg)
    for b in batches:
        for name in STATE_FIELDS:
            _field(path, header, f"inputs_by_batch.{b}.{name}.shape", list, check=_int_list,
                   expected="a list of integers >= 0")
            _field(path, header, f"inputs_by_batch.{b}.{name}.dtype", str, check=_dtype_ok,
                   expected="a numpy dtype name")


def load_artifact(path: str | Path) -> Artifact:
    """Read and verify a `.lsdx` file (magic, header hash, format and version, every blob's size
    and sha256), then deserialize its exported steps. Raises `ArtifactError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {str(path)!r} does not exist (expected a file written by "
                            "lsd export)")
    data = path.read_bytes()
    if len(data) < PREFIX or data[: len(MAGIC)] != MAGIC:
        _fail(path, f"it does not start with the {MAGIC!r} magic (or is shorter than "
                    f"{PREFIX} bytes): not written by lsd export, or truncated")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    header_bytes = data[PREFIX : PREFIX + header_len]
    if len(header_bytes) != header_len:
        _fail(path, f"truncated: the header should be {header_len} bytes, the file holds "
                    f"{len(header_bytes)}")
    if hashlib.sha256(header_bytes).digest() != data[len(MAGIC) + 8 : PREFIX]:
        _fail(path, "the header does not match its sha256: the file was altered")
    try:
        header = json.loads(header_bytes)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        _fail(path, f"the header is not UTF-8 JSON: {err}")
    if not isinstance(header, dict):
        _fail(path, f"the header is JSON {type(header).__name__}, expected an object")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        _fail(path, f"format {header.get('format')!r} version {header.get('version')!r}, this "
                    f"lsd reads format {FORMAT!r} version {VERSION}")
    _check_header(path, header)
    body = memoryview(data)[PREFIX + header_len :]
    expected = sum(b["nbytes"] for b in header["blobs"].values())
    if len(body) != expected:
        _fail(path, f"{'truncated' if len(body) < expected else 'trailing bytes'}: the header "
                    f"lists {expected} bytes of weights and steps, the file holds {len(body)}")
    blobs = {}
    for name, meta in header["blobs"].items():
        blob = body[meta["offset"] : meta["offset"] + meta["nbytes"]]
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            _fail(path, f"blob {name!r} does not match its sha256: the file was altered")
        blobs[name] = blob
    weights = blobs.pop("weights")
    params_list = []
    for i, p in enumerate(header["params"]):
        dtype = dtype_of(p["dtype"])
        count = int(np.prod(p["shape"], dtype=np.int64))
        if p["offset"] + count * dtype.itemsize > len(weights):
            _fail(path, f"header field 'params[{i}]' lies outside the {len(weights)} bytes of "
                        f"weights (shape {p['shape']}, {p['dtype']}, offset {p['offset']})")
        array = np.frombuffer(weights, dtype, count, p["offset"]).reshape(p["shape"])
        params_list.append(jnp.asarray(array))
    exported = {}
    for name, blob in blobs.items():
        try:
            exported[name] = jax.export.deserialize(bytearray(blob))
        except Exception as err:  # a newer/older serialization version: say which jax wrote it
            _fail(path, f"step {name!r} was written by jax {header.get('jax_version')} and cannot "
                        f"be read by jax {jax.__version__}: {err}")
    return Artifact(path, header, params_list, exported)
