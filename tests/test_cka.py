"""CKA family checked against definitions: invariances, closed forms, U-statistics, streaming, nulls."""

import itertools

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from _store_fixture import write_store
from analysis.cka import (cka_table, cknna, debiased_linear_cka, hsic_unbiased, linear_cka, minibatch_cka,
                          permutation_null, rbf_cka)
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
    direct = hsic_unbiased(X @ X.T, Y @ Y.T) / np.sqrt(hsic_unbiased(X @ X.T, X @ X.T) * hsic_unbiased(Y @ Y.T, Y @ Y.T))
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


def test_rbf_bandwidth_is_median_distance_times_factor(rng):
    X, Y = _related(rng, n=80)
    result = rbf_cka(X, Y, sigma_factor=0.5)
    assert result.bandwidth_x == pytest.approx(0.5 * np.median(pdist(X)), rel=1e-9)
    assert result.bandwidth_y == pytest.approx(0.5 * np.median(pdist(Y)), rel=1e-9)
    assert 0 < result.cka < 1


def test_cknna_identical_one_independent_near_zero(rng):
    X = rng.standard_normal((400, 16))
    assert cknna(X, X, k=10) == pytest.approx(1.0)
    # independent spaces share ~k^2 of the n*k neighbour pairs by chance: value ~ k/n = 0.025
    assert abs(cknna(X, rng.standard_normal((400, 16)), k=10)) < 0.1
    X2, Y2 = _related(rng, n=400, noise=0.3)
    assert cknna(X2, Y2, k=10) > 0.3
    with pytest.raises(UserError, match="k < n"):
        cknna(X[:5], X[:5], k=5)


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


def test_cka_table_layers_and_sigmas_modes(tmp_path, rng):
    a, b, base = _two_stores(tmp_path, rng)
    layers = cka_table(a, mode="layers", n_perm=0, sigmas=[1.0])
    assert len(layers) == 9  # full 3 x 3 matrix at one sigma, mirrored
    diag = layers[layers.layer_a == layers.layer_b]
    assert np.allclose(diag.cka, 1.0)
    one = layers[(layers.layer_a == "down_blocks.0") & (layers.layer_b == "down_blocks.2")].cka.item()
    assert one == pytest.approx(debiased_linear_cka(base["down_blocks.0"][1], base["down_blocks.2"][1]))
    sig = cka_table(a, b, mode="sigmas", estimator="linear", layers=["down_blocks.0"], n_perm=0)
    assert len(sig) == 9 and np.allclose(sig[sig.sigma_a == sig.sigma_b].cka, 1.0)


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


@pytest.mark.parametrize("mode", ["pair", "layers", "sigmas"])
def test_cka_heatmap_every_mode_is_reproducible(tmp_path, rng, mode):
    from analysis.heatmaps import plot_cka_heatmap

    a, b, _ = _two_stores(tmp_path, rng)
    df = cka_table(a, b if mode == "pair" else None, mode=mode, n_perm=3, sigmas=[0.0, 1.0])
    first = plot_cka_heatmap(df, tmp_path / "out" / f"{mode}.png")
    second = plot_cka_heatmap(df, tmp_path / f"{mode}_again.png")
    data = open(first, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == open(second, "rb").read()
    with pytest.raises(UserError, match="empty"):
        plot_cka_heatmap(df.iloc[:0], tmp_path / "x.png")
