"""Sample-quality metrics: closed forms, constructed cases, and the digits evaluator end to end."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from probe.core.errors import UserError
from probe.quality.classifier import ClassifierConfig, load_or_train_classifier, random_shift, train_classifier
from probe.core.data import load_dataset
from probe.quality.metrics import (QualityEvaluator, class_coverage, class_entropy, feature_stats,
                           frechet_distance, inception_fid, knn_radii, precision_recall,
                           to_inception_input)


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------- Fréchet distance
def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_frechet_diagonal_matches_closed_form():
    # Commuting (diagonal) covariances: FD = ||mu1-mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_matches_symmetric_form():
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), computed independently with eigh.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = random_spd(rng, 12), random_spd(rng, 12)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_singular_covariance_is_finite_and_quiet():
    # Dead feature units give zero-variance dimensions: the eps offset must handle them silently.
    a, b = np.array([1.0, 2.0, 0.0, 0.0]), np.array([0.5, 0.0, 3.0, 0.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        fd = frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b))
    assert fd == pytest.approx(expected, abs=1e-2)


def test_feature_stats_recover_gaussian_distance():
    rng = np.random.default_rng(3)
    shift = np.array([1.0, -2.0, 0.5])
    x, y = rng.standard_normal((20000, 3)), rng.standard_normal((20000, 3)) + shift
    fd = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert fd == pytest.approx(shift @ shift, rel=0.05)  # covariances equal (I): FD = ||shift||^2


# ----------------------------------------------------------------------- precision / recall
def test_knn_radii_exclude_the_point_itself():
    points = np.arange(6, dtype=float)[:, None]  # 0, 1, ..., 5 on a line
    assert np.allclose(knn_radii(points, k=1), 1.0)
    assert np.allclose(knn_radii(points, k=2), [2, 1, 1, 1, 1, 2])


def mixture(rng, modes, n):
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    which = rng.choice(modes, n)
    return centres[which] + rng.standard_normal((n, 2))


def test_precision_recall_identical_sets_are_one():
    x = mixture(np.random.default_rng(4), [0, 1, 2, 3], 300)
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_disjoint_sets_are_zero():
    rng = np.random.default_rng(5)
    x = mixture(rng, [0, 1, 2, 3], 300)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(6)
    real, fake = mixture(rng, [0, 1, 2, 3], 800), mixture(rng, [0, 1], 800)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9          # every fake point is realistic
    assert 0.4 < recall < 0.6       # but only half the real modes are produced
    precision, recall = precision_recall(fake, real, k=3)  # roles swapped: half the samples unrealistic
    assert 0.4 < precision < 0.6 and recall > 0.9


# --------------------------------------------------------------------------- class coverage
def test_class_coverage_and_entropy():
    k = 10
    uniform = np.repeat(np.arange(k), 50)
    assert class_coverage(uniform, k) == 1.0 and class_entropy(uniform, k) == pytest.approx(1.0)
    collapsed = np.full(500, 3)
    assert class_coverage(collapsed, k) == pytest.approx(1 / k) and class_entropy(collapsed, k) == 0.0
    half = np.repeat(np.arange(5), 100)
    assert class_coverage(half, k) == 0.5
    assert class_entropy(half, k) == pytest.approx(math.log(5) / math.log(10))
    # A class with 40% of the expected rate is not covered; with 60% it is (threshold 0.5).
    preds = np.concatenate([np.zeros(40), np.ones(60), np.full(400, 2)]).astype(int)
    prior = np.array([0.2, 0.2, 0.6])
    assert class_coverage(preds, 3, prior) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- classifier, evaluator
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    return QualityEvaluator("digits", n_samples=500, seed=0, cache_dir=cache_dir)


def test_classifier_accuracy_and_cache(evaluator, cache_dir):
    info = evaluator.classifier_info
    assert info["test_accuracy"] >= 0.97 and info["n_test"] > 300 and not info["cached"]
    model, again = load_or_train_classifier("digits", cache_dir=cache_dir)
    assert again["cached"] and again["test_accuracy"] == info["test_accuracy"]
    x = load_dataset("digits", "test").images[:32]
    assert torch.equal(model.features(x), evaluator.classifier.features(x))


def test_classifier_training_is_deterministic():
    ds = load_dataset("digits", "train")
    config = ClassifierConfig(steps=15, batch_size=16, seed=3)
    a, b = (train_classifier(ds.images, ds.labels, 10, config) for _ in range(2))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_random_shift_translates_by_at_most_one_pixel():
    x = torch.zeros(200, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    y = random_shift(x, 1, torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(y[:, 0])[:, 1], torch.nonzero(y[:, 0])[:, 2]
    assert y.sum() == 200 and set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {3, 4, 5}


def test_reference_and_heldout_are_disjoint_and_sized(evaluator):
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert evaluator.n_reference + len(evaluator.heldout) == len(train) + len(test)
    assert len(evaluator.heldout) >= evaluator.n_samples


def test_floor_real_and_noise(evaluator):
    floor = evaluator.floor(n_resamples=5)
    assert all(math.isfinite(floor[k]) for k in ("fd", "fd_std", "precision", "recall"))
    assert floor["fd_std"] > 0 and floor["n"] == 500
    assert evaluator.floor(n_resamples=5) == floor  # cached, same numbers

    rng = np.random.default_rng(123)  # another held-out draw: a "perfect generator"
    real = evaluator.heldout[rng.choice(len(evaluator.heldout), 500, replace=False)]
    scores = evaluator.evaluate(real)
    assert abs(scores["fd"] - floor["fd"]) < max(5 * floor["fd_std"], 0.5 * floor["fd"])
    assert scores["coverage"] == 1.0 and scores["precision"] > 0.8 and scores["recall"] > 0.8

    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluator.evaluate(noise)
    assert bad["fd"] > 20 * floor["fd"] and bad["precision"] < 0.5


def test_half_the_classes_loses_recall_and_coverage(evaluator):
    train = load_dataset("digits", "train")
    half = train.images[train.labels < 5][:500]
    scores, floor = evaluator.evaluate(half), evaluator.floor()
    assert scores["coverage"] == 0.5
    assert scores["recall"] < 0.7 * floor["recall"] and scores["precision"] > 0.8 * floor["precision"]


def test_evaluate_rejects_bad_input(evaluator):
    with pytest.raises(UserError):
        evaluator.evaluate(torch.zeros(10, 1, 8, 8))        # fewer than n_samples
    with pytest.raises(UserError):
        evaluator.evaluate(torch.zeros(500, 3, 8, 8))       # wrong channels
    scores = evaluator.evaluate(torch.full((600, 1, 8, 8), float("nan")))  # diverged: scored, not crashing
    assert scores["n"] == 500 and math.isfinite(scores["fd"])


# ---------------------------------------------------------------------------- Inception FID
class StandIn(nn.Module):
    """Random conv features in place of Inception: same call convention, no weights file."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=9, stride=8)  # 16 features: full-rank covariance at n=32
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x.float() / 255.0))).flatten(1)


def test_to_inception_input():
    x = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8)
    y = to_inception_input(x)
    assert y.shape == (2, 3, 299, 299) and y.dtype == torch.uint8
    assert int(y[0].max()) == 0 and int(y[1].min()) == 255


def test_inception_fid_with_stand_in_extractor(tmp_path):
    train, test = load_dataset("digits", "train").images[:32], load_dataset("digits", "test").images[:32]
    noise = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    extractor = StandIn().eval()
    same = inception_fid(train, train, extractor=extractor)
    real = inception_fid(train, test, extractor=extractor)
    fake = inception_fid(train, noise, extractor=extractor)
    assert abs(same) < 1e-6 and real > 0 and fake > 5 * real
    path = tmp_path / "standin.pt"  # the TorchScript route: a user's local file, no torch-fidelity
    torch.jit.save(torch.jit.script(extractor), str(path))
    assert inception_fid(train, noise, weights_path=path) == pytest.approx(fake, rel=1e-6)


def test_inception_fid_user_errors(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(UserError):
        inception_fid(x, x)                                          # neither weights nor extractor
    with pytest.raises(UserError):
        inception_fid(x, x, weights_path=tmp_path / "missing.pth")   # never downloaded
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        state = tmp_path / "state.pth"
        torch.save({"w": torch.zeros(1)}, state)
        with pytest.raises(UserError, match="torch-fidelity"):
            inception_fid(x, x, weights_path=state)
