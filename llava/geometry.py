"""Where the visual-token grid lies on the original image.

Every preprocessing we support (pad-to-square, resize, centre crop) maps the original W×H image
to the model's square input by an axis-aligned scale and shift, so the whole transform is carried
by one rectangle: `grid_box` = [x0, y0, x1, y1], the region of ORIGINAL-image pixel coordinates
(continuous, may extend past the image for padding) that the grid (rows, cols) spans. Grid cell
(r, c) covers x in [x0 + c·(x1−x0)/cols, x0 + (c+1)·(x1−x0)/cols), likewise y. The grid is never
inferred from sqrt(V).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image

from layout import Layout


@dataclass(frozen=True)
class Geometry:
    """Recorded in every attention file's meta so a map can be put back on the image."""

    method: str                                  # "pad", "crop", "resize" or combinations "pad+crop"
    image_size: tuple[int, int]                  # original (W, H)
    grid: tuple[int, int]                        # (rows, cols) of visual tokens
    grid_box: tuple[float, float, float, float]  # original-pixel rectangle the grid spans

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def layout(self) -> Layout:
        """The one-map layout of this grid."""
        return Layout.single(self.method, self.image_size, self.grid, self.grid_box)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["method"], tuple(d["image_size"]), tuple(d["grid"]), tuple(float(v) for v in d["grid_box"]))


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(S, ox, oy): LLaVA's expand2square pastes the image at (ox, oy) on an S×S canvas."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Original LLaVA-1.5 "pad" preprocessing: centre the image on a square of the mean colour."""
    side, ox, oy = pad_offsets(*image.size)
    if side == image.width == image.height:
        return image
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, (ox, oy))
    return canvas


def compute_geometry(
    image_size: tuple[int, int],
    grid: tuple[int, int],
    *,
    pad: bool,
    shortest_edge: int | None = None,
    crop_size: tuple[int, int] | None = None,
) -> Geometry:
    """Follow pad → resize → centre crop the way the Hugging Face image processors do.

    shortest_edge: resize keeping aspect so the short side equals it (None: resize to the final
    square, which stretches nothing when the input is already square). crop_size: (height, width)
    of a centre crop after resizing, or None.
    """
    width, height = image_size
    x0, y0, w, h = 0.0, 0.0, float(width), float(height)  # current canvas in original pixels
    steps = []
    if pad:
        side, ox, oy = pad_offsets(width, height)
        x0, y0, w, h = -ox, -oy, float(side), float(side)
        steps.append("pad")
    if shortest_edge is not None and crop_size is not None:
        # Same integer arithmetic as transformers.image_transforms.get_resize_output_image_size
        # and the backends' centre crop; checked against the processor in tests/test_geometry.py.
        cw_px, ch_px = int(round(w)), int(round(h))
        short, long = (cw_px, ch_px) if cw_px <= ch_px else (ch_px, cw_px)
        new_short, new_long = shortest_edge, int(shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if cw_px <= ch_px else (new_long, new_short)
        crop_h, crop_w = crop_size
        top, left = int((new_h - crop_h) / 2.0), int((new_w - crop_w) / 2.0)
        sx, sy = w / new_w, h / new_h
        x0, y0, w, h = x0 + left * sx, y0 + top * sy, crop_w * sx, crop_h * sy
        if (new_w, new_h) != (crop_w, crop_h):
            steps.append("crop")
    if not steps:
        steps.append("resize")
    return Geometry("+".join(steps), (width, height), tuple(grid), (float(x0), float(y0), float(x0 + w), float(y0 + h)))


def geometry_from_image_processor(processor, image_size: tuple[int, int], grid: tuple[int, int],
                                  pad: bool) -> Geometry:
    """Geometry of a Hugging Face image processor's settings (resize by shortest edge or to
    height×width, optional centre crop) after an optional pad-to-square."""
    size = dict(processor.size)
    crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    if size.get("shortest_edge"):
        crop_hw = (crop["height"], crop["width"]) if crop else (size["shortest_edge"],) * 2
        return compute_geometry(image_size, grid, pad=pad, shortest_edge=size["shortest_edge"], crop_size=crop_hw)
    if crop and (crop["height"], crop["width"]) != (size["height"], size["width"]):
        raise ValueError(f"unsupported image processor: resize to {size} then crop {crop}")
    # Resized straight to height×width: the grid spans the (padded) canvas, stretched if not square.
    return compute_geometry(image_size, grid, pad=pad)
