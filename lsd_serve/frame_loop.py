"""The one model loop of a server, shared by all its sessions.

Each session holds at most one pending input frame (latest frame wins: a frame arriving while
another waits replaces it and is counted as dropped, so latency never builds up). The loop takes
every pending frame at once, groups the sessions by their requested step count, stacks each
group's caches along the batch axis (padded to the smallest fixed batch size that holds it), runs
the jitted step in a worker thread (the event loop keeps receiving meanwhile), and sends each
session its output. A session's cache lives in the session (a `SessionCache`), so it is freed
with the session on disconnect; a prompt switch or a reset applies from the next frame the loop
takes. With a deadline, the loop picks the most steps (up to the requested count) whose measured
step time fits what is left of the oldest frame's deadline, else the fewest it has
(`StepScheduler`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from lsd_jax.stream_state import empty_session, split_sessions, stack_sessions
from lsd_serve.engine import Engine
from lsd_serve.jpeg import encode_jpeg
from lsd_serve.metrics import Metrics
from lsd_serve.options import ServerOptions
from lsd_serve.scheduler import StepScheduler
from lsd_serve.sessions import Session, error_message

# Batch sizes an in-process model is padded to (an artifact has its own): a few fixed shapes, so
# the step compiles at most this many times per step count however sessions come and go.
DEFAULT_BATCHES = (1, 2, 4)


class FrameLoop:
    """The one model loop: batches the sessions' pending frames through the engine's step."""

    def __init__(self, engine: Engine, options: ServerOptions, metrics: Metrics):
        self.engine, self.options, self.metrics = engine, options, metrics
        self.batches = engine.batches or DEFAULT_BATCHES
        self.sessions: dict[int, Session] = {}
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lsd-step")
        state = engine.init_state(min(self.batches), options.seed)
        self.rng = state.rng
        self.empty = empty_session(state)
        self.scheduler = StepScheduler(self.batches, engine.steps, options.deadline_ms)
        self.sends: set[asyncio.Task] = set()
        self.frames_done = 0

    def new_session(self, session_id: int, ws, prompt: str) -> Session:
        session = Session(session_id, ws, prompt, self._prompt_vec(prompt), self.engine.max_steps,
                          self.empty)
        self.sessions[session_id] = session
        self.metrics.sessions.set(len(self.sessions))
        return session

    def drop_session(self, session: Session) -> None:
        """Forget a session: its cache arrays go with it."""
        session.open = False
        self.sessions.pop(session.id, None)
        self.metrics.sessions.set(len(self.sessions))

    def _prompt_vec(self, prompt: str):
        vec = self.engine.encode_prompts([prompt])
        return None if vec is None else vec[0]

    def set_prompt(self, session: Session, prompt: str) -> None:
        session.prompt, session.prompt_vec = prompt, self._prompt_vec(prompt)

    async def set_prompt_async(self, session: Session, prompt: str) -> None:
        """`set_prompt` with the encoding in a worker thread: a new prompt through a neural
        encoder does not hold up the event loop (and every other session) meanwhile."""
        vec = await asyncio.to_thread(self._prompt_vec, prompt)
        session.prompt, session.prompt_vec = prompt, vec

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
        """Forever: wait for frames, step every group, send the outputs."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            if self.options.gather_ms > 0 and any(s.pending is None
                                                  for s in self.sessions.values()):
                await asyncio.sleep(self.options.gather_ms / 1e3)
            self.wake.clear()
            taken = [s for s in self.sessions.values() if s.pending is not None]
            for session in taken:
                if session.reset_requested:
                    session.cache = session.cache.reset()
                    session.reset_requested = False
            for requested, chunk in self.scheduler.groups(taken, steps_of=lambda s: s.steps):
                try:
                    await self._step_group(loop, chunk, requested)
                except Exception as err:  # a failed step must not end the loop for everyone
                    logging.getLogger("lsd.serve").exception("step failed")
                    for session in chunk:
                        self._spawn(session.send(error_message(
                            "internal", f"the step failed on this frame: {err}")))

    async def _step_group(self, loop, group: list[Session], requested: int) -> None:
        jobs = [(s, *s.pending) for s in group]
        for s in group:
            s.pending = None
        batch = self.scheduler.batch_for(len(group))
        waited_s = time.perf_counter() - min(arrival for *_, arrival in jobs)
        steps = self.scheduler.choose_steps(batch, requested, waited_s)
        rows = [s.cache for s in group] + [self.empty] * (batch - len(group))
        frames_bhwc = np.stack([frame for _, frame, _, _ in jobs]
                               + [jobs[0][1]] * (batch - len(group)))
        prompt_bp = None
        if group[0].prompt_vec is not None:
            prompt_bp = np.stack([s.prompt_vec for s in group]
                                 + [group[0].prompt_vec] * (batch - len(group)))
        new_rows, outs, step_s = await loop.run_in_executor(
            self.executor, self._run_step, rows, frames_bhwc, prompt_bp, steps, len(group))
        self._record(batch, steps, step_s)
        now = time.perf_counter()
        for (session, _, seq, arrival), cache, jpeg in zip(jobs, new_rows, outs, strict=True):
            if not session.open:
                continue
            session.cache = cache
            session.frames_out += 1
            self.frames_done += 1
            self.metrics.frames_out.inc()
            self.metrics.steps_used.labels(str(steps)).inc()
            if steps < requested:
                self.metrics.steps_reduced.inc()
            self.metrics.frame_seconds.observe(now - arrival)
            meta = {"type": "frame", "seq": seq, "steps": steps, "requested_steps": requested,
                    "batch": batch, "sessions_in_batch": len(group),
                    "latency_ms": 1e3 * (now - arrival), "step_ms": 1e3 * step_s,
                    "dropped": session.dropped, "frames_out": session.frames_out}
            self._spawn(session.send(meta, jpeg))

    def _spawn(self, coro) -> None:
        """A send that runs on its own (a slow client must not hold up the loop); the task is
        kept until done, as asyncio only holds weak references to tasks."""
        task = asyncio.create_task(coro)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    def _record(self, batch: int, steps: int, step_s: float) -> None:
        self.metrics.step_seconds.labels(str(batch), str(steps)).observe(step_s)
        self.scheduler.record(batch, steps, step_s)

    def _run_step(self, rows, frames_bhwc, prompt_bp, steps: int, real: int):
        """In the worker thread: stack, step, split; returns (rows, JPEGs, step seconds)."""
        t0 = time.perf_counter()
        state = stack_sessions(list(rows), self.rng)
        state, out_bhwc = self.engine.step(state, frames_bhwc, prompt_bp, steps)
        out_bhwc = np.asarray(jax.block_until_ready(out_bhwc))
        self.rng = state.rng
        new_rows = split_sessions(state, real)
        step_s = time.perf_counter() - t0
        return new_rows, [encode_jpeg(out_bhwc[i]) for i in range(real)], step_s
