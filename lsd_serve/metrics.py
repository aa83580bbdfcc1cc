"""The Prometheus series of one server (`/metrics`)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """The Prometheus series of one server (its own registry, so servers in one process don't
    share counts)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("lsd_frames_in", "frames received", registry=r)
        self.frames_out = Counter("lsd_frames_out", "frames sent back", registry=r)
        self.frames_dropped = Counter(
            "lsd_frames_dropped", "frames replaced by a newer one before the loop took them",
            registry=r)
        self.sessions = Gauge("lsd_sessions", "connected sessions", registry=r)
        self.sessions_refused = Counter("lsd_sessions_refused", "clients refused: server full",
                                        registry=r)
        self.errors = Counter("lsd_client_errors", "bad client messages by error code", ["code"],
                              registry=r)
        self.step_seconds = Histogram(
            "lsd_step_seconds", "one batched step (all sessions of a group)", ["batch", "steps"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
            registry=r)
        self.frame_seconds = Histogram(
            "lsd_frame_latency_seconds", "frame arrival to output sent, per frame",
            buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12), registry=r)
        self.steps_used = Counter("lsd_frames_by_steps", "frames made, by denoising steps used",
                                  ["steps"], registry=r)
        self.outputs_dropped = Counter(
            "lsd_outputs_dropped", "output frames not sent: the session's previous one was still "
            "on its way (a client reading slower than it sends)", registry=r)
        self.steps_reduced = Counter(
            "lsd_frames_steps_reduced", "frames made with fewer steps than requested (deadline)",
            registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """Every series in the text format, and its content type: the `/metrics` response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
