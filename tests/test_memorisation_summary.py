"""Memorisation per arm: the copy check of every finished student in summary.csv, aggregate.csv and the report."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from _grid import TINY_STUDENT, TINY_TEACHER, run_grid

import analysis.ablation_summary as summary_mod
from analysis.ablation_summary import MEMO_COLUMNS, final_samples, write_tables
from analysis.report_data import MEMO_METRICS, memorisation_table
from probe.core.data import load_dataset
from probe.quality.metrics import QualityEvaluator
from train.ablation.grid import check_grid, load_grid

# One arm, one seed, two steps: the smallest grid that trains a teacher, a student and scores both.
TINY_GRID = """
teacher = "@t"
methods = ["diffratio-js"]
seeds = [0]
reference_steps = 2
""" + TINY_STUDENT + """
[inits]
full = { spec = "teacher", group = "teacher" }
[prereq.t]
""" + TINY_TEACHER


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    return run_grid(tmp_path_factory.mktemp("memo"), TINY_GRID)


def _tables(out):
    grid = load_grid(str(out.parent / "grid.toml"))
    return grid, check_grid(grid, out)


def test_memorisation_columns_per_run_and_per_arm(grid_dir):
    summary = pd.read_csv(grid_dir / "summary.csv")
    run = summary.iloc[0]
    assert run.status == "done" and set(MEMO_COLUMNS) <= set(summary.columns)
    # a two-step student copies nothing: as far from the training split as from the held-out one
    for space in ("pixel", "features"):
        assert 0.85 < run[f"nn_ratio_{space}"] < 1.15, (space, run[f"nn_ratio_{space}"])
        assert 0 <= run[f"copy_share_{space}"] < 0.2
    agg = pd.read_csv(grid_dir / "aggregate.csv").set_index("metric")
    for col in MEMO_COLUMNS:
        assert agg.loc[col, "n"] == 1 and agg.loc[col, "mean"] == pytest.approx(run[col])

    # the figures are those of the samples the run's final evaluation scored (same generator, same latents)
    final = json.loads((grid_dir / "runs" / run.run / "eval.json").read_text())
    n, seed = final["evaluator"]["n_samples"], final["evaluator"]["seed"]
    samples = final_samples(grid_dir / "runs" / run.run, n, seed)
    ev = QualityEvaluator(final["evaluator"]["dataset"], n_samples=n, seed=seed)
    assert ev.evaluate(samples)["fd"] == pytest.approx(final["fd"], rel=1e-6)
    direct = ev.memorisation(samples)
    assert run.nn_ratio_pixel == pytest.approx(direct["pixel"]["nn_ratio"])
    assert run.nn_ratio_features == pytest.approx(direct["features"]["nn_ratio"])

    if "memorisation" in final:  # recorded by the training loop at the end of the run: read as it is
        assert run.nn_ratio_pixel == pytest.approx(final["memorisation"]["pixel"]["nn_ratio"])
    else:  # an eval.json without it: computed once, then read from memorisation.json
        cache = json.loads((grid_dir / "memorisation.json").read_text())
        assert cache[run.run]["memorisation"]["pixel"]["nn_ratio"] == pytest.approx(run.nn_ratio_pixel)


def test_eval_json_record_wins_and_the_cache_is_reused(grid_dir, monkeypatch):
    def no_generation(*a, **k):
        raise AssertionError("samples regenerated although memorisation.json holds the figures")

    monkeypatch.setattr(summary_mod, "final_samples", no_generation)
    grid, refs = _tables(grid_dir)
    again = write_tables(grid_dir, grid, refs)
    before = pd.read_csv(grid_dir / "summary.csv")
    assert again.nn_ratio_pixel.iloc[0] == pytest.approx(before.nn_ratio_pixel.iloc[0])
    # a run whose eval.json records the check (written at the end of training) is read, not recomputed
    final = {"memorisation": {"pixel": {"nn_ratio": 0.5, "copy_share": 0.9},
                              "features": {"nn_ratio": 0.6, "copy_share": 0.8}}}
    cols = summary_mod.memorisation_columns(summary_mod.run_memorisation(grid_dir, final, cache=None))
    assert cols == {"nn_ratio_pixel": 0.5, "nn_ratio_features": 0.6, "copy_share_pixel": 0.9,
                    "copy_share_features": 0.8}
    assert all(np.isnan(v) for v in summary_mod.memorisation_columns(None).values())


def test_a_model_that_returns_training_images_scores_below_one(grid_dir, tmp_path, monkeypatch):
    # the same grid, but its "generator" hands back training images: the copy check must see it
    copy = tmp_path / "abl"
    shutil.copytree(grid_dir, copy)
    (copy.parent / "grid.toml").write_text(TINY_GRID)
    (copy / "memorisation.json").unlink(missing_ok=True)
    for eval_json in copy.glob("runs/*/eval.json"):  # as a run trained before eval.json recorded the check
        final = json.loads(eval_json.read_text())
        final.pop("memorisation", None)
        eval_json.write_text(json.dumps(final))
    train = load_dataset("digits", "train").images
    picks = np.random.default_rng(0).choice(len(train), 64, replace=False)
    monkeypatch.setattr(summary_mod, "final_samples", lambda run_dir, n, seed: train[picks[:n]])
    grid, refs = _tables(copy)
    row = write_tables(copy, grid, refs).iloc[0]
    # a pure copier: about 1 - 359/1438 = 0.75, and nearly every sample closer than 99% of unseen images
    for space in ("pixel", "features"):
        assert row[f"nn_ratio_{space}"] < 0.85 and row[f"copy_share_{space}"] > 0.9, (space, row)


def test_report_table_lists_the_teacher_then_each_arm():
    arms = pd.DataFrame([dict(init=i, init_group="g", method="m", metric=c, n=3, mean=v, std=0.01)
                         for i, v in (("random", 1.0), ("teacher", 0.98)) for c in MEMO_METRICS])
    reference = {"memorisation": {"pixel": {"nn_ratio": 0.99, "copy_share": 0.01},
                                  "features": {"nn_ratio": 1.01, "copy_share": 0.02}}}
    t = memorisation_table(arms, reference)
    assert list(t["arm"]) == ["teacher (reference)", "teacher", "random"]  # full-teacher arm first
    assert t.iloc[0]["nn_ratio_features"] == 1.01 and np.isnan(t.iloc[0]["nn_ratio_features_std"])
    assert t.iloc[1]["n"] == 3 and t.iloc[2]["copy_share_pixel"] == 1.0
    assert MEMO_METRICS == MEMO_COLUMNS  # the report reads the columns the summary writes
