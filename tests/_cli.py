"""Running the installed `probe` entry point in a subprocess, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe_command() -> list[str]:
    """The installed console script beside this interpreter; the module only if it is missing."""
    script = Path(sys.executable).parent / "probe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "probe.cli"]


def env(**extra) -> dict:
    """This process's environment (its classifier cache included) with this checkout imported first."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p))
    e.update(extra)
    return e


def run_probe(*args, cwd=None, timeout=600, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(probe_command() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=env(**extra_env), timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    return result
