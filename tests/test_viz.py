"""Plotting API: overlays, contours, grids, figures and atomic saving."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.data.image_geometry import prepare_image
from crate_vis.viz import (
    OKABE_ITO,
    HeadBlock,
    LayerSeries,
    attention_figure,
    attention_opacity,
    colored_attention,
    draw_mask_contours,
    head_colors,
    head_grid_figure,
    heatmap_overlay,
    image_grid,
    mask_contours,
    mask_overlay,
    part_map_overlay,
    pca_figure,
    pca_rgb_image,
    plot_layer_metric,
    rollout_figure,
    save_figure,
)
from crate_vis.viz.colors import hex_to_rgb


def _photo(h: int = 50, w: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_attention_opacity():
    uniform = torch.ones(2, 3, 4)
    assert np.all(attention_opacity(uniform) == 0)  # no preference: stays grey
    peaked = torch.ones(3, 4)
    peaked[1, 2] = 50.0
    op = attention_opacity(peaked)
    assert op[1, 2] == pytest.approx(1.0) and op[0, 0] == 0.0
    # A barely non-uniform head is not stretched to full colour.
    almost = torch.ones(3, 4)
    almost[0, 0] = 1.2
    assert attention_opacity(almost).max() < 0.1


# ------------------------------------------------------------------------------------------------------ overlays
def test_heatmap_overlay_alpha_extremes():
    import matplotlib

    img = np.asarray(_photo(10, 12))
    heat = np.linspace(0, 1, 120, dtype=np.float32).reshape(10, 12)
    assert np.array_equal(heatmap_overlay(img, heat, alpha=0.0), img)
    full = heatmap_overlay(img, heat, alpha=1.0, cmap="viridis")
    expected = np.clip(matplotlib.colormaps["viridis"](heat)[..., :3] * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(full.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="grid_to_image"):
        heatmap_overlay(img, np.zeros((5, 5)))


def test_colored_attention_tints_only_where_attended():
    img = np.full((4, 4, 3), 200, dtype=np.uint8)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    out = colored_attention(img, heat, (230, 159, 0), max_alpha=1.0, brightness=0.5)
    assert tuple(out[0, 0]) == (230, 159, 0)
    assert tuple(out[3, 3]) == (100, 100, 100)  # grey 200 * 0.5


def test_mask_contours_and_overlay():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:25] = True
    contours = mask_contours(mask)
    assert len(contours) == 1
    x, y, w, h = cv2.boundingRect(contours[0])
    assert (x, y, w, h) == (10, 5, 15, 10)
    img = np.full((20, 30, 3), 100, dtype=np.uint8)
    drawn = draw_mask_contours(img, mask, (0, 114, 178), thickness=1)
    assert tuple(drawn[5, 15]) == (0, 114, 178)  # on the outline
    assert tuple(drawn[10, 17]) == (100, 100, 100)  # inside, untouched
    out = mask_overlay(img, mask, (0, 114, 178), outside=0.5, contour=False)
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[10, 17]) == (100, 100, 100)


def test_part_map_overlay_dims_background():
    img = np.full((2, 2, 3), 200, dtype=np.uint8)
    labels = np.array([[0, 1], [-1, -1]])
    colors = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    out = part_map_overlay(img, labels, colors, alpha=1.0, background=0.25)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)
    assert tuple(out[1, 0]) == (50, 50, 50)
    with pytest.raises(ValueError, match="labels"):
        part_map_overlay(img, np.array([[2, 0], [0, 0]]), colors)


def test_head_colors_are_the_colour_blind_safe_palettes():
    c = head_colors(6)
    assert [tuple(x) for x in c] == [hex_to_rgb(h) for h in OKABE_ITO[:6]]
    c12 = head_colors(12)
    assert len({tuple(x) for x in c12}) == 12
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        head_colors(20)
    assert any("repeat" in str(x.message) for x in w)


# ------------------------------------------------------------------------------------------------------- figures
def _axes_aspects(fig) -> list[float]:  # noqa: ANN001
    w, h = fig.get_size_inches()
    return [(a.get_position().height * h) / (a.get_position().width * w) for a in fig.axes]


def test_image_grid_rows_follow_their_aspect_ratio():
    wide = np.zeros((30, 60, 3), dtype=np.uint8)
    tall = np.zeros((80, 40, 3), dtype=np.uint8)
    fig = image_grid([[wide, wide], [tall, tall]], row_titles=["a", "b"], col_titles=["x", "y"],
                     col_colors=[None, (230, 159, 0)], col_footers=["s 0.1", None])  # fmt: skip
    aspects = sorted(round(a, 3) for a in _axes_aspects(fig) if a > 0.1)
    assert aspects == [0.5, 0.5, 2.0, 2.0]
    with pytest.raises(ValueError, match="col_titles"):
        image_grid([[wide]], col_titles=["a", "b"])


def test_save_figure_png_pdf_and_arrays(tmp_path: Path):
    wide = np.zeros((30, 60, 3), dtype=np.uint8)
    fig = image_grid([[wide]])
    png = save_figure(fig, tmp_path / "f.png", dpi=100)
    w_in, h_in = fig.get_size_inches()
    with Image.open(png) as im:
        assert im.size == (round(w_in * 100), round(h_in * 100))
    pdf = save_figure(fig, tmp_path / "sub" / "f.pdf", dpi=100)
    assert pdf.read_bytes().startswith(b"%PDF")
    arr = save_figure(np.full((7, 9, 3), 5, dtype=np.uint8), tmp_path / "a.png")
    with Image.open(arr) as im:
        assert im.size == (9, 7)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "f.pdf", "f.png", "sub"]  # no temp files left
    with pytest.raises(ValueError, match="format"):
        save_figure(fig, tmp_path / "f.xyz")


def test_attention_figure_and_head_grid_render(tmp_path: Path):
    img = np.asarray(_photo(30, 50))
    heat = np.random.default_rng(0).random((4, 30, 50)).astype(np.float32)
    masks = heat > 0.7
    fig = attention_figure(img, heat, masks, heat.mean(0), masks.any(0), head_mass=[0.9] * 4, title="t", mass=0.6)
    save_figure(fig, tmp_path / "a.png", dpi=60)
    labels = np.where(masks.any(0), heat.argmax(0), -1)
    block = HeadBlock("m", [0, 2, 3], [heat[:3], heat[:3]], [labels.clip(-1, 2)] * 2, {"cons": np.array([0.5, np.nan, 0.1])})
    fig = head_grid_figure([img, img], [block, block], row_titles=["r0", None])
    texts = [t.get_text() for t in fig.texts]
    assert "head 2" in texts and "part map" in texts and "cons  0.50" in texts and "cons   -  " in texts
    save_figure(fig, tmp_path / "h.pdf")
    with pytest.raises(ValueError, match="expected 2"):
        head_grid_figure([img, img], [HeadBlock("m", [0], [heat[:1]])])


def test_layer_metric_plot_with_baseline():
    s = LayerSeries("CRATE", [3.0, 2.5, 2.0], [0.1, 0.2, 0.1])
    b = LayerSeries("random init", [3.0, 3.0, 3.1], [0.1, 0.1, 0.1])
    fig = plot_layer_metric(s, "coding rate", baseline=b, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CRATE", "random init"]
    assert ax.get_ylabel() == "coding rate"
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0, 1, 2])  # layers numbered from 0, as --layer numbers them
    with pytest.raises(ValueError, match="error bars"):
        plot_layer_metric(LayerSeries("x", [1.0, 2.0], [0.1]), "y")


def test_rollout_and_pca_figures():
    img = np.asarray(_photo(50, 90))
    prep = prepare_image(_photo(50, 90), 8, 32)
    fig = rollout_figure(img, np.random.default_rng(0).random(prep.grid), prep)
    assert len(fig.axes) == 2
    rgb = pca_rgb_image(np.random.default_rng(1).random((*prep.grid, 3)), prepared=prep)
    assert rgb.shape == (50, 90, 3) and rgb.dtype == np.uint8
    fig = pca_figure([img], [rgb], titles=["x"])
    assert len(fig.axes) == 2


@pytest.mark.parametrize("name", ["crate_test_patch8_32", "test_vit"])
def test_image_attention_matches_the_hooks_and_a_full_forward(name):
    from crate_vis import create_model
    from crate_vis.experiments.attention import image_attention
    from crate_vis.hooks import FeatureRecorder, cls_attention_maps

    torch.manual_seed(0)
    model = create_model(name).eval()
    photo = _photo(40, 72)
    for layer in (0, -1):
        res = image_attention(model, photo, layer=layer, size=32, features=True)
        x = res.prepared.tensor[None]
        torch.testing.assert_close(res.attn, cls_attention_maps(model, x, layer=layer)[0])
        # Features recorded on the early-stopped pass equal those of a full forward pass.
        with FeatureRecorder(model, layers=[layer], features=("ista_out",)) as rec, torch.no_grad():
            model.forward_features(x)
        torch.testing.assert_close(res.features, rec.features[layer]["ista_out"][0, 1:])
        assert res.masks.shape == res.attn.shape and res.masks.dtype == torch.bool
