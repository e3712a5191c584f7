"""Helpers of the reliability battery (tests/test_reliability_*.py): real subprocesses stopped at
named points and killed with SIGKILL, in-process CLI calls, and file-by-file run comparisons.

A subprocess started with ``start(...)`` appends every test point it reaches to a trace file
(``ONESTEP_PROBE_TEST_TRACE``, see ``probe.core.runs.test_point``) and, with ``pause``, sleeps at
the n-th time it reaches that point until the test kills it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Python snippet that runs a library function like the CLI would (for options the CLI does not expose)
RUNNER = r"""
import json, sys
from probe.core.errors import UserError
kind, cfg, resume = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
try:
    if kind == "regress":
        from train.regress import RegressConfig, regress_generator
        regress_generator(RegressConfig(**cfg), resume=resume, progress=False)
    elif kind == "teacher":
        from train.teacher import TeacherConfig, train_teacher
        train_teacher(TeacherConfig(**cfg), resume=resume, progress=False)
    elif kind == "hold":
        import time
        from probe.core.locks import exclusive
        with exclusive(cfg["out"], "test holder"):
            print("held", flush=True)
            time.sleep(600)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


class Proc:
    """A subprocess of the battery with its trace file and captured stderr."""

    def __init__(self, argv: list, trace: Path, pause: str | None = None):
        self.trace = Path(trace)
        self.trace.write_text("")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "ONESTEP_PROBE_TEST_TRACE": str(self.trace)}
        env.pop("ONESTEP_PROBE_TEST_PAUSE", None)
        if pause:
            env["ONESTEP_PROBE_TEST_PAUSE"] = pause
        self.err_path = self.trace.with_suffix(".stderr")
        self._err = open(self.err_path, "w")
        self.p = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=self._err)

    def points(self) -> list[str]:
        return self.trace.read_text().splitlines()

    def wait_for(self, predicate, timeout: float = 300) -> bool:
        """Wait until ``predicate(points)`` holds (True) or the process ends (False)."""
        end = time.time() + timeout
        while time.time() < end:
            if predicate(self.points()):
                return True
            if self.p.poll() is not None:
                return predicate(self.points())
            time.sleep(0.02)
        raise TimeoutError(f"no progress in {timeout} s; stderr: {self.stderr()[-2000:]}")

    def wait_paused(self, timeout: float = 300) -> None:
        if not self.wait_for(lambda pts: any(p.startswith("paused ") for p in pts), timeout):
            raise AssertionError(f"process ended (rc {self.p.returncode}) before its pause point; "
                                 f"trace tail {self.points()[-5:]}; stderr: {self.stderr()[-2000:]}")

    def kill9(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=60)
        self._err.close()

    def finish(self, timeout: float = 600) -> int:
        rc = self.p.wait(timeout=timeout)
        self._err.close()
        return rc

    def stderr(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    def last_step(self, start: int) -> int:
        """The last training step this process completed (``start`` when none)."""
        steps = [int(p.split(":")[1]) for p in self.points() if re.fullmatch(r"(step|rows):\d+", p)]
        return max(steps, default=start)


def cli_argv(*args) -> list:
    return ["-m", "probe.cli", *map(str, args)]


def runner_argv(kind: str, cfg: dict, resume: bool) -> list:
    return ["-c", RUNNER, kind, json.dumps(cfg), "1" if resume else "0"]


def resumed_step(stderr: str) -> int | None:
    m = re.search(r"resumed from (?:step|row) (\d+) of \d+", stderr)
    if m:
        return int(m.group(1))
    return 0 if "no checkpoint yet" in stderr else None


def cli(*args) -> tuple[int, str, str]:
    """Run ``probe <args>`` in this process like the console script; returns (exit code, stdout, stderr)."""
    from probe.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["probe", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    """Assert a clean failure (the exit code, one ``error:`` line, no traceback); returns the line."""
    assert "Traceback" not in err, err
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert code == expected_code and len(errors) == 1, (code, err)
    return errors[0]


def snapshot(directory: Path) -> dict:
    """{relative path: bytes} of every file under ``directory``, except the one-writer lock files
    (``.<name>.lock`` and its holder record) that commands create beside their outputs."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith((".lock", ".lock.json")))}


# ------------------------------------------------------------------------------ comparing runs
WALL_CLOCK = {"seconds", "created_utc", "argv", "out"}   # fields that record time, the command line or the output path


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in WALL_CLOCK}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _same_object(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        a, b = {k: v for k, v in a.items() if k not in WALL_CLOCK}, {k: v for k, v in b.items() if k not in WALL_CLOCK}
        assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
        for k in a:
            _same_object(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_object(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_run(a: Path, b: Path) -> int:
    """Every file of run directory ``a`` equals the one in ``b``; returns the number of files compared.

    Byte for byte, except: state.pt is compared by content (every tensor bitwise), JSON files and
    metrics rows without wall-clock fields (seconds, created_utc, argv), and the manifest's digests
    of files that hold such fields are checked against the files instead of each other.
    """
    from probe.core.runs import verify_files

    fa, fb = snapshot(a), snapshot(b)
    assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))
    with_clock = set()
    for rel in fa:
        if rel.endswith("state.pt") or rel.endswith("pairs.pt"):
            sa = torch.load(io.BytesIO(fa[rel]), weights_only=False)
            sb = torch.load(io.BytesIO(fb[rel]), weights_only=False)
            _same_object(sa, sb, rel)
            with_clock.add(rel)
        elif rel.endswith(".jsonl"):
            ra = [_strip(json.loads(l)) for l in fa[rel].decode().splitlines()]
            rb = [_strip(json.loads(l)) for l in fb[rel].decode().splitlines()]
            assert ra == rb, rel
        elif rel.endswith("manifest.json"):
            continue  # below
        elif rel.endswith(".json"):
            ja, jb = json.loads(fa[rel]), json.loads(fb[rel])
            if _strip(ja) != ja:
                with_clock.add(rel)
            assert _strip(ja) == _strip(jb), rel
        else:
            assert fa[rel] == fb[rel], rel
    for rel in fa:
        if rel.endswith("manifest.json"):
            root = Path(rel).parent
            prefix = "" if str(root) == "." else root.as_posix() + "/"
            ma, mb = json.loads(fa[rel]), json.loads(fb[rel])
            clocked = {w[len(prefix):] for w in with_clock if w.startswith(prefix)}
            assert ma.get("finished") == mb.get("finished"), rel
            assert {k: v for k, v in ma["files"].items() if k not in clocked} == \
                   {k: v for k, v in mb["files"].items() if k not in clocked}, rel
            assert ma["files"].keys() == mb["files"].keys(), rel
            verify_files(Path(a) / root)
            verify_files(Path(b) / root)
    return len(fa)
