"""`lsd data`: datasets, the codec weights they are encoded with, and the packaged demo clip.

    lsd data encode --config lsd_base --codec-dir DIR --out LATENTS --clips 4096
    lsd data random-codec --out DIR [vae.FIELD=VALUE ...] [--seed 0]
    lsd data demo-clip [--out clip.mp4]

`encode` writes a latent dataset (`lsd_train.latents`: ArrayRecord shards of clips encoded once by
the config's codec) that `lsd train ... data.source=latents data.latent_dir=LATENTS` reads without
running the codec; `random-codec` writes a randomly initialised `oasis_vae` codec, the latent path
end to end without the converted Oasis weights; `demo-clip` makes the clip `lsd stream --input demo`
plays (`lsd_serve.make_demo_clip`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from lsd_cli.args import add_command, config_from_args, int_in
from lsd_jax.codec import make_codec
from lsd_jax.errors import ConfigError
from lsd_serve import make_demo_clip


def _run_encode(args) -> int:
    from lsd_train.latents_writer import encode_dataset  # lazy: grain, for this command only

    cfg = config_from_args(args)
    codec = make_codec(cfg, args.codec_dir)
    width = len(str(args.clips))

    def progress(done, total):
        if done == total or done % max(1, total // 10) < 8:
            print(f"lsd data encode: {done:>{width}}/{total} clips", flush=True)

    meta = encode_dataset(cfg, codec, args.out, clips=args.clips, split=args.split,
                          batch=args.batch, progress=progress)
    size = sum((Path(args.out) / s).stat().st_size for s in meta["shards"])
    print(f"wrote {meta['clips']} clips of {meta['clip_frames']} frames in "
          f"{len(meta['shards'])} shard(s) ({size / 2**20:.1f} MiB) to {args.out}; codec "
          f"{meta['codec']['name']} sha256 {meta['codec']['sha256'][:16]}, latents "
          f"{'x'.join(map(str, meta['codec']['latent_shape']))}")
    return 0


def _run_random_codec(args) -> int:
    from flax import nnx

    from lsd_jax.vae import OasisVAE, VAEConfig, save_vae  # lazy: Flax and orbax, this command only

    fields = {f.name: f.type for f in dataclasses.fields(VAEConfig)}
    values = {}
    for item in args.fields:
        name, eq, value = item.partition("=")
        name = name.removeprefix("vae.")
        if not eq or name not in fields:
            raise ConfigError(f"lsd data random-codec {item!r}: expected vae.FIELD=VALUE with "
                              f"FIELD one of {', '.join(fields)}")
        try:
            values[name] = float(value) if fields[name] in (float, "float") else int(value)
        except ValueError:
            raise ConfigError(f"lsd data random-codec {item!r}: {value!r} is not a "
                              "number") from None
    vae_cfg = VAEConfig(**values)
    vae = OasisVAE(vae_cfg, rngs=nnx.Rngs(args.seed))
    save_vae(args.out, vae_cfg, vae)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    print(f"wrote a randomly initialised oasis_vae codec (seed {args.seed}, {count / 1e6:.1f}M "
          f"parameters, {vae_cfg.frame_height}x{vae_cfg.frame_width} frames -> "
          f"{'x'.join(map(str, vae_cfg.grid))}x{vae_cfg.latent_dim} latents) to {args.out}")
    return 0


def _run_demo_clip(args) -> int:
    out = make_demo_clip.write_demo_clip(args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


def register(commands, bench) -> None:
    """Add `lsd data encode`, `lsd data random-codec` and `lsd data demo-clip`."""
    data = commands.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    encode = add_command(data, "encode", _run_encode,
                         "encode training clips with the config's codec into ArrayRecord shards "
                         "(a latent dataset: data.source=latents data.latent_dir=OUT)")
    encode.add_argument("--out", required=True, help="output directory")
    encode.add_argument("--clips", type=int_in(1), required=True, help="clips to encode")
    encode.add_argument("--codec-dir", default=None,
                        help="the codec's weights (a directory with vae.json, for oasis_vae)")
    encode.add_argument("--split", default="train", choices=("train", "heldout"))
    encode.add_argument("--batch", type=int_in(1), default=8, help="clips encoded per call")
    codec = data.add_parser("random-codec", help="write a randomly initialised oasis_vae codec "
                            "(the vit-l-20 shapes unless overridden): the latent path end to end "
                            "without the converted Oasis weights")
    codec.set_defaults(run=_run_random_codec)
    codec.add_argument("--out", required=True, help="directory to write (vae.json, vae/)")
    codec.add_argument("--seed", type=int, default=0)
    codec.add_argument("fields", nargs="*", metavar="vae.FIELD=VALUE",
                       help="the VAE's shapes, e.g. vae.enc_depth=2")
    clip = data.add_parser(
        "demo-clip", help="write the demo clip lsd stream --input demo plays",
        description=f"Write the demo clip lsd stream --input demo plays: "
                    f"{len(make_demo_clip.PHOTOS)} scikit-image photographs, "
                    f"{make_demo_clip.FRAMES_PER_PHOTO} frames each, {make_demo_clip.WIDTH}x"
                    f"{make_demo_clip.HEIGHT} at {make_demo_clip.FPS} fps (mp4v).")
    clip.add_argument("--out", type=Path, default=make_demo_clip.OUT,
                      help=f"where to write it (default: the packaged {make_demo_clip.OUT.name}, "
                           "replaced)")
    clip.set_defaults(run=_run_demo_clip)
