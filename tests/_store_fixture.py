"""Write small feature files with plain h5py, following the layout in docs/architecture.md, for the analysis tests.

Deliberately independent of any writer in the package: the tests check that the reader accepts
exactly the documented layout.
"""

from __future__ import annotations

import h5py
import numpy as np


def write_store(path, features: dict, sigmas, labels=None, sample_ids=None, factors=None, *,
                complete=True, attrs=None, dtype=np.float32, layer_order=True):
    """Write ``features`` (layer -> array [S, N, D]) and the side arrays; returns ``path``.

    ``attrs`` overrides/extends the root attributes; a value of None removes that attribute.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    first = next(iter(features.values()))
    n = first.shape[1]
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    sample_ids = np.arange(n, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, np.int64)
    root = {"format": "onestep-probe.features", "format_version": 1, "complete": bool(complete),
            "model": "test-model", "model_sha256": "0" * 64, "dataset": "digits", "split": "test",
            "pooling": "mean", "noise_seed": 0, "created_utc": "2024-01-01T00:00:00Z",
            "toolkit_version": "0.1.0"}
    root.update(attrs or {})
    with h5py.File(path, "w") as f:
        for key, value in root.items():
            if value is not None:
                f.attrs[key] = value
        f["sigmas"] = sigmas
        f["labels"] = labels
        f["sample_ids"] = sample_ids
        if factors:
            g = f.create_group("factors")
            for name, values in factors.items():
                g[name] = np.asarray(values)
        g = f.create_group("features", track_order=layer_order)
        for layer, arr in features.items():
            ds = g.create_dataset(layer, data=np.asarray(arr, dtype=dtype), chunks=(1, min(n, 64), arr.shape[2]))
            ds.attrs["raw_shape"] = np.asarray([arr.shape[2], 1, 1], np.int64)
            ds.attrs["pooling"] = "mean"
    return path


def random_features(rng, n_layers=2, s=3, n=40, d=8, prefix="down_blocks."):
    """Random feature dict with module-path names like ``down_blocks.0``."""
    return {f"{prefix}{i}": rng.standard_normal((s, n, d)).astype(np.float32) for i in range(n_layers)}
