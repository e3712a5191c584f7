"""UMAP pictures of features: one 2-D panel per sigma (or per layer), coloured by label.

A picture, not a measurement: UMAP distorts distances, so each panel also carries one number that
can be compared, the cross-validated k-NN accuracy of the labels on the 2-D embedding. Pipeline per
panel: a seeded subset of at most ``max_points`` rows (the same rows in every panel) -> PCA to 50
dimensions (scikit-learn; removes noise dimensions and makes UMAP's neighbour search cheap) ->
umap-learn with ``random_state=seed`` (single-threaded, so runs repeat exactly) -> scatter plot.

umap-learn is imported inside the function: its import and first call compile numba code (~10 s),
which nothing else in the toolkit should pay for.
"""

from __future__ import annotations

import os
import warnings

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from analysis.heatmaps import short_layer
from probe.core.errors import UserError
from probe.core.progress import progress_bar
from probe.features.store import FeatureStore


def _panels(store: FeatureStore, layer, sigmas, layers, sigma) -> list[tuple[str, int]]:
    """(layer, sigma index) per panel: one layer over sigmas, or several layers at one sigma."""
    if layer is not None and layers is not None:
        raise UserError("give either a layer (panels over sigmas) or layers (panels over layers at one sigma)")
    if layers is not None:
        s = 0 if sigma is None else store.sigma_index(sigma)
        return [(store.check_layer(name), s) for name in layers]
    if layer is None:  # a middle layer is the usual place to look first
        layer = "mid_block" if "mid_block" in store.layers else store.layers[len(store.layers) // 2]
    idx = range(len(store.sigmas)) if sigmas is None else [store.sigma_index(s) for s in sigmas]
    return [(store.check_layer(layer), s) for s in idx]


def _colour_values(store: FeatureStore, color_by: str):
    """(values, discrete?, valid mask) for colouring and for the k-NN score."""
    if color_by == "label":
        values = store.labels
        return values, True, values >= 0
    factors = store.factors
    if color_by not in factors:
        raise UserError(f"cannot colour by {color_by!r}: not 'label' nor a factor of {store.path} "
                        f"(factors: {', '.join(factors) or 'none'})")
    values = factors[color_by]
    discrete = values.dtype.kind not in "fc"
    return values, discrete, np.ones(values.shape, bool) if discrete else ~np.isnan(values)


def knn_accuracy(embedding: np.ndarray, y: np.ndarray,
                 k: int = 5,      # neighbours of the classifier
                 folds: int = 5,  # stratified folds (fewer if a class is smaller)
                 seed: int = 0,   # fold shuffling
                 ) -> float:
    """Mean stratified k-fold accuracy of a k-NN classifier on ``embedding``; NaN if not computable."""
    if y.size == 0:
        return float("nan")
    _, counts = np.unique(y, return_counts=True)
    folds = min(folds, int(counts.min()))
    if counts.size < 2 or folds < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    k = min(k, int(y.size * (folds - 1) / folds) - 1)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=max(k, 1)), embedding, y, cv=cv).mean())


def _reduce(X: np.ndarray, pca_dims: int, seed: int) -> np.ndarray:
    """The matrix UMAP receives: a seeded PCA to ``pca_dims`` (float64), or X itself if not wider."""
    n_comp = min(pca_dims, X.shape[1], X.shape[0] - 1)
    return PCA(n_components=n_comp, random_state=seed).fit_transform(X.astype(np.float64)) if n_comp < X.shape[1] else X


def _fit_umap(Z: np.ndarray, n_neighbors: int, min_dist: float, n_epochs, seed: int):
    """Fitted umap-learn reducer on ``Z``; its neighbour graph is umap-learn's own (``graph_``).

    umap-learn finds the neighbours itself (exact pairwise distances below 4096 rows, NN-descent
    above), so ``graph_`` is exactly ``umap.UMAP(same parameters).fit(Z).graph_``. An earlier
    version passed scikit-learn neighbours in: their self-distances came out as ~1e-6 instead of 0,
    which shifted umap's local connectivity (rho) and changed nearly every row of the fuzzy graph.
    """
    import umap  # slow import (numba); see the module docstring

    reducer = umap.UMAP(n_neighbors=min(n_neighbors, Z.shape[0] - 1), metric="euclidean", min_dist=min_dist,
                        n_epochs=n_epochs, random_state=seed, n_jobs=1)
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            # umap warns "n_jobs overridden by random_state": expected, we ask for determinism
            warnings.filterwarnings("ignore", category=UserWarning, module="umap")
            return reducer.fit(Z)
    finally:
        # numba's OpenMP layer resets the thread count torch shares with it; a process that runs UMAP
        # and then trains or extracts must keep the threads it asked for (and its bitwise results)
        torch.set_num_threads(threads)


def _embed(X: np.ndarray, pca_dims: int, n_neighbors: int, min_dist: float, n_epochs, seed: int) -> np.ndarray:
    return _fit_umap(_reduce(X, pca_dims, seed), n_neighbors, min_dist, n_epochs, seed).embedding_


def umap_panels(store: FeatureStore,
                layer: str | None = None,     # layer whose sigmas become panels; default mid_block / middle layer
                sigmas=None,                  # sigma values for those panels; default all stored
                out_png="umap.png",           # where the PNG goes
                *,
                layers=None,                  # panel per layer instead (at one sigma, below)
                sigma: float | None = None,   # sigma for the per-layer panels; default the first stored
                seed: int = 0,                # subset, PCA, UMAP and CV folds
                n_neighbors: int = 15,        # UMAP neighbourhood size
                min_dist: float = 0.1,        # UMAP minimum distance in the embedding
                n_epochs: int | None = None,  # UMAP optimisation epochs; None = umap-learn's default
                max_points: int = 2000,       # rows embedded (seeded subset, same rows in every panel)
                pca_dims: int = 50,           # PCA dimensions before UMAP
                color_by: str = "label",      # "label" or a factor name
                knn_k: int = 5,               # neighbours of the k-NN score on the 2-D embedding
                cv_folds: int = 5,            # folds of that score
                max_cols: int = 4,            # panels per figure row
                dpi: int = 150,               # PNG resolution, dots per inch
                progress: bool = False,       # show a rich progress bar over the panels
                fig=None,                     # draw into this Figure / SubFigure instead (nothing is saved)
                ) -> pd.DataFrame:
    """Draw UMAP panels into ``out_png``; return one row per panel: layer, sigma, knn_accuracy, ...

    Default panels: ``layer`` (or mid_block / the middle layer) at every stored sigma. Discrete
    colours get one class legend for all panels; each panel's title gives its k-NN accuracy.
    With ``fig`` (the PDF report lays panels out on its own page) nothing is written to ``out_png``.
    """
    panels = _panels(store, layer, sigmas, layers, sigma)
    values, discrete, valid = _colour_values(store, color_by)
    n = store.n_samples
    rows = np.arange(n)
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    values, valid = values[rows], valid[rows]
    if rows.size < 4:
        raise UserError(f"UMAP needs at least 4 samples, {store.path} has {rows.size}")

    ncols = min(max_cols, len(panels))
    nrows = -(-len(panels) // ncols)
    save = fig is None
    if save:
        fig = Figure(figsize=(max(3.0 * ncols, 6.0), 3.0 * nrows + 0.7), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    classes = np.unique(values[valid]) if discrete else np.array([])
    cmap = "tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "viridis"
    records = []
    with progress_bar(len(panels), "UMAP panels", enabled=progress) as advance:
        for ax, (name, s) in zip(axes.flat, panels):
            emb = _embed(store.load(name, s, rows), pca_dims, n_neighbors, min_dist, n_epochs, seed)
            acc = knn_accuracy(emb[valid], values[valid], knn_k, cv_folds, seed) if discrete else float("nan")
            ax.scatter(emb[~valid, 0], emb[~valid, 1], s=3, c="0.75", linewidths=0)
            if discrete and classes.size:
                colour = np.searchsorted(classes, values[valid])
                ax.scatter(emb[valid, 0], emb[valid, 1], s=3, c=colour, cmap=cmap, vmin=0,
                           vmax=max(classes.size - 1, 1), linewidths=0)
            elif not discrete:
                points = ax.scatter(emb[valid, 0], emb[valid, 1], s=3, c=values[valid], cmap="viridis", linewidths=0)
            score = "" if np.isnan(acc) else f"\n{knn_k}-NN accuracy {acc:.2f}"
            ax.set_title(f"{short_layer(name)}, σ = {store.sigmas[s]:g}{score}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            records.append(dict(layer=name, sigma=float(store.sigmas[s]), knn_accuracy=acc, knn_k=knn_k,
                                cv_folds=cv_folds, n_points=int(rows.size), color_by=color_by, model=store.name,
                                seed=seed))
            advance(1, info=f"{name} σ={store.sigmas[s]:g}")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    if discrete and classes.size:  # one legend for every panel: the colours are the same classes throughout
        colours = matplotlib.colormaps[cmap]
        scale = max(classes.size - 1, 1)
        # coloured as scatter maps them
        handles = [Line2D([], [], ls="", marker="o", ms=4, color=colours(i / scale), label=str(c))
                   for i, c in enumerate(classes)]
        fig.legend(handles=handles, title=color_by, loc="outside right center", fontsize=7, title_fontsize=7,
                   frameon=False, handletextpad=0.2, labelspacing=0.3)
    elif not discrete:
        fig.colorbar(points, ax=axes, label=color_by, shrink=0.8)
    if not save:
        return pd.DataFrame.from_records(records)
    fig.suptitle(f"UMAP of {store.name} features (PCA {pca_dims} → UMAP, n_neighbors={n_neighbors}, "
                 f"seed={seed})\ncolour: {color_by}; score: {cv_folds}-fold {knn_k}-NN accuracy in 2-D",
                 fontsize=8)
    out_png = os.fspath(out_png)
    if os.path.dirname(out_png):
        os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.savefig(out_png, dpi=dpi, metadata={"Software": None})
    return pd.DataFrame.from_records(records)
