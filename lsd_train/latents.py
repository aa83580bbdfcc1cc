"""Latent datasets: training clips encoded once by a codec, read by grain without the codec.

    lsd data encode --config lsd_base --codec-dir DIR --out LATENTS --clips 4096
    lsd train --config lsd_base --workdir runs/base data.source=latents \
        data.latent_dir=LATENTS data.codec_dir=DIR

`lsd_train.latents_writer.encode_dataset` writes one: paired clips of the pixel pipeline, encoded by
the codec, in ArrayRecord shards, one record per clip (`npz` bytes: `target`, `cond` float32 latents
`[t, gh, gw, c]`, `prompt` when the config has one). `LATENTS/latents.json` records the codec's
identity (`codec_identity`: its name, shapes and the sha256 of its weights), the prompt encoder's
record, the clip length and the shards. Training reads the records through
`grain.ArrayRecordDataSource` (`LatentClips`) and never runs the VAE; a dataset made by another
codec (name, latent shape, or, when `data.codec_dir` is given, weights), another prompt encoder or
another clip length is refused with an error naming both sides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import grain
import jax
import numpy as np
from flax import nnx

from lsd_jax.codec import make_codec
from lsd_jax.config import Config
from lsd_jax.errors import ConfigError, DataError
from lsd_jax.prompt import encoder_record

FORMAT, VERSION = "lsd-latents", 1


def codec_identity(codec) -> dict:
    """`{"name", "frame_shape", "latent_shape", "sha256"}`; the hash covers every weight of a
    learned codec (`"none"` for the pixel codec, which has none)."""
    digest = "none"
    if hasattr(codec, "vae"):
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(nnx.state(codec.vae, nnx.Param)):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        digest = h.hexdigest()
    return {"name": codec.name, "frame_shape": list(codec.frame_shape),
            "latent_shape": list(codec.latent_shape), "sha256": digest}


def pixel_twin(cfg: Config, frame_hw: tuple[int, int]) -> Config:
    """The pixel-space config whose data pipeline makes the clips a latent config encodes."""
    model = dataclasses.replace(cfg.model, frame_height=frame_hw[0], frame_width=frame_hw[1],
                                channels=3, cond_channels=3, patch_size=1)
    return dataclasses.replace(cfg, model=model, codec="pixel",
                               data=dataclasses.replace(cfg.data, source=cfg.data.source
                                                        if cfg.data.source != "latents"
                                                        else "procedural"))


def read_meta(directory: str | Path) -> dict:
    if not str(directory):
        raise ConfigError("data.source='latents' needs data.latent_dir=DIR (a dataset written by "
                          "`lsd data encode`)")
    path = Path(directory) / "latents.json"
    if not path.is_file():
        raise ConfigError(f"data.latent_dir={str(directory)!r} holds no latent dataset (no "
                          "latents.json; write one with `lsd data encode`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{str(path)!r} has format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return meta


def check_dataset(meta: dict, cfg: Config, codec=None) -> None:
    """Refuse a dataset `cfg` cannot train on: another codec (name, latent shape, weights when
    `codec` is given), another prompt encoder, another clip length."""
    where = f"data.latent_dir={cfg.data.latent_dir!r}"
    made_by = meta["codec"]
    if made_by["name"] != cfg.codec:
        raise ConfigError(f"{where} was encoded by codec {made_by['name']!r}; the config's codec "
                          f"is {cfg.codec!r}")
    if tuple(made_by["latent_shape"]) != tuple(cfg.model.frame_shape):
        raise ConfigError(f"{where} holds latents of shape {tuple(made_by['latent_shape'])}; the "
                          f"model takes {tuple(cfg.model.frame_shape)}")
    if codec is not None and codec_identity(codec)["sha256"] != made_by["sha256"]:
        raise ConfigError(f"{where} was encoded by codec weights sha256 "
                          f"{made_by['sha256'][:16]}...; data.codec_dir={cfg.data.codec_dir!r} "
                          f"holds {codec_identity(codec)['sha256'][:16]}...: another codec")
    if meta["prompt_encoder"] != encoder_record(cfg):
        raise ConfigError(f"{where} holds prompts encoded by {meta['prompt_encoder']}; the "
                          f"config encodes with {encoder_record(cfg)}")
    if meta["clip_frames"] != cfg.data.clip_frames:
        raise ConfigError(f"{where} holds clips of {meta['clip_frames']} frames; "
                          f"data.clip_frames={cfg.data.clip_frames}")


class LatentClips:
    """A grain random-access source over a latent dataset: item `i` is clip `i`'s dict of
    float32 arrays (`target`, `cond`, `prompt`)."""

    def __init__(self, cfg: Config):
        directory = Path(cfg.data.latent_dir)
        self.meta = read_meta(directory)
        codec = None
        if cfg.data.codec_dir:
            codec = make_codec(cfg, cfg.data.codec_dir)
        check_dataset(self.meta, cfg, codec)
        self._shards = [directory / name for name in self.meta["shards"]]
        try:
            self._records = grain.sources.ArrayRecordDataSource(list(map(str, self._shards)))
        except Exception as err:  # noqa: BLE001 - array_record reports damage as RuntimeError
            self._damaged(err, self._find_damaged())
            raise

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        try:
            data = self._records[index]
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except Exception as err:  # noqa: BLE001 - Riegeli's RuntimeError, numpy's ValueError...
            self._damaged(err, self._shard_of(index), index)
            raise

    def _find_damaged(self) -> Path | None:
        """The first shard that cannot be opened on its own, if any."""
        for shard in self._shards:
            try:
                grain.sources.ArrayRecordDataSource([str(shard)])
            except Exception:  # noqa: BLE001 - as above
                return shard
        return None

    def _shard_of(self, index: int) -> Path | None:
        """The shard holding record `index` (shards hold consecutive records, in order)."""
        for shard in self._shards:
            try:
                count = len(grain.sources.ArrayRecordDataSource([str(shard)]))
            except Exception:  # noqa: BLE001 - a shard that does not even open
                return shard
            if index < count:
                return shard
            index -= count
        return None

    def _damaged(self, err: Exception, shard: Path | None, index: int | None = None) -> None:
        """Raise the one-line `DataError` naming the damaged shard (and record)."""
        if shard is None:
            return
        what = (str(err).strip().splitlines() or [""])[0][:200] or type(err).__name__
        record = "" if index is None else f" (record {index})"
        raise DataError(f"latent shard {str(shard)!r}{record} cannot be read: damaged or "
                        f"truncated ({what}); encode the dataset again with lsd data encode") \
            from None
