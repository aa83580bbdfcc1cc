"""`lsd eval`: trained models on held-out clips, a long stream, paraphrases and real video.

    lsd eval [quality] [--checkpoint [NAME=]SPEC ...] [--steps 1,2,3] [--out DIR --report FILE]
    lsd eval drift --frames 3000 --out DIR [--resume]
    lsd eval paraphrase | real [--steps 3] [--out DIR]

Models are named as `lsd_train.evaluate.resolve_model` reads them (`demo`, the default, a model
directory, a training work directory, `WORKDIR@STEP`); tables and plots go to `--out` and into
the section `--section` of the markdown file `--report`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from functools import partial
from pathlib import Path

import numpy as np

from lsd_cli.args import int_in, step_counts
from lsd_jax.atomic import atomic_path
from lsd_jax.errors import ConfigError

EVAL_KINDS = ("quality", "drift", "paraphrase", "real")


def register(commands, bench) -> None:
    """Add `lsd eval`."""
    del bench  # no benchmark here
    parser = commands.add_parser(
        "eval", help="held-out quality (PSNR/SSIM/flicker by steps), long-stream drift, "
                     "paraphrases, real video",
        description="lsd eval [quality]: PSNR, SSIM and flicker per prompt on held-out clips at "
                    "several step counts. lsd eval drift: PSNR over an endless held-out stream. "
                    "lsd eval paraphrase: held-out phrasings of the prompts. lsd eval real: "
                    "scikit-image's GIF and LFW faces (real video never trained on) under "
                    "several prompts, as pictures. Tables and plots go to --out and into a "
                    "section of --report. Trailing key.path=value overrides apply to every "
                    "model's stored config: how it runs (diffusion.frame_noise=fixed), not its "
                    "shapes.")
    # No argparse choices: an override (`lsd eval diffusion.frame_noise=fixed`) may take this
    # optional positional's place; `_run_eval` checks it.
    parser.add_argument("what", nargs="?", metavar="{" + ",".join(EVAL_KINDS) + "}",
                        default="quality")
    parser.add_argument("--checkpoint", action="append", metavar="[NAME=]SPEC",
                        help="model: 'demo' (built in, the default), a model directory, a "
                             "training work directory, or WORKDIR@STEP; repeat to compare")
    parser.add_argument("--steps", type=step_counts, default=None,
                        help="denoising steps: a list for quality (default 1,2,3,4,8,12), one "
                             "count for drift (default 3)")
    parser.add_argument("--clips", type=int_in(1), default=4,
                        help="held-out clips per task (quality)")
    parser.add_argument("--frames", type=int_in(1), default=None,
                        help="frames per clip (quality, default 24) or in the stream (drift, "
                             "default 3000)")
    parser.add_argument("--tasks", default="all", help="tasks (quality): all or names")
    parser.add_argument("--split", choices=("heldout", "validation", "unseen"),
                        default="heldout",
                        help="quality and paraphrase clips: heldout (photographs never trained "
                             "on; the reported figures), validation (training photographs, unseen "
                             "camera seeds; for choosing recipes) or unseen (two pictures no split "
                             "trains on or holds out; for choosing recipes by how they carry to "
                             "new pictures)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="real: a prompt to stream the clips under (repeat; default: a "
                             "pencil sketch, a thermal camera image, a cartoon with bold "
                             "outlines, an old sepia photograph)")
    parser.add_argument("--task", default="motion_trails",
                        help="task of the drift stream (default motion_trails, the task that "
                             "depends on the model's own past outputs)")
    parser.add_argument("--period", type=int_in(1), default=1000,
                        help="period of the drift camera path, frames (first/last windows)")
    parser.add_argument("--save-every", type=int_in(1), default=5_000,
                        help="drift with --out: checkpoint the stream every N frames "
                             "(<section>_<model>_checkpoint.npz: the PSNR so far and the stream's "
                             "state), so a stream of hours can be stopped and resumed")
    parser.add_argument("--resume", action="store_true",
                        help="drift: continue from the checkpoint in --out (the same run: model, "
                             "frames, steps, task, period, seed); the result equals an "
                             "uninterrupted run's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="directory for JSON, PNG and npz (default: write no files)")
    parser.add_argument("--report", default=None,
                        help="markdown file whose section --section is (re)written (needs "
                             "--out for its pictures; default: no report)")
    parser.add_argument("--section", default=None,
                        help="name of the report section and file prefix (default: quality or "
                             "drift)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(run=_run_eval, overrides=[])


def _run_eval(args: argparse.Namespace) -> int:
    from lsd_train import eval_paraphrase, eval_real, eval_report, evaluate  # lazy: Flax, the model

    if "=" in args.what:  # an override in the optional positional's place
        args.overrides, args.what = [args.what, *args.overrides], "quality"
    if args.what not in EVAL_KINDS:
        raise ConfigError(f"lsd eval {args.what!r}, expected one of {', '.join(EVAL_KINDS)} "
                          "(or key.path=value overrides)")
    specs = args.checkpoint or ["demo"]
    if args.report and not args.out:
        raise ConfigError(f"lsd eval --report {args.report}: also give --out DIR for the "
                          "report's pictures and JSON")
    out_dir = Path(args.out) if args.out else None
    report = Path(args.report) if args.report else None
    section = args.section or args.what
    models = [evaluate.resolve_model(spec, args.overrides) for spec in specs]

    def rel(path: Path) -> str:
        base = report.absolute().parent if report else Path.cwd()
        return os.path.relpath(path.absolute(), base)

    if args.what == "quality":
        steps = args.steps or evaluate.QUALITY_STEPS
        results = [evaluate.evaluate_quality(m, steps_list=steps, clips=args.clips,
                                             frames=args.frames or 24, seed=args.seed,
                                             tasks=args.tasks, split=args.split,
                                             progress=not args.no_progress)
                   for m in models]
        pictures = {}
        if out_dir:
            plot = eval_report.plot_quality(results, out_dir / f"{section}_psnr.png")
            strips = eval_report.strips_picture(results[0], out_dir / f"{section}_strips.jpg")
            pictures = {"PSNR by denoising steps": rel(plot),
                        f"input | output | target, {results[0]['model']}": rel(strips)}
        body = eval_report.quality_markdown(results, pictures=pictures)
        k3 = 3 if 3 in steps else steps[0]
        kmax = max(steps)
        for r in results:
            s = r["summary"]
            print(f"{r['model']}: per-frame tasks {s[k3]['per_frame_psnr']:.2f} dB, temporal "
                  f"{s[k3]['temporal_psnr']:.2f} dB at {k3} steps; per-frame "
                  f"{s[kmax]['per_frame_psnr']:.2f} dB at {kmax} steps", file=sys.stderr)
    elif args.what == "real":
        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval real --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        prompts = tuple(args.prompt or eval_real.REAL_PROMPTS)
        results = [eval_real.evaluate_real(m, prompts=prompts,
                                           steps=args.steps[0] if args.steps else 3,
                                           seed=args.seed)
                   for m in models]
        pictures = {}
        if out_dir:
            for name in eval_real.REAL_CLIPS:
                strip = eval_real.real_strip(results[0], name, out_dir / f"{section}_{name}.jpg")
                pictures[f"{name}: input, then each prompt's output"] = rel(strip)
        body = eval_real.real_markdown(results, pictures=pictures)
        for r in results:
            print(f"{r['model']}: streamed {', '.join(r['clips'])} under {len(r['prompts'])} "
                  f"prompts in {r['seconds']:.0f} s", file=sys.stderr)
    elif args.what == "paraphrase":
        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval paraphrase --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        results = [eval_paraphrase.evaluate_paraphrases(
            m, steps=args.steps[0] if args.steps else 3, clips=args.clips,
            frames=args.frames or 12, seed=args.seed, split=args.split,
            progress=not args.no_progress) for m in models]
        for r in results:
            closer = sum(p["margin"] > 0 for t in r["tasks"].values() for p in t["paraphrases"])
            total = sum(len(t["paraphrases"]) for t in r["tasks"].values())
            print(f"{r['model']}: {closer} of {total} paraphrases closer to their own task "
                  f"(smallest margin {r['min_margin']:+.2f} dB)", file=sys.stderr)
        body = eval_paraphrase.paraphrase_markdown(results)
    else:
        if args.steps is not None and len(args.steps) != 1:
            raise ConfigError(f"lsd eval drift --steps {','.join(map(str, args.steps))}: "
                              "expected one step count")
        steps = args.steps[0] if args.steps else 3
        frames = args.frames or 3000
        results = []
        if args.resume and not out_dir:
            raise ConfigError("lsd eval drift --resume: expected --out, the directory holding "
                              "the run's checkpoint")
        for m in models:
            on_checkpoint, resume, ckpt_path = None, None, None
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
                ckpt_path = out_dir / f"{section}_{_slug(m.label)}_checkpoint.npz"
                on_checkpoint = partial(evaluate.save_drift_checkpoint, ckpt_path)
                if args.resume and ckpt_path.is_file():
                    resume = evaluate.load_drift_checkpoint(ckpt_path)
                    print(f"{m.label}: resuming at frame {resume['next_frame']:,} of {frames:,} "
                          f"from {ckpt_path}", file=sys.stderr)
                elif args.resume:
                    print(f"{m.label}: --resume: no checkpoint {ckpt_path}; starting from frame 0",
                          file=sys.stderr)
            r = evaluate.evaluate_drift(m, frames=frames, steps=steps, task=args.task,
                                        period=args.period, seed=args.seed,
                                        progress=not args.no_progress,
                                        checkpoint_every=args.save_every,
                                        on_checkpoint=on_checkpoint, resume=resume)
            if out_dir:
                with atomic_path(out_dir / f"{section}_{_slug(m.label)}_psnr.npz") as tmp:
                    np.savez_compressed(tmp, psnr=r["psnr"])
                ckpt_path.unlink(missing_ok=True)
            results.append(r)
            print(f"{m.label}: PSNR first {args.period} {r['first_mean']:.2f} dB, last "
                  f"{r['last_mean']:.2f} dB ({r['delta_db']:+.2f}) over {frames:,} frames",
                  file=sys.stderr)
        pictures = {}
        if out_dir:
            plot = eval_report.plot_drift(results, out_dir / f"{section}.png")
            pictures = {"PSNR over the stream": rel(plot)}
        body = eval_report.drift_markdown(results, pictures=pictures)
    payload = [eval_report.json_ready(r) for r in results]
    if out_dir:
        eval_report.save_json(out_dir / f"{section}.json", payload)
        print(f"wrote {out_dir}/{section}*", file=sys.stderr)
    if report:
        command = "lsd eval " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else ""
        if command:
            body = f"`{command}`\n\n" + body
        eval_report.replace_section(report, section, body)
        print(f"wrote {report} (section {section})", file=sys.stderr)
    if args.json:
        print(json.dumps(payload, indent=2))
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
