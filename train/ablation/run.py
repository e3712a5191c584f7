"""Running a grid: prerequisites first, then every init x method x seed arm, each a resumable student run.

Finished runs are skipped and half-finished ones resumed, so the same command continues a grid that
was stopped. The grid file itself is parsed and checked by ``train.ablation.grid``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from probe.core.errors import UserError
from probe.core.locks import exclusive
from probe.core.runs import pick_device, run_status, write_json
from train.ablation.grid import (RESERVED_STUDENT, AblationConfig, Grid, InitEntry, _coerce, _prereq_config,
                                 check_grid, load_grid, prereq_order)
from train.initspec import CATEGORIES, resolve_refs

# ------------------------------------------------------------------------------- running
def run_name(init: str, method: str, seed: int) -> str:
    return f"{init}__{method}__s{seed}"


def teacher_path(grid: Grid, refs: dict) -> str:
    return str(refs[grid.teacher[1:]]) if grid.teacher.startswith("@") else grid.teacher


def student_config(grid: Grid, entry: InitEntry, method: str, seed: int, out: Path, refs: dict):
    from train.student.loop import StudentConfig

    kwargs = _coerce(StudentConfig, grid.student, "[student]", reserved=RESERVED_STUDENT)
    return StudentConfig(out=str(out / "runs" / run_name(entry.label, method, seed)), teacher=teacher_path(grid, refs),
                         method=method, init=resolve_refs(entry.spec, {k: str(v) for k, v in refs.items()}),
                         data=grid.data, seed=seed, **kwargs)


def student_status(run_dir: Path, steps: int) -> str:
    """"done", "partial" (started) or "missing": the one rule, ``probe.core.runs.run_status``."""
    return run_status(run_dir, steps)


def init_sources(run_dir: Path) -> dict:
    """Fraction of parameters per source, from the report the student stored with its model."""
    p = Path(run_dir) / "model.json"
    if p.exists():
        report = json.loads(p.read_text()).get("init")
        if isinstance(report, dict) and "categories" in report:
            return {f"init_frac_{k}": report["categories"].get(k, 0.0) for k in CATEGORIES}
    return {f"init_frac_{k}": np.nan for k in CATEGORIES}


def build_prereqs(grid: Grid, out: Path, refs: dict, progress: bool, log) -> None:
    """Train the grid's prerequisites that are not finished yet (resuming started ones)."""
    from train.regress import regress_generator
    from train.teacher import train_teacher

    for name in prereq_order(grid.prereqs, grid.external):
        kind, cfg = _prereq_config(name, grid.prereqs[name], out, refs)
        run_dir = Path(cfg.out)
        if run_status(run_dir, cfg.steps) == "done":
            log(f"prerequisite {name}: finished, skipped")
            continue
        resume = (run_dir / "config.json").exists()
        log(f"prerequisite {name}: {'resuming' if resume else 'training'} ({kind})")
        (train_teacher if kind == "teacher" else regress_generator)(cfg, resume=resume, progress=progress)


def reference_figure(grid: Grid, out: Path, refs: dict, progress: bool) -> dict | None:
    """The teacher's own sample quality with the students' evaluator settings (cached in reference.json)."""
    from probe.quality.evaluate import EvalConfig, evaluate_model
    from probe.core.models import load_model
    from train.student.loop import StudentConfig

    if grid.reference_steps <= 0:
        return None
    defaults = StudentConfig(out="", teacher="")
    n = int(grid.student.get("eval_samples", defaults.eval_samples))
    seed = int(grid.student.get("eval_seed", defaults.eval_seed))
    device = str(pick_device(grid.student.get("device", "auto")))
    cfg = EvalConfig(model=teacher_path(grid, refs), data=grid.data, n_samples=n, steps=grid.reference_steps,
                     seed=seed, device=device)
    path = out / "reference.json"
    key = {"model": cfg.model, "sha256": load_model(cfg.model).sha256(), "n_samples": n, "steps": cfg.steps,
           "seed": seed, "data": grid.data}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    result, _ = evaluate_model(cfg, progress=progress)
    result = {**result, "key": key}
    write_json(path, result)
    return result


def run_grid(cfg: AblationConfig, progress: bool = True, train_fn=None, after_run=None) -> tuple[Path, Grid, dict]:
    """Train (or resume) every prerequisite and arm of a grid; returns (directory, grid, prerequisite refs).

    Analysing the finished arms (tables, features, verdict) is ``analysis.ablation_summary``'s job;
    ``probe.pipeline.run_ablation`` runs both.

    progress  : progress bars and one line per run                                       (default True)
    train_fn  : ``f(StudentConfig, resume: bool, progress: bool) -> run dir``; default
                ``train.student.loop.train_student`` (tests inject a wrapper)                 (default None)
    after_run : ``f(out, grid, refs)`` called after each arm, e.g. to refresh the summary  (default None)
    """
    from rich.console import Console

    if train_fn is None:
        from train.student.loop import train_student

        def train_fn(c, resume, progress):
            return train_student(c, resume=resume, progress=progress)

    console = Console(stderr=True, quiet=not progress)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    out = Path(cfg.out)
    grid = load_grid(cfg.config, cfg)
    refs = check_grid(grid, out)
    with exclusive(out, "ablation grid"):
        return _run_locked(cfg, out, grid, refs, progress, train_fn, after_run, log)


def _run_locked(cfg: AblationConfig, out: Path, grid: Grid, refs: dict, progress: bool, train_fn, after_run,
                log) -> tuple[Path, Grid, dict]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"config": dataclasses.asdict(cfg), "grid": dataclasses.asdict(grid)})
    build_prereqs(grid, out, refs, progress, log)
    reference_figure(grid, out, refs, progress)
    plan = [(e, m, s) for e in grid.inits for m in grid.methods for s in grid.seeds]
    for i, (entry, method, seed) in enumerate(plan, start=1):
        scfg = student_config(grid, entry, method, seed, out, refs)
        name = Path(scfg.out).name
        status = student_status(Path(scfg.out), scfg.steps)
        if status == "done":
            log(f"[{i}/{len(plan)}] {name}: finished, skipped")
            continue
        log(f"[{i}/{len(plan)}] {name}: {'resuming' if status == 'partial' else 'training'} (init {entry.spec!r})")
        try:
            train_fn(scfg, status == "partial", progress)
        except UserError as e:  # keeps the class: a diverged arm still exits with code 3
            raise type(e)(f"run {name}: {e}") from None
        fractions = init_sources(Path(scfg.out))
        log("    parameters from: " + ", ".join(f"{k[len('init_frac_'):]} {v:.1%}" for k, v in fractions.items()
                                                 if np.isfinite(v) and v > 0))
        if after_run is not None:
            after_run(out, grid, refs)
    return out, grid, refs
