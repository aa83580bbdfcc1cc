"""Write a latent dataset (`lsd data encode`; the format and its reader: `lsd_train.latents`).

`encode_dataset` draws paired clips from the pixel pipeline (`lsd_train/data.py`: the procedural or
video-folder source and the tasks) at the codec's frame size, encodes input and target frames with
`codec.encode` (jitted, a batch of clips at a time) and writes them to ArrayRecord shards of
`CLIPS_PER_SHARD` clips, one record per clip, with `latents.json` beside them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lsd_jax.atomic import atomic_path, storage_os_error
from lsd_jax.config import Config, to_dict
from lsd_jax.errors import ConfigError
from lsd_jax.prompt import encoder_record
from lsd_train.data import PairedClips, make_source
from lsd_train.latents import FORMAT, VERSION, codec_identity, pixel_twin

CLIPS_PER_SHARD = 256


def _record(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def encode_dataset(cfg: Config, codec, out: str | Path, *, clips: int, split: str = "train",
                   batch: int = 8, progress=lambda done, total: None) -> dict:
    """Encode `clips` paired clips of `split` with `codec` into ArrayRecord shards under `out`;
    returns the metadata written to `out/latents.json`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, expected a new directory for the "
                          "dataset")
    if (out / "latents.json").exists():
        raise ConfigError(f"{str(out)!r} already holds a latent dataset (latents.json)")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty, expected a new "
                          "directory for the dataset")
    twin = pixel_twin(cfg, codec.frame_shape[:2])
    source = PairedClips(make_source(twin, split), twin, cfg.data.shuffle_seed)
    encode = jax.jit(codec.encode)
    # Written beside and renamed into place once complete: a kill or a full disk leaves no
    # dataset, never a partial one.
    with atomic_path(out) as tmp:
        tmp.mkdir()
        shards, written, index = [], 0, 0
        writer = None
        while written < clips:
            items = []
            while len(items) < min(batch, clips - written):
                item = source[index]
                index += 1
                if item is not None:
                    items.append(item)
            target = np.asarray(encode(np.stack([it["target"] for it in items])), np.float32)
            cond = np.asarray(encode(np.stack([it["cond"] for it in items])), np.float32)
            for i, item in enumerate(items):
                if written % CLIPS_PER_SHARD == 0:
                    if writer is not None:
                        _close(writer, out)
                    shards.append(f"clips-{len(shards):05d}.array_record")
                    writer = ArrayRecordWriter(str(tmp / shards[-1]), "group_size:1")
                record = {"target": target[i], "cond": cond[i]}
                if "prompt" in item:
                    record["prompt"] = np.asarray(item["prompt"], np.float32)
                _write(writer, _record(record), out)
                written += 1
            progress(written, clips)
        _close(writer, out)
        meta = {"format": FORMAT, "version": VERSION, "codec": codec_identity(codec),
                "prompt_encoder": encoder_record(cfg), "clip_frames": cfg.data.clip_frames,
                "clips": written, "split": split, "shards": shards,
                "data": to_dict(cfg.data)}
        (tmp / "latents.json").write_text(json.dumps(meta, indent=2))
    return meta


def _write(writer, record: bytes, out: Path) -> None:
    try:
        writer.write(record)
    except Exception as err:  # noqa: BLE001 - the writer reports a full disk as RuntimeError
        failure = storage_os_error(err, out)
        if failure is None:
            raise
        raise failure from None


def _close(writer, out: Path) -> None:
    try:
        writer.close()
    except Exception as err:  # noqa: BLE001 - as `_write`
        failure = storage_os_error(err, out)
        if failure is None:
            raise
        raise failure from None
