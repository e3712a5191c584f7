"""The report's sections, one function each, laid out as an argument (see ``analysis.report``).

Page 1, the answer: the question, the verdict per contrast, the headline learning curves with the
teacher's figure and the floor, a reading computed from the data (verdicts, the largest
decided effect, where the arms stand, whether the metric can rank arms at convergence), and what was run.
Then: contents; 1 the claim; 2 the evidence for each contrast (contrasts, per-arm tables, learning
curves, samples); 3 the explanation from features (``analysis.report_features``); 4 caveats; 5 what
to run next. The inputs and the document context they share are in ``analysis.report_context``.

A section function adds blocks to the document and returns True, or returns the reason it has
nothing to show; the reason is printed in its place and in the contents.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.heatmaps import short_layer
from analysis.report_context import (
    Ctx,
    Grid,
    balanced_cols,
    colour_map,
    read_json,
    read_metrics_frame,
    run_label,
    verdict_cell,
)
from analysis.report_data import (
    MEMO_METRICS,
    METRIC_NAMES,
    arm_order,
    base_metric,
    caveats,
    curve_table,
    fmt,
    interval,
    memorisation_table,
    next_steps,
    reading,
)
from analysis.report_layout import BODY_W as BODY_WIDTH
from analysis.report_layout import GREY_CELL, VERDICT_STYLE, Column, Paragraph, Spacer, Table

CURVE_METRICS = [("fd", "FD (log scale)", True), ("precision", "precision", False), ("recall", "recall", False),
                 ("coverage", "coverage", False)]


# ------------------------------------------------------------------------------- figures
def _curve_arms(g: Grid, limit: int = 6) -> list[str]:
    order = arm_order(g.summary) if len(g.summary) else []
    if len(order) <= limit:
        return order
    named = set(g.contrasts["arm"]) | set(g.contrasts["versus"]) if len(g.contrasts) else set()
    keep = [order[0]] + [a for a in order[1:] if a in named]
    return (keep + [a for a in order if a not in keep])[:limit]


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
    colours = colour_map(arm_order(g.summary))
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
    doc.add(Paragraph("Reading of the data (generated from the tables):", size=8.5, weight="bold",
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
    # a grid may compare some contrasts on another summary column (fd_tail, say): those rows name it
    on = {}
    if "metric" in c:
        on = {r.Index: f" ({METRIC_NAMES.get(r.metric, r.metric)})" for r in c.itertuples()
              if isinstance(r.metric, str) and r.metric not in ("", g.metric)}
    if on:
        metric = f"{metric} (a row that names another metric: in that one)"
    if compact:
        columns = [Column("Contrast"), Column("Claim", "center"), Column("Arm vs versus", wrap=True),
                   Column("Predicted"), Column("Effect", "right"), Column(f"{level} interval", "right"),
                   Column("n", "center"), Column("Verdict", "center")]
        cells = [[str(r.name), str(r.claim), f"{r.arm} vs {r.versus}{on.get(r.Index, '')}", str(r.predicted),
                  fmt(r.effect, True),
                  interval(r.ci_low, r.ci_high, True), f"{_int(r.n_arm)}/{_int(r.n_versus)}", str(r.verdict)]
                 for r in c.itertuples()]
        caption = (f"Verdict per contrast. Effect: arm minus versus in mean {metric}; > 0: arm worse; "
                   f"n: runs (arm/versus).")
    else:
        columns = [Column("Contrast", wrap=True), Column("What it isolates", wrap=True),
                   Column("Match held fixed", wrap=True),
                   Column("Effect", "right"), Column(f"{level} interval", "right"), Column("Verdict", "center"),
                   Column("Reason", wrap=True)]
        cells = [[f"{r.name}\n{r.arm} vs\n{r.versus}{on.get(r.Index, '')}", str(r.isolates or "—"),
                  str(r.match or "none declared"),
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
        conf = read_json(t / "config.json").get("config", {})
        m = read_metrics_frame(t)
        secs = float(m["seconds"].max()) if "seconds" in m else float("nan")
        wall += secs if math.isfinite(secs) else 0.0
        data.add(str(read_json(t / "model.json").get("dataset") or conf.get("data")))
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
        for k, v in read_json(run / "config.json").get("versions", {}).items():
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
        colours = colour_map(arms)

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
        m = read_metrics_frame(s)
        if "eval_fd" in m:
            rows.append(m.dropna(subset=["eval_fd"])[["step", "eval_fd"]].rename(columns={"eval_fd": "value"})
                        .assign(init=run_label(s), method="", seed=0, metric="fd"))
    if not rows:
        return "no student run logged sample quality (eval_every > 0)"
    curves = pd.concat(rows, ignore_index=True)
    arms = list(dict.fromkeys(curves["init"]))
    ref = {}
    for t in ctx.found.teachers:
        ev = read_json(t / "eval.json")
        if ev:
            ref = ev
            break

    def draw(sf):
        ax = sf.subplots()
        draw_curves(ax, curves, arms, colour_map(arms), "fd", ref, True)
        ax.set_ylabel("FD (log scale)")

    ctx.doc.figure(draw, 2.9 if headline else 3.6, (
        "Sample quality over training of each student run (FD of the one-step EMA generator, log scale), with the "
        "teacher's own figure and the real-vs-real floor where an eval.json gives them. Look for the level each run "
        "settles at."), "student-curves", data={"curves": curves})
    return True


def samples_section(ctx: Ctx) -> bool | str:
    from PIL import Image

    found = ctx.found
    panels = [(f"teacher ({read_json(t / 'eval.json').get('sampler', 'multi-step')})", t / "samples.png")
              for t in found.teachers if (t / "samples.png").exists()]
    seen = set()
    rank = {}
    for g in ctx.grids:
        rank.update({a: i for i, a in enumerate(arm_order(g.summary))})
    students = sorted(found.students, key=lambda s: rank.get(s.name.split("__")[0], len(rank)))  # stable
    for s in students:
        conf = read_json(s / "config.json").get("config", {})
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

