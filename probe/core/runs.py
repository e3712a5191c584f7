"""Run directories: the config, the metrics log, versions, checkpoints with exact resume.

A run directory holds ``config.json`` (the dataclass config, plus versions and git revision),
``metrics.jsonl`` (one JSON object per logged step), ``state.pt`` (everything needed to resume
bit-exactly: weights, optimiser, EMA, step, RNG states) and the model as ``model.json`` + ``unet/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from probe.core.errors import UserError

STATE_FILE = "state.pt"


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


def prepare_run_dir(out: Path, config, resume: bool) -> Path:
    """Create ``out`` and write ``config.json``; refuse to overwrite a run unless resuming it."""
    out = Path(out)
    cfg = dataclasses.asdict(config)
    existing = out / "config.json"
    if existing.exists() and not resume:
        if (out / STATE_FILE).exists() or (out / "model.json").exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and existing.exists():
        old = json.loads(existing.read_text())["config"]
        # steps may grow on resume; a field missing from an older run's config took its default then
        changed = sorted(k for k in cfg if k not in ("steps", "resume") and k in old and old[k] != _jsonable(cfg[k]))
        if changed:
            raise UserError(f"--resume with a different config ({', '.join(changed)}) than the run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": _jsonable(cfg), "versions": versions(), "argv": sys.argv,
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(existing, record)
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def save_state(run_dir: Path, state: dict) -> None:
    """Atomic ``torch.save`` so a run killed while saving keeps its previous checkpoint."""
    tmp = Path(run_dir) / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, Path(run_dir) / STATE_FILE)


def restore_training(state: dict, net, ema, opt, rng: torch.Generator) -> None:
    """Put a checkpoint written as {"net", "ema", "opt", "rng", ...} back into a single-network loop."""
    net.load_state_dict(state["net"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    rng.set_state(state["rng"])


def load_state(run_dir: Path) -> dict | None:
    p = Path(run_dir) / STATE_FILE
    return torch.load(p, map_location="cpu", weights_only=False) if p.exists() else None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)
