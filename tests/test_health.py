"""Metric health: the degradation ladder, its pieces, and the eval report's spread and memorisation."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from probe.core.edm import heun_sample
from probe.core.errors import UserError
from probe.quality.evaluate import EvalConfig, evaluate_model, format_quality, generate
from probe.quality.health import (
    BLUR_STDS,
    COLOUR_SHIFTS,
    HEALTH_METRICS,
    NOISE_STDS,
    colour_shift,
    drop_classes,
    format_health,
    gaussian_blur,
    metric_health,
)


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 8, 8] = 1.0
    blurred = gaussian_blur(dot, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.2
    assert gaussian_blur(torch.zeros(1, 1, 8, 8), 2.0).shape == (1, 1, 8, 8)  # radius capped at the size


def test_colour_shift_direction_and_range():
    grey, rgb = torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4)
    assert torch.allclose(colour_shift(grey, 0.2), grey + 0.2)
    shifted = colour_shift(rgb, 0.2)
    assert shifted[0, :, 0, 0].tolist() == pytest.approx([0.2, 0.0, -0.2])
    assert colour_shift(torch.ones(1, 1, 2, 2), 0.4).max() == 1.0  # clamped to the data range


def test_drop_classes_never_draws_them():
    labels = np.repeat(np.arange(4), 50)
    base = np.random.default_rng(0).choice(200, 60, replace=False)
    idx = drop_classes(base, labels, np.array([2]), np.random.default_rng(1))
    assert len(idx) == 60 and len(set(idx)) == 60 and not np.any(labels[idx] == 2)
    kept = ~np.isin(labels[base], [2])
    assert np.array_equal(idx[kept], base[kept])  # only the dropped class's images are replaced
    assert drop_classes(base, labels, np.array([0, 1, 2]), np.random.default_rng(1)) is None  # too few left
    # a short pool: a few repeats of the other classes are allowed (here 10 of 60 images may repeat)
    short = drop_classes(base, labels, np.array([0, 1, 2]), np.random.default_rng(1), max_repeats=1.0)
    assert np.all(labels[short] == 3) and len(short) == 60


def test_every_metric_ranks_the_ladder_on_digits():
    # n = 500: at 250 the weakest rungs (dropping one digit of ten) sit inside FD-infinity's floor spread
    r = metric_health("digits", n_samples=500, seed=0)
    families = [x["family"] for x in r["ladder"]]
    assert families.count("noise") == len(NOISE_STDS) and families.count("blur") == len(BLUR_STDS)
    assert families.count("colour") == len(COLOUR_SHIFTS) and families.count("drop") >= 1
    for metric in HEALTH_METRICS:
        for family in dict.fromkeys(families):
            values = [r["clean"][metric]] + [x[metric] for x in r["ladder"] if x["family"] == family]
            assert all(b > a for a, b in zip(values, values[1:])), (metric, family, values)
    assert all(r["monotone"].values())
    f = r["floor"]
    assert f["n_resamples"] == 5 and f["n"] == r["n_samples"] == 500 and f["fd_std"] > 0
    assert r["classifier_test_accuracy"] >= 0.97 and r["n_reference"] + r["n_heldout"] == 1797
    # the strongest rung of each family is far outside the floor's spread in every metric
    for family in dict.fromkeys(families):
        top = [x for x in r["ladder"] if x["family"] == family][-1]
        assert all(top[m] > f[m] + 2 * f[f"{m}_std"] for m in HEALTH_METRICS), (family, top)
    text = format_health(r)
    assert "real-vs-real floor over 5 resamples" in text and "n = 500" in text and "noise std 0.4" in text


def test_eval_reports_model_spread_and_memorisation(tiny_teacher):
    result, samples = evaluate_model(EvalConfig(model=str(tiny_teacher), n_samples=200, draws=2, steps=2))
    assert len(samples) == 400 and result["draws"] == 2 and len(result["per_draw"]) == 2
    assert result["fd_std"] > 0 and result["kid_std"] > 0  # two latent batches differ
    assert result["fd"] == pytest.approx(np.mean([d["fd"] for d in result["per_draw"]]))
    m = result["memorisation"]
    assert m["pixel"]["n_reference"] == 359 and np.isfinite(m["features"]["nn_ratio"])
    text = format_quality(result)
    assert "(floor " in text and "memorisation" in text and "2 latent draws" in text
    with pytest.raises(UserError):
        evaluate_model(EvalConfig(model=str(tiny_teacher), n_samples=200, draws=0))


def test_churn_noise_is_fresh_for_every_batch():
    # D(x) = x / 2 makes the sampler linear, so a churned sample is the churned path without noise (churn_noise 0,
    # same latents: generate's seeded draw) plus the noise's share; that share must differ between batches, as one
    # generator runs through all of them (restarting it per batch would repeat it and make batches alike)
    model = SimpleNamespace(channels=1, resolution=2, generator=None, denoiser=lambda x, sigma: 0.5 * x)
    latents = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    drift = heun_sample(model.denoiser, latents, 6, churn=5.0, churn_noise=0.0)
    noise = generate(model, 8, seed=3, steps=6, batch=4, churn=5.0) - drift
    assert noise.abs().mean() > 0.1 and not torch.allclose(noise[:4], noise[4:], atol=1e-6)


def test_eval_with_churn_names_its_sampler_and_is_seeded(tiny_teacher):
    cfg = dict(model=str(tiny_teacher), n_samples=200, draws=1, steps=3)
    plain, x0 = evaluate_model(EvalConfig(**cfg))
    # 3 Karras steps are at sigma 80, 2.5 and 0.002: the window [0.05, 3] churns the middle one
    churned, x1 = evaluate_model(EvalConfig(**cfg, churn=5.0, churn_tmax=3.0))
    again, x2 = evaluate_model(EvalConfig(**cfg, churn=5.0, churn_tmax=3.0))
    assert plain["sampler"] == "heun-3" and churned["sampler"] == "heun-3-churn5[0.05,3]"
    assert not torch.equal(x0, x1) and torch.equal(x1, x2)  # noise from the latents' seed: same images twice
    assert churned["nfe"] == plain["nfe"] == 5


def test_cli_health_prints_the_ladder(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "probe.cli", "eval", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("--health", "digits", "--n-samples", "250", "--out", tmp_path / "health.json")
    assert r.returncode == 0, r.stderr
    assert "blur 2.0 px" in r.stdout and "classifier test accuracy" in r.stdout
    assert "classifier heads on the test split" in r.stdout and "label acc" in r.stdout  # digits: the label only
    assert json.loads((tmp_path / "health.json").read_text())["n_samples"] == 250
    r = run()
    assert r.returncode == 2 and "--health" in r.stderr
