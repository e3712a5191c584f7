"""Attribution: which step-0 property of a student explains its final quality, across every arm at once.

For every finished run of a grid the summary records, at step 0, its mapping quality (``fd_start``,
the one-step FD of the initial weights) and its feature similarity to the teacher (``cka_start``,
mean debiased CKA over layers and sigmas; analysis/step0.py), and at the end its quality. This fits,
over all arms and seeds of one method,

    z(outcome) = b_map * z(log10 fd_start) + b_feat * z(cka_start) + e        (least squares)

where z() standardises over the runs, outcome is log10(fd_final) by default (also steps_to_150pct
and steps_to_110pct: runs that never reached the threshold are left out and counted), and reports
for each explanation its standardised coefficient and its partial correlation with the outcome
(the other explanation held fixed), each with a percentile bootstrap interval. The bootstrap
resamples ARMS (init labels) with all their runs: the step-0 properties belong to an init, so the
seeds of one arm are not independent evidence about them. The correlation between the two
predictors is printed with the fit: near +-1 the arms cannot tell the explanations apart, whatever
the coefficients say.

Under the paper's explanation (features, not mapping) the feature coefficient is negative (more
similar features, lower FD) with an interval excluding 0, and the mapping coefficient's interval
includes 0 once features are held fixed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

PREDICTORS = ("fd_start", "cka_start")
LOG_COLUMNS = ("fd_start", "fd_final", "fd_best")     # FDs span orders of magnitude: fitted on log10
OUTCOMES = ("fd_final", "steps_to_150pct", "steps_to_110pct")
MIN_ARMS = 4                                          # fewer arms cannot separate two predictors


@dataclass
class Term:
    predictor: str                 # column, as transformed (e.g. "log10 fd_start")
    coef: float                    # standardised coefficient
    coef_ci: tuple                 # bootstrap interval
    partial_r: float               # partial correlation with the outcome, the other predictors held fixed
    partial_ci: tuple


@dataclass
class Fit:
    outcome: str                   # column, as transformed
    n_runs: int
    n_arms: int
    n_left_out: int                # finished runs without a finite outcome (e.g. threshold not reached)
    terms: list                    # [Term]
    predictor_corr: float          # correlation of the two predictors over the runs
    r2: float                      # share of the outcome's variance the fit explains
    degenerate_boot: int = 0       # bootstrap replicates dropped (a predictor constant in the resample)
    note: str = ""


@dataclass
class Attribution:
    fits: list
    level: float
    n_boot: int
    method: str | None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float).replace("NaN", "null"))

    def text(self) -> str:
        lines = [f"Attribution over all arms and seeds (method {self.method}): standardised coefficients and "
                 f"partial correlations, {self.level:.0%} bootstrap intervals over arms ({self.n_boot} resamples)"]
        for f in self.fits:
            lines.append(f"  {f.outcome} ~ {' + '.join(t.predictor for t in f.terms)}: {f.n_runs} runs in "
                         f"{f.n_arms} arms ({f.n_left_out} left out), R^2 {f.r2:.2f}, predictor correlation "
                         f"{f.predictor_corr:+.2f}")
            for t in f.terms:
                lines.append(f"      {t.predictor:<18} coef {t.coef:+.2f} [{t.coef_ci[0]:+.2f}, {t.coef_ci[1]:+.2f}]   "
                             f"partial r {t.partial_r:+.2f} [{t.partial_ci[0]:+.2f}, {t.partial_ci[1]:+.2f}]")
            if f.note:
                lines.append(f"      note: {f.note}")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _z(a: np.ndarray) -> np.ndarray:
    sd = a.std()
    return (a - a.mean()) / sd if sd > 0 else np.full_like(a, np.nan)


def fit_standardised(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(standardised coefficients [k], partial correlations [k], R^2) of y on the k columns of x."""
    zy, zx = _z(np.asarray(y, float)), np.column_stack([_z(c) for c in np.asarray(x, float).T])
    k = zx.shape[1]
    if not (np.isfinite(zy).all() and np.isfinite(zx).all()) or np.linalg.matrix_rank(zx, tol=1e-6 * len(zy)) < k:
        # a constant or perfectly confounded predictor: no coefficient is identified
        return np.full(k, np.nan), np.full(k, np.nan), float("nan")
    beta, *_ = np.linalg.lstsq(zx, zy, rcond=None)
    r2 = float(1 - np.sum((zy - zx @ beta) ** 2) / np.sum(zy ** 2))
    partial = np.empty(k)
    for j in range(k):
        others = np.delete(zx, j, axis=1)
        ry = zy - others @ np.linalg.lstsq(others, zy, rcond=None)[0] if others.size else zy
        rx = zx[:, j] - others @ np.linalg.lstsq(others, zx[:, j], rcond=None)[0] if others.size else zx[:, j]
        den = np.sqrt(np.sum(ry ** 2) * np.sum(rx ** 2))
        partial[j] = float(np.sum(ry * rx) / den) if den > 0 else np.nan
    return beta, partial, r2


def _column(df: pd.DataFrame, col: str) -> tuple[np.ndarray, str]:
    v = df[col].to_numpy(float)
    if col in LOG_COLUMNS:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log10(v), np.nan), f"log10 {col}"
    return v, col


def _done(summary: pd.DataFrame, method: str | None) -> tuple[pd.DataFrame, str | None]:
    df = summary[summary["status"] == "done"] if "status" in summary.columns else summary
    if method is None and "method" in df.columns and len(df):
        methods = list(dict.fromkeys(df["method"]))
        method = ([m for m in methods if str(m).startswith("diffratio")] or methods)[0]
    if method is not None and "method" in df.columns:
        df = df[df["method"] == method]
    return df, method


def attribution_ready(summary: pd.DataFrame, predictors=PREDICTORS, method: str | None = None) -> bool:
    """True when the summary has both step-0 columns, finite for runs of at least MIN_ARMS arms."""
    if not set(predictors) | {"fd_final", "init"} <= set(summary.columns):
        return False
    df, _ = _done(summary, method)
    ok = np.all([np.isfinite(df[c].to_numpy(float)) for c in predictors], axis=0) if len(df) else np.array([])
    return bool(len(df) and df[ok]["init"].nunique() >= MIN_ARMS)


def attribute(summary: pd.DataFrame,
              outcomes=OUTCOMES,          # outcome columns; FDs are fitted on log10
              predictors=PREDICTORS,      # step-0 columns: mapping quality, feature similarity
              method: str | None = None,  # the method whose runs are fitted; None = first diffratio*
              n_boot: int = 2000,         # bootstrap resamples (of arms)
              seed: int = 0,              # bootstrap seed
              level: float = 0.95,        # interval level
              cluster: str = "init",      # resampling unit: a summary column (runs of one value move together)
              ) -> Attribution:
    """Fit every outcome against the step-0 predictors over all arms and seeds (module docstring)."""
    df, method = _done(summary, method)
    fits, notes = [], []
    q = (1 - level) / 2
    for outcome in outcomes:
        if outcome not in df.columns:
            notes.append(f"no column {outcome!r}: not fitted")
            continue
        y_all, y_name = _column(df, outcome)
        xs = [_column(df, p) for p in predictors]
        x_all = np.column_stack([x for x, _ in xs])
        ok = np.isfinite(y_all) & np.isfinite(x_all).all(axis=1)
        groups = df[cluster].to_numpy()[ok]
        y, x = y_all[ok], x_all[ok]
        arms = list(dict.fromkeys(groups))
        terms_names = [n for _, n in xs]
        fit = Fit(y_name, int(ok.sum()), len(arms), int((~ok).sum()), [], float("nan"), float("nan"))
        if len(arms) < MIN_ARMS:
            fit.note = f"fewer than {MIN_ARMS} arms with finite values: not fitted"
            fit.terms = [Term(n, np.nan, (np.nan, np.nan), np.nan, (np.nan, np.nan)) for n in terms_names]
            fits.append(fit)
            continue
        beta, partial, r2 = fit_standardised(y, x)
        fit.r2 = r2
        if x.shape[1] >= 2:
            fit.predictor_corr = float(np.corrcoef(x[:, 0], x[:, 1])[0, 1])
        rng = np.random.default_rng(seed)
        index = {a: np.flatnonzero(groups == a) for a in arms}
        boot_b, boot_p = np.full((n_boot, len(beta)), np.nan), np.full((n_boot, len(beta)), np.nan)
        for i in range(n_boot):
            rows = np.concatenate([index[arms[j]] for j in rng.integers(0, len(arms), len(arms))])
            boot_b[i], boot_p[i], _ = fit_standardised(y[rows], x[rows])
        good = np.isfinite(boot_b).all(axis=1)
        fit.degenerate_boot = int((~good).sum())
        for j, name in enumerate(terms_names):
            b, p = boot_b[good, j], boot_p[good, j]
            ci = lambda v: (float(np.quantile(v, q)), float(np.quantile(v, 1 - q))) if v.size else (np.nan, np.nan)
            fit.terms.append(Term(name, float(beta[j]), ci(b), float(partial[j]), ci(p)))
        if math.isfinite(fit.predictor_corr) and abs(fit.predictor_corr) > 0.9:
            fit.note = (f"the predictors correlate at {fit.predictor_corr:+.2f} over these arms: the fit cannot "
                        f"separate the two explanations")
        fits.append(fit)
    return Attribution(fits, level, n_boot, method, notes)
