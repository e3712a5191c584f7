"""Reading the HDF5 feature store: layout, refusals with one-line UserErrors, alignment checks."""

import h5py
import numpy as np
import pytest
from _store_fixture import random_features, write_store

from probe.core.errors import UserError
from probe.features.store import FORMAT, FORMAT_VERSION, FeatureStore, check_aligned


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _store(tmp_path, rng, name="f.h5", **kw):
    feats = kw.pop("features", None) or random_features(rng)
    return write_store(tmp_path / name, feats, kw.pop("sigmas", [0.0, 0.5, 2.0]), **kw)


def test_constants():
    assert FORMAT == "onestep-probe.features" and FORMAT_VERSION == 1


def test_reads_every_documented_field(tmp_path, rng):
    feats = {"mid_block": rng.standard_normal((3, 10, 4)), "down_blocks.1": rng.standard_normal((3, 10, 6))}
    labels = np.arange(10) % 3
    ids = np.arange(100, 110)
    factors = {"size": rng.random(10), "shape": np.arange(10) % 2}
    path = write_store(tmp_path / "a.h5", feats, [0.0, 1.0, 5.0], labels, ids, factors,
                       attrs={"source": "denoiser"})
    with FeatureStore.open(path) as st:
        assert st.path == str(path)
        assert st.layers == ["mid_block", "down_blocks.1"]  # creation order, not alphabetical
        assert st.sigmas.dtype == np.float64 and list(st.sigmas) == [0.0, 1.0, 5.0]
        assert np.array_equal(st.labels, labels) and np.array_equal(st.sample_ids, ids)
        assert set(st.factors) == {"size", "shape"} and np.allclose(st.factors["size"], factors["size"])
        assert st.source == "denoiser" and st.attrs["dataset"] == "digits" and st.attrs["complete"] is True
        assert st.shape("down_blocks.1") == (3, 10, 6)
        x = st.load("down_blocks.1", 2)
        assert x.dtype == np.float32 and np.allclose(x, feats["down_blocks.1"][2].astype(np.float32))
        assert st.layer_attrs("mid_block")["pooling"] == "mean"


def test_source_absent_is_none_and_float16_is_cast(tmp_path, rng):
    path = _store(tmp_path, rng, dtype=np.float16)
    with FeatureStore.open(path) as st:
        assert st.source is None
        with h5py.File(path) as f:
            raw = f["features/down_blocks.0"][1]
        x = st.load("down_blocks.0", 1)
        assert x.dtype == np.float32 and np.array_equal(x, raw.astype(np.float32))


def test_load_rows_any_order_and_iter_rows(tmp_path, rng):
    feats = random_features(rng, n=37)
    path = _store(tmp_path, rng, features=feats)
    ref = feats["down_blocks.0"][1]
    with FeatureStore.open(path) as st:
        rows = np.array([5, 1, 30, 1, 0])
        assert np.array_equal(st.load("down_blocks.0", 1, rows), ref[rows])
        assert np.array_equal(st.load("down_blocks.0", 1, slice(3, 9)), ref[3:9])
        blocks = list(st.iter_rows("down_blocks.0", 1, 10))
        assert [b.shape[0] for b in blocks] == [10, 10, 10, 7]
        assert np.array_equal(np.concatenate(blocks), ref)
        shuffled = list(st.iter_rows("down_blocks.0", 1, 10, seed=3))
        perm = np.random.default_rng(3).permutation(37)
        assert np.array_equal(np.concatenate(shuffled), ref[perm])


def test_sigma_index(tmp_path, rng):
    path = _store(tmp_path, rng, sigmas=[0.0, 0.0125, 2.5])
    with FeatureStore.open(path) as st:
        assert st.sigma_index(0) == 0 and st.sigma_index(2.5) == 2 and st.sigma_index(0.01250001) == 1
        with pytest.raises(UserError, match=r"sigma 0\.3 is not in .*available: 0, 0\.0125, 2\.5"):
            st.sigma_index(0.3)
        with pytest.raises(UserError, match="out of range"):
            st.load("down_blocks.0", 3)


def test_unknown_layer_suggests_close_match(tmp_path, rng):
    with FeatureStore.open(_store(tmp_path, rng)) as st:
        with pytest.raises(UserError, match=r"unknown layer 'down_block.1'.*did you mean 'down_blocks.1'") as err:
            st.load("down_block.1", 0)
        assert "\n" not in str(err.value)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        FeatureStore.open(tmp_path / "nope.h5")
    txt = tmp_path / "x.h5"
    txt.write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        FeatureStore.open(txt)
    with pytest.raises(UserError, match="directory"):
        FeatureStore.open(tmp_path)


def test_foreign_hdf5_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(UserError, match="not an onestep-probe feature file"):
        FeatureStore.open(path)


def test_newer_version_and_incomplete_refused(tmp_path, rng):
    newer = _store(tmp_path, rng, name="new.h5", attrs={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(UserError, match="newer"):
        FeatureStore.open(newer)
    partial = _store(tmp_path, rng, name="part.h5", complete=False)
    with pytest.raises(UserError, match=r"is incomplete \(extraction was interrupted\); run the same `probe extract`"):
        FeatureStore.open(partial)
    with FeatureStore.open(partial, allow_incomplete=True) as st:
        assert st.attrs["complete"] is False


def test_layer_order_attribute_wins_over_name_order(tmp_path, rng):
    feats = {"up_blocks.0": rng.standard_normal((1, 5, 2)), "conv_in": rng.standard_normal((1, 5, 2))}
    path = write_store(tmp_path / "o.h5", feats, [1.0], layer_order=False)
    with FeatureStore.open(path) as st:
        assert st.layers == ["conv_in", "up_blocks.0"]  # HDF5 name order without track_order
    with h5py.File(path, "a") as f:
        f["features"].attrs["layer_order"] = ["up_blocks.0", "conv_in"]
    with FeatureStore.open(path) as st:
        assert st.layers == ["up_blocks.0", "conv_in"]


def test_check_aligned(tmp_path, rng):
    a = FeatureStore.open(_store(tmp_path, rng, name="a.h5"))
    b = FeatureStore.open(_store(tmp_path, rng, name="b.h5"))
    check_aligned(a, b)  # same data/sigmas/seed: fine even with different features
    c = FeatureStore.open(_store(tmp_path, rng, name="c.h5", attrs={"noise_seed": 7}, sigmas=[0.0, 0.5, 3.0]))
    with pytest.raises(UserError, match=r"not row-aligned: noise_seed 0 vs 7; sigmas") as err:
        check_aligned(a, c)
    assert "\n" not in str(err.value)
    d = FeatureStore.open(_store(tmp_path, rng, name="d.h5", sample_ids=np.arange(40)[::-1]))
    with pytest.raises(UserError, match="sample_ids"):
        check_aligned(a, d)
    for st in (a, b, c, d):
        st.close()
