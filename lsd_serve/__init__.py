"""Serving (docs/DESIGN.md section 4): checkpoint -> jitted (and `jax.export`-ed) streaming step ->
frame loop.

- `export`: the `.lsdx` artifact (serialized `jax.export` steps lowered for cpu, cuda and tpu,
  the weights, a JSON header), written by `lsd export`; `artifact`: its loader, which needs no
  model code.
- `engine`: one step interface over a checkpoint, an artifact or an untrained model.
- `stream`: video file / webcam / packaged demo clip -> output video (`lsd stream`).
- `server`: the aiohttp server, its frame loop and browser page (`lsd serve`, PROTOCOL.md).
- `bench`: `lsd bench serve` and `lsd bench long-stream` (their commands: `lsd_cli.serve`).
"""
