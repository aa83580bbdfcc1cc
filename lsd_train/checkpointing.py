"""The data item of a training checkpoint: every process's own grain iterator state.

Each process reads its own rows (`lsd_train.data.make_dataset`), and a clip that fails to decode
moves only that process's position, so one position cannot resume them all. `DataStateSave` writes
this process's iterator state to `checkpoints/STEP/data/process_{i}-of-{n}.json` (every process
writes; orbax commits the step once all have); `DataStateRestore` reads this process's file back.

Checkpoints of other layouts:
- written before per-process states (`data/metadata`, process 0's position, orbax JSON): restored
  as they were, every process taking that position (with a warning when there are several).
- written by another process count: the positions of a run whose processes all stand at the same
  step boundary (`{"next_index": k}` each, nothing dropped) are converted (`k * old / new`);
  otherwise it is a `ConfigError` naming the count to resume with.
A missing file of this layout is a damaged checkpoint (`FileNotFoundError`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future

from lsd_jax.errors import ConfigError

LEGACY_FILE = "metadata"  # what `ocp.args.JsonSave` wrote, from process 0 only
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def process_file(index: int, count: int) -> str:
    """The name of process `index`'s data state in a checkpoint written by `count` processes."""
    return f"process_{index}-of-{count}.json"


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Saves and restores a JSON dict per process (see the module docstring)."""

    async def async_save(self, directory: epath.Path,
                         args: DataStateSave) -> list[future.Future]:
        text = json.dumps(args.item)  # serialised now: the iterator moves on meanwhile

        async def write() -> None:
            _write(directory, text)

        # Waits for the (possibly asynchronously created) item directory before writing.
        return [future.CommitFutureAwaitingContractedSignals(write(), name="data_state_save")]

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        _write(directory, json.dumps(args.item))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> dict:
        index, count = jax.process_index(), jax.process_count()
        own = directory / process_file(index, count)
        if own.exists():
            return json.loads(own.read_text())
        saved = {}
        for path in directory.iterdir():
            match = _PROCESS_FILE.fullmatch(path.name)
            if match:
                saved[int(match[1]), int(match[2])] = path
        if not saved:
            legacy = directory / LEGACY_FILE
            if not legacy.exists():
                raise FileNotFoundError(f"{directory} holds no data state")
            if count > 1:
                warnings.warn(f"{directory} was written before per-process data states: every "
                              "process resumes from process 0's data position (exact unless "
                              "a clip failed to decode)", stacklevel=2)
            return json.loads(legacy.read_text())
        old = {c for _, c in saved}
        if count in old or len(old) > 1:
            raise FileNotFoundError(f"{directory} lacks {own.name}")
        (old,) = old
        if len(saved) != old:
            raise FileNotFoundError(f"{directory} lacks some of the {old} process files")
        states = [json.loads(saved[i, old].read_text()) for i in range(old)]
        converted = _convert(states, count)
        if converted is None:
            raise ConfigError(f"{directory} holds the data positions of {old} processes, which "
                              f"differ (a clip was dropped on some): resume it with {old} "
                              f"processes, not {count}")
        return converted

    def metadata(self, directory: epath.Path) -> None:
        return None


def _write(directory: epath.Path, text: str) -> None:
    (directory / process_file(jax.process_index(), jax.process_count())).write_text(text)


def _convert(states: list[Any], count: int) -> dict | None:
    """The position of each of `count` processes when the saving processes all stand at the same
    global step (element k of process p is global `(k // b) * B + p * b + k % b`, `b = B / n`);
    None when they do not."""
    first, old = states[0], len(states)
    if not (isinstance(first, dict) and first.keys() == {"next_index"}
            and isinstance(first["next_index"], int)) or any(s != first for s in states):
        return None
    position = first["next_index"] * old
    return {"next_index": position // count} if position % count == 0 else None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    """This process's iterator state (a JSON-able dict)."""

    item: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    """Restores this process's iterator state."""
