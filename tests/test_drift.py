"""Feature drift during student training: CKA to the teacher per layer and sigma at every evaluation."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.ablation_summary import summarise_run
from analysis.report_data import drift_table
from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import load_state, read_metrics
from probe.features.extract import extract_features
from probe.features.hooks import default_layers
from probe.features.store import FeatureStore
from train.student.drift import capture_reference, metric_key, parse_key
from train.student.loop import StudentConfig, train_student


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=str(teacher), steps=2, batch=8, checkpoint_every=2, log_every=1, eval_every=2,
                eval_samples=16, lr_g=1e-3, lr_aux=1e-3, seed=1, drift_samples=64)
    return StudentConfig(**{**base, **kw})


def _drift_rows(run):
    """{step: {(layer, sigma): cka}} from metrics.jsonl."""
    return {r["step"]: {key: v for k, v in r.items() if (key := parse_key(k)) is not None}
            for r in read_metrics(run) if "eval_fd" in r}


def test_keys_round_trip():
    assert parse_key(metric_key("down_blocks.1.resnets.0", 0.5)) == ("down_blocks.1.resnets.0", 0.5)
    assert parse_key(metric_key("mid_block", 0)) == ("mid_block", 0.0)
    assert parse_key("eval_fd") is None and parse_key("cka/x/y") is None and parse_key("cka_start") is None


def test_teacher_init_starts_at_one_and_random_init_clearly_lower(tiny_teacher, tmp_path, fake_evaluator):
    layers = default_layers(load_model(tiny_teacher).unet)
    sigmas = StudentConfig(out="x", teacher="x").drift_sigmas
    kept = _drift_rows(train_student(_cfg(tmp_path / "t", tiny_teacher), progress=False))
    assert sorted(kept) == [0, 2]
    assert set(kept[0]) == {(layer, float(s)) for layer in layers for s in sigmas}
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in kept[0].values())  # the same weights, the same inputs
    fresh = _drift_rows(train_student(_cfg(tmp_path / "r", tiny_teacher, init="random"), progress=False))
    assert set(fresh[0]) == set(kept[0])
    values = np.array(list(fresh[0].values()))
    assert np.isfinite(values).all() and values.max() < 0.99 and values.mean() < 0.8


def test_reference_uses_the_grid_feature_files_inputs(tiny_teacher, tmp_path):
    """The teacher's drift features are those `probe extract` (and the grid's feature files) store for the
    same data split, noise seed, sigmas and samples: step-0 drift and cka_step0.csv measure the same thing."""
    teacher = load_model(tiny_teacher)
    ref = capture_reference(teacher, "digits", "down_blocks.1,mid_block", (0.0, 2.5), 24, "cpu")
    assert ref is not None and ref.layers == ["down_blocks.1", "mid_block"]
    path = extract_features(tiny_teacher, data="digits", layers=("down_blocks.1", "mid_block"), sigmas=(0.0, 2.5),
                            out=str(tmp_path / "t.h5"), n_samples=24, split="test", noise_seed=0, progress=False)
    with FeatureStore.open(path) as store:
        for layer in ref.layers:
            for i in range(2):
                np.testing.assert_allclose(ref.teacher[layer][i], store.load(layer, i), rtol=1e-5, atol=1e-6)


def test_drift_reaches_curves_and_the_report(tiny_teacher, tmp_path, fake_evaluator):
    run = train_student(_cfg(tmp_path / "c", tiny_teacher, drift_layers="down_blocks.?, mid_block",
                             drift_sigmas=(0.5,)), progress=False)
    _, curve = summarise_run(run, steps=2, eval_every=2)
    cka = pd.DataFrame([c for c in curve if c["metric"] == "cka"])
    assert set(cka.layer) == {"down_blocks.0", "down_blocks.1", "mid_block"}  # globs as probe extract reads them
    assert set(cka.sigma) == {0.5} and set(cka.step) == {0, 2} and cka.value.between(-1, 1.0 + 1e-6).all()
    assert {c["metric"] for c in curve} >= {"fd", "cka"}
    table = drift_table(pd.DataFrame(curve).assign(init="full", method="diffratio-js", seed=1))
    assert len(table) == len(cka) and set(table.layer) == set(cka.layer)


def test_off_bad_layers_and_resume(tiny_teacher, tmp_path, fake_evaluator):
    run = train_student(_cfg(tmp_path / "off", tiny_teacher, drift_layers=""), progress=False)
    assert not any(parse_key(k) for r in read_metrics(run) for k in r)
    with pytest.raises(UserError, match="down_blcks"):
        train_student(_cfg(tmp_path / "bad", tiny_teacher, drift_layers="down_blcks.0"), progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="drift_samples"):
        _cfg(tmp_path / "bad", tiny_teacher, drift_samples=0)

    # resume stays exact with drift on: killed after step 3, resumed from the step-2 checkpoint
    full = train_student(_cfg(tmp_path / "full", tiny_teacher, steps=4), progress=False)
    cut = _cfg(tmp_path / "cut", tiny_teacher, steps=4)
    train_student(cut, progress=False, stop_after=3)
    train_student(cut, resume=True, progress=False)
    a, b = load_state(full), load_state(tmp_path / "cut")
    for k in a["ema"]["net"]:
        assert torch.equal(a["ema"]["net"][k], b["ema"]["net"][k]), k

    def logged(run):  # everything but wall-clock time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]

    assert logged(full) == logged(tmp_path / "cut")
    assert sorted(_drift_rows(full)) == [0, 2, 4]
