"""The PDF report: samples, quality curves, the verdict, probes, CKA maps and UMAP in one file.

``build_report(ReportConfig(inputs=[...], out="reports/x.pdf"))`` is what ``probe report`` calls.
It only *reads* what earlier stages wrote, found by walking the given directories:

- teacher runs (``model.json`` kind teacher) and student runs (kind generator);
- ablation directories (``summary.csv`` + ``grid.json``; their ``runs/``, ``aggregate.csv``,
  ``verdict.json``, ``cka_teacher_student.csv``, ``probes.csv`` and ``features/``);
- analysis tables written by ``probe linear`` (columns layer, sigma, target, accuracy) and
  ``probe cka`` (layer_a, sigma_a, layer_b, sigma_b, estimator, cka, mode), and feature files.

Sections whose inputs are missing are listed as omitted on the contents page, never drawn empty.
Every figure is also written as PNG and every table as CSV into ``<out stem>_files/``. The PDF has
a fixed CreationDate and no producer stamp, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from probe.core.errors import UserError

PAGE = (8.27, 11.69)        # A4 portrait, inches
FIXED_DATE = "D:20250101000000Z"


@dataclass
class ReportConfig:
    inputs: list                          # run / ablation / analysis directories to gather from
    out: str = "reports/report.pdf"       # the PDF; figures and tables go beside it in <stem>_files/
    title: str = "onestep-probe report"   # first line of the title page
    umap: bool = True                     # draw the UMAP section when feature files are present
    seed: int = 0                         # UMAP seed
    max_students: int = 8                 # student sample grids shown on the samples page


@dataclass
class Found:
    teachers: list = field(default_factory=list)      # run dirs
    students: list = field(default_factory=list)      # run dirs
    ablations: list = field(default_factory=list)     # ablation dirs
    probe_tables: list = field(default_factory=list)  # csv paths
    cka_tables: list = field(default_factory=list)    # csv paths
    feature_files: list = field(default_factory=list)  # h5 paths


# --------------------------------------------------------------------------------- gathering
def discover(inputs) -> Found:
    """Classify everything under the inputs by the files each stage writes."""
    found = Found()
    for root in inputs:
        root = Path(root)
        if not root.exists():
            raise UserError(f"{root} does not exist")
        candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
        for d in candidates:
            if (d / "model.json").exists():
                kind = json.loads((d / "model.json").read_text()).get("kind")
                (found.teachers if kind == "teacher" else found.students if kind == "generator" else []).append(d)
            if (d / "summary.csv").exists() and (d / "grid.json").exists():
                found.ablations.append(d)
        for csv in sorted(root.rglob("*.csv")) if root.is_dir() else []:
            cols = set(pd.read_csv(csv, nrows=0).columns)
            if {"layer", "sigma", "target", "accuracy"} <= cols and "run" not in cols:
                found.probe_tables.append(csv)
            elif {"layer_a", "sigma_a", "layer_b", "sigma_b", "estimator", "cka"} <= cols:
                found.cka_tables.append(csv)
        found.feature_files += sorted(p for p in root.rglob("*.h5")) if root.is_dir() else []
    for name in ("teachers", "students", "ablations", "probe_tables", "cka_tables", "feature_files"):
        setattr(found, name, list(dict.fromkeys(getattr(found, name))))
    # a prerequisite (narrow-band teacher, regressed generator) is not a subject of the report
    found.teachers = [t for t in found.teachers if "prereq" not in t.parts]
    found.students = [s for s in found.students if "prereq" not in s.parts]
    if not (found.teachers or found.students or found.ablations or found.probe_tables or found.cka_tables):
        raise UserError(f"nothing to report under {', '.join(map(str, inputs))}: no runs, ablations or analysis tables")
    return found


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _metrics(run: Path) -> pd.DataFrame:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run / "metrics.jsonl").exists() else []
    return pd.DataFrame(rows)


def _label(run: Path) -> str:
    cfg = _json(run / "config.json").get("config", {})
    return f"{cfg.get('method', '?')} / init {cfg.get('init', '?')} / seed {cfg.get('seed', '?')}"


# ------------------------------------------------------------------------------------ pages
class Writer:
    """Collects pages (written once all sections are known, so contents can follow the title) and
    mirrors each figure (PNG) and table (CSV) into the files dir."""

    def __init__(self, files: Path):
        self.files, self.pages = files, []

    def figure(self, fig: Figure, name: str) -> None:
        self.pages.append((fig, name))

    def table(self, df: pd.DataFrame, name: str) -> None:
        df.to_csv(self.files / f"{name}.csv", index=False)

    def write(self, pdf: PdfPages, order: list[int]) -> None:
        for n, i in enumerate(order, start=1):
            fig, name = self.pages[i]
            fig.savefig(self.files / f"{n:02d}-{name}.png", dpi=110, metadata={"Software": None})
            pdf.savefig(fig)


def text_page(title: str, lines: list[str]) -> Figure:
    fig = Figure(figsize=PAGE)
    fig.text(0.07, 0.95, title, fontsize=16, weight="bold", va="top")
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 95, subsequent_indent="    ") or [""])]
    fig.text(0.07, 0.91, "\n".join(wrapped[:70]), fontsize=8.5, family="monospace", va="top")
    return fig


def table_page(title: str, df: pd.DataFrame, note: str = "") -> Figure:
    fig = Figure(figsize=PAGE)
    fig.text(0.07, 0.95, title, fontsize=14, weight="bold", va="top")
    if note:
        fig.text(0.07, 0.92, "\n".join(textwrap.wrap(note, 110)), fontsize=8, va="top")
    ax = fig.add_axes([0.03, 0.05, 0.94, 0.8])
    ax.axis("off")
    shown = df.head(40).copy()
    for c in shown.columns:
        if shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: f"{v:.3g}")
    t = ax.table(cellText=shown.astype(str).values, colLabels=list(shown.columns), loc="upper center")
    t.auto_set_font_size(False)
    t.set_fontsize(6.5)
    t.scale(1, 1.3)
    return fig


def title_section(found: Found, cfg: ReportConfig) -> list[str]:
    from probe.core.runs import versions

    lines = [f"Inputs: {', '.join(map(str, cfg.inputs))}", ""]
    for kind, runs in (("Teacher", found.teachers), ("Student", found.students)):
        for r in runs:
            c = _json(r / "config.json")
            m = _metrics(r)
            secs = f"{m['seconds'].max():.0f} s" if "seconds" in m else "?"
            conf = c.get("config", {})
            lines.append(f"{kind}: {r}  data={conf.get('data') or _json(r / 'model.json').get('dataset')}  "
                         f"seed={conf.get('seed')}  steps={conf.get('steps')}  wall time {secs}  "
                         f"git {c.get('versions', {}).get('git')}")
    for a in found.ablations:
        s = pd.read_csv(a / "summary.csv")
        lines.append(f"Ablation: {a}  {len(s)} runs, inits {sorted(s['init'].unique())}, "
                     f"methods {sorted(s['method'].unique())}, seeds {sorted(s['seed'].unique())}")
    v = versions()
    v["git"] = None  # the report's own revision is not an input: keep the bytes reproducible across commits
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    return lines


def image_page(path: Path, caption: str) -> Figure:
    """A PNG made by analysis/ (heatmaps, UMAP) on its own page, with a text caption above it."""
    fig = Figure(figsize=PAGE)
    fig.text(0.05, 0.97, "\n".join(textwrap.wrap(caption, 100)), fontsize=9, va="top")
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.90])
    ax.imshow(_image(path), interpolation="antialiased")
    ax.axis("off")
    return fig


def _image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def samples_figure(found: Found, cfg: ReportConfig) -> Figure | None:
    panels = [(f"teacher (Heun): {t.name}", t / "samples.png") for t in found.teachers if (t / "samples.png").exists()]
    students = [s for s in found.students if (s / "samples.png").exists()]
    panels += [(f"one step: {_label(s)}", s / "samples.png") for s in students[: cfg.max_students]]
    if not panels:
        return None
    cols = 3
    rows = int(np.ceil(len(panels) / cols))
    fig = Figure(figsize=(PAGE[0], min(PAGE[1], 3.0 * rows + 0.8)))
    fig.suptitle("Samples: the teacher's multi-step grid beside each student's one-step grid", fontsize=11)
    for i, (title, path) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_image(path), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, 38)), fontsize=7)
        ax.axis("off")
    return fig


def quality_curves(found: Found) -> tuple[Figure | None, pd.DataFrame]:
    curves = []
    for s in found.students:
        m = _metrics(s)
        if "eval_fd" in m:  # the student loop logs sample quality as eval_* rows
            curves.append(m.dropna(subset=["eval_fd"])[["step", "eval_fd"]].rename(columns={"eval_fd": "fd"})
                          .assign(run=_label(s)))
    if not curves:
        return None, pd.DataFrame()
    table = pd.concat(curves, ignore_index=True)
    fig = Figure(figsize=(PAGE[0], 6))
    ax = fig.add_subplot(111)
    for run, g in table.groupby("run", sort=False):
        ax.plot(g["step"], g["fd"], label=run, lw=1)
    floor, teacher = _reference_lines(found)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"real-vs-real floor {floor:.1f}")
    if teacher is not None:
        ax.axhline(teacher, color="tab:red", ls=":", lw=1.5, label=f"teacher (Heun) {teacher:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("generator step")
    ax.set_ylabel("Frechet distance (classifier features, log scale)")
    ax.set_title("Sample quality over training (one step, EMA generator)")
    ax.legend(fontsize=6, ncol=2)
    return fig, table


def _reference_lines(found: Found) -> tuple[float | None, float | None]:
    """Floor and teacher figure, preferring the ablation's reference (same evaluator settings)."""
    for a in found.ablations:
        ref = _json(a / "reference.json")
        if ref:
            return ref.get("floor", {}).get("fd"), ref.get("fd")
    for t in found.teachers:
        ev = _json(t / "eval.json")
        if ev:
            return ev.get("floor", {}).get("fd"), ev.get("fd")
    return None, None


def verdict_lines(ablation: Path) -> list[str]:
    txt = ablation / "verdict.txt"
    if txt.exists():
        return txt.read_text().splitlines()
    from analysis.verdict import verdict_from_dir

    return verdict_from_dir(ablation).to_text().splitlines()


# ----------------------------------------------------------------------------------- driver
def build_report(cfg: ReportConfig, progress: bool = False) -> Path:
    """Write the PDF (and its files dir); returns the PDF path. One writer per PDF (probe/core/locks.py)."""
    from probe.core.locks import exclusive

    with exclusive(cfg.out, "report"):
        return _build_report(cfg, progress)


def _build_report(cfg: ReportConfig, progress: bool) -> Path:
    from analysis.heatmaps import plot_cka_heatmap, plot_probe_heatmap

    found = discover(cfg.inputs)
    out = Path(cfg.out)
    files = out.parent / f"{out.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob("*"):
        old.unlink()
    contents: list[str] = []
    tmp = out.with_suffix(".pdf.tmp")
    meta = {"Title": cfg.title, "Creator": "onestep-probe", "Producer": None, "CreationDate": None}
    w = Writer(files)
    pages: list[tuple[str, object]] = []  # (section, callable that draws and returns True or a reason)

    def section(name, draw):
        pages.append((name, draw))

    section("1 Title", lambda: w.figure(text_page(cfg.title, title_section(found, cfg)), "title") or True)

    def samples():
        fig = samples_figure(found, cfg)
        return "no sample grids found" if fig is None else (w.figure(fig, "samples") or True)
    section("2 Samples", samples)

    def quality():
        fig, table = quality_curves(found)
        if fig is None:
            return "no student run logged sample quality (eval_every > 0)"
        w.figure(fig, "quality-curves")
        w.table(table, "quality-curves")
        for a in found.ablations:
            if (a / "aggregate.csv").exists():
                agg = pd.read_csv(a / "aggregate.csv")
                w.table(agg, f"aggregate-{a.name}")
                fd = agg[agg["metric"].isin(["fd_final", "fd_best"])] if "metric" in agg else agg
                w.figure(table_page(f"Ablation aggregate: {a.name}", fd,
                                    "mean, std and bootstrap 95% CI per init and method, over seeds"), "aggregate")
        return True
    section("3 Sample quality", quality)

    def verdict():
        if not found.ablations:
            return "no ablation directory given"
        for a in found.ablations:
            w.figure(text_page(f"Verdict on the paper's two claims ({a.name})", verdict_lines(a)), "verdict")
        return True
    section("4 Verdict", verdict)

    def probes():
        tables = [(p.stem, pd.read_csv(p)) for p in found.probe_tables]
        for a in found.ablations:
            if (a / "probes.csv").exists():
                df = pd.read_csv(a / "probes.csv")
                first = df.drop_duplicates("init")["run"].tolist()  # one seed per init keeps it readable
                tables += [(f"{a.name}-{r}", df[df["run"] == r]) for r in first]
        if not tables:
            return "no probe tables (probe linear) found"
        for name, df in tables:
            for target in df["target"].unique():
                path = files / f"probe-{name}-{target}.png"
                plot_probe_heatmap(df, target, path, title=f"Linear probe ({target}): {name}")
                w.figure(image_page(path, f"Linear probe of '{target}' per layer and noise level: {name}. "
                                          f"Held-out accuracy of a logistic regression on pooled features."),
                         f"probe-{name}-{target}")
            w.table(df, f"probes-{name}")
        return True
    section("5 Linear probes", probes)

    def cka():
        tables = [(p.stem, pd.read_csv(p)) for p in found.cka_tables]
        for a in found.ablations:
            if (a / "cka_teacher_student.csv").exists():
                df = pd.read_csv(a / "cka_teacher_student.csv")
                for init, g in df.groupby("init", sort=False):
                    cols = [c for c in ("cka", "null_mean", "null_p95", "n_perm") if c in g]
                    mean = g.groupby(["layer", "sigma"], sort=False)[cols].mean().reset_index()
                    for c in ("null_mean", "null_p95"):  # tables written without a null say so on the figure
                        mean[c] = mean[c] if c in mean else np.nan
                    tables.append((f"{a.name}-teacher-vs-{init}", mean.assign(
                        layer_a=mean["layer"], sigma_a=mean["sigma"], layer_b=mean["layer"], sigma_b=mean["sigma"],
                        estimator=g["estimator"].iloc[0], mode="pair",
                        model_a="teacher", model_b=f"student init {init} (mean over seeds)")))
        if not tables:
            return "no CKA tables found"
        for name, df in tables:
            path = files / f"cka-{name}.png"
            plot_cka_heatmap(df, path)
            w.figure(image_page(path, f"CKA ({name}): {_cka_caption(df)}"), f"cka-{name}")
            w.table(df, f"cka-{name}")
        return True
    section("6 CKA", cka)

    def umap():
        if not cfg.umap:
            return "UMAP turned off"
        return umap_section(found, w, files, cfg.seed)
    section("7 UMAP", umap)

    for name, draw in pages:
        result = draw()
        contents.append(f"{name}: included" if result is True else f"{name}: omitted ({result})")
    w.figure(text_page("Contents", contents), "contents")
    with PdfPages(tmp, metadata=meta) as pdf:  # title, contents, then the sections in order
        w.write(pdf, [0, len(w.pages) - 1] + list(range(1, len(w.pages) - 1)))
    tmp.replace(out)
    (files / "contents.txt").write_text("\n".join(contents) + "\n")
    return out


def _cka_caption(df: pd.DataFrame) -> str:
    from analysis.cka import ESTIMATOR_TITLES

    est = str(df["estimator"].iloc[0]) if "estimator" in df else "?"
    mode = str(df["mode"].iloc[0]) if "mode" in df else "pair"
    n_perm = int(df["n_perm"].max()) if "n_perm" in df and df["n_perm"].notna().any() else 0
    null = (f"permutation null from {n_perm} row shuffles, mean {df['null_mean'].mean():.3f}" if n_perm
            else "no permutation null computed")
    return f"estimator {ESTIMATOR_TITLES.get(est, est)}; mode {mode}; {null}"


def umap_section(found: Found, w: Writer, files: Path, seed: int):
    """UMAP of the teacher's features for the most and the least transferred layer."""
    from analysis.umap_view import umap_panels
    from probe.features.store import FeatureStore

    cka_path = next((a / "cka_teacher_student.csv" for a in found.ablations
                     if (a / "cka_teacher_student.csv").exists()), None)
    teacher_h5 = next((p for p in found.feature_files if p.stem == "teacher"), None)
    if cka_path is None or teacher_h5 is None:
        return "needs an ablation with features (teacher.h5 and cka_teacher_student.csv)"
    df = pd.read_csv(cka_path)
    by_layer = df.groupby("layer", sort=False)["cka"].mean()
    picks = [("most", by_layer.idxmax()), ("least", by_layer.idxmin())]
    with FeatureStore.open(teacher_h5) as store:
        for which, layer in picks:
            path = files / f"umap-{which}-{layer}.png"
            umap_panels(store, layer, out_png=str(path), seed=seed)
            w.figure(image_page(path, f"UMAP of the teacher's {layer} (the {which} transferred layer: mean CKA "
                                      f"teacher vs students {by_layer[layer]:.2f}); each panel gives the k-NN "
                                      f"accuracy of its 2-D embedding"), f"umap-{which}")
    return True
