"""Heatmap figures for the tidy tables of linear probes and CKA (PNG, byte-reproducible).

``plot_probe_heatmap``  layer x sigma grid of a probe metric for one target, values written in cells.
``plot_cka_heatmap``    per CKA mode: pair -> layer x sigma; layers -> one layer x layer panel per
                        sigma; sigmas -> one sigma x sigma panel per layer. The title names the
                        estimator (for RBF its bandwidth rule) and the permutation null; cells not
                        above their null's 95th percentile are written in grey.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state) and saved without the
"Software" metadata entry, so the same table gives the same bytes.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.cka import ESTIMATOR_TITLES
from probe.core.errors import UserError


def _ordered(values) -> list:
    """Unique values in order of first appearance (tables list layers in network order)."""
    return list(dict.fromkeys(values))


def _sigma_label(sigma: float) -> str:
    return f"{sigma:g}"


def _save(fig: Figure, out_png) -> str:
    out_png = os.fspath(out_png)
    parent = os.path.dirname(out_png)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out_png, dpi=fig.dpi, metadata={"Software": None})
    return out_png


def _draw_grid(ax, matrix: np.ndarray, rows: list[str], cols: list[str], vmin: float, vmax: float,
               texts=None, grey=None, cmap: str = "viridis"):
    """One annotated heatmap; returns the image for a colour bar."""
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=7)
    small = max(len(rows), len(cols)) > 12
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isnan(matrix[i, j]):
                continue
            text = texts[i][j] if texts is not None else f"{matrix[i, j]:.2f}"
            frac = (matrix[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 0.5
            faint = grey is not None and grey[i, j]
            colour = "0.6" if faint else ("black" if frac > 0.6 else "white")
            ax.text(j, i, text, ha="center", va="center", fontsize=5 if small else 7, color=colour,
                    fontstyle="italic" if faint else "normal")
    return image


def plot_probe_heatmap(df: pd.DataFrame, target: str, out_png, *,
                       title: str | None = None,   # figure title; default names target, metric, model
                       dpi: int = 150,             # resolution of the PNG, dots per inch
                       ) -> str:
    """Layer (rows, network order) x sigma (columns, ascending) heatmap of one probe target."""
    sub = df[df["target"] == target]
    if sub.empty:
        raise UserError(f"no probe results for target {target!r} (have: {', '.join(_ordered(df['target']))})")
    layers, sigmas = _ordered(sub["layer"]), sorted(set(sub["sigma"]))
    matrix = np.full((len(layers), len(sigmas)), np.nan)
    texts = [["" for _ in sigmas] for _ in layers]
    for row in sub.itertuples(index=False):
        i, j = layers.index(row.layer), sigmas.index(row.sigma)
        matrix[i, j] = row.accuracy
        std = getattr(row, "accuracy_std", np.nan)
        texts[i][j] = f"{row.accuracy:.2f}" + ("" if std is None or np.isnan(std) else f"\n±{std:.2f}")
    metric = str(sub["metric"].iloc[0]) if "metric" in sub else "accuracy"
    vmin = 0.0 if metric == "accuracy" else min(0.0, float(np.nanmin(matrix)))
    fig = Figure(figsize=(max(6.5, 1.6 + 0.75 * len(sigmas)), 1.2 + 0.4 * len(layers)), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    image = _draw_grid(ax, matrix, layers, [_sigma_label(s) for s in sigmas], vmin, 1.0, texts)
    fig.colorbar(image, ax=ax, label=f"test {metric}")
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("layer")
    if title is None:
        model = f", {sub['model'].iloc[0]}" if "model" in sub else ""
        seeds = f", mean of {int(sub['n_seeds'].max())} seeds" if "n_seeds" in sub and sub["n_seeds"].max() > 1 else ""
        chance = f"; chance {sub['chance'].max():.2f}" if metric == "accuracy" and "chance" in sub else ""
        title = f"Linear probe: {target} (test {metric}{model}{seeds}{chance})"
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)


def _null_note(df: pd.DataFrame) -> str:
    n_perm = int(df["n_perm"].max()) if "n_perm" in df else 0
    if n_perm <= 0 or df["null_p95"].isna().all():
        return "no permutation null computed"
    return (f"permutation null: {n_perm} row shuffles, median p95 {df['null_p95'].median():.3f}; "
            "grey italic = not above its null")


def _bandwidth_note(df: pd.DataFrame) -> str:
    """For RBF tables: which bandwidth rule (the median of which distances) and which factor."""
    if "bandwidth_rule" not in df or df["bandwidth_rule"].isna().all():
        return ""
    rules = ", ".join(str(r) for r in _ordered(df["bandwidth_rule"].dropna()))
    factors = ", ".join(f"{f:g}" for f in _ordered(df["sigma_factor"].dropna())) if "sigma_factor" in df else "?"
    return f" (σ = {factors} × median distance, bandwidth rule {rules})"


def _cka_panels(df: pd.DataFrame, mode: str):
    """(panel title, row key, column key, sub-table) for each panel of a mode."""
    if mode == "pair":
        return [("", "layer_a", "sigma_a", df)]
    if mode == "layers":
        return [(f"σ = {_sigma_label(s)}", "layer_a", "layer_b", df[df["sigma_a"] == s])
                for s in sorted(set(df["sigma_a"]))]
    return [(f"{layer}", "sigma_a", "sigma_b", df[df["layer_a"] == layer]) for layer in _ordered(df["layer_a"])]


def plot_cka_heatmap(df: pd.DataFrame, out_png, *,
                     mode: str | None = None,    # "pair" | "layers" | "sigmas"; default: the table's mode column
                     title: str | None = None,   # figure title; default names estimator, models and null
                     dpi: int = 150,             # resolution of the PNG, dots per inch
                     max_cols: int = 4,          # panels per row for the layers / sigmas modes
                     ) -> str:
    """Heatmap(s) of a ``cka_table`` result."""
    if df.empty:
        raise UserError("the CKA table is empty: nothing to plot")
    if mode is None:
        modes = _ordered(df["mode"]) if "mode" in df else ["pair"]
        if len(modes) != 1:
            raise UserError(f"the CKA table mixes modes {modes}; pass mode=")
        mode = modes[0]
    panels = _cka_panels(df, mode)
    vmin = min(0.0, float(df["cka"].min()))
    ncols = min(max_cols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    first = panels[0][3]
    size = max(len(_ordered(first[panels[0][1]])), len(_ordered(first[panels[0][2]])))
    width = max(6.5, 1.5 + ncols * (1.2 + 0.45 * size))  # wide enough for the two-line title
    fig = Figure(figsize=(width, 1.4 + nrows * (0.9 + 0.4 * size)), dpi=dpi,
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, (panel_title, row_key, col_key, sub) in zip(axes.flat, panels):
        rows = _ordered(sub[row_key]) if row_key.startswith("layer") else sorted(set(sub[row_key]))
        cols = _ordered(sub[col_key]) if col_key.startswith("layer") else sorted(set(sub[col_key]))
        matrix = np.full((len(rows), len(cols)), np.nan)
        grey = np.zeros(matrix.shape, bool)
        for rec in sub.itertuples(index=False):
            i, j = rows.index(getattr(rec, row_key)), cols.index(getattr(rec, col_key))
            matrix[i, j] = rec.cka
            grey[i, j] = bool(rec.null_p95 == rec.null_p95 and rec.cka <= rec.null_p95)
        label = lambda v: _sigma_label(v) if isinstance(v, float) else str(v)
        image = _draw_grid(ax, matrix, [label(r) for r in rows], [label(c) for c in cols], vmin, 1.0, grey=grey)
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel({"pair": "noise level σ", "layers": "layer (B)", "sigmas": "σ (B)"}[mode], fontsize=7)
        ax.set_ylabel({"pair": "layer", "layers": "layer (A)", "sigmas": "σ (A)"}[mode], fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    estimator = str(df["estimator"].iloc[0])
    fig.colorbar(image, ax=axes, label="CKNNA" if estimator == "cknna" else "CKA", shrink=0.8)
    if title is None:
        a, b = (str(df["model_a"].iloc[0]), str(df["model_b"].iloc[0])) if "model_a" in df else ("", "")
        models = a if a == b else f"{a} vs {b}"
        title = f"{ESTIMATOR_TITLES.get(estimator, estimator)}{_bandwidth_note(df)}, {mode}: {models}\n{_null_note(df)}"
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_png)
