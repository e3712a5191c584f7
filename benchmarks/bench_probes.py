"""Time ``probe_table`` on a synthetic 10-layer x 8-sigma x 2,000-sample feature file (target < 2 min).

Side by side, on the same file and split: the toolkit's probe (3-value C grid, warm starts along
the grid, C chosen on one validation split) and a textbook baseline (scikit-learn's
LogisticRegressionCV, 5-fold cross-validation over the same C grid, then a refit) on every cell,
with the accuracies of both so that speed is not bought with accuracy. Also one lbfgs fit timed
with 1 and with 2 BLAS threads, which is why probe_table pins BLAS to one thread.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_probes.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import h5py
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from analysis.linear import probe_table, split_rows
from probe.features.store import FORMAT, FORMAT_VERSION, FeatureStore

LAYERS = ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3",
          "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"]
DIMS = [32, 64, 128, 256, 256, 256, 256, 128, 64, 32]
SIGMAS = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 80.0]


def write_synthetic(path: str, n: int = 2000, n_classes: int = 10, seed: int = 0) -> None:
    """Features = class signal (weaker with sigma, strongest mid-network) + Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    with h5py.File(path, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, complete=True, model="synthetic",
                       model_sha256="0" * 64, dataset="synthetic", split="test", pooling="mean",
                       noise_seed=0, created_utc="2024-01-01T00:00:00Z", toolkit_version="bench")
        f["sigmas"] = np.array(SIGMAS)
        f["labels"] = labels.astype(np.int64)
        f["sample_ids"] = np.arange(n, dtype=np.int64)
        g = f.create_group("features", track_order=True)
        for i, (layer, d) in enumerate(zip(LAYERS, DIMS)):
            means = rng.standard_normal((n_classes, d))
            depth_gain = 1.0 - abs(i - 5) / 6.0
            feats = np.empty((len(SIGMAS), n, d), np.float32)
            for s, sigma in enumerate(SIGMAS):
                strength = 0.6 * depth_gain / (1.0 + 4.0 * sigma)
                feats[s] = strength * means[labels] + rng.standard_normal((n, d))
            g.create_dataset(layer, data=feats, chunks=(1, 256, d))


def baseline_cell(X, y, split, C_grid, seed):
    """Textbook probe: 5-fold CV over C on train+val, refit, accuracy on test."""
    train = np.concatenate([split[0], split[1]])
    scaler = StandardScaler().fit(X[train])
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):  # same BLAS setting as ours
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 announcing changed defaults
        clf = LogisticRegressionCV(Cs=list(C_grid), cv=5, max_iter=1000).fit(scaler.transform(X[train]), y[train])
    return clf.score(scaler.transform(X[split[2]]), y[split[2]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-cells", type=int, default=80, help="cells timed with the baseline (80 = all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.h5")
        write_synthetic(path)
        with FeatureStore.open(path) as store:
            t0 = time.perf_counter()
            df = probe_table(store, targets=["label"], seed=0)
            ours = time.perf_counter() - t0
            cells = len(df)
            split = split_rows(store.sample_ids, store.labels, store.labels >= 0, True, seed=0)
            picks = [(layer, s) for layer in LAYERS for s in range(len(SIGMAS))][:args.baseline_cells]
            t0 = time.perf_counter()
            base_acc = [baseline_cell(store.load(layer, s), store.labels, split, (0.01, 0.1, 1.0), 0)
                        for layer, s in picks]
            base = time.perf_counter() - t0
            ours_acc = [df[(df.layer == layer) & (df.sigma == SIGMAS[s])].accuracy.item() for layer, s in picks]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load avg {os.getloadavg()[0]:.1f}")
    print(f"file: {len(LAYERS)} layers x {len(SIGMAS)} sigmas x 2000 samples, D {min(DIMS)}-{max(DIMS)}, 10 classes")
    print(f"probe_table (ours): {ours:.1f} s total for {cells} cells = {ours / cells * 1000:.0f} ms/cell")
    print(f"LogisticRegressionCV 5-fold baseline: {base / len(picks) * 1000:.0f} ms/cell on {len(picks)} cells "
          f"= {base:.1f} s")
    diffs = np.abs(np.array(ours_acc) - np.array(base_acc))
    print(f"test accuracy on those cells, ours vs baseline: mean {np.mean(ours_acc):.3f} vs {np.mean(base_acc):.3f}, "
          f"max |diff| {diffs.max():.3f}")
    print(f"accuracy range over the file: {df.accuracy.min():.3f}-{df.accuracy.max():.3f} (chance 0.1); "
          f"all lbfgs fits converged: {bool(df.converged.all())}")

    X = np.random.default_rng(0).standard_normal((1200, 256))
    y = np.arange(1200) % 10
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t0 = time.perf_counter()
            LogisticRegression(max_iter=100).fit(X, y)
            print(f"one lbfgs fit 1200x256, 10 classes, 100 iterations, {threads} BLAS thread(s): "
                  f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
