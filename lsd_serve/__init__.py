"""Serving (docs/DESIGN.md section 4): checkpoint -> jitted (and `jax.export`-ed) streaming step ->
frame loop.

- `export`: the `.lsdx` artifact (serialized `jax.export` steps lowered for cpu, cuda and tpu,
  the weights, a JSON header), written by `lsd export`; `artifact`: its loader, which needs no
  model code.
- `engine`: one step interface over a checkpoint, an artifact or an untrained model;
  `model_engine`: the engine of a model run in process; `load`: which engine a command runs.
- `stream`: video file / webcam / packaged demo clip -> output video (`lsd stream`).
- `server`: `lsd serve`, the application run until interrupted (or in a thread); `app`: its
  routes and handlers (`/`, `/ws`, `/healthz`, `/metrics`), `options`: what it takes, `access`:
  token and origin checks, `protocol`: one client's WebSocket messages (PROTOCOL.md), `sessions`:
  a client's state, `frame_loop`: the one model loop all sessions share, `scheduler`: its
  batching and step decisions, `jpeg`: frames in and out, `metrics`: Prometheus.
- `bench`: `lsd bench serve` and `lsd bench long-stream` (their commands: `lsd_cli.serve`).
"""
