"""Linear probes on synthetic feature files whose decodability is known by construction."""

import numpy as np
import pandas as pd
import pytest
from _store_fixture import write_store

from analysis.heatmaps import plot_probe_heatmap
from analysis.linear import probe_table, split_rows
from probe.core.errors import UserError
from probe.features.store import FeatureStore

N, D, K = 300, 8, 4


def _make(tmp_path, name="f.h5", seed=0, labels=None, factors="default", order=None):
    """layer 'informative': class means far apart at sigma 0, pure noise at sigma 80; layer 'noise': noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % K if labels is None else labels
    means = 4.0 * np.eye(K, D)
    informative = np.stack([means[y % K] + 0.3 * rng.standard_normal((N, D)), rng.standard_normal((N, D))])
    noise = rng.standard_normal((2, N, D))
    base = np.random.default_rng(123).standard_normal((N, D))  # same in every store: factors depend on it
    informative[0, :, 4:] = base[:, 4:]
    if factors == "default":
        factors = {"size": base[:, 4] * 2.0 + base[:, 5],         # linear in the features: R^2 ~ 1
                   "junk": np.random.default_rng(7).random(N),    # unrelated: R^2 ~ 0
                   "shape": (base[:, 6] > 0).astype(np.int64)}    # integer, 2 values -> classification
    ids = np.arange(1000, 1000 + N)
    feats = {"informative": informative, "noise": noise}
    if order is not None:
        feats = {k: v[:, order] for k, v in feats.items()}
        y, ids = y[order], ids[order]
        factors = {k: v[order] for k, v in factors.items()}
    return FeatureStore.open(write_store(tmp_path / name, feats, [0.0, 80.0], y, ids, factors))


def test_probe_finds_signal_where_it_is_and_chance_elsewhere(tmp_path):
    st = _make(tmp_path)
    df = probe_table(st, targets=["label"])
    assert {"layer", "sigma", "target", "accuracy", "accuracy_std", "n_seeds", "metric", "C"} <= set(df.columns)
    acc = df.set_index(["layer", "sigma"]).accuracy
    assert acc[("informative", 0.0)] == pytest.approx(1.0)  # separable by construction
    for cell in [("informative", 80.0), ("noise", 0.0), ("noise", 80.0)]:
        # pure noise: test accuracy over 60 rows, 4 balanced classes; binomial sd ~ 0.056 around 0.25
        assert acc[cell] < 0.25 + 0.2
    assert (df.chance == 0.25).all() and (df.metric == "accuracy").all() and df.accuracy_std.isna().all()
    assert set(df.C) <= {0.01, 0.1, 1.0} and (df.n_train + df.n_val + df.n_test == N).all()


def test_factor_kinds_regression_and_classification(tmp_path):
    df = probe_table(_make(tmp_path), layers=["informative"], sigmas=[0.0]).set_index("target")
    assert set(df.index) == {"label", "size", "junk", "shape"}
    assert df.loc["size", "metric"] == "r2" and df.loc["size", "accuracy"] > 0.95
    assert df.loc["junk", "metric"] == "r2" and df.loc["junk", "accuracy"] < 0.15
    assert df.loc["shape", "metric"] == "accuracy" and df.loc["shape", "accuracy"] > 0.9
    assert np.isnan(df.loc["size", "C"]) and df.loc["size", "alpha"] > 0


def test_several_stores_give_mean_and_std(tmp_path):
    a, b = _make(tmp_path, "a.h5", seed=0), _make(tmp_path, "b.h5", seed=1)
    both = probe_table([a, b], targets=["label"], sigmas=[80.0])
    one_a = probe_table(a, targets=["label"], sigmas=[80.0]).set_index("layer").accuracy
    one_b = probe_table(b, targets=["label"], sigmas=[80.0]).set_index("layer").accuracy
    both = both.set_index("layer")
    assert (both.n_seeds == 2).all()
    for layer in ["informative", "noise"]:
        pair = np.array([one_a[layer], one_b[layer]])
        assert both.accuracy[layer] == pytest.approx(pair.mean())
        assert both.accuracy_std[layer] == pytest.approx(pair.std(ddof=1))


def test_split_is_fixed_by_sample_ids_and_stratified():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(500, 800))
    y = rng.integers(0, 3, 300)
    valid = np.ones(300, bool)
    parts = split_rows(ids, y, valid, True, seed=5)
    order = rng.permutation(300)  # same samples, another row order
    parts2 = split_rows(ids[order], y[order], valid, True, seed=5)
    for p, q in zip(parts, parts2):
        assert set(ids[p]) == set(ids[order][q])
    assert sorted(np.concatenate(parts)) == list(range(300))
    for p in parts:  # each split keeps the class proportions (to within one row per class)
        frac = np.bincount(y[p], minlength=3) / len(p)
        assert np.abs(frac - np.bincount(y) / 300).max() < 0.03
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_rows(ids, y, valid, True, seed=6)))


def test_same_seed_same_table_and_row_order_irrelevant(tmp_path):
    st = _make(tmp_path)
    first = probe_table(st, seed=3)
    pd.testing.assert_frame_equal(first, probe_table(st, seed=3))
    shuffled = _make(tmp_path, "perm.h5", order=np.random.default_rng(9).permutation(N))
    other = probe_table(shuffled, seed=3)
    pd.testing.assert_frame_equal(first.drop(columns="model"), other.drop(columns="model"),
                                  check_exact=False, atol=1e-6)


def test_unlabelled_files(tmp_path):
    st = _make(tmp_path, labels=np.full(N, -1))
    df = probe_table(st, sigmas=[0.0])
    assert "label" not in set(df.target) and {"size", "shape"} <= set(df.target)
    with pytest.raises(UserError, match="all labels are -1"):
        probe_table(st, targets=["label"])
    none = _make(tmp_path, "none.h5", labels=np.full(N, -1), factors={})
    with pytest.raises(UserError, match="no probe target"):
        probe_table(none)


def test_mismatched_stores_and_unknown_names(tmp_path):
    a = _make(tmp_path, "a.h5")
    other = FeatureStore.open(write_store(tmp_path / "o.h5", {"informative": np.zeros((2, 10, 3))}, [0.0, 80.0]))
    with pytest.raises(UserError, match="same samples"):
        probe_table([a, other])
    with pytest.raises(UserError, match="unknown layer"):
        probe_table(a, layers=["informativ"])
    with pytest.raises(UserError, match="sigma 5 is not in"):
        probe_table(a, sigmas=[5.0])


def test_probe_heatmap_png_is_reproducible(tmp_path):
    df = probe_table([_make(tmp_path, "a.h5", seed=0), _make(tmp_path, "b.h5", seed=1)], targets=["label", "size"])
    a = plot_probe_heatmap(df, "label", tmp_path / "figs" / "label.png")
    b = plot_probe_heatmap(df, "label", tmp_path / "label_again.png")
    assert open(a, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n" and open(a, "rb").read() == open(b, "rb").read()
    plot_probe_heatmap(df, "size", tmp_path / "size.png")  # r2 target: colour range may go below 0
    with pytest.raises(UserError, match="no probe results for target 'colour'"):
        plot_probe_heatmap(df, "colour", tmp_path / "x.png")


def test_wide_layer_with_few_rows_clamps_pca_and_records_it(tmp_path):
    """600 features > max_dim 512 > 36 training rows: PCA keeps n_train - 1 components, no crash."""
    rng = np.random.default_rng(0)
    n, d = 60, 600
    y = np.arange(n) % 3
    wide = rng.standard_normal((1, n, d))
    wide[0, :, :3] += 4.0 * np.eye(3)[y]  # class signal in three of the 600 dims
    narrow = rng.standard_normal((1, n, 8))
    st = FeatureStore.open(write_store(tmp_path / "w.h5", {"wide": wide, "narrow": narrow}, [0.0], y))
    df = probe_table(st).set_index("layer")
    assert {"feature_dim", "pca_dim", "dim", "C", "n_train", "n_test"} <= set(df.columns)
    n_train = df.loc["wide", "n_train"]
    assert n_train == 36 and df.loc["wide", "n_test"] == 12 and df.loc["wide", "n_val"] == 12
    assert df.loc["wide", "feature_dim"] == 600
    assert df.loc["wide", "pca_dim"] == n_train - 1 == df.loc["wide", "dim"]
    assert df.loc["wide", "C"] in (0.01, 0.1, 1.0) and df.loc["wide", "accuracy"] > 0.6
    assert df.loc["narrow", "feature_dim"] == 8 == df.loc["narrow", "dim"] and np.isnan(df.loc["narrow", "pca_dim"])
    capped = probe_table(st, layers=["wide"], max_dim=16).iloc[0]
    assert capped.pca_dim == 16 == capped.dim  # fewer than the rows allow: max_dim wins
