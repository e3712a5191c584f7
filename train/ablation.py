"""Ablation grids: init specs x methods x seeds, with prerequisites, summaries, features and a verdict.

``run_ablation(AblationConfig(config="grid.toml", out="DIR"))`` is what ``probe train ablation``
calls. A grid is a TOML file (or the name of a shipped one: ``paper``, ``quick``; see
``train/ablations/``)::

    teacher = "@teacher"                 # a model path, or "@NAME" of a [prereq.NAME] built here
    data = "digits"                      # real data for the students (optional; default: the teacher's)
    methods = ["diffratio-js"]
    seeds = [0, 1, 2]
    features = false                     # also extract features and compute CKA / probes
    reference_steps = 18                 # Heun steps of the teacher's own quality figure (0 = skip)

    [student]                            # StudentConfig fields shared by every run (train/student.py)
    steps = 400
    eval_every = 50

    [inits]                              # label = spec, or label = { spec = ..., group = ... }
    full = { spec = "teacher", group = "teacher" }
    band = { spec = "from:@band_teacher", group = "no-features" }

    [prereq.band_teacher]                # kind = "teacher" (TeacherConfig fields) | "regress" (RegressConfig)
    kind = "teacher"
    sigma_range = [1.5, 4.0]

    [extract]                            # feature options when features = true
    sigmas = [0.0, 0.5, 2.5]
    n_samples = 300

Groups (used by train/verdict.py): teacher, random, features (teacher features without its I/O
mapping), no-features (controls without multi-level features), partial, other.

Everything is checked before any training: options, methods, every init spec (globs against the
teacher's architecture, "@NAME" against the prerequisites). The directory holds ``grid.json``,
``prereq/NAME/``, ``reference.json`` (the teacher scored with the students' evaluator settings),
``runs/<init>__<method>__s<seed>/`` (student run directories), ``summary.csv`` (one row per run),
``curves.csv`` (tidy: run, step, metric, value), ``aggregate.csv`` (mean, std, bootstrap CI per
init x method x metric), ``verdict.json`` / ``verdict.txt`` and, with features, ``features/*.h5``,
``cka_teacher_student.csv`` and ``probes.csv``. Running the same command again skips finished runs
and resumes half-finished ones (``train_student(..., resume=True)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from probe.errors import UserError
from train.initspec import CATEGORIES, resolve_refs, validate_init_spec
from train.runs import pick_device, read_metrics, write_json
from train.verdict import mean_ci, verdict

SHIPPED = ("paper", "quick")
GROUPS = ("teacher", "random", "features", "no-features", "partial", "other")
TOP_KEYS = {"teacher", "data", "methods", "seeds", "features", "reference_steps", "student", "inits", "prereq",
            "extract"}
RESERVED_STUDENT = {"out", "teacher", "init", "method", "seed", "data"}   # set per run by the grid
EXTRACT_KEYS = {"sigmas": (0.0, 0.5, 2.5), "n_samples": 300, "layers": (), "split": "test", "noise_seed": 0,
                "batch": 256, "probes": True}
CURVE_METRICS = ("fd", "precision", "recall", "coverage")
AGG_METRICS = ("fd_final", "fd_best", "precision_final", "recall_final", "coverage_final")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class AblationConfig:
    config: str                       # grid TOML file, or a shipped grid name: paper | quick
    out: str                          # ablation directory (created; reused to resume)
    teacher: str | None = None        # override the grid's teacher (a model path); its prereq is then not built
    steps: int | None = None          # override [student] steps
    seeds: tuple | None = None        # override the grid's seeds
    features: bool | None = None      # override the grid's features flag
    device: str | None = None         # override the device of every run ("auto" | "cpu" | "cuda")


@dataclass
class InitEntry:
    label: str                        # name used in run directories and tables
    spec: str                         # init spec as written (may hold "@NAME")
    group: str                        # one of GROUPS


@dataclass
class Grid:
    teacher: str
    methods: list
    seeds: list
    inits: list                       # [InitEntry]
    student: dict                     # StudentConfig overrides shared by all runs
    prereqs: dict                     # name -> {"kind": ..., fields}
    data: str | None = None
    features: bool = False
    extract: dict = field(default_factory=lambda: dict(EXTRACT_KEYS))
    reference_steps: int = 18
    external: dict = field(default_factory=dict)  # "@NAME" refs given as paths (a --teacher override)
    source: str = ""


# ---------------------------------------------------------------------------------- loading
def grid_path(config: str) -> Path:
    """A grid file path, or the shipped grid of that name."""
    if config in SHIPPED:
        return Path(str(resources.files("train") / "ablations" / f"{config}.toml"))
    p = Path(config)
    if not p.exists():
        raise UserError(f"grid file {config} does not exist (shipped grids: {', '.join(SHIPPED)})")
    return p


def load_grid(config: str, overrides: AblationConfig | None = None) -> Grid:
    """Parse a grid TOML file (syntax and field names only; ``check_grid`` does the rest)."""
    path = grid_path(config)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("teacher", "inits", "methods", "seeds"):
        if key not in raw:
            raise UserError(f"{path}: missing {key!r}")
    types = {"teacher": str, "data": str, "methods": list, "seeds": list, "features": bool, "reference_steps": int,
             "student": dict, "inits": dict, "prereq": dict, "extract": dict}
    for key, kind in types.items():
        if key in raw and not isinstance(raw[key], kind):
            raise UserError(f"{path}: {key!r} must be a {kind.__name__}, got {type(raw[key]).__name__}")
    if not all(isinstance(m, str) for m in raw["methods"]) or not all(isinstance(x, int) for x in raw["seeds"]):
        raise UserError(f"{path}: methods must be a list of names and seeds a list of integers")
    if not all(isinstance(v, dict) for v in raw.get("prereq", {}).values()):
        raise UserError(f"{path}: each prerequisite must be a table [prereq.NAME]")
    inits = [_init_entry(label, value, path) for label, value in raw["inits"].items()]
    if not inits or not raw["methods"]:
        raise UserError(f"{path}: [inits] and methods must not be empty")
    extract = dict(EXTRACT_KEYS)
    for k, v in raw.get("extract", {}).items():
        if k not in EXTRACT_KEYS:
            raise UserError(f"{path}: [extract] unknown key {k!r} (allowed: {', '.join(EXTRACT_KEYS)})")
        extract[k] = v
    grid = Grid(teacher=str(raw["teacher"]), methods=list(raw["methods"]), seeds=[int(s) for s in raw["seeds"]],
                inits=inits, student=dict(raw.get("student", {})), prereqs={k: dict(v) for k, v in raw.get("prereq", {}).items()},
                data=raw.get("data"), features=bool(raw.get("features", False)), extract=extract,
                reference_steps=int(raw.get("reference_steps", 18)), source=str(path))
    if overrides is not None:
        if overrides.teacher:
            if grid.teacher.startswith("@"):  # the prerequisite it named is replaced, not built
                grid.external[grid.teacher[1:]] = str(overrides.teacher)
                grid.prereqs.pop(grid.teacher[1:], None)
            grid.teacher = str(overrides.teacher)
        if overrides.steps is not None:
            grid.student["steps"] = int(overrides.steps)
        if overrides.seeds:
            grid.seeds = [int(s) for s in overrides.seeds]
        if overrides.features is not None:
            grid.features = bool(overrides.features)
        if overrides.device:
            grid.student["device"] = overrides.device
            for p in grid.prereqs.values():
                p["device"] = overrides.device
    return grid


def _init_entry(label: str, value, path: Path) -> InitEntry:
    if not _LABEL.match(label) or "__" in label:
        raise UserError(f"{path}: init label {label!r} must be letters, digits, '_', '-', '.' (no '__')")
    if isinstance(value, str):
        return InitEntry(label, value, value if value in ("teacher", "random") else "other")
    if not isinstance(value, dict) or "spec" not in value:
        raise UserError(f"{path}: [inits] {label} must be a spec string or {{ spec = ..., group = ... }}")
    extra = sorted(set(value) - {"spec", "group"})
    if extra:
        raise UserError(f"{path}: [inits] {label}: unknown key {extra[0]!r} (allowed: spec, group)")
    group = value.get("group", "other")
    if group not in GROUPS:
        raise UserError(f"{path}: [inits] {label}: unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    return InitEntry(label, str(value["spec"]), group)


# ------------------------------------------------------------------------------ checking
def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(cls, values: dict, where: str, reserved=()) -> dict:
    """TOML values -> dataclass keyword arguments (lists to tuples where the field is a tuple)."""
    fields = _fields(cls)
    out = {}
    for k, v in values.items():
        if k in reserved:
            raise UserError(f"{where}: {k!r} is set by the grid for each run; remove it")
        if k not in fields:
            raise UserError(f"{where}: unknown option {k!r} (valid: {', '.join(n for n in fields if n not in reserved)})")
        default = fields[k].default
        out[k] = tuple(v) if isinstance(v, list) and (isinstance(default, tuple) or k == "sigma_range") else v
    return out


def _refs_in(values: dict) -> list[str]:
    return [v[1:] for v in values.values() if isinstance(v, str) and v.startswith("@")]


def prereq_order(prereqs: dict, external=()) -> list[str]:
    """Prerequisites in an order where each comes after the ones it refers to ("@NAME"); names in
    ``external`` are given as paths and need no building."""
    order, state = [], {}

    def visit(name: str, chain: tuple):
        if state.get(name) == "done":
            return
        if name in chain:
            raise UserError(f"prerequisites refer to each other in a cycle: {' -> '.join(chain + (name,))}")
        for ref in _refs_in(prereqs[name]):
            if ref in external:
                continue
            if ref not in prereqs:
                raise UserError(f"[prereq.{name}] refers to '@{ref}', which is not defined")
            visit(ref, chain + (name,))
        state[name] = "done"
        order.append(name)

    for name in prereqs:
        visit(name, ())
    return order


def _prereq_config(name: str, spec: dict, out: Path, refs: dict):
    """The TeacherConfig / RegressConfig of a prerequisite, with "@NAME" resolved."""
    from train.regress import RegressConfig
    from train.teacher import TeacherConfig

    kinds = {"teacher": TeacherConfig, "regress": RegressConfig}
    kind = spec.get("kind")
    if kind not in kinds:
        raise UserError(f"[prereq.{name}] needs kind = \"teacher\" or \"regress\", got {kind!r}")
    values = {k: (str(refs[v[1:]]) if isinstance(v, str) and v.startswith("@") and v[1:] in refs else v)
              for k, v in spec.items() if k != "kind"}
    kwargs = _coerce(kinds[kind], values, f"[prereq.{name}]", reserved=("out",))
    if kind == "regress" and "teacher" not in kwargs:
        raise UserError(f"[prereq.{name}] (regress) needs teacher = a model path or \"@NAME\"")
    return kind, kinds[kind](out=str(out / "prereq" / name), **kwargs)


def _shapes(model: str, grid: Grid, seen=()) -> dict | None:
    """{tensor name: shape} of a model path or "@NAME" prerequisite, built from its preset when it is
    still to be trained; None for a path that does not exist yet."""
    import torch

    from train.data import load_dataset
    from train.models import build_unet, load_model

    if model.startswith("@") and model[1:] in grid.external:
        model = grid.external[model[1:]]
    if model.startswith("@"):
        name = model[1:]
        spec = grid.prereqs.get(name)
        if spec is None or name in seen:
            raise UserError(f"'@{name}' names no [prereq.{name}]")
        if spec.get("kind") == "regress":  # a generator with its teacher's architecture
            return _shapes(str(spec.get("teacher", "")), grid, seen + (name,))
        data = load_dataset(spec.get("data", "digits"), "train")
        with torch.random.fork_rng(devices=[]):
            unet = build_unet(data.resolution, data.channels, spec.get("preset", "tiny"))
    elif Path(model).exists():
        unet = load_model(model).unet
    else:
        return None
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def _check_same_architecture(label: str, source: str, want: dict, grid: Grid) -> None:
    have = _shapes(source, grid)
    if have is None:
        return
    for name, shape in want.items():
        if have.get(name) != shape:
            raise UserError(f"init {label!r}: {source} does not fit the teacher: tensor {name!r} is "
                            f"{have.get(name, 'missing')} there and {shape} in the teacher")


def check_grid(grid: Grid, out: Path) -> dict:
    """Validate everything before training; returns {prerequisite name: its directory}."""
    from train.methods import get_method
    from train.student import StudentConfig, validate

    refs = {**{name: out / "prereq" / name for name in grid.prereqs},
            **{name: Path(p) for name, p in grid.external.items()}}
    if grid.teacher.startswith("@") and grid.teacher[1:] not in refs:
        raise UserError(f"teacher = {grid.teacher!r} names no [prereq.{grid.teacher[1:]}]")
    for m in grid.methods:
        get_method(m)
    if not grid.seeds or any(s < 0 for s in grid.seeds) or len(set(grid.seeds)) != len(grid.seeds):
        raise UserError("seeds must be distinct non-negative integers")
    student = _coerce(StudentConfig, grid.student, "[student]", reserved=RESERVED_STUDENT)
    if int(student.get("eval_every", 0)) <= 0:
        raise UserError("[student] eval_every must be > 0: the ablation compares sample quality over training")
    for m in grid.methods:
        validate(StudentConfig(out="", teacher="", method=m, **student))
    for name in prereq_order(grid.prereqs, grid.external):
        _prereq_config(name, grid.prereqs[name], out, refs)
    if grid.teacher.startswith("@") and grid.prereqs[grid.teacher[1:]].get("kind") != "teacher":
        raise UserError(f"teacher = {grid.teacher!r} must name a prerequisite of kind \"teacher\"")
    teacher_shapes = _shapes(grid.teacher, grid)
    if teacher_shapes is None:
        raise UserError(f"teacher {grid.teacher} does not exist")
    for entry in grid.inits:
        spec = validate_init_spec(entry.spec, list(teacher_shapes), refs=refs)
        for term in spec.terms:
            if term.op == "from":  # prerequisites are checked from their presets, before any training
                _check_same_architecture(entry.label, term.path, teacher_shapes, grid)
    return refs


# ------------------------------------------------------------------------------- running
def run_name(init: str, method: str, seed: int) -> str:
    return f"{init}__{method}__s{seed}"


def teacher_path(grid: Grid, refs: dict) -> str:
    return str(refs[grid.teacher[1:]]) if grid.teacher.startswith("@") else grid.teacher


def student_config(grid: Grid, entry: InitEntry, method: str, seed: int, out: Path, refs: dict):
    from train.student import StudentConfig

    kwargs = _coerce(StudentConfig, grid.student, "[student]", reserved=RESERVED_STUDENT)
    return StudentConfig(out=str(out / "runs" / run_name(entry.label, method, seed)), teacher=teacher_path(grid, refs),
                         method=method, init=resolve_refs(entry.spec, {k: str(v) for k, v in refs.items()}),
                         data=grid.data, seed=seed, **kwargs)


def student_status(run_dir: Path, steps: int) -> str:
    """"done" (final evaluation at >= steps written), "partial" (started) or "missing"."""
    run_dir = Path(run_dir)
    ev = run_dir / "eval.json"
    if ev.exists() and json.loads(ev.read_text()).get("step", -1) >= steps:
        return "done"
    return "partial" if (run_dir / "config.json").exists() else "missing"


def _teacher_done(run_dir: Path, cfg) -> bool:
    info = run_dir / "model.json"
    if not info.exists() or not (run_dir / "samples.png").exists():
        return False
    if cfg.eval_samples > 0 and not (run_dir / "eval.json").exists():
        return False
    return json.loads(info.read_text()).get("steps", -1) >= cfg.steps


def build_prereqs(grid: Grid, out: Path, refs: dict, progress: bool, log) -> None:
    """Train the grid's prerequisites that are not finished yet (resuming started ones)."""
    from train.regress import is_finished, regress_generator
    from train.teacher import train_teacher

    for name in prereq_order(grid.prereqs, grid.external):
        kind, cfg = _prereq_config(name, grid.prereqs[name], out, refs)
        run_dir = Path(cfg.out)
        done = _teacher_done(run_dir, cfg) if kind == "teacher" else is_finished(run_dir, cfg.steps)
        if done:
            log(f"prerequisite {name}: finished, skipped")
            continue
        resume = (run_dir / "config.json").exists()
        log(f"prerequisite {name}: {'resuming' if resume else 'training'} ({kind})")
        (train_teacher if kind == "teacher" else regress_generator)(cfg, resume=resume, progress=progress)


def reference_figure(grid: Grid, out: Path, refs: dict, progress: bool) -> dict | None:
    """The teacher's own sample quality with the students' evaluator settings (cached in reference.json)."""
    from train.evaluate import EvalConfig, evaluate_model
    from train.models import load_model
    from train.student import StudentConfig

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


def run_ablation(cfg: AblationConfig, progress: bool = True, train_fn=None) -> Path:
    """Run (or resume) a grid; returns the ablation directory.

    progress : progress bars and one line per run                                        (default True)
    train_fn : ``f(StudentConfig, resume: bool, progress: bool) -> run dir``; default
               ``train.student.train_student`` (tests inject a wrapper)                  (default None)
    """
    from rich.console import Console

    if train_fn is None:
        from train.student import train_student

        def train_fn(c, resume, progress):
            return train_student(c, resume=resume, progress=progress)

    console = Console(stderr=True, quiet=not progress)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    out = Path(cfg.out)
    grid = load_grid(cfg.config, cfg)
    refs = check_grid(grid, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"config": dataclasses.asdict(cfg), "grid": dataclasses.asdict(grid)})
    build_prereqs(grid, out, refs, progress, log)
    reference = reference_figure(grid, out, refs, progress)
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
        except UserError as e:
            raise UserError(f"run {name}: {e}") from None
        fractions = _init_sources(Path(scfg.out))
        log("    parameters from: " + ", ".join(f"{k[len('init_frac_'):]} {v:.1%}" for k, v in fractions.items()
                                                 if np.isfinite(v) and v > 0))
        write_tables(out, grid, refs)
    summary = write_tables(out, grid, refs)
    if grid.features:
        run_ablation_features(out, grid, refs, summary, progress=progress)
    result = verdict(summary, reference=reference)
    write_json(out / "verdict.json", result.to_dict())
    (out / "verdict.txt").write_text(result.text() + "\n")
    log(result.text())
    return out


# -------------------------------------------------------------------------------- tables
def _eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval_fd" in r]


def _init_sources(run_dir: Path) -> dict:
    """Fraction of parameters per source, from the report the student stored with its model."""
    for p in (run_dir / "init_report.json", run_dir / "model.json"):
        if p.exists():
            info = json.loads(p.read_text())
            report = info.get("init", info) if p.name == "model.json" else info
            if isinstance(report, dict) and "categories" in report:
                return {f"init_frac_{k}": report["categories"].get(k, 0.0) for k in CATEGORIES}
    return {f"init_frac_{k}": np.nan for k in CATEGORIES}


def summarise_run(run_dir: Path, steps: int) -> tuple[dict, list[dict]]:
    """(summary row, tidy curve rows) of one student run."""
    rows = _eval_rows(run_dir)
    status = student_status(run_dir, steps)
    final = json.loads((run_dir / "eval.json").read_text()) if status == "done" else (rows[-1] if rows else {})
    get = (lambda k: final.get(k, np.nan)) if status == "done" else (lambda k: final.get(f"eval_{k}", np.nan))
    fds = [(r["step"], r["eval_fd"]) for r in rows if r.get("eval_fd") is not None and math.isfinite(r["eval_fd"])]
    best = min(fds, key=lambda t: t[1]) if fds else (np.nan, np.nan)
    row = {"status": status, "steps_done": rows[-1]["step"] if rows else 0,
           "fd_final": get("fd"), "fd_best": best[1], "fd_best_step": best[0],
           "precision_final": get("precision"), "recall_final": get("recall"), "coverage_final": get("coverage"),
           "fd_start": rows[0]["eval_fd"] if rows and rows[0]["step"] == 0 else np.nan,
           "seconds": final.get("seconds", rows[-1].get("seconds", np.nan) if rows else np.nan),
           "fd_curve": json.dumps([[s, round(v, 6)] for s, v in fds]), **_init_sources(run_dir)}
    curve = [{"step": r["step"], "metric": m, "value": r[f"eval_{m}"]} for r in rows for m in CURVE_METRICS
             if f"eval_{m}" in r]
    return row, curve


def aggregate(summary: pd.DataFrame,
              n_boot: int = 2000,   # bootstrap resamples of each mean
              seed: int = 0,        # bootstrap seed
              ) -> pd.DataFrame:
    """Tidy mean, std and bootstrap 95% CI per (init, init_group, method, metric) over finished runs."""
    done = summary[summary["status"] == "done"]
    records = []
    for (init, group, method), g in done.groupby(["init", "init_group", "method"], sort=False):
        for metric in AGG_METRICS:
            v = g[metric].to_numpy(float)
            v = v[np.isfinite(v)]
            lo, hi = mean_ci(v, n_boot, seed)
            records.append(dict(init=init, init_group=group, method=method, metric=metric, n=int(v.size),
                                mean=float(v.mean()) if v.size else np.nan,
                                std=float(v.std(ddof=1)) if v.size > 1 else np.nan, ci_low=lo, ci_high=hi))
    return pd.DataFrame.from_records(records, columns=["init", "init_group", "method", "metric", "n", "mean", "std",
                                                      "ci_low", "ci_high"])


def write_tables(out: Path, grid: Grid, refs: dict) -> pd.DataFrame:
    """summary.csv, curves.csv and aggregate.csv from the run directories; returns the summary."""
    from train.student import StudentConfig

    steps = int(grid.student.get("steps", _fields(StudentConfig)["steps"].default))
    rows, curves = [], []
    for entry in grid.inits:
        for method in grid.methods:
            for seed in grid.seeds:
                name = run_name(entry.label, method, seed)
                run_dir = out / "runs" / name
                keys = {"run": name, "init": entry.label, "init_spec": entry.spec, "init_group": entry.group,
                        "method": method, "seed": seed}
                row, curve = summarise_run(run_dir, steps)
                rows.append({**keys, **row, "run_dir": str(run_dir)})
                curves += [{**keys, **c} for c in curve]
    summary = pd.DataFrame.from_records(rows)
    summary.to_csv(out / "summary.csv", index=False)
    pd.DataFrame.from_records(curves, columns=["run", "init", "init_spec", "init_group", "method", "seed", "step",
                                               "metric", "value"]).to_csv(out / "curves.csv", index=False)
    aggregate(summary).to_csv(out / "aggregate.csv", index=False)
    return summary


# ------------------------------------------------------------------------------ features
def run_ablation_features(out: Path, grid: Grid, refs: dict, summary: pd.DataFrame, progress: bool = False) -> None:
    """Features of the teacher and of every finished student, as denoisers on the same inputs.

    Writes ``features/teacher.h5`` and ``features/<run>.h5`` (same data, sigmas and noise seed, so
    rows align), ``cka_teacher_student.csv`` (debiased linear CKA per layer and sigma, teacher vs
    student) and, when ``[extract] probes`` is true, ``probes.csv`` (linear-probe accuracy of the
    label per layer and sigma, for the teacher and each student).
    """
    from analysis.cka import cka_table
    from analysis.linear import probe_table
    from probe.extract import extract_features
    from probe.store import FeatureStore

    opts = grid.extract
    fdir = Path(out) / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    device = grid.student.get("device", "auto")
    teacher = teacher_path(grid, refs)
    data = grid.data or _dataset_of(teacher)

    def features(model, name: str) -> Path:
        args = dict(data=data, layers=tuple(opts["layers"]), sigmas=tuple(opts["sigmas"]), out=str(fdir / f"{name}.h5"),
                    progress=progress, n_samples=int(opts["n_samples"]), split=opts["split"],
                    noise_seed=int(opts["noise_seed"]), batch=int(opts["batch"]), source="denoiser", device=device)
        try:  # a finished file of the same model and options is reused, a partial one resumed
            return extract_features(model, **args)
        except UserError as e:
            # the file is this directory's own derived data: when the model was trained further or the
            # [extract] options changed, replace it instead of refusing as `probe extract` does for users
            if "holds another extraction" not in str(e):
                raise
            return extract_features(model, overwrite=True, **args)

    t_path = features(teacher, "teacher")
    cka_rows, probe_rows = [], []
    keys = ["run", "init", "init_group", "method", "seed"]
    with FeatureStore.open(t_path) as t_store:
        if opts["probes"]:
            probe_rows.append(probe_table(t_store, targets=["label"]).assign(run="teacher", init="(teacher)",
                                                                             init_group="reference", method="", seed=-1))
        for _, r in summary[summary["status"] == "done"].iterrows():
            path = features(r["run_dir"], r["run"])
            with FeatureStore.open(path) as s_store:
                table = cka_table(t_store, s_store, mode="pair", estimator="debiased", n_perm=10)
                cka_rows.append(table.rename(columns={"layer_a": "layer", "sigma_a": "sigma"})
                                [["layer", "sigma", "cka", "null_mean", "null_p95", "n_perm", "estimator", "n"]].assign(**{k: r[k] for k in keys}))
                if opts["probes"]:
                    probe_rows.append(probe_table(s_store, targets=["label"]).assign(**{k: r[k] for k in keys}))
    front = keys + ["layer", "sigma"]
    if cka_rows:
        cka = pd.concat(cka_rows, ignore_index=True)
        cka[front + [c for c in cka.columns if c not in front]].to_csv(Path(out) / "cka_teacher_student.csv", index=False)
    if probe_rows:
        probes = pd.concat(probe_rows, ignore_index=True)
        probes[front + [c for c in probes.columns if c not in front]].to_csv(Path(out) / "probes.csv", index=False)


def _dataset_of(model_path: str) -> str:
    info = Path(model_path) / "model.json"
    name = json.loads(info.read_text()).get("dataset") if info.exists() else None
    if not name:
        raise UserError(f"{model_path} does not record its data set; set data = ... in the grid")
    return name
