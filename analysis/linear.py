"""Linear probes: how linearly decodable is a target from the features at each (layer, sigma)?

For every (layer, sigma, target) the rows are split into train / validation / test (stratified,
seeded, and fixed by sample id so every store of the same data splits identically), features are
standardised on the training split, and

- class targets (labels, integer factors with few values) get a multinomial logistic regression
  (scikit-learn, lbfgs) with C chosen on the validation split; the metric is test accuracy;
- continuous targets (float factors) get a ridge regression with alpha chosen on validation; the
  metric is test R^2.

Several stores of the same data (for example extractions with different noise seeds) give a mean
and a standard deviation per cell. The model is fit on the training split only (no refit on
train + validation) so that one extra fit per cell is saved; with a small C grid, warm starts from
the previous C and a PCA cap on very wide layers, a 10-layer x 8-sigma x 2,000-sample file takes
well under two minutes on two cores (benchmarks/bench_probes.py).
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from probe.core.errors import UserError
from probe.core.progress import progress_bar
from probe.features.store import FeatureStore


def _as_store_list(stores) -> list[FeatureStore]:
    stores = [stores] if isinstance(stores, FeatureStore) else list(stores)
    if not stores:
        raise UserError("linear probes need at least one feature file")
    first = stores[0]
    for other in stores[1:]:
        same = (np.array_equal(first.sample_ids, other.sample_ids) and first.sigmas.shape == other.sigmas.shape
                and np.allclose(first.sigmas, other.sigmas, rtol=1e-9, atol=0)
                and all(first.attrs.get(k) == other.attrs.get(k) for k in ("dataset", "split")))
        if not same:
            raise UserError(f"{first.path} and {other.path} do not hold the same samples and sigmas; "
                            "seeds of one probe must come from the same data (only the noise seed may differ)")
    return stores


def _target_kind(values: np.ndarray, max_classes: int) -> str:
    if values.dtype.kind in "fc":
        return "regression"
    if values.dtype.kind in "iub" and np.unique(values).size > max_classes:
        return "regression"
    return "classification"


def _available_targets(store: FeatureStore, max_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """name -> (values, valid-row mask, kind). Labels of -1 (unknown) and NaN factors are left out."""
    out = {}
    labels = store.labels
    if (labels >= 0).any():
        out["label"] = (labels, labels >= 0, "classification")
    for name, values in store.factors.items():
        kind = _target_kind(values, max_classes)
        valid = ~np.isnan(values) if values.dtype.kind in "fc" else np.ones(values.shape, bool)
        out[name] = (values, valid, kind)
    return out


def _select_targets(available: dict, targets, path: str) -> dict:
    if targets is None:
        chosen = available
    else:
        unknown = [t for t in targets if t not in available]
        if unknown:
            why = " (all labels are -1)" if "label" in unknown else ""
            raise UserError(f"unknown probe target {unknown[0]!r} in {path}{why}; available: "
                            + (", ".join(available) or "none"))
        chosen = {t: available[t] for t in targets}
    # A class target with one class cannot be probed; say nothing, there is nothing to measure.
    chosen = {t: v for t, v in chosen.items()
              if v[2] == "regression" or np.unique(v[0][v[1]]).size >= 2}
    if not chosen:
        raise UserError(f"{path} has no probe target (labels all -1 and no factors)")
    return chosen


def split_rows(sample_ids: np.ndarray, y: np.ndarray, valid: np.ndarray, stratify: bool, seed: int,
               val_fraction: float = 0.2,    # share of valid rows for validation
               test_fraction: float = 0.2,   # share of valid rows for test
               ):
    """(train, val, test) row indices. Decided on rows sorted by sample id, so the split depends on
    which samples a file holds, not on their order; stratified when every class has >= 3 rows."""
    rows = np.flatnonzero(valid)
    rows = rows[np.argsort(sample_ids[rows], kind="stable")]
    strat = y[rows] if stratify else None
    if strat is not None and np.unique(strat, return_counts=True)[1].min() < 3:
        strat = None  # sklearn cannot stratify a class with fewer rows than splits
    rest, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=strat)
    strat_rest = y[rest] if strat is not None else None
    train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction), random_state=seed,
                                  stratify=strat_rest)
    return np.sort(train), np.sort(val), np.sort(test)


def _pca_dim(n_features: int, n_train: int, max_dim: int) -> int | None:
    """Components kept when features wider than ``max_dim`` are projected, else None.

    Fitted on the centred training rows, which span at most n_train - 1 dimensions: more components
    than that carry nothing (and scikit-learn refuses more than n_train), so a wide layer probed
    with few rows keeps min(max_dim, n_train - 1, n_features) instead of failing.
    """
    if n_features <= max_dim:
        return None
    return max(1, min(max_dim, n_train - 1, n_features))


def _prepare_features(X, train, max_dim: int, seed: int):
    """Standardise on the training rows; above ``max_dim`` dims project with a seeded PCA.

    Returns (features, PCA components kept or None)."""
    scaler = StandardScaler().fit(X[train])
    Z = scaler.transform(X)
    dim = _pca_dim(Z.shape[1], len(train), max_dim)
    if dim is not None:
        pca = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit(Z[train])
        Z = pca.transform(Z)
    return Z, dim


def _probe_classifier(Z, y, split, C_grid, max_iter: int):
    """Fit along the C grid (warm-started, increasing C); return test accuracy at the best val C."""
    train, val, test = split
    clf = LogisticRegression(max_iter=max_iter, warm_start=True)  # lbfgs: multinomial for > 2 classes
    best = (-np.inf, np.nan, np.nan, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per cell in the 'converged' column
        for C in sorted(C_grid):
            clf.set_params(C=C).fit(Z[train], y[train])
            val_acc = clf.score(Z[val], y[val])
            if val_acc > best[0]:  # ties keep the smaller C (the stronger regulariser)
                best = (val_acc, clf.score(Z[test], y[test]), C, bool(np.all(clf.n_iter_ < max_iter)))
    return {"score": best[1], "C": best[2], "alpha": np.nan, "converged": best[3]}


def _probe_regressor(Z, y, split, alpha_grid):
    train, val, test = split
    best = (-np.inf, np.nan, np.nan)
    for alpha in sorted(alpha_grid):
        model = Ridge(alpha=alpha).fit(Z[train], y[train])
        val_r2 = r2_score(y[val], model.predict(Z[val]))
        if val_r2 > best[0]:
            best = (val_r2, r2_score(y[test], model.predict(Z[test])), alpha)
    return {"score": best[1], "C": np.nan, "alpha": best[2], "converged": True}


def _chance(y, split, kind) -> float:
    """Majority-class frequency on the test split (classification); 0 for R^2."""
    if kind == "regression":
        return 0.0
    _, counts = np.unique(y[split[2]], return_counts=True)
    return float(counts.max() / counts.sum())


def probe_table(stores,                                      # FeatureStore or list of them (same data)
                layers=None,                                 # layer names; default all
                sigmas=None,                                 # sigma values; default all stored
                targets=None,                                # "label" and/or factor names; default all usable
                seed: int = 0,                               # splits and PCA
                progress: bool = False,                      # show a rich progress bar
                *,
                val_fraction: float = 0.2,                   # share of rows for choosing C / alpha
                test_fraction: float = 0.2,                  # share of rows held out for the reported metric
                C_grid=(0.01, 0.1, 1.0),                     # inverse L2 strengths tried for logistic regression
                alpha_grid=(0.1, 1.0, 10.0, 100.0, 1000.0),  # L2 strengths tried for ridge regression
                max_iter: int = 200,                         # lbfgs iterations per C (warm-started)
                max_dim: int = 512,                          # wider features are PCA-projected to at most this many
                                                             # dims
                max_classes: int = 50,                       # integer factors with more values count as continuous
                ) -> pd.DataFrame:
    """Tidy table of linear-probe results, one row per (layer, sigma, target).

    ``stores``: one FeatureStore or several of the same data (e.g. noise seeds) -> mean and std.
    ``layers`` / ``sigmas``: names / sigma values to restrict to (default all). ``targets``:
    "label" and/or factor names (default: label if any sample is labelled, plus every factor).
    Columns: layer, sigma, target, metric ("accuracy" or "r2"), accuracy (mean test metric),
    accuracy_std (NaN for one store), n_seeds, C (chosen on validation, the most frequent over
    stores), alpha, chance, converged, n_train, n_val, n_test (rows of each split, this cell's
    target), n_classes, dim (dimensions the probe was fit on), feature_dim (stored width),
    pca_dim (PCA components kept, NaN when the layer was not projected), model, seed.
    """
    stores = _as_store_list(stores)
    first = stores[0]
    layers = list(first.layers) if layers is None else [first.check_layer(name) for name in layers]
    for store in stores[1:]:
        for name in layers:
            store.check_layer(name)
    sigma_idx = list(range(len(first.sigmas))) if sigmas is None else [first.sigma_index(s) for s in sigmas]
    chosen = _select_targets(_available_targets(first, max_classes), targets, first.path)

    splits = {}
    for name, (values, valid, kind) in chosen.items():
        splits[name] = split_rows(first.sample_ids, values, valid, kind == "classification", seed,
                                  val_fraction, test_fraction)

    results = defaultdict(list)
    total = len(stores) * len(layers) * len(sigma_idx)
    # One BLAS thread: the products here are small (n x d by d x classes), and on a busy two-core
    # machine OpenBLAS threads spinning on them made each lbfgs fit ~40x slower than one thread.
    with progress_bar(total, "linear probes", enabled=progress) as advance, threadpool_limits(1, user_api="blas"):
        for store in stores:
            for layer in layers:
                for s in sigma_idx:
                    X = store.load(layer, s)
                    for name, (values, _, kind) in chosen.items():
                        split = splits[name]
                        Z, pca_dim = _prepare_features(X, split[0], max_dim, seed)
                        if kind == "classification":
                            res = _probe_classifier(Z, values, split, C_grid, max_iter)
                        else:
                            res = _probe_regressor(Z, values.astype(np.float64), split, alpha_grid)
                        res.update(feature_dim=X.shape[1], pca_dim=pca_dim, dim=Z.shape[1])
                        results[(layer, s, name)].append(res)
                    advance(1, info=f"{layer} σ={first.sigmas[s]:g}")

    records = []
    for (layer, s, name), runs in results.items():
        values, _, kind = chosen[name]
        split = splits[name]
        scores = np.array([r["score"] for r in runs])
        Cs = Counter(r["C"] for r in runs if not np.isnan(r["C"]))
        alphas = Counter(r["alpha"] for r in runs if not np.isnan(r["alpha"]))
        records.append(dict(
            layer=layer, sigma=float(first.sigmas[s]), target=name,
            metric="accuracy" if kind == "classification" else "r2",
            accuracy=float(scores.mean()), accuracy_std=float(scores.std(ddof=1)) if len(runs) > 1 else np.nan,
            n_seeds=len(runs),
            C=min(Cs, key=lambda c: (-Cs[c], c)) if Cs else np.nan,            # most often chosen
            alpha=min(alphas, key=lambda a: (-alphas[a], a)) if alphas else np.nan,
            chance=_chance(values, split, kind), converged=all(r["converged"] for r in runs),
            n_train=len(split[0]), n_val=len(split[1]), n_test=len(split[2]),
            n_classes=int(np.unique(values[split[0]]).size) if kind == "classification" else 0,
            dim=runs[0]["dim"], feature_dim=runs[0]["feature_dim"],
            pca_dim=np.nan if runs[0]["pca_dim"] is None else runs[0]["pca_dim"],
            model=first.name, seed=seed))
    return pd.DataFrame.from_records(records)
