"""The PDF report on real tiny runs (the quick demo), read back as text (pypdf) and as pictures (pdftoppm).

Every section is built from inputs that earlier stages wrote: the quick demo's teacher, grid, features
and analysis tables; copies of its grid with the verdict files removed (the verdict is then computed
from summary.csv), and with a schema-2 verdict.json; the feature-drift rows of curves.csv are the runs' own.
"""

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from analysis.report_data import claim_rows, contrast_rows, fmt, resolution, verdict_settings

# a hand-written verdict in the schema shared with analysis/verdict.py (issue 16 / 21)
SCHEMA2 = {
    "schema": 2, "metric": "fd_final", "level": 0.95, "margin": 1.23,
    "margin_rule": "max(2 x floor std, 10% of the teacher's figure)",
    "floor": {"mean": 10.4, "std": 1.3}, "reference": {"fd": 8.6, "steps": 18},
    "contrasts": [
        {"name": "random-vs-teacher", "claim": "2", "arm": "random", "versus": "teacher",
         "isolates": "all of the teacher removed", "predicted": "arm worse", "metric": "fd_tail",
         "effect": 30.3, "ci_low": 26.0, "ci_high": 34.1, "n_arm": 3, "n_versus": 3, "match": None,
         "verdict": "supported", "reason": "CI [26.0, 34.1] above 0: the arm is worse, as predicted"},
        {"name": "reinit-io-vs-teacher", "claim": "2", "arm": "reinit-io", "versus": "teacher",
         "isolates": "features kept, mapping removed", "predicted": "arm no worse", "metric": "fd_final",
         "effect": 9.5, "ci_low": 6.1, "ci_high": 12.9, "n_arm": 3, "n_versus": 3,
         "match": {"property": "fd_start", "arm": 273.0, "versus": 260.0, "tolerance": 50.0, "met": True},
         "verdict": "contradicted", "reason": "CI lower end 6.1 above the margin 1.23"},
        {"name": "band-vs-teacher", "claim": "2", "arm": "band", "versus": "teacher",
         "isolates": "mapping held fixed, multi-level features removed", "predicted": "arm worse",
         "metric": "fd_final", "effect": None, "ci_low": None, "ci_high": None, "n_arm": 3, "n_versus": 3,
         "match": {"property": "fd_start", "arm": 610.0, "versus": 20.0, "tolerance": 50.0, "met": False},
         "verdict": "refused", "reason": "fd_start 610 vs 20 differs by more than 50"},
        {"name": "teacher-vs-reference", "claim": "1", "arm": "teacher", "versus": "reference",
         "isolates": "one step against the teacher's 18", "predicted": "arm no worse", "metric": "fd_final",
         "effect": 0.9, "ci_low": -0.5, "ci_high": 2.4, "n_arm": 3, "n_versus": 0, "match": None,
         "verdict": "inconclusive", "reason": "CI straddles the margin"},
    ],
    "claims": [
        {"claim": "1", "question": "Does one-step DiffRatio reach the teacher's quality",
         "rule": "supported when every claim-1 contrast is supported; contradicted when any is contradicted; "
                 "else inconclusive", "verdict": "inconclusive", "contrasts": ["teacher-vs-reference"]},
        {"claim": "2", "question": "Is it the teacher's features rather than its mapping",
         "rule": "supported when every claim-2 contrast is supported; contradicted when any is; else inconclusive",
         "verdict": "contradicted", "contrasts": ["random-vs-teacher", "reinit-io-vs-teacher", "band-vs-teacher"]},
    ],
}


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from probe.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("demo")
    pdf = run_demo(DemoConfig(out=str(root / "run"), report=str(root / "demo.pdf"), quick=True), progress=False)
    return root, pdf


def _grid_copy(demo, tmp_path, drop=()):
    """A copy of the quick demo's grid directory (features included) without the files in ``drop``."""
    root, _ = demo
    dst = tmp_path / "ablation"
    shutil.copytree(root / "run" / "ablation", dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def _build(inputs, out, **kw):
    from analysis.report import ReportConfig, build_report

    return build_report(ReportConfig(inputs=[str(p) for p in inputs], out=str(out), **kw))


def _text(pdf, page=None):
    from pypdf import PdfReader

    pages = PdfReader(pdf).pages
    chosen = pages if page is None else [pages[page - 1]]
    return " ".join(" ".join(p.extract_text() for p in chosen).split())


def _pages(pdf, tmp_path, dpi=40):
    """Every page as a grey-level array (pdftoppm, as a reader would see it)."""
    from PIL import Image

    out = tmp_path / f"render-{pdf.stem}"
    out.mkdir()
    subprocess.run(["pdftoppm", "-r", str(dpi), "-gray", str(pdf), str(out / "p")], check=True)
    return [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(out.glob("p*"))]


needs_pdftoppm = pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) not installed")


def check_pictures(pdf, tmp_path, dpi=40):
    """No page but the last mostly empty, nothing drawn in the page margins, a caption on every figure page."""
    files = pdf.parent / f"{pdf.stem}_files"
    manifest = json.loads((files / "pages.json").read_text())
    pages = _pages(pdf, tmp_path, dpi)
    assert len(pages) == len(manifest)
    for n, grey in enumerate(pages, start=1):
        ink = grey < 220
        if n == len(pages):  # the last page ends where the text ends: it may be short, but not blank
            body = ink[int(0.05 * len(grey)):int(0.95 * len(grey))]  # between the running header and footer
            assert body.any(), f"page {n} holds nothing but its header and footer"
        else:
            assert ink.mean() > 0.02, f"page {n} is mostly empty ({ink.mean():.3f} of it inked)"
        side, top, bottom = int(0.6 * dpi), int(0.3 * dpi), int(0.25 * dpi)
        for name, strip in (("left", ink[:, :side]), ("right", ink[:, -side:]), ("top", ink[:top]),
                            ("bottom", ink[-bottom:])):
            assert not strip.any(), f"page {n}: something runs into the {name} margin"
    for entry in manifest:
        text = _text(pdf, entry["page"])
        for number in entry["figures"]:
            assert f"Figure {number}." in text, f"page {entry['page']}: figure {number} has no caption"
    return manifest


# ---------------------------------------------------------------------- verdict adapter
def test_contrast_rows_read_schema_2():
    df = contrast_rows(SCHEMA2)
    assert list(df["name"]) == [c["name"] for c in SCHEMA2["contrasts"]]
    assert list(df["verdict"]) == ["supported", "contradicted", "refused", "inconclusive"]
    first = df.iloc[0]
    assert ((first.arm, first.versus, first.effect, first.ci_low, first.ci_high)
            == ("random", "teacher", 30.3, 26.0, 34.1))
    assert np.isnan(df.iloc[2].effect) and df.iloc[2].match_met is False and "NOT met" in df.iloc[2].match
    assert df.iloc[1].match_met is True and df.iloc[1].match.startswith("fd_start: arm 273 vs 260")
    claims = claim_rows(SCHEMA2)
    assert list(claims["verdict"]) == ["inconclusive", "contradicted"]
    assert claims.iloc[1].contrasts == "random-vs-teacher, reinit-io-vs-teacher, band-vs-teacher"
    s = verdict_settings(SCHEMA2)
    assert (s["margin"], s["floor_std"], s["reference"], s["level"]) == (1.23, 1.3, 8.6, 0.95)


def test_contrast_rows_read_the_current_verdict_format():
    from analysis.verdict import verdict

    rng = np.random.default_rng(0)
    rows = [dict(init=i, init_group=g, method="diffratio-js", seed=s, status="done", fd_final=m + rng.normal())
            for i, g, m in (("full", "teacher", 10.0), ("random", "random", 40.0), ("io", "features", 5.0),
                            ("band", "no-features", 1.0)) for s in range(4)]
    v = verdict(pd.DataFrame(rows), reference={"fd": 9.0, "floor": {"fd": 2.0, "fd_std": 0.5}})
    as_json = json.loads(json.dumps(v.to_dict()))
    df = contrast_rows(as_json)
    # verdict() now writes schema 2: judged contrasts at the top level, claims name them
    assert list(df["name"]) == [c.name for c in v.contrasts]
    assert list(df["verdict"]) == [c.verdict for c in v.contrasts]
    assert {n for c in v.claims for n in c.contrasts} <= set(df["name"])
    assert "supported" in set(df["verdict"])  # random init is far worse than full init
    worse = next(c for c in v.contrasts if c.predicted == "arm worse")
    row = df.set_index("name").loc[worse.name]
    assert row.effect == pytest.approx(worse.effect)
    assert (row.ci_low, row.ci_high) == pytest.approx((worse.ci_low, worse.ci_high))
    assert row.n_arm == worse.n_arm
    assert list(claim_rows(as_json)["verdict"]) == [c.verdict for c in v.claims]
    assert verdict_settings(as_json)["margin"] == pytest.approx(v.margin)
    assert contrast_rows(None).empty and contrast_rows({"comparisons": []}).empty


# ---------------------------------------------------------------------------- the demo
def test_every_section_is_present_as_text(demo):
    root, pdf = demo
    text = _text(pdf)
    page1 = _text(pdf, 1)
    for piece in ("Question.", "Table 1. Verdict per contrast", "Figure 1. Learning curves of the key arms",
                  "Reading of the data", "What was run"):
        assert piece in page1, piece
    for piece in ("Contents", "1 The claim", "2 The evidence for each contrast", "2.1 Quality per arm",
                  "2.2 Learning curves", "2.3 Samples", "3 The explanation from features",
                  "3.1 CKA between the teacher and each student", "3.2 The teacher's own maps", "3.3 Linear probes",
                  "3.4 Feature drift during training", "3.5 UMAP of the most and the least transferred layer",
                  "4 Caveats", "5 What to run next", "k-NN accuracy", "Metric floor:", "Budget:", "Seeds:",
                  "Memorisation per arm", "NN ratio (pixels)"):
        assert piece in text, piece
    contents = (root / "demo_files" / "contents.txt").read_text().splitlines()
    omitted = [line for line in contents if "omitted" in line]
    # the quick grid logs CKA to the teacher at every evaluation (train/student/drift.py): nothing is omitted
    assert omitted == []


def test_reading_and_caveats_come_from_the_data(demo):
    root, pdf = demo
    agg = pd.read_csv(root / "run" / "ablation" / "aggregate.csv")
    fd = agg[agg["metric"] == "fd_final"]
    best, worst = fd.loc[fd["mean"].idxmin()], fd.loc[fd["mean"].idxmax()]
    ref = json.loads((root / "run" / "ablation" / "reference.json").read_text())
    page1 = _text(pdf, 1)
    assert f"the best mean is {best.init}'s" in page1 and f"the worst {worst.init}'s" in page1
    assert f"floor {fmt(ref['floor']['fd'])} ± {fmt(ref['floor']['fd_std'])}" in page1
    text = _text(pdf)
    assert f"{fmt(ref['floor']['fd'])} ± {fmt(ref['floor']['fd_std'])} in FD" in text  # the floor caveat quotes it
    assert "1 finished run per arm" in text                          # the quick grid has one seed
    # what to run next gives the command that extends this grid
    assert (f"demo-quick.toml --out {root / 'run' / 'ablation'} --teacher {root / 'run' / 'teacher'} "
            f"--seeds 0,1,2") in text


def test_files_beside_the_pdf(demo):
    root, pdf = demo
    files = root / "demo_files"
    manifest = json.loads((files / "pages.json").read_text())
    figures = sorted(n for e in manifest for n in e["figures"])
    tables = sorted(n for e in manifest for n in e["tables"])
    assert figures == list(range(1, len(figures) + 1)) and len(figures) >= 8
    for n in figures:
        (vector,) = files.glob(f"figure-{n:02d}-*.pdf")
        (png,) = files.glob(f"figure-{n:02d}-*.png")
        assert vector.read_bytes()[:5] == b"%PDF-" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for n in tables:
        (csv,) = files.glob(f"table-{n:02d}-*.csv")
        assert len(pd.read_csv(csv)) > 0
    for e in manifest:
        assert (files / e["png"]).exists()
    (cka,) = files.glob("figure-*-cka-students-cka.csv")  # the data behind a figure
    assert len(pd.read_csv(cka)) > 0
    assert (files / "verdict-ablation.txt").read_text().startswith("Verdict")


def test_same_inputs_give_the_same_bytes(demo, tmp_path):
    from pypdf import PdfReader

    root, pdf = demo
    again = _build([root / "run"], tmp_path / "again.pdf", title="onestep-probe demo: digits")
    assert pdf.read_bytes() == again.read_bytes()
    for f in sorted((root / "demo_files").glob("figure-*")):
        assert f.read_bytes() == (tmp_path / "again_files" / f.name).read_bytes(), f.name
    meta = PdfReader(pdf).metadata
    assert "/CreationDate" not in meta and "/ModDate" not in meta and "/Producer" not in meta


@needs_pdftoppm
def test_pages_as_pictures(demo, tmp_path):
    root, pdf = demo
    manifest = check_pictures(pdf, tmp_path)
    cka_page = next(e for e in manifest if "cka-students" in e["png"])
    assert cka_page["figures"], cka_page


# ------------------------------------------------------------------ other real inputs
@needs_pdftoppm
def test_verdict_computed_from_the_summary_when_files_are_missing(demo, tmp_path):
    grid = _grid_copy(demo, tmp_path, drop=("verdict.json", "verdict.txt"))
    pdf = _build([grid], tmp_path / "summary-only.pdf", umap=False)
    text = _text(pdf, 1)
    assert "Table 1. Verdict per contrast" in text and "inconclusive" in text
    assert (tmp_path / "summary-only_files" / "verdict-ablation.txt").read_text().startswith("Verdict")
    check_pictures(pdf, tmp_path)


@needs_pdftoppm
def test_schema_2_verdict_is_typeset_and_coloured(demo, tmp_path):
    from PIL import Image

    grid = _grid_copy(demo, tmp_path, drop=("verdict.json", "verdict.txt"))
    (grid / "verdict.json").write_text(json.dumps(SCHEMA2))
    pdf = _build([grid], tmp_path / "schema2.pdf", umap=False)
    page1 = _text(pdf, 1)
    for c in SCHEMA2["contrasts"]:
        assert c["name"] in page1 and c["verdict"] in page1
    assert "claim 2 (Is it the teacher's features rather than its mapping) is CONTRADICTED" in page1
    # a contrast on another summary column than the verdict's names it in its row (and only that one)
    assert "random vs teacher (FD (mean of the last quarter))" in " ".join(page1.split())
    assert page1.count("(FD (mean of the last quarter))") == 1
    text = _text(pdf)
    assert "fd_start: arm 610 vs 20.0 (tolerance 50.0) NOT met" in text      # the measured match, refused
    assert "Refused: band-vs-teacher was not compared" in text                 # named among the caveats
    assert "A matched control for band-vs-teacher" in text                     # and in what to run next
    table = pd.read_csv(tmp_path / "schema2_files" / "table-01-verdict-contrasts.csv")
    assert list(table["verdict"]) == ["supported", "contradicted", "refused", "inconclusive"]
    # the verdict cells carry their colours on the rendered page
    png = np.asarray(Image.open(tmp_path / "schema2_files" / "page-01-headline-curves.png").convert("RGB"))
    from matplotlib.colors import to_rgb

    from analysis.report_layout import VERDICT_STYLE

    for verdict, (_, cell) in VERDICT_STYLE.items():
        rgb = np.round(np.array(to_rgb(cell)) * 255)
        assert (np.abs(png.astype(int) - rgb).sum(axis=2) <= 3).sum() > 50, verdict
    check_pictures(pdf, tmp_path)


@needs_pdftoppm
def test_feature_drift_section_when_curves_log_it(demo, tmp_path):
    grid = _grid_copy(demo, tmp_path)
    curves = pd.read_csv(grid / "curves.csv")
    logged = curves[curves["metric"] == "cka"]  # what the student loop logged at each evaluation
    assert len(logged) and set(logged["step"]) == set(curves.loc[curves["metric"] == "fd", "step"])
    start = logged[(logged["init"] == "teacher") & (logged["step"] == 0)]["value"]
    assert len(start) and (start - 1).abs().max() < 1e-5  # the teacher init's features are the teacher's
    pdf = _build([grid], tmp_path / "drift.pdf", umap=False)
    contents = (tmp_path / "drift_files" / "contents.txt").read_text()
    assert "3.4 Feature drift during training: included" in contents
    assert "Feature drift during training (ablation): CKA of each student's features" in _text(pdf)
    drift = pd.read_csv(next((tmp_path / "drift_files").glob("figure-*-feature-drift-drift.csv")))
    assert set(drift["layer"]) == set(logged["layer"]) and len(drift) == len(logged)
    check_pictures(pdf, tmp_path)


def test_missing_parts_are_named_not_drawn(demo, tmp_path):
    root, _ = demo
    out = _build([root / "run" / "teacher"], tmp_path / "t.pdf")
    contents = (tmp_path / "t_files" / "contents.txt").read_text()
    assert ("1 The claim: omitted (no ablation directory with a verdict (verdict.json or summary.csv) "
            "was given)") in contents
    assert "2.2 Learning curves: omitted (no student run logged sample quality (eval_every > 0))" in contents
    assert "2.3 Samples: included" in contents
    text = _text(out)
    assert "no verdict could be formed: no ablation directory was given" in text
    assert "Omitted: no ablation directory" in text


def test_student_runs_without_a_grid(demo, tmp_path):
    root, _ = demo
    run = root / "run" / "ablation" / "runs" / "teacher__diffratio-js__s0"
    out = _build([run], tmp_path / "s.pdf")
    contents = (tmp_path / "s_files" / "contents.txt").read_text()
    assert "2.2 Learning curves: included" in contents
    assert "Sample quality over training of each student run" in _text(out)


# --------------------------------------------------------------------------------- layout
def test_layout_wraps_to_the_width_and_continues_long_tables(tmp_path):
    from analysis.report_layout import BODY_H, Column, Document, Heading, Table, text_width, wrap

    lines = wrap("a sentence that goes on " * 30, 3.0, 9)
    assert len(lines) > 5 and all(text_width(line, 9) <= 3.0 for line in lines)
    assert wrap("x" * 400, 2.0, 9)[0] != "x" * 400                      # an over-long word is broken too
    doc = Document("layout test", tmp_path)
    doc.para("Some text before the table. " * 20)
    doc.heading("1  A long table")
    rows = [[str(i), "words that wrap onto a second line " * (1 + i % 3)] for i in range(120)]
    doc.table([Column("i", "right"), Column("text", wrap=True)], rows, "One row per number.", "long",
              csv=pd.DataFrame({"i": range(120)}))
    doc.heading("2  After it")
    doc.para("closing words")
    pages = doc.layout()
    assert len(pages) >= 3
    for page in pages:
        assert max(p.top + p.block.height() for p in page) <= BODY_H + 1e-9   # nothing runs past the body
        assert not isinstance(page[-1].block, Heading)                        # no heading left alone at a foot
    parts = [p.block for page in pages for p in page if isinstance(p.block, Table)]
    assert [r for t in parts for r in t.cells] == rows and len(parts) == len(pages)
    assert not parts[0].continued and all(t.continued for t in parts[1:])
    pdf = tmp_path / "layout.pdf"
    manifest = doc.write(pdf)
    assert len(manifest) == len(pages) and manifest[-1]["tables"] == [1]
    assert "Table 1. One row per number. (continued)" in _text(pdf, len(pages))
    assert (tmp_path / "table-01-long.csv").exists()


def test_resolution_says_when_the_metric_cannot_rank_arms_at_convergence():
    at_floor = {"fd": 10.1, "floor": {"fd": 10.53, "fd_std": 1.25}}      # digits' teacher and floor
    little = {"fd": 20.0, "floor": {"fd": 10.0, "fd_std": 1.0}}
    room = {"fd": 282.0, "floor": {"fd": 0.79, "fd_std": 0.39}}          # scenes' default teacher
    assert "cannot separate arms at convergence" in resolution(at_floor, "fd_final")
    assert "only 2.00x the floor" in resolution(little, "fd_final")
    assert "has room to rank arms" in resolution(room, "fd_final") and "357x" in resolution(room, "fd_final")
    assert resolution({}, "fd_final") == "" and resolution(room, "precision_final") == ""


def test_demo_page_one_states_the_metric_resolution(demo):
    root, pdf = demo
    ref = json.loads((root / "run" / "ablation" / "reference.json").read_text())
    expected = resolution(ref, "fd_final")
    assert expected.startswith("Resolution:")
    assert " ".join(expected.split()) in _text(pdf, 1)
