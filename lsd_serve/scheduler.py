"""The frame loop's decisions, apart from the network and the model: which sessions share a step,
at which batch size, with how many denoising steps.

    scheduler = StepScheduler(batches=(1, 2, 4), step_choices=(1, 2, 3), deadline_ms=40)
    for requested, group in scheduler.groups(sessions, steps_of=lambda s: s.steps):
        batch = scheduler.batch_for(len(group))
        steps = scheduler.choose_steps(batch, requested, waited_s)
        ...                                     # run the step
        scheduler.record(batch, steps, seconds)

Sessions asking for the same step count run together, in chunks of the largest batch size, each
chunk padded to the smallest batch size that holds it (a few fixed shapes: the step compiles at
most once per (batch, steps)). With a deadline, a group gets the most steps (up to the requested
count) whose estimated time still fits what is left of the deadline after the frame waited; a
(batch, steps) never timed is estimated from another step count of that batch (cost ~ steps + 1
passes). The first time of each (batch, steps) includes its compile and is not an estimate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable


class StepScheduler:
    def __init__(self, batches: Iterable[int], step_choices: Iterable[int],
                 deadline_ms: float | None = None, ema: float = 0.2):
        self.batches = tuple(sorted(batches))
        self.step_choices = tuple(sorted(step_choices))
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches={self.batches}, expected positive batch sizes")
        if not self.step_choices or min(self.step_choices) < 1:
            raise ValueError(f"step_choices={self.step_choices}, expected positive step counts")
        self.deadline_ms = deadline_ms
        self.ema = ema
        self.step_s: dict[tuple[int, int], float] = {}  # (batch, steps) -> EMA of step seconds
        self.compiled: set[tuple[int, int]] = set()

    @property
    def largest(self) -> int:
        return self.batches[-1]

    def batch_for(self, n: int) -> int:
        """The smallest batch size that holds `n` streams."""
        fits = [b for b in self.batches if b >= n]
        if n < 1 or not fits:
            raise ValueError(f"{n} streams, expected 1..{self.largest} (batch sizes "
                             f"{list(self.batches)})")
        return fits[0]

    def groups(self, items: Iterable, steps_of: Callable[[object], int]) -> list[tuple[int, list]]:
        """`(requested steps, items)` chunks: items asking for the same step count together, at
        most `largest` per chunk, in order of step count and then of arrival."""
        out = []
        ordered = sorted(items, key=steps_of)  # stable: arrival order within a step count
        for requested, group in itertools.groupby(ordered, key=steps_of):
            group = list(group)
            out += [(requested, group[i : i + self.largest])
                    for i in range(0, len(group), self.largest)]
        return out

    def precompile_plan(self) -> list[tuple[int, int, int]]:
        """Every `(batch, real streams, steps)` a server can run: each batch size with each
        number of streams that pads to it, for each step count."""
        plan = []
        for batch in self.batches:
            smaller = max([b for b in self.batches if b < batch], default=0)
            plan += [(batch, real, steps) for real in range(smaller + 1, batch + 1)
                     for steps in self.step_choices]
        return plan

    def record(self, batch: int, steps: int, step_s: float) -> None:
        """A measured step time; the first of each (batch, steps) holds its compile: not kept."""
        if (batch, steps) not in self.compiled:
            self.compiled.add((batch, steps))
            return
        old = self.step_s.get((batch, steps))
        self.step_s[(batch, steps)] = step_s if old is None else (
            (1 - self.ema) * old + self.ema * step_s)

    def estimate_s(self, batch: int, steps: int) -> float | None:
        """Measured step time, or one scaled from another step count of the batch; None if none."""
        if (batch, steps) in self.step_s:
            return self.step_s[(batch, steps)]
        known = [(k, s) for (b, k), s in self.step_s.items() if b == batch]
        if not known:
            return None
        k, s = max(known)
        return s * (steps + 1) / (k + 1)

    def choose_steps(self, batch: int, requested: int, waited_s: float) -> int:
        """The most steps <= `requested` whose estimated time fits the deadline left (the fewest
        when none fits; `requested` when there is no deadline)."""
        if self.deadline_ms is None:
            return requested
        left_s = self.deadline_ms / 1e3 - waited_s
        choices = [k for k in self.step_choices if k <= requested] or [min(self.step_choices)]
        for k in sorted(choices, reverse=True):
            estimate = self.estimate_s(batch, k)
            if estimate is None or estimate <= left_s:
                return k
        return min(choices)
