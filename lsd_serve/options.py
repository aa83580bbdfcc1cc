"""What `lsd serve` takes besides the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    """What `lsd serve` takes besides the model. `allowed_origins` are browser origins allowed on
    the WebSocket besides the page's own; `deadline_ms` None turns adaptive steps off;
    `precompile` compiles every (batch, steps, sessions) variant before accepting clients, so no
    client waits for a compile when another joins; `gather_ms` makes the loop, woken by one
    session's frame, wait that long for the other sessions' frames so they share the step (None:
    wait for the sessions of the last batch, a quarter of the last step's time at most, see
    `frame_loop`; 0: step at once); a session that sends no frame for `idle_timeout_s` seconds is
    closed, freeing its slot (None: never); a send the client does not take within
    `send_timeout_s` seconds disconnects it (None: wait forever)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 4
    max_message_bytes: int = 1 << 20
    deadline_ms: float | None = None
    default_prompt: str = "a watercolor painting"
    seed: int = 0
    precompile: bool = False
    gather_ms: float | None = None
    idle_timeout_s: float | None = 60.0
    send_timeout_s: float | None = 10.0
