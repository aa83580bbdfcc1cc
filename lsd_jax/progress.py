"""Progress of long-running commands on stderr: one helper for `lsd train`, `lsd eval` and the
others.

`progress_bar(description, total, start=0, enabled=True)` is a context manager yielding a
`Tracker` with `advance(n=1, note=None)` and `update(completed, note=None)`. On a terminal it draws
a rich bar (done/total, elapsed, ETA, the note, e.g. the loss); elsewhere (a log file, CI) it prints
one plain line per 10% of the work, and at least one a minute, with the rate, the ETA and the
note, so logs show progress too.
Disabled, it does nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time

# Off a terminal, a plain line at least this often (seconds), besides one per 10% of the work.
PLAIN_INTERVAL_S = 60.0


class Tracker:
    """Counts work done and reports it (see the module docstring)."""

    def __init__(self, description: str, total: int, start: int = 0, *, bar=None, task=None,
                 plain: bool = False):
        self.description, self.total, self.start = description, total, start
        self.completed = start
        self._bar, self._task, self._plain = bar, task, plain
        self._t0 = self._last_line = time.perf_counter()
        self._step = max(1, (total - start) // 10)
        self._next_mark = start + self._step
        self.note = ""

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.completed + n, note)

    def update(self, completed: int, note: str | None = None) -> None:
        self.completed = completed
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, note=self.note)
        elif self._plain and (completed >= self._next_mark or completed == self.total
                              or time.perf_counter() - self._last_line >= PLAIN_INTERVAL_S):
            self._last_line = time.perf_counter()
            elapsed = self._last_line - self._t0
            done = completed - self.start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - completed) / rate if rate > 0 else 0.0
            note = f", {self.note}" if self.note else ""
            print(f"{self.description}: {completed}/{self.total} "
                  f"({100 * completed / max(self.total, 1):.0f}%), {elapsed:.0f} s, "
                  f"eta {eta:.0f} s{note}", file=sys.stderr, flush=True)
            marks_done = (completed - self.start) // self._step + 1
            self._next_mark = min(self.total, self.start + marks_done * self._step)


@contextlib.contextmanager
def progress_bar(description: str, total: int, start: int = 0, enabled: bool = True):
    """A `Tracker` for `total` units of work, `start` of them already done (a resumed run)."""
    if not enabled:
        yield Tracker(description, total, start)
        return
    if not sys.stderr.isatty():
        yield Tracker(description, total, start, plain=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=Console(stderr=True), refresh_per_second=2) as bar:
        task = bar.add_task(description, total=total, completed=start, note="")
        yield Tracker(description, total, start, bar=bar, task=task)
