"""bbox.py as a specification (method.md §5): heads → map → mask at image resolution → box on the
ORIGINAL image, through the recorded one-map layout (pad or crop), never stretched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage

from localization_heads.bbox import box_from_mask, combine_heads, localize, mask_from_heat, smooth
from localization_heads.evaluate import iou_xyxy
from localization_heads.config import LogicSettings
from localization_heads.families.llava import compute_geometry

CONF = Path(__file__).resolve().parents[1] / "localization_heads" / "conf" / "logic"
IMAGE = (300, 200)                 # W, H: landscape, like most of RefCOCO
GRID = (12, 12)
L, H = 2, 2
HEAD = (1, 0)


def logic(name="paper", **overrides) -> LogicSettings:
    """conf/logic/<name>.yaml with `overrides` (dotted keys), as the settings the method takes."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return LogicSettings.from_config(cfg)


def attention(*blobs, head=HEAD, background=1e-3):
    """attn [L, H, 1, V]: `head` gets value v on cells rows r0..r1−1 × cols c0..c1−1 for each
    (r0, r1, c0, c1, v); every other head holds a blob elsewhere that must be ignored."""
    maps = np.full((L, H) + GRID, background)
    for r0, r1, c0, c1, v in blobs:
        maps[head][r0:r1, c0:c1] = v
    maps[0, 1][8:10, 9:11] = 5.0                       # a strong decoy in an unselected head
    return torch.tensor(maps.reshape(L, H, 1, -1), dtype=torch.float32)


def cells_rect(layout, r0, r1, c0, c1):
    """Original-pixel rectangle of grid cells rows r0..r1−1 × cols c0..c1−1 (by the map's box)."""
    x0, y0, x1, y1 = layout.one_map.box
    rows, cols = layout.one_map.grid
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    return [x0 + c0 * cw, y0 + r0 * ch, x0 + c1 * cw, y0 + r1 * ch]


PAD = compute_geometry(IMAGE, GRID, pad=True)          # grid box [0, −50, 300, 250], cells 25 px
CROP = compute_geometry(IMAGE, GRID, pad=False, shortest_edge=336, crop_size=(336, 336))  # [50, 0, 250, 200]


def test_geometries_used_here():
    assert PAD.one_map.box == (0.0, -50.0, 300.0, 250.0)
    assert CROP.one_map.box == pytest.approx((50.0, 0.0, 250.0, 200.0))


# --- end to end: the box lands on the right original pixels ------------------------------------

@pytest.mark.parametrize("geometry, cells, expected", [
    # pad: rows 4–7 × cols 3–7 → x 75…200, y −50+100 = 50 … −50+200 = 150
    (PAD, (4, 8, 3, 8), [75.0, 50.0, 200.0, 150.0]),
    # crop: cells 200/12 px; rows 3–8 × cols 4–8 → x 50+66.7 … 50+150, y 50 … 150
    (CROP, (3, 9, 4, 9), [50 + 4 * 200 / 12, 50.0, 200.0, 150.0]),
])
@pytest.mark.parametrize("mask_method", ["largest_hull", "mean_relu"])
def test_box_lands_on_the_planted_cells(geometry, cells, expected, mask_method):
    """A blob on known grid cells gives a box on those cells' original pixels (IoU ≥ 0.7),
    for pad and crop geometry. σ = 0 isolates the geometry from the smoothing."""
    assert cells_rect(geometry, *cells) == pytest.approx(expected)
    attn = attention((*cells, 1.0))
    out = localize(attn, geometry, [HEAD], logic(**{"smoothing.sigma": 0.0, "mask.method": mask_method}))
    assert out["grid_map"].shape == GRID
    assert out["mask"].shape == out["heat"].shape == (IMAGE[1], IMAGE[0])     # (H, W)
    assert out["mask"].dtype == bool
    assert iou_xyxy(out["bbox_xyxy"], expected) >= 0.7, out["bbox_xyxy"]
    # the box is centred on the cells: bilinear spill is symmetric
    bx0, by0, bx1, by1 = out["bbox_xyxy"]
    assert abs((bx0 + bx1) / 2 - (expected[0] + expected[2]) / 2) <= 2
    assert abs((by0 + by1) / 2 - (expected[1] + expected[3]) / 2) <= 2


def test_stretching_the_grid_over_the_image_would_miss():
    """The reference code's stretch (grid over W×H, ignoring the pad) puts an off-centre blob in
    the wrong place: rows 2–5 are y 0…100 under pad but y 33…100 stretched."""
    stretched = compute_geometry(IMAGE, GRID, pad=False)           # grid box = the image
    attn = attention((2, 6, 3, 8, 1.0))
    cfg = logic(**{"smoothing.sigma": 0.0})
    truth = cells_rect(PAD, 2, 6, 3, 8)
    assert truth == [75.0, 0.0, 200.0, 100.0]
    right = localize(attn, PAD, [HEAD], cfg)["bbox_xyxy"]
    wrong = localize(attn, stretched, [HEAD], cfg)["bbox_xyxy"]
    assert iou_xyxy(right, truth) >= 0.7 > iou_xyxy(wrong, truth), (right, wrong)


def test_smoothing_keeps_the_box_centred_on_the_cells():
    """With the paper's σ = 1 the box grows but stays centred on the planted cells."""
    out = localize(attention((4, 8, 3, 8, 1.0)), PAD, [HEAD], logic())
    bx0, by0, bx1, by1 = out["bbox_xyxy"]
    assert abs((bx0 + bx1) / 2 - 137.5) <= 3 and abs((by0 + by1) / 2 - 100.0) <= 3
    assert iou_xyxy(out["bbox_xyxy"], [75.0, 50.0, 200.0, 150.0]) >= 0.4


def test_padding_never_reaches_the_mask():
    """Attention on the padding rows (0 above, 11 below: y < 0 and y ≥ 200) neither appears in the
    mask nor raises the foreground threshold: the mean is over image pixels only."""
    attn = attention((0, 1, 0, 12, 50.0), (11, 12, 0, 12, 50.0), (4, 8, 3, 8, 1.0))
    for method in ("largest_hull", "mean_relu"):
        out = localize(attn, PAD, [HEAD], logic(**{"smoothing.sigma": 0.0, "mask.method": method}))
        assert out["mask"].shape == (200, 300)
        assert iou_xyxy(out["bbox_xyxy"], [75.0, 50.0, 200.0, 150.0]) >= 0.7, out["bbox_xyxy"]
        assert not out["mask"][0].any() and not out["mask"][-1].any()


def test_only_the_selected_heads_are_combined():
    """M = Σ over the selected heads; the decoy in head (0, 1) only counts when it is selected."""
    attn = attention((4, 8, 3, 8, 1.0))
    only = combine_heads(attn, GRID, [HEAD], sigma=0.0)
    both = combine_heads(attn, GRID, [HEAD, (0, 1)], sigma=0.0)
    np.testing.assert_allclose(only, attn[1, 0, 0].double().numpy().reshape(GRID))
    np.testing.assert_allclose(both - only, attn[0, 1, 0].double().numpy().reshape(GRID))


# --- smoothing ----------------------------------------------------------------------------------

def impulse(row, col):
    m = np.zeros(GRID)
    m[row, col] = 1.0
    return m


@pytest.mark.parametrize("name, radius", [("paper", 3), ("selection_v1", 4)])
def test_kernel_size_follows_truncate(name, radius):
    """paper: truncate 3 → the 7×7 kernel; selection_v1: scipy's default truncate 4 → 9×9."""
    cfg = logic(name)
    out = smooth(impulse(5, 5), float(cfg.smoothing.sigma), str(cfg.smoothing.mode), float(cfg.smoothing.truncate))
    rows, cols = np.nonzero(out)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5 - radius, 5 + radius, 5 - radius, 5 + radius)


def test_reflect_boundary_keeps_the_mass_of_an_edge_cell():
    """reflect (both logics: the reference's scipy default) folds what leaves the grid back at the
    edge it left: an impulse in a corner keeps its mass; "nearest" piles it onto the edge cell."""
    corner = impulse(0, 0)
    assert smooth(corner, 1.0, "reflect", 4.0).sum() == pytest.approx(1.0, abs=1e-12)
    nearest = smooth(corner, 1.0, "nearest", 4.0)
    assert nearest.sum() != pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(smooth(corner, 1.0), ndimage.gaussian_filter(corner, 1.0))   # scipy defaults


def test_localize_smooths_with_the_configured_mode_and_truncate():
    """The logic's smoothing.mode / truncate reach the combined map."""
    attn = attention((0, 2, 0, 2, 1.0))
    for mode, truncate in (("reflect", 3.0), ("nearest", 4.0), ("constant", 3.0)):
        out = localize(attn, PAD, [HEAD], logic(**{"smoothing.mode": mode, "smoothing.truncate": truncate}))
        np.testing.assert_array_equal(out["grid_map"], combine_heads(attn, GRID, [HEAD], 1.0, mode=mode,
                                                                     truncate=truncate))
    assert not np.array_equal(localize(attn, PAD, [HEAD], logic())["grid_map"],
                              localize(attn, PAD, [HEAD], logic(**{"smoothing.mode": "nearest"}))["grid_map"])


def test_no_heads_give_a_flat_map_and_no_box():
    """An empty head list (logic.threshold.min_keep=0 and nothing passing) is still an answer: no box."""
    out = localize(attention((4, 8, 3, 8, 1.0)), PAD, [], logic())
    assert not out["grid_map"].any() and out["bbox_xyxy"] is None and not out["mask"].any()


# --- mask methods -------------------------------------------------------------------------------

def test_largest_hull_keeps_one_region_mean_relu_keeps_all():
    """Two separated blobs: largest_hull's box covers only the larger, mean_relu's covers both."""
    big, small = (3, 6, 1, 5), (7, 9, 8, 10)              # 3×4 cells and 2×2 cells, 2+ cells apart
    attn = attention((*big, 1.0), (*small, 1.0))
    big_rect, small_rect = cells_rect(PAD, *big), cells_rect(PAD, *small)
    hull = localize(attn, PAD, [HEAD], logic(**{"smoothing.sigma": 0.0, "mask.method": "largest_hull"}))
    every = localize(attn, PAD, [HEAD], logic(**{"smoothing.sigma": 0.0, "mask.method": "mean_relu"}))
    assert iou_xyxy(hull["bbox_xyxy"], big_rect) >= 0.7
    assert iou_xyxy(hull["bbox_xyxy"], small_rect) == 0.0
    ex0, ey0, ex1, ey1 = every["bbox_xyxy"]
    for x0, y0, x1, y1 in (big_rect, small_rect):
        assert ex0 <= x0 and ey0 <= y0 and ex1 >= x1 and ey1 >= y1


def l_shape(size=20):
    """An L: a vertical bar x 2–4, y 2–11, and a foot x 2–11, y 9–11 (pixel indices)."""
    m = np.zeros((size, size), dtype=bool)
    m[2:12, 2:5] = True
    m[9:12, 2:12] = True
    return m


def test_convex_hull_fills_the_concavity_of_an_l():
    """largest_hull fills the L's inner corner; mean_relu keeps the L as it is."""
    shape = l_shape()
    heat = shape.astype(float)
    hull = mask_from_heat(heat, "largest_hull")
    assert (hull >= shape).all()                         # the component itself is kept
    assert hull[7, 6] and hull[8, 8]                     # inside the hull, outside the L
    assert not hull[4, 10] and not hull[0, 0]            # beyond the hypotenuse / the shape
    assert (mask_from_heat(heat, "mean_relu") == shape).all()


def test_thin_component_survives_the_hull():
    """A one-pixel-wide line (collinear points) is kept as it is."""
    heat = np.zeros((10, 10))
    heat[4, 2:8] = 1.0
    mask = mask_from_heat(heat, "largest_hull")
    assert (mask == (heat > 0)).all()
    assert box_from_mask(mask) == [2.0, 4.0, 8.0, 5.0]


def test_unknown_mask_method_is_refused():
    with pytest.raises(ValueError):
        mask_from_heat(np.ones((3, 3)), "bogus")


# --- box convention -----------------------------------------------------------------------------

def test_box_is_half_open():
    """A one-pixel mask at (u, v) = (x 7, y 3) is [7, 3, 8, 4]: x0 ≤ x < x1, y0 ≤ y < y1."""
    mask = np.zeros((10, 12), dtype=bool)
    mask[3, 7] = True
    assert box_from_mask(mask) == [7.0, 3.0, 8.0, 4.0]
    mask[5, 9] = True
    assert box_from_mask(mask) == [7.0, 3.0, 10.0, 6.0]


def test_empty_mask_has_no_box():
    """No foreground → None (counted as a miss by evaluate, never dropped)."""
    assert box_from_mask(np.zeros((4, 4), dtype=bool)) is None


def test_no_attention_gives_no_box():
    """A map with nothing above its mean (all zero) → empty mask, bbox None, for both methods."""
    attn = torch.zeros((L, H, 1, GRID[0] * GRID[1]))
    for method in ("largest_hull", "mean_relu"):
        out = localize(attn, PAD, [HEAD], logic(**{"mask.method": method}))
        assert out["bbox_xyxy"] is None and not out["mask"].any()
