"""The one model loop of a server, shared by all its sessions.

Each session holds at most one pending input frame (latest frame wins: a frame arriving while
another waits replaces it and is counted as dropped, so latency never builds up). The loop takes
every pending frame at once, groups the sessions by their requested step count, runs each group
through the jitted step in a worker thread (the event loop keeps receiving meanwhile), and sends
each session its output, JPEG-encoded off the loop while the next step runs.

Batching that pays: the state of the batch stepped last stays on the device (`_Resident`); while
the same sessions step together it is reused as it is, so their caches are not stacked and split
at every frame. Only when the group changes are the caches split into the sessions
(`SessionCache`, freed with a session on disconnect) and the new group's stacked, padded to the
smallest fixed batch size that holds it. Woken by one session's frame, the loop waits a little
for the other sessions of the last batch (`gather_ms`; by default a quarter of the last step's
time, at most 20 ms), whose next frames are usually on their way: the sessions stay in one batch
instead of drifting into separate, smaller steps.

A prompt switch or a reset applies from the next frame the loop takes. Prompt switches are
coalesced per session: one encoding at a time on the encoder's own thread, the newest prompt
asked for wins, at most `PROMPT_RATE` encodings a second per session. With a deadline, the loop
picks the most steps (up to the requested count) whose measured step time fits what is left of
the oldest frame's deadline, else the fewest it has (`StepScheduler`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from lsd_jax.stream_state import StreamState, empty_session, split_sessions, stack_sessions
from lsd_serve.engine import Engine
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.metrics import Metrics
from lsd_serve.options import ServerOptions
from lsd_serve.scheduler import StepScheduler
from lsd_serve.sessions import Session, error_message

# Batch sizes an in-process model is padded to (an artifact has its own): a few fixed shapes, so
# the step compiles at most this many times per step count however sessions come and go.
DEFAULT_BATCHES = (1, 2, 4)
# Automatic gathering: wait for the last batch's other sessions this share of the last step's
# time, at most this long.
GATHER_SHARE, GATHER_MAX_S = 0.25, 0.020
# Prompt encodings per second and session, at most (newer prompts replace waiting ones).
PROMPT_RATE = 10.0


class _Resident:
    """The batch stepped last: its sessions in row order, its batch size and its state."""

    def __init__(self, sessions: tuple[Session, ...], batch: int, state: StreamState):
        self.sessions, self.batch, self.state = sessions, batch, state


class FrameLoop:
    """The one model loop: batches the sessions' pending frames through the engine's step."""

    def __init__(self, engine: Engine, options: ServerOptions, metrics: Metrics):
        self.engine, self.options, self.metrics = engine, options, metrics
        self.batches = engine.batches or DEFAULT_BATCHES
        self.sessions: dict[int, Session] = {}
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lsd-step")
        self.encoders = ThreadPoolExecutor(2, thread_name_prefix="lsd-jpeg")
        self.prompts = ThreadPoolExecutor(1, thread_name_prefix="lsd-prompt")
        state = engine.init_state(min(self.batches), options.seed)
        self.rng = state.rng
        self.empty = empty_session(state)
        self.scheduler = StepScheduler(self.batches, engine.steps, options.deadline_ms)
        self.sends: set[asyncio.Task] = set()
        self.frames_done = 0
        self.resident: _Resident | None = None
        self.last_step_s = 0.0

    def new_session(self, session_id: int, ws, prompt: str, transport=None) -> Session:
        session = Session(session_id, ws, prompt, self._prompt_vec(prompt), self.engine.max_steps,
                          self.empty, transport=transport,
                          send_timeout_s=self.options.send_timeout_s, prompt_wanted=prompt)
        self.sessions[session_id] = session
        self.metrics.sessions.set(len(self.sessions))
        return session

    def drop_session(self, session: Session) -> None:
        """Forget a session: its cache arrays go with it (its row of the resident batch with the
        next change of group)."""
        session.open = False
        self.sessions.pop(session.id, None)
        if session.prompt_task is not None:
            session.prompt_task.cancel()
        self.metrics.sessions.set(len(self.sessions))

    def _prompt_vec(self, prompt: str):
        vec = self.engine.encode_prompts([prompt])
        return None if vec is None else vec[0]

    async def set_prompt_async(self, session: Session, prompt: str) -> str:
        """Ask for `prompt`; returns once it, or a newer prompt of the session, applies (that
        prompt is returned). Encodings run one at a time on the encoder's thread, not on the
        event loop; a session's waiting requests collapse into its newest."""
        session.prompt_asked += 1
        mine = session.prompt_asked
        session.prompt_wanted = prompt
        if session.prompt_task is None or session.prompt_task.done():
            session.prompt_task = asyncio.create_task(self._apply_prompts(session))
        async with session.prompt_changed:
            await session.prompt_changed.wait_for(
                lambda: session.prompt_applied >= mine or not session.open)
        return session.prompt

    async def _apply_prompts(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        while session.open and session.prompt_applied < session.prompt_asked:
            # A flood of prompts: at most PROMPT_RATE encodings a second for a session.
            rest_s = session.prompt_encoded_at + 1.0 / PROMPT_RATE - time.perf_counter()
            if rest_s > 0:
                await asyncio.sleep(rest_s)
            asked, text = session.prompt_asked, session.prompt_wanted
            if text != session.prompt:
                session.prompt_encoded_at = time.perf_counter()
                session.prompt_vec = await loop.run_in_executor(self.prompts, self._prompt_vec,
                                                                text)
                session.prompt = text
            async with session.prompt_changed:
                session.prompt_applied = asked
                session.prompt_changed.notify_all()

    def put_frame(self, session: Session, frame_hwc: np.ndarray) -> None:
        """Latest frame wins: replace a frame still waiting, counting it as dropped."""
        session.frames_in += 1
        self.metrics.frames_in.inc()
        if session.pending is not None:
            session.dropped += 1
            self.metrics.frames_dropped.inc()
        session.pending = (frame_hwc, session.frames_in, time.perf_counter())
        self.wake.set()

    def precompile(self) -> int:
        """Run every variant once on empty rows (in the worker thread); returns how many. The
        loop's rng is restored, so the outputs that follow are as without it."""
        rng, count = self.rng, 0
        frame_hwc = np.zeros((*self.engine.frame_hw, 3), np.uint8)
        prompt = self._prompt_vec(self.options.default_prompt)
        for batch, real, steps in self.scheduler.precompile_plan():
            rows = [self.empty] * batch
            prompt_bp = None if prompt is None else np.stack([prompt] * batch)
            _, _, step_s = self._run_step(rows, np.stack([frame_hwc] * batch), prompt_bp, steps,
                                          real)
            self._record(batch, steps, step_s)
            count += 1
        self.rng = rng
        return count

    # ------------------------------------------------------------------------- the loop

    async def run(self) -> None:
        """Forever: wait for frames, gather the last batch's sessions, step every group."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            await self._gather()
            self.wake.clear()
            taken = [s for s in self.sessions.values() if s.pending is not None]
            for requested, chunk in self.scheduler.groups(taken, steps_of=lambda s: s.steps):
                try:
                    await self._step_group(loop, chunk, requested)
                except Exception as err:  # a failed step must not end the loop for everyone
                    logging.getLogger("lsd.serve").exception("step failed")
                    self.resident = None  # its donated state may be gone: restart the streams
                    for session in chunk:
                        session.cache = self.empty
                        self._spawn(session.send(error_message(
                            "internal", f"the step failed on this frame: {err}")))

    def _gather_s(self) -> float:
        if self.options.gather_ms is not None:
            return self.options.gather_ms / 1e3
        return min(GATHER_SHARE * self.last_step_s, GATHER_MAX_S)

    async def _gather(self) -> None:
        """Wait (at most `_gather_s`) until every open session of the last batch (every session,
        with an explicit `gather_ms`) has a frame waiting."""
        wait_s = self._gather_s()
        if wait_s <= 0:
            return
        if self.options.gather_ms is not None:
            expected = list(self.sessions.values())
        else:
            expected = [s for s in (self.resident.sessions if self.resident else ()) if s.open]
        deadline = time.perf_counter() + wait_s
        while any(s.pending is None for s in expected):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except TimeoutError:
                return

    async def _step_group(self, loop, group: list[Session], requested: int) -> None:
        jobs = [(s, *s.pending) for s in group]
        for s in group:
            s.pending = None
        batch = self.scheduler.batch_for(len(group))
        waited_s = time.perf_counter() - min(arrival for *_, arrival in jobs)
        steps = self.scheduler.choose_steps(batch, requested, waited_s)
        frames_bhwc = np.stack([frame for _, frame, _, _ in jobs]
                               + [jobs[0][1]] * (batch - len(group)))
        prompt_bp = None
        if group[0].prompt_vec is not None:
            prompt_bp = np.stack([s.prompt_vec for s in group]
                                 + [group[0].prompt_vec] * (batch - len(group)))
        outs, step_s = await loop.run_in_executor(
            self.executor, self._run_group, tuple(group), batch, frames_bhwc, prompt_bp, steps)
        self._record(batch, steps, step_s)
        self.last_step_s = step_s
        now = time.perf_counter()
        for (session, _, seq, arrival), out_hwc in zip(jobs, outs, strict=True):
            if not session.open:
                continue
            session.frames_out += 1
            self.frames_done += 1
            self.metrics.frames_out.inc()
            self.metrics.steps_used.labels(str(steps)).inc()
            if steps < requested:
                self.metrics.steps_reduced.inc()
            self.metrics.frame_seconds.observe(now - arrival)
            if session.outputs_in_flight:  # the previous output is still unsent: drop this one
                session.outputs_dropped += 1
                self.metrics.outputs_dropped.inc()
                continue
            meta = {"type": "frame", "seq": seq, "steps": steps, "requested_steps": requested,
                    "batch": batch, "sessions_in_batch": len(group),
                    "latency_ms": 1e3 * (now - arrival), "step_ms": 1e3 * step_s,
                    "dropped": session.dropped, "frames_out": session.frames_out}
            session.outputs_in_flight += 1
            self._spawn(self._send_output(session, meta, out_hwc))

    async def _send_output(self, session: Session, meta: dict, out_hwc: np.ndarray) -> None:
        """Encode one output frame off the event loop (beside the next step) and send it."""
        try:
            async with session.send_lock:
                jpeg = await asyncio.get_running_loop().run_in_executor(self.encoders,
                                                                        encode_jpeg, out_hwc)
                await session.send_locked(meta, jpeg)
        finally:
            session.outputs_in_flight -= 1

    def spawn(self, coro) -> None:
        """Run `coro` on its own, kept until done (asyncio holds tasks only weakly)."""
        self._spawn(coro)

    def _spawn(self, coro) -> None:
        """A send that runs on its own (a slow client must not hold up the loop); the task is
        kept until done, as asyncio only holds weak references to tasks."""
        task = asyncio.create_task(coro)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    def _record(self, batch: int, steps: int, step_s: float) -> None:
        self.metrics.step_seconds.labels(str(batch), str(steps)).observe(step_s)
        self.scheduler.record(batch, steps, step_s)

    def _run_group(self, group: tuple[Session, ...], batch: int, frames_bhwc, prompt_bp,
                   steps: int):
        """In the worker thread: one step of `group`'s streams, on the resident batch if it is
        the same sessions (no reset asked), else on their stacked caches (the resident batch
        split back into its sessions first). Returns (output frames, step seconds)."""
        t0 = time.perf_counter()
        resident = self.resident
        reuse = (resident is not None and resident.sessions == group and resident.batch == batch
                 and not any(s.reset_requested for s in group))
        if reuse:
            state = resident.state
        else:
            if resident is not None:
                for session, cache in zip(resident.sessions, split_sessions(
                        resident.state, len(resident.sessions)), strict=True):
                    session.cache = cache
            self.resident = None
            for session in group:
                if session.reset_requested:
                    session.cache = session.cache.reset()
                    session.reset_requested = False
            rows = [s.cache for s in group] + [self.empty] * (batch - len(group))
            state = stack_sessions(rows, self.rng)
            for session in group:
                session.cache = None  # in the resident batch from now on
        self.resident = None  # the state is donated to the step
        state, out_bhwc = self.engine.step(state, frames_bhwc, prompt_bp, steps)
        out_bhwc = np.asarray(jax.block_until_ready(out_bhwc))
        self.rng = state.rng
        self.resident = _Resident(group, batch, state)
        return list(out_bhwc[:len(group)]), time.perf_counter() - t0

    def _run_step(self, rows, frames_bhwc, prompt_bp, steps: int, real: int):
        """In the worker thread: stack `rows`, step, split (the precompile pass, on empty
        rows); returns (rows, output frames, step seconds)."""
        t0 = time.perf_counter()
        state = stack_sessions(list(rows), self.rng)
        state, out_bhwc = self.engine.step(state, frames_bhwc, prompt_bp, steps)
        out_bhwc = np.asarray(jax.block_until_ready(out_bhwc))
        self.rng = state.rng
        new_rows = split_sessions(state, real)
        return new_rows, list(out_bhwc[:real]), time.perf_counter() - t0
