"""The report's sections, one function each, laid out as an argument (see ``analysis.report``).

Page 1, the answer: the question, the verdict per contrast, the headline learning curves with the
teacher's figure and the floor, a three-sentence reading computed from the data, and what was run.
Then: contents; 1 the claim; 2 the evidence for each contrast (contrasts, per-arm tables, learning
curves, samples); 3 the explanation from features (CKA teacher vs students, the teacher's own maps,
probes, feature drift, UMAP, other analysis tables); 4 caveats; 5 what to run next.

A section function adds blocks to the document and returns True, or returns the reason it has
nothing to show; the reason is printed in its place and in the contents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from analysis.heatmaps import (
    LAYER_KEY,
    NULL_MARK,
    Panel,
    cka_panel,
    draw_cka_heatmap,
    draw_panels,
    probe_panel,
    short_layer,
)
from analysis.report_data import (
    MEMO_METRICS,
    METRIC_NAMES,
    arm_order,
    arm_table,
    base_metric,
    caveats,
    claim_rows,
    contrast_rows,
    curve_table,
    drift_table,
    feature_findings,
    fmt,
    interval,
    load_verdict,
    memorisation_table,
    next_steps,
    reading,
    teacher_arm,
    verdict_settings,
)
from analysis.report_layout import BODY_W as BODY_WIDTH
from analysis.report_layout import GREY_CELL, VERDICT_STYLE, Column, Document, NeedSpace, Paragraph, Spacer, Table

ARM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
               "#bcbd22"]
CURVE_METRICS = [("fd", "FD (log scale)", True), ("precision", "precision", False), ("recall", "recall", False),
                 ("coverage", "coverage", False)]


# ---------------------------------------------------------------------------------- inputs
def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if Path(path).exists() else {}


def _metrics(run: Path) -> pd.DataFrame:
    p = Path(run) / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
    return pd.DataFrame(rows)


def run_label(run: Path) -> str:
    cfg = _json(Path(run) / "config.json").get("config", {})
    return f"{cfg.get('method', '?')} / init {cfg.get('init', '?')} / seed {cfg.get('seed', '?')}"


@dataclass
class Grid:
    """One ablation directory and everything the report reads from it."""

    path: Path
    grid: dict
    verdict: dict | None
    verdict_text: str
    contrasts: pd.DataFrame
    claims: pd.DataFrame
    settings: dict
    reference: dict
    summary: pd.DataFrame
    arms: pd.DataFrame | None
    curves: pd.DataFrame
    cka: pd.DataFrame | None
    probes: pd.DataFrame | None
    drift: pd.DataFrame
    metric: str
    steps: int | None
    config: dict = field(default_factory=dict)    # how the grid was run (grid.json "config")

    @classmethod
    def read(cls, path: Path) -> Grid:
        path = Path(path)
        verdict, text = load_verdict(path)
        settings = verdict_settings(verdict)
        metric = settings.get("metric") or "fd_final"
        reference = _json(path / "reference.json")
        summary = pd.read_csv(path / "summary.csv")
        agg = pd.read_csv(path / "aggregate.csv") if (path / "aggregate.csv").exists() else None
        curves = pd.read_csv(path / "curves.csv") if (path / "curves.csv").exists() else pd.DataFrame(
            columns=["run", "init", "method", "seed", "step", "metric", "value"])
        recorded = _json(path / "grid.json")
        grid = recorded.get("grid", {})
        steps = grid.get("student", {}).get("steps")
        if steps is None and "steps_done" in summary:
            steps = int(summary["steps_done"].max())
        return cls(path, grid, verdict, text, contrast_rows(verdict), claim_rows(verdict), settings, reference,
                   summary, arm_table(agg, reference) if agg is not None and len(agg) else None, curves,
                   (pd.read_csv(path / "cka_teacher_student.csv")
                    if (path / "cka_teacher_student.csv").exists() else None),
                   pd.read_csv(path / "probes.csv") if (path / "probes.csv").exists() else None,
                   drift_table(curves), metric, steps, recorded.get("config", {}))

    @property
    def name(self) -> str:
        return self.path.name

    def teacher_curve(self) -> pd.DataFrame | None:
        base = teacher_arm(self.summary) if len(self.summary) else None
        c = curve_table(self.curves, base_metric(self.metric))
        return c[c["init"] == base] if base is not None and len(c) else None

    def command(self) -> str:
        """The command that reruns (and extends) this grid."""
        cfg = self.config
        text = f"probe train ablation --config {cfg.get('config', self.grid.get('source', '<grid>'))} --out {self.path}"
        return text + (f" --teacher {cfg['teacher']}" if cfg.get("teacher") else "")

    def n_eval(self) -> int | None:
        return (self.reference.get("key") or {}).get("n_samples") or self.grid.get("student", {}).get("eval_samples")


class FoundInputs(Protocol):
    """What ``analysis.report.discover`` found (its ``Found``; a Protocol here: report imports this module)."""

    teachers: list
    students: list
    probe_tables: list
    cka_tables: list


class ReportSettings(Protocol):
    """The settings the sections read (``analysis.report.ReportConfig``)."""

    inputs: list
    title: str
    umap: bool
    seed: int
    max_students: int


@dataclass
class Ctx:
    """The document being written, the inputs, and the contents entries gathered on the way."""

    doc: Document
    found: FoundInputs
    cfg: ReportSettings
    grids: list
    entries: list = field(default_factory=list)   # (number, title, heading block, status)
    counters: list = field(default_factory=lambda: [0, 0])
    other_cka: list = field(default_factory=list)  # CKA tables not drawn as teacher maps (set by _teacher_pairs)

    def section(self, title: str, fn, level: int = 1, together: bool = False):
        """A numbered heading, then ``fn``'s blocks; ``together``: start a new page unless all fit here."""
        if level == 1:
            self.counters = [self.counters[0] + 1, 0]
            number = f"{self.counters[0]}"
        else:
            self.counters[1] += 1
            number = f"{self.counters[0]}.{self.counters[1]}"
        need = self.doc.add(NeedSpace()) if together else None
        start = len(self.doc.blocks)
        heading = self.doc.heading(f"{number}  {title}", level)
        slot = len(self.entries)
        self.entries.append(None)  # reserved: a section is listed before its subsections
        result = fn()
        if result is not True:
            self.doc.para(f"Omitted: {result}.", style="italic", color="0.35", size=8.5)
        if need is not None:
            need.keep = self.doc.blocks[start:]
        self.entries[slot] = (number, title, heading, "included" if result is True else f"omitted: {result}")
        return result


def verdict_cell(table_cells: list, col: int) -> tuple[dict, dict]:
    """(background, text colour) maps that colour a verdict column."""
    bg, fg = {}, {}
    for i, row in enumerate(table_cells):
        style = VERDICT_STYLE.get(str(row[col]).lower())
        if style:
            fg[(i, col)], bg[(i, col)] = style
    return bg, fg


# ------------------------------------------------------------------------------- figures
def _curve_arms(g: Grid, limit: int = 6) -> list[str]:
    order = arm_order(g.summary) if len(g.summary) else []
    if len(order) <= limit:
        return order
    named = set(g.contrasts["arm"]) | set(g.contrasts["versus"]) if len(g.contrasts) else set()
    keep = [order[0]] + [a for a in order[1:] if a in named]
    return (keep + [a for a in order if a not in keep])[:limit]


def _colour_map(arms: list[str]) -> dict:
    return {a: ARM_COLOURS[i % len(ARM_COLOURS)] for i, a in enumerate(arms)}


def draw_curves(ax, curves: pd.DataFrame, arms: list[str], colours: dict, metric: str, reference: dict,
                log: bool, legend: bool = True, min_max_label: bool = True) -> None:
    """Mean curve per arm with its range over seeds, the teacher's figure and the real-vs-real floor."""
    table = curve_table(curves, metric)
    for arm in arms:
        for method, c in table[table["init"] == arm].groupby("method", sort=False):
            c = c.sort_values("step")
            n = int(c["n"].max())
            label = (f"init {arm} ({n} seed{'s' if n != 1 else ''})"
                     + (f", {method}" if table["method"].nunique() > 1 else ""))
            ax.plot(c["step"], c["mean"], color=colours[arm], lw=1.4, marker="o", ms=2.5, label=label)
            if n > 1:
                ax.fill_between(c["step"], c["lo"], c["hi"], color=colours[arm], alpha=0.18, lw=0)
    ref = reference or {}
    floor = ref.get("floor") or {}
    if metric in floor and np.isfinite(floor.get(metric, np.nan)):
        m, s = float(floor[metric]), float(floor.get(f"{metric}_std", 0.0) or 0.0)
        ax.axhspan(m - s, m + s, color="0.6", alpha=0.25, lw=0, label="real-vs-real floor ± std")
        ax.axhline(m, color="0.45", lw=0.8, ls="--")
    if metric in ref and np.isfinite(ref.get(metric, np.nan)):
        ax.axhline(float(ref[metric]), color="black", lw=1.0, ls=":",
                   label=f"teacher's own figure ({ref.get('sampler', 'multi-step')})")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("generator step")
    ax.grid(alpha=0.25, lw=0.5)
    if legend:
        ax.legend(fontsize=6.5, loc="best", frameon=False)


def headline_figure(ctx: Ctx, g: Grid) -> bool | str:
    metric = base_metric(g.metric)
    if g.curves.empty or not (g.curves["metric"] == metric).any():
        return "curves.csv has no learning curves"
    arms = _curve_arms(g)
    colours = _colour_map(arm_order(g.summary))
    log = metric == "fd"

    def draw(sf):
        ax = sf.subplots()
        draw_curves(ax, g.curves, arms, colours, metric, g.reference, log, legend=False)
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)}" + (" (log scale)" if log else ""))
        handles, labels = ax.get_legend_handles_labels()
        sf.legend(handles, labels, loc="outside right upper", fontsize=6.5, frameon=False)

    ref = g.reference
    lines = ([f"dotted: the teacher's own figure ({ref.get('sampler', 'multi-step')})"] if metric in ref else []) + \
        (["grey band: the real-vs-real floor ± its std"] if metric in (ref.get("floor") or {}) else [])
    marks = "; ".join(lines)
    ctx.doc.figure(draw, 2.5, (
        f"Learning curves of the key arms: {METRIC_NAMES.get(metric, metric)} of the one-step (EMA) generator at each "
        f"evaluation, mean over seeds with the range over seeds shaded. {marks[:1].upper() + marks[1:]}. "
        f"Look for the gap between arms at the last step and how far the best arm is from the dotted line; "
        f"gaps inside the grey band's width are noise."), "headline-curves",
        data={"curves": curve_table(g.curves, metric)})
    return True


def forest_figure(ctx: Ctx, g: Grid) -> None:
    c = g.contrasts
    margin = g.settings.get("margin", float("nan"))

    def draw(sf):
        ax = sf.subplots()
        y = np.arange(len(c))[::-1]
        for yi, r in zip(y, c.itertuples()):
            colour = VERDICT_STYLE.get(r.verdict, ("black", ""))[0]
            if math.isfinite(r.effect):
                lo, hi = (r.ci_low, r.ci_high) if math.isfinite(r.ci_low) else (r.effect, r.effect)
                ax.plot([lo, hi], [yi, yi], color=colour, lw=2.2, solid_capstyle="butt")
                ax.plot([r.effect], [yi], "o", color=colour, ms=5)
            else:  # written at the left edge, in axes coordinates, so it never sits on a data point
                ax.text(0.01, yi, "no estimate (no runs)", va="center", fontsize=6.5, color=colour,
                        transform=ax.get_yaxis_transform())
        ax.axvline(0, color="black", lw=0.8)
        if math.isfinite(margin) and margin > 0:
            ax.axvspan(-margin, margin, color="0.85", lw=0, label=f"± margin {fmt(margin)}")
            ax.legend(fontsize=6.5, loc="lower right", frameon=False)
        ax.set_yticks(y, labels=[f"{r.name}: {r.verdict}" for r in c.itertuples()], fontsize=7)
        ax.set_ylim(-0.6, len(c) - 0.4)
        ax.margins(x=0.06)
        ax.set_xlabel(f"effect: {METRIC_NAMES.get(g.metric, g.metric)} of arm minus versus (> 0: arm worse)")
        ax.grid(axis="x", alpha=0.25, lw=0.5)

    ctx.doc.figure(draw, max(1.3, 0.5 + 0.32 * len(c)), (
        f"Effect and {g.settings.get('level', 0.95):.0%} bootstrap interval of each contrast, coloured by its verdict. "
        f"A contrast predicted 'arm worse' is supported when its interval lies right of 0 and outside the grey "
        f"margin; an interval across 0 is inconclusive."), "contrast-effects", data={"contrasts": c})


# ------------------------------------------------------------------------------- page one
def answer_page(ctx: Ctx) -> None:
    doc = ctx.doc
    g = ctx.grids[0] if ctx.grids else None
    doc.add(Paragraph(ctx.cfg.title, size=19, weight="bold", space_before=0.0))
    doc.add(Paragraph(f"Appendix report of {', '.join(map(str, ctx.cfg.inputs))}", size=8.5, color="0.35",
                      style="italic", space_before=0.04))
    doc.add(Spacer(0.06))
    if g is not None and len(g.claims):
        question = " ".join(f"Claim {r.claim}: {r.question.rstrip('.?')}?" for r in g.claims.itertuples())
        doc.add(Paragraph(question, size=9.5, label="Question.", space_before=0.08))
    else:
        doc.add(Paragraph("no verdict could be formed: " + ("no ablation directory was given" if g is None else
                                                             "its verdict names no claim"),
                          size=9.5, label="Question.", space_before=0.08))
    if g is not None and len(g.contrasts):
        verdict_table(ctx, g, compact=True)
    if g is not None:
        headline_figure(ctx, g)
        lines = reading(g.claims, g.contrasts, g.arms, g.reference, g.steps, g.metric)
    else:
        lines = reading(pd.DataFrame(columns=["claim"]), pd.DataFrame(), None, None, None, "fd_final")
        student_curves_figure(ctx, headline=True)
    doc.add(Paragraph("Reading of the data (generated from the tables, three sentences):", size=8.5, weight="bold",
                      space_before=0.12))
    for i, line in enumerate(lines, start=1):
        doc.add(Paragraph(line, size=8.5, bullet=f"{i}.", space_before=0.03))
    what_was_run(ctx)
    doc.page_break(first_only=True)


def verdict_table(ctx: Ctx, g: Grid, compact: bool) -> None:
    c = g.contrasts
    metric = METRIC_NAMES.get(g.metric, g.metric)
    level = g.settings.get("level", 0.95)
    level = f"{level:.0%}" if math.isfinite(level) else "95%"
    if compact:
        columns = [Column("Contrast"), Column("Claim", "center"), Column("Arm vs versus", wrap=True),
                   Column("Predicted"), Column("Effect", "right"), Column(f"{level} interval", "right"),
                   Column("n", "center"), Column("Verdict", "center")]
        cells = [[str(r.name), str(r.claim), f"{r.arm} vs {r.versus}", str(r.predicted), fmt(r.effect, True),
                  interval(r.ci_low, r.ci_high, True), f"{_int(r.n_arm)}/{_int(r.n_versus)}", str(r.verdict)]
                 for r in c.itertuples()]
        caption = (f"Verdict per contrast. Effect: mean {metric} of arm minus that of versus (> 0: arm worse); "
                   f"n: runs (arm/versus).")
    else:
        columns = [Column("Contrast", wrap=True), Column("What it isolates", wrap=True),
                   Column("Match held fixed", wrap=True),
                   Column("Effect", "right"), Column(f"{level} interval", "right"), Column("Verdict", "center"),
                   Column("Reason", wrap=True)]
        cells = [[f"{r.name}\n{r.arm} vs\n{r.versus}", str(r.isolates or "—"), str(r.match or "none declared"),
                  fmt(r.effect, True), interval(r.ci_low, r.ci_high, True), str(r.verdict), str(r.reason or "")]
                 for r in c.itertuples()]
        caption = (f"The evidence for each contrast ({g.name}): what it holds fixed and what it isolates, the measured "
                   f"match, the effect in {metric} with its interval, the verdict and the rule that decided it.")
    col = len(columns) - (1 if compact else 2)
    bg, fg = verdict_cell(cells, col)
    ctx.doc.table(columns, cells, caption, "verdict-contrasts" if compact else "contrast-evidence",
                  csv=c, bg=bg, fg=fg, bold={(i, col) for i in range(len(cells))}, size=7.0)


def _int(v) -> str:
    try:
        return str(int(v))
    except (TypeError, ValueError):
        return "—"


def what_was_run(ctx: Ctx) -> None:
    rows = []
    found = ctx.found
    data = set()
    wall = 0.0
    for t in found.teachers:
        conf = _json(t / "config.json").get("config", {})
        m = _metrics(t)
        secs = float(m["seconds"].max()) if "seconds" in m else float("nan")
        wall += secs if math.isfinite(secs) else 0.0
        data.add(str(_json(t / "model.json").get("dataset") or conf.get("data")))
        rows.append(["Teacher", f"{t}: {conf.get('steps')} steps (preset {conf.get('preset')}, batch "
                                f"{conf.get('batch')}), seed {conf.get('seed')}, wall time {fmt(secs)} s"])
    for g in ctx.grids:
        s = g.summary
        done = int((s["status"] == "done").sum()) if "status" in s else len(s)
        secs = float(s["seconds"].sum()) if "seconds" in s else float("nan")
        wall += secs if math.isfinite(secs) else 0.0
        inits = ", ".join(f"{i['label']} ({i['group']})" for i in g.grid.get("inits", [])) or \
            ", ".join(arm_order(s))
        st = g.grid.get("student", {})
        rows.append(["Grid", f"{g.path} from {Path(str(g.grid.get('source', '?'))).name}: arms {inits}; methods "
                             f"{', '.join(g.grid.get('methods', sorted(s['method'].unique())))}; seeds "
                             f"{', '.join(map(str, g.grid.get('seeds', sorted(s['seed'].unique()))))}; "
                             f"{g.steps} generator steps each, evaluated every {st.get('eval_every', '?')} steps; "
                             f"{done} of {len(s)} runs finished, {fmt(secs)} s of training"])
        ref = g.reference
        if ref:
            ev = ref.get("evaluator", {})
            floor = ref.get("floor") or {}
            data.add(str(ev.get("dataset")))
            rows.append(["Evaluation", f"FD on {ev.get('n_samples', ref.get('n'))} generated images, features of a "
                                       f"classifier (test accuracy {fmt(ev.get('classifier_test_accuracy'))}); "
                                       f"teacher's figure {fmt(ref.get('fd'))} ({ref.get('sampler')}); real-vs-real "
                                       f"floor {fmt(floor.get('fd'))} ± {fmt(floor.get('fd_std'))}"])
        ex = g.grid.get("extract") or {}
        if g.grid.get("features") and ex:
            rows.append(["Features", f"{ex.get('n_samples')} {ex.get('split')} images at σ = "
                                     f"{', '.join(f'{x:g}' for x in ex.get('sigmas', []))}; layers "
                                     f"{', '.join(map(short_layer, ex.get('layers') or [])) or 'all blocks'}"])
    other = [s for s in found.students if not any(g.path in s.parents for g in ctx.grids)]
    if other:
        rows.append(["Students", f"{len(other)} runs outside any grid: " + "; ".join(run_label(s) for s in other[:4])
                     + (" ..." if len(other) > 4 else "")])
    rows.insert(0, ["Data", ", ".join(sorted(d for d in data if d and d != "None")) or "?"])
    rows.append(["Wall time", f"{fmt(wall)} s of training recorded by the runs (teacher + students)"])
    recorded: dict[str, set[str]] = {}
    for run in list(found.teachers) + list(found.students):
        for k, v in _json(run / "config.json").get("versions", {}).items():
            recorded.setdefault(k, set()).add(str(v))
    rows.append(["Git revision", ", ".join(sorted(recorded.get("git", {"not recorded"})))])
    rows.append(["Versions", "runs: " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in recorded.items()
                                                 if k != "git") + "; report: " + _report_versions()])
    ctx.doc.box(rows, "What was run (from the runs' own records).", "what-was-run",
                csv=pd.DataFrame(rows, columns=["item", "value"]))


def _report_versions() -> str:
    """Versions of what drew the report (read from package metadata: importing diffusers would take
    seconds). The report's own git revision is left out: the bytes stay the same across commits."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("onestep-probe", "matplotlib", "pandas", "numpy"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(out)


# --------------------------------------------------------------------------- 1 the claim
def claim_section(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if len(g.claims)]
    if not grids:
        return "no ablation directory with a verdict (verdict.json or summary.csv) was given"
    for g in grids:
        s = g.settings
        cells = [[str(r.claim), str(r.question), str(r.rule), str(r.contrasts), str(r.verdict)]
                 for r in g.claims.itertuples()]
        bg, fg = verdict_cell(cells, 4)
        ctx.doc.table([Column("Claim", "center"), Column("Question", wrap=True),
                       Column("Rule over its contrasts", wrap=True), Column("Contrasts"), Column("Verdict", "center")],
                      cells,
                      f"The claims judged by {g.name} and the stated rule that turns contrasts into a "
                      f"claim-level verdict.",
                      "claims", csv=g.claims, bg=bg, fg=fg, bold={(i, 4) for i in range(len(cells))})
        parts = [f"Metric: {METRIC_NAMES.get(g.metric, g.metric)}"]
        if math.isfinite(s.get("level", float("nan"))):
            parts.append(f"{s['level']:.0%} percentile-bootstrap intervals over seeds")
        if math.isfinite(s.get("margin", float("nan"))):
            parts.append(f"equivalence margin {fmt(s['margin'])}"
                         + (f" = {s['margin_rule']}" if s.get("margin_rule") else ""))
        ctx.doc.para("; ".join(parts) + ".", size=8.5)
    return True


# ------------------------------------------------------------------------ 2 the evidence
def contrasts_section(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if len(g.contrasts)]
    if not grids:
        return "no contrasts were judged (no verdict)"
    for g in grids:
        verdict_table(ctx, g, compact=False)
        forest_figure(ctx, g)
    return True


def arms_section(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if g.arms is not None]
    if not grids:
        return "no aggregate.csv in any ablation directory"
    for g in grids:
        a = g.arms
        base = a["teacher_arm"].iloc[0]
        metric = g.metric if (a["metric"] == g.metric).any() else a["metric"].iloc[0]
        sub = a[a["metric"] == metric]
        order = {k: i for i, k in enumerate(arm_order(sub))}
        sub = sub.sort_values("init", key=lambda s: s.map(order), kind="stable")
        cells, bg = [], {}
        for i, r in enumerate(sub.itertuples()):
            delta = "reference" if r.init == base else fmt(r.delta, True)
            cells.append([str(r.init), str(r.init_group), str(r.method), str(int(r.n)), fmt(r.mean), fmt(r.std),
                          interval(r.ci_low, r.ci_high), delta])
            if r.within_floor:
                bg[(i, 4)] = bg[(i, 7)] = GREY_CELL
        spread = a.loc[a["metric"] == metric, "floor_std"].iloc[0]
        note = (f"Grey cells: the difference to the full-teacher arm ({base}) is within the real-vs-real floor's "
                f"spread (± {fmt(spread)}), i.e. not distinguishable." if math.isfinite(spread) else
                "No real-vs-real floor is known, so no cell can be marked as within it.")
        ctx.doc.table([Column("Arm"), Column("Group"), Column("Method"), Column("n seeds", "center"),
                       Column("Mean", "right"), Column("Std", "right"), Column("95% interval", "right"),
                       Column(f"Δ vs {base}", "right")], cells,
                      f"{METRIC_NAMES.get(metric, metric)} per arm ({g.name}): mean, standard deviation and "
                      f"bootstrap interval over seeds, and the difference to the full-teacher arm.",
                      "arms-" + metric, csv=sub, bg=bg, note=note)
        # all metrics, mean ± std (memorisation in its own table below)
        metrics = [m for m in dict.fromkeys(a["metric"]) if m not in MEMO_METRICS]
        wide, bg2 = [], {}
        methods = list(dict.fromkeys(a["method"]))
        pairs = [(arm, method) for arm in arm_order(a) for method in methods
                 if ((a["init"] == arm) & (a["method"] == method)).any()]
        for i, (arm, method) in enumerate(pairs):  # an arm is an init with a method
            row = [arm if len(methods) == 1 else f"{arm} ({method})"]
            for j, m in enumerate(metrics, start=1):
                r = a[(a["init"] == arm) & (a["method"] == method) & (a["metric"] == m)]
                if r.empty:
                    row.append("—")
                    continue
                r = r.iloc[0]
                row.append(fmt(r["mean"]) + (f" ± {fmt(r['std'])}" if math.isfinite(r["std"]) else ""))
                if r["within_floor"]:
                    bg2[(i, j)] = GREY_CELL
            wide.append(row)
        ctx.doc.table([Column("Arm")] + [Column(METRIC_NAMES.get(m, m), "right") for m in metrics], wide,
                      f"Every summary metric per arm ({g.name}), mean ± std over seeds; FD lower is better, precision, "
                      f"recall and coverage higher is better.", "arms-all-metrics", csv=a, bg=bg2,
                      note="Grey cells as in the table above, each against its own metric's floor spread.")
        memorisation_section(ctx, g)
    return True


def memorisation_section(ctx: Ctx, g: Grid) -> None:
    """Per arm: does the final generator copy training images? (probe/quality/memorisation.py)"""
    table = memorisation_table(g.arms, g.reference) if g.arms is not None else pd.DataFrame()
    if table.empty:
        return
    methods = set(table["method"]) - {""}

    def cell(r, c):
        std = r[f"{c}_std"]
        return fmt(r[c]) + (f" ± {fmt(std)}" if math.isfinite(std) else "")

    cells = [[r["arm"] if len(methods) <= 1 or not r["method"] else f"{r['arm']} ({r['method']})", str(int(r["n"]))]
             + [cell(r, c) for c in MEMO_METRICS] for _, r in table.iterrows()]
    ctx.doc.table([Column("Arm"), Column("n seeds", "center")]
                  + [Column(METRIC_NAMES.get(c, c), "right") for c in MEMO_METRICS], cells,
                  f"Memorisation per arm ({g.name}), mean ± std over seeds: the final samples' mean nearest-neighbour "
                  f"distance to the training split over that to the held-out split (equal-size sets; 1 = no copying, "
                  f"a pure copier about 1 - held-out / train), and the share of samples closer to a training image "
                  f"than 99% of held-out images are (fresh data about 0.01).", "memorisation", csv=table,
                  note="Well below 1, or a copy share far above 0.01, means samples reproduce training images.")


def curves_section(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if not g.curves.empty]
    if not grids:
        return student_curves_figure(ctx, headline=False)
    for g in grids:
        present = [m for m in CURVE_METRICS if (g.curves["metric"] == m[0]).any()]
        arms = arm_order(g.summary)
        colours = _colour_map(arms)

        def draw(sf, g=g, present=present, arms=arms, colours=colours):
            axes = sf.subplots(math.ceil(len(present) / 2), min(2, len(present)), squeeze=False)
            for ax, (metric, label, log) in zip(axes.flat, present):
                draw_curves(ax, g.curves, arms, colours, metric, g.reference, log, legend=False)
                ax.set_ylabel(label)
                ax.set_title(METRIC_NAMES.get(metric, metric), fontsize=8)
            for ax in list(axes.flat)[len(present):]:
                ax.set_axis_off()
            handles, labels = axes.flat[0].get_legend_handles_labels()
            sf.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=6.5,
                      frameon=False)

        ctx.doc.figure(draw, 1.0 + 1.8 * math.ceil(len(present) / 2), (
            f"Every evaluated metric over training for all arms of {g.name}: mean over seeds, range shaded, the "
            f"floor (grey band) and the teacher's figure (dotted) where known. Look for arms that cross, and for "
            f"precision / recall moving in opposite directions (quality traded for diversity)."), "learning-curves",
            data={"curves": g.curves})
    return True


def student_curves_figure(ctx: Ctx, headline: bool) -> bool | str:
    """Quality curves from student runs' own logs (runs given without an ablation directory)."""
    rows = []
    for s in ctx.found.students:
        m = _metrics(s)
        if "eval_fd" in m:
            rows.append(m.dropna(subset=["eval_fd"])[["step", "eval_fd"]].rename(columns={"eval_fd": "value"})
                        .assign(init=run_label(s), method="", seed=0, metric="fd"))
    if not rows:
        return "no student run logged sample quality (eval_every > 0)"
    curves = pd.concat(rows, ignore_index=True)
    arms = list(dict.fromkeys(curves["init"]))
    ref = {}
    for t in ctx.found.teachers:
        ev = _json(t / "eval.json")
        if ev:
            ref = ev
            break

    def draw(sf):
        ax = sf.subplots()
        draw_curves(ax, curves, arms, _colour_map(arms), "fd", ref, True)
        ax.set_ylabel("FD (log scale)")

    ctx.doc.figure(draw, 2.9 if headline else 3.6, (
        "Sample quality over training of each student run (FD of the one-step EMA generator, log scale), with the "
        "teacher's own figure and the real-vs-real floor where an eval.json gives them. Look for the level each run "
        "settles at."), "student-curves", data={"curves": curves})
    return True


def samples_section(ctx: Ctx) -> bool | str:
    from PIL import Image

    found = ctx.found
    panels = [(f"teacher ({_json(t / 'eval.json').get('sampler', 'multi-step')})", t / "samples.png")
              for t in found.teachers if (t / "samples.png").exists()]
    seen = set()
    rank = {}
    for g in ctx.grids:
        rank.update({a: i for i, a in enumerate(arm_order(g.summary))})
    students = sorted(found.students, key=lambda s: rank.get(s.name.split("__")[0], len(rank)))  # stable
    for s in students:
        conf = _json(s / "config.json").get("config", {})
        key = (conf.get("init"), conf.get("method"))
        if key in seen or not (s / "samples.png").exists():
            continue
        seen.add(key)
        label = f"init {s.name.split('__')[0]}" if "__" in s.name else run_label(s)
        panels.append((f"{label}, seed {conf.get('seed')} (1 step)", s / "samples.png"))
    panels = panels[: 1 + ctx.cfg.max_students]
    if not panels:
        return "no sample grids (samples.png) found"
    cols = balanced_cols(len(panels), 0, most=4)
    rows = math.ceil(len(panels) / cols)

    def draw(sf):
        axes = sf.subplots(rows, cols, squeeze=False)
        for ax, (title, path) in zip(axes.flat, panels):
            ax.imshow(np.asarray(Image.open(path).convert("RGB")), interpolation="nearest")
            ax.set_title(title, fontsize=7)
        for ax in axes.flat:
            ax.set_axis_off()

    ctx.doc.figure(draw, min(8.0, 0.35 + rows * (BODY_WIDTH / cols) * 0.95), (
        "Samples: the teacher's multi-step grid beside one one-step grid per arm (first seed; every student uses the "
        "same latents). Look for digit shapes, for blur, and for the same latent giving the same digit across arms."),
        "samples")
    return True


# -------------------------------------------------------------------------- 3 features
def _cka_students(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if g.cka is not None and len(g.cka)]
    if not grids:
        return "no cka_teacher_student.csv (the grid did not extract features)"
    for g in grids:
        df = g.cka
        order = arm_order(g.summary) if len(g.summary) else list(dict.fromkeys(df["init"]))
        panels, means = [], []
        methods = list(dict.fromkeys(df["method"])) if "method" in df else [None]
        for init in [i for i in order if i in set(df["init"])]:
            for method in methods:  # one panel per arm: an init with a method
                sub = df[(df["init"] == init) & ((df["method"] == method) if method is not None else True)]
                if sub.empty:
                    continue
                cols = [c for c in ("cka", "null_p95") if c in sub]
                mean = sub.groupby(["layer", "sigma"], sort=False)[cols].mean().reset_index()
                n = sub["seed"].nunique() if "seed" in sub else 1
                label = f"init {init}" + (f", {method}" if len(methods) > 1 else "")
                panels.append(cka_panel(mean, "layer", "sigma", f"{label} ({n} seed{'s' if n != 1 else ''}): "
                                                                f"mean {mean['cka'].mean():.2f}"))
                means.append(mean.assign(init=init, method=method))
        vmin = min(0.0, float(df["cka"].min()))
        n_cols = balanced_cols(len(panels), 0, most=3)
        rows = math.ceil(len(panels) / n_cols)
        n_perm = int(df["n_perm"].max()) if "n_perm" in df and df["n_perm"].notna().any() else 0
        null = (f"Cells in {NULL_MARK} are not above their permutation null's 95th percentile ({n_perm} shuffles). "
                if n_perm else "No permutation null was computed. ")

        def draw(sf, panels=panels, vmin=vmin, cols=n_cols):
            draw_panels(sf, panels, vmin=vmin, vmax=1.0, cbar_label="debiased linear CKA to the teacher",
                        xlabel="noise level σ", ylabel="layer", max_cols=cols)

        ctx.doc.figure(draw, min(7.5, 0.6 + 3.5 * rows), (
            f"CKA between the teacher's and each student's features, per layer and noise level, mean over seeds, on "
            f"one colour scale ({g.name}; {LAYER_KEY}). {null}Look for which layers and noise levels each arm keeps "
            f"(yellow) or rewrites (dark), and whether the arms that keep more are the ones with the better FD."),
            "cka-students", data={"cka": pd.concat(means, ignore_index=True)})
        cka_profiles(ctx, g, order)
    return True


def cka_profiles(ctx: Ctx, g: Grid, order: list) -> None:
    """The maps above reduced to two profiles per arm: CKA by layer (mean over σ) and by σ (mean over layers)."""
    df = g.cka
    assert df is not None  # called from _cka_students only for grids with a CKA table
    arms = [a for a in order if a in set(df["init"])]
    colours = _colour_map(order)
    layers = list(dict.fromkeys(df["layer"]))
    seed = "seed" if "seed" in df else None

    def profile(by: str) -> pd.DataFrame:
        per_seed = df.groupby(["init", by] + ([seed] if seed else []), sort=False)["cka"].mean().reset_index()
        return per_seed.groupby(["init", by], sort=False)["cka"].agg(["mean", "min", "max"]).reset_index()

    by_layer, by_sigma = profile("layer"), profile("sigma")

    def draw(sf):
        left, right = sf.subplots(1, 2, sharey=True)
        for arm in arms:
            a = by_layer[by_layer["init"] == arm].set_index("layer").reindex(layers)
            x = np.arange(len(layers))
            left.plot(x, a["mean"], color=colours[arm], marker="o", ms=3, lw=1.3, label=f"init {arm}")
            left.fill_between(x, a["min"], a["max"], color=colours[arm], alpha=0.15, lw=0)
            b = by_sigma[by_sigma["init"] == arm].sort_values("sigma")
            xs = np.arange(len(b))
            right.plot(xs, b["mean"], color=colours[arm], marker="o", ms=3, lw=1.3)
            right.fill_between(xs, b["min"], b["max"], color=colours[arm], alpha=0.15, lw=0)
        left.set_xticks(np.arange(len(layers)), labels=[short_layer(v) for v in layers])
        sig = sorted(set(df["sigma"]))
        right.set_xticks(np.arange(len(sig)), labels=[f"{v:g}" for v in sig])
        left.set_xlabel("layer (network order)")
        right.set_xlabel("noise level σ (mean over layers)")
        left.set_ylabel("CKA to the teacher (mean over σ)")
        for ax in (left, right):
            ax.set_ylim(min(0.0, float(df["cka"].min())), 1.02)
            ax.grid(alpha=0.25, lw=0.5)
        sf.legend(*left.get_legend_handles_labels(), loc="outside right upper", fontsize=6.5, frameon=False)

    ctx.doc.figure(draw, 2.6, (
        "The maps of the figure above as profiles: CKA to the teacher by layer (left, mean over noise levels) and by "
        "noise level (right, mean over layers), one line per arm, range over seeds shaded. Look for the layers and "
        "noise levels where the arms part: that is where training rewrote the teacher's features."),
        "cka-profiles", data={"by_layer": by_layer, "by_sigma": by_sigma})


def _teacher_pairs(ctx: Ctx) -> list[tuple[pd.DataFrame | None, pd.DataFrame | None, str]]:
    """(sigmas table, layers table, model) for each model with self-CKA maps; the rest stay in ctx."""
    by_model: dict = {}
    rest = []
    for p in ctx.found.cka_tables:
        df = pd.read_csv(p)
        modes = list(dict.fromkeys(df["mode"])) if "mode" in df else ["pair"]
        same = "model_a" in df and (df["model_a"] == df["model_b"]).all()
        if len(modes) == 1 and modes[0] in ("sigmas", "layers") and same:
            by_model.setdefault(str(df["model_a"].iloc[0]), {})[modes[0]] = df
        else:
            rest.append((p, df))
    ctx.other_cka = rest
    return [(d.get("sigmas"), d.get("layers"), m) for m, d in by_model.items()]


def _teacher_maps(ctx: Ctx) -> bool | str:
    pairs = _teacher_pairs(ctx)
    if not pairs:
        return "no self-CKA tables (probe cka, mode sigmas or layers) found"
    for sig, lay, model in pairs:
        blocks = [(t, m) for t, m in ((sig, "sigmas"), (lay, "layers")) if t is not None]
        vmin = min(0.0, min(float(t["cka"].min()) for t, _ in blocks))

        def draw(sf, blocks=blocks, vmin=vmin):
            subs = sf.subfigures(len(blocks), 1, hspace=0.03)
            subs = np.atleast_1d(subs)
            for sub, (t, mode) in zip(subs, blocks):
                panels = _mode_panels(t, mode)
                xl, yl = ("σ (B)", "σ (A)") if mode == "sigmas" else ("layer (B)", "layer (A)")
                draw_panels(sub, panels, vmin=vmin, vmax=1.0, cbar_label="debiased linear CKA", xlabel=xl, ylabel=yl,
                            max_cols=balanced_cols(len(panels), max(panels[0].matrix.shape)))
                sub.suptitle("σ x σ, one panel per layer" if mode == "sigmas" else "layer x layer, one panel per σ",
                             fontsize=8, x=0.02, ha="left")

        n_rows = sum(math.ceil(len(p) / balanced_cols(len(p), max(p[0].matrix.shape)))
                     for p in (_mode_panels(t, m) for t, m in blocks))
        est = str(blocks[0][0]["estimator"].iloc[0]) if "estimator" in blocks[0][0] else "debiased"
        ctx.doc.figure(draw, min(8.6, 0.6 + 1.95 * n_rows), (
            f"The teacher's own representation maps ({Path(model).name}, {est} CKA, one colour scale): "
            + ("top, σ x σ per layer: does a layer represent an image the same way at different noise levels? "
               if sig is not None else "")
            + ("bottom, " if sig is not None and lay is not None else "")
            + ("layer x layer per σ: which layers carry the same information. " if lay is not None else "")
            + f"Cells in {NULL_MARK} are not above their permutation null. {LAYER_KEY}. Look for blocks of high CKA "
              f"across σ (features shared over noise levels) in the layers the students keep."),
            f"cka-teacher-{Path(model).name}", data={k: t for t, k in blocks})
    return True


def balanced_cols(n: int, cells: int, most: int | None = None) -> int:
    """Panels per row: up to 5 small (<= 4 cells) or 4 larger panels, rows filled evenly (7 -> 4 + 3)."""
    most = most or (5 if cells <= 4 else 4)
    rows = math.ceil(n / most)
    return math.ceil(n / rows)


def _mode_panels(df: pd.DataFrame, mode: str) -> list[Panel]:
    from analysis.heatmaps import _cka_panels

    return _cka_panels(df, mode)


def _probes(ctx: Ctx) -> bool | str:
    tables = []
    for g in ctx.grids:
        if g.probes is not None and len(g.probes):
            tables.append((g.name, g.probes, g.summary))
    for p in ctx.found.probe_tables:
        tables.append((p.stem, pd.read_csv(p).assign(init=lambda d, stem=p.stem: d["model"].map(
            lambda m: Path(str(m)).name) if "model" in d else stem), None))
    if not tables:
        return "no probe tables (probes.csv or probe linear output) found"
    for name, df, summary in tables:
        for target in dict.fromkeys(df["target"]):
            sub = df[df["target"] == target]
            order = list(dict.fromkeys(sub["init"]))
            if summary is not None and len(summary):  # the teacher model first, then the arms in grid order
                arms = arm_order(summary)
                order = [o for o in order if o not in arms] + [a for a in arms if a in order]
            panels = []
            for init in order:
                s = sub[sub["init"] == init]
                n = s["seed"].nunique() if "seed" in s else 1
                mean = s.groupby(["layer", "sigma"], sort=False)["accuracy"].mean().reset_index().assign(target=target)
                title = (("teacher model" if init == "(teacher)" else f"init {init}")
                         + (f" ({n} seeds)" if n > 1 else ""))
                panels.append(probe_panel(mean, target, f"{title}: mean {mean['accuracy'].mean():.2f}"))
            metric = str(sub["metric"].iloc[0]) if "metric" in sub else "accuracy"
            vmin = 0.0 if metric == "accuracy" else min(0.0, float(sub["accuracy"].min()))
            cols = balanced_cols(len(panels), 0, most=3)
            rows = math.ceil(len(panels) / cols)
            chance = f" Chance is {sub['chance'].max():.2f}." if "chance" in sub and metric == "accuracy" else ""

            def draw(sf, panels=panels, vmin=vmin, cols=cols, metric=metric):
                draw_panels(sf, panels, vmin=vmin, vmax=1.0, cbar_label=f"held-out {metric}", xlabel="noise level σ",
                            ylabel="layer", max_cols=cols)

            ctx.doc.figure(draw, min(7.5, 0.5 + 2.2 * rows), (
                f"Linear-probe {metric} of '{target}' per layer and noise level for the teacher and each arm "
                f"({name}; logistic regression on pooled features, held-out split; one colour scale).{chance} "
                f"Look for where label information survives noise (right-hand columns) and whether a student keeps "
                f"the teacher's pattern."), f"probes-{name}-{target}", data={"probes": sub})
    return True


def _drift(ctx: Ctx) -> bool | str:
    grids = [g for g in ctx.grids if len(g.drift)]
    if not grids:
        return "curves.csv has no CKA-to-teacher rows (the grid did not log feature drift during training)"
    for g in grids:
        d = g.drift
        layers = list(dict.fromkeys(d["layer"]))
        arms = [a for a in arm_order(g.summary) if a in set(d["init"])]
        colours = _colour_map(arm_order(g.summary))
        cols = min(5, len(layers))  # the default selection of a 2-level UNet (5 blocks) fits one row
        rows = math.ceil(len(layers) / cols)

        def draw(sf, d=d, layers=layers, arms=arms, colours=colours, cols=cols, rows=rows):
            axes = sf.subplots(rows, cols, squeeze=False, sharey=True)
            for ax, layer in zip(axes.flat, layers):
                for arm in arms:
                    c = (d[(d["layer"] == layer) & (d["init"] == arm)]
                         .groupby("step")["value"].agg(["mean", "min", "max"]))
                    ax.plot(c.index, c["mean"], color=colours[arm], lw=1.2, label=f"init {arm}")
                    ax.fill_between(c.index, c["min"], c["max"], color=colours[arm], alpha=0.15, lw=0)
                ax.set_title(short_layer(layer), fontsize=7.5)
                ax.set_xlabel("generator step")
                ax.set_ylim(min(0.0, float(d["value"].min())), 1.02)
                ax.grid(alpha=0.25, lw=0.5)
            for ax in axes[:, 0]:
                ax.set_ylabel("CKA to the teacher")
            for ax in list(axes.flat)[len(layers):]:
                ax.set_axis_off()
            h, lab = axes.flat[0].get_legend_handles_labels()
            sf.legend(h, lab, loc="outside lower center", ncols=min(5, len(lab)), fontsize=6.5, frameon=False)

        ctx.doc.figure(draw, 0.9 + 1.8 * rows, (
            f"Feature drift during training ({g.name}): CKA of each student's features to the teacher's, per layer "
            f"(mean over σ and seeds; shaded: their range). Look for the layers the successful arms keep near 1 and "
            f"the ones every arm rewrites."), "feature-drift", data={"drift": d})
    return True


def _umap(ctx: Ctx) -> bool | str:
    if not ctx.cfg.umap:
        return "UMAP turned off (--no-umap)"
    g = next((g for g in ctx.grids if g.cka is not None and (g.path / "features" / "teacher.h5").exists()), None)
    if g is None:
        return "needs an ablation with features (features/teacher.h5 and cka_teacher_student.csv)"
    from analysis.umap_view import umap_panels
    from probe.features.store import FeatureStore

    by_layer = g.cka.groupby("layer", sort=False)["cka"].mean()
    picks = [("most", by_layer.idxmax()), ("least", by_layer.idxmin())]
    if picks[0][1] == picks[1][1]:
        picks = picks[:1]
    path = g.path / "features" / "teacher.h5"
    with FeatureStore.open(path) as store:
        n_sigma = len(store.sigmas)
    rows = math.ceil(n_sigma / 4)
    for which, layer in picks:
        data: dict = {}

        def draw(sf, layer=layer, data=data):
            with FeatureStore.open(path) as store:
                data["knn"] = umap_panels(store, layer, seed=ctx.cfg.seed, fig=sf)

        ctx.doc.figure(draw, 0.5 + 1.75 * rows, (
            f"UMAP of the teacher's {short_layer(layer)} features (the {which} transferred layer: mean CKA teacher vs "
            f"students {by_layer[layer]:.2f}), one panel per noise level, coloured by class (legend). Each panel's "
            f"title gives the cross-validated k-NN accuracy of its 2-D embedding, the number to compare; the picture "
            f"itself distorts distances. Look for class clusters that survive as σ grows."), f"umap-{which}",
            data=data)
    return True


def _other_tables(ctx: Ctx) -> bool | str:
    rest = getattr(ctx, "other_cka", [])
    if not rest:
        return "no other CKA tables"
    for p, df in rest:
        mode = list(dict.fromkeys(df["mode"]))[0] if "mode" in df else "pair"
        n = len(_mode_panels(df, mode))

        def draw(sf, df=df, mode=mode):
            draw_cka_heatmap(sf, df, mode=mode, title="")

        ctx.doc.figure(draw, min(8.0, 0.8 + 2.0 * math.ceil(n / 4)), (
            f"CKA table {p.name} (mode {mode}; {LAYER_KEY}): cells in {NULL_MARK} are not above their "
            f"permutation null. "
            f"Look for high values off the diagonal: the same information at another layer or noise level."),
            f"cka-{p.stem}", data={"cka": df})
    return True


def features_section(ctx: Ctx) -> bool | str:
    g = ctx.grids[0] if ctx.grids else None
    if g is not None:
        probes = g.probes[g.probes["init"] != "(teacher)"] if g.probes is not None else None
        for line in feature_findings(g.cka, probes, g.arms, g.metric, short_layer):
            ctx.doc.para(line, size=8.5, bullet="•", space_before=0.03)
    ctx.section("CKA between the teacher and each student", lambda: _cka_students(ctx), level=2, together=True)
    ctx.section("The teacher's own maps: σ x σ and layer x layer", lambda: _teacher_maps(ctx), level=2)
    ctx.section("Linear probes", lambda: _probes(ctx), level=2)
    ctx.section("Feature drift during training", lambda: _drift(ctx), level=2)
    ctx.section("UMAP of the most and the least transferred layer", lambda: _umap(ctx), level=2)
    if getattr(ctx, "other_cka", []):
        ctx.section("Other CKA tables", lambda: _other_tables(ctx), level=2)
    return True


# ---------------------------------------------------------------------- 4 caveats, 5 next
def caveats_section(ctx: Ctx) -> bool | str:
    if not ctx.grids:
        return "no ablation directory: no floor, budget or seeds to judge"
    for g in ctx.grids:
        for line in caveats(g.arms, g.contrasts, g.settings, g.reference, g.teacher_curve(), g.steps, g.n_eval(),
                            g.metric):
            ctx.doc.para(line, size=8.5, bullet="•", space_before=0.04)
    return True


def next_section(ctx: Ctx) -> bool | str:
    if not ctx.grids:
        return "no ablation directory: run `probe train ablation` to judge the claims"
    for g in ctx.grids:
        lines = next_steps(g.arms, g.contrasts, g.teacher_curve(), g.reference, g.steps, g.command(),
                           g.metric, has_features=g.cka is not None, has_drift=len(g.drift) > 0)
        for i, line in enumerate(lines or ["Nothing is open: every contrast is decided with enough seeds."], 1):
            ctx.doc.para(line, size=8.5, bullet=f"{i}.", space_before=0.04)
    return True


def contents_table(ctx: Ctx) -> Table:
    """The contents: every section with its page, or why it was omitted (pages filled in after layout)."""
    cells = [["", "The answer: question, verdict, headline figure, reading", "", "1"]]
    for number, title, _heading, status in ctx.entries:
        indent = "    " if "." in number else ""
        cells.append([number, indent + title, status.removeprefix("omitted: ") if status != "included" else "", "00"])
    t = Table([Column("§"), Column("Section", wrap=True), Column("Omitted because", wrap=True),
               Column("Page", "right")],
              cells, "", None, "contents", csv=None, size=8.0, space_before=0.08)
    t.bold = {(i, 1) for i, (n, *_rest) in enumerate([("",)] + ctx.entries) if i and "." not in n}
    t._fit()
    return t


def fill_contents(ctx: Ctx, t: Table) -> pd.DataFrame:
    rows: list[tuple[str, str, str, int | None]] = [("", "The answer", "included", 1)]
    for i, (number, title, heading, status) in enumerate(ctx.entries, start=1):
        page = ctx.doc.page_of(heading)
        t.cells[i][3] = str(page)
        t.wrapped[i][3] = [str(page)]
        rows.append((number, title, status, page))
    return pd.DataFrame(rows, columns=["section", "title", "status", "page"])

