"""UMAP panels on a tiny file: separable classes score high, pure noise scores near chance, seeded runs repeat."""

import warnings

import numpy as np
import pytest
from _store_fixture import write_store

from analysis.umap_view import _fit_umap, _reduce, knn_accuracy, umap_panels
from probe.core.errors import UserError
from probe.features.store import FeatureStore

N, D, K = 240, 20, 4


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(N) % K
    clustered = 6.0 * np.eye(K, D)[y] + 0.5 * rng.standard_normal((N, D))
    noise = rng.standard_normal((N, D))
    feats = {"mid_block": np.stack([clustered, noise]), "up_blocks.0": np.stack([noise, clustered])}
    path = write_store(tmp_path / "f.h5", feats, [0.0, 80.0], y, factors={"size": rng.random(N)})
    with FeatureStore.open(path) as st:
        yield st


def test_knn_accuracy_on_known_embeddings():
    y = np.repeat([0, 1], 50)
    separated = np.c_[y * 10.0, np.zeros(100)] + np.random.default_rng(0).normal(0, 0.1, (100, 2))
    assert knn_accuracy(separated, y) == 1.0
    assert np.isnan(knn_accuracy(separated, np.zeros(100, int)))  # one class: nothing to score


def test_panels_per_sigma_score_structure_and_repeat_exactly(store, tmp_path):
    out = tmp_path / "figs" / "umap.png"
    df = umap_panels(store, "mid_block", None, out, seed=1, n_epochs=100)
    assert list(df.layer) == ["mid_block", "mid_block"] and list(df.sigma) == [0.0, 80.0]
    acc = df.set_index("sigma").knn_accuracy
    assert acc[0.0] > 0.9            # four well separated clusters
    assert acc[80.0] < 0.25 + 0.25   # pure noise: near chance (0.25)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "again.png"
    df2 = umap_panels(store, "mid_block", None, out2, seed=1, n_epochs=100)
    assert df.equals(df2) and out.read_bytes() == out2.read_bytes()


def test_panels_per_layer_and_colour_options(store, tmp_path):
    df = umap_panels(store, out_png=tmp_path / "l.png", layers=["mid_block", "up_blocks.0"], sigma=80.0,
                     max_points=120, color_by="size", n_epochs=50)
    assert list(df.layer) == ["mid_block", "up_blocks.0"] and (df.n_points == 120).all()
    assert df.knn_accuracy.isna().all()  # a continuous colour has no k-NN class score
    with pytest.raises(UserError, match="cannot colour by 'shape'"):
        umap_panels(store, "mid_block", out_png=tmp_path / "x.png", color_by="shape")
    with pytest.raises(UserError, match="either a layer"):
        umap_panels(store, "mid_block", layers=["mid_block"], out_png=tmp_path / "x.png")


def test_neighbour_graph_is_umaps_own_on_the_matrix_umap_receives():
    """Our fuzzy k-NN graph equals the one umap-learn builds from the same (post-PCA) matrix."""
    import umap  # heavy optional library (numba compilation): imported by the one test that compares with it
    from sklearn.datasets import load_digits

    X = load_digits().data[:300].astype(np.float32)
    Z = _reduce(X, pca_dims=50, seed=0)  # the exact matrix our pipeline hands to UMAP
    assert Z.shape == (300, 50)
    ours = _fit_umap(Z, n_neighbors=15, min_dist=0.1, n_epochs=5, seed=0).graph_.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = umap.UMAP(n_neighbors=15, metric="euclidean", min_dist=0.1, n_epochs=5, random_state=0,
                        n_jobs=1).fit(Z).graph_.tocsr()
    assert ours.shape == ref.shape == (300, 300)
    assert abs(ours - ref).max() == 0.0
