"""Verdict on the paper's two claims from an ablation summary (METHOD.md sections 2 and 4).

Claim 1  score-free (DiffRatio) training reaches teacher-level quality: DiffRatio students
         initialised from the teacher against the teacher's own multi-step figure (``reference``),
         and against VSD students with the same init when the grid has them.
Claim 2  initialising from the teacher's weights is indispensable, and the reason is the
         teacher's features, not its noise-to-image (I/O) mapping:
         (a) random init against teacher init;
         (b) the controls without multi-level features (group "no-features": narrow-band
             denoiser, regressed generator, shuffled weights) against the inits that keep the
             features but lose the I/O mapping (group "features": I/O layers re-initialised).

Every comparison is "how much worse is B than A" in the metric's units (Fréchet distance by
default: lower is better; for precision / recall / coverage the sign is flipped so that positive
still means worse), with a percentile bootstrap CI and a standardised effect (difference over the
pooled within-init standard deviation, Cohen's d). The bootstrap resamples runs (seeds) within
each (init, method) cell independently and averages cell means with equal weight, so a group of
three controls counts each control once, whatever its number of seeds.

Rules (``level`` = 0.95 by default; ``margin`` = the practical-equivalence margin, see below):

- directional test (B predicted worse than A: claims 2a, 2b)
    not supported   CI entirely below 0 (the opposite direction), or CI inside [-margin, margin]
                    (a difference too small to matter cannot make something indispensable);
    supported       CI entirely above 0;
    inconclusive    otherwise.
- non-inferiority test (B predicted no worse than A by more than the margin: claim 1)
    supported       CI upper bound <= margin;   not supported   CI lower bound > margin;
    inconclusive    otherwise.
- any cell with fewer than ``min_runs`` runs makes its test inconclusive (a one-seed bootstrap
  interval has width 0 and would look certain).
- a claim is supported when all its tests are, not supported when any is, inconclusive otherwise.

margin = max(equiv_floor_sd x floor std of the metric (the real-vs-real resampling spread that
``QualityEvaluator.floor`` reports), equiv_rel x |reference value|); the reference value is the
teacher's figure when known, else the mean of the teacher-init runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.core.errors import UserError

OUTCOMES = ("supported", "not supported", "inconclusive")
HIGHER_IS_BETTER = ("precision", "recall", "coverage", "class_entropy")


# ------------------------------------------------------------------------------ bootstrap
def bootstrap_cell_means(cells: list, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] bootstrap replicates of the equal-weight mean of cell means (cells resampled independently).

    Hand-written: scipy.stats.bootstrap refuses one-observation samples and cannot average cells
    with equal weights in its vectorised form.
    """
    reps = [np.asarray(c, float)[rng.integers(0, len(c), size=(n_boot, len(c)))].mean(axis=1) for c in cells]
    return np.mean(reps, axis=0)


def mean_ci(values,
            n_boot: int = 2000,     # bootstrap resamples
            seed: int = 0,          # bootstrap seed
            level: float = 0.95,    # CI level
            ) -> tuple[float, float]:
    """Percentile bootstrap CI of a mean (NaN for no values; a point for one value)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    reps = bootstrap_cell_means([v], n_boot, np.random.default_rng(seed))
    a = (1 - level) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def pooled_sd(cells: list) -> float:
    """Within-cell standard deviation pooled over cells (NaN without degrees of freedom)."""
    dof = sum(len(c) - 1 for c in cells)
    if dof <= 0:
        return float("nan")
    ss = sum(float(((np.asarray(c, float) - np.mean(c)) ** 2).sum()) for c in cells)
    return float(np.sqrt(ss / dof))


# ------------------------------------------------------------------------------- results
@dataclass
class Comparison:
    """One test: how much worse B is than A (positive = B worse), with its CI and outcome."""

    name: str                      # short id, e.g. "2a"
    question: str                  # what is compared, in words
    a: str                         # baseline description
    b: str                         # alternative description
    kind: str                      # "directional" | "non-inferiority"
    mean_a: float = float("nan")   # mean metric of A (equal-weight over cells)
    mean_b: float = float("nan")   # mean metric of B
    effect: float = float("nan")   # mean_b - mean_a, sign flipped for higher-is-better metrics
    standardised: float = float("nan")  # effect / pooled within-cell sd (Cohen's d)
    ci: tuple = (float("nan"), float("nan"))  # bootstrap CI of effect
    margin: float = float("nan")   # practical-equivalence margin, metric units
    n_a: int = 0                   # runs behind A
    n_b: int = 0                   # runs behind B
    outcome: str = "inconclusive"  # one of OUTCOMES
    reason: str = ""               # which rule decided

    def line(self) -> str:
        if not np.isfinite(self.effect):
            return f"  ({self.name}) {self.question}: {self.outcome.upper()} - {self.reason}"
        return (f"  ({self.name}) {self.question}: {self.outcome.upper()}\n"
                f"      {self.b}: {self.mean_b:.3f} (n={self.n_b})  vs  {self.a}: {self.mean_a:.3f} (n={self.n_a})\n"
                f"      worse by {self.effect:+.3f} [{self.ci[0]:+.3f}, {self.ci[1]:+.3f}], "
                f"d = {self.standardised:+.2f}, margin {self.margin:.3f} - {self.reason}")


@dataclass
class ClaimVerdict:
    claim: str                     # "1" | "2"
    statement: str
    outcome: str
    tests: list = field(default_factory=list)


@dataclass
class Verdict:
    metric: str
    claims: list
    settings: dict

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float))

    def text(self) -> str:
        lines = [f"Verdict on the paper's claims (metric {self.metric}, {self.settings['level']:.0%} bootstrap CIs, "
                 f"{self.settings['n_boot']} resamples)"]
        for c in self.claims:
            lines.append(f"Claim {c.claim} - {c.statement}: {c.outcome.upper()}")
            lines += [t.line() for t in c.tests]
        lines.append("Rules: directional tests are supported when the CI of 'B worse than A' lies above 0, not "
                     "supported when it lies below 0 or inside +-margin; non-inferiority tests are supported when "
                     "the CI's upper end is within the margin, not supported when its lower end exceeds it; "
                     "inconclusive otherwise (see analysis/verdict.py).")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- rules
def decide(kind: str, lo: float, hi: float, margin: float) -> tuple[str, str]:
    """(outcome, reason) for a CI [lo, hi] of 'B worse than A' under the documented rules."""
    if kind == "non-inferiority":
        if hi <= margin:
            return "supported", "the CI's upper end is within the margin"
        if lo > margin:
            return "not supported", "the CI's lower end exceeds the margin"
        return "inconclusive", "the CI straddles the margin"
    if hi < 0:
        return "not supported", "the CI excludes 0 in the opposite direction"
    if -margin <= lo and hi <= margin:
        return "not supported", "the CI lies within the practical-equivalence margin"
    if lo > 0:
        return "supported", "the CI excludes 0 in the predicted direction"
    return "inconclusive", "the CI includes 0"


def combine(outcomes: list) -> str:
    if outcomes and all(o == "supported" for o in outcomes):
        return "supported"
    if any(o == "not supported" for o in outcomes):
        return "not supported"
    return "inconclusive"


# ----------------------------------------------------------------------------- verdict
def _cells(df: pd.DataFrame, metric: str) -> list:
    return [g[metric].to_numpy(float) for _, g in df.groupby(["init", "method"], sort=True)]


def _label(df: pd.DataFrame) -> str:
    inits = ", ".join(sorted(df["init"].unique())) if len(df) else "none"
    methods = ", ".join(sorted(df["method"].unique())) if len(df) else ""
    return f"{methods} [{inits}]"


def compare(name: str, question: str, a, b: pd.DataFrame, a_text: str, metric: str, kind: str, margin: float,
            n_boot: int, rng: np.random.Generator, level: float, min_runs: int, sign: float) -> Comparison:
    """Test B against A; ``a`` is a DataFrame of runs or a fixed number (the teacher's figure)."""
    fixed = not isinstance(a, pd.DataFrame)
    cells_b = _cells(b, metric)
    cells_a = [] if fixed else _cells(a, metric)
    comp = Comparison(name, question, a_text if fixed else _label(a), _label(b), kind, margin=margin,
                      n_a=0 if fixed else sum(map(len, cells_a)), n_b=sum(map(len, cells_b)))
    if not cells_b or (not fixed and not cells_a):
        comp.reason = f"no finished runs for {'B' if not cells_b else 'A'}"
        return comp
    if fixed and not np.isfinite(a):
        comp.reason = "the reference figure is missing"
        return comp
    comp.mean_b = float(np.mean([c.mean() for c in cells_b]))
    comp.mean_a = float(a) if fixed else float(np.mean([c.mean() for c in cells_a]))
    comp.effect = sign * (comp.mean_b - comp.mean_a)
    comp.standardised = comp.effect / pooled_sd(cells_b + cells_a) if pooled_sd(cells_b + cells_a) > 0 else float("nan")
    reps_b = bootstrap_cell_means(cells_b, n_boot, rng)
    reps_a = np.full(n_boot, float(a)) if fixed else bootstrap_cell_means(cells_a, n_boot, rng)
    diff = sign * (reps_b - reps_a)
    q = (1 - level) / 2
    comp.ci = (float(np.quantile(diff, q)), float(np.quantile(diff, 1 - q)))
    if min(len(c) for c in cells_b + cells_a) < min_runs:
        comp.reason = f"a cell has fewer than {min_runs} runs (seeds); the interval would be unreliable"
        return comp
    comp.outcome, comp.reason = decide(kind, *comp.ci, margin)
    return comp


def verdict(summary: pd.DataFrame,
            reference: dict | None = None,  # teacher's own figures (reference.json): {"fd": .., "floor": {"fd_std": ..}}
            metric: str = "fd_final",       # summary column compared: fd_final | fd_best | precision_final | ...
            method: str | None = None,      # DiffRatio method(s) for the claims; None = every method "diffratio*"
            groups: dict | None = None,     # {init label: group} overriding the summary's init_group column
            n_boot: int = 2000,             # bootstrap resamples
            seed: int = 0,                  # bootstrap seed
            level: float = 0.95,            # CI level
            equiv_floor_sd: float = 2.0,    # margin: this many floor standard deviations ...
            equiv_rel: float = 0.05,        # ... or this fraction of the reference value, whichever is larger
            min_runs: int = 2,              # fewest runs per (init, method) cell for a decisive test
            ) -> Verdict:
    """Decide the two claims from per-run results; see the module docstring for the rules."""
    df = summary.copy()
    need = {"init", "method", metric}
    if not need <= set(df.columns):
        raise UserError(f"the summary lacks column(s) {', '.join(sorted(need - set(df.columns)))}")
    if "status" in df.columns:
        df = df[df["status"] == "done"]
    if groups:
        df["init_group"] = df["init"].map(lambda i: groups.get(i, "other"))
    elif "init_group" not in df.columns:
        df["init_group"] = df["init"].map(lambda i: i if i in ("teacher", "random") else "other")
    df = df[np.isfinite(df[metric].astype(float))]
    base = metric.split("_")[0] if not metric.startswith("class_entropy") else "class_entropy"
    sign = -1.0 if base in HIGHER_IS_BETTER else 1.0
    reference = reference or {}
    ref_value = float(reference.get(base, np.nan))
    floor_sd = float((reference.get("floor") or {}).get(f"{base}_std", np.nan))

    is_dr = df["method"].str.startswith("diffratio") if method is None else df["method"] == method
    dr = df[is_dr]
    dr_teacher = dr[dr["init_group"] == "teacher"]
    scale = ref_value if np.isfinite(ref_value) else (float(dr_teacher[metric].mean()) if len(dr_teacher) else np.nan)
    margin = np.nanmax([equiv_floor_sd * floor_sd if np.isfinite(floor_sd) else np.nan,
                        equiv_rel * abs(scale) if np.isfinite(scale) else np.nan, 0.0])
    rng = np.random.default_rng(seed)
    args = dict(metric=metric, margin=float(margin), n_boot=n_boot, rng=rng, level=level, min_runs=min_runs, sign=sign)

    tests1 = []
    if np.isfinite(ref_value):
        sampler = reference.get("sampler", "multi-step")
        tests1.append(compare("1a", "DiffRatio (teacher init) vs the teacher's own samples", ref_value, dr_teacher,
                              f"teacher ({sampler})", kind="non-inferiority", **args))
    vsd = df[(df["method"] == "vsd") & (df["init_group"] == "teacher")]
    if len(vsd):
        tests1.append(compare("1b", "DiffRatio (teacher init) vs VSD (teacher init)", vsd, dr_teacher, "",
                              kind="non-inferiority", **args))
    if not tests1:
        tests1.append(Comparison("1", "DiffRatio (teacher init) vs a reference", "", "", "non-inferiority",
                                 reason="neither the teacher's figure nor VSD runs are available"))
    claim1 = ClaimVerdict("1", "score-free (DiffRatio) training reaches teacher-level quality",
                          combine([t.outcome for t in tests1]), tests1)

    by = {g: dr[dr["init_group"] == g] for g in ("teacher", "random", "features", "no-features")}
    tests2 = [compare("2a", "random init is worse than teacher init", by["teacher"], by["random"], "",
                      kind="directional", **args),
              compare("2b", "inits without the teacher's features (no-features) are worse than inits that keep "
                            "them without the I/O mapping (features)", by["features"], by["no-features"], "",
                      kind="directional", **args)]
    claim2 = ClaimVerdict("2", "teacher-weight initialisation is indispensable, because of its features "
                               "rather than its I/O mapping", combine([t.outcome for t in tests2]), tests2)
    settings = dict(metric=metric, method=method, n_boot=n_boot, seed=seed, level=level, margin=float(margin),
                    equiv_floor_sd=equiv_floor_sd, equiv_rel=equiv_rel, min_runs=min_runs,
                    reference_value=ref_value, floor_sd=floor_sd)
    return Verdict(metric, [claim1, claim2], settings)


def verdict_from_dir(ablation_dir, **options) -> Verdict:
    """``verdict`` on ``summary.csv`` (and ``reference.json`` when present) of an ablation directory."""
    d = Path(ablation_dir)
    if not (d / "summary.csv").exists():
        raise UserError(f"{d} has no summary.csv; run `probe train ablation` first")
    ref = json.loads((d / "reference.json").read_text()) if (d / "reference.json").exists() else None
    return verdict(pd.read_csv(d / "summary.csv"), reference=ref, **options)
