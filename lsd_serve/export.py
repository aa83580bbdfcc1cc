"""The exported streaming step (docs/DESIGN.md section 4): one `.lsdx` file, loadable without
model code.

    save_artifact(path, cfg, graphdef, params, batches=(1,), steps=(3,), platforms=("cpu",))
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
With kernels selected (`model.attention_impl` / `model.norm_impl` other than the pure-JAX paths)
the step is lowered for the one platform they run on (Pallas calls cannot be lowered for several
platforms at once), and the header's `kernels` says which were selected and which custom calls the
modules hold (Triton calls carry no compatibility guarantee across jaxlib versions: such an
artifact is tied to its jax version, which the header records).
The state is that of `lsd_jax.streaming.StreamState` (same fields, same order); a stream is reset by
setting its `num_valid` entry to 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax import kernels
from lsd_jax.config import Config, dtype_of, to_dict
from lsd_jax.errors import ArtifactError
from lsd_jax.kernels import PLATFORMS
from lsd_jax.lowering import UNGUARANTEED_CALLS, custom_calls
from lsd_jax.stream_state import STATE_FIELDS, StreamState

MAGIC = b"LSDX\r\n\x1a\n"
FORMAT = "lsd-jax-step"
VERSION = 1
_PREFIX = len(MAGIC) + 8 + 32



def _spec(shape, dtype) -> dict:
    return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


def _variant_name(batch: int, steps: int) -> str:
    return f"step_b{batch}_k{steps}"


_ENCODER_CLASSES = {"hashed": "lsd_jax.prompt.HashedPromptEncoder",
                    "minilm": "lsd_jax.minilm.MiniLMPromptEncoder"}


def prompt_handling(cfg: Config) -> dict:
    """How prompt strings become the step's `prompt_bp` input; recorded in the header:
    `{"encoder", "id", "dim", "runs"}` (`lsd_jax.prompt.encoder_record` and where it runs)."""
    from lsd_jax.prompt import encoder_record

    record = encoder_record(cfg)
    if record["encoder"] == "none":
        return {**record, "runs": "the model takes no prompt"}
    return {**record, "runs": f"on the host, outside the artifact "
                              f"({_ENCODER_CLASSES[record['encoder']]})"}


def _flat_step(cfg: Config, graphdef, params_treedef, steps: int, codec):
    """`make_step`'s jitted step wrapped to take and return flat arrays only; the flat parameters
    are the model's, then the codec's (the pair `(model params, codec params)` flattened)."""
    from lsd_jax.streaming import make_step

    step = make_step(cfg, graphdef, steps=steps, codec=codec)
    has_prompt = cfg.model.prompt_dim > 0
    has_external = cfg.model.external_cond_dim > 0

    def flat(params_list, *args):
        params = jax.tree.unflatten(params_treedef, params_list)
        state = StreamState(*args[:len(STATE_FIELDS)])
        frame_bhwc, *extra = args[len(STATE_FIELDS):]
        prompt_bp = extra.pop(0) if has_prompt else None
        external_bx = extra.pop(0) if has_external else None
        model_params, codec_params = params
        state, out_bhwc = step(model_params, state, frame_bhwc, prompt_bp, external_bx,
                               codec_params)
        return (*state, out_bhwc)

    return flat


def save_artifact(path: str | Path, cfg: Config, graphdef, params, *, batches=(1,), steps=(3,),
                  platforms=("cpu",), untrained: bool = False, source: str = "",
                  trained_prompts: tuple[str, ...] = (), codec=None) -> Path:
    """Export the streaming step of `(graphdef, params)` for every batch size in `batches` and step
    count in `steps`, lowered for `platforms` together, with the weights, into one file at `path`.
    `trained_prompts` are those recorded with the weights (`lsd_jax.checkpoint`).

    `params` is the full `nnx.State` of the model (`nnx.split(model)[1]`); `codec` the frames' codec
    (default: the config's pixel codec; a latent model's VAE codec, whose weights are stored after
    the model's and passed to the step as arguments, never compiled in as constants; the header's
    `codec` says how many of the parameters are the codec's). Returns the path.
    """
    from lsd_jax.codec import make_codec
    from lsd_jax.streaming import init_stream

    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ArtifactError(f"platforms={','.join(platforms)!r}, expected a comma-separated "
                            f"subset of {','.join(PLATFORMS)}")
    chosen = kernels.selected(cfg.model)
    for kind, name in chosen.items():
        runs_on = kernels.entry(kind, name).platforms
        if len(platforms) > 1 or platforms[0] not in runs_on:
            raise ArtifactError(f"model.{kind}_impl={name!r} is a kernel for "
                                f"{', '.join(runs_on)}: export it for that one platform "
                                f"(--platforms {runs_on[0]}), not {','.join(platforms)}")
    codec = make_codec(cfg) if codec is None else codec
    leaves, treedef = jax.tree.flatten((params, codec.params))
    leaves_np = [np.asarray(leaf) for leaf in leaves]
    codec_leaves = len(jax.tree.leaves(codec.params))
    m = cfg.model
    weights = b"".join(leaf.tobytes() for leaf in leaves_np)
    params_meta, offset = [], 0
    for leaf in leaves_np:
        params_meta.append({**_spec(leaf.shape, leaf.dtype), "offset": offset})
        offset += leaf.nbytes
    blobs = {"weights": weights}
    sds = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    shapes: dict[str, dict] = {}
    calls: set[str] = set()
    for batch in batches:
        state = init_stream(cfg, batch, 0)
        args = [[sds(leaf) for leaf in leaves_np], *map(sds, state),
                jax.ShapeDtypeStruct((batch, *codec.frame_shape), jnp.uint8)]
        names = [*STATE_FIELDS, "frame_bhwc"]
        if m.prompt_dim:
            args.append(jax.ShapeDtypeStruct((batch, m.prompt_dim), jnp.float32))
            names.append("prompt_bp")
        if m.external_cond_dim:
            args.append(jax.ShapeDtypeStruct((batch, m.external_cond_dim), jnp.float32))
            names.append("external_bx")
        shapes[str(batch)] = {n: _spec(a.shape, a.dtype) for n, a in zip(names, args[1:],
                                                                         strict=True)}
        for k in steps:
            fn = jax.jit(_flat_step(cfg, graphdef, treedef, k, codec))
            with kernels.lowering_for(platforms[0]) if chosen else contextlib.nullcontext():
                exported = jax.export.export(fn, platforms=tuple(platforms),
                                             disabled_checks=UNGUARANTEED_CALLS)(*args)
            calls.update(custom_calls(exported))
            blobs[_variant_name(batch, k)] = bytes(exported.serialize())
    blob_meta, offset = {}, 0
    for name, blob in blobs.items():
        blob_meta[name] = {"offset": offset, "nbytes": len(blob),
                           "sha256": hashlib.sha256(blob).hexdigest()}
        offset += len(blob)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "jax_version": jax.__version__,
        "config": to_dict(cfg),
        "source": source,
        "untrained": untrained,
        "trained_prompts": list(trained_prompts),
        "platforms": list(platforms),
        "batches": sorted(int(b) for b in batches),
        "steps": sorted(int(k) for k in steps),
        "frame_shape": list(codec.frame_shape),
        "codec": {"name": codec.name, "params": codec_leaves,
                  "bytes": int(sum(leaf.nbytes for leaf in leaves_np[len(leaves_np)
                                                                     - codec_leaves:]))},
        "inputs_by_batch": shapes,
        "state_fields": list(STATE_FIELDS),
        "params": params_meta,
        "prompt": prompt_handling(cfg),
        "kernels": {"selected": chosen, "custom_calls": sorted(calls)},
        "blobs": blob_meta,
    }
    header_bytes = json.dumps(header, indent=1).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header_bytes))
                + hashlib.sha256(header_bytes).digest() + header_bytes)
        for blob in blobs.values():
            f.write(blob)
    return path


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
        from lsd_jax.errors import PromptError
        from lsd_jax.prompt import encoder_from_record, legacy_encoder_record

        prompt = self.header["prompt"]
        record = prompt if "id" in prompt else legacy_encoder_record(prompt["dim"])
        try:
            return encoder_from_record(record)
        except PromptError as err:
            raise ArtifactError(f"{str(self.path)!r}: {err}") from None

    def init_state(self, batch: int, seed: int = 0) -> StreamState:
        """An empty stream state for `batch` streams."""
        shapes = self._inputs(batch)
        zeros = lambda n: jnp.zeros(shapes[n]["shape"], dtype_of(shapes[n]["dtype"]))  # noqa: E731
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
            name = _variant_name(batch, steps)
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

            self._compiled[key] = jax.jit(run, donate_argnums=0)
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
    for name in ["weights", *(_variant_name(b, k) for b in batches for k in steps)]:
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
    if len(data) < _PREFIX or data[: len(MAGIC)] != MAGIC:
        _fail(path, f"it does not start with the {MAGIC!r} magic (or is shorter than "
                    f"{_PREFIX} bytes): not written by lsd export, or truncated")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    header_bytes = data[_PREFIX : _PREFIX + header_len]
    if len(header_bytes) != header_len:
        _fail(path, f"truncated: the header should be {header_len} bytes, the file holds "
                    f"{len(header_bytes)}")
    if hashlib.sha256(header_bytes).digest() != data[len(MAGIC) + 8 : _PREFIX]:
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
    body = memoryview(data)[_PREFIX + header_len :]
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
