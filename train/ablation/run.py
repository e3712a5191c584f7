"""What one job of a grid runs, and when it counts as finished: prerequisites (teacher, regressed
generator), the metric classifier, the teacher's reference figure and every init x method x seed arm,
each a resumable unit.

Finished units are skipped and half-finished ones resumed, so the same command continues a grid that
was stopped. The grid file is parsed and checked by ``train.ablation.grid``, expanded into jobs by
``train.ablation.jobs`` and run by ``train.ablation.launch``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import pick_device, run_status, write_json
from probe.quality.classifier import classifier_entry
from probe.quality.evaluate import EvalConfig, evaluate_model
from train.ablation.grid import RESERVED_STUDENT, Grid, InitEntry, _coerce
from train.initspec import CATEGORIES, resolve_refs
from train.student.loop import StudentConfig


# ------------------------------------------------------------------------------- running
def run_name(init: str, method: str, seed: int) -> str:
    return f"{init}__{method}__s{seed}"


def teacher_path(grid: Grid, refs: dict) -> str:
    return str(refs[grid.teacher[1:]]) if grid.teacher.startswith("@") else grid.teacher


def student_config(grid: Grid, entry: InitEntry, method: str, seed: int, out: Path, refs: dict):

    kwargs = _coerce(StudentConfig, {**grid.student, **entry.student}, "[student]", reserved=RESERVED_STUDENT)
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



def reference_config(grid: Grid, out: Path, refs: dict) -> dict | None:
    """What the teacher's own quality figure is computed from (the students' evaluator settings), or
    None when the grid asks for none (``reference_steps = 0``)."""

    if grid.reference_steps <= 0:
        return None
    defaults = StudentConfig(out="", teacher="")
    return {"model": teacher_path(grid, refs), "data": grid.data,
            "n_samples": int(grid.student.get("eval_samples", defaults.eval_samples)),
            "steps": grid.reference_steps, "churn": grid.reference_churn,
            "seed": int(grid.student.get("eval_seed", defaults.eval_seed)),
            "device": grid.student.get("device", "auto"), "path": str(out / "reference.json")}


def _reference_key(c: dict) -> dict:
    # The teacher is identified by its weights' hash, not by how its path is spelled: the status view and
    # the aggregate step read paths relative to the grid's base, the job itself relative to its cwd.
    key = {"sha256": load_model(c["model"]).sha256(), "n_samples": c["n_samples"],
           "steps": c["steps"], "seed": c["seed"], "data": c["data"]}
    # churn joins the key only when used, so figures cached before the option existed stay valid
    return {**key, "churn": c["churn"]} if c.get("churn") else key


def reference_done(c: dict) -> bool:
    """Is ``reference.json`` there and computed from this teacher (same weights) and these settings?"""
    path = Path(c["path"])
    if not path.exists() or not Path(c["model"]).exists():
        return False
    return json.loads(path.read_text()).get("key") == _reference_key(c)


def compute_reference(c: dict, progress: bool) -> dict:
    """The teacher's sample quality with the students' evaluator settings (cached in reference.json)."""

    path = Path(c["path"])
    key = _reference_key(c)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    cfg = EvalConfig(model=c["model"], data=c["data"], n_samples=c["n_samples"], steps=c["steps"],
                     churn=c.get("churn", 0.0), seed=c["seed"], device=str(pick_device(c["device"])))
    result, _ = evaluate_model(cfg, progress=progress)
    result = {**result, "key": key}
    write_json(path, result)
    return result


def reference_figure(grid: Grid, out: Path, refs: dict, progress: bool) -> dict | None:
    """The teacher's own sample quality with the students' evaluator settings (cached in reference.json)."""
    c = reference_config(grid, out, refs)
    return None if c is None else compute_reference(c, progress)


# ---------------------------------------------------------------------------- job units
UNIT_KINDS = ("classifier", "teacher", "regress", "transplant", "reference", "student")


def config_from_dict(cls, values: dict):
    """A run config back from its JSON form (JSON lists become the tuples the dataclasses hold)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _at(base: Path | None, path: str) -> Path:
    # A job's paths are relative to the directory it was planned in; an absolute path stays as it is.
    return Path(path) if base is None else Path(base) / path


def unit_state(kind: str, config: dict, base: Path | None = None) -> str:
    """"done", "partial" (started, resumable) or "missing" for one job's unit; paths in ``config`` are
    read relative to ``base`` (default: the current directory)."""
    if kind == "classifier":
        _, weights_path, info_path, _ = classifier_entry(config["dataset"])
        return "done" if weights_path.exists() and info_path.exists() else "missing"
    if kind == "reference":
        c = {**config, "model": str(_at(base, config["model"])), "path": str(_at(base, config["path"]))}
        return "done" if reference_done(c) else "missing"
    if kind not in ("student", "teacher", "regress", "transplant"):
        raise ValueError(f"unknown job kind {kind!r}")
    return run_status(_at(base, config["out"]), int(config["steps"]))  # the one "finished" rule


def _say_prereq(kind: str, out: Path, say) -> None:
    """The figures a matched control is judged by, in the job's log: a target FD's outcome, a transplant's loss."""
    if kind == "regress" and (out / "regress.json").exists():
        t = json.loads((out / "regress.json").read_text()).get("target")
        if t:
            say(f"target FD {t['target_fd']:.4g} +- {t['tolerance']:.3g}: {t['status']} at step {t['stop_step']} "
                f"of {t['budget']} (FD {t['fd_reached']:.4g})")
    elif kind == "transplant" and (out / "transplant.json").exists():
        r = json.loads((out / "transplant.json").read_text())
        say(f"feature loss ({r['loss']}) {r['loss_before']:.4g} -> {r['loss_after']:.4g}; untouched: "
            f"{', '.join(r['untouched']) or 'none'}; fd {r.get('fd')}")


def run_unit(kind: str, config: dict, progress: bool = False, say=print, train_fn=None) -> None:
    """Run (or resume) one job's unit in this process, from the directory it was planned in.

    say      : ``f(message)`` for the job's log lines                                   (default print)
    train_fn : ``f(StudentConfig, resume, progress)`` for arms; default ``train_student``   (default None)
    Raises ``UserError`` when the unit returned without finishing (a stopped run: rerun to resume).
    """
    state = unit_state(kind, config)
    if state == "done":
        say("finished before, skipped")
        return
    verb = "resuming" if state == "partial" else "running"
    if kind == "classifier":
        from probe.quality.classifier import load_or_train_classifier

        say(f"{verb}: metric classifier of {config['dataset']}")
        _, info = load_or_train_classifier(config["dataset"], progress=progress)
        say(f"classifier {'loaded from cache' if info['cached'] else 'trained'}: test accuracy {info['test_accuracy']}")
    elif kind == "reference":
        say(f"{verb}: the teacher's {config['steps']}-step Heun figure on {config['n_samples']} samples")
        result = compute_reference(config, progress)
        say(f"reference fd {result.get('fd')}")
    elif kind in ("teacher", "regress", "transplant"):
        from train.regress import RegressConfig, regress_generator
        from train.teacher import TeacherConfig, train_teacher
        from train.transplant import TransplantConfig, transplant_features

        say(f"{verb}: prerequisite ({kind})")
        resume = state == "partial"
        if kind == "teacher":
            train_teacher(config_from_dict(TeacherConfig, config), resume=resume, progress=progress)
        elif kind == "regress":
            regress_generator(config_from_dict(RegressConfig, config), resume=resume, progress=progress)
        else:
            transplant_features(config_from_dict(TransplantConfig, config), resume=resume, progress=progress)
        _say_prereq(kind, Path(config["out"]), say)
    elif kind == "student":
        from train.student.loop import StudentConfig

        if train_fn is None:
            from train.student.loop import train_student as train_fn
        scfg = config_from_dict(StudentConfig, config)
        say(f"{verb} (init {scfg.init!r}, method {scfg.method}, seed {scfg.seed})")
        train_fn(scfg, state == "partial", progress)
        fractions = init_sources(Path(scfg.out))
        say("parameters from: " + ", ".join(f"{k[len('init_frac_'):]} {v:.1%}" for k, v in fractions.items()
                                            if np.isfinite(v) and v > 0))
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    if unit_state(kind, config) != "done":
        raise UserError(f"{kind} returned before it finished (stopped early); rerun the grid to resume it")
    if kind == "student":
        final = json.loads((Path(config["out"]) / "eval.json").read_text())
        say(f"finished at step {final.get('step')}: fd {final.get('fd')}")
