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
    reference_churn = 0                  # EDM's S_churn for that figure (0 = the deterministic sampler)

    [student]                            # StudentConfig fields shared by every run (train/student/loop.py)
    steps = 400
    eval_every = 50

    [inits]                              # label = spec, or label = { spec = ..., group = ..., student = ... }
    full = { spec = "teacher", group = "teacher" }
    null = { spec = "teacher", group = "other", student = { null_signal = "shuffle" } }  # arm's own options
    band = { spec = "from:@band_teacher", group = "no-features" }

    [prereq.band_teacher]                # kind = "teacher" (TeacherConfig fields) | "regress" (RegressConfig)
    kind = "teacher"                     # | "transplant" (TransplantConfig, train/transplant.py)
    sigma_range = [1.5, 4.0]

    [prereq.matched]                     # a regressed generator stopped at the full teacher's step-0 FD
    kind = "regress"
    teacher = "@teacher"
    target_fd = "teacher"                # or a number (the full arm's fd_start); eval_samples / eval_seed /
                                         # sigma_init must then equal [student]'s (checked)

    [extract]                            # feature options when features = true
    sigmas = [0.0, 0.5, 2.5]
    n_samples = 300

    [contrasts.band-vs-full]             # one declared contrast per table (analysis/verdict.py judges each)
    arm = "band"                         # an init label
    versus = "full"                      # an init label, or "reference" (the teacher's own figure)
    isolates = "mapping held fixed, multi-level features removed"
    predicted = "arm worse"              # "arm worse" | "arm better" | "arm no worse"
    claim = "2"                          # "1" | "2"
    metric = "fd_final"                  # optional summary column (default fd_final)
    match = { property = "fd_start", tolerance = "10%" }   # optional: what the contrast holds fixed
    in_claim = true                      # optional: false = reported but not used by the claim rule
    method = "diffratio-js"              # optional: whose runs (default: the grid's first diffratio* method)
    versus_method = "vsd"                # optional: the versus arm's method, when it differs

Groups label what an init keeps of the teacher (teacher, random, features, no-features, partial,
other); the verdict never pools them: it judges the declared contrasts, or, for a grid without
[contrasts], only random vs teacher init (and the teacher init vs the teacher's figure).
An arm's ``student`` table overrides [student] options for its runs only (a null-signal control:
``null_signal = "shuffle"``); steps, eval_every, eval_samples, eval_seed and device stay shared.
A match tolerance is a number (in the property's units), "N%" (of the versus arm's value) or
"floor" (2 x the real-vs-real floor's standard deviation; for FD properties only).

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

from probe.core import checks
from probe.core.data import load_dataset
from probe.core.errors import UserError
from probe.core.models import build_unet, load_model
from train.initspec import validate_init_spec
from train.regress import RegressConfig
from train.student.loop import StudentConfig, validate
from train.student.methods import get_method
from train.teacher import TeacherConfig, default_teacher_steps
from train.transplant import TransplantConfig

SHIPPED = ("paper", "paper-short", "scenes-long", "paper-digits", "quick")
GROUPS = ("teacher", "random", "features", "no-features", "partial", "other")
TOP_KEYS = {"teacher", "data", "methods", "seeds", "features", "reference_steps", "reference_churn", "student",
            "inits", "prereq", "extract", "contrasts"}
RESERVED_STUDENT = {"out", "teacher", "init", "method", "seed", "data"}   # set per run by the grid
# what arms are compared on (budget, evaluations, device): [student] only, never one arm's student table
ARM_FIXED = {"steps", "eval_every", "eval_samples", "eval_seed", "device"}
EXTRACT_KEYS = {"sigmas": (0.0, 0.5, 2.5), "n_samples": 300, "layers": (), "split": "test", "noise_seed": 0,
                "batch": 256, "probes": True}
CURVE_METRICS = ("fd", "precision", "recall", "coverage")
AGG_METRICS = ("fd_final", "fd_best", "precision_final", "recall_final", "coverage_final")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# contrasts (analysis/verdict.py): what a grid may declare
PREDICTIONS = ("arm worse", "arm better", "arm no worse")
CLAIMS = ("1", "2")
CONTRAST_KEYS = {"arm", "versus", "isolates", "predicted", "claim", "metric", "match", "method", "versus_method",
                 "in_claim"}
REFERENCE_METRICS = ("fd_final", "fd_best", "precision_final", "recall_final", "coverage_final")
# summary columns a contrast may compare or match on (analysis/ablation_summary.py writes them)
SUMMARY_COLUMN = re.compile(r"^(fd_final|fd_best|fd_start|fd_auc|fd_tail|precision_final|recall_final|coverage_final|"
                            r"cka_start|cka_start_s[0-9.]+|steps_to_(150|110)pct|fd_at_[0-9]+)$")
_TOLERANCE = re.compile(r"^([0-9]+(\.[0-9]*)?)%$")


@dataclass
class AblationConfig:
    config: str                       # grid TOML file, or a shipped grid name (SHIPPED)
    out: str                          # ablation directory (created; reused to resume)
    teacher: str | None = None        # override the grid's teacher (a model path); its prereq is then not built
    steps: int | None = None          # override [student] steps
    seeds: tuple | None = None        # override the grid's seeds (and every arm's own)
    scale: int | None = None          # multiply every step count (students, prerequisites) by this; None = 1
    features: bool | None = None      # override the grid's features flag
    device: str | None = None         # override the device of every run ("auto" | "cpu" | "cuda")


@dataclass
class InitEntry:
    label: str                        # name used in run directories and tables
    spec: str                         # init spec as written (may hold "@NAME")
    group: str                        # one of GROUPS
    student: dict = field(default_factory=dict)  # this arm's StudentConfig overrides of [student] (e.g. null_signal)
    seeds: list | None = None         # this arm's seeds; None = the grid's (e.g. 5 for headline arms, 3 for others)


@dataclass
class ContrastSpec:
    """One declared contrast: ``arm`` against ``versus`` on ``metric``, with the paper's prediction."""

    name: str                         # table name in [contrasts]
    arm: str                          # init label
    versus: str                       # init label, or "reference" (the teacher's own figure)
    isolates: str                     # what the contrast holds fixed and what it removes, in words
    predicted: str                    # one of PREDICTIONS
    claim: str                        # one of CLAIMS
    metric: str = "fd_final"          # summary column compared
    match: dict | None = None         # {"property": summary column, "tolerance": number | "N%" | "floor"}
    method: str | None = None         # method whose runs are compared; None = the verdict's default method
    in_claim: bool = True             # used by the claim-level rule (False: reported only)
    versus_method: str | None = None  # the versus arm's method when it differs (e.g. DiffRatio vs VSD, same init)


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
    reference_churn: float = 0.0      # EDM's S_churn of the teacher's own figure; 0 = deterministic Heun
    external: dict = field(default_factory=dict)  # "@NAME" refs given as paths (a --teacher override)
    source: str = ""
    contrasts: list = field(default_factory=list)  # [ContrastSpec], declared in [contrasts]

    def seeds_of(self, entry: InitEntry) -> list:
        """The seeds the arm ``entry`` runs with: its own list, else the grid's."""
        return list(entry.seeds) if entry.seeds is not None else list(self.seeds)


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
    types: dict[str, type | tuple[type, ...]] = {
        "teacher": str, "data": str, "methods": list, "seeds": list, "features": bool, "reference_steps": int,
        "reference_churn": (int, float), "student": dict, "inits": dict, "prereq": dict, "extract": dict,
        "contrasts": dict}
    for key, kind in types.items():
        if key in raw and (not isinstance(raw[key], kind) or (kind is not bool and isinstance(raw[key], bool))):
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise UserError(f"{path}: {key!r} must be a {name}, got {type(raw[key]).__name__}")
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
                inits=inits, student=dict(raw.get("student", {})),
                prereqs={k: dict(v) for k, v in raw.get("prereq", {}).items()},
                data=raw.get("data"), features=bool(raw.get("features", False)), extract=extract,
                reference_steps=int(raw.get("reference_steps", 18)),
                reference_churn=float(raw.get("reference_churn", 0.0)), source=str(path),
                contrasts=[parse_contrast(name, value, str(path)) for name, value in raw.get("contrasts", {}).items()])
    if overrides is not None:
        if overrides.teacher:
            if grid.teacher.startswith("@"):  # the prerequisite it named is replaced, not built
                grid.external[grid.teacher[1:]] = str(overrides.teacher)
                grid.prereqs.pop(grid.teacher[1:], None)
            grid.teacher = str(overrides.teacher)
        if overrides.steps is not None:
            grid.student["steps"] = int(overrides.steps)
        if overrides.seeds:  # one seed list for every arm: the arms' own lists give way too
            grid.seeds = [int(s) for s in overrides.seeds]
            for entry in grid.inits:
                entry.seeds = None
        if overrides.scale is not None:
            scale_steps(grid, overrides.scale)
        if overrides.features is not None:
            grid.features = bool(overrides.features)
        if overrides.device:
            grid.student["device"] = overrides.device
            for p in grid.prereqs.values():
                p["device"] = overrides.device
    return grid


STEP_KEYS = ("steps", "eval_every", "checkpoint_every", "log_every")   # what --scale multiplies
PREREQ_KINDS = {"teacher": TeacherConfig, "regress": RegressConfig,   # [prereq.NAME] kind -> its config
                "transplant": TransplantConfig}


def scale_steps(grid: Grid, factor: int) -> None:
    """The full-size version of a grid: every step count of [student] and of each prerequisite
    (``STEP_KEYS``, the config's default where the table leaves one out) times ``factor``, so budgets,
    evaluation points and checkpoints keep their proportions and the learning-curve columns stay at
    the same budget fractions. Seeds, sample counts and arms are left as they are."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise UserError(f"scale must be an integer >= 1, got {factor!r}")
    tables = [(grid.student, StudentConfig)] + [(p, PREREQ_KINDS.get(p.get("kind"))) for p in grid.prereqs.values()]
    for table, config in tables:
        defaults = {f.name: f.default for f in dataclasses.fields(config)} if config else {}
        for key in STEP_KEYS:
            value = table.get(key, defaults.get(key))
            if value is None and config is TeacherConfig and key == "steps":  # a per-data-set default
                value = default_teacher_steps(table.get("data", TeacherConfig.data))
            if isinstance(value, int) and not isinstance(value, bool):
                table[key] = value * factor


# labels pandas' read_csv turns into NaN by default (its STR_NA_VALUES that _LABEL lets through): an arm
# named "null" would vanish from summary.csv when the verdict or the report reads it back
_NA_LABELS = {"NA", "NULL", "NaN", "None", "nan", "null", "-NaN", "-nan"}


def _init_entry(label: str, value, path: Path) -> InitEntry:
    if not _LABEL.match(label) or "__" in label:
        raise UserError(f"{path}: init label {label!r} must be letters, digits, '_', '-', '.' (no '__')")
    if label in _NA_LABELS:
        raise UserError(f"{path}: init label {label!r} reads back as a missing value from summary.csv; "
                        "choose another name (e.g. null-signal)")
    if isinstance(value, str):
        return InitEntry(label, value, value if value in ("teacher", "random") else "other")
    if not isinstance(value, dict) or "spec" not in value:
        raise UserError(f"{path}: [inits] {label} must be a spec string or {{ spec = ..., group = ... }}")
    extra = sorted(set(value) - {"spec", "group", "student", "seeds"})
    if extra:
        raise UserError(f"{path}: [inits] {label}: unknown key {extra[0]!r} (allowed: spec, group, student, seeds)")
    seeds = value.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise UserError(f"{path}: [inits] {label}: seeds must be a non-empty list of distinct non-negative integers")
    group = value.get("group", "other")
    if group not in GROUPS:
        raise UserError(f"{path}: [inits] {label}: unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    student = value.get("student", {})
    if not isinstance(student, dict):
        raise UserError(f"{path}: [inits] {label}: student must be a table of StudentConfig options")
    fixed = sorted(set(student) & ARM_FIXED)
    if fixed:
        raise UserError(f"{path}: [inits] {label}: student option {fixed[0]!r} is the same for every arm "
                        "(set it in [student])")
    return InitEntry(label, str(value["spec"]), group, dict(student), None if seeds is None else list(seeds))


def parse_contrast(name: str, value, where: str = "grid") -> ContrastSpec:
    """A [contrasts.NAME] table (or a dict) -> ContrastSpec; field values are checked, labels are not
    (``check_contrasts`` does that against the grid's inits)."""
    if isinstance(value, ContrastSpec):
        return value
    at = f"{where}: [contrasts.{name}]"
    if not isinstance(value, dict):
        raise UserError(f"{at} must be a table with arm, versus, isolates, predicted, claim")
    value = {k: v for k, v in value.items() if k != "name"}
    extra = sorted(set(value) - CONTRAST_KEYS)
    if extra:
        raise UserError(f"{at}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(CONTRAST_KEYS))})")
    missing = [k for k in ("arm", "versus", "isolates", "predicted", "claim") if k not in value]
    if missing:
        raise UserError(f"{at}: missing {missing[0]!r}")
    for k in ("arm", "versus", "isolates", "predicted", "metric", "method", "versus_method"):
        if k in value and value[k] is not None and (not isinstance(value[k], str) or not value[k].strip()):
            raise UserError(f"{at}: {k} must be a non-empty string")
    claim = str(value["claim"])
    if claim not in CLAIMS:
        raise UserError(f"{at}: claim must be one of {', '.join(repr(c) for c in CLAIMS)}, got {value['claim']!r}")
    if value["predicted"] not in PREDICTIONS:
        raise UserError(f"{at}: predicted must be one of {', '.join(repr(p) for p in PREDICTIONS)}, "
                        f"got {value['predicted']!r}")
    metric = value.get("metric", "fd_final")
    if not SUMMARY_COLUMN.match(metric):
        raise UserError(f"{at}: metric {metric!r} is not a summary column (e.g. fd_final, fd_best, fd_auc, "
                        f"fd_at_<step>, steps_to_150pct, steps_to_110pct, precision_final)")
    if value["arm"] == value["versus"] and value.get("versus_method") in (None, value.get("method")):
        raise UserError(f"{at}: arm and versus are both {value['arm']!r} (with the same method)")
    if value["versus"] == "reference" and value.get("versus_method") is not None:
        raise UserError(f"{at}: versus_method needs an init label in versus, not \"reference\"")
    if value["arm"] == "reference":
        raise UserError(f"{at}: arm must be an init label; put \"reference\" in versus")
    if value["versus"] == "reference" and metric not in REFERENCE_METRICS:
        raise UserError(f"{at}: the teacher's reference figure has no {metric!r}; "
                        f"use one of {', '.join(REFERENCE_METRICS)}")
    if "in_claim" in value and not isinstance(value["in_claim"], bool):
        raise UserError(f"{at}: in_claim must be true or false")
    match = value.get("match")
    if match is not None:
        match = _parse_match(match, at, versus_is_reference=value["versus"] == "reference")
    return ContrastSpec(name=name, arm=value["arm"], versus=value["versus"], isolates=value["isolates"].strip(),
                        predicted=value["predicted"], claim=claim, metric=metric, match=match,
                        method=value.get("method"), in_claim=bool(value.get("in_claim", True)),
                        versus_method=value.get("versus_method"))


def _parse_match(match, at: str, versus_is_reference: bool) -> dict:
    if not isinstance(match, dict) or set(match) != {"property", "tolerance"}:
        raise UserError(f"{at}: match must be {{ property = \"fd_start\", tolerance = 50 | \"10%\" | \"floor\" }}")
    if versus_is_reference:
        raise UserError(f"{at}: a match needs two arms; the reference has no step-0 figures")
    prop, tol = match["property"], match["tolerance"]
    if not isinstance(prop, str) or not SUMMARY_COLUMN.match(prop):
        raise UserError(f"{at}: match property {prop!r} is not a summary column (e.g. fd_start, cka_start)")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol >= 0
                                     or isinstance(tol, str) and (tol == "floor" or _TOLERANCE.match(tol))):
        raise UserError(f"{at}: match tolerance must be a number >= 0, \"N%\" or \"floor\", got {tol!r}")
    if tol == "floor" and not prop.startswith("fd"):
        raise UserError(f"{at}: tolerance \"floor\" is the FD floor's spread; {prop!r} is not an FD")
    return {"property": prop, "tolerance": float(tol) if isinstance(tol, (int, float)) else tol}


def check_contrasts(grid: Grid) -> None:
    """Every contrast names init labels (and a method) of this grid; names are unique by construction."""
    labels = [e.label for e in grid.inits]
    for c in grid.contrasts:
        for role in ("arm", "versus"):
            label = getattr(c, role)
            if role == "versus" and label == "reference":
                continue
            if label not in labels:
                raise UserError(f"[contrasts.{c.name}]: {role} {label!r} is not an init label of this grid "
                                f"(labels: {', '.join(labels)}{', reference' if role == 'versus' else ''})")
        for role in ("method", "versus_method"):
            m = getattr(c, role)
            if m is not None and m not in grid.methods:
                raise UserError(f"[contrasts.{c.name}]: {role} {m!r} is not one of the grid's methods "
                                f"({', '.join(grid.methods)})")
        if c.versus == "reference" and grid.reference_steps <= 0:
            raise UserError(f"[contrasts.{c.name}]: versus \"reference\" needs reference_steps > 0")


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
            valid = ", ".join(n for n in fields if n not in reserved)
            raise UserError(f"{where}: unknown option {k!r} (valid: {valid})")
        default = fields[k].default
        out[k] = tuple(v) if isinstance(v, list) and (isinstance(default, tuple) or k == "sigma_range") else v
    return out


def _refs_in(values: dict) -> list[str]:
    return [v[1:] for v in values.values() if isinstance(v, str) and v.startswith("@")]


def prereq_order(prereqs: dict, external=()) -> list[str]:
    """Prerequisites in an order where each comes after the ones it refers to ("@NAME"); names in
    ``external`` are given as paths and need no building."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "done" once it is in order

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
    """The TeacherConfig / RegressConfig / TransplantConfig of a prerequisite, with "@NAME" resolved."""

    kinds = PREREQ_KINDS
    kind = spec.get("kind")
    if kind not in kinds:
        raise UserError(f"[prereq.{name}] needs kind = \"teacher\" or \"regress\" or \"transplant\", got {kind!r}")
    values = {k: (str(refs[v[1:]]) if isinstance(v, str) and v.startswith("@") and v[1:] in refs else v)
              for k, v in spec.items() if k != "kind"}
    kwargs = _coerce(kinds[kind], values, f"[prereq.{name}]", reserved=("out",))
    if kind in ("regress", "transplant") and "teacher" not in kwargs:
        raise UserError(f"[prereq.{name}] ({kind}) needs teacher = a model path or \"@NAME\"")
    return kind, kinds[kind](out=str(out / "prereq" / name), **kwargs)


def _shapes(model: str, grid: Grid, seen=()) -> dict | None:
    """{tensor name: shape} of a model path or "@NAME" prerequisite, built from its preset when it is
    still to be trained; None for a path that does not exist yet."""
    import torch


    if model.startswith("@") and model[1:] in grid.external:
        model = grid.external[model[1:]]
    if model.startswith("@"):
        name = model[1:]
        spec = grid.prereqs.get(name)
        if spec is None or name in seen:
            raise UserError(f"'@{name}' names no [prereq.{name}]")
        if spec.get("kind") in ("regress", "transplant"):  # a generator with its teacher's architecture
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


def _check_target_comparable(name: str, pcfg: RegressConfig, student: StudentConfig) -> None:
    """A regressed generator stopped at a target FD is a matched control only when its FD is measured
    exactly as the students' step-0 FD: same evaluator size and seed (hence latents), same sigma_init."""
    for key in ("eval_samples", "eval_seed", "sigma_init"):
        if getattr(pcfg, key) != getattr(student, key):
            raise UserError(f"[prereq.{name}] target_fd: {key} = {getattr(pcfg, key)} but [student] uses "
                            f"{getattr(student, key)}; set them equal so its FD is the students' step-0 FD")


def check_grid(grid: Grid, out: Path) -> dict:
    """Validate everything before training; returns {prerequisite name: its directory}."""

    refs = {**{name: out / "prereq" / name for name in grid.prereqs},
            **{name: Path(p) for name, p in grid.external.items()}}
    if grid.teacher.startswith("@") and grid.teacher[1:] not in refs:
        raise UserError(f"teacher = {grid.teacher!r} names no [prereq.{grid.teacher[1:]}]")
    for m in grid.methods:
        get_method(m)
    check_contrasts(grid)
    checks.nonneg_float(grid.reference_churn, "reference_churn")   # EDM's S_churn; 0 = deterministic
    if not grid.seeds or any(s < 0 for s in grid.seeds) or len(set(grid.seeds)) != len(grid.seeds):
        raise UserError("seeds must be distinct non-negative integers")
    student = _coerce(StudentConfig, grid.student, "[student]", reserved=RESERVED_STUDENT)
    if int(student.get("eval_every", 0)) <= 0:
        raise UserError("[student] eval_every must be > 0: the ablation compares sample quality over training")
    for m in grid.methods:
        validate(StudentConfig(out="", teacher="", method=m, **student))
        for entry in grid.inits:  # an arm's own options, e.g. { null_signal = "shuffle" }
            if entry.student:
                where = f"[inits] {entry.label} student"
                own = _coerce(StudentConfig, entry.student, where, reserved=RESERVED_STUDENT)
                validate(StudentConfig(out="", teacher="", method=m, **{**student, **own}))
    if grid.features:  # [extract] is used only after every student is trained: check it now
        from probe.features.extract import ExtractConfig

        e = grid.extract
        if not all(isinstance(e[k], list | tuple) for k in ("sigmas", "layers")) or not isinstance(e["probes"], bool):
            raise UserError("[extract] sigmas and layers must be lists and probes true or false")
        ExtractConfig(model="", out="", layers=tuple(e["layers"]), sigmas=tuple(e["sigmas"]), split=e["split"],
                      n_samples=e["n_samples"], noise_seed=e["noise_seed"], batch=e["batch"])
    for name in prereq_order(grid.prereqs, grid.external):
        kind, pcfg = _prereq_config(name, grid.prereqs[name], out, refs)
        if kind == "regress" and pcfg.targeting:
            _check_target_comparable(name, pcfg, StudentConfig(out="", teacher="", **student))
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
