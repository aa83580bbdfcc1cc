"""Serving (DESIGN.md section 4): checkpoint -> jitted (and `jax.export`-ed) streaming step ->
frame loop.

Sources and sinks for the frame loop (a video file, a webcam, a browser over WebSocket), and the
export of the step to one artifact (serialized StableHLO lowered for cpu, cuda and tpu, with a small
JSON header: config, shapes, dtypes, version) that loads without the model code.
"""
