"""One writer per output: ``with exclusive(out, "teacher run"):`` around everything that writes ``out``.

The lock is the ``filelock`` package's OS lock (``flock`` on Unix) on a hidden file beside the
output, ``<parent>/.<name>.lock``, so it can be taken before the output exists and never shows up
inside a run directory or next to a feature file's rows. A second process given the same output is
refused at once (no waiting) with a message naming the holder: pid, host and start time, which the
holder writes to ``<parent>/.<name>.lock.json`` after taking the lock. The kernel drops an
``flock`` when its process dies, even under ``kill -9``, so a stale lock never blocks a rerun (the
stale ``.json`` is simply overwritten).

Within one process the lock is re-entrant by path (an ablation grid, locked as a whole, may lock
it again in a helper); two processes never share it. On file systems without ``flock`` (some
network mounts) filelock falls back to a lock file whose existence is the lock: a killed process
then leaves it behind and the message says which file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from probe.core.errors import UserError

_HELD: dict[str, list] = {}   # lock path -> [FileLock, depth] for the locks this process holds


def lock_path(out) -> Path:
    """The lock file of output ``out`` (a run directory or a file): beside it, hidden."""
    out = Path(os.path.abspath(os.fspath(out)))
    return out.parent / f".{out.name}.lock"


def holder(out) -> dict | None:
    """What the current (or last) holder of ``out``'s lock wrote about itself, if readable."""
    try:
        return json.loads(Path(str(lock_path(out)) + ".json").read_text())
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (holder unknown)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('started_utc', '?')}, "
            f"{info.get('what', 'a command')})")


@contextmanager
def exclusive(out, what: str):
    """Hold the one-writer lock of ``out`` for the block; refuse at once when another process holds it.

    out  : the output a command writes: a run directory, a feature file, a report PDF
    what : what is being written, for the holder record and messages (e.g. "teacher run")
    """
    import filelock

    path = lock_path(out)
    key = str(path)
    if key in _HELD:  # this process already holds it (nested use): just count
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the directory of {out}: {err.strerror or err}") from None
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(f"{out} is being written by {_describe(holder(out))}; wait for it to finish or "
                        f"choose another output (lock file {path})") from None
    except OSError as err:
        raise UserError(f"cannot lock {out}: cannot write {path}: {err.strerror or err}") from None
    _HELD[key] = [lock, 1]
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "output": str(out),
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            Path(key + ".json").write_text(json.dumps(info))  # advisory: only read to name the holder
        except OSError:
            pass
        yield path
    finally:
        del _HELD[key]
        lock.release()
