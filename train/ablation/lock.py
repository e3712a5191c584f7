"""One launch of a grid at a time: ``OUT/.grid.lock`` (filelock), the holder named in ``OUT/.grid.lock.json``.

A minimal local use of filelock; a shared lock helper for every run directory would replace it.
The status view takes no lock: it only reads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from probe.core.errors import UserError
from probe.core.runs import write_json


@contextmanager
def grid_lock(out: Path):
    """Hold the grid's lock for a launch; a second launch of the same grid fails at once, naming the holder."""
    from filelock import FileLock, Timeout

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".grid.lock"), timeout=0)
    holder = out / ".grid.lock.json"
    try:
        lock.acquire()
    except Timeout:
        try:
            h = json.loads(holder.read_text())
            who = f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} ({h.get('command')})"
        except (OSError, ValueError):
            who = "another process"
        raise UserError(f"grid {out} is being launched by {who}; wait for it to end, or watch it with "
                        f"probe train ablation --status {out}") from None
    try:
        write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]})
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
