"""The LLaVA-1.5 layout (families/llava.py compute_geometry) as a specification: where the visual-token grid lies on the ORIGINAL image
(method.md §2, §5.2), by hand and against the real Hugging Face LLaVA image processor."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from localization_heads.layout import Layout
from localization_heads.families.llava import compute_geometry, expand2square, geometry_from_image_processor

# --- by hand ------------------------------------------------------------------------------------

def test_pad_landscape_grid_spans_the_padded_square():
    """pad: a W×H image is centred on an S×S square, S = max(W, H); the grid spans that square,
    so a 200×100 image's grid box is [0, −50, 200, 150]."""
    g = compute_geometry((200, 100), (24, 24), pad=True)
    assert g.method == "pad"
    assert g.one_map.box == (0.0, -50.0, 200.0, 150.0)
    assert g.image_size == (200, 100) and g.one_map.grid == (24, 24)


def test_pad_portrait_and_odd_difference():
    """Portrait pads left/right; an odd difference puts the extra padding row last (offset floors)."""
    assert compute_geometry((100, 200), (24, 24), pad=True).one_map.box == (-50.0, 0.0, 150.0, 200.0)
    # 201×100: S = 201, top offset (201 − 100) // 2 = 50 → rows −50 … 151
    assert compute_geometry((201, 100), (24, 24), pad=True).one_map.box == (0.0, -50.0, 201.0, 151.0)


def test_pad_of_a_square_image_changes_nothing():
    assert compute_geometry((336, 336), (24, 24), pad=True).one_map.box == (0.0, 0.0, 336.0, 336.0)


def test_crop_shortest_edge_then_centre_crop():
    """crop (llava-hf default): 640×480 → shortest edge 336 → 448×336 → centre crop 336×336
    (left 56). 56 resized px = 80 original px, 336 resized px = 480 original px → [80, 0, 560, 480]."""
    g = compute_geometry((640, 480), (24, 24), pad=False, shortest_edge=336, crop_size=(336, 336))
    assert g.method == "crop"
    assert g.one_map.box == pytest.approx((80.0, 0.0, 560.0, 480.0))


def test_crop_portrait():
    """480×640 → 336×448 → crop top 56 → [0, 80, 480, 560]."""
    g = compute_geometry((480, 640), (24, 24), pad=False, shortest_edge=336, crop_size=(336, 336))
    assert g.one_map.box == pytest.approx((0.0, 80.0, 480.0, 560.0))


def test_crop_uses_truncated_long_side():
    """The resized long side is int(short·long/short) (truncated), as in transformers: 300×200 →
    int(336·1.5) = 504 × 336, left (504 − 336)//2 = 84, scale 300/504 → [50, 0, 250, 200];
    130 tall × 77 wide at 56 → 56 × int(94.5) = 94, top 19, scale 130/94."""
    g = compute_geometry((300, 200), (24, 24), pad=False, shortest_edge=336, crop_size=(336, 336))
    assert g.one_map.box == pytest.approx((50.0, 0.0, 250.0, 200.0))
    g = compute_geometry((77, 130), (4, 4), pad=False, shortest_edge=56, crop_size=(56, 56))
    assert g.one_map.box == pytest.approx((0.0, 19 * 130 / 94, 77.0, 75 * 130 / 94))


def test_pad_then_shortest_edge_resize_is_just_pad():
    """After pad the canvas is square, so shortest-edge resize + same-size crop removes nothing."""
    g = compute_geometry((640, 480), (24, 24), pad=True, shortest_edge=336, crop_size=(336, 336))
    assert g.method == "pad"
    assert g.one_map.box == pytest.approx((0.0, -80.0, 640.0, 560.0))


def test_plain_resize_spans_the_whole_image():
    """resize (no pad, no crop): the grid is stretched over the full W×H."""
    g = compute_geometry((640, 480), (24, 24), pad=False)
    assert g.method == "resize"
    assert g.one_map.box == (0.0, 0.0, 640.0, 480.0)


def test_layout_round_trips_through_json():
    """to_dict is plain JSON; from_dict restores an equal Layout (tuples, floats)."""
    g = compute_geometry((200, 100), (6, 8), pad=True)
    d = json.loads(json.dumps(g.to_dict()))
    assert d == {"method": "pad", "image_size": [200, 100],
                 "maps": [{"name": "grid", "grid": [6, 8], "box": [0.0, -50.0, 200.0, 150.0], "start": 0}]}
    assert Layout.from_dict(d) == g


def test_files_of_the_one_grid_format_still_load_their_layout():
    """Attention files written before layouts carry `geometry` (+ `grid`): read as the same one-map layout."""
    old = {"grid": [6, 8], "geometry": {"method": "pad", "image_size": [200, 100], "grid": [6, 8],
                                        "grid_box": [0.0, -50.0, 200.0, 150.0]}}
    assert Layout.from_meta(old) == compute_geometry((200, 100), (6, 8), pad=True)


def test_expand2square_centres_the_image_on_the_fill_colour():
    """Original LLaVA pad: the image is pasted at ((S−W)//2, (S−H)//2) on a fill-coloured square."""
    img = Image.new("RGB", (20, 11), (255, 0, 0))
    sq = np.asarray(expand2square(img, (122, 116, 104)))
    assert sq.shape == (20, 20, 3)
    red = np.all(sq == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (4, 15, 0, 20)
    assert (sq[0, 0] == (122, 116, 104)).all() and (sq[-1, -1] == (122, 116, 104)).all()


# --- against the real Hugging Face processor ----------------------------------------------------

GREY = (122, 116, 104)                  # the pad colour: int(CLIP mean · 255), so no edges but the marker
MARK = 4                                # the marker is MARK × MARK white pixels


def processor(style: str):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    common = dict(do_rescale=False, do_normalize=False)
    if style == "pad":
        return LlavaImageProcessorPil(do_pad=True, size={"height": 112, "width": 112},
                                      do_center_crop=False, **common)
    return LlavaImageProcessorPil(do_pad=False, size={"shortest_edge": 56},
                                  crop_size={"height": 56, "width": 56}, do_center_crop=True, **common)


def marker_centre_in_processed(proc, image) -> tuple[float, float, int, int]:
    """(x, y) of the marker's centroid in continuous processed-pixel coordinates, and (W, H)."""
    pv = np.asarray(proc(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float64)
    _, h, w = pv.shape                                          # (3, H, W)
    weight = np.clip(pv[0] - 180.0, 0, None)                    # white marker, grey elsewhere
    assert weight.sum() > 0, "marker not found"
    ys, xs = np.mgrid[0:h, 0:w]
    cx = (weight * (xs + 0.5)).sum() / weight.sum()             # pixel i covers [i, i+1)
    cy = (weight * (ys + 0.5)).sum() / weight.sum()
    return cx, cy, w, h


@pytest.mark.parametrize("style, size, marker", [
    ("pad", (160, 96), (40, 70)),      # landscape, marker in the lower half
    ("pad", (90, 150), (60, 20)),      # portrait
    ("crop", (120, 80), (50, 30)),     # landscape: 84×56 → crop left 14
    ("crop", (77, 130), (30, 60)),     # portrait, long side truncated: 56×94 → crop top 19
])
def test_processor_geometry_maps_a_marker_back_to_its_pixel(style, size, marker):
    """Where the processor put a marker, mapped back through geometry_from_image_processor, is
    where the marker was in the original image (within one original pixel)."""
    proc = processor(style)
    image = Image.new("RGB", size, GREY)
    mx, my = marker
    image.paste((255, 255, 255), (mx, my, mx + MARK, my + MARK))
    cx, cy, w, h = marker_centre_in_processed(proc, image)

    geometry = geometry_from_image_processor(proc, size, (w // 4, h // 4), pad=(style == "pad"))
    x0, y0, x1, y1 = geometry.one_map.box
    ox = x0 + cx * (x1 - x0) / w                   # the grid box spans the whole processed input
    oy = y0 + cy * (y1 - y0) / h
    assert abs(ox - (mx + MARK / 2)) <= 1.0 and abs(oy - (my + MARK / 2)) <= 1.0, (ox, oy)
    assert geometry.method == {"pad": "pad", "crop": "crop"}[style]


def test_processor_geometry_of_crop_style_matches_compute_geometry():
    """llava-hf style settings give exactly compute_geometry(shortest_edge, crop_size)."""
    g = geometry_from_image_processor(processor("crop"), (120, 80), (14, 14), pad=False)
    assert g == compute_geometry((120, 80), (14, 14), pad=False, shortest_edge=56, crop_size=(56, 56))
    assert g.one_map.box == pytest.approx((20.0, 0.0, 100.0, 80.0))


def test_processor_with_resize_then_a_different_crop_is_refused():
    """Resize to height×width then crop something else is not a supported preprocessing."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    proc = LlavaImageProcessorPil(size={"height": 64, "width": 64}, crop_size={"height": 56, "width": 56},
                                  do_center_crop=True)
    with pytest.raises(ValueError):
        geometry_from_image_processor(proc, (120, 80), (14, 14), pad=False)
