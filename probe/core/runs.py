"""Run directories: config, metrics log, checkpoints with exact resume, a content manifest, "finished".

A run directory holds ``config.json`` (the dataclass config, plus versions and git revision),
``metrics.jsonl`` (one JSON object per logged row), ``state.pt`` (everything needed to resume
bit-exactly: weights, optimiser, EMA, step, RNG states, the number of metrics rows), the model as
``model.json`` + ``unet/``, and ``manifest.json``: the sha256 and size of every checkpoint and
weights file, and, written last by every training command, the ``finished`` marker.

Reliability rules (docs/reliability.md):

- Every file is written atomically: a temporary file beside it, fsync, rename, fsync of the
  directory. A kill leaves the old file or the new one, never half of one. ``metrics.jsonl`` is
  appended one line per ``write`` call (a kill cannot cut a line) and truncated on resume to the
  rows the checkpoint had.
- The manifest says which content each file must have. Before a file is renamed into place its
  new digest is added to the manifest beside the old one ("pending"); after the rename only the
  new one is kept ("commit"). A kill at any point leaves a file that matches its entry, so a
  mismatch on load means damage, never an interrupted write: ``verify_files`` refuses it with a
  one-line ``UserError`` naming the file.
- ``start_run`` loads and checks everything a resume needs (config, state, metrics) before the
  run directory is changed at all (config.json included), and prints what it kept.
- ``run_status`` is the one rule for "is this run finished?": the ``finished`` marker of its
  manifest, with at least the steps asked for.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, cast

import torch

from probe.core.errors import UserError
from probe.core.nonfinite import NonFiniteGuard

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
TMP_SUFFIX = ".tmp"


# ------------------------------------------------------------------------------ test hooks
_TRACE_ENV = "ONESTEP_PROBE_TEST_TRACE"   # a file: every test point reached is appended to it
_PAUSE_ENV = "ONESTEP_PROBE_TEST_PAUSE"   # "<point>@<n>": stop (sleep until killed) the n-th time <point> is reached
_seen: dict[str, int] = {}


def test_point(point: str) -> None:
    """Where the kill battery (tests/test_reliability_kill.py) may stop this process; a no-op unless
    ``ONESTEP_PROBE_TEST_TRACE`` is set. Points: ``step:<n>`` after a training step, and
    ``write:<file>:<phase>`` inside every atomic write (tmp written / manifest pending / renamed)."""
    trace = os.environ.get(_TRACE_ENV)
    if not trace:
        return
    _seen[point] = _seen.get(point, 0) + 1
    with open(trace, "a") as f:
        f.write(point + "\n")
    target, _, n = os.environ.get(_PAUSE_ENV, "").rpartition("@")
    if target == point and n.isdigit() and _seen[point] == int(n):
        with open(trace, "a") as f:
            f.write(f"paused {point}\n")
        while True:  # the test kills us here
            time.sleep(60)


# ------------------------------------------------------------------------------ atomic writes
def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write ``data`` to ``fd`` completely (the one place file content is written; tests make it fail)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, err: OSError) -> UserError:
    reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return UserError(f"cannot write {path}: {reason}; the previous version of it is kept")


def _write_synced(tmp: Path, data: bytes) -> None:
    """Write ``data`` to ``tmp`` and fsync it: the first half of every atomic replace here."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes, manifest: Path | None = None) -> None:
    """Replace ``path`` by ``data`` atomically; with ``manifest`` (a directory above ``path``) its
    digest is recorded in that directory's manifest.json. A failed write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, data)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from None
    digest = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _install(tmp, path, digest, manifest)


def install_file(src, path, manifest: Path | None = None) -> None:
    """Move a file another library wrote (e.g. safetensors weights in a staging directory) to
    ``path`` atomically (fsync, rename), recording its digest in ``manifest``'s manifest.json."""
    src, path = Path(src), Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        os.replace(src, tmp)  # same file system: the staging directory lives in the run directory
    except OSError as err:
        raise _write_error(path, err) from None
    _install(tmp, path, file_digest(tmp), manifest)


def _install(tmp: Path, path: Path, digest: dict, manifest: Path | None) -> None:
    rel = _relative(path, manifest) if manifest is not None else None
    test_point(f"write:{rel or path.name}:tmp")
    try:
        if manifest is not None and rel is not None:
            _record(manifest, rel, digest, pending=True)
            test_point(f"write:{rel}:pending")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        test_point(f"write:{rel or path.name}:renamed")
        if manifest is not None and rel is not None:
            _record(manifest, rel, digest, pending=False)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(path, obj, manifest: Path | None = None) -> None:
    """Atomic JSON file (indent 2); see ``atomic_write_bytes``."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode(), manifest)


class _HashingWriter:
    """A write-only file for ``torch.save``: hashes the bytes and writes them to ``fd`` (``_write_all``)."""

    def __init__(self, fd: int):
        self.fd, self.sha256, self.size = fd, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is not None:  # torch's writer still writes its closing records after a failure
            raise self.error
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += view.nbytes
        try:
            _write_all(self.fd, view)
        except OSError as err:
            self.error = err
            raise
        return view.nbytes

    def flush(self) -> None:
        pass  # unbuffered: every write goes straight to the file


def atomic_torch_save(path, obj, manifest: Path | None = None) -> None:
    """``torch.save`` made atomic and recorded, like ``atomic_write_bytes``. It streams to the
    temporary file and hashes on the way: serialising in memory first held a second copy of every
    weight and optimiser state (0.6-0.9 GiB at the ``cifar`` preset: the run's peak)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writer = _HashingWriter(fd)
            torch.save(obj, cast(IO[bytes], writer))  # torch needs only write() and flush()
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from None
    except BaseException:  # e.g. an object that cannot be pickled: leave no temporary file
        _remove(tmp)
        raise
    _install(tmp, path, {"sha256": writer.sha256.hexdigest(), "size": writer.size}, manifest)


# ------------------------------------------------------------------------------ the manifest
def file_digest(path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside {root}") from None


def read_manifest(root) -> dict | None:
    """The manifest of directory ``root`` ({"files": {rel: [digest, ...]}, "finished": ...}), or None."""
    p = Path(root) / MANIFEST_FILE
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
        if not isinstance(m, dict) or not isinstance(m.get("files", {}), dict):
            raise ValueError("not a manifest object")
        return m
    except (OSError, ValueError) as err:
        raise UserError(f"{p} is damaged ({type(err).__name__}: {str(err)[:120]}); "
                        "it records the content of the run's checkpoints, so they cannot be trusted") from None


def _write_manifest(root: Path, m: dict) -> None:
    data = json.dumps(m, indent=2, sort_keys=True).encode()
    p = Path(root) / MANIFEST_FILE
    tmp = p.with_name(p.name + TMP_SUFFIX)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except OSError as err:
        _remove(tmp)
        raise _write_error(p, err) from None


def _record(root: Path, rel: str, digest: dict, pending: bool) -> None:
    m = read_manifest(root) or {"format": 1, "files": {}}
    old = m["files"].get(rel, [])
    # pending: the new content is accepted beside every version that may still be on disk
    m["files"][rel] = [digest] + [d for d in old if d != digest] if pending else [digest]
    _write_manifest(root, m)


def verify_files(root, names=None, _retry: bool = True) -> None:
    """Check files of ``root`` against its manifest; a one-line UserError names the first mismatch.

    names : relative paths to check (default: every recorded file). A file the manifest does not
            record (written before this toolkit kept manifests, or by hand), and any file of a
            directory without a manifest (a diffusers model), is not checked.
    """
    root = Path(root)
    m = read_manifest(root)
    if m is None:
        return
    files = m.get("files", {})
    for rel in (names if names is not None else sorted(files)):
        p = root / rel
        if not p.exists():
            if rel in files:
                raise UserError(f"{p} is missing but {root / MANIFEST_FILE} records it; the run is incomplete")
            continue
        if rel not in files:
            continue
        actual = file_digest(p)
        if actual not in files[rel]:
            if _retry:  # a writer may have replaced the file between our two reads: look again once
                return verify_files(root, names, _retry=False)
            want = files[rel][0]
            what = (f"size {actual['size']} bytes, recorded {want['size']}" if actual["size"] != want["size"]
                    else "same size but different content (sha256 mismatch)")
            raise UserError(f"{p} is damaged: {what} in {root / MANIFEST_FILE}; restore it or start a new run")


def _verified_bytes(root: Path, rel: str) -> bytes:
    """A file's bytes, checked against the manifest in the same read (no second reading)."""
    p = root / rel
    data = p.read_bytes()
    m = read_manifest(root)
    files = (m or {}).get("files", {})
    if rel in files:
        digest = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if digest not in files[rel]:
            want = files[rel][0]
            what = (f"size {digest['size']} bytes, recorded {want['size']}" if digest["size"] != want["size"]
                    else "same size but different content (sha256 mismatch)")
            raise UserError(f"{p} is damaged: {what} in {root / MANIFEST_FILE}; restore it or start a new run")
    return data


# ------------------------------------------------------------------------------ finished runs
def mark_finished(run_dir, steps: int, **info) -> None:
    """Written last by every training command: the run is complete up to ``steps``; ``info`` (JSON
    values; None ones are left out) is recorded with the marker, e.g. where a run stopped early."""
    m = read_manifest(run_dir) or {"format": 1, "files": {}}
    m["finished"] = {"steps": int(steps), **{k: v for k, v in info.items() if v is not None}}
    _write_manifest(Path(run_dir), m)


def run_status(run_dir, steps: int | None = None) -> str:
    """The one "is this run finished?" rule: "done" (finished marker, with >= ``steps`` when given),
    "partial" (started: config.json written) or "missing"."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    finished = (m or {}).get("finished")
    if isinstance(finished, dict) and (steps is None or int(finished.get("steps", -1)) >= steps):
        return "done"
    return "partial" if (run_dir / CONFIG_FILE).exists() or (run_dir / STATE_FILE).exists() else "missing"


# ------------------------------------------------------------------------------ versions
def versions() -> dict:
    import diffusers
    import numpy

    from probe import __version__

    return {"onestep_probe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__, "git": git_revision()}


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ------------------------------------------------------------------------------ starting a run
def read_config(run_dir) -> dict:
    """The ``config`` of a run's config.json, checked against the manifest; UserError if damaged."""
    run_dir = Path(run_dir)
    p = run_dir / CONFIG_FILE
    try:
        record = json.loads(_verified_bytes(run_dir, CONFIG_FILE))
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError("no 'config' object")
        return record["config"]
    except (OSError, ValueError) as err:
        raise UserError(f"{p} is damaged ({type(err).__name__}: {str(err)[:120]}); "
                        "restore it or start a new run") from None


def start_run(out, config, resume: bool, state_keys: tuple = ()) -> tuple[Path, dict | None]:
    """Check, then open, a run directory; returns (out, the checkpoint to resume from or None).

    Everything a resume needs is loaded and checked first (config.json against ``config``, state.pt
    against the manifest and for ``state_keys``, metrics.jsonl line by line); only then is the
    directory changed: stale temporary files removed, the finished marker cleared, config.json
    written. A new run refuses a directory that already holds one.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    cfg = _jsonable(dataclasses.asdict(config))
    state = None
    if not resume:
        if (out / STATE_FILE).exists() or (out / "model.json").exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    else:
        if (out / CONFIG_FILE).exists():
            old = read_config(out)
            # steps may grow on resume; a run directory may have been moved (out); a field missing from
            # an older run's config took its default then
            changed = sorted(k for k in cfg if k not in ("steps", "resume", "out") and k in old and old[k] != cfg[k])
            if changed:
                raise UserError(f"--resume with a different config ({', '.join(changed)}) than the run in {out}")
        state = load_state(out, state_keys)
        read_metrics(out)  # refuses a damaged log before anything is written
    # ---- from here on the run directory changes
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err.strerror or err}") from None
    _remove_stale_tmp(out)
    m = read_manifest(out)  # entries of files still on disk stay valid; they are rewritten as the run goes
    if m is not None:
        settled = _settle(out, m)
        if "finished" in settled or settled != m:
            settled.pop("finished", None)
            _write_manifest(out, settled)
    record = {"config": cfg, "versions": versions(), "argv": sys.argv,
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(out / CONFIG_FILE, record, manifest=out)
    return out, state


def _settle(root: Path, m: dict) -> dict:
    """The manifest with each pending entry (a write killed before its commit) reduced to the
    version that is on disk; an entry no version matches is kept as it is, so it still fails its check."""
    files = {}
    for rel, digests in m.get("files", {}).items():
        if len(digests) > 1 and (root / rel).exists():
            on_disk = file_digest(root / rel)
            digests = [d for d in digests if d == on_disk] or digests
        files[rel] = digests
    return {**m, "files": files}


def _remove_stale_tmp(out: Path) -> None:
    """Temporary files and staging directories a killed writer left (we hold the run's lock)."""
    for p in sorted(out.rglob(f"*{TMP_SUFFIX}"), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            _remove(p)


def announce_resume(out, state: dict | None, steps: int) -> None:
    """One line on stderr saying what a resume kept."""
    if state is None:
        print(f"resumed {out}: no checkpoint yet, starting from step 0 of {steps}", file=sys.stderr)
    else:
        print(f"resumed from step {int(state['step'])} of {steps} ({out})", file=sys.stderr)


@dataclasses.dataclass
class ResumePoint:
    """Where a training loop continues: the step, its training clock, the non-finite guard with its
    counts, and the metrics log trimmed to the checkpoint (None on ranks other than 0)."""
    step: int
    seconds: float
    guard: NonFiniteGuard
    log: MetricsLog | None


def resume_point(out: Path, state: dict | None, resume: bool, steps: int, max_nonfinite: int,
                 main: bool = True) -> ResumePoint:
    """The part of a resume every loop shares, after it has put its own networks back.

    state : the checkpoint ``start_run`` returned (None: a new run, or a resume before any checkpoint)
    main  : this process is rank 0, the one that prints and writes the log           (default True)
    """
    if resume and main:
        announce_resume(out, state, steps)
    log = None
    if main:
        log = MetricsLog(out / "metrics.jsonl", resume_step=int(state["step"]) if state is not None else None,
                         resume_rows=state.get("metrics_rows") if state is not None else None)
    if state is None:
        return ResumePoint(0, 0.0, NonFiniteGuard(max_nonfinite), log)
    return ResumePoint(int(state["step"]), float(state.get("seconds", 0.0)),
                       NonFiniteGuard(max_nonfinite, state.get("guard")), log)


# ------------------------------------------------------------------------------ metrics
class MetricsLog:
    """Append-only ``metrics.jsonl``: one line per ``write`` call, so a kill never leaves half a row.

    resume_rows : rows to keep from an existing log (the count a checkpoint recorded); None starts
                  a new log                                                          (default None)
    resume_step : for checkpoints without a row count: keep the rows up to this step (default None)
    """

    def __init__(self, path: Path, resume_step: int | None = None, resume_rows: int | None = None):
        self.path = Path(path)
        rows = read_metrics(self.path.parent, self.path.name)
        if resume_rows is not None:
            keep = rows[:resume_rows]
        elif resume_step is not None:
            keep = [r for r in rows if r.get("step", 0) <= resume_step]
        else:
            keep = []
        if keep != rows or (resume_rows is None and resume_step is None and self.path.exists()):
            if keep:
                atomic_write_bytes(self.path, "".join(self._line(r) for r in keep).encode())
            else:
                _remove(self.path)
        self.rows = len(keep)
        self.kept = keep  # the rows carried over from before a resume (loops read their history here)

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps(row, default=float) + "\n"

    def log(self, **row) -> None:
        data = self._line(row).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise _write_error(self.path, err) from None
        self.rows += 1


def read_metrics(run_dir, name: str = METRICS_FILE) -> list[dict]:
    """Every row of a run's metrics log; a line that is not a JSON object is a one-line UserError."""
    p = Path(run_dir) / name
    if not p.exists():
        return []
    rows = []
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p} is damaged: cannot read it ({type(err).__name__})") from None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            raise UserError(f"{p} is damaged: line {i} is not a JSON object ({line[:40]!r})") from None
        rows.append(row)
    if text and not text.endswith("\n"):
        raise UserError(f"{p} is damaged: its last line is cut off")
    return rows


# ------------------------------------------------------------------------------ checkpoints
def save_state(run_dir: Path, state: dict) -> None:
    """Atomic, recorded ``torch.save``: a run killed while saving keeps its previous checkpoint."""
    atomic_torch_save(Path(run_dir) / STATE_FILE, state, manifest=Path(run_dir))


def load_state(run_dir: Path, keys: tuple = ()) -> dict | None:
    """The run's checkpoint (None when there is none), checked against the manifest and for ``keys``."""
    run_dir = Path(run_dir)
    p = run_dir / STATE_FILE
    if not p.exists():
        return None
    # Hashed while streaming, then loaded from the file: reading it whole first held a second copy of
    # every weight and optimiser state. The run's lock keeps writers out between the two reads, and a
    # writer only ever renames a complete, recorded checkpoint into place (atomic_torch_save).
    verify_files(run_dir, [STATE_FILE])
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged archive
        raise UserError(f"{p} is damaged: cannot read it ({type(err).__name__}: {str(err)[:120]}); "
                        "restore it or start a new run") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{p} is damaged or not this kind of run's checkpoint: missing {', '.join(missing)}")
    return state


def restore(what: str, fn, *args) -> None:
    """Call a ``load_state_dict``-like ``fn``; a checkpoint that does not fit becomes a UserError."""
    try:
        fn(*args)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"the checkpoint's {what} does not fit this run ({type(err).__name__}: "
                        f"{str(err)[:120]})") from None


def restore_training(state: dict, net, ema, opt, rng: torch.Generator) -> None:
    """Put a checkpoint written as {"net", "ema", "opt", "rng", ...} back into a single-network loop
    (``ema`` None: a loop without an EMA, whose checkpoint has no "ema")."""
    restore("network", net.load_state_dict, state["net"])
    if ema is not None:
        restore("EMA", ema.load_state_dict, state["ema"])
    restore("optimiser", opt.load_state_dict, state["opt"])
    restore("random state", rng.set_state, state["rng"])


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)
