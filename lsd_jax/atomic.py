"""Files a user keeps are replaced whole or not at all.

Every such file (an exported artifact, a model directory, a drift checkpoint, a report, a
manifest) is written under a temporary name in its own folder, flushed to disk, and renamed over
the old one; a kill at any point leaves either the old file intact or the new one complete, and
a failed write (a full disk) removes its temporary and says so in one line.

    atomic_write_bytes(path, data)      atomic_write_text(path, text)
    with atomic_path(path) as tmp: ...  # write a file or a whole directory at tmp
    replace_path(tmp, path)             # the last step alone, for a temporary named elsewhere

A temporary folder is named `.NAME.tmp-HOST-PID-XXXX`; one left by a killed process of this host
is removed the next time the same path is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from lsd_jax.errors import WriteError

__all__ = ["WriteError", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "describe_os_error", "replace_path", "storage_os_error"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
    else:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system
    does not offer it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _replace_directory(new: Path, path: Path) -> None:
    """`new` takes the place of the directory `path`: swapped in one step where the system can
    (the old directory then sits at `new`'s name and goes with the temporary folder), else moved
    aside and replaced (a kill between the two renames leaves the old one at `.NAME.old-PID`)."""
    if _exchange(new, path):
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def describe_os_error(err: OSError, path: str | Path) -> str:
    """`no space left on device writing PATH` and the like: one line, no traceback."""
    reason = "no space left on device" if err.errno == errno.ENOSPC else (
        err.strerror or str(err)).lower()
    return f"{reason} writing {str(path)!r}"


def replace_path(new: str | Path, path: str | Path) -> None:
    """Flush `new` (a file or a directory tree) to disk and put it in the place of `path` in one
    step (a directory `path` is swapped, see `_replace_directory`); `OSError` as it comes."""
    new, path = Path(new), Path(path)
    _fsync_tree(new)
    if path.is_dir() and not path.is_symlink():
        if not new.is_dir():  # a file never takes a directory's place
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        _replace_directory(new, path)
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporaries of `path` that killed processes of this host left behind."""
    prefix = _tmp_prefix(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_os_error(err: BaseException, path: str | Path) -> OSError | None:
    """The `OSError` behind a storage library's failure that reports one (orbax and tensorstore:
    `No space left on device [os_error_code='28']` in a `ValueError`), naming `path`; the error
    itself when it is an `OSError`; None for any other error."""
    if isinstance(err, OSError):
        return err
    found = _OS_ERROR_CODE.search(str(err))
    if found is not None:
        code = int(found[1])
    elif "No space left on device" in str(err):
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on a clean exit it replaces `path` (a file or a
    directory); on any error it is removed and `path` is left as it was. An `OSError` while
    writing becomes a `WriteError` naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(path)}{os.getpid()}-", suffix=".tmp",
                                    dir=path.parent))
    except OSError as err:
        raise WriteError(describe_os_error(err, path)) from None
    target = tmp / path.name  # inside a private folder: nobody else writes there
    try:
        yield target
        replace_path(target, path)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise WriteError(describe_os_error(err, path)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
