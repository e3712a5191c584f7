"""What the report says, computed from the files earlier stages wrote (no prose claims are stored here).

- ``contrast_rows`` / ``claim_rows`` / ``verdict_settings`` read ``verdict.json`` in either format:
  schema 2 (declared contrasts, see the verdict schema shared with ``analysis/verdict.py``) or the
  earlier one (``claims`` each with ``tests``, or ``comparisons``, and a ``settings`` dict).
- ``arm_table`` / ``curve_table`` / ``drift_table`` turn ``aggregate.csv`` and ``curves.csv`` into
  per-arm numbers; cells are marked when their difference to the full-teacher arm is within the
  real-vs-real floor's spread.
- ``reading``, ``caveats``, ``next_steps`` and ``feature_findings`` write sentences from those numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

CONTRAST_COLUMNS = ["name", "claim", "arm", "versus", "isolates", "predicted", "metric", "effect", "ci_low",
                    "ci_high", "n_arm", "n_versus", "match", "match_met", "verdict", "reason"]
CLAIM_COLUMNS = ["claim", "question", "rule", "verdict", "contrasts"]
OLD_OUTCOME = {"not supported": "contradicted"}      # the earlier verdict's word for the same outcome
OLD_PREDICTED = {"directional": "arm worse", "non-inferiority": "arm no worse"}
# the earlier format does not store its claim rule; this is the rule analysis/verdict.py applied then
OLD_RULE = "supported when all its tests are supported; contradicted when any is; inconclusive otherwise"
METRIC_NAMES = {"fd_final": "FD (final)", "fd_best": "FD (best)", "precision_final": "precision",
                "recall_final": "recall", "coverage_final": "coverage", "fd": "FD", "precision": "precision",
                "recall": "recall", "coverage": "coverage", "fd_tail": "FD (mean of the last quarter)",
                "fd_auc": "FD area (log steps)", "fd_start": "FD (step 0)"}
HIGHER_IS_BETTER = ("precision", "recall", "coverage", "class_entropy")
# the memorisation columns analysis.ablation_summary writes (MEMO_COLUMNS there): column -> (space, figure)
MEMO_METRICS = {"nn_ratio_pixel": ("pixel", "nn_ratio"), "nn_ratio_features": ("features", "nn_ratio"),
                "copy_share_pixel": ("pixel", "copy_share"), "copy_share_features": ("features", "copy_share")}
METRIC_NAMES.update({"nn_ratio_pixel": "NN ratio (pixels)", "nn_ratio_features": "NN ratio (features)",
                     "copy_share_pixel": "copy share (pixels)", "copy_share_features": "copy share (features)"})


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def fmt(v, signed: bool = False) -> str:
    """A number to three or four significant figures; '—' for a missing one."""
    v = _f(v)
    if not math.isfinite(v):
        return "—"
    a = abs(v)
    text = f"{v:+.0f}" if a >= 100 else f"{v:+.1f}" if a >= 10 else f"{v:+.2f}" if a >= 1 else f"{v:+.3f}"
    return text if signed else text.lstrip("+")


def interval(lo, hi, signed: bool = False) -> str:
    if not (math.isfinite(_f(lo)) and math.isfinite(_f(hi))):
        return "—"
    return f"[{fmt(lo, signed)}, {fmt(hi, signed)}]"


def base_metric(metric: str) -> str:
    return "class_entropy" if str(metric).startswith("class_entropy") else str(metric).split("_")[0]


# --------------------------------------------------------------------------------- verdict
def _match_text(m) -> tuple[str, object]:
    if not m:
        return "", None
    met = m.get("met")
    return (f"{m.get('property', '?')}: arm {fmt(m.get('arm'))} vs {fmt(m.get('versus'))} "
            f"(tolerance {fmt(m.get('tolerance'))}) {'met' if met else 'NOT met'}"), met


def contrast_rows(verdict_json: dict | None) -> pd.DataFrame:
    """One row per contrast (columns ``CONTRAST_COLUMNS``) from a verdict.json of either format."""
    v = verdict_json or {}
    rows = []
    if "contrasts" in v:  # schema 2
        for c in v["contrasts"]:
            match, met = _match_text(c.get("match"))
            rows.append({**{k: c.get(k) for k in CONTRAST_COLUMNS}, "metric": c.get("metric", v.get("metric")),
                         "match": match, "match_met": met, "verdict": str(c.get("verdict", "inconclusive"))})
    else:
        for claim in v.get("claims", []):
            for t in claim.get("tests", claim.get("comparisons", [])):
                ci = t.get("ci") or [np.nan, np.nan]
                rows.append(dict(name=t.get("name"), claim=str(claim.get("claim")), arm=str(t.get("b", "")).strip(),
                                 versus=str(t.get("a", "")).strip(), isolates=t.get("question", ""),
                                 predicted=OLD_PREDICTED.get(t.get("kind"), t.get("kind")), metric=v.get("metric"),
                                 effect=t.get("effect"), ci_low=ci[0], ci_high=ci[1], n_arm=t.get("n_b"),
                                 n_versus=t.get("n_a"), match="", match_met=None,
                                 verdict=OLD_OUTCOME.get(t.get("outcome"), t.get("outcome", "inconclusive")),
                                 reason=t.get("reason", "")))
    df = pd.DataFrame.from_records(rows, columns=CONTRAST_COLUMNS)
    for c in ("effect", "ci_low", "ci_high"):
        df[c] = df[c].map(_f)
    for c in ("arm", "versus"):
        df[c] = df[c].map(lambda s: s if s and not str(s).startswith("[") else "(no runs)")
    return df


def claim_rows(verdict_json: dict | None) -> pd.DataFrame:
    """One row per claim: its question, the rule over its contrasts, its verdict, its contrasts."""
    v = verdict_json or {}
    rows = []
    for c in v.get("claims", []):
        if "contrasts" in v:
            rows.append(dict(claim=str(c.get("claim")), question=c.get("question", ""), rule=c.get("rule", ""),
                             verdict=c.get("verdict", "inconclusive"), contrasts=", ".join(c.get("contrasts", []))))
        else:
            tests = c.get("tests", c.get("comparisons", []))
            rows.append(dict(claim=str(c.get("claim")), question=c.get("statement", c.get("question", "")),
                             rule=OLD_RULE, verdict=OLD_OUTCOME.get(c.get("outcome"), c.get("outcome", "inconclusive")),
                             contrasts=", ".join(str(t.get("name")) for t in tests)))
    return pd.DataFrame.from_records(rows, columns=CLAIM_COLUMNS)


def verdict_settings(verdict_json: dict | None) -> dict:
    """metric, level, margin (and its rule), floor mean / std and the reference figure, from either format."""
    v = verdict_json or {}
    if "contrasts" in v:
        floor, ref = v.get("floor") or {}, v.get("reference") or {}
        return dict(metric=v.get("metric"), level=_f(v.get("level")), margin=_f(v.get("margin")),
                    margin_rule=v.get("margin_rule", ""), floor_mean=_f(floor.get("mean")),
                    floor_std=_f(floor.get("std")), reference=_f(ref.get(base_metric(v.get("metric", "fd")),
                                                                       ref.get("fd"))),
                    reference_steps=ref.get("steps"))
    s = v.get("settings", {})
    return dict(metric=v.get("metric"), level=_f(s.get("level")), margin=_f(s.get("margin")),
                margin_rule=(f"max({fmt(s.get('equiv_floor_sd'))} x floor std, {fmt(s.get('equiv_rel'))} x the "
                             f"reference value)" if "equiv_floor_sd" in s else ""),
                floor_mean=float("nan"), floor_std=_f(s.get("floor_sd")), reference=_f(s.get("reference_value")),
                reference_steps=None)


def load_verdict(ablation: Path) -> tuple[dict | None, str]:
    """(verdict.json content, verdict text); computed from summary.csv when the grid has no verdict files."""
    ablation = Path(ablation)
    text = (ablation / "verdict.txt").read_text() if (ablation / "verdict.txt").exists() else ""
    if (ablation / "verdict.json").exists():
        return json.loads((ablation / "verdict.json").read_text()), text
    if not (ablation / "summary.csv").exists():
        return None, text
    from analysis.verdict import verdict_from_dir

    result = verdict_from_dir(ablation)
    return json.loads(json.dumps(result.to_dict(), default=float)), result.text()


# ------------------------------------------------------------------------------- per arm
def teacher_arm(df: pd.DataFrame) -> str | None:
    """The full-teacher arm's init label: group "teacher", else an init called teacher / full."""
    if "init_group" in df and (df["init_group"] == "teacher").any():
        return str(df.loc[df["init_group"] == "teacher", "init"].iloc[0])
    for name in ("teacher", "full"):
        if (df["init"] == name).any():
            return name
    return None


def floor_std(reference: dict | None, metric: str) -> float:
    floor = (reference or {}).get("floor") or {}
    return _f(floor.get(f"{base_metric(metric)}_std"))


def arm_table(aggregate: pd.DataFrame, reference: dict | None) -> pd.DataFrame:
    """aggregate.csv plus, per row, the difference to the full-teacher arm (same method and metric) and
    whether it lies within the floor's spread (``within_floor``; False when no floor is known)."""
    df = aggregate.copy()
    base = teacher_arm(df)
    df["delta"] = np.nan
    df["floor_std"] = df["metric"].map(lambda m: floor_std(reference, m))
    if base is not None:
        ref = df[df["init"] == base].set_index(["method", "metric"])["mean"]
        df["delta"] = [m - ref.get((meth, met), np.nan) for m, meth, met in zip(df["mean"], df["method"], df["metric"])]
    df["within_floor"] = (df["init"] != base) & np.isfinite(df["delta"]) & np.isfinite(df["floor_std"]) & \
        (df["delta"].abs() <= df["floor_std"])
    df["teacher_arm"] = base
    return df


def memorisation_table(arms: pd.DataFrame, reference: dict | None) -> pd.DataFrame:
    """One row per arm (init, method) with mean and std over seeds of each ``MEMO_METRICS`` column,
    the teacher first (from reference.json's ``memorisation``, one draw: std NaN) when it has one."""
    rows = []
    m = (reference or {}).get("memorisation") or {}
    if m:
        rows.append({"arm": "teacher (reference)", "method": "", "n": 1,
                     **{c: _f((m.get(space) or {}).get(key)) for c, (space, key) in MEMO_METRICS.items()},
                     **{f"{c}_std": np.nan for c in MEMO_METRICS}})
    sub = arms[arms["metric"].isin(list(MEMO_METRICS))]
    for arm in arm_order(sub) if len(sub) else []:
        for method in dict.fromkeys(sub["method"]):
            g = sub[(sub["init"] == arm) & (sub["method"] == method)].set_index("metric")
            if g.empty:
                continue
            row = {"arm": arm, "method": method, "n": int(g["n"].max())}
            for c in MEMO_METRICS:
                row[c] = _f(g["mean"].get(c))
                row[f"{c}_std"] = _f(g["std"].get(c))
            rows.append(row)
    return pd.DataFrame.from_records(rows, columns=["arm", "method", "n", *MEMO_METRICS,
                                                    *[f"{c}_std" for c in MEMO_METRICS]])


def arm_order(df: pd.DataFrame) -> list[str]:
    """Init labels with the full-teacher arm first, then in grid order."""
    order = list(dict.fromkeys(df["init"]))
    base = teacher_arm(df) if len(df) else None
    return ([base] if base is not None and base in order else []) + [i for i in order if i != base]


def curve_table(curves: pd.DataFrame, metric: str = "fd") -> pd.DataFrame:
    """Per (init, method, step): mean, min, max and count over seeds of one curve metric."""
    sub = curves[curves["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=["init", "method", "step", "mean", "lo", "hi", "n"])
    g = sub.groupby(["init", "method", "step"], sort=False)["value"]
    return g.agg(mean="mean", lo="min", hi="max", n="count").reset_index()


def drift_table(curves: pd.DataFrame) -> pd.DataFrame:
    """CKA-to-the-teacher rows of curves.csv (feature drift during training), when the grid logs them.

    Accepted shapes: a ``metric`` starting with "cka" and ``layer`` (and ``sigma``) columns, or metric
    names ``cka`` / ``cka_<layer>`` without them. Returns init, method, seed, step, layer, value.
    """
    sub = curves[curves["metric"].astype(str).str.startswith("cka")].copy()
    if sub.empty:
        return pd.DataFrame(columns=["init", "method", "seed", "step", "layer", "value"])
    if "layer" not in sub or sub["layer"].isna().all():
        sub["layer"] = sub["metric"].str.replace(r"^cka_?", "", regex=True).replace("", "mean")
    return sub[["init", "method", "seed", "step", "layer", "value"]]


def plateau(curve: pd.DataFrame, spread: float) -> tuple[bool | None, float, float]:
    """(plateaued?, value at the start of the last quarter, last value) of a mean curve (step, mean).

    Plateaued: the last 25% of evaluations (at least two) move by no more than the floor's spread.
    None when there are too few evaluations or no spread to judge by.
    """
    c = curve.sort_values("step")
    k = max(2, int(math.ceil(0.25 * len(c))))
    if len(c) < 3 or not math.isfinite(spread):
        return (None, float(c["mean"].iloc[0]) if len(c) else float("nan"),
                float(c["mean"].iloc[-1]) if len(c) else float("nan"))
    tail = c["mean"].iloc[-k:]
    return bool(tail.max() - tail.min() <= spread), float(tail.iloc[0]), float(tail.iloc[-1])


# ------------------------------------------------------------------------------- sentences
def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def reading(claims: pd.DataFrame, contrasts: pd.DataFrame, arms: pd.DataFrame | None, reference: dict | None,
            steps: int | None, metric: str) -> list[str]:
    """The claim-level verdicts, the contrast that decides most, where the arms stand, the metric's resolution."""
    lines = []
    if len(claims):
        lines.append("Claims: " + "; ".join(f"claim {r.claim} ({r.question}) is {r.verdict.upper()}"
                                            for r in claims.itertuples()) + ".")
    else:
        lines.append("No verdict: no ablation directory with a summary was given.")
    if len(contrasts):
        counts = contrasts["verdict"].value_counts()
        tally = ", ".join(f"{counts[k]} {k}" for k in ("supported", "contradicted", "inconclusive", "refused")
                          if k in counts)
        decided = contrasts[contrasts["verdict"].isin(["supported", "contradicted"])]
        if len(decided):
            top = decided.loc[decided["effect"].abs().idxmax()]
            lines.append(f"Of {plural(len(contrasts), 'contrast')}: {tally}. The largest decided effect is "
                         f"{top['name']} ({top['arm']} vs {top['versus']}): {fmt(top['effect'], True)} "
                         f"{interval(top['ci_low'], top['ci_high'], True)} in {METRIC_NAMES.get(metric, metric)}, "
                         f"{top['verdict']}.")
        else:
            reasons = contrasts["reason"].value_counts()
            lines.append(f"Of {plural(len(contrasts), 'contrast')}: {tally}; none is decided. Most common reason: "
                         f"{reasons.index[0]}.")
    else:
        lines.append("No contrast was judged.")
    lines.append(standing(arms, reference, steps, metric))
    sentence = resolution(reference, metric)
    if sentence:
        lines.append(sentence)
    return lines


HEADROOM = 3.0                  # teacher / floor ratio from which the metric can rank arms near the teacher


def resolution(reference: dict | None, metric: str) -> str:
    """Whether the data set leaves the metric room above its floor to rank arms at convergence.

    Arms that train long enough approach the teacher's figure; when that figure sits at the
    real-vs-real floor (digits: 10.1 vs 10.5 +- 1.3) every such arm lands inside the floor's noise,
    so only the learning curves before convergence can separate them. The ratio ``HEADROOM`` is the
    benchmark issue's bar (teacher at least 3x the floor). Empty when the figures are unknown or the
    metric is not a distance.
    """
    ref = reference or {}
    base = base_metric(metric)
    floor = ref.get("floor") or {}
    t, f, s = _f(ref.get(base)), _f(floor.get(base)), _f(floor.get(f"{base}_std"))
    if base in HIGHER_IS_BETTER or not (math.isfinite(t) and math.isfinite(f) and f > 0):
        return ""
    s = s if math.isfinite(s) else 0.0
    name = METRIC_NAMES.get(base, base)
    if t <= f + 2 * s:
        return (f"Resolution: the teacher's own {name} ({fmt(t)}) lies within the real-vs-real floor ({fmt(f)} ± "
                f"{fmt(s)}), so on this data the metric cannot separate arms at convergence: any arm that trains "
                f"long enough ends inside the floor's noise, and only the learning curves before that differ.")
    ratio = t / f
    if ratio < HEADROOM:
        return (f"Resolution: the teacher's own {name} ({fmt(t)}) is only {fmt(ratio)}x the floor ({fmt(f)} ± "
                f"{fmt(s)}): arms near the teacher's quality are hard to rank at convergence.")
    return (f"Resolution: the teacher's own {name} ({fmt(t)}) is {fmt(ratio)}x the floor ({fmt(f)} ± {fmt(s)}): the "
            f"metric has room to rank arms near the teacher's quality.")


def standing(arms: pd.DataFrame | None, reference: dict | None, steps: int | None, metric: str) -> str:
    if arms is None or arms.empty or not (arms["metric"] == metric).any():
        return "No per-arm results (aggregate.csv) to place against the teacher's figure."
    sub = arms[(arms["metric"] == metric) & np.isfinite(arms["mean"])]
    if sub.empty:
        return "No arm has finished runs yet."
    higher = base_metric(metric) in HIGHER_IS_BETTER
    best = sub.loc[sub["mean"].idxmax() if higher else sub["mean"].idxmin()]
    worst = sub.loc[sub["mean"].idxmin() if higher else sub["mean"].idxmax()]
    name = METRIC_NAMES.get(metric, metric)
    spread = f" ± {fmt(best['std'])}" if math.isfinite(_f(best["std"])) else ""
    # means only: whether two arms differ is what the contrasts decide, so this line ranks no arm as "best"
    text = (f"After {steps if steps else '?'} generator steps the best mean is {best['init']}'s ({name} "
            f"{fmt(best['mean'])}{spread}, {plural(int(best['n']), 'seed')}) and the worst {worst['init']}'s "
            f"({fmt(worst['mean'])}; the contrasts say which differences the seeds resolve)")
    ref = reference or {}
    base = base_metric(metric)
    if math.isfinite(_f(ref.get(base))):
        text += f"; the teacher's own figure is {fmt(ref[base])} ({ref.get('sampler', 'multi-step')})"
    floor = ref.get("floor") or {}
    if math.isfinite(_f(floor.get(base))):
        text += f" and the real-vs-real floor {fmt(floor[base])} ± {fmt(floor.get(f'{base}_std'))}"
    return text + "."


def caveats(arms: pd.DataFrame | None, contrasts: pd.DataFrame, settings: dict, reference: dict | None,
            curve: pd.DataFrame | None, steps: int | None, n_eval: int | None, metric: str) -> list[str]:
    """Limits of the evidence, each measured: the metric floor, the budget, the seeds, the margin."""
    out = []
    base = base_metric(metric)
    ref = reference or {}
    floor = ref.get("floor") or {}
    spread = _f(floor.get(f"{base}_std"))
    if math.isfinite(_f(floor.get(base))):
        line = (f"Metric floor: two real samples of {floor.get('n', '?')} images differ by {fmt(floor[base])} ± "
                f"{fmt(spread)} in {base.upper() if base == 'fd' else base} ({floor.get('n_resamples', '?')} "
                f"resamples); a difference below {fmt(spread)} is not a difference.")
        if arms is not None and len(arms):
            sub = arms[(arms["metric"] == metric) & (arms["init"] != arms["teacher_arm"])]
            if len(sub):
                line += (f" {int(sub['within_floor'].sum())} of {plural(len(sub), 'arm')} lie within that spread "
                         f"of the full-teacher arm.")
        if math.isfinite(_f(ref.get(base))):
            t, f = _f(ref[base]), _f(floor[base])
            line += f" The teacher's own figure ({fmt(t)}) is {fmt(t / max(f, 1e-12))}x the floor"
            line += (": at this sample size the metric cannot tell the teacher from real data, so no arm can be "
                     "shown to match the teacher more closely than that." if t <= f + (spread if math.isfinite(spread)
                                                                                       else 0.0) else ".")
        out.append(line)
    else:
        out.append("Metric floor: unknown (no reference.json with a real-vs-real floor); differences cannot be "
                   "told from resampling noise.")
    if curve is not None and len(curve):
        flat, start, end = plateau(curve, spread)
        if flat is None:
            out.append(f"Budget: {steps if steps else '?'} generator steps with {plural(len(curve), 'evaluation')}"
                       f" of the full-teacher arm: too few to tell whether it has converged.")
        elif flat:
            out.append(f"Budget: {steps} generator steps; the full-teacher arm has plateaued (its last quarter of "
                       f"evaluations stays within the floor's spread, {fmt(start)} to {fmt(end)}).")
        else:
            out.append(f"Budget: {steps} generator steps; the full-teacher arm is still moving ({fmt(start)} to "
                       f"{fmt(end)} over its last quarter of evaluations, more than the floor's spread "
                       f"{fmt(spread)}): every contrast is judged before convergence.")
    if arms is not None and len(arms):
        n = arms[arms["metric"] == metric]["n"]
        few = contrasts[contrasts["reason"].astype(str).str.contains("fewer than", na=False)] if len(contrasts) else []
        count = (plural(int(n.min()), "finished run") if n.min() == n.max()
                 else f"{int(n.min())} to {int(n.max())} finished runs")
        out.append(f"Seeds: {count} per arm"
                   + (f"; {plural(len(few), 'contrast')} cannot be decided for want of seeds" if len(few) else "")
                   + ". Arms are never pooled; intervals are percentile bootstraps over seeds.")
    if n_eval:
        out.append(f"Evaluation: every figure uses {n_eval} generated images against the held-out set.")
    if math.isfinite(_f(settings.get("margin"))):
        out.append(f"Equivalence margin: {fmt(settings['margin'])} in {METRIC_NAMES.get(metric, metric)}"
                   + (f" ({settings['margin_rule']})" if settings.get("margin_rule") else "")
                   + "; a difference inside it is treated as no difference.")
    refused = list(contrasts[contrasts["verdict"] == "refused"].itertuples()) if len(contrasts) else []
    for r in refused:
        out.append(f"Refused: {r.name} was not compared because its declared match failed ({r.reason}).")
    return out


def next_steps(arms: pd.DataFrame | None, contrasts: pd.DataFrame, curve: pd.DataFrame | None,
               reference: dict | None, steps: int | None, command: str, metric: str,
               has_features: bool, has_drift: bool) -> list[str]:
    """What would settle what is still open, from the same numbers; ``command`` reruns the grid."""
    out = []
    if arms is not None and len(arms):
        n = int(arms[arms["metric"] == metric]["n"].min())
        if n < 3:
            out.append(f"More seeds: the smallest arm has {plural(n, 'seed')} (fewer than 3); `{command} "
                       f"--seeds 0,1,2` adds them (finished runs are reused).")
    points = []
    for r in contrasts.itertuples() if len(contrasts) else []:
        if r.verdict != "inconclusive" or not (math.isfinite(r.ci_low) and math.isfinite(r.ci_high)):
            continue
        half = (r.ci_high - r.ci_low) / 2
        n_now = min(x for x in (_f(r.n_arm), _f(r.n_versus)) if math.isfinite(x) and x > 0) \
            if any(math.isfinite(x) and x > 0 for x in (_f(r.n_arm), _f(r.n_versus))) else 1
        if half > 0 and abs(r.effect) > 0:
            need = int(math.ceil(n_now * (half / abs(r.effect)) ** 2)) + 1
            out.append(f"{r.name} is inconclusive with an interval of half-width {fmt(half)} around an effect of "
                       f"{fmt(r.effect, True)}; about {need} seeds per arm would exclude 0 if the effect holds "
                       f"(intervals shrink as 1/sqrt(n)).")
        elif half == 0:
            points.append(str(r.name))
    if points:
        out.append(f"{', '.join(points)} {'is' if len(points) == 1 else 'are'} inconclusive because an arm has a "
                   f"single run: {'its interval is' if len(points) == 1 else 'their intervals are'} a point.")
    if curve is not None and len(curve):
        spread = floor_std(reference, metric)
        flat, start, end = plateau(curve, spread)
        if flat is False:
            out.append(f"A longer budget: the full-teacher arm still moves ({fmt(start)} to {fmt(end)}) at "
                       f"{steps} steps; `{command} --steps {2 * int(steps or 0)}` continues every run.")
    for r in contrasts[contrasts["verdict"] == "refused"].itertuples() if len(contrasts) else []:
        out.append(f"A matched control for {r.name}: {r.match or r.reason}.")
    if not (reference or {}).get("fd"):
        out.append("The teacher's own figure: set reference_steps in the grid so claim 1 has a reference.")
    if not has_features:
        out.append("Features: set features = true in the grid to extract CKA and probes for the explanation.")
    if not has_drift:
        out.append("Feature drift: log CKA to the teacher per layer at each evaluation (curves.csv) to see which "
                   "representations the students keep and which they rewrite.")
    return out


def cka_by_init(cka: pd.DataFrame) -> pd.DataFrame:
    """Mean CKA to the teacher per init (over layers, sigmas and seeds) and its most / least kept layer."""
    rows = []
    for init, g in cka.groupby("init", sort=False):
        by_layer = g.groupby("layer", sort=False)["cka"].mean()
        rows.append(dict(init=init, mean_cka=float(g["cka"].mean()), most_kept=by_layer.idxmax(),
                         most_kept_cka=float(by_layer.max()), least_kept=by_layer.idxmin(),
                         least_kept_cka=float(by_layer.min()), n_seeds=int(g["seed"].nunique()) if "seed" in g else 1))
    return pd.DataFrame(rows)


def feature_findings(cka: pd.DataFrame | None, probes: pd.DataFrame | None, arms: pd.DataFrame | None,
                     metric: str, short) -> list[str]:
    """Sentences linking feature similarity to quality: mean CKA per arm beside its final metric."""
    out = []
    if cka is not None and len(cka):
        by = cka_by_init(cka)
        quality = {}
        if arms is not None and len(arms):
            q = arms[arms["metric"] == metric].groupby("init")["mean"].mean()
            quality = q.to_dict()
        parts = [f"{r.init} {r.mean_cka:.2f}" + (f" ({METRIC_NAMES.get(metric, metric)} {fmt(quality[r.init])})"
                                                  if r.init in quality else "") for r in by.itertuples()]
        out.append("Mean debiased CKA to the teacher over layers and noise levels: " + "; ".join(parts) + ".")
        if len(by) >= 3 and quality:
            both = by[by["init"].isin(quality)]
            if len(both) >= 3:
                from scipy.stats import spearmanr

                rho = spearmanr(both["mean_cka"], [quality[i] for i in both["init"]]).statistic
                if math.isfinite(rho):
                    out.append(f"Across {len(both)} arms the rank correlation of mean CKA with "
                               f"{METRIC_NAMES.get(metric, metric)} is {rho:+.2f} (arms, not seeds: descriptive only).")
        low = by.loc[by["mean_cka"].idxmin()]
        out.append(f"The arm that moved furthest from the teacher, {low.init}, kept {short(low.most_kept)} most "
                   f"(CKA {low.most_kept_cka:.2f}) and {short(low.least_kept)} least ({low.least_kept_cka:.2f}).")
    if probes is not None and len(probes):
        lab = probes[probes["target"] == "label"] if "target" in probes else probes
        if len(lab):
            low_sigma = lab["sigma"].min()
            by = lab[lab["sigma"] == low_sigma].groupby("init", sort=False)["accuracy"].mean()
            chance = f" (chance {lab['chance'].max():.2f})" if "chance" in lab else ""
            out.append(f"Linear-probe label accuracy at σ = {low_sigma:g}, mean over layers{chance}: "
                       + "; ".join(f"{k} {v:.2f}" for k, v in by.items()) + ".")
    return out
