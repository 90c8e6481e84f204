"""Figures a researcher can read: colour bars, the ground truth with IoU, the logic / τ / head
source in the header, raw grid maps in image pixels with padding and crops marked, wrapped
titles, legends off the boxes, no "-0.00"."""
from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colorbar import Colorbar
from PIL import Image

from localization_heads import bbox
from localization_heads import viz
from localization_heads.config import MaskSettings
from localization_heads.families.llava import compute_geometry

LONG_QUERY = ("the small yellow circle that is just above the big red triangle on the left side of the picture, "
              "next to the blue square .")


def item(image_size, grid=(7, 7), pad=True, crop=False, gt=(10, 8, 40, 30)):
    """attn [L=2, H=3, 1, V] with one hot cell, its meta (one-map layout), the heads and bbox.locate's result."""
    rows, cols = grid
    attn = np.full((2, 3, 1, rows * cols), 1e-3)
    attn[1, 2, 0, 2 * cols + 2] = 1.0
    layout = compute_geometry(image_size, grid, pad=pad, shortest_edge=14 if crop else None,
                                crop_size=(14, 14) if crop else None)
    meta = {"layout": layout.to_dict(), "query": LONG_QUERY, "gt_bbox": list(gt) if gt else None}
    heads = [{"layer": 1, "head": 2, "spatial_entropy": -1e-17, "attn_sum": 1.0},
             {"layer": 0, "head": 0, "spatial_entropy": None, "attn_sum": 0.05},
             {"layer": 1, "head": 1, "spatial_entropy": 0.6931, "attn_sum": 0.05}]
    grid_map = bbox.combine_heads(attn, grid, [(1, 2)], 1.0)
    result = bbox.locate(grid_map, layout, MaskSettings(method="largest_hull", threshold="half_max"))
    return Image.new("RGB", image_size, (90, 90, 90)), attn, meta, heads, result


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(plt.Text) if t.get_text()]


def test_header_names_query_logic_tau_and_head_source_and_wraps():
    fig = viz.build_figure(*item((64, 40)), logic="paper", tau=0.8767, heads_source="fixed (runs/calib/selected_heads.json)")
    header = fig._suptitle.get_text()
    assert "logic=paper" in header and "τ (this sample's elbow) = 0.877" in header
    assert "fixed (runs/calib/selected_heads.json)" in header and "“the small yellow circle" in header
    width_px = fig.get_size_inches()[0] * fig.dpi
    fig.canvas.draw()
    assert fig._suptitle.get_window_extent().width <= width_px   # wrapped, not cut off
    plt.close(fig)


def test_ground_truth_iou_colour_bars_and_entropies():
    fig = viz.build_figure(*item((64, 40)), logic="paper", tau=0.5, heads_source="per-sample top-3")
    shown = texts(fig)
    assert any(t.startswith("IoU ") and t.endswith("with the ground truth") for t in shown)
    assert "ground truth" in shown and "predicted box" in shown
    assert not any("-0.00" in t for t in shown)
    assert any("SE 0.00, S 1.00" in t for t in shown) and any("SE ∞ (no foreground)" in t for t in shown)
    # combined map + 3 raw maps + 3 maps on the image each carry a colour bar
    assert len([a for a in fig.axes if isinstance(getattr(a, "_colorbar", None), Colorbar)]) == 7
    plt.close(fig)


def test_legend_sits_below_the_image_never_over_the_boxes():
    fig = viz.build_figure(*item((64, 40)))
    fig.canvas.draw()
    image_ax = fig.axes[0]
    legend = image_ax.get_legend().get_window_extent()
    assert legend.y1 <= image_ax.get_window_extent().y0 + 1   # display y grows upwards
    plt.close(fig)


def test_raw_maps_are_drawn_in_image_pixels_with_the_padding_marked():
    """Wide image, pad to square: the grid spans y in [-12, 52); the raw panel shows that square
    with the image's 64×40 outline, so its cells line up with the image panels."""
    fig = viz.build_figure(*item((64, 40)))
    raw = next(a for a in fig.axes if a.get_title().startswith("L1 H2 raw"))
    assert raw.get_xlim() == (0.0, 64.0) and raw.get_ylim() == (52.0, -12.0)
    assert raw.images[0].get_extent() == [0.0, 64.0, 52.0, -12.0]
    assert len(raw.images) == 2                                  # the map and the grey padding overlay
    outline = [p for p in raw.patches if p.get_linestyle() == "--"][0]
    assert (outline.get_x(), outline.get_y(), outline.get_width(), outline.get_height()) == (0, 0, 64, 40)
    assert "grey = padding" in fig._suptitle.get_text()
    plt.close(fig)


def test_a_centre_crop_marks_what_the_model_saw():
    image, attn, meta, heads, result = item((64, 40), pad=False, crop=True, gt=None)
    x0, y0, x1, y1 = meta["layout"]["maps"][0]["box"]
    assert 11 < x0 < x1 < 53 and (y0, y1) == (0, 40)           # the middle ~41 of 64 columns
    fig = viz.build_figure(image, attn, meta, heads, result)
    view = [p for p in fig.axes[0].patches if p.get_label() == "model's view (crop)"]
    assert len(view) == 1 and (view[0].get_x(), view[0].get_width()) == pytest.approx((x0, x1 - x0))
    assert "cropped away" in fig._suptitle.get_text() and "padding" not in fig._suptitle.get_text()
    assert not any(t.startswith("IoU") for t in texts(fig))                   # no ground truth, no IoU
    plt.close(fig)


def test_thumbnail_is_bounded_and_draws_both_boxes():
    image = Image.new("RGB", (400, 200), (0, 0, 0))
    png = viz.thumbnail_png(image, None, pred=[40, 40, 200, 160], gt=[200, 20, 360, 180], max_side=256)
    thumb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert thumb.shape[:2] == (128, 256)
    green, red, black = (0, 224, 0), (255, 42, 42), (0, 0, 0)
    assert green in [tuple(thumb[64, x]) for x in (25, 26, 27)]          # predicted box's left edge: 40 × 0.64
    assert tuple(thumb[64, 20]) == black and tuple(thumb[64, 60]) == black
    right_edge = [next((tuple(thumb[y, x]) for x in (228, 229, 230) if tuple(thumb[y, x]) != black), black)
                  for y in range(20, 110)]                               # ground truth's right edge: 359 × 0.64
    assert red in right_edge and black in right_edge                     # dashed
