"""Ablation grids: init specs x methods x seeds, with prerequisites, summaries, features and a verdict.

``run_ablation(AblationConfig(config="grid.toml", out="DIR"))`` is what ``probe train ablation``
calls. A grid is a TOML file (or the name of a shipped one: ``paper``, ``quick``; see
``train/ablation/grids/``)::

    teacher = "@teacher"                 # a model path, or "@NAME" of a [prereq.NAME] built here
    data = "digits"                      # real data for the students (optional; default: the teacher's)
    methods = ["diffratio-js"]
    seeds = [0, 1, 2]
    features = false                     # also extract features and compute CKA / probes
    reference_steps = 18                 # Heun steps of the teacher's own quality figure (0 = skip)

    [student]                            # StudentConfig fields shared by every run (train/student/loop.py)
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

Groups (used by analysis/verdict.py): teacher, random, features (teacher features without its I/O
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
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


from probe.core.errors import UserError
from train.initspec import validate_init_spec

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
        return Path(str(resources.files("train.ablation") / "grids" / f"{config}.toml"))
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

    from probe.core.data import load_dataset
    from probe.core.models import build_unet, load_model

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
    from train.student.methods import get_method
    from train.student.loop import StudentConfig, validate

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
    if grid.features:  # [extract] is used only after every student is trained: check it now
        from probe.features.extract import ExtractConfig

        e = grid.extract
        if not all(isinstance(e[k], list | tuple) for k in ("sigmas", "layers")) or not isinstance(e["probes"], bool):
            raise UserError("[extract] sigmas and layers must be lists and probes true or false")
        ExtractConfig(model="", out="", layers=tuple(e["layers"]), sigmas=tuple(e["sigmas"]), split=e["split"],
                      n_samples=e["n_samples"], noise_seed=e["noise_seed"], batch=e["batch"])
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
