"""Where an image's tokens lie on the ORIGINAL image: a layout of one or more token maps.

A model turns one image into one or more maps of visual tokens: a single raster (LLaVA-1.5, Qwen-VL,
PaliGemma), a base view plus a high-resolution view (LLaVA-NeXT / OneVision), tiles plus a thumbnail
(InternVL, Idefics3), pooled views and pan-and-scan crops (Gemma 3). Each map is a uniform grid
(rows, cols) laid over an axis-aligned rectangle of original-image pixel coordinates, `box` =
[x0, y0, x1, y1] (continuous; it extends past the image where the model saw padding). Cell (r, c)
covers x in [x0 + c·(x1−x0)/cols, x0 + (c+1)·(x1−x0)/cols), likewise y, so x and y scale separately.

The attention file stores [L, H, 1, V] over the CELL tokens only, map after map, each map's cells in
row-major order starting at `start`; separator, newline and break tokens are not cells and are not
stored (their attention is still part of the softmax, which is never renormalised).

Analysis needs one map per head. `analysis_view` gives it:
- one map: that map, exactly as captured (padding cells included) — nothing is resampled;
- several maps: a canvas over the original image [0, 0, W, H] whose cell is the finest map's cell
  (per axis, at most `MAX_CANVAS_SIDE` cells a side). Every token's attention is spread uniformly
  over the image area its cell covers and added into the canvas cells it overlaps (mass-conserving:
  canvas cell = Σ_tokens a_t · |cell_t ∩ canvas cell| / |cell_t|). Views that overlap (a thumbnail
  over its tiles, a base view under a high-resolution view) add up: the canvas shows how much
  attention the query pays to each part of the image over all views. Mass on padding (outside the
  image) is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

MAX_CANVAS_SIDE = 64


@dataclass(frozen=True)
class TokenMap:
    """One uniform grid of visual tokens and the original-image rectangle it spans."""

    name: str                                    # "grid", "base", "highres", "tile_0_1", "thumbnail", ...
    grid: tuple[int, int]                        # (rows, cols)
    box: tuple[float, float, float, float]       # [x0, y0, x1, y1], original-image pixels
    start: int                                   # index of cell (0, 0) on the stored V axis

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Layout:
    """All token maps of one image; V = Σ map sizes."""

    method: str                                  # how the image became tokens, e.g. "pad", "smart_resize", "anyres"
    image_size: tuple[int, int]                  # original (W, H)
    maps: tuple[TokenMap, ...]

    def __post_init__(self):
        expected = 0
        for m in self.maps:
            if m.start != expected or m.grid[0] <= 0 or m.grid[1] <= 0:
                raise ValueError(f"layout maps must be non-empty and consecutive on the token axis: {self.maps}")
            expected += m.size

    @property
    def num_tokens(self) -> int:
        return sum(m.size for m in self.maps)

    @property
    def one_map(self) -> TokenMap:
        """The map of a one-map layout (what the criteria, the box step and the figures run on;
        analysis_view makes one of any layout)."""
        if len(self.maps) != 1:
            raise ValueError(f"a layout of {len(self.maps)} maps has no single grid; use analysis_view")
        return self.maps[0]

    @classmethod
    def single(cls, method: str, image_size: tuple[int, int], grid: tuple[int, int],
               box: tuple[float, float, float, float], name: str = "grid") -> "Layout":
        return cls.stack(method, image_size, [(name, grid, box)])

    @classmethod
    def stack(cls, method: str, image_size: tuple[int, int],
              maps: list[tuple[str, tuple[int, int], tuple[float, float, float, float]]]) -> "Layout":
        """Maps (name, grid, box) in token order; the start offsets follow from the sizes."""
        out, start = [], 0
        for name, grid, box in maps:
            out.append(TokenMap(name, (int(grid[0]), int(grid[1])), tuple(float(v) for v in box), start))
            start += int(grid[0]) * int(grid[1])
        return cls(method, (int(image_size[0]), int(image_size[1])), tuple(out))

    def to_dict(self) -> dict:
        return {"method": self.method, "image_size": list(self.image_size),
                "maps": [{"name": m.name, "grid": list(m.grid), "box": list(m.box), "start": m.start} for m in self.maps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(str(d["method"]), tuple(int(v) for v in d["image_size"]),
                   tuple(TokenMap(str(m["name"]), tuple(int(v) for v in m["grid"]), tuple(float(v) for v in m["box"]),
                                  int(m["start"])) for m in d["maps"]))

    @classmethod
    def from_meta(cls, meta: dict) -> "Layout":
        """The layout of an attention file's meta. Files written before layouts existed carry one
        grid and its `geometry` ({method, image_size, grid, grid_box}) instead: this is the one
        place that old form is read."""
        if "layout" in meta:
            return cls.from_dict(meta["layout"])
        g = meta["geometry"]
        return cls.single(str(g["method"]), tuple(g["image_size"]), tuple(g["grid"]), tuple(g["grid_box"]))


def canvas_shape(layout: Layout) -> tuple[int, int]:
    """(rows, cols) of the canvas over [0, 0, W, H]: the finest map's cell size per axis."""
    width, height = layout.image_size
    cell_w = min((m.box[2] - m.box[0]) / m.grid[1] for m in layout.maps)
    cell_h = min((m.box[3] - m.box[1]) / m.grid[0] for m in layout.maps)
    rows = min(MAX_CANVAS_SIDE, max(1, round(height / cell_h)))
    cols = min(MAX_CANVAS_SIDE, max(1, round(width / cell_w)))
    return rows, cols


def _overlap_1d(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[n, k] length of [starts[i], ends[i]) ∩ [edges[j], edges[j+1])."""
    lo = np.maximum(starts[:, None], edges[None, :-1])
    hi = np.minimum(ends[:, None], edges[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def splat_matrix(layout: Layout, shape: tuple[int, int]) -> sparse.csr_matrix:
    """Sparse [V, rows·cols] float64: canvas = attn_row @ M (see module docstring). Sparse because a
    cell overlaps a handful of canvas cells: a dense matrix for a OneVision image is ~150 MB."""
    width, height = layout.image_size
    rows, cols = shape
    x_edges = np.linspace(0.0, width, cols + 1)
    y_edges = np.linspace(0.0, height, rows + 1)
    blocks = []
    for m in layout.maps:
        mr, mc = m.grid
        x0, y0, x1, y1 = m.box
        cw, ch = (x1 - x0) / mc, (y1 - y0) / mr
        cx = x0 + cw * np.arange(mc)
        cy = y0 + ch * np.arange(mr)
        ox = _overlap_1d(cx, cx + cw, x_edges) / cw          # [mc, cols] fraction of the cell's width
        oy = _overlap_1d(cy, cy + ch, y_edges) / ch          # [mr, rows]
        # cell (r, c) → canvas (i, j): oy[r, i] · ox[c, j], i.e. the Kronecker product
        blocks.append(sparse.kron(sparse.csr_matrix(oy), sparse.csr_matrix(ox), format="csr"))
    return sparse.vstack(blocks, format="csr")


def analysis_view(attn, layout: Layout) -> tuple[np.ndarray, Layout]:
    """attn [L, H, 1, V] over the layout's cells → ([L, H, 1, rows·cols] float64, a one-map layout)
    on which the criteria and the box step run. One map: returned as is (cast to float64)."""
    arr = np.asarray(attn.detach().cpu().numpy() if hasattr(attn, "detach") else attn, dtype=np.float64)
    if arr.shape[-1] != layout.num_tokens:
        raise ValueError(f"attention has V={arr.shape[-1]} tokens, the layout {layout.num_tokens}")
    if len(layout.maps) == 1:
        return arr, layout
    shape = canvas_shape(layout)
    rows_2d = arr.reshape(-1, arr.shape[-1])                                        # [L·H, V]
    canvas = np.asarray(splat_matrix(layout, shape).T @ rows_2d.T).T.reshape(*arr.shape[:-1], -1)   # [L, H, 1, rows·cols]
    width, height = layout.image_size
    return canvas, Layout.single(f"canvas({layout.method})", layout.image_size, shape, (0.0, 0.0, float(width), float(height)),
                                 name="canvas")


def cell_boxes(token_map: TokenMap) -> np.ndarray:
    """[rows·cols, 4] original-pixel box of every cell, row-major (for tests and figures)."""
    rows, cols = token_map.grid
    x0, y0, x1, y1 = token_map.box
    xs = x0 + (x1 - x0) / cols * np.arange(cols + 1)
    ys = y0 + (y1 - y0) / rows * np.arange(rows + 1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def analysis_record(record: dict) -> dict:
    """An attention record {"attn", "meta"} as the analysis sees it: one map, its `layout` in the
    meta (analysis_view). One-map records, views included, come back unchanged, so a caller may pass
    the view on and the callee's call costs nothing."""
    layout = Layout.from_meta(record["meta"])
    if len(layout.maps) == 1:
        return record
    attn, view = analysis_view(record["attn"], layout)
    return {"attn": attn, "meta": dict(record["meta"], layout=view.to_dict())}

