"""CKA family checked against definitions: invariances, closed forms, U-statistics, streaming, nulls."""

import itertools

import numpy as np
import pandas as pd
import pytest
from _store_fixture import write_store
from matplotlib.figure import Figure
from scipy.spatial.distance import pdist

import analysis.cka as cka_module
from analysis.cka import (
    _centre,
    _cross_fro2,
    cka_table,
    cknna,
    debiased_linear_cka,
    hsic_unbiased,
    linear_cka,
    minibatch_cka,
    permutation_null,
    rbf_cka,
)
from analysis.heatmaps import plot_cka_heatmap
from probe.core.errors import UserError
from probe.features.store import FeatureStore


def _related(rng, n=120, d=12, e=9, noise=1.0):
    X = rng.standard_normal((n, d))
    Y = X @ rng.standard_normal((d, e)) + noise * rng.standard_normal((n, e))
    return X, Y


def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _gram_biased_cka(X, Y):
    """Kornblith et al. eq.: HSIC = tr(K H L H) / (n-1)^2 with linear kernels on raw features."""
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _u_statistic_hsic(K, L):
    """HSIC_u as three U-statistics over distinct index tuples (the definition; O(n^4))."""
    n = K.shape[0]
    t1 = np.mean([K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return t1 + t2 - 2 * t3


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_hsic_unbiased_is_the_u_statistic(rng):
    X, Y = _related(rng, n=7, d=3, e=2)
    K, L = X @ X.T, Y @ Y.T
    assert hsic_unbiased(K, L) == pytest.approx(_u_statistic_hsic(K, L), rel=1e-10)


def test_fast_debiased_matches_gram_form_on_raw_offset_data(rng):
    X, Y = _related(rng, n=30, d=6, e=5)
    X, Y = X + 3.0, Y - 7.0  # HSIC_u is translation invariant; our fast form centres first
    Kx, Ky = X @ X.T, Y @ Y.T
    direct = hsic_unbiased(Kx, Ky) / np.sqrt(hsic_unbiased(Kx, Kx) * hsic_unbiased(Ky, Ky))
    assert debiased_linear_cka(X, Y, form="feature") == pytest.approx(direct, rel=1e-10)
    assert debiased_linear_cka(X, Y, form="gram") == pytest.approx(direct, rel=1e-10)


def test_biased_feature_and_gram_forms_agree_with_definition(rng):
    X, Y = _related(rng)
    ref = _gram_biased_cka(X, Y)
    assert linear_cka(X, Y, form="feature") == pytest.approx(ref, rel=1e-10)
    assert linear_cka(X, Y, form="gram") == pytest.approx(ref, rel=1e-10)
    Xw, Yw = rng.standard_normal((20, 50)), rng.standard_normal((20, 40))  # d > n: auto picks gram
    assert linear_cka(Xw, Yw) == pytest.approx(_gram_biased_cka(Xw, Yw), rel=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, debiased_linear_cka, cknna, lambda X, Y: rbf_cka(X, Y).cka])
def test_self_similarity_is_one_and_symmetric(rng, fn):
    X, Y = _related(rng)
    assert fn(X, X) == pytest.approx(1.0, abs=1e-12)
    if fn is not cknna:  # published CKNNA is not symmetric: see test_cknna_matches_plain_loop_definition
        assert fn(X, Y) == pytest.approx(fn(Y, X), rel=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, debiased_linear_cka, cknna, lambda X, Y: rbf_cka(X, Y).cka])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(rng, fn):
    X, Y = _related(rng)
    Xt = 3.7 * X @ _orthogonal(rng, X.shape[1])
    assert fn(X, Xt) == pytest.approx(1.0, abs=1e-9)
    assert fn(Xt, Y) == pytest.approx(fn(X, Y), rel=1e-9)


def test_debiased_removes_small_sample_inflation():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((64, 512)), rng.standard_normal((64, 512))  # independent
    assert linear_cka(X, Y) > 0.8  # biased: inflated by the diagonal of the Gram matrices
    assert abs(debiased_linear_cka(X, Y)) < 0.1  # null sd ~ sqrt(2)/n = 0.022


def test_float32_with_large_offset_equals_float64(rng):
    X, Y = _related(rng, n=500)
    X32 = (X + 1e4).astype(np.float32)
    Y32 = (Y - 3e4).astype(np.float32)
    X64, Y64 = X32.astype(np.float64), Y32.astype(np.float64)  # the very same numbers
    assert debiased_linear_cka(X32, Y32) == pytest.approx(debiased_linear_cka(X64, Y64), rel=1e-5)
    assert linear_cka(X32, Y32) == pytest.approx(linear_cka(X64, Y64), rel=1e-5)
    assert debiased_linear_cka(X32, Y32) > 0.3  # a real signal survived, not an offset artefact


def test_too_few_samples_and_mismatched_rows(rng):
    with pytest.raises(UserError, match="at least 4 samples"):
        debiased_linear_cka(rng.standard_normal((3, 5)), rng.standard_normal((3, 5)))
    with pytest.raises(UserError, match="same samples"):
        linear_cka(rng.standard_normal((10, 5)), rng.standard_normal((9, 5)))


def test_minibatch_single_batch_is_debiased_and_batch_size_barely_matters(rng):
    X, Y = _related(rng, n=2000, d=16, e=12, noise=2.0)
    full = debiased_linear_cka(X, Y)
    assert minibatch_cka([X], [Y]) == pytest.approx(full, rel=1e-10)
    for b in (100, 250, 1000):
        bx = [X[i:i + b] for i in range(0, 2000, b)]
        by = [Y[i:i + b] for i in range(0, 2000, b)]
        assert minibatch_cka(bx, by) == pytest.approx(full, abs=0.03)


def test_minibatch_streams_from_feature_store(tmp_path, rng):
    X, Y = _related(rng, n=300, d=6, e=6)
    pa = write_store(tmp_path / "a.h5", {"mid_block": X[None]}, [1.0])
    pb = write_store(tmp_path / "b.h5", {"mid_block": Y[None]}, [1.0])
    with FeatureStore.open(pa) as a, FeatureStore.open(pb) as b:
        value = minibatch_cka(a.iter_rows("mid_block", 0, 100, seed=0), b.iter_rows("mid_block", 0, 100, seed=0))
        assert value == pytest.approx(debiased_linear_cka(X, Y), abs=0.05)


def test_rbf_bandwidth_rules_are_medians_of_the_stated_distances(rng):
    X, Y = _related(rng, n=83)  # 83 * 82 / 2 pairs is odd: the medians of d and of d^2 are the same pair
    off = rbf_cka(X, Y, sigma_factor=0.5, bandwidth="offdiag")
    assert off.bandwidth_x == pytest.approx(0.5 * np.median(pdist(X)), rel=1e-9)
    assert off.bandwidth_y == pytest.approx(0.5 * np.median(pdist(Y)), rel=1e-9)
    full = rbf_cka(X, Y, sigma_factor=0.5)  # default: Kornblith's, zeros of the diagonal included
    sq = lambda F: ((F[:, None, :] - F[None, :, :]) ** 2).sum(-1)
    assert full.bandwidth_x == pytest.approx(0.5 * np.sqrt(np.median(sq(X))), rel=1e-9)
    assert full.bandwidth_x < off.bandwidth_x and 0 < full.cka < 1 and 0 < off.cka < 1
    with pytest.raises(UserError, match="bandwidth rule"):
        rbf_cka(X, Y, bandwidth="median")


def _kornblith_rbf_cka(X, Y, threshold):
    """Kornblith et al. (2019) as in their notebook's formulas: gram_rbf (median of the full squared
    distance matrix, diagonal zeros included), center_gram (H K H), cka (normalised Frobenius product)."""
    def gram_rbf(x):
        dots = x @ x.T
        sq_norms = np.diag(dots)
        sq_distances = -2.0 * dots + sq_norms[:, None] + sq_norms[None, :]
        return np.exp(-sq_distances / (2.0 * threshold**2 * np.median(sq_distances)))

    def center(g):
        n = g.shape[0]
        H = np.eye(n) - np.ones((n, n)) / n
        return H @ g @ H

    gx, gy = center(gram_rbf(X)), center(gram_rbf(Y))
    return np.sum(gx * gy) / (np.linalg.norm(gx) * np.linalg.norm(gy))


def test_rbf_kornblith_rule_reproduces_the_reference_notebook_example():
    np.random.seed(1337)  # the notebook's own example, in its order of draws
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    ref = _kornblith_rbf_cka(X, Y, threshold=0.5)
    assert rbf_cka(X, Y, sigma_factor=0.5, bandwidth="kornblith").cka == pytest.approx(ref, abs=1e-10)
    assert abs(rbf_cka(X, Y, sigma_factor=0.5, bandwidth="offdiag").cka - ref) > 1e-4  # the other rule differs


def _loop_hsic_u(A, B):
    """Song et al. (2012) eq. 5 term by term, for any (also non-symmetric) n x n lists of lists."""
    n = len(A)
    At = [[0.0 if i == j else A[i][j] for j in range(n)] for i in range(n)]
    Bt = [[0.0 if i == j else B[i][j] for j in range(n)] for i in range(n)]
    trace = sum(At[i][j] * Bt[j][i] for i in range(n) for j in range(n))           # tr(A~ B~)
    sum_a, sum_b = sum(map(sum, At)), sum(map(sum, Bt))                           # 1'A~1, 1'B~1
    one_ab_one = sum(At[i][j] * Bt[j][q] for i in range(n) for j in range(n) for q in range(n))
    return (trace + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 * one_ab_one / (n - 2)) / (n * (n - 3))


def _loop_cknna(X, Y, k):
    """CKNNA as in Huh et al. (2024), reference metrics.cknna: linear kernels of the raw features,
    each row's k largest off-diagonal entries (ties: lower index), cross term on the mutual pairs,
    self terms on each side's own pairs, unbiased HSIC, ratio. Plain loops, nothing clever."""
    n = len(X)
    gram = lambda F: [[sum(a * b for a, b in zip(F[i], F[j])) for j in range(n)] for i in range(n)]
    K, L = gram(X), gram(Y)
    top = lambda G, i: set(sorted((j for j in range(n) if j != i), key=lambda j: (-G[i][j], j))[:k])
    NK, NL = [top(K, i) for i in range(n)], [top(L, i) for i in range(n)]
    masked = lambda G, *sets: [[G[i][j] if all(j in s[i] for s in sets) else 0.0 for j in range(n)] for i in range(n)]
    cross = _loop_hsic_u(masked(K, NK, NL), masked(L, NK, NL))
    return cross / np.sqrt(_loop_hsic_u(masked(K, NK), masked(K, NK)) * _loop_hsic_u(masked(L, NL), masked(L, NL)))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cknna_matches_plain_loop_definition(k):
    rng = np.random.default_rng(k)
    X = rng.standard_normal((12, 4)) + 1.5          # not centred: CKNNA uses the features as given
    Y = X @ rng.standard_normal((4, 3)) + 0.7 * rng.standard_normal((12, 3))
    assert cknna(X, Y, k=k) == pytest.approx(_loop_cknna(X.tolist(), Y.tolist(), k), rel=1e-12)
    # as published, the cross term's 1'K~L~1 is not symmetric in the two spaces: both orders match
    assert cknna(Y, X, k=k) == pytest.approx(_loop_cknna(Y.tolist(), X.tolist(), k), rel=1e-12)
    assert cknna(X, Y, k=k) != pytest.approx(cknna(Y, X, k=k), rel=1e-6)
    # ties at the k-th neighbour (integer features) go to the lower index, in both implementations
    Xi, Yi = rng.integers(0, 3, (12, 3)).astype(float), rng.integers(0, 3, (12, 2)).astype(float)
    assert cknna(Xi, Yi, k=k) == pytest.approx(_loop_cknna(Xi.tolist(), Yi.tolist(), k), rel=1e-12)


def test_cknna_dense_masked_form_and_hsic_unbiased_on_non_symmetric_kernels():
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((12, 4)), rng.standard_normal((12, 3))
    K, L = X @ X.T, Y @ Y.T
    top = lambda G: np.argsort(-np.where(np.eye(12, dtype=bool), -np.inf, G), axis=1, kind="stable")[:, :3]
    MK, ML = np.zeros((12, 12)), np.zeros((12, 12))
    np.put_along_axis(MK, top(K), 1.0, axis=1)
    np.put_along_axis(ML, top(L), 1.0, axis=1)
    A, B = K * MK * ML, L * MK * ML
    assert hsic_unbiased(A, B) == pytest.approx(_loop_hsic_u(A.tolist(), B.tolist()), rel=1e-12)
    dense = hsic_unbiased(A, B) / np.sqrt(hsic_unbiased(K * MK, K * MK) * hsic_unbiased(L * ML, L * ML))
    assert cknna(X, Y, k=3) == pytest.approx(dense, rel=1e-12)
    # the reference implementation's guard: + 1e-6 on the denominator
    den = np.sqrt(hsic_unbiased(K * MK, K * MK) * hsic_unbiased(L * ML, L * ML))
    assert cknna(X, Y, k=3, eps=1e-6) == pytest.approx(hsic_unbiased(A, B) / (den + 1e-6), rel=1e-12)


def test_cknna_worked_by_hand():
    """n = 4, k = 1. X: (1,0), (2,0), (0,1), (0,3); Y: 1, 2, 3, 4 (one feature).
    Nearest (largest inner product, self excluded) in X: 1->2, 2->1, 3->4, 4->3; in Y: 1->4, 2->4,
    3->4, 4->3. Mutual pairs: (3,4), (4,3). With eq. 5 (n = 4: divide by 4, (n-1)(n-2) = 6, n-2 = 2):
      cross: A = {34: 3, 43: 3}, B = {34: 12, 43: 12}: tr(AB) = 72, sums 6 and 24, 1'AB1 = 72
             -> (72 + 144/6 - 72) / 4 = 6
      X self: {12: 2, 21: 2, 34: 3, 43: 3}: tr = 26, sum 10, 1'AA1 = 26 -> (26 + 100/6 - 26) / 4 = 25/6
      Y self: {14: 4, 24: 8, 34: 12, 43: 12}: tr = 288, sum 36, col sums (0,0,12,24) . row sums
             (4,8,12,12) = 432 -> (288 + 1296/6 - 432) / 4 = 18
    CKNNA = 6 / sqrt(25/6 * 18) = 6 / sqrt(75) = 2 sqrt(3) / 5."""
    X = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    Y = np.array([[1.0], [2.0], [3.0], [4.0]])
    assert cknna(X, Y, k=1) == pytest.approx(2.0 * np.sqrt(3.0) / 5.0, rel=1e-14)


def test_cknna_identical_one_independent_near_zero(rng):
    X = rng.standard_normal((400, 16))
    assert cknna(X, X, k=10) == pytest.approx(1.0)
    # independent spaces share ~k^2 of the n*k neighbour pairs by chance: value ~ k/n = 0.025
    assert abs(cknna(X, rng.standard_normal((400, 16)), k=10)) < 0.1
    X2, Y2 = _related(rng, n=400, noise=0.3)
    assert cknna(X2, Y2, k=10) > 0.2  # a 12 -> 9 linear map plus noise: 0.21-0.33 over seeds 0-4
    with pytest.raises(UserError, match="k < n"):
        cknna(X[:5], X[:5], k=5)
    with pytest.raises(UserError, match="at least 4 samples"):
        cknna(X[:3], X[:3], k=1)


@pytest.mark.parametrize("name,fn", [("debiased", debiased_linear_cka), ("linear", linear_cka),
                                     ("cknna", cknna), ("rbf", lambda X, Y: rbf_cka(X, Y).cka)])
def test_permutation_null_fast_path_equals_recomputing(rng, name, fn):
    X, Y = _related(rng, n=60)
    fast = permutation_null(name, X, Y, n_perm=5, seed=3)
    slow = permutation_null(lambda a, b: fn(a, b), X, Y, n_perm=5, seed=3)
    assert np.allclose(fast.values, slow.values, rtol=1e-9, atol=1e-12)


def test_permutation_null_sits_below_a_real_relation(rng):
    X, Y = _related(rng, n=200)
    null = permutation_null(debiased_linear_cka, X, Y, n_perm=50, seed=0)
    assert abs(null.mean) < 0.05 and null.p95 < debiased_linear_cka(X, Y)
    again = permutation_null(debiased_linear_cka, X, Y, n_perm=50, seed=0)
    assert np.array_equal(null.values, again.values)  # seeded


def _two_stores(tmp_path, rng, n=64):
    sig = [0.0, 1.0, 10.0]
    base = {f"down_blocks.{i}": rng.standard_normal((3, n, 6 + i)) for i in range(3)}
    rotated = {k: 2.0 * v @ _orthogonal(rng, v.shape[2]) + 5.0 for k, v in base.items()}
    a = FeatureStore.open(write_store(tmp_path / "a.h5", base, sig, attrs={"model": "A"}))
    b = FeatureStore.open(write_store(tmp_path / "b.h5", rotated, sig, attrs={"model": "B"}))
    return a, b, base


def test_cka_table_pair_mode(tmp_path, rng):
    a, b, _ = _two_stores(tmp_path, rng)
    df = cka_table(a, b, mode="pair", n_perm=4)
    assert {"layer_a", "sigma_a", "layer_b", "sigma_b", "estimator", "cka", "null_mean", "null_p95"} <= set(df.columns)
    assert len(df) == 9 and (df.layer_a == df.layer_b).all() and (df.sigma_a == df.sigma_b).all()
    assert np.allclose(df.cka, 1.0) and (df.null_p95 < 0.5).all()
    assert set(df.model_a) == {"A"} and set(df.model_b) == {"B"}
    mb = cka_table(a, b, mode="pair", estimator="minibatch", batch_rows=32, n_perm=2)
    assert np.allclose(mb.cka, 1.0)
    rbf = cka_table(a, b, mode="pair", estimator="rbf", layers=["down_blocks.1"], sigmas=[10], n_perm=0)
    assert len(rbf) == 1 and rbf.bandwidth_b.iloc[0] == pytest.approx(2.0 * rbf.bandwidth_a.iloc[0])
    assert rbf.bandwidth_rule.iloc[0] == "kornblith" and rbf.sigma_factor.iloc[0] == 1.0  # the default, named
    off = cka_table(a, b, mode="pair", estimator="rbf", layers=["down_blocks.1"], sigmas=[10], n_perm=0,
                    bandwidth="offdiag")
    assert off.bandwidth_rule.iloc[0] == "offdiag" and off.bandwidth_a.iloc[0] > rbf.bandwidth_a.iloc[0]
    assert df.bandwidth_rule.isna().all()  # not an RBF table


def test_cka_table_layers_and_sigmas_modes(tmp_path, rng):
    a, b, base = _two_stores(tmp_path, rng)
    layers = cka_table(a, mode="layers", n_perm=0, sigmas=[1.0])
    assert len(layers) == 9  # full 3 x 3 matrix at one sigma, mirrored
    diag = layers[layers.layer_a == layers.layer_b]
    assert np.allclose(diag.cka, 1.0)
    one = layers[(layers.layer_a == "down_blocks.0") & (layers.layer_b == "down_blocks.2")].cka.item()
    assert one == pytest.approx(debiased_linear_cka(base["down_blocks.0"][1], base["down_blocks.2"][1]))
    kn = cka_table(a, mode="layers", estimator="cknna", k=5, n_perm=0, sigmas=[1.0]).set_index(["layer_a", "layer_b"])
    assert len(kn) == 9  # not symmetric: both orders computed, none mirrored
    X0, X2 = a.load("down_blocks.0", 1), a.load("down_blocks.2", 1)  # the stored float32 values
    assert kn.cka[("down_blocks.0", "down_blocks.2")] == pytest.approx(cknna(X0, X2, k=5), rel=1e-12)
    assert kn.cka[("down_blocks.2", "down_blocks.0")] == pytest.approx(cknna(X2, X0, k=5), rel=1e-12)
    sig = cka_table(a, b, mode="sigmas", estimator="linear", layers=["down_blocks.0"], n_perm=0)
    assert len(sig) == 9 and np.allclose(sig[sig.sigma_a == sig.sigma_b].cka, 1.0)


def test_cka_table_computes_each_sides_self_terms_once(tmp_path, rng, monkeypatch):
    """The d x d self products run once per (store, layer, sigma): not per pair, not per shuffle, and
    not again when the centred features were dropped from the cache for memory."""
    calls = []
    real = cka_module._self_terms
    monkeypatch.setattr(cka_module, "_self_terms", lambda xc, form="auto": calls.append(xc.shape) or real(xc, form))
    a, b, _ = _two_stores(tmp_path, rng)
    roomy = cka_table(a, mode="layers", n_perm=3)
    assert len(calls) == 9  # 3 layers x 3 sigmas, each in 3 pairs and 3 x 3 shuffles
    calls.clear()
    tight = cka_table(a, mode="layers", n_perm=3, cache_bytes=1)  # room for one state: constant eviction
    assert len(calls) == 9
    pd.testing.assert_frame_equal(roomy, tight)
    calls.clear()
    cka_table(a, b, mode="pair", n_perm=5)
    assert len(calls) == 18  # 9 per store


def test_permuted_cross_term_equals_shuffled_copy(rng):
    X, Y = _related(rng, n=100)
    xc, yc = _centre(X.astype(np.float32)), _centre(Y.astype(np.float32))
    p = rng.permutation(100)
    for form in ("feature", "gram"):
        assert _cross_fro2(xc, yc, form, perm=p) == pytest.approx(_cross_fro2(xc, yc[p].copy(), form), rel=1e-12)


def test_cka_table_user_errors(tmp_path, rng):
    a, _, _ = _two_stores(tmp_path, rng)
    other = FeatureStore.open(write_store(tmp_path / "c.h5", {"down_blocks.0": rng.standard_normal((3, 64, 4))},
                                          [0.0, 1.0, 10.0], attrs={"noise_seed": 9}))
    with pytest.raises(UserError, match="not row-aligned"):
        cka_table(a, other)
    with pytest.raises(UserError, match="second feature file"):
        cka_table(a, mode="pair")
    with pytest.raises(UserError, match="unknown CKA estimator"):
        cka_table(a, mode="layers", estimator="cca")
    with pytest.raises(UserError, match="did you mean"):
        cka_table(a, mode="layers", layers=["down_block.0"])


def test_rbf_heatmap_title_names_the_bandwidth_rule(tmp_path, rng, monkeypatch):
    a, b, _ = _two_stores(tmp_path, rng)
    df = cka_table(a, b, mode="pair", estimator="rbf", sigma_factor=0.5, n_perm=0)
    titles = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    plot_cka_heatmap(df, tmp_path / "rbf.png")
    assert "σ = 0.5 × median distance, bandwidth rule kornblith" in titles[0]


@pytest.mark.parametrize("mode", ["pair", "layers", "sigmas"])
def test_cka_heatmap_every_mode_is_reproducible(tmp_path, rng, mode):
    a, b, _ = _two_stores(tmp_path, rng)
    df = cka_table(a, b if mode == "pair" else None, mode=mode, n_perm=3, sigmas=[0.0, 1.0])
    first = plot_cka_heatmap(df, tmp_path / "out" / f"{mode}.png")
    second = plot_cka_heatmap(df, tmp_path / f"{mode}_again.png")
    data = open(first, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == open(second, "rb").read()
    with pytest.raises(UserError, match="empty"):
        plot_cka_heatmap(df.iloc[:0], tmp_path / "x.png")
