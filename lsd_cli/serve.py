"""The serving commands of `lsd` (`lsd_serve`):

    lsd export --checkpoint DIR --out model.lsdx [--platforms cpu,cuda,tpu] [--batch 1,2,4]
               [--steps 1,2,3]
    lsd stream --input PATH|webcam|demo --prompt TEXT [--prompt-schedule "0:a,120:b"] --out OUT.mp4
               [--side-by-side] [--steps k] [--max-frames N] [--json]
    lsd serve [--host 127.0.0.1] [--port 8765] [--deadline-ms MS] [--token T] ...
    lsd bench serve --sessions 1,2,4 [--frames 200] [--json]
    lsd bench long-stream [--frames 10000] [--json]

Every command takes the model from `--artifact FILE` (an exported step), `--checkpoint DIR` (a
model checkpoint), `--config NAME` (an UNTRAINED model of that config, random weights, with
`key.path=value` overrides) or, with none of them, the built-in demo model (`lsd_jax/demo.py`),
and says which. Overrides given with a checkpoint or the demo model change how it runs (its saved
config: `diffusion.frame_noise=fixed`), not its shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lsd_cli.args import config_from_args, int_in, int_list, step_count, step_counts
from lsd_jax.errors import ConfigError
from lsd_jax.prompt import NEAR_SIMILARITY
from lsd_serve.artifact import load_artifact
from lsd_serve.bench import bench_long_stream, bench_serve
from lsd_serve.load import load_engine
from lsd_serve.options import ServerOptions
from lsd_serve.server import serve_forever
from lsd_serve.stream import check_output, parse_prompt_schedule, run_stream


def _non_negative_float(text: str) -> float:
    """An argparse type: a float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}, expected a number of seconds >= 0")
    return value


def _add_model_source(parser: argparse.ArgumentParser, *, artifact: bool = True) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", help="model checkpoint directory")
    if artifact:
        source.add_argument("--artifact", metavar="FILE", help="exported step (.lsdx) from lsd "
                                                               "export")
    parser.add_argument("--config", default=None,
                        help="run an UNTRAINED model of this config (random weights) instead of "
                             "the built-in demo model")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override a field of --config, or how a stored model runs (its "
                             "saved config: e.g. diffusion.frame_noise=fixed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model and of "
                                                            "the stream's noise")


def _engine(args, max_steps: int | None = None):
    cfg, overrides = None, tuple(args.overrides)
    if getattr(args, "artifact", None) is not None:
        if overrides:
            raise ConfigError(f"overrides {' '.join(overrides)} with --artifact: an exported step "
                              "is compiled with its config; export it again with them")
    elif args.checkpoint is None and args.config is not None:
        cfg, overrides = config_from_args(args), ()
    return load_engine(checkpoint=args.checkpoint, artifact=getattr(args, "artifact", None),
                       cfg=cfg, max_steps=max_steps, seed=args.seed, overrides=overrides)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


# ----------------------------------------------------------------------------- lsd export


def _run_export(args) -> int:
    from lsd_jax.resolve import resolve_model  # lazy: Flax and the model, for lsd export only
    from lsd_serve.export import export_model  # lazy: the model code, for lsd export only

    cfg = None if args.checkpoint is not None or args.config is None else config_from_args(args)
    resolved = resolve_model(args.checkpoint, cfg=cfg, seed=args.seed,
                             overrides=() if cfg is not None else tuple(args.overrides))
    source, untrained = resolved.describe, resolved.untrained
    if args.checkpoint is None:
        _say(f"lsd export: no --checkpoint, exporting the {source}")
    t0 = time.perf_counter()
    path = export_model(args.out, resolved, batches=args.batch, steps=args.steps,
                        platforms=tuple(args.platforms.split(",")))
    export_s = time.perf_counter() - t0
    art = load_artifact(path)  # read back: the file on disk is verified before we say it is good
    result = {"out": str(path), "bytes": os.path.getsize(path), "export_s": export_s,
              "platforms": art.header["platforms"], "batches": list(art.batches),
              "steps": list(art.steps), "source": source, "untrained": untrained,
              "prompt": art.header["prompt"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {path} ({result['bytes']:,} bytes, {export_s:.1f} s): {source}; platforms "
              f"{','.join(result['platforms'])}; batches {result['batches']}; steps "
              f"{result['steps']}; prompts encoded on the host ({art.header['prompt']['encoder']})")
    return 0


# ----------------------------------------------------------------------------- lsd stream


def _note_untrained_prompts(engine, prompts: list[str]) -> None:
    """For each prompt the model was not trained on, name the nearest trained prompt and its
    cosine similarity: as what the prompt is read as when it is near (a paraphrase), as a
    warning when it is far from everything the model was trained on."""
    seen = set()
    for prompt in prompts:
        if prompt in seen:
            continue
        seen.add(prompt)
        near = engine.nearest_trained(prompt)
        if near is None or near["trained"]:
            continue
        how = (f"cosine similarity {near['similarity']:.2f} under the "
               f"{engine.prompt_encoder.name} encoder")
        if near["near"]:
            _say(f"lsd stream: {prompt!r} reads as the trained prompt {near['nearest']!r} ({how})")
        else:
            _say(f"lsd stream: warning: {prompt!r} is far from every prompt the model was "
                 f"trained on: the nearest is {near['nearest']!r} ({how}, below "
                 f"{NEAR_SIMILARITY}); the output blends trained styles")


def _run_stream(args) -> int:
    schedule = parse_prompt_schedule(args.prompt, args.prompt_schedule)
    check_output(args.out, args.input)
    engine = _engine(args, max_steps=args.steps)
    _say(f"lsd stream: {engine.describe}")
    _note_untrained_prompts(engine, [p for _, p in schedule])
    result = run_stream(engine, args.input, args.out, schedule, steps=args.steps,
                        side_by_side=args.side_by_side, max_frames=args.max_frames,
                        show_progress=not args.no_progress and not args.json, seed=args.seed)
    if result["warning"]:
        _say(f"lsd stream: warning: {result['warning']}")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = result["ms_per_frame"]
    print(f"{result['frames']} frames {result['input']} -> {result['out']}: "
          f"{result['fps']:.1f} FPS end to end, step p50 {ms['p50']:.1f} ms p99 {ms['p99']:.1f} ms"
          f" ({result['steps']} steps; first frame {result['first_frame_s']:.2f} s with compile)")
    if result["untrained"]:
        print("note: the model is UNTRAINED (random weights): the output shows the pipeline "
              "running, not a style")
    return 0


# ----------------------------------------------------------------------------- lsd serve


def _run_serve(args) -> int:
    engine = _engine(args, max_steps=args.steps)
    options = ServerOptions(
        host=args.host, port=args.port, token=args.token, allowed_origins=tuple(args.allow_origin),
        max_sessions=args.max_sessions, max_message_bytes=args.max_message_bytes,
        deadline_ms=args.deadline_ms, default_prompt=args.prompt, seed=args.seed,
        precompile=args.precompile, gather_ms=args.gather_ms,
        idle_timeout_s=args.idle_timeout or None, send_timeout_s=args.send_timeout or None)
    _say(f"lsd serve: {engine.describe}")
    serve_forever(engine, options)
    return 0


# ----------------------------------------------------------------------------- lsd bench


def _run_bench_serve(args) -> int:
    engine = _engine(args, max_steps=args.steps)
    result = bench_serve(engine, sessions=args.sessions, frames=args.frames, steps=args.steps,
                         warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['engine']}; {result['steps']} steps; {result['frames']} frames per session "
          f"after {result['warmup']} warm-up")
    for row in result["runs"]:
        print(f"{row['sessions']} sessions: end-to-end p50 {row['ms_p50']:.1f} ms  p99 "
              f"{row['ms_p99']:.1f} ms  aggregate {row['aggregate_fps']:.1f} FPS  dropped "
              f"{row['dropped']}")
    return 0


def _run_bench_long_stream(args) -> int:
    engine = _engine(args, max_steps=args.steps)
    result = bench_long_stream(engine, frames=args.frames, steps=args.steps, window=args.window,
                               reps=args.reps, show_progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    early, late, paired = result["early"], result["late"], result["interleaved"]
    print(f"{result['frames']} frames, {result['steps']} steps")
    print(f"  as streamed: frames {early['frames']} p50 {early['ms_p50']:.2f} ms, frames "
          f"{late['frames']} p50 {late['ms_p50']:.2f} ms (ratio {result['windowed_ratio']:.3f})")
    print(f"  interleaved ({paired['reps']} reps each): " + ", ".join(
        f"{k.replace('_ms_p50', '')} p50 {v:.2f} ms" for k, v in paired.items() if k != "reps")
        + f" (ratio {result['ratio']:.3f}, {'within' if result['flat'] else 'NOT within'} 5%)")
    print(f"  resident memory: {early['rss_mb']:.1f} MB after frame 149, {late['rss_mb']:.1f} MB "
          f"at the end ({result['rss_growth_mb']:+.1f} MB)")
    return 0


# ----------------------------------------------------------------------------- registration


def register(commands, bench) -> None:
    """Add export, stream, serve and `bench serve` / `bench long-stream` to the `lsd` parser (these
    commands take --checkpoint/--artifact, with --config optional)."""
    export = commands.add_parser("export", help="export the streaming step to one .lsdx file",
                                 description="jax.export the jitted streaming step with its "
                                             "weights into one file, lowered for every platform")
    _add_model_source(export, artifact=False)
    export.add_argument("--out", required=True, help="artifact path (model.lsdx)")
    export.add_argument("--platforms", default="cpu,cuda,tpu",
                        help="platforms lowered for, together (default cpu,cuda,tpu)")
    export.add_argument("--batch", type=int_list(1), default=(1,),
                        help="batch sizes (concurrent streams) exported, e.g. 1,2,4 (default 1)")
    export.add_argument("--steps", type=step_counts, default=None,
                        help="denoising step counts exported, e.g. 1,2,3 (default 1..the "
                             "config's sample_steps)")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(run=_run_export)

    stream = commands.add_parser("stream", help="restyle a video file, a webcam or the demo clip",
                                 description="stream frames through the model into a video file")
    _add_model_source(stream)
    stream.add_argument("--input", required=True, help="video file, 'webcam' or 'demo' (a clip "
                                                       "shipped with the package)")
    stream.add_argument("--prompt", default=None, help="prompt from frame 0")
    stream.add_argument("--prompt-schedule", default=None,
                        help="prompt changes by frame, e.g. '0:pencil sketch,120:thermal'")
    stream.add_argument("--out", required=True, help="output video (.mp4)")
    stream.add_argument("--side-by-side", action="store_true", help="input beside output")
    stream.add_argument("--steps", type=step_count, default=None, help="denoising steps per frame")
    stream.add_argument("--max-frames", type=int_in(1), default=None, help="stop after N frames")
    stream.add_argument("--no-progress", action="store_true", help="no progress bar")
    stream.add_argument("--json", action="store_true", help="print one JSON object")
    stream.set_defaults(run=_run_stream)

    serve = commands.add_parser("serve", help="the browser page and WebSocket frame loop",
                                description="serve the model to browsers and WebSocket clients")
    _add_model_source(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; "
                                                           "0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int_in(0, 65535), default=8765, help="port (default 8765)")
    serve.add_argument("--token", default=None,
                       help="access token clients must send (?token=...); default none")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="extra browser Origin allowed on the WebSocket (same origin always is)")
    serve.add_argument("--max-sessions", type=int_in(1), default=4,
                       help="concurrent sessions (default 4)")
    serve.add_argument("--max-message-bytes", type=int_in(1), default=1 << 20,
                       help="largest WebSocket message accepted (default 1 MiB)")
    serve.add_argument("--deadline-ms", type=float, default=None,
                       help="per-frame deadline: frames that cannot make it at the requested "
                            "steps are made with fewer")
    serve.add_argument("--steps", type=step_count, default=None, help="maximum denoising steps")
    serve.add_argument("--prompt", default="a watercolor painting", help="initial prompt")
    serve.add_argument("--precompile", action="store_true",
                       help="compile every batch size and step count before accepting clients "
                            "(slower start; no compile pause when a session joins)")
    serve.add_argument("--gather-ms", type=_non_negative_float, default=None,
                       help="wait this long after a frame for other sessions' frames, to step "
                            "them together (default: for the sessions of the last batch, a "
                            "quarter of the last step's time at most; 0: step at once)")
    serve.add_argument("--send-timeout", type=_non_negative_float, default=10.0, metavar="S",
                       help="disconnect a client that does not take a message within S seconds "
                            "(default 10; 0: wait forever)")
    serve.add_argument("--idle-timeout", type=_non_negative_float, default=60.0, metavar="S",
                       help="close a session that sent no frame for S seconds, freeing its slot "
                            "(default 60; 0: never)")
    serve.set_defaults(run=_run_serve)

    bench_serve = bench.add_parser("serve", help="end-to-end latency and FPS through lsd serve",
                                   description="clients on loopback, each sending its next frame "
                                               "when the last comes back")
    _add_model_source(bench_serve)
    bench_serve.add_argument("--sessions", type=int_list(1), default=(1, 2, 4),
                             help="concurrent sessions, one run each (default 1,2,4)")
    bench_serve.add_argument("--frames", type=int_in(1), default=200,
                             help="timed frames per session")
    bench_serve.add_argument("--warmup", type=int_in(0), default=10,
                             help="untimed frames per session")
    bench_serve.add_argument("--steps", type=step_count, default=None,
                             help="denoising steps per frame")
    bench_serve.add_argument("--json", action="store_true", help="print one JSON object")
    bench_serve.set_defaults(run=_run_bench_serve)

    long_stream = bench.add_parser("long-stream", help="step cost and memory over a long stream",
                                   description="stream N frames; compare the step latency and "
                                               "process memory near frame 100 and near frame N")
    _add_model_source(long_stream)
    long_stream.add_argument("--frames", type=int_in(1), default=10_000, help="stream length")
    long_stream.add_argument("--window", type=int_in(1), default=100,
                             help="frames in each timed window (default 100)")
    long_stream.add_argument("--reps", type=int_in(1), default=200,
                             help="interleaved steps from each kept state (default 200)")
    long_stream.add_argument("--steps", type=step_count, default=None,
                             help="denoising steps per frame")
    long_stream.add_argument("--json", action="store_true", help="print one JSON object")
    long_stream.set_defaults(run=_run_bench_long_stream)
