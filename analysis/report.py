"""The PDF report, laid out like a paper's appendix: the answer first, then the argument behind it.

``build_report(ReportConfig(inputs=[...], out="reports/x.pdf"))`` is what ``probe report`` calls.
It only *reads* what earlier stages wrote, found by walking the given directories:

- teacher runs (``model.json`` kind teacher) and student runs (kind generator);
- ablation directories (``summary.csv`` + ``grid.json``; their ``runs/``, ``aggregate.csv``,
  ``verdict.json``, ``cka_teacher_student.csv``, ``probes.csv`` and ``features/``);
- analysis tables written by ``probe linear`` (columns layer, sigma, target, accuracy) and
  ``probe cka`` (layer_a, sigma_a, layer_b, sigma_b, estimator, cka, mode), and feature files.

Page 1 is the answer (question, verdict per contrast, headline learning curves, a reading generated
from the data, what was run); the sections after it argue for it: 1 the claim, 2 the evidence for
each contrast, 3 the explanation from features, 4 caveats, 5 what to run next
(``analysis/report_sections.py``, typeset by ``analysis/report_layout.py``, sentences computed by
``analysis/report_data.py``). A section whose inputs are missing is named as omitted, with the
reason, in its place and in the contents; it is never drawn empty.

Into ``<out stem>_files/`` go every figure as PDF (vector) and PNG (``figure-NN-name.*``), the data
behind it and every table as CSV (``table-NN-name.csv``), a PNG of every page (``page-NN-*.png``),
``pages.json`` (what each page holds) and ``contents.txt``. No PDF carries a date or producer
stamp, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from probe.core.errors import UserError
from probe.core.locks import exclusive


@dataclass
class ReportConfig:
    inputs: list                          # run / ablation / analysis directories to gather from
    out: str = "reports/report.pdf"       # the PDF; figures and tables go beside it in <stem>_files/
    title: str = "onestep-probe report"   # title on page 1 and in the running head
    umap: bool = True                     # draw the UMAP section when feature files are present
    seed: int = 0                         # UMAP seed
    max_students: int = 8                 # student sample grids shown on the samples figure (one per arm)
    page_pngs: bool = True                # also write a PNG of every page into the files dir


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


# ----------------------------------------------------------------------------------- driver
def build_report(cfg: ReportConfig, progress: bool = False) -> Path:
    """Write the PDF (and its files dir); returns the PDF path. One writer per PDF (probe/core/locks.py)."""
    with exclusive(cfg.out, "report"):
        return _build_report(cfg, progress)


def _build_report(cfg: ReportConfig, progress: bool) -> Path:
    from analysis import report_features as F
    from analysis import report_sections as S
    from analysis.report_context import Ctx, Grid
    from analysis.report_layout import Document

    found = discover(cfg.inputs)
    out = Path(cfg.out)
    files = out.parent / f"{out.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob("*"):
        if old.is_file():
            old.unlink()
    doc = Document(cfg.title, files, page_pngs=cfg.page_pngs)
    grids = [Grid.read(a) for a in found.ablations]
    ctx = Ctx(doc, found, cfg, grids)

    S.answer_page(ctx)
    contents_at = len(doc.blocks)
    ctx.section("The claim", lambda: S.claim_section(ctx))
    ctx.section("The evidence for each contrast", lambda: S.contrasts_section(ctx))
    ctx.section("Quality per arm", lambda: S.arms_section(ctx), level=2)
    ctx.section("Learning curves", lambda: S.curves_section(ctx), level=2)
    ctx.section("Samples", lambda: S.samples_section(ctx), level=2)
    ctx.section("The explanation from features", lambda: F.features_section(ctx))
    ctx.section("Caveats", lambda: S.caveats_section(ctx))
    ctx.section("What to run next", lambda: S.next_section(ctx))

    # the contents go on page 2, before the claim; their page numbers are known once laid out
    contents = S.contents_table(ctx)
    doc.blocks[contents_at:contents_at] = [S.Paragraph("Contents", size=13, weight="bold", space_before=0.25),
                                           contents]
    doc.layout()
    listing = S.fill_contents(ctx, contents)
    tmp = out.with_suffix(".pdf.tmp")
    doc.write(tmp)
    tmp.replace(out)
    listing.to_csv(files / "contents.csv", index=False)
    (files / "contents.txt").write_text("".join(
        f"{r.section} {r.title}: ".lstrip() + (f"included, page {r.page}" if r.status == "included" else
                                                f"omitted ({r.status.removeprefix('omitted: ')})") + "\n"
        for r in listing.itertuples()))
    for g in grids:  # the verdict as analysis/verdict.py words it, beside the typeset tables
        if g.verdict_text:
            (files / f"verdict-{g.name}.txt").write_text(g.verdict_text.rstrip() + "\n")
    return out
