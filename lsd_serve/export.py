"""Export the streaming step (docs/DESIGN.md section 4) into one `.lsdx` file, which
`lsd_serve.artifact` loads and runs without model code (the file layout is described there).

    save_artifact(path, cfg, graphdef, params, batches=(1,), steps=(3,), platforms=("cpu",))
    export_model(path, resolve_model(checkpoint), batches=(1, 2), steps=(1, 2, 3))  # lsd export

The step is lowered for every platform in `platforms` together (`jax.export`'s multi-platform
lowering), with the weights of the model and of its codec as arguments. With kernels selected
(`model.attention_impl` / `model.norm_impl` other than the pure-JAX paths) the step is lowered for
the one platform they run on (Pallas calls cannot be lowered for several platforms at once), and
the header's `kernels` says which were selected and which custom calls the modules hold (Triton
calls carry no compatibility guarantee across jaxlib versions: such an artifact is tied to its jax
version, which the header records).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax import kernels
from lsd_jax.atomic import atomic_path
from lsd_jax.codec import make_codec
from lsd_jax.config import Config, to_dict
from lsd_jax.errors import ArtifactError
from lsd_jax.kernels import PLATFORMS
from lsd_jax.lowering import UNGUARANTEED_CALLS, custom_calls
from lsd_jax.prompt import encoder_record
from lsd_jax.resolve import ResolvedModel
from lsd_jax.stream_state import STATE_FIELDS, StreamState
from lsd_jax.streaming import init_stream, make_step
from lsd_serve.artifact import FORMAT, MAGIC, VERSION, variant_name


def _abstract(array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(array), array.dtype)


def _spec(shape, dtype) -> dict:
    return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


_ENCODER_CLASSES = {"hashed": "lsd_jax.prompt.HashedPromptEncoder",
                    "minilm": "lsd_jax.minilm.MiniLMPromptEncoder"}


def prompt_handling(cfg: Config) -> dict:
    """How prompt strings become the step's `prompt_bp` input; recorded in the header:
    `{"encoder", "id", "dim", "runs"}` (`lsd_jax.prompt.encoder_record` and where it runs)."""
    record = encoder_record(cfg)
    if record["encoder"] == "none":
        return {**record, "runs": "the model takes no prompt"}
    return {**record, "runs": f"on the host, outside the artifact "
                              f"({_ENCODER_CLASSES[record['encoder']]})"}


def _flat_step(cfg: Config, graphdef, params_treedef, steps: int, codec):
    """`make_step`'s jitted step wrapped to take and return flat arrays only; the flat parameters
    are the model's, then the codec's (the pair `(model params, codec params)` flattened)."""
    step = make_step(cfg, graphdef, steps=steps, codec=codec, jit=False)  # traced in flat's jit
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
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms or len(set(platforms)) < len(platforms):
        raise ArtifactError(f"platforms={','.join(platforms)!r}, expected a comma-separated "
                            f"subset of {','.join(PLATFORMS)}, each named once")
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
    shapes: dict[str, dict] = {}
    calls: set[str] = set()
    for batch in batches:
        state = init_stream(cfg, batch, 0)
        args = [[_abstract(leaf) for leaf in leaves_np], *map(_abstract, state),
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
            blobs[variant_name(batch, k)] = bytes(exported.serialize())
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
    # Written beside and renamed over `path`: a kill or a full disk leaves the old file intact.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header_bytes))
                + hashlib.sha256(header_bytes).digest() + header_bytes)
        for blob in blobs.values():
            f.write(blob)
    return path


def export_model(path: str | Path, resolved: ResolvedModel, *, batches=(1,), steps=None,
                 platforms=("cpu",)) -> Path:
    """`save_artifact` of a model `lsd_jax.resolve.resolve_model` found, with its codec and the
    prompts it was trained on; `steps` None exports 1 to the config's `sample_steps`."""
    cfg = resolved.cfg
    graphdef, params = nnx.split(resolved.model)
    steps = steps or tuple(range(1, cfg.diffusion.sample_steps + 1))
    return save_artifact(path, cfg, graphdef, params, batches=batches, steps=steps,
                         platforms=platforms, untrained=resolved.untrained,
                         source=resolved.describe, trained_prompts=resolved.trained_prompts,
                         codec=make_codec(cfg, resolved.codec_dir))
