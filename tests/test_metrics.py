"""Sample-quality metrics: closed forms, constructed cases, and the digits evaluator end to end."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from probe.core.data import load_dataset
from probe.core.errors import UserError
from probe.quality.classifier import ClassifierConfig, load_or_train_classifier, random_shift, train_classifier
from probe.quality.evaluate import format_quality, summarise_draws
from probe.quality.memorisation import memorisation
from probe.quality.metrics import (
    QualityEvaluator,
    class_coverage,
    class_entropy,
    fd_infinity,
    feature_stats,
    frechet_distance,
    inception_fid,
    kid,
    knn_radii,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
    to_inception_input,
)


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


# ----------------------------------------------------------------------------------- KID
# torchmetrics warns that it buffers every feature: irrelevant at these sizes
pytestmark_kid = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`:UserWarning")


@pytestmark_kid
def test_kid_equals_torchmetrics_poly_mmd_on_whole_sets():
    # Equal set sizes and one subset covering both sets: torchmetrics' random permutations then
    # cannot change the value, so the two implementations must agree to round-off. The features go
    # through KernelInceptionDistance itself, with an identity `feature` module standing in for
    # Inception (the inputs *are* the features).
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(7)
    real = np.abs(rng.standard_normal((300, 32))) * 2.0       # ReLU-like, as the classifier's features
    fake = np.abs(rng.standard_normal((300, 32)) + 0.2) * 2.0
    metric = tm_kid.KernelInceptionDistance(feature=nn.Identity(), subsets=1, subset_size=300)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    theirs, their_std = metric.compute()
    ours, our_std = kid(fake, real, subsets=1, subset_size=300)
    assert ours == pytest.approx(float(theirs), rel=1e-9) and our_std == 0.0 == float(their_std)
    # and the bare function on other sizes (ours allows unequal sets; theirs needs equal ones)
    direct = float(tm_kid.poly_mmd(torch.from_numpy(real[:120]), torch.from_numpy(fake[:120])))
    assert mmd2_unbiased(polynomial_kernel(fake[:120], fake[:120]), polynomial_kernel(real[:120], real[:120]),
                         polynomial_kernel(fake[:120], real[:120])) == pytest.approx(direct, rel=1e-9)


@pytestmark_kid
def test_kid_subset_average_agrees_with_torchmetrics():
    # With subsets smaller than the sets the two draw different random subsets: the means must agree
    # within their standard errors, and the spreads over subsets must be alike.
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(8)
    real = np.abs(rng.standard_normal((1000, 16))) * 2.0
    fake = np.abs(rng.standard_normal((600, 16)) + 1.0) * 2.0
    torch.manual_seed(0)
    metric = tm_kid.KernelInceptionDistance(feature=nn.Identity(), subsets=200, subset_size=200)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    theirs, their_std = (float(v) for v in metric.compute())
    ours, our_std = kid(fake, real, subsets=200, subset_size=200, seed=1)
    assert abs(ours - theirs) < 4 * math.hypot(our_std, their_std) / math.sqrt(200)
    assert 0.7 < our_std / their_std < 1.4
    assert ours > 20 * our_std / math.sqrt(200)  # a real difference, not noise around 0


def test_kid_is_unbiased_where_fd_is_not():
    # Two samples of one Gaussian: the mean KID over many draws is ~0 at n = 40 and at n = 400,
    # whereas FD's mean falls about tenfold between the two sample sizes (its bias ~ 1/n).
    d = 8

    def mean_scores(n, draws=60):
        k, f = [], []
        for s in range(draws):
            rng = np.random.default_rng([n, s])
            x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
            k.append(kid(x, y, subsets=1, subset_size=n)[0])
            f.append(frechet_distance(*feature_stats(x), *feature_stats(y)))
        return np.mean(k), np.std(k) / math.sqrt(draws), np.mean(f)

    kid_small, se_small, fd_small = mean_scores(40)
    kid_large, se_large, fd_large = mean_scores(400)
    assert abs(kid_small) < 3 * se_small and abs(kid_large) < 3 * se_large
    assert 7 < fd_small / fd_large < 14
    # a real shift is seen at both sizes
    rng = np.random.default_rng(9)
    assert kid(rng.standard_normal((400, d)) + 1.0, rng.standard_normal((400, d)))[0] > 50 * se_large


# --------------------------------------------------------------------------- FD-infinity
def fd_bias(d, n, m):
    """First-order bias of FD between samples of sizes n, m of N(mu, I_d): the mean term
    d (1/n + 1/m) plus the covariance term: the Bures distance near I is ||dS||_F^2 / 4 and
    E ||S_n - I||_F^2 = d (d + 1) / (n - 1) for a sample covariance (ddof 1)."""
    return d * (1 / n + 1 / m) + d * (d + 1) / 4 * (1 / (n - 1) + 1 / (m - 1))


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_fd_infinity_removes_the_known_bias_on_gaussians(shift):
    d, n, m, draws = 8, 600, 1200, 30
    true = shift ** 2 * d / d  # mean shifted by `shift` along one axis, equal covariances
    fd, inf = [], []
    for s in range(draws):
        rng = np.random.default_rng([s, int(shift)])
        fake = rng.standard_normal((n, d))
        fake[:, 0] += shift
        real = rng.standard_normal((m, d))
        fd.append(frechet_distance(*feature_stats(fake), *feature_stats(real)))
        r = fd_infinity(fake, real, seed=s)
        inf.append(r["fd_inf"])
    bias, fd, inf = fd_bias(d, n, m), np.array(fd), np.array(inf)
    # What FD-infinity removes (paired, so the draws' common noise cancels) is the bias law...
    assert np.mean(fd - inf) == pytest.approx(bias, rel=0.25)
    # ...and what is left is the true distance, up to the noise of the mean over draws.
    assert abs(np.mean(inf) - true) < 3 * np.std(inf) / math.sqrt(draws) + 0.1 * bias
    if shift == 0:  # identical distributions: plain FD's mean is the bias itself
        assert np.mean(fd) == pytest.approx(bias, rel=0.1) and abs(np.mean(inf)) < 0.2 * bias


def test_fd_infinity_recovers_the_slope_of_the_bias_law():
    # Sub-samples of both sets at share t: E FD = true + (bias at full size) / t, i.e. slope = bias * n.
    d, n, m = 6, 800, 800
    slopes = [fd_infinity(*(np.random.default_rng([s, k]).standard_normal((size, d))
                            for k, size in enumerate((n, m))), draws=4, seed=s)["slope"] for s in range(20)]
    assert np.mean(slopes) == pytest.approx(fd_bias(d, n, m) * n, rel=0.3)


def test_fd_infinity_rejects_bad_fractions():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError):
        fd_infinity(x, x, fractions=(1.0,))
    with pytest.raises(ValueError):
        fd_infinity(x, x, fractions=(0.0, 1.0))


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


@pytest.mark.parametrize("n_real, n_fake, dim, k, shift", [(300, 200, 8, 3, 0.5), (150, 400, 32, 5, 1.0),
                                                           (500, 500, 128, 3, 0.0)])
def test_precision_recall_equal_the_prdc_reference(n_real, n_fake, dim, k, shift, capsys):
    # prdc (Naeem et al. 2020, clovaai) is the published implementation of these k-NN manifolds; it counts
    # a point strictly inside a radius, ours at or inside: the same on continuous data
    import prdc  # a test dependency (pyproject's `test` extra)

    rng = np.random.default_rng(n_real + dim)
    real = rng.standard_normal((n_real, dim)).astype(np.float32)
    fake = (rng.standard_normal((n_fake, dim)) * 1.2 + shift).astype(np.float32)
    ref = prdc.compute_prdc(real, fake, nearest_k=k)
    capsys.readouterr()  # prdc prints the set sizes
    precision, recall = precision_recall(real, fake, k=k)
    assert precision == pytest.approx(ref["precision"], abs=1e-12)
    assert recall == pytest.approx(ref["recall"], abs=1e-12)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0   # a case where the radii decide, not a trivial one


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


def test_floor_resamples_are_disjoint_when_the_pool_allows(evaluator, cache_dir):
    big = QualityEvaluator("digits", n_samples=200, n_reference=500, seed=0, cache_dir=cache_dir)  # pool 1297
    draws = big.floor_draws(5)
    assert [len(d) for d in draws] == [200] * 5 and len(set(np.concatenate(draws).tolist())) == 1000
    draws = evaluator.floor_draws(5)  # 500 per resample from a pool of 750: independent draws must overlap
    assert all(len(set(d.tolist())) == 500 and d.max() < len(evaluator.heldout) for d in draws)
    assert len(set(draws[0].tolist()) & set(draws[1].tolist())) > 0
    assert [d.tolist() for d in evaluator.floor_draws(5)] == [d.tolist() for d in draws]  # seeded


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

    # The unbiased figures: KID's floor is ~0 within its spread, FD-infinity's far below FD's
    # (most of FD's floor is its small-sample bias); both see the noise.
    assert abs(floor["kid"]) < 3 * floor["kid_std"] and floor["fd_inf"] < 0.5 * floor["fd"]
    assert bad["kid"] > 20 * floor["kid_std"] and bad["fd_inf"] > 20 * floor["fd_std"]
    assert scores["kid_subset_std"] > 0


def test_model_spread_and_floor_are_both_printed():
    draws = [{"fd": 12.0 + i, "kid": 0.5 * i, "kid_subset_std": 0.1, "fd_inf": 3.0 + i, "precision": 0.9,
              "recall": 0.8, "coverage": 1.0, "class_entropy": 0.99, "n": 500} for i in range(3)]
    r = summarise_draws(draws)
    assert r["fd"] == 13.0 and r["fd_std"] == pytest.approx(1.0) and r["draws"] == 3
    assert "kid_subset_std_std" not in r and r["kid_subset_std"] == pytest.approx(0.1)
    floor = {"fd": 10.5, "fd_std": 1.25, "kid": -0.07, "kid_std": 1.2, "fd_inf": 1.2, "fd_inf_std": 2.5,
             "precision": 0.91, "precision_std": 0.01, "recall": 0.89, "recall_std": 0.01,
             "coverage": 1.0, "coverage_std": 0.0, "n_resamples": 5}
    text = format_quality({**r, "floor": floor, "sampler": "heun-18"})
    assert "13.00 +- 1.00   (floor 10.50 +- 1.25)" in text and "FD-infinity" in text and "3 latent draws" in text
    old = {"fd": 9.0, "precision": 0.9, "recall": 0.9, "coverage": 1.0, "n": 500, "sampler": "heun-18",
           "floor": {k: v for k, v in floor.items() if not k.startswith(("kid", "fd_inf"))}}
    assert "9.00   (floor 10.50 +- 1.25)" in format_quality(old)  # eval.json of older runs still prints


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


# -------------------------------------------------------------------------- memorisation
def test_memorisation_tells_copies_from_fresh_samples(evaluator):
    # The "model" trained on the first 1000 train images; the test split is the held-out set (359,
    # so the training reference is 359 of the 1000); the other 438 train images are fresh samples
    # of the same distribution that neither reference contains.
    train, test = load_dataset("digits", "train").images, load_dataset("digits", "test").images
    seen, fresh = train[:1000], train[1000:]
    copies = seen[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:400]]
    feats = {name: evaluator.classifier.features_and_predictions(x)[0]
             for name, x in (("seen", seen), ("fresh", fresh), ("copies", copies), ("test", test))}
    for space, get in (("pixel", lambda name, x: x.numpy()), ("features", lambda name, x: feats[name])):
        copied = memorisation(get("copies", copies), get("seen", seen), get("test", test))
        clean = memorisation(get("fresh", fresh), get("seen", seen), get("test", test))
        assert copied["n_reference"] == clean["n_reference"] == len(test)
        # a pure copier: ~1 - 359/1000 = 0.64, every sample closer than 99% of unseen images
        assert copied["nn_ratio"] < 0.8 and copied["copy_share"] > 0.95, (space, copied)
        assert 0.9 < clean["nn_ratio"] < 1.1 and clean["copy_share"] < 0.05, (space, clean)


def test_evaluator_memorisation_reports_both_spaces(evaluator):
    train = load_dataset("digits", "train").images
    m = evaluator.memorisation(train[:500])  # a model that returns training images
    assert set(m) == {"pixel", "features"}
    assert all(m[s]["nn_ratio"] < 0.85 and m[s]["copy_share"] > 0.95 for s in m)


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
