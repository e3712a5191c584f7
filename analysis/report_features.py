"""Section 3 of the report, the explanation from features: CKA between the teacher and the
students, the teacher's own CKA maps, linear probes, feature drift during training, UMAP and any
other analysis tables. One function per subsection; each adds blocks to the document and returns
True, or the reason it has nothing to show (see ``analysis.report_sections``).
"""

from __future__ import annotations

import math
from pathlib import Path

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
from analysis.report_context import Ctx, Grid, balanced_cols, colour_map
from analysis.report_data import arm_order, feature_findings


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
    colours = colour_map(order)
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
        colours = colour_map(arm_order(g.summary))
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


