"""The main job on a fresh machine: `probe demo --quick` with an empty home and an empty cache.

Runs the installed `probe` entry point in a subprocess, so nothing this test session has trained or
cached (the session's classifier cache, imported modules, torch's grad mode) can help it: the metric
classifier is trained from scratch inside the teacher's end-of-run evaluation (under no_grad), as
on a new user's machine.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
from _cli import env, probe_command

from analysis.report_data import fmt


def fresh_env(tmp_path: Path) -> dict:
    """This checkout on the path, but a new empty home and onestep-probe cache."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    e = {k: v for k, v in env().items() if not k.startswith(("ONESTEP_PROBE_", "MPLCONFIGDIR", "XDG_"))}
    return {**e, "HOME": str(home), "ONESTEP_PROBE_CACHE": str(cache)}


@pytest.mark.slow
def test_quick_demo_with_evaluation_on_an_empty_cache(tmp_path):
    from pypdf import PdfReader

    env = fresh_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(probe_command() + ["demo", "--quick"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    # the classifier was trained here, once, and cached as a consistent pair
    entries = sorted(p.name for p in (tmp_path / "cache" / "classifiers").iterdir())
    assert [n.rsplit(".", 1)[1] for n in entries] == ["json", "lock", "safetensors"], entries
    info = json.loads((tmp_path / "cache" / "classifiers" / entries[0]).read_text())
    assert info["test_accuracy"] > 0.9 and len(info["weights_sha256"]) == 64
    assert not (tmp_path / "home" / ".cache" / "onestep-probe" / "classifiers").exists()  # the variable is obeyed

    # the teacher's own end-of-run evaluation ran (it is what failed under no_grad on a fresh cache)
    teacher_eval = json.loads((work / "runs" / "demo" / "teacher" / "eval.json").read_text())
    assert math.isfinite(teacher_eval["fd"]) and teacher_eval["n"] == 100 and teacher_eval["floor"]["fd"] > 0
    reference = json.loads((work / "runs" / "demo" / "ablation" / "reference.json").read_text())

    pdf = work / "reports" / "demo.pdf"
    assert pdf.exists() and pdf.stat().st_size > 10_000
    text = "\n".join(page.extract_text() for page in PdfReader(pdf).pages)
    for section in ("Table 1. Verdict per contrast", "2.2 Learning curves", "2.3 Samples", "3.3 Linear probes",
                    "3.1 CKA between the teacher and each", "3.5 UMAP"):
        assert section in text, section
    # page 1 reads the teacher's own figure and the floor off the grid's reference.json
    assert f"teacher's own figure is {fmt(reference['fd'])}" in text
    assert "real-vs-real floor" in text and fmt(reference["floor"]["fd"]) in text
