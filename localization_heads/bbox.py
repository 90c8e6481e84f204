"""From selected heads to a heat map, a mask and a box on the ORIGINAL image (method.md §5).

1. M = Σ_heads GaussianSmooth(A_head, σ; boundary mode, truncate)    grid (rows, cols)
2. M is resampled at every original pixel's centre through the recorded one-map layout (the grid
   spans the map's `box`, e.g. the padded square), so padding never reaches the image and
   non-square images are not stretched                                 [H, W]
3. foreground = M > mean(M), the mean over image pixels the model saw (not padding, not cropped);
   or M > max(M)/2 with logic.mask.threshold=half_max
4. "largest_hull" (paper): largest 8-connected region, filled to its convex hull;
   "mean_relu" (reference code): every foreground pixel
5. box = tight box of the mask, xyxy in pixels, half-open/continuous: [x0, y0, x1, y1] covers
   x0 ≤ x < x1, so a one-pixel mask at (u, v) is [u, v, u+1, v+1] (evaluate.py uses the same).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from localization_heads.analyze import head_maps, head_row, model_layers
from localization_heads.layout import Layout

_EIGHT = np.ones((3, 3), dtype=bool)
MASK_METHODS = ("largest_hull", "mean_relu")
THRESHOLDS = ("mean", "half_max")


def smooth(grid_map: np.ndarray, sigma: float, mode: str = "reflect", truncate: float = 4.0) -> np.ndarray:
    """Gaussian smoothing on the grid, scipy's gaussian_filter. The defaults are scipy's, which the
    reference code uses (a 9×9 kernel at σ = 1); truncate 3 gives the paper's 7×7 kernel."""
    return ndimage.gaussian_filter(grid_map, sigma, mode=mode, truncate=truncate) if sigma > 0 else grid_map


def combine_heads(attn, grid: tuple[int, int], heads: list[tuple[int, int]], sigma: float, *,
                  mode: str = "reflect", truncate: float = 4.0, layers=None) -> np.ndarray:
    """Sum of the smoothed maps of heads [(model layer, head), ...] → grid (rows, cols), float64.
    layers: meta["layers"] (None: 0..L−1). No heads → all zeros (a flat map: no mask, no box)."""
    maps = head_maps(attn, grid)                                      # [L·H, rows, cols]
    layers = model_layers(layers, attn.shape[0])
    combined = np.zeros(grid, dtype=np.float64)
    for layer, head in heads:
        combined += smooth(maps[head_row(layers, attn.shape[1], layer, head)], sigma, mode, truncate)
    return combined


def _axis_weights(pixels: int, start: float, end: float, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation weights [pixels, cells] of every pixel centre along one axis (past the
    first and last cell centres the edge cell's value holds), and [pixels] bool: the centre lies on
    the grid."""
    g = ((np.arange(pixels) + 0.5) - start) / ((end - start) / cells) - 0.5     # pixel centre → grid coordinate
    on_grid = np.abs(g + 0.5 - cells / 2) <= cells / 2
    g = np.clip(g, 0.0, cells - 1.0)
    lo = np.floor(g).astype(np.int64)
    hi = np.minimum(lo + 1, cells - 1)
    frac = g - lo
    weights = np.zeros((pixels, cells))
    np.add.at(weights, (np.arange(pixels), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(pixels), hi), frac)
    return weights, on_grid


def grid_to_image(grid_map: np.ndarray, layout: Layout) -> np.ndarray:
    """Bilinear resample of a grid map at the centre of every original pixel → [H, W]; NaN where
    the model never saw the pixel (cropped away). Bilinear is separable, so it is two small matrix
    products (rows then columns) and the only full-size array is the result: a 10,000² image needs
    its 800 MB heat map, not a coordinate grid per axis besides."""
    rows, cols = grid_map.shape
    width, height = layout.image_size
    x0, y0, x1, y1 = layout.one_map.box
    wy, seen_y = _axis_weights(height, y0, y1, rows)                 # [H, rows]
    wx, seen_x = _axis_weights(width, x0, x1, cols)                  # [W, cols]
    heat = (wy @ np.asarray(grid_map, dtype=np.float64)) @ wx.T       # [H, W]
    heat[~seen_y, :] = np.nan
    heat[:, ~seen_x] = np.nan
    return heat


def _convex_fill(component: np.ndarray) -> np.ndarray:
    """The component filled to the convex hull of its pixel centres."""
    ys, xs = np.nonzero(component)
    points = np.stack([xs, ys], axis=1)
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # fewer than 3 points or collinear: already convex
        return component
    canvas = Image.new("1", (component.shape[1], component.shape[0]), 0)
    # PIL puts pixel (u, v)'s centre at integer (u, v): the hull's vertices are pixel indices.
    ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in hull], fill=1)
    return np.asarray(canvas, dtype=bool) | component


def mask_from_heat(heat: np.ndarray, method: str = "largest_hull", threshold: str = "mean") -> np.ndarray:
    """Binary mask [H, W] from an image-resolution heat map (NaN = unseen, never foreground).

    threshold "mean" (paper, reference code) keeps everything above the average, which on a sharp
    map with little background also keeps the smoothing halo; "half_max" keeps what is above half
    the peak (the full width at half maximum)."""
    if method not in MASK_METHODS:
        raise ValueError(f"logic.mask.method={method!r} is unknown; use one of {MASK_METHODS}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"logic.mask.threshold={threshold!r} is unknown; use one of {THRESHOLDS}")
    peak, floor = np.nanmax(heat), np.nanmin(heat)
    if peak - floor <= 1e-9 * max(abs(peak), 1e-30):   # a flat map localizes nothing (rounding is no signal)
        return np.zeros(heat.shape, dtype=bool)
    level = np.nanmean(heat) if threshold == "mean" else 0.5 * peak
    foreground = heat > level
    if method == "mean_relu" or not foreground.any():
        return foreground
    labels, num = ndimage.label(foreground, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())[1:]
    return _convex_fill(labels == (int(np.argmax(sizes)) + 1)) & ~np.isnan(heat)


def box_from_mask(mask: np.ndarray) -> list[float] | None:
    """Tight half-open box [x0, y0, x1, y1] of a mask, None if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def locate(grid_map: np.ndarray, layout: Layout, mask_settings) -> dict:
    """Steps 2–5 for a combined grid map (rows, cols) of a one-map layout: {"grid_map", "heat",
    "mask", "bbox_xyxy"}. mask_settings: logic.mask (config.MaskSettings: method, threshold)."""
    heat = grid_to_image(grid_map, layout)
    mask = mask_from_heat(heat, mask_settings.method, mask_settings.threshold)
    return {"grid_map": grid_map, "heat": heat, "mask": mask, "bbox_xyxy": box_from_mask(mask)}


def localize(attn, layout: Layout, heads: list[tuple[int, int]], logic, layers: list[int] | None = None) -> dict:
    """Heads [(layer, head), ...] of attn [L, H, 1, V] over a one-map layout → heat map, mask and
    box (see locate). logic: config.LogicSettings (smoothing, mask); layers: the model index of each
    row of L (meta["layers"]; None: 0..L−1)."""
    smoothing = logic.smoothing
    grid_map = combine_heads(attn, layout.one_map.grid, heads, smoothing.sigma, mode=smoothing.mode,
                             truncate=smoothing.truncate, layers=layers)
    return locate(grid_map, layout, logic.mask)
