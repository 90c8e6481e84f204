"""Figures: the image with the predicted box, and the top-K heads' maps, raw on
the grid and overlaid on the image, titled with layer, head and spatial entropy."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from analyze import head_maps
from bbox import grid_to_image
from llava.geometry import Geometry


def _box(ax, box, color, label):
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec=color, label=label))


FIGURE_SIDE = 512   # longest side of the image drawn: a panel is ~256 px, and a 10,000² image took 12 GB


def _bounded(image: Image.Image, geometry: Geometry, result: dict):
    """(image, geometry, heat, mask, box) scaled so the image's longest side is at most FIGURE_SIDE."""
    scale = FIGURE_SIDE / max(image.size)
    if scale >= 1:
        return image, geometry, result["heat"], result["mask"], result["bbox_xyxy"]
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sx, sy = size[0] / image.width, size[1] / image.height
    x0, y0, x1, y1 = geometry.grid_box
    small = Geometry(geometry.method, size, geometry.grid, (x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    mask = np.asarray(Image.fromarray(result["mask"]).resize(size, Image.NEAREST))
    box = result["bbox_xyxy"]
    box = None if box is None else [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    return image.resize(size, Image.BILINEAR), small, grid_to_image(result["grid_map"], small), mask, box


def figure_png(image: Image.Image, attn, meta: dict, heads: list[dict], result: dict) -> bytes:
    """PNG bytes. Row 0: image + box, combined heat map, mask. Rows 1–2: each head's raw grid map
    and its map overlaid on the image. `heads`: analysis records (layer, head, spatial_entropy).
    Drawn at most FIGURE_SIDE pixels on the image's longest side, whatever the image's size."""
    image, geometry, heat, mask, box = _bounded(image, Geometry.from_dict(meta["geometry"]), result)
    maps = head_maps(attn, geometry.grid)
    num_heads = attn.shape[1]
    cols = max(3, len(heads))
    fig, axes = plt.subplots(3, cols, figsize=(3.2 * cols, 9.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    top = axes[0]
    top[0].imshow(image)
    if box is not None:
        _box(top[0], box, "lime", "prediction")
        top[0].legend(loc="lower right", fontsize=7)
    top[0].set_title(meta.get("query", ""), fontsize=9)
    top[1].imshow(image)
    top[1].imshow(heat, cmap="jet", alpha=0.5)
    top[1].set_title("combined heads", fontsize=9)
    top[2].imshow(mask, cmap="gray")
    top[2].set_title("mask", fontsize=9)
    for i, rec in enumerate(heads):
        grid_map = maps[rec["layer"] * num_heads + rec["head"]]
        se = rec.get("spatial_entropy")
        title = f"L{rec['layer']} H{rec['head']}  SE={se:.2f}" if se is not None else f"L{rec['layer']} H{rec['head']}"
        axes[1, i].imshow(grid_map, cmap="viridis")
        axes[1, i].set_title(title, fontsize=9)
        axes[2, i].imshow(image)
        axes[2, i].imshow(grid_to_image(grid_map, geometry), cmap="jet", alpha=0.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()
