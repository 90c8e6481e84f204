"""Layouts: token maps on the original image, and the one analysis view of a multi-map layout."""
from __future__ import annotations

import numpy as np
import pytest

from localization_heads.layout import Layout, analysis_record, analysis_view, canvas_shape, cell_boxes, splat_matrix


def test_single_map_is_analysed_as_captured():
    """One map (LLaVA, Qwen): the analysis sees exactly the captured values, padding cells included."""
    layout = Layout.single("pad", (200, 100), (4, 4), (0, -50, 200, 150))
    attn = np.random.default_rng(0).random((2, 3, 1, 16))
    view, view_layout = analysis_view(attn, layout)
    assert view_layout == layout and np.array_equal(view, attn)


def test_legacy_meta_reads_as_one_map():
    meta = {"geometry": {"method": "pad", "image_size": [200, 100], "grid": [4, 4], "grid_box": [0, -50, 200, 150]}}
    layout = Layout.from_meta(meta)
    assert len(layout.maps) == 1 and layout.maps[0].box == (0.0, -50.0, 200.0, 150.0)
    assert Layout.from_dict(layout.to_dict()) == layout


def test_maps_must_tile_the_token_axis():
    with pytest.raises(ValueError):
        Layout("x", (10, 10), (Layout.single("a", (10, 10), (2, 2), (0, 0, 10, 10)).maps[0],) * 2)


def test_canvas_conserves_mass_inside_the_image_and_drops_padding():
    """Tiles + thumbnail: every token's attention lands on the canvas cells its cell covers;
    mass on padding (outside the image) is dropped."""
    layout = Layout.stack("tiles", (300, 200), [
        ("tile_0_0", (2, 2), (0, 0, 150, 200)), ("tile_0_1", (2, 2), (150, 0, 300, 200)),
        ("thumbnail", (2, 2), (0, -50, 300, 250)),          # thumbnail padded top and bottom
    ])
    assert canvas_shape(layout) == (2, 4)
    matrix = splat_matrix(layout, (2, 4)).toarray()
    inside = np.ones(8)
    np.testing.assert_allclose(matrix[:8].sum(axis=1), inside)      # tile cells lie inside the image
    np.testing.assert_allclose(matrix[8:].sum(axis=1), [2 / 3] * 4)   # thumbnail cells are 1/3 padding
    attn = np.zeros((1, 1, 1, 12))
    attn[..., 5] = 1.0          # tile_0_1 cell (0, 1): x in [225, 300), y in [0, 100)
    view, view_layout = analysis_view(attn, layout)
    assert view_layout.maps[0].box == (0.0, 0.0, 300.0, 200.0)
    np.testing.assert_allclose(view.reshape(2, 4), [[0, 0, 0, 1], [0, 0, 0, 0]])


def test_analysis_record_gives_the_layout_of_the_canvas():
    layout = Layout.stack("views", (100, 100), [("base", (2, 2), (0, 0, 100, 100)), ("highres", (4, 4), (0, 0, 100, 100))])
    record = {"attn": np.full((1, 1, 1, 20), 0.05), "meta": {"layout": layout.to_dict()}}
    view = analysis_record(record)
    canvas = Layout.from_meta(view["meta"]).one_map
    assert canvas.grid == (4, 4) and canvas.box == (0.0, 0.0, 100.0, 100.0)
    assert "grid" not in view["meta"] and "geometry" not in view["meta"]
    np.testing.assert_allclose(view["attn"].sum(), 1.0)
    assert analysis_record(view) is view                 # a view is its own view: passing it on costs nothing


def test_cell_boxes_scale_x_and_y_separately():
    boxes = cell_boxes(Layout.single("stretch", (300, 100), (2, 3), (0, 0, 300, 100)).maps[0])
    np.testing.assert_allclose(boxes[4], [100, 50, 200, 100])
