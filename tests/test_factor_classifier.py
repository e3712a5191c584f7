"""The metric classifier trained on every stored factor: heads, targets, cache key, and what it lets the metric see."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.core.data import dataset_fingerprint, load_dataset
from probe.quality.classifier import (
    MAX_CATEGORIES,
    ClassifierConfig,
    cache_key,
    factor_fingerprint,
    factor_heads,
    factor_targets,
    head_loss,
    load_or_train_classifier,
)
from probe.quality.health import format_heads
from probe.quality.metrics import QualityEvaluator

# Small enough for a test (about 2-3 s of training each on a busy 2-core machine), large enough
# that the factor heads learn colour, size and position (measured: colour 1.0, size R^2 ~0.85).
SMALL = ClassifierConfig(width=8, feature_dim=32, steps=200, batch_size=32, lr=5e-3, seed=0)


def test_heads_follow_the_factor_types():
    labels = np.array([0, 1, 2, 0, 1, 2])
    factors = {"label_copy": labels.copy(),                        # the label head learns it already
               "colour": np.array([0, 3, 3, 5, -1, 0]),             # categorical, -1 = unknown
               "size": np.array([1.0, 2.0, 3.0, np.nan, 2.5, 1.5]),  # continuous, NaN = unknown
               "flat": np.zeros(6, np.int64),                      # constant: nothing to learn
               "other_length": np.arange(7),                       # not one value per image: ignored
               "names": np.array(list("abcdef"))}                  # not a number: ignored
    names = {h["name"]: h for h in factor_heads(factors, labels)}
    assert set(names) == {"colour", "size"}
    assert names["colour"] == {"name": "colour", "kind": "categorical", "levels": [0, 3, 5]}
    assert names["size"]["kind"] == "continuous" and names["size"]["mean"] == pytest.approx(2.0)
    # an integer factor with more than MAX_CATEGORIES values is regressed
    many = np.arange(MAX_CATEGORIES + 1)
    wide = factor_heads({"angle": many}, np.zeros(len(many), np.int64))
    assert wide[0]["kind"] == "continuous"

    factors.pop("other_length"), factors.pop("names")
    colour, size = factor_targets(factors, [names["colour"], names["size"]])
    assert colour.tolist() == [0, 1, 1, 2, -1, 0]                 # level indices, unknown kept as -1
    z = size.numpy()
    assert np.isnan(z[3]) and z[~np.isnan(z)].mean() == pytest.approx(0.0, abs=1e-6)
    # the losses skip unknown targets, and a batch with none known adds nothing
    out = torch.zeros(6, 3)
    assert head_loss(out, colour, "categorical").item() == pytest.approx(np.log(3))
    assert torch.isfinite(head_loss(torch.zeros(6, 1), size, "continuous"))
    assert head_loss(out[:1], torch.tensor([-1]), "categorical") is None


def test_digits_keeps_its_label_only_classifier_and_cache_key(tmp_path):
    # digits stores no factors: the same network as before factor heads existed, under the same key
    tiny = ClassifierConfig(width=8, feature_dim=16, steps=40, batch_size=32, lr=1e-2, seed=1)
    train = load_dataset("digits", "train")
    assert train.factors == {} and factor_heads(train.factors, train.labels) == []
    fp = dataset_fingerprint(train)
    assert cache_key("digits", tiny, fp) == cache_key("digits", replace(tiny, factor_heads=False), fp)
    model, info = load_or_train_classifier("digits", tiny, cache_dir=tmp_path)
    assert info["key"] == cache_key("digits", tiny, fp) and info["heads"] == [] and len(model.factor_heads) == 0
    assert info["head_scores"] == {"label": info["test_accuracy"]} and info["max_shift_used"] == tiny.max_shift
    assert set(model.state_dict()) == {k for k in model.state_dict() if not k.startswith("factor_heads")}


def test_shapes_key_changes_with_the_heads():
    train = load_dataset("shapes", "train")
    heads = factor_heads(train.factors, train.labels)
    # shape is the label; colour is categorical; size and position are regressed
    assert [(h["name"], h["kind"]) for h in heads] == [("colour", "categorical"), ("size", "continuous"),
                                                        ("x", "continuous"), ("y", "continuous")]
    fp = dataset_fingerprint(train)
    old = cache_key("shapes", replace(SMALL, factor_heads=False), fp)
    new = cache_key("shapes", SMALL, fp, heads, factor_fingerprint(train.factors))
    assert old != new  # a cached label-only shapes classifier is never taken for the factor-head one
    moved = {**train.factors, "size": train.factors["size"] + 1.0}
    assert factor_fingerprint(moved) != factor_fingerprint(train.factors)


def _zoom(x: torch.Tensor, crop: int = 12) -> torch.Tensor:
    """Objects 16/12 = 1.33x larger: the central crop scaled back up (nearest: edges stay hard, as rendered)."""
    o = (x.shape[-1] - crop) // 2
    return F.interpolate(x[..., o:o + crop, o:o + crop], size=x.shape[-2:], mode="nearest")


def test_colour_and_size_changes_move_the_score_only_with_factor_heads(tmp_path):
    scores = {}
    for name, config in (("label only", replace(SMALL, factor_heads=False)), ("factors", SMALL)):
        ev = QualityEvaluator("shapes", n_samples=500, n_reference=1000, seed=0, cache_dir=tmp_path,
                              classifier_config=config)
        floor = ev.floor(n_resamples=3)
        base = ev.heldout[np.random.default_rng(5).choice(len(ev.heldout), 500, replace=False)]
        scores[name] = {"floor": floor["fd"], "std": floor["fd_std"], "clean": ev.evaluate(base)["fd"],
                        "rgb": ev.evaluate(base[:, [1, 2, 0]])["fd"],   # colour swap: R<-G, G<-B, B<-R
                        "zoom": ev.evaluate(_zoom(base))["fd"], "info": ev.classifier_info}
    old, new = scores["label only"], scores["factors"]
    # before: the shape-only classifier cannot tell a colour swap from real data
    assert old["rgb"] < old["floor"] + 3 * old["std"], old
    # now: both changes sit far above the floor (many floor stds, several times its mean), real data does not
    for change in ("rgb", "zoom"):
        assert new[change] > new["floor"] + 10 * new["std"] and new[change] > 4 * new["floor"], (change, new)
    assert new["clean"] < new["floor"] + 3 * new["std"]
    # every head's held-out score is recorded, and printed by the health report
    info = new["info"]
    assert set(info["head_scores"]) == {"label", "colour", "size", "x", "y"}
    assert info["head_scores"]["colour"] > 0.95 and min(info["head_scores"][k] for k in ("size", "x", "y")) > 0.5
    assert info["max_shift_used"] == 0  # translation augmentation would corrupt the position targets
    text = format_heads(info)
    assert "colour acc" in text and "size R^2" in text and text.startswith("label acc")
