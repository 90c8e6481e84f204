"""Figures: `<id>_top{K}.png` (the image with the predicted and ground-truth boxes, the combined
heat map, the mask, and each head's map raw on the grid and on the image), the report's
thumbnails, and the binary mask PNG.

Every panel is drawn in original-image pixel coordinates, so the raw grid maps line up with the
image panels: a grid map is placed on its map's `box` (the rectangle the grid spans, from the
record's one-map layout), the image outline is dashed on it, and padding (grid cells over no
image) is greyed out; with a centre crop the image panels mark the part the model saw.

Figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas: pyplot's global state and
backend are never touched, so importing this module changes nothing in a notebook.
"""
from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw

from localization_heads.analyze import head_maps, head_row, model_layers
from localization_heads.bbox import grid_to_image
from localization_heads.evaluate import iou_xyxy
from localization_heads.layout import Layout

PRED, GT, VIEW = "#00e000", "#ff2a2a", "magenta"   # predicted box, ground-truth box, the model's view (crop)
OUTLINE = "white"                                  # the image's outline on the raw grid maps
HEAT = "jet"
FONT = 10
DPI = 100


def as_box(value) -> list[float] | None:
    """A drawable xyxy box (4 finite numbers, x1 ≥ x0, y1 ≥ y0) or None."""
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return [x0, y0, x1, y1] if np.isfinite([x0, y0, x1, y1]).all() and x1 >= x0 and y1 >= y0 else None


def _box(ax, box, color, label, style="-"):
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ls=style, ec=color, label=label))


FIGURE_SIDE = 512   # longest side of the image drawn: a panel is ~256 px, and a 10,000² image took 12 GB


def _bounded(image: Image.Image, layout: Layout, result: dict, gt):
    """(image, layout, result, gt box) scaled so that the image's longest side is at most
    FIGURE_SIDE; boxes scale with it (IoU is unchanged: both boxes scale alike)."""
    scale = FIGURE_SIDE / max(image.size)
    if scale >= 1:
        return image, layout, result, gt
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sx, sy = size[0] / image.width, size[1] / image.height

    def scaled(box):
        return None if box is None else [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]

    small = Layout.single(layout.method, size, layout.one_map.grid, scaled(layout.one_map.box))
    mask = np.asarray(Image.fromarray(result["mask"]).resize(size, Image.NEAREST))
    small_result = dict(result, heat=grid_to_image(result["grid_map"], small), mask=mask,
                        bbox_xyxy=scaled(result["bbox_xyxy"]))
    return image.resize(size, Image.BILINEAR), small, small_result, scaled(gt)


def _frame(ax, limits):
    """Pixel-coordinate axes with no ticks; `limits` = (x0, y0, x1, y1), y downwards."""
    x0, y0, x1, y1 = limits
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")


def _colorbar(fig, ax, shown, label: str):
    # A separate opaque mappable: the overlay's own alpha would fade the bar.
    bar = fig.colorbar(ScalarMappable(norm=shown.norm, cmap=shown.get_cmap()), ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=FONT - 2)
    bar.set_label(label, fontsize=FONT - 2)


def _entropy_text(se) -> str:
    if se is None:
        return "SE ∞ (no foreground)"
    return f"SE {max(float(se), 0.0):.2f}"   # entropy is ≥ 0; float rounding must not print "-0.00"


def _padded(layout: Layout) -> bool:
    """The grid spans more than the image (pad-to-square): some cells cover no image."""
    x0, y0, x1, y1 = layout.one_map.box
    width, height = layout.image_size
    return x0 < -0.5 or y0 < -0.5 or x1 > width + 0.5 or y1 > height + 0.5


def _cropped(layout: Layout) -> bool:
    """The grid spans less than the image (centre crop): the model never saw some pixels."""
    x0, y0, x1, y1 = layout.one_map.box
    width, height = layout.image_size
    return x0 > 0.5 or y0 > 0.5 or x1 < width - 0.5 or y1 < height - 0.5


def _padding_overlay(layout: Layout, samples: int = 256) -> np.ndarray:
    """RGBA [samples, samples] over the map's box: grey where the grid covers no image (padding)."""
    x0, y0, x1, y1 = layout.one_map.box
    width, height = layout.image_size
    xs = x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples
    ys = y0 + (np.arange(samples) + 0.5) * (y1 - y0) / samples
    outside = ~(((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :])
    rgba = np.zeros((samples, samples, 4))
    rgba[outside] = (0.55, 0.55, 0.55, 0.85)
    return rgba


def _raw_map(fig, ax, grid_map: np.ndarray, layout: Layout, title: str):
    """A head's raw grid map (rows, cols) placed on the map's box, with the image's outline and padding."""
    x0, y0, x1, y1 = layout.one_map.box
    width, height = layout.image_size
    _frame(ax, (min(0.0, x0), min(0.0, y0), max(float(width), x1), max(float(height), y1)))
    ax.set_facecolor("#d9d9d9")    # image pixels outside grid_box were cropped away: never seen
    shown = ax.imshow(grid_map, cmap="viridis", extent=(x0, x1, y1, y0), interpolation="nearest")
    if _padded(layout):
        ax.imshow(_padding_overlay(layout), extent=(x0, x1, y1, y0), interpolation="nearest")
    ax.add_patch(Rectangle((0, 0), width, height, fill=False, lw=1.2, ls="--", ec=OUTLINE))
    ax.set_title(title, fontsize=FONT)
    _colorbar(fig, ax, shown, "attention")


def _image_panel(ax, image: Image.Image, layout: Layout, title: str | None = None):
    width, height = image.size
    ax.imshow(image, extent=(0, width, height, 0))
    _frame(ax, (0, 0, width, height))
    if _cropped(layout):   # mark what the model saw
        _box(ax, layout.one_map.box, VIEW, "model's view (crop)", style=":")
    if title:
        ax.set_title(title, fontsize=FONT)


def _layout_note(layout: Layout) -> str:
    parts = ["raw maps: grid cells drawn in image pixels, dashed = the image's outline"]
    if _padded(layout):
        parts.append("grey = padding (grid cells over no image)")
    if _cropped(layout):
        parts.append("light grey = cropped away (the model never saw it; dotted on the image panels)")
    return "; ".join(parts)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width, break_long_words=True)) if text else ""


def figure_png(image: Image.Image, attn, meta: dict, heads: list[dict], result: dict, *,
               logic: str | None = None, tau: float | None = None, heads_source: str | None = None,
               mask_label: str = "mask") -> bytes:
    """`build_figure` as PNG bytes."""
    fig = build_figure(image, attn, meta, heads, result, logic=logic, tau=tau, heads_source=heads_source,
                       mask_label=mask_label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def build_figure(image: Image.Image, attn, meta: dict, heads: list[dict], result: dict, *,
                 logic: str | None = None, tau: float | None = None, heads_source: str | None = None,
                 mask_label: str = "mask") -> Figure:
    """The figure of one item (a Figure on an Agg canvas, outside pyplot). Header: the query, the logic, τ and where the heads came from. Row 0: image with
    the predicted box (and the ground truth, meta["gt_bbox"], with IoU), combined heat map, mask.
    Rows 1–2: each head's raw grid map and its map on the image. `heads`: analysis records
    (layer, head, spatial_entropy, attn_sum); `result`: bbox.localize's heat, mask, bbox_xyxy."""
    image, layout, result, gt = _bounded(image, Layout.from_meta(meta), result, as_box(meta.get("gt_bbox")))
    grid = layout.one_map.grid
    maps = head_maps(attn, grid)                                             # [L·H, rows, cols]
    layers = model_layers(meta.get("layers"), attn.shape[0])
    cols = max(3, len(heads))
    width_in = 3.9 * cols
    fig = Figure(figsize=(width_in, 11.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    chars = int(width_in * 72 / (0.62 * (FONT + 1)))   # header characters per line (≈0.6 em per character)

    pred = result["bbox_xyxy"]
    top = axes[0]
    top[0].axis("on")
    _image_panel(top[0], image, layout, "prediction" + (" vs ground truth" if gt else ""))
    if pred is not None:
        _box(top[0], pred, PRED, "predicted box")
    if gt is not None:
        _box(top[0], gt, GT, "ground truth", style="--")
        top[0].set_title(f"IoU {iou_xyxy(pred, gt):.2f} with the ground truth" if pred is not None
                         else "no predicted box", fontsize=FONT)
    elif pred is None:
        top[0].set_title("no predicted box", fontsize=FONT)
    if pred is not None or gt is not None:   # below the panel, never over the boxes
        top[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=FONT - 1, frameon=False)
    top[1].axis("on")
    _image_panel(top[1], image, layout, f"combined map of {len(heads)} heads")
    shown = top[1].imshow(result["heat"], cmap=HEAT, alpha=0.5, extent=(0, image.width, image.height, 0))
    _colorbar(fig, top[1], shown, "summed smoothed attention")
    top[2].axis("on")
    top[2].imshow(result["mask"], cmap="gray", extent=(0, image.width, image.height, 0), vmin=0, vmax=1)
    _frame(top[2], (0, 0, image.width, image.height))
    top[2].set_title(f"{mask_label} (white = foreground)", fontsize=FONT)

    for i, rec in enumerate(heads):
        grid_map = maps[head_row(layers, attn.shape[1], rec["layer"], rec["head"])]
        title = f"L{rec['layer']} H{rec['head']} raw {grid[0]}×{grid[1]} grid\n" \
                f"{_entropy_text(rec.get('spatial_entropy'))}" + \
                (f", S {rec['attn_sum']:.2f}" if rec.get("attn_sum") is not None else "")
        axes[1, i].axis("on")
        _raw_map(fig, axes[1, i], grid_map, layout, title)
        axes[2, i].axis("on")
        _image_panel(axes[2, i], image, layout, f"L{rec['layer']} H{rec['head']} on the image")
        shown = axes[2, i].imshow(grid_to_image(grid_map, layout), cmap=HEAT, alpha=0.5,
                                  extent=(0, image.width, image.height, 0))
        _colorbar(fig, axes[2, i], shown, "attention")

    details = [f"logic={logic}" if logic else None, f"τ (this sample's elbow) = {tau:.3f}" if tau is not None else None,
               f"heads: {heads_source}" if heads_source else None]
    header = [f"“{meta.get('query', '')}”", " · ".join(d for d in details if d), _layout_note(layout)]
    fig.suptitle("\n".join(_wrap(h, chars) for h in header if h), fontsize=FONT + 1)
    return fig


def thumbnail_png(image: Image.Image, heat: np.ndarray | None, pred, gt, max_side: int = 256) -> bytes:
    """The image scaled to `max_side` px on its longer side, the heat map blended in (when given),
    the predicted box (solid) and the ground-truth box (dashed) when given. Text stays in the page."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    if heat is not None:
        valid = np.nan_to_num(heat, nan=np.nanmin(heat))
        span = float(valid.max() - valid.min()) or 1.0
        rgba = colormaps[HEAT]((valid - valid.min()) / span)
        colour = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        base = Image.blend(base, colour, 0.45)
    draw = ImageDraw.Draw(base)
    if gt is not None:
        _dashed(draw, [v * scale for v in gt], GT)
    if pred is not None:
        x0, y0, x1, y1 = (v * scale for v in pred)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=PRED, width=2)
    buf = io.BytesIO()
    base.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _dashed(draw: ImageDraw.ImageDraw, box, color, dash: float = 5.0):
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1
    for (ax, ay), (bx, by) in [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]:
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=2)


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()
