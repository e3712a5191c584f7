"""Every command of the README's "CLI in ten commands" (plus regress), end to end through the
installed `probe` entry point, on a tiny teacher and a few steps. Shared runs are session fixtures
built into temporary directories on first use, so each test also passes alone and in any order."""

import json
import math

import pandas as pd
import pytest
from _cli import ok, run_probe

TINY_TEACHER = ["--preset", "test", "--steps", "4", "--batch", "16", "--checkpoint-every", "2", "--sample-steps", "2",
                "--eval-samples", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def cli_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "teacher"
    result = ok(run_probe("train", "teacher", "--out", out, *TINY_TEACHER))
    return out, result


@pytest.fixture(scope="session")
def cli_student(cli_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "student"
    result = ok(run_probe("train", "student", "--teacher", cli_teacher[0], "--out", out, "--steps", "2", "--batch", "8",
                          "--checkpoint-every", "2", "--eval-every", "2", "--eval-samples", "100", "--device", "cpu"))
    return out, result


@pytest.fixture(scope="session")
def cli_features(cli_teacher, cli_student, tmp_path_factory):
    d = tmp_path_factory.mktemp("feats")
    files = {}
    for name, model in (("teacher", cli_teacher[0]), ("student", cli_student[0])):
        files[name] = d / f"{name}.h5"
        ok(run_probe("extract", model, "--data", "digits", "--sigmas", "0,1", "--layers", "mid_block,up_blocks.0",
                     "--n-samples", "120", "--device", "cpu", "--out", files[name]))
    return files


def test_train_teacher(cli_teacher):
    out, result = cli_teacher
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists() and (out / "samples.png").exists()
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 4
    assert f"teacher written to {out}" in result.stdout


def test_eval(cli_teacher, tmp_path):
    result = ok(run_probe("eval", cli_teacher[0], "--n-samples", "100", "--steps", "2", "--device", "cpu",
                          "--out", tmp_path / "eval.json", "--grid", tmp_path / "grid.png"))
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert "real-vs-real floor" in result.stdout and "heun-2" in result.stdout
    assert math.isfinite(scores["fd"]) and scores["n"] == 100 and scores["fd"] > scores["floor"]["fd"]
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_train_student(cli_student):
    out, result = cli_student
    assert (out / "unet").is_dir() and (out / "model.json").exists()
    quality = json.loads((out / "eval.json").read_text())
    assert quality["sampler"] == "one-step" and quality["n"] == 100 and math.isfinite(quality["fd"])
    assert "one-step: n = 100" in result.stdout and "Frechet distance" in result.stdout
    assert f"generator written to {out}" in result.stdout
    assert "init 'teacher' (seed 0): " in result.stdout  # where the parameters came from (format_init_report)


def test_train_regress(cli_teacher, tmp_path):
    out = tmp_path / "regress"
    result = ok(run_probe("train", "regress", "--teacher", cli_teacher[0], "--out", out, "--n-pairs", "16",
                          "--sample-steps", "2", "--steps", "2", "--batch", "8", "--eval-samples", "0",
                          "--device", "cpu"))
    assert (out / "unet").is_dir() and f"use it with --init from:{out}" in result.stdout


def test_layers(cli_teacher):
    result = ok(run_probe("layers", cli_teacher[0]))
    rows = result.stdout.splitlines()
    assert rows[0].startswith("layer") and any(r.startswith("mid_block ") and "*" in r for r in rows)
    assert any(r.startswith("up_blocks.0 ") for r in rows) and all(r.split()[-1] in ("yes", "no") for r in rows[1:])


def test_extract_two_models_row_aligned(cli_features):
    import h5py
    import numpy as np

    with h5py.File(cli_features["teacher"], "r") as a, h5py.File(cli_features["student"], "r") as b:
        assert bool(a.attrs["complete"]) and bool(b.attrs["complete"])
        assert list(a["sigmas"][:]) == [0.0, 1.0] and np.array_equal(a["sample_ids"][:], b["sample_ids"][:])
        assert set(a["features"]) == {"mid_block", "up_blocks.0"} and a["features/mid_block"].shape[1] == 120


def test_linear(cli_features, tmp_path):
    result = ok(run_probe("linear", cli_features["teacher"], "--out", tmp_path / "probes.csv",
                          "--fig", tmp_path / "probes.png", "--targets", "label"))
    df = pd.read_csv(tmp_path / "probes.csv")
    assert set(df["layer"]) == {"mid_block", "up_blocks.0"} and set(df["sigma"]) == {0.0, 1.0}
    assert df["accuracy"].between(0, 1).all() and (tmp_path / "probes-label.png").exists()
    assert "label: best" in result.stdout and f"{tmp_path / 'probes-label.png'}" in result.stdout  # named


def test_cka(cli_features, tmp_path):
    result = ok(run_probe("cka", cli_features["teacher"], cli_features["student"], "--out", tmp_path / "cka.csv",
                          "--fig", tmp_path / "cka.png", "--n-perm", "2"))
    df = pd.read_csv(tmp_path / "cka.csv")
    assert len(df) == 4 and (df["mode"] == "pair").all() and (df["n_perm"] == 2).all()
    assert df["cka"].between(-0.5, 1.0 + 1e-6).all() and (tmp_path / "cka.png").exists()
    assert "debiased CKA (pair)" in result.stdout and f"{tmp_path / 'cka.png'}" in result.stdout
    ok(run_probe("cka", cli_features["teacher"], cli_features["student"], "--out", tmp_path / "rbf.csv",
                 "--estimator", "rbf", "--bandwidth", "offdiag", "--n-perm", "0"))
    assert (pd.read_csv(tmp_path / "rbf.csv")["bandwidth_rule"] == "offdiag").all()


def test_umap(cli_features, tmp_path):
    result = ok(run_probe("umap", cli_features["teacher"], "--layer", "mid_block", "--out", tmp_path / "umap.png",
                          "--csv", tmp_path / "umap.csv", "--max-points", "100"))
    df = pd.read_csv(tmp_path / "umap.csv")
    assert len(df) == 2 and df["knn_accuracy"].between(0, 1).all() and (tmp_path / "umap.png").stat().st_size > 0
    assert "mid_block sigma 0" in result.stdout


GRID = """
teacher = "@t"                  # replaced by --teacher
methods = ["diffratio-js"]
seeds = [0]
features = false
reference_steps = 2
[student]
steps = 2
batch = 8
eval_every = 2
eval_samples = 100
checkpoint_every = 2
log_every = 1
[inits]
teacher = { spec = "teacher", group = "teacher" }
random = { spec = "random", group = "random" }
[prereq.t]
kind = "teacher"
preset = "test"
"""


@pytest.fixture(scope="session")
def cli_ablation(cli_teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("ablation")
    (d / "grid.toml").write_text(GRID)
    result = ok(run_probe("train", "ablation", "--config", d / "grid.toml", "--out", d / "out",
                          "--teacher", cli_teacher[0], "--device", "cpu"))
    return d / "out", result


def test_train_ablation(cli_ablation):
    out, result = cli_ablation
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["init"]) == ["random", "teacher"] and (summary["status"] == "done").all()
    assert (out / "verdict.txt").exists() and f"ablation written to {out}" in result.stdout


def test_report(cli_teacher, cli_ablation, tmp_path):
    from pypdf import PdfReader

    from analysis.report_data import fmt

    pdf = tmp_path / "mine.pdf"
    result = ok(run_probe("report", cli_teacher[0], cli_ablation[0], "--out", pdf, "--no-umap", "--title", "cli test"))
    text = "\n".join(p.extract_text() for p in PdfReader(pdf).pages)
    # the title heads every page; the contents list the sections; page 1 quotes the teacher's own figure
    assert "cli test" in text and "2.3 Samples" in text and "Table 1. Verdict per contrast" in text
    reference = json.loads((cli_ablation[0] / "reference.json").read_text())
    assert f"teacher's own figure is {fmt(reference['fd'])}" in text and f"report written to {pdf}" in result.stdout
