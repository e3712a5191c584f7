"""Verdict on the paper's two claims from DECLARED contrasts, each judged on its own (docs/verdict.md).

Claim 1  score-free (DiffRatio) training reaches teacher-level quality.
Claim 2  teacher-weight initialisation matters because of the teacher's multi-level features
         rather than its noise-to-image mapping.

A grid declares its contrasts (``[contrasts.NAME]`` in the grid TOML, parsed by
``train.ablation.grid.parse_contrast``): an ``arm`` (init label) against ``versus`` (another init
label, or "reference": the teacher's own multi-step figure), what the contrast isolates, and what
the paper predicts ("arm worse" | "arm better" | "arm no worse"). Arms are never pooled: every
contrast compares exactly two arms (or one arm and the teacher's figure) of one method.

For each contrast:

- match: when it declares one, the property it holds fixed (a summary column such as ``fd_start``,
  step-0 FD, or ``cka_start``, step-0 CKA to the teacher) is measured for both arms (mean over their
  finished runs) and must agree within the tolerance (a number, "N%" of the versus arm's value, or
  "floor" = 2 x the real-vs-real floor's standard deviation). Not met, or not measurable: REFUSED,
  never compared, with the measured values in the reason.
- effect = mean(arm) - mean(versus) in the metric's units, signed so that > 0 means the arm is worse
  (the sign is flipped for higher-is-better metrics), with a percentile bootstrap interval over
  seeds (each arm's runs resampled independently; the reference figure is fixed).
- decision, with ``margin`` the practical-equivalence margin:
    "arm worse"     contradicted  CI below 0, or CI inside [-margin, margin];
                    supported     CI above 0;                      inconclusive otherwise.
    "arm better"    contradicted  CI above 0, or CI inside [-margin, margin];
                    supported     CI below 0;                      inconclusive otherwise.
    "arm no worse"  supported     CI upper end <= margin;
                    contradicted  CI lower end > margin;           inconclusive otherwise.
  Fewer than ``min_runs`` finished runs in an arm: inconclusive (a one-seed interval has width 0).
- budget: when the summary has the ``plateau`` column (analysis/ablation_summary.curve_figures), a
  contrast on a final figure names the arms that had not plateaued; its verdict is a statement about
  the grid's budget, not about convergence. "arm no worse" is never contradicted by an arm that is
  still improving: that case is inconclusive (steps_to_* and fd_auc then carry the comparison).
- steps-to-threshold metrics: a finished run that never reached the threshold counts at its budget
  (a lower bound), and the reason says how many did.

margin = max(equiv_floor_sd x floor std, equiv_rel x |teacher's figure|) for metrics in FD (or
precision / recall / coverage) units; equiv_rel x |mean of the versus arm| for other metrics
(steps, CKA), and for FD-unit metrics when the teacher's figure is unknown.

Claim-level rule (per claim, over the contrasts declared for it with ``in_claim`` true): supported
when every one of them is supported; contradicted when any is contradicted; inconclusive otherwise
(any refused or inconclusive contrast, or none declared).

A grid without [contrasts] gets only the derived contrasts "teacher init vs the teacher's figure"
and, when it has VSD runs, "DiffRatio vs VSD, teacher init" (claim 1), and "random vs teacher init"
(reported, not part of claim 2: it cannot separate features from mapping); every other arm is
listed as undeclared.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.core.errors import UserError
from train.ablation.grid import ContrastSpec, parse_contrast

SCHEMA = 2
VERDICTS = ("supported", "contradicted", "inconclusive", "refused")
HIGHER_IS_BETTER = ("precision", "recall", "coverage", "class_entropy", "cka")
FLOOR_UNITS = ("fd", "precision", "recall", "coverage", "class_entropy")   # metrics the floor is measured in
CLAIM_QUESTIONS = {
    "1": "score-free (DiffRatio) training reaches teacher-level quality",
    "2": "teacher-weight initialisation matters because of the teacher's multi-level features rather than "
         "its noise-to-image mapping",
}
CLAIM_RULE = ("supported when every in-claim contrast of claim {c} is supported; contradicted when any is "
              "contradicted; inconclusive otherwise (a refused or inconclusive contrast, or none declared). "
              "Contrasts are never pooled.")
START_COLUMNS = ("fd_start", "cka_start")


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


# ---------------------------------------------------------------------------------- rules
def metric_base(metric: str) -> str:
    """The family of a summary column: fd, precision, recall, coverage, class_entropy, cka, steps_to."""
    for base in ("class_entropy", "steps_to", "fd", "precision", "recall", "coverage", "cka"):
        if metric.startswith(base):
            return base
    return metric.split("_")[0]


def metric_sign(metric: str) -> float:
    """+1 when lower is better (FD, steps), -1 when higher is better: effects are 'arm worse' > 0."""
    return -1.0 if metric_base(metric) in HIGHER_IS_BETTER else 1.0


def decide(predicted: str, lo: float, hi: float, margin: float) -> tuple[str, str]:
    """(verdict, reason) for a CI [lo, hi] of the effect (> 0 = arm worse) under the documented rules."""
    ci = f"CI [{lo:+.3g}, {hi:+.3g}]"
    inside = -margin <= lo and hi <= margin
    if predicted == "arm no worse":
        if hi <= margin:
            return "supported", f"{ci} ends within the margin {margin:.3g}: the arm is no worse, as predicted"
        if lo > margin:
            return "contradicted", f"{ci} lies beyond the margin {margin:.3g}: the arm is worse, against the prediction"
        return "inconclusive", f"{ci} straddles the margin {margin:.3g}"
    worse = predicted == "arm worse"
    if (hi < 0) if worse else (lo > 0):
        side = "below" if worse else "above"
        found = "better" if worse else "worse"
        return "contradicted", f"{ci} {side} 0: the arm is {found}, against the prediction"
    if inside:
        return "contradicted", f"{ci} inside +-margin {margin:.3g}: no difference that matters, against the prediction"
    if (lo > 0) if worse else (hi < 0):
        side = "above" if worse else "below"
        return "supported", f"{ci} {side} 0: the arm is {'worse' if worse else 'better'}, as predicted"
    return "inconclusive", f"{ci} includes 0"


def combine(verdicts: list) -> str:
    """The claim-level rule (CLAIM_RULE) over the in-claim contrasts' verdicts."""
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "inconclusive"


# ------------------------------------------------------------------------------- results
def _num(x):
    """JSON-safe float: NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ContrastResult:
    """One judged contrast (verdict.json's ``contrasts`` entries; extra fields after ``reason``)."""

    name: str
    claim: str
    arm: str
    versus: str
    isolates: str
    predicted: str
    metric: str
    effect: float = float("nan")          # mean(arm) - mean(versus), > 0 = arm worse
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n_arm: int = 0
    n_versus: int = 0
    match: dict | None = None             # {"property", "arm", "versus", "tolerance", "met"}
    verdict: str = "inconclusive"         # one of VERDICTS
    reason: str = ""
    method: str = ""                      # the method whose runs were compared
    in_claim: bool = True                 # used by the claim-level rule
    mean_arm: float = float("nan")        # metric means (not sign-flipped)
    mean_versus: float = float("nan")
    standardised: float = float("nan")    # effect / pooled within-arm sd (Cohen's d); NaN against the reference
    margin: float = float("nan")          # practical-equivalence margin used, metric units
    start: dict = field(default_factory=dict)  # {"fd_start": {"arm", "versus"}, "cka_start": {...}} measured
    not_plateaued: list = field(default_factory=list)  # arms with a run still moving at the budget (plateau rule)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("effect", "ci_low", "ci_high", "mean_arm", "mean_versus", "standardised", "margin"):
            d[k] = _num(d[k])
        if d["match"] is not None:
            d["match"] = {k: (_num(v) if isinstance(v, float) else v) for k, v in d["match"].items()}
        d["start"] = {p: {k: _num(v) for k, v in vals.items()} for p, vals in d["start"].items()}
        return d

    def lines(self) -> list[str]:
        tag = "" if self.in_claim else ", reported only"
        out = [f"  [{self.name}] claim {self.claim}{tag}: {self.arm} vs {self.versus} ({self.method}) - "
               f"{self.isolates}; predicted: {self.predicted}"]
        start = "; ".join(f"{p} {_fmt(v.get('arm'))}" + (f" vs {_fmt(v['versus'])}" if "versus" in v else "")
                          for p, v in self.start.items())
        if start:
            out.append(f"      at step 0: {start}")
        if self.match is not None:
            m = self.match
            out.append(f"      match on {m['property']}: {_fmt(m.get('arm'))} vs {_fmt(m.get('versus'))}, "
                       f"tolerance {_fmt(m.get('tolerance'))} -> {'met' if m.get('met') else 'NOT met'}")
        if math.isfinite(self.effect):
            d = f", d = {self.standardised:+.2f}" if math.isfinite(self.standardised) else ""
            out.append(f"      {self.metric}: {self.arm} {self.mean_arm:.4g} (n={self.n_arm}) vs {self.versus} "
                       f"{self.mean_versus:.4g} (n={self.n_versus}); effect {self.effect:+.4g} "
                       f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}] (> 0 = arm worse){d}, margin {self.margin:.3g}")
        out.append(f"      {self.verdict.upper()} - {self.reason}")
        return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return "n/a" if not math.isfinite(float(v)) else f"{float(v):.4g}"


@dataclass
class ClaimResult:
    claim: str
    question: str
    rule: str
    verdict: str
    contrasts: list = field(default_factory=list)   # names of the in-claim contrasts
    note: str = ""                                  # e.g. which arms had not plateaued at the budget


@dataclass
class Verdict:
    metric: str                          # the default summary column compared
    level: float
    margin: float                        # margin of ``metric``
    margin_rule: str
    floor: dict | None                   # {"mean", "std"} of the metric's real-vs-real floor
    reference: dict | None               # {"fd", "steps"} the teacher's own figure
    contrasts: list                      # [ContrastResult]
    claims: list                         # [ClaimResult]
    settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)   # undeclared arms, derived contrasts, ...

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "metric": self.metric, "level": self.level, "margin": _num(self.margin),
                "margin_rule": self.margin_rule, "floor": self.floor, "reference": self.reference,
                "contrasts": [c.to_dict() for c in self.contrasts], "claims": [asdict(c) for c in self.claims],
                "notes": list(self.notes),
                "settings": {k: (_num(v) if isinstance(v, float) else v) for k, v in self.settings.items()}}

    def text(self) -> str:
        s = self.settings
        lines = [f"Verdict on the paper's claims from declared contrasts (metric {self.metric}, "
                 f"{self.level:.0%} bootstrap CIs over seeds, {s.get('n_boot')} resamples)",
                 f"margin {_fmt(self.margin)} = {self.margin_rule}"]
        if self.reference:
            lines.append(f"teacher's own figure: FD {_fmt(self.reference.get('fd'))} "
                         f"({_sampler_words(self.reference)}); floor "
                         f"{_fmt((self.floor or {}).get('mean'))} +- {_fmt((self.floor or {}).get('std'))}")
        lines.append("Contrasts (each judged on its own; effect > 0 = the arm is worse):")
        for c in self.contrasts:
            lines += c.lines()
        lines.append("Claims:")
        for c in self.claims:
            lines.append(f"  Claim {c.claim} - {c.question}: {c.verdict.upper()}")
            lines.append(f"      over: {', '.join(c.contrasts) if c.contrasts else 'no contrast'}")
            lines.append(f"      rule: {c.rule}")
            if c.note:
                lines.append(f"      note: {c.note}")
        lines += [f"Note: {n}" for n in self.notes]
        lines.append("Contrast rules: 'arm worse' is supported when the CI lies above 0, contradicted when it lies "
                     "below 0 or inside +-margin; 'arm better' mirrors it; 'arm no worse' is supported when the CI "
                     "ends within the margin, contradicted when it starts beyond it; inconclusive otherwise; a "
                     "contrast whose declared match is not met is refused (docs/verdict.md).")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- verdict
def default_contrasts(summary: pd.DataFrame, has_reference: bool) -> tuple[list, list]:
    """(contrasts, notes) for a grid that declares none: teacher init vs the teacher's figure and, with
    VSD runs, DiffRatio vs VSD on the teacher init (claim 1), and random vs teacher init (reported
    only), from the summary's init_group column."""
    groups = summary.drop_duplicates("init").set_index("init")["init_group"] if "init_group" in summary else pd.Series()
    teachers = [i for i, g in groups.items() if g == "teacher"] or [i for i in groups.index if i in ("teacher", "full")]
    randoms = [i for i, g in groups.items() if g == "random"]
    out = []
    if teachers and has_reference:
        out.append(ContrastSpec(f"{teachers[0]}-vs-reference", teachers[0], "reference",
                                "the teacher-initialised student against the teacher's own multi-step figure",
                                "arm no worse", "1"))
    methods = list(dict.fromkeys(summary["method"])) if "method" in summary else []
    dr = [m for m in methods if str(m).startswith("diffratio")]
    if teachers and dr and "vsd" in methods:
        out.append(ContrastSpec(f"{teachers[0]}-{dr[0]}-vs-vsd", teachers[0], teachers[0],
                                "DiffRatio against VSD (a score-based method), same teacher init and budget",
                                "arm no worse", "1", method=dr[0], versus_method="vsd"))
    for r in randoms[:1]:
        if teachers:
            out.append(ContrastSpec(f"{r}-vs-{teachers[0]}", r, teachers[0],
                                    "all teacher weights removed (features and mapping together)",
                                    "arm worse", "2", in_claim=False))
    used = {c.arm for c in out} | {c.versus for c in out}
    notes = ["the grid declares no [contrasts]: only the derived contrasts above are judged; random vs teacher "
             "init cannot separate features from mapping, so it is reported but not used for claim 2"]
    rest = [i for i in groups.index if i not in used]
    if rest:
        notes.append(f"undeclared arms (not judged): {', '.join(rest)}")
    return out, notes


def _default_method(df: pd.DataFrame) -> str | None:
    methods = list(dict.fromkeys(df["method"])) if len(df) else []
    dr = [m for m in methods if str(m).startswith("diffratio")]
    return (dr or methods or [None])[0]


def _margin(metric: str, ref_figure: float, floor_sd: float, versus_mean: float, k_floor: float,
            rel: float) -> tuple[float, str]:
    """(margin, how it was set) for one metric; NaN when nothing defines it."""
    base = metric_base(metric)
    floor_part = k_floor * floor_sd if base in FLOOR_UNITS and np.isfinite(floor_sd) else np.nan
    if base in FLOOR_UNITS and np.isfinite(ref_figure):
        scale, of = ref_figure, "the teacher's figure"
    else:
        scale, of = versus_mean, "the versus arm's mean"
    rel_part = rel * abs(scale) if np.isfinite(scale) else np.nan
    if np.isfinite(floor_part):
        rule = f"max({k_floor:g} x floor std, {rel:.0%} of {of})"
    else:
        rule = f"{rel:.0%} of {of}"
    parts = [p for p in (floor_part, rel_part) if np.isfinite(p)]
    return (float(max(parts)) if parts else float("nan")), rule


def _tolerance(tol, versus_value: float, floor_sd: float, k_floor: float) -> float:
    if isinstance(tol, str) and tol == "floor":
        return k_floor * floor_sd if np.isfinite(floor_sd) else float("nan")
    if isinstance(tol, str) and tol.endswith("%"):
        return float(tol[:-1]) / 100 * abs(versus_value)
    return float(tol)


def judge(spec: ContrastSpec, df: pd.DataFrame, reference: dict, *, method: str | None, n_boot: int, seed: int,
          level: float, equiv_floor_sd: float, equiv_rel: float, min_runs: int) -> ContrastResult:
    """Judge one contrast on the finished runs ``df`` (see the module docstring for the rules)."""
    metric = spec.metric
    method = spec.method or method
    res = ContrastResult(spec.name, spec.claim, spec.arm, spec.versus, spec.isolates, spec.predicted, metric,
                         method=str(method) + (f" vs {spec.versus_method}" if spec.versus_method else ""),
                         in_claim=spec.in_claim)
    base = metric_base(metric)
    sign = metric_sign(metric)
    floor = (reference or {}).get("floor") or {}
    floor_sd = float(floor.get(f"{base}_std", np.nan)) if base in FLOOR_UNITS else float("nan")
    fd_floor_sd = float(floor.get("fd_std", np.nan))
    ref_figure = float((reference or {}).get(base, np.nan)) if base in FLOOR_UNITS else float("nan")
    runs = df[df["method"] == method]
    other = df[df["method"] == (spec.versus_method or method)]
    arm = runs[runs["init"] == spec.arm]
    versus = other[other["init"] == spec.versus] if spec.versus != "reference" else None
    for prop in START_COLUMNS:
        if prop in runs.columns:
            res.start[prop] = {"arm": float(arm[prop].astype(float).mean()) if len(arm) else float("nan"),
                               "versus": (float(versus[prop].astype(float).mean()) if versus is not None and len(versus)
                                          else float("nan"))}
            if versus is None:
                del res.start[prop]["versus"]
    if metric not in runs.columns:
        res.reason = f"the summary has no column {metric!r}"
        return res

    def values(rows: pd.DataFrame) -> tuple[np.ndarray, int]:
        v = rows[metric].to_numpy(float)
        censored = 0
        if base == "steps_to" and "steps_done" in rows.columns:  # not reached: at least the budget
            missing = ~np.isfinite(v)
            censored = int(missing.sum())
            v = np.where(missing, rows["steps_done"].to_numpy(float), v)
        return v[np.isfinite(v)], censored

    if base == "steps_to" and not np.isfinite(float((reference or {}).get("fd", np.nan))):
        res.reason = "steps-to-threshold needs the teacher's figure (reference.json), which is missing"
        return res
    a, cens_a = values(arm)
    b, cens_b = values(versus) if versus is not None else (np.array([]), 0)
    res.n_arm, res.n_versus = int(a.size), int(b.size)
    fixed = spec.versus == "reference"
    res.mean_arm = float(a.mean()) if a.size else float("nan")
    res.mean_versus = ref_figure if fixed else (float(b.mean()) if b.size else float("nan"))
    res.margin, _ = _margin(metric, ref_figure, floor_sd, res.mean_versus, equiv_floor_sd, equiv_rel)

    if not a.size or (not fixed and not b.size):
        res.reason = f"no finished runs of {spec.arm if not a.size else spec.versus} ({method})"
        return res
    if spec.match is not None:
        prop, tol = spec.match["property"], spec.match["tolerance"]
        assert versus is not None  # the grid parser refuses a match against the reference (no step-0 figures)
        ma = float(arm[prop].astype(float).mean()) if prop in arm.columns and len(arm) else float("nan")
        mb = float(versus[prop].astype(float).mean()) if prop in versus.columns and len(versus) else float("nan")
        t = _tolerance(tol, mb, fd_floor_sd, equiv_floor_sd)
        met = bool(np.isfinite(ma) and np.isfinite(mb) and np.isfinite(t) and abs(ma - mb) <= t)
        res.match = {"property": prop, "arm": ma, "versus": mb, "tolerance": t, "met": met,
                     "declared": tol if isinstance(tol, str) else float(tol)}
        if not met:
            res.verdict = "refused"
            if not (np.isfinite(ma) and np.isfinite(mb)):
                res.reason = (f"the match on {prop} cannot be measured ({spec.arm} {_fmt(ma)}, {spec.versus} "
                              f"{_fmt(mb)}): not compared")
            elif not np.isfinite(t):
                res.reason = f"the match tolerance {tol!r} needs the floor's spread, which is unknown: not compared"
            else:
                res.reason = (f"{prop} not matched: {spec.arm} {ma:.4g} vs {spec.versus} {mb:.4g}, difference "
                              f"{abs(ma - mb):.4g} > tolerance {t:.4g}: not compared")
            return res
    if fixed and not np.isfinite(ref_figure):
        res.reason = f"the teacher's own figure for {metric} is unknown (no reference.json)"
        return res
    res.effect = sign * (res.mean_arm - res.mean_versus)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    reps_a = bootstrap_cell_means([a], n_boot, rng)
    reps_b = np.full(n_boot, ref_figure) if fixed else bootstrap_cell_means([b], n_boot, rng)
    diff = sign * (reps_a - reps_b)
    q = (1 - level) / 2
    res.ci_low, res.ci_high = float(np.quantile(diff, q)), float(np.quantile(diff, 1 - q))
    if not fixed:
        sd = pooled_sd([a, b])
        res.standardised = res.effect / sd if sd > 0 else float("nan")
    note = ""
    if cens_a or cens_b:
        note = (f" ({cens_a} {spec.arm} and {cens_b} {spec.versus} runs did not reach the threshold and count at "
                f"their budget, a lower bound)")
    if a.size < min_runs or (not fixed and b.size < min_runs):
        res.reason = (f"fewer than {min_runs} finished runs ({spec.arm} {a.size}, {spec.versus} "
                      f"{'fixed' if fixed else b.size}): the interval would be unreliable{note}")
        return res
    res.verdict, res.reason = decide(spec.predicted, res.ci_low, res.ci_high, res.margin)
    if "plateau" in runs.columns and (metric.endswith("_final") or metric == "fd_tail"):
        res.not_plateaued = [label for label, rows in ((spec.arm, arm), (spec.versus, versus)) if rows is not None
                             and (rows["plateau"].astype(float) == 0).any()]
        if spec.predicted == "arm no worse" and res.verdict == "contradicted" and spec.arm in res.not_plateaued:
            # "reaches the reference" cannot be refuted by a run that is still improving
            res.verdict = "inconclusive"
            res.reason = (f"{res.reason.split(':')[0]}: worse at this budget, but {spec.arm} had not plateaued and "
                          f"may still get there (see steps_to_* and fd_auc)")
        elif res.not_plateaued:
            trends = [trend_words(rows) for label, rows in ((spec.arm, arm), (spec.versus, versus))
                      if label in res.not_plateaued]
            said = [f"{label} ({t})" if t else label for label, t in zip(res.not_plateaued, trends)]
            note += (f"; {' and '.join(said)} had not plateaued at the budget (docs/verdict.md): "
                     f"this judges the budget, not convergence")
    res.reason += note
    return res


def trend_words(rows: pd.DataFrame) -> str:
    """How an arm's runs moved over the last half of their evaluations (summary ``fd_trend``), in words:
    "still improving in 3/3 runs", "no trend resolved in 4/5 runs, worsening in 1/5"; "" without the columns.

    A run counts as moving when its trend lies beyond 2 standard errors of the line (``fd_trend_se``).
    """
    if rows is None or "fd_trend" not in rows.columns or "fd_trend_se" not in rows.columns:
        return ""
    t, se = rows["fd_trend"].to_numpy(float), rows["fd_trend_se"].to_numpy(float)
    ok = np.isfinite(t) & np.isfinite(se)
    if not ok.any():
        return ""
    t, se, n = t[ok], se[ok], int(ok.sum())
    counts = {"still improving": int((t < -2 * se).sum()), "worsening": int((t > 2 * se).sum())}
    counts["no trend resolved"] = n - counts["still improving"] - counts["worsening"]
    return ", ".join(f"{k} in {v}/{n} runs" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v) + \
        " over the last half"


def verdict(summary: pd.DataFrame,
            reference: dict | None = None,  # the teacher's figures (reference.json):
                                            # {"fd": .., "floor": {"fd_std": ..}}
            contrasts: list | None = None,  # [ContrastSpec or dict]; None = derived defaults (see default_contrasts)
            metric: str = "fd_final",       # default summary column (contrasts may name their own)
            method: str | None = None,      # method compared when a contrast names none; None = first diffratio*
            n_boot: int = 2000,             # bootstrap resamples
            seed: int = 0,                  # bootstrap seed
            level: float = 0.95,            # CI level
            equiv_floor_sd: float = 2.0,    # margin: this many floor standard deviations ...
            equiv_rel: float = 0.10,        # ... or this fraction of the teacher's figure, whichever is larger
            min_runs: int = 2,              # fewest finished runs per arm for a decisive contrast
            ) -> Verdict:
    """Judge every contrast on its own, then each claim by CLAIM_RULE; see the module docstring."""
    df = summary.copy()
    need = {"init", "method"}
    if not need <= set(df.columns):
        raise UserError(f"the summary lacks column(s) {', '.join(sorted(need - set(df.columns)))}")
    if "status" in df.columns:
        df = df[df["status"] == "done"]
    reference = reference or {}
    notes: list[str] = []
    if contrasts is None:
        specs, notes = default_contrasts(summary, bool(np.isfinite(float(reference.get("fd", np.nan)))))
        if metric != "fd_final":
            specs = [ContrastSpec(**{**asdict(s), "metric": metric}) for s in specs
                     if s.versus != "reference" or metric in ("fd_final", "fd_best")]
    else:
        specs = [parse_contrast(c.get("name", f"contrast{i}") if isinstance(c, dict) else c.name, c, "verdict")
                 for i, c in enumerate(contrasts)]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise UserError(f"contrast names must be unique: {', '.join(names)}")
        used = {s.arm for s in specs} | {s.versus for s in specs}
        rest = [i for i in dict.fromkeys(summary["init"]) if i not in used]
        if rest:
            notes.append(f"arms in no contrast (not judged): {', '.join(rest)}")
    if metric not in df.columns and any(s.metric == metric for s in specs):
        raise UserError(f"the summary lacks column(s) {metric}")
    method = method or _default_method(df) or _default_method(summary)
    results = [judge(s, df, reference, method=method, n_boot=n_boot, seed=seed, level=level,
                     equiv_floor_sd=equiv_floor_sd, equiv_rel=equiv_rel, min_runs=min_runs) for s in specs]
    claims = []
    for c in ("1", "2"):
        members = [r for r in results if r.claim == c and r.in_claim]
        moving = list(dict.fromkeys(a for r in members for a in r.not_plateaued))
        note = (f"judged at the grid's budget: {', '.join(moving)} had not plateaued" if moving else "")
        claims.append(ClaimResult(c, CLAIM_QUESTIONS[c], CLAIM_RULE.format(c=c), combine([r.verdict for r in members]),
                                  [r.name for r in members], note))
    base = metric_base(metric)
    floor = reference.get("floor") or {}
    floor_sd = float(floor.get(f"{base}_std", np.nan))
    ref_figure = float(reference.get(base, np.nan))
    margin, rule = _margin(metric, ref_figure, floor_sd, np.nan, equiv_floor_sd, equiv_rel)
    floor_out = ({"mean": _num(floor.get(base)), "std": _num(floor.get(f"{base}_std"))}
                 if f"{base}_std" in floor else None)
    ref_out = ({"fd": _num(reference.get("fd")), "steps": _steps(reference.get("sampler")),
                "sampler": reference.get("sampler")}
               if np.isfinite(float(reference.get("fd", np.nan))) else None)
    settings = dict(metric=metric, method=method, n_boot=n_boot, seed=seed, level=level, equiv_floor_sd=equiv_floor_sd,
                    equiv_rel=equiv_rel, min_runs=min_runs, declared=contrasts is not None)
    return Verdict(metric, level, margin, rule, floor_out, ref_out, results, claims, settings, notes)


def _steps(sampler) -> int | None:
    """Heun steps from a sampler name such as "heun-18" or "heun-100-churn100[0.05,50]"."""
    try:
        return int(str(sampler).split("-")[1])
    except (IndexError, ValueError):
        return None


def _sampler_words(reference: dict) -> str:
    """"18 Heun steps", or the stochastic sampler's full name (its steps, churn and sigma window)."""
    sampler = str(reference.get("sampler") or "")
    if "churn" in sampler:
        return f"EDM's stochastic sampler {sampler}"
    return f"{reference.get('steps')} Heun steps"


def verdict_from_dir(ablation_dir, **options) -> Verdict:
    """``verdict`` on ``summary.csv`` (``reference.json`` and the contrasts of ``grid.json`` when present)."""
    d = Path(ablation_dir)
    if not (d / "summary.csv").exists():
        raise UserError(f"{d} has no summary.csv; run `probe train ablation` first")
    ref = json.loads((d / "reference.json").read_text()) if (d / "reference.json").exists() else None
    if "contrasts" not in options and (d / "grid.json").exists():
        declared = json.loads((d / "grid.json").read_text()).get("grid", {}).get("contrasts")
        if declared:
            options["contrasts"] = declared
    return verdict(pd.read_csv(d / "summary.csv"), reference=ref, **options)
