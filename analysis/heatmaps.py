"""Heatmap figures for the tidy tables of linear probes and CKA (PNG, byte-reproducible).

``plot_probe_heatmap``  layer x sigma grid of a probe metric for one target, values written in cells.
``plot_cka_heatmap``    per CKA mode: pair -> layer x sigma; layers -> one layer x layer panel per
                        sigma; sigmas -> one sigma x sigma panel per layer. The title names the
                        estimator (for RBF its bandwidth rule) and the permutation null; cells not
                        above their null's 95th percentile are written in grey.

Each ``plot_*`` has a ``draw_*`` twin that draws into a given ``Figure`` or ``SubFigure`` (the PDF
report lays several of them out on one page), and ``draw_panels`` draws small multiples of
matrices with one shared colour scale and one colour bar. Layer names on every axis are shortened by
``short_layer`` (``down_blocks.1`` -> ``down 1``, ``mid_block`` -> ``mid``), sigma values by
``sigma_label``, so all figures name the same thing the same way.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state) and saved without the
"Software" metadata entry, so the same table gives the same bytes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.cka import ESTIMATOR_TITLES
from probe.core.errors import UserError


def _ordered(values) -> list:
    """Unique values in order of first appearance (tables list layers in network order)."""
    return list(dict.fromkeys(values))


def short_layer(name) -> str:
    """One spelling of a layer name for every axis: ``down_blocks.1`` -> ``down 1``, ``mid_block`` -> ``mid``,
    ``up_blocks.0.resnets.1`` -> ``up 0.resnets.1``, ``time_embedding`` -> ``time emb``."""
    s = str(name)
    s = re.sub(r"^(down|up)_blocks\.", r"\1 ", s)
    s = re.sub(r"^mid_block", "mid", s)
    s = s.replace("time_embedding", "time emb").replace("_", " ")
    return s


LAYER_KEY = "layers: down i = down_blocks.i, mid = mid_block, up i = up_blocks.i"
NULL_MARK = "grey italic values (× where no values are written)"


def sigma_label(sigma: float) -> str:
    return f"{float(sigma):g}"


def _sigma_label(sigma: float) -> str:  # kept for callers of the old name
    return sigma_label(sigma)


def _save(fig: Figure, out_png) -> str:
    out_png = os.fspath(out_png)
    parent = os.path.dirname(out_png)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out_png, dpi=fig.dpi, metadata={"Software": None})
    return out_png


def _draw_grid(ax, matrix: np.ndarray, rows: list[str], cols: list[str], vmin: float, vmax: float,
               texts=None, grey=None, cmap: str = "viridis", annotate: bool = True, fontsize: float | None = None):
    """One annotated heatmap; returns the image for a colour bar."""
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    tick = 7 if fontsize is None else fontsize + 0.5
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45 if max(map(len, cols), default=0) > 3 else 0,
                  ha="right" if max(map(len, cols), default=0) > 3 else "center", fontsize=tick)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=tick)
    ax.tick_params(length=2, pad=1.5)
    if not annotate:
        if grey is not None and np.any(grey):  # no values written: mark the cells a value would have greyed
            rows_i, cols_j = np.nonzero(grey)
            ax.scatter(cols_j, rows_i, marker="x", s=8, c="0.85", linewidths=0.7)
        return image
    small = max(len(rows), len(cols)) > 12
    size = fontsize if fontsize is not None else (5 if small else 7)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isnan(matrix[i, j]):
                continue
            text = texts[i][j] if texts is not None else f"{matrix[i, j]:.2f}"
            frac = (matrix[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 0.5
            faint = grey is not None and grey[i, j]
            colour = "0.6" if faint else ("black" if frac > 0.6 else "white")
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour,
                    fontstyle="italic" if faint else "normal")
    return image


# ---------------------------------------------------------------------------- small multiples
@dataclass
class Panel:
    """One matrix of a small-multiples figure."""

    title: str
    matrix: np.ndarray
    rows: list                    # row tick labels
    cols: list                    # column tick labels
    grey: np.ndarray | None = None  # cells drawn grey italic (e.g. not above the permutation null)
    texts: list | None = None     # cell texts; default the value to 2 decimals


def draw_panels(fig, panels: list[Panel], *,
                vmin: float,                  # shared colour scale, lower end
                vmax: float,                  # shared colour scale, upper end
                cbar_label: str,              # colour bar label (what the colour is)
                xlabel: str,                  # x axis label of every panel
                ylabel: str,                  # y axis label (written on the first column only)
                max_cols: int = 4,            # panels per row
                annotate: bool | None = None,  # values in cells; default when cells are large enough
                cmap: str = "viridis",        # colour map
                ):
    """Small multiples with one colour scale and one colour bar; returns the axes array."""
    if not panels:
        raise UserError("nothing to draw: no panels")
    ncols = min(max_cols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cells = max(max(p.matrix.shape) for p in panels)
    if annotate is None:  # values in cells only while they can be set at 5.5 pt or more
        annotate = cells * ncols <= 24
    font = 6.5 if cells * ncols <= 16 else 5.5
    image = None
    for k, (ax, p) in enumerate(zip(axes.flat, panels)):
        image = _draw_grid(ax, p.matrix, p.rows, p.cols, vmin, vmax, texts=p.texts, grey=p.grey, cmap=cmap,
                           annotate=annotate, fontsize=font)
        ax.set_title(p.title, fontsize=7.5, pad=3)
        ax.set_xlabel(xlabel, fontsize=7, labelpad=1)
        if k % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=7, labelpad=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    bar = fig.colorbar(image, ax=axes, shrink=min(1.0, 0.5 + 0.25 * nrows), aspect=25, pad=0.02)
    bar.set_label(cbar_label, fontsize=7)
    bar.ax.tick_params(labelsize=6.5)
    return axes


def matrix_of(df: pd.DataFrame, row: str, col: str, value: str, row_order=None, col_order=None):
    """(matrix, row keys, column keys) of a tidy table; rows in table order, numeric columns sorted."""
    def keys(c):
        return sorted(set(df[c])) if pd.api.types.is_numeric_dtype(df[c]) else _ordered(df[c])

    rows = row_order or keys(row)
    cols = col_order or keys(col)
    m = np.full((len(rows), len(cols)), np.nan)
    ri, ci = {r: i for i, r in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
    for r, c, v in zip(df[row], df[col], df[value]):
        m[ri[r], ci[c]] = v
    return m, rows, cols


def _tick(values, key: str) -> list[str]:
    return [short_layer(v) if key.startswith("layer") else sigma_label(v) for v in values]


# ------------------------------------------------------------------------------------ probes
def probe_panel(df: pd.DataFrame, target: str, title: str) -> Panel:
    """Layer x sigma panel of one target's probe accuracy (with the seed spread when there is one)."""
    sub = df[df["target"] == target]
    if sub.empty:
        raise UserError(f"no probe results for target {target!r} (have: {', '.join(_ordered(df['target']))})")
    m, rows, cols = matrix_of(sub, "layer", "sigma", "accuracy")
    texts = None
    if "accuracy_std" in sub and sub["accuracy_std"].notna().any():
        s, _, _ = matrix_of(sub, "layer", "sigma", "accuracy_std", rows, cols)
        texts = [[f"{m[i, j]:.2f}" + ("" if np.isnan(s[i, j]) else f"\n±{s[i, j]:.2f}") for j in range(len(cols))]
                 for i in range(len(rows))]
    return Panel(title, m, _tick(rows, "layer"), _tick(cols, "sigma"), texts=texts)


def draw_probe_heatmap(fig, df: pd.DataFrame, target: str, *, title: str | None = None) -> None:
    """One probe heatmap into ``fig`` (a Figure or SubFigure)."""
    panel = probe_panel(df, target, "")
    sub = df[df["target"] == target]
    metric = str(sub["metric"].iloc[0]) if "metric" in sub else "accuracy"
    vmin = 0.0 if metric == "accuracy" else min(0.0, float(np.nanmin(panel.matrix)))
    draw_panels(fig, [panel], vmin=vmin, vmax=1.0, cbar_label=f"test {metric}", xlabel="noise level σ",
                ylabel="layer", annotate=True)
    if title is None:
        model = f", {sub['model'].iloc[0]}" if "model" in sub else ""
        seeds = f", mean of {int(sub['n_seeds'].max())} seeds" if "n_seeds" in sub and sub["n_seeds"].max() > 1 else ""
        chance = f"; chance {sub['chance'].max():.2f}" if metric == "accuracy" and "chance" in sub else ""
        title = f"Linear probe: {target} (test {metric}{model}{seeds}{chance})"
    fig.suptitle(title, fontsize=9)


def plot_probe_heatmap(df: pd.DataFrame, target: str, out_png, *,
                       title: str | None = None,   # figure title; default names target, metric, model
                       dpi: int = 150,             # resolution of the PNG, dots per inch
                       ) -> str:
    """Layer (rows, network order) x sigma (columns, ascending) heatmap of one probe target."""
    sub = df[df["target"] == target]
    if sub.empty:
        raise UserError(f"no probe results for target {target!r} (have: {', '.join(_ordered(df['target']))})")
    n_layers, n_sigmas = sub["layer"].nunique(), sub["sigma"].nunique()
    fig = Figure(figsize=(max(6.5, 1.6 + 0.75 * n_sigmas), 1.2 + 0.4 * n_layers), dpi=dpi, layout="constrained")
    draw_probe_heatmap(fig, df, target, title=title)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------- CKA
def _null_note(df: pd.DataFrame) -> str:
    n_perm = int(df["n_perm"].max()) if "n_perm" in df and df["n_perm"].notna().any() else 0
    if n_perm <= 0 or "null_p95" not in df or df["null_p95"].isna().all():
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


def cka_panel(sub: pd.DataFrame, row_key: str, col_key: str, title: str) -> Panel:
    """A CKA matrix; cells not above their permutation null's 95th percentile are marked grey."""
    m, rows, cols = matrix_of(sub, row_key, col_key, "cka")
    grey = np.zeros(m.shape, bool)
    if "null_p95" in sub:
        p95, _, _ = matrix_of(sub, row_key, col_key, "null_p95", rows, cols)
        grey = np.isfinite(p95) & (m <= p95)
    return Panel(title, m, _tick(rows, row_key), _tick(cols, col_key), grey=grey)


def _cka_panels(df: pd.DataFrame, mode: str) -> list[Panel]:
    if mode == "pair":
        return [cka_panel(df, "layer_a", "sigma_a", "")]
    if mode == "layers":
        return [cka_panel(df[df["sigma_a"] == s], "layer_a", "layer_b", f"σ = {sigma_label(s)}")
                for s in sorted(set(df["sigma_a"]))]
    return [cka_panel(df[df["layer_a"] == layer], "sigma_a", "sigma_b", short_layer(layer))
            for layer in _ordered(df["layer_a"])]


CKA_AXES = {"pair": ("noise level σ", "layer"), "layers": ("layer (B)", "layer (A)"), "sigmas": ("σ (B)", "σ (A)")}


def _mode_of(df: pd.DataFrame, mode: str | None) -> str:
    if df.empty:
        raise UserError("the CKA table is empty: nothing to plot")
    if mode is None:
        modes = _ordered(df["mode"]) if "mode" in df else ["pair"]
        if len(modes) != 1:
            raise UserError(f"the CKA table mixes modes {modes}; pass mode=")
        mode = modes[0]
    return mode


def draw_cka_heatmap(fig, df: pd.DataFrame, *, mode: str | None = None, title: str | None = None,
                     max_cols: int = 4) -> None:
    """A ``cka_table`` result into ``fig`` (a Figure or SubFigure); one colour bar for all panels."""
    mode = _mode_of(df, mode)
    estimator = str(df["estimator"].iloc[0]) if "estimator" in df else "debiased"
    xlabel, ylabel = CKA_AXES[mode]
    draw_panels(fig, _cka_panels(df, mode), vmin=min(0.0, float(df["cka"].min())), vmax=1.0,
                cbar_label="CKNNA" if estimator == "cknna" else "CKA", xlabel=xlabel, ylabel=ylabel,
                max_cols=max_cols)
    if title is None:
        a, b = (str(df["model_a"].iloc[0]), str(df["model_b"].iloc[0])) if "model_a" in df else ("", "")
        models = a if a == b else f"{a} vs {b}"
        title = f"{ESTIMATOR_TITLES.get(estimator, estimator)}{_bandwidth_note(df)}, {mode}: {models}\n{_null_note(df)}"
    if title:
        fig.suptitle(title, fontsize=9)


def plot_cka_heatmap(df: pd.DataFrame, out_png, *,
                     mode: str | None = None,    # "pair" | "layers" | "sigmas"; default: the table's mode column
                     title: str | None = None,   # figure title; default names estimator, models and null
                     dpi: int = 150,             # resolution of the PNG, dots per inch
                     max_cols: int = 4,          # panels per row for the layers / sigmas modes
                     ) -> str:
    """Heatmap(s) of a ``cka_table`` result."""
    mode = _mode_of(df, mode)
    panels = _cka_panels(df, mode)
    ncols = min(max_cols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    size = max(max(p.matrix.shape) for p in panels)
    width = max(6.5, 1.5 + ncols * (1.2 + 0.45 * size))  # wide enough for the two-line title
    fig = Figure(figsize=(width, 1.4 + nrows * (0.9 + 0.4 * size)), dpi=dpi, layout="constrained")
    draw_cka_heatmap(fig, df, mode=mode, title=title, max_cols=max_cols)
    return _save(fig, out_png)
