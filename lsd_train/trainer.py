"""The trainer: state, sharded step, checkpoints and the loop, top to bottom.

In:  a `Config` (model, diffusion objective, `data`, `train`, `mesh`) and a work directory.
Out: under the work directory,
    checkpoints/STEP/{state,data}  orbax: train state (step, params, AdamW state, EMA) and the
                                   grain iterator state of every process (`train.checkpointing`);
                                   async, every `train.save_every` steps, at the end, and on
                                   SIGTERM/SIGINT; the last `train.keep` kept
    model/                         the EMA weights as a model checkpoint (`lsd_jax.checkpoint`:
                                   what stream/serve/export read), rewritten at every save
    tb/                            TensorBoard events;  metrics.jsonl  one line per logged step
    samples/, plots/loss.png       sample videos (input | output | target) and the loss curve

The train state is a dict `{"step", "params", "opt_state", "ema"}` of global arrays; parameters
are plain nested dicts (`nnx.to_pure_dict`) of float32 master weights (`model.dtype=bfloat16`
computes in bf16 on them). The step's randomness is `fold_in(PRNGKey(train.seed), step)`, and the
data is a pure function of the iterator position, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import logging
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lsd_jax import objectives
from lsd_jax.activation_sharding import batch_sharded_over
from lsd_jax.atomic import WriteError, describe_os_error, replace_path, storage_os_error
from lsd_jax.checkpoint import first_line, stderr_held, write_model
from lsd_jax.config import Config
from lsd_jax.diffusion import make_process
from lsd_jax.errors import CheckpointError, ConfigError
from lsd_jax.model import DiT, abstract_model, model_from_params
from lsd_train import sharding
from lsd_train.checkpointing import DataStateRestore, DataStateSave
from lsd_train.pairs import config_prompts

# ----------------------------------------------------------------------------- optimiser


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warm-up from 0 to `train.lr`, then a cosine to `lr * final_lr_fraction`."""
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.final_lr_fraction)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping (off at `grad_clip=0`), then AdamW; weight decay on matrices only."""
    t = cfg.train
    adamw = optax.adamw(make_schedule(cfg), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw


# ----------------------------------------------------------------------------- state and step


def check_trainable(cfg: Config) -> None:
    if cfg.model.param_dtype != "float32":
        raise ConfigError(f"model.param_dtype={cfg.model.param_dtype!r}: training keeps float32 "
                          "master weights; for bf16 compute set model.dtype=bfloat16")


def init_state(cfg: Config) -> dict:
    """A fresh train state (the model's own initialisation, seeded by `cfg.seed`)."""
    model = DiT(cfg.model, rngs=nnx.Rngs(cfg.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": make_optimizer(cfg).init(params),
            "ema": jax.tree.map(jnp.copy, params)}


def model_apply_fn(cfg: Config):
    """`objectives.apply_model` bound to the model's graph and fixed rotary frequencies."""
    graphdef, _, _ = nnx.split(abstract_model(cfg.model), nnx.Param, ...)
    _, _, rest = nnx.split(model_from_params(cfg.model, abstract_params(cfg)), nnx.Param, ...)
    return functools.partial(objectives.apply_model, graphdef, rest_state=rest)


def abstract_params(cfg: Config) -> dict:
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param))


def ema_decay(cfg: Config, step):
    """The EMA decay of update `step` (0-based): `min(train.ema_decay, (1 + n) / (10 + n))`, so the
    average forgets the initialisation within the first few hundred steps of a short run."""
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(cfg.train.ema_decay, (1.0 + n) / (10.0 + n))


def make_train_step(cfg: Config):
    """`train_step(state, batch) -> (state, metrics)`, unjitted.

    `batch`: model-space float32 `target` [B,T,H,W,C], and `cond` / `prompt` when the model takes
    them (see `model_batch`). Metrics: those of `objectives.loss_fn`, `grad_norm` (before
    clipping) and `lr` (the rate this step used).
    """
    check_trainable(cfg)
    apply = model_apply_fn(cfg)
    process = make_process(cfg.diffusion)
    tx, schedule = make_optimizer(cfg), make_schedule(cfg)
    base_key = jax.random.PRNGKey(cfg.train.seed)

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(base_key, step)

        def objective(params):
            return objectives.loss_fn(apply, params, batch, rng, cfg, process,
                                      ema_params=state["ema"])

        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optax.incremental_update(params, state["ema"], 1.0 - ema_decay(cfg, step))
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"step": step + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return train_step


def model_batch(cfg: Config, batch: dict) -> dict:
    """A host batch -> the model-space float32 batch the step takes: uint8 pixel clips through
    the pixel codec's `encode`; latent clips (`data.source=latents`, encoded by their codec when
    the dataset was written) as they are."""
    from lsd_jax.codec import PixelCodec

    def to_model(clips):
        if clips.dtype == np.uint8:  # float32 in [-1, 1], left where the codec computed it
            return PixelCodec(*clips.shape[-3:-1]).encode(clips)
        return np.asarray(clips, np.float32)

    out = {"target": to_model(batch["target"])}
    if cfg.train.distill_from:  # the teacher knows the built-in tasks (ids >= 0), not others
        out["distill"] = (np.asarray(batch["task"]) >= 0).astype(np.float32)
    if cfg.model.cond_channels:
        out["cond"] = to_model(batch["cond"])
    if cfg.model.prompt_dim:
        out["prompt"] = np.asarray(batch["prompt"], np.float32)
    if cfg.model.external_cond_dim:
        raise ConfigError(f"model.external_cond_dim={cfg.model.external_cond_dim}: the training "
                          "data has no per-frame external vectors (e.g. actions); train with "
                          "model.external_cond_dim=0")
    return out


def abstract_batch(cfg: Config) -> dict:
    """Shapes of a global model-space batch."""
    m, b, t = cfg.model, cfg.train.batch_size, cfg.data.clip_frames
    out = {"target": jax.ShapeDtypeStruct((b, t, *m.frame_shape), jnp.float32)}
    if m.cond_channels:
        out["cond"] = jax.ShapeDtypeStruct((b, t, m.frame_height, m.frame_width,
                                            m.cond_channels), jnp.float32)
    if m.prompt_dim:
        out["prompt"] = jax.ShapeDtypeStruct((b, m.prompt_dim), jnp.float32)
    if m.external_cond_dim:
        out["external"] = jax.ShapeDtypeStruct((b, t, m.external_cond_dim), jnp.float32)
    if cfg.train.distill_from:
        out["teacher"] = out["target"]
        out["distill"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    return out


@dataclasses.dataclass
class ShardedStep:
    """The jitted step with its shardings, and the abstract (sharded) state it takes."""

    mesh: jax.sharding.Mesh
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    step: object  # jax.jit-ed train_step
    init: object  # jax.jit-ed init_state with the state's out_shardings


def state_shardings(cfg: Config, mesh: jax.sharding.Mesh, abstract_state: dict) -> dict:
    """Params, EMA and every optimiser sub-tree shaped like the params sharded by the rule table;
    scalars (step, Adam count) replicated."""
    params_sh = sharding.param_shardings(
        abstract_state["params"], sharding.logical_axes(abstract_model(cfg.model)), mesh)
    params_def = jax.tree.structure(abstract_state["params"])
    is_params = lambda x: isinstance(x, dict) and jax.tree.structure(x) == params_def  # noqa: E731
    return {
        "step": sharding.replicated(mesh), "params": params_sh, "ema": params_sh,
        "opt_state": jax.tree.map(
            lambda x: params_sh if is_params(x) else sharding.replicated(mesh),
            abstract_state["opt_state"], is_leaf=is_params),
    }


def resolve_batch_size(cfg: Config, mesh: jax.sharding.Mesh) -> Config:
    """`cfg` with `train.batch_size=0` replaced by the mesh's `data` x `fsdp` size; a batch that
    does not split evenly over those axes is an error."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = cfg.train.batch_size or rows
    if batch % rows:
        raise ConfigError(f"train.batch_size={batch} is not divisible by mesh data x fsdp = "
                          f"{rows}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))


def build_step(cfg: Config, mesh: jax.sharding.Mesh) -> ShardedStep:
    """`jax.jit` of the step with in/out shardings and the state donated (`train.batch_size`
    resolved: see `resolve_batch_size`)."""
    cfg = resolve_batch_size(cfg, mesh)
    abstract = jax.eval_shape(functools.partial(init_state, cfg))
    shardings = state_shardings(cfg, mesh, abstract)
    batch_sh = sharding.batch_sharding(mesh)
    train_step = make_train_step(cfg)

    def step_on_mesh(state, batch):  # traced with activations split over the batch axes
        with batch_sharded_over(mesh):
            return train_step(state, batch)

    step = jax.jit(step_on_mesh, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abstract, shardings)
    init = jax.jit(functools.partial(init_state, cfg), out_shardings=shardings)
    return ShardedStep(mesh, shardings, batch_sh, with_sh, step, init)


def compile_step(cfg: Config, sharded: ShardedStep):
    """Lower and compile the step ahead of time; returns `(compiled, report)` where `report`
    holds the compile time and the per-device memory analysis in bytes."""
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=sharded.batch_sharding),
                         abstract_batch(cfg))
    t0 = time.perf_counter()
    compiled = sharded.step.lower(sharded.abstract_state, batch).compile()
    report = {"compile_s": time.perf_counter() - t0, "devices": sharded.mesh.size,
              "mesh": dict(sharded.mesh.shape)}
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in ("argument", "output", "temp", "alias", "generated_code"):
            report[f"{name}_bytes"] = int(getattr(memory, f"{name}_size_in_bytes"))
        # Donated state aliases the output onto the arguments: count that memory once.
        report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                                - report["alias_bytes"] + report["temp_bytes"])
    return compiled, report


def global_batch(sharded: ShardedStep, local: dict) -> dict:
    """This process's rows -> global arrays split over `data` x `fsdp`."""
    return {k: jax.make_array_from_process_local_data(sharded.batch_sharding, v)
            for k, v in local.items()}


def batch_crc(batch: dict) -> int:
    """A fingerprint of a host batch's clips, to check the data order of resumed runs."""
    return zlib.crc32(batch["target"].tobytes(), zlib.crc32(batch["cond"].tobytes()))


def make_teacher(cfg: Config, mesh: jax.sharding.Mesh, log=lambda msg: None):
    """`teacher(batch) -> teacher_bthwc`: the model `train.distill_from` names streams every clip
    of a global batch from an empty cache, frame by frame through its own jitted streaming step
    (its own steps, noise and cache choices: what `lsd stream` would output), in model space.
    Its frames and prompt encoder must be this config's, else a `ConfigError` naming both."""
    from lsd_jax.prompt import check_encoder_record, encoder_record
    from lsd_jax.resolve import resolve_model
    from lsd_jax.streaming import init_stream, make_latent_step

    spec = cfg.train.distill_from
    resolved = resolve_model(None if spec == "demo" else spec)
    tcfg, m, tm = resolved.cfg, cfg.model, resolved.cfg.model
    if (tcfg.codec, tm.frame_shape, tm.cond_channels) != (cfg.codec, m.frame_shape,
                                                          m.cond_channels):
        raise ConfigError(f"train.distill_from={spec!r} streams {tcfg.codec} frames "
                          f"{tm.frame_shape} with {tm.cond_channels} input channels; this config "
                          f"has {cfg.codec} {m.frame_shape} with {m.cond_channels}")
    check_encoder_record(encoder_record(tcfg), cfg, f"train.distill_from={spec!r}")
    graphdef, params = nnx.split(resolved.model)
    step = make_latent_step(tcfg, graphdef)
    clip = cfg.codec == "pixel"  # what a viewer sees of a pixel model: its frames in range

    def stream(params, cond_bthwc, prompt_bp):
        def body(state, cond_bhwc):
            state, x0_bhwc = step(params, state, cond_bhwc, prompt_bp)
            return state, jnp.clip(x0_bhwc, -1.0, 1.0) if clip else x0_bhwc

        state = init_stream(tcfg, cond_bthwc.shape[0], tcfg.seed)
        _, x0_tbhwc = jax.lax.scan(body, state, jnp.swapaxes(cond_bthwc, 0, 1))
        return jnp.swapaxes(x0_tbhwc, 0, 1)

    batch_sh = sharding.batch_sharding(mesh)
    params = jax.device_put(params, sharding.replicated(mesh))
    jitted = jax.jit(stream, out_shardings=batch_sh)
    log(f"distilling from {resolved.describe} (train.distill_weight={cfg.train.distill_weight})")
    return lambda batch: jitted(params, batch["cond"], batch.get("prompt"))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options,
                                 item_names=("state", "data"))


def save_checkpoint(manager: ocp.CheckpointManager, state: dict, data_state: dict) -> None:
    """Start an async save of the state and of this process's grain iterator state (every process
    saves its own: `train.checkpointing`) at `state["step"]`."""
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=DataStateSave(data_state)), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager,
                       abstract_state: dict) -> tuple[int, dict, dict] | None:
    """`(step, state, data_state)` of the newest checkpoint that restores on every process, onto
    the shardings of `abstract_state`, with this process's own `data_state`; a damaged newer one
    (on any process) is skipped with a warning naming it and, once an older one restores, moved
    aside to `STEP.damaged-TIME` (so the run can save that step again). None if there is no
    checkpoint. A checkpoint the run cannot continue exactly (data positions of another process
    count that differ) is a `ConfigError`."""
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        error = None
        # orbax logs a failed restore as ERROR lines; the warning below says it in one.
        with stderr_held() as held:
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
            except ConfigError:
                held.release()
                raise
            # Damaged files surface as many types (tensorstore ValueError, OSError, KeyError...).
            except Exception as err:  # noqa: BLE001
                error = err
            else:
                held.release()
        if not _all_processes(error is None):
            first = first_line(error)[:200] if error else "damaged on another process"
            kind = f"{type(error).__name__}: " if error else ""
            warnings.warn(f"checkpoint step {step} in {manager.directory} cannot be restored "
                          f"({kind}{first}); trying an older one", stacklevel=2)
            damaged.append(step)
            continue
        for bad in damaged:
            _move_aside(manager, bad)
        if damaged:
            manager.reload()
        return step, restored.state, restored.data
    if steps:
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored (steps "
                              f"{steps})")
    return None


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (they then agree on the step they restore)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
    """Rename the damaged checkpoint `STEP` to `STEP.damaged-TIME` (orbax ignores that name)."""
    source = Path(manager.directory) / str(step)
    target = source.with_name(f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
        source.rename(target)
        warnings.warn(f"moved the damaged checkpoint step {step} aside to {target}",
                      stacklevel=3)
    _sync(f"moved-aside-{step}")


def check_workdir(workdir: Path) -> None:
    """The work directory exists (made if need be) and takes new files; else a `CheckpointError`
    naming it."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as err:
        raise CheckpointError(f"work directory {str(workdir)!r} is not writable: "
                              f"{err.strerror or err}") from None


def resume_config(workdir: Path, cfg: Config, overrides) -> Config:
    """The config a resumed run continues with: the run's own (`WORKDIR/model/config.json`,
    written at every save) with `overrides` applied, where an override may change `train.steps`
    (to extend the run) and `mesh.*` (where it runs) but nothing else the run was made with: a
    conflict is a `ConfigError` naming the key and both values. `cfg` (the command line's) when
    the run has not saved yet."""
    from lsd_jax.checkpoint import load_config_from
    from lsd_jax.config import apply_overrides, to_dict

    if not (workdir / "model" / "config.json").is_file():
        return cfg
    saved = load_config_from(workdir / "model")
    resumed = apply_overrides(saved, list(overrides))
    old, new = _flat(to_dict(saved)), _flat(to_dict(resumed))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key) and key != "train.steps" and not key.startswith("mesh."):
            saved_at = workdir / "model" / "config.json"
            raise ConfigError(f"{key}={new.get(key)!r} conflicts with the run being resumed, "
                              f"which has {key}={old.get(key)!r} ({saved_at}); only "
                              "train.steps and mesh.* may change on --resume")
    return resumed


# Model options that change how the model runs, not its weights: they may differ from the run a
# warm start takes its weights from.
RUNTIME_MODEL_KEYS = ("attention_impl", "norm_impl", "remat_policy", "dtype")


def check_warm_start(cfg: Config) -> tuple[Path, Config, bool]:
    """The model directory of `train.init_from` (given it or a training work directory holding
    it), its stored config, and whether `model.color_map` grows; a `ConfigError` or
    `CheckpointError` when `cfg` cannot start from it (checked before the step compiles)."""
    from lsd_jax.checkpoint import load_config_from
    from lsd_jax.config import COLOR_MAP_KINDS, color_map_grows, to_dict
    from lsd_jax.prompt import check_encoder_record, encoder_record
    from lsd_jax.resolve import model_directory

    given = cfg.train.init_from
    try:
        source = model_directory(given)
        saved = load_config_from(source)
    except CheckpointError as err:
        raise CheckpointError(f"train.init_from={given!r}: {err}") from None
    old, new = to_dict(saved.model), to_dict(cfg.model)
    grows = color_map_grows(old.get("color_map"), new["color_map"])
    for key in sorted(old.keys() | new.keys()):
        if key in RUNTIME_MODEL_KEYS or (key == "color_map" and grows):
            continue
        if old.get(key) != new.get(key):
            raise ConfigError(f"train.init_from={str(source)!r} holds a model with model.{key}="
                              f"{old.get(key)!r}; this config has model.{key}={new.get(key)!r}: "
                              "a warm start needs the same architecture (model.color_map may "
                              f"only grow, in the order {COLOR_MAP_KINDS})")
    check_encoder_record(encoder_record(saved), cfg, f"train.init_from={str(source)!r}")
    return source, saved, grows


def warm_start(cfg: Config, sharded: ShardedStep, state: dict, log=lambda msg: None) -> dict:
    """`state` (fresh, step 0) with params and EMA replaced by the weights of the model directory
    `train.init_from` (or of the training work directory holding one); its architecture (every
    `model.*` key but the runtime ones) and prompt encoder must be `cfg`'s, else a `ConfigError`
    naming the first differing key (`check_warm_start`). One change is allowed: `model.color_map`
    may grow (none -> affine -> quadratic -> curves); the added features start with zero
    coefficients, so step 0 computes what the source model computes."""
    import dataclasses

    from lsd_jax.checkpoint import restore_params
    from lsd_jax.model import grow_color_map

    source, saved, grows = check_warm_start(cfg)
    old, new = {"color_map": saved.model.color_map}, {"color_map": cfg.model.color_map}
    stored = dataclasses.replace(cfg.model, color_map=old["color_map"])
    params = nnx.to_pure_dict(restore_params(
        source / "params", nnx.state(abstract_model(stored), nnx.Param), "the config"))
    if grows:
        if old["color_map"] == "none":  # the fresh layer: zero-initialised
            params["color_map"] = jax.device_get(state["params"]["color_map"])
        else:
            kernel, bias = grow_color_map(params["color_map"]["kernel"],
                                          params["color_map"]["bias"], cfg.model.channels,
                                          old["color_map"], new["color_map"])
            params["color_map"] = {"kernel": kernel, "bias": bias}
        log(f"model.color_map grows from {old['color_map']!r} to {new['color_map']!r} "
            "(the added features start at zero)")
    params = jax.device_put(params, sharded.state_shardings["params"])
    return {**state, "params": params, "ema": jax.tree.map(jnp.copy, params)}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def export_model(workdir: Path, cfg: Config, ema: dict) -> Path:
    """Write the EMA weights as the model checkpoint `workdir/model` (written as `model.tmp`, then
    swapped in, so a kill at any point leaves the old model or the new one); a latent model trained
    with `data.codec_dir` gets a copy of its codec beside it (`vae.json`, `vae/`), as `lsd convert
    oasis` writes one. A failed write (a full disk) removes `model.tmp` and is a `WriteError`."""
    final, tmp, old = (workdir.absolute() / name for name in ("model", "model.tmp", "model.old"))
    for path in (tmp, old):  # what a killed run left
        if jax.process_index() == 0 and path.exists():
            shutil.rmtree(path)
    _sync("export-clean")
    try:
        write_model(tmp, cfg, model_from_params(cfg.model, ema),
                    trained_prompts=config_prompts(cfg))
        if cfg.codec != "pixel" and cfg.data.codec_dir and jax.process_index() == 0:
            # The codec goes with the model, so stream / eval / export decode through it.
            for name in ("vae.json", "vae"):
                source = Path(cfg.data.codec_dir) / name
                copy = shutil.copytree if source.is_dir() else shutil.copy2
                copy(source, tmp / name)
        _sync("export-written")
        if jax.process_index() == 0:
            replace_path(tmp, final)  # the old model, if any, is now at `tmp`
    except OSError as err:
        raise WriteError(describe_os_error(err, final)) from None
    finally:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_space(workdir: Path, state: dict) -> None:
    """A `WriteError` before a save that the disk holding `workdir` has no room for (the train
    state's checkpoint and the EMA model, uncompressed, a tenth more and 4 MiB for the files'
    metadata): refused whole, never half written."""
    need = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    need += sum(leaf.nbytes for leaf in jax.tree.leaves(state["ema"]))
    need = int(1.1 * need) + 4 * 2**20
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise WriteError(f"{describe_os_error(OSError(errno.ENOSPC, ''), workdir)}: a save "
                         f"needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")


# A write the disk refused: the run stops with one line instead of a traceback.
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _abandon_writes(manager: ocp.CheckpointManager, workdir: Path) -> None:
    """After a failed write (a full disk): let the checkpoint saves in flight end, quietly (their
    writer threads fail the same way), and remove what they and the model export left half
    written (`checkpoints/*.orbax-checkpoint-tmp*`, `model.tmp`); committed checkpoints stay."""
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    levels, hook = [logger.level for logger in loggers], sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = _ignore
    try:
        with stderr_held():  # what the failing writer threads print goes with them
            for finish in (manager.wait_until_finished, manager.close):
                try:
                    finish()
                except Exception:  # noqa: BLE001 - the same failure again, already reported
                    pass
            gc.collect()  # the failed writers' tasks go now, not with a message at exit
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.unraisablehook = hook
    if jax.process_index() == 0:
        for path in [*Path(manager.directory).glob("*.orbax-checkpoint-tmp*"),
                     workdir.absolute() / "model.tmp"]:
            shutil.rmtree(path, ignore_errors=True)


def _ignore(*_) -> None:
    pass


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- the loop


class _StopSignals:
    """SIGTERM/SIGINT set `received` (the loop then saves and stops) instead of killing."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, workdir: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train `cfg` to `train.steps`, checkpointing into `workdir`; returns a summary dict with the
    final `step`, `loss` (last logged), `stopped_by` (a signal name or None) and the compile
    `report`. `resume=False` refuses a work directory that already holds checkpoints."""
    from lsd_train.data import make_dataset
    from lsd_train.metrics import Metrics

    workdir = Path(workdir)
    check_workdir(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    cfg = resolve_batch_size(cfg, mesh)
    # Data and work directory first: their errors should not wait for a compile.
    data_iter = iter(make_dataset(cfg, process_index=jax.process_index(),
                                  process_count=jax.process_count()))
    manager = checkpoint_manager(workdir, cfg)
    if not resume and manager.all_steps():
        raise CheckpointError(f"{str(workdir)!r} already holds checkpoints (steps "
                              f"{manager.all_steps()}); pass --resume to continue, or use a new "
                              "work directory")
    teacher = make_teacher(cfg, mesh, log) if cfg.train.distill_from else None
    if cfg.train.init_from and not (resume and manager.all_steps()):
        check_warm_start(cfg)  # its errors should not wait for a compile either
    sharded = build_step(cfg, mesh)
    compiled, report = compile_step(cfg, sharded)
    log(f"mesh {dict(mesh.shape)} over {mesh.size} devices; step compiled in "
        f"{report['compile_s']:.1f} s; per device: " + ", ".join(
            f"{k[:-6]} {v / 2**20:.1f} MiB" for k, v in report.items() if k.endswith("_bytes")))

    restored = restore_checkpoint(manager, sharded.abstract_state) if resume else None
    if restored is None:
        state = sharded.init()
        if resume:
            log(f"--resume: no checkpoint in {manager.directory}; starting from step 0")
        if cfg.train.init_from:
            state = warm_start(cfg, sharded, state, log)
            log(f"step 0 takes its weights from {cfg.train.init_from} (train.init_from)")
    else:
        step, state, data_state = restored
        data_iter.set_state(data_state)
        log(f"resumed from step {step}")

    start = int(jax.device_get(state["step"]))
    try:
        metrics = Metrics(workdir, cfg, enabled=jax.process_index() == 0, progress=progress,
                          start_step=start)
        t = cfg.train
        frames_per_step = t.batch_size * cfg.data.clip_frames
        last_loss, stopped_by = None, None
        with _StopSignals() as stop, metrics.progress(start, t.steps) as bar:
            step, t_log, steps_since_log, crcs = start, time.perf_counter(), 0, []
            saved = start if restored is not None else None
            while step < t.steps and stop.received is None:
                local = next(data_iter)
                crcs.append(batch_crc(local))
                batch = global_batch(sharded, model_batch(cfg, local))
                if teacher is not None:
                    batch["teacher"] = teacher(batch)
                state, step_metrics = compiled(state, batch)
                step, steps_since_log = step + 1, steps_since_log + 1
                if step % t.log_every == 0 or step == t.steps:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    elapsed = time.perf_counter() - t_log
                    values["frames_per_s"] = frames_per_step * steps_since_log / elapsed
                    values["tokens_per_s"] = values["frames_per_s"] * cfg.model.tokens_per_frame
                    metrics.log(step, values, crcs)
                    last_loss = values["loss"]
                    t_log, steps_since_log, crcs = time.perf_counter(), 0, []
                bar.update(step, None if last_loss is None else f"loss {last_loss:.4f}")
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    check_space(workdir, state)
                    save_checkpoint(manager, state, data_iter.get_state())
                    export_model(workdir, cfg, state["ema"])
                    saved = step
                if t.sample_every and step % t.sample_every == 0:
                    metrics.sample(step, state["ema"])
            if stop.received is not None:
                stopped_by = signal.Signals(stop.received).name
                log(f"{stopped_by} received: saving step {step} and stopping")
        if saved != step:
            check_space(workdir, state)
            save_checkpoint(manager, state, data_iter.get_state())
            export_model(workdir, cfg, state["ema"])
        manager.wait_until_finished()
        manager.close()
        metrics.close()
    except Exception as err:  # noqa: BLE001 - orbax reports storage errors as ValueError
        failure = err if isinstance(err, WriteError) else storage_os_error(err, workdir)
        if failure is None or not (isinstance(failure, WriteError)
                                   or failure.errno in WRITE_FAILURES):
            raise
        _abandon_writes(manager, workdir)
        if not isinstance(failure, WriteError):
            failure = WriteError(describe_os_error(failure, workdir))
        raise failure from None
    return {"step": step, "loss": last_loss, "stopped_by": stopped_by, "report": report}
