"""Heatmaps and UMAP panels as the report lays them out: small multiples on one colour scale with one
colour bar, layer names shortened one way everywhere, a class legend and k-NN accuracy per UMAP panel."""

import numpy as np
import pandas as pd
import pytest
from _store_fixture import write_store
from matplotlib.figure import Figure

from analysis.heatmaps import (
    Panel,
    cka_panel,
    draw_cka_heatmap,
    draw_panels,
    draw_probe_heatmap,
    plot_cka_heatmap,
    probe_panel,
    short_layer,
)
from probe.core.errors import UserError


def test_layer_names_are_shortened_one_way():
    assert [short_layer(n) for n in ("down_blocks.0", "mid_block", "up_blocks.2", "time_embedding", "conv_in")] == \
        ["down 0", "mid", "up 2", "time emb", "conv in"]
    assert short_layer("up_blocks.0.resnets.1") == "up 0.resnets.1"


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def test_small_multiples_share_one_scale_and_one_colour_bar():
    rng = np.random.default_rng(0)
    panels = [Panel(f"p{i}", rng.random((3, 4)) * (i + 1) / 5, list("abc"), list("wxyz")) for i in range(5)]
    fig = Figure(figsize=(7, 4), layout="constrained")
    sub = fig.subfigures(1, 1)
    axes = draw_panels(sub, panels, vmin=-0.1, vmax=1.0, cbar_label="CKA", xlabel="noise level σ", ylabel="layer",
                       max_cols=3)
    assert axes.shape == (2, 3) and not axes.flat[-1].axison       # the sixth cell is empty, not drawn
    images = [im for im in _images(fig) if im.axes.get_label() != "<colorbar>"]
    assert len(images) == 5 and {im.get_clim() for im in images} == {(-0.1, 1.0)}
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "CKA"
    assert [ax.get_ylabel() for ax in axes.flat[:5]] == ["layer", "", "", "layer", ""]   # first column only
    assert all(ax.get_xlabel() == "noise level σ" for ax in axes.flat[:5])
    with pytest.raises(UserError, match="no panels"):
        draw_panels(Figure(), [], vmin=0, vmax=1, cbar_label="", xlabel="", ylabel="")


def _cka_rows():
    rows = []
    for la in ("down_blocks.0", "mid_block"):
        for sa in (0.0, 2.5):
            rows.append(dict(mode="pair", estimator="debiased", model_a="t", model_b="s", layer_a=la, sigma_a=sa,
                             layer_b=la, sigma_b=sa, cka=0.9 if la == "mid_block" else 0.02, null_mean=0.0,
                             null_p95=0.05, n_perm=10))
    return pd.DataFrame(rows)


def test_cka_panel_marks_cells_not_above_their_null_and_keeps_network_order():
    df = _cka_rows()
    p = cka_panel(df, "layer_a", "sigma_a", "t")
    assert p.rows == ["down 0", "mid"] and p.cols == ["0", "2.5"]
    assert p.grey.tolist() == [[True, True], [False, False]]       # 0.02 <= p95 0.05; 0.9 above it
    fig = Figure(figsize=(5, 3), layout="constrained")
    draw_cka_heatmap(fig, df, title="")
    texts = [t for ax in fig.axes for t in ax.texts]
    assert {t.get_fontstyle() for t in texts if t.get_text() == "0.02"} == {"italic"}
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["down 0", "mid"]


def test_probe_panels_and_the_standalone_png_still_work(tmp_path):
    df = pd.DataFrame([dict(layer=l, sigma=s, target="label", metric="accuracy", accuracy=a, chance=0.1)
                       for l, a0 in (("down_blocks.0", 0.9), ("up_blocks.1", 0.5)) for s, a in ((0.0, a0), (5.0, 0.1))])
    p = probe_panel(df, "label", "teacher")
    assert p.matrix.tolist() == [[0.9, 0.1], [0.5, 0.1]] and p.rows == ["down 0", "up 1"]
    fig = Figure(figsize=(4, 3), layout="constrained")
    draw_probe_heatmap(fig, df, "label")
    assert "chance 0.10" in fig._suptitle.get_text()
    a, b = plot_cka_heatmap(_cka_rows(), tmp_path / "a.png"), plot_cka_heatmap(_cka_rows(), tmp_path / "b.png")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_umap_panels_draw_into_a_given_figure_with_one_class_legend(tmp_path):
    from analysis.umap_view import umap_panels
    from probe.features.store import FeatureStore

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    feats = {"mid_block": np.stack([6.0 * np.eye(3, 10)[y] + 0.3 * rng.standard_normal((120, 10)),
                                    rng.standard_normal((120, 10))])}
    path = write_store(tmp_path / "f.h5", feats, [0.0, 80.0], y)
    fig = Figure(figsize=(6, 3), layout="constrained")
    out = tmp_path / "never.png"
    with FeatureStore.open(path) as store:
        df = umap_panels(store, "mid_block", out_png=out, seed=0, n_epochs=50, fig=fig)
    assert not out.exists()                                          # drawn into the figure, not saved
    titles = [ax.get_title() for ax in fig.axes]
    for row, title in zip(df.itertuples(), titles):
        assert title == f"mid, σ = {row.sigma:g}\n5-NN accuracy {row.knn_accuracy:.2f}"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2"] and legend.get_title().get_text() == "label"
    # the legend's colours are the scatter's: each class's points carry its legend colour
    scatter = fig.axes[0].collections[1]
    colours = scatter.to_rgba(scatter.get_array())                  # the colours the mapping gives each point
    for k, handle in enumerate(legend.legend_handles):
        assert np.allclose(colours[y == k][0], handle.get_color())
