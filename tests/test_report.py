"""The quick demo end to end, and its PDF read back as text (pypdf) and as pictures (pdftoppm)."""

import shutil
import subprocess

import numpy as np
import pytest

SECTIONS = ["Samples", "Sample quality over training", "Ablation aggregate", "Verdict on the paper",
            "Linear probe of", "estimator debiased linear CKA", "mode sigmas", "mode layers", "mode pair",
            "permutation null from", "UMAP of the teacher"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from probe.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("demo")
    pdf = run_demo(DemoConfig(out=str(root / "run"), report=str(root / "demo.pdf"), quick=True), progress=False)
    return root, pdf


def test_every_section_is_present_as_text(demo):
    from pypdf import PdfReader

    root, pdf = demo
    text = " ".join(" ".join(page.extract_text() for page in PdfReader(pdf).pages).split())
    for section in SECTIONS:
        assert section in text, section
    contents = (root / "demo_files" / "contents.txt").read_text()
    assert "omitted" not in contents, contents


def test_same_inputs_give_the_same_bytes(demo):
    from analysis.report import ReportConfig, build_report

    root, pdf = demo
    again = build_report(ReportConfig(inputs=[str(root / "run")], out=str(root / "again.pdf"),
                                      title="onestep-probe demo: digits"))
    assert pdf.read_bytes() == again.read_bytes()


def test_missing_parts_are_named_not_drawn(tmp_path, demo):
    from analysis.report import ReportConfig, build_report

    root, _ = demo
    out = build_report(ReportConfig(inputs=[str(root / "run" / "teacher")], out=str(tmp_path / "t.pdf")))
    contents = (tmp_path / "t_files" / "contents.txt").read_text()
    assert "4 Verdict: omitted (no ablation directory given)" in contents
    assert out.exists()


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) not installed")
def test_no_page_is_empty_as_a_picture(demo, tmp_path):
    from PIL import Image

    _, pdf = demo
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) >= len(SECTIONS)
    for page in pages:
        grey = np.asarray(Image.open(page).convert("L"), dtype=np.float32)
        assert (grey < 200).mean() > 0.002, f"{page.name} is (nearly) blank"
