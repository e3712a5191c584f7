"""Data sets: ranges, fixed splits, factors, and the torchvision on-disk formats read offline."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from probe.core.data import load_dataset
from probe.core.errors import UserError


def test_digits_range_split_and_determinism():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.images.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert tr.images.min() == -1 and tr.images.max() == 1
    assert set(tr.labels.tolist()) == set(range(10))
    again = load_dataset("digits", "train")
    assert torch.equal(tr.images, again.images) and torch.equal(tr.labels, again.labels)
    # train and test are disjoint: no test image appears in train
    train_rows = {bytes(r.numpy().tobytes()) for r in tr.images}
    overlap = sum(bytes(r.numpy().tobytes()) in train_rows for r in te.images)
    assert overlap < 5  # a few duplicate digits exist in the raw data set itself


def test_shapes_factors_match_pixels():
    ds = load_dataset("shapes", "test")
    assert ds.images.shape[1:] == (3, 16, 16) and ds.num_classes == 3
    assert set(ds.factors) == {"shape", "colour", "size", "x", "y"}
    assert np.array_equal(ds.factors["shape"], ds.labels.numpy())
    # a bigger shape covers more pixels: the size factor is real
    area = (ds.images > -0.9).any(1).float().sum((1, 2)).numpy()
    for k in range(3):
        m = ds.factors["shape"] == k
        assert np.corrcoef(area[m], ds.factors["size"][m])[0, 1] > 0.9


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("digits", "val")


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_mnist_from_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    _write_idx(raw / "t10k-images-idx3-ubyte", imgs)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    ds = load_dataset("mnist", "test", root=tmp_path)
    assert ds.images.shape == (12, 1, 28, 28)
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    expected = torch.from_numpy(imgs.astype(np.float32) / 255 * 2 - 1)
    assert torch.allclose(ds.images[:, 0], expected)


def test_cifar10_from_torchvision_layout(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, 3072)).astype(np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": list(range(7))}, f)
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert ds.images.shape == (7, 3, 32, 32) and ds.labels.tolist() == list(range(7))
    assert float(ds.images[3, 1, 0, 0]) == pytest.approx(data[3, 1024] / 255 * 2 - 1)


def test_missing_torchvision_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="could not be downloaded"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_image_folder(tmp_path):
    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    tr = load_dataset(f"folder:{tmp_path}", "train", resolution=8)
    te = load_dataset(f"folder:{tmp_path}", "test", resolution=8)
    assert len(tr) + len(te) == 20 and tr.images.shape[1:] == (3, 8, 8)
    assert tr.num_classes == 2 and set(tr.labels.tolist()) <= {0, 1}
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
