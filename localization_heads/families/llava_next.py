"""LLaVA-NeXT (anyres) and LLaVA-OneVision: `LlavaNextForConditionalGeneration` /
`LlavaOnevisionForConditionalGeneration` with their own processors (llava-hf/llava-v1.6-*-hf,
llava-hf/llava-onevision-qwen2-*-hf).

How an image becomes tokens (transformers' processor + `pack_image_features`):
1. base view: the whole image stretched to the tile square T×T → side×side tokens (side = T // p);
2. high-res view: the image resized, aspect kept, into the best "pinpoint" resolution (bh, bw),
   pasted in the centre of a zero canvas, cut into T×T tiles; the tiles' token grids are joined into
   one (bh/T·side) × (bw/T·side) feature grid, whose padded rows (or columns) are cut off again
   ("unpad", in feature units — it may keep a partly padded row, or cut a few image pixels);
3. OneVision only: when that grid holds more than anyres_max_N tiles' worth of tokens (× 1.1²), it
   is shrunk bilinearly (align_corners=False) to int(rows // ratio) × int(cols // ratio);
4. each row of the high-res grid is followed by a newline token with the SAME image-token id; the
   base view has none. Newlines are not cells: they are left out of the image positions.

When the patch does not divide the tile (OneVision's SigLIP: 384 / 14 → 27 tokens over 378 px) the
vision tower never sees a tile's last T − side·p pixel rows and columns: the base view covers
[0, side·p/T) of the image, and the high-res grid has a gap at every tile seam, so it is not one
uniform grid. The layout then splits the high-res view into uniform runs (one map per token row and
tile, or per row and run of equally spaced shrunk cells). Where p divides T (LLaVA-NeXT's CLIP
336 / 14) it is one map, "highres".
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution

from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.dataio import InputError
from localization_heads.layout import Layout

# Equal spacing of cell centres (canvas pixels) up to float noise.
_UNIFORM_TOL = 1e-6


def anyres_tokens(image_size: tuple[int, int], tile: int, patch: int, pinpoints: list,
                  max_tiles: int | None = None) -> tuple[Layout, tuple[int, int]]:
    """(layout, (rows, cols) of the high-res token grid without its newline column) of one image.

    image_size: original (W, H); tile: T, the vision tower's input side; patch: p; pinpoints:
    [(height, width), ...] of the high-res canvas; max_tiles: OneVision's anyres_max_N (None: NeXT).
    Maps: "base", then the high-res view ("highres", or "highres_r<row>_c<col>" runs when split).
    """
    width, height = image_size
    side = tile // patch
    best_h, best_w = select_best_resolution((height, width), [tuple(p) for p in pinpoints])
    if best_h % tile or best_w % tile:
        raise ValueError(f"pinpoint {best_h}×{best_w} is not a multiple of the tile {tile}")
    # get_patch_output_size: aspect-preserving resize into the pinpoint, then centred zero padding.
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    (row0, rows), (col0, cols) = _unpad(width, height, best_h // tile * side, best_w // tile * side)
    out_rows, out_cols = rows, cols
    if max_tiles is not None:                        # OneVision's bilinear shrink
        ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
        if ratio > 1.1:
            out_rows, out_cols = int(rows // ratio), int(cols // ratio)
    # canvas pixels → original pixels (a resize is linear in continuous pixel coordinates)
    sx, sy = width / new_w, height / new_h
    xs, pitch_x = _axis_centres(col0, cols, out_cols, side, patch, tile)
    ys, pitch_y = _axis_centres(row0, rows, out_rows, side, patch, tile)
    highres = _highres_maps((xs - paste_x) * sx, pitch_x * sx, (ys - paste_y) * sy, pitch_y * sy)
    seen = side * patch / tile                       # share of a tile the vision tower covers
    base = ("base", (side, side), (0.0, 0.0, width * seen, height * seen))
    return Layout.stack("anyres", (width, height), [base, *highres]), (out_rows, out_cols)


def _unpad(width: int, height: int, grid_h: int, grid_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """unpad_image on the joined feature grid: ((first row, rows), (first col, cols)) kept."""
    if width / height > grid_w / grid_h:
        pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        return (pad, grid_h - 2 * pad), (0, grid_w)
    pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
    return (0, grid_h), (pad, grid_w - 2 * pad)


def _axis_centres(start: int, kept: int, out: int, side: int, patch: int, tile: int) -> tuple[np.ndarray, float]:
    """Canvas-pixel centres [out] of the kept feature cells start..start+kept along one axis, after
    the bilinear shrink to `out` cells if out < kept, and the nominal cell pitch within a tile.

    Feature cell j lies in tile j // side, at patch j % side of it. The shrink samples source
    coordinate (i + ½)·kept/out − ½ (torch's align_corners=False, clamped at 0) between two cells."""
    def centre(j):
        return (j // side) * tile + (j % side + 0.5) * patch

    if out == kept:
        return centre(start + np.arange(kept)).astype(np.float64), float(patch)
    scale = kept / out
    src = np.maximum((np.arange(out) + 0.5) * scale - 0.5, 0.0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, kept - 1)
    frac = src - lo
    return (1 - frac) * centre(start + lo) + frac * centre(start + hi), patch * scale


def _uniform_runs(centres: np.ndarray, pitch: float) -> list[tuple[int, int]]:
    """Maximal [i0, i1) runs of cells spaced exactly `pitch` apart (split where a tile seam is)."""
    steps = np.abs(np.diff(centres) - pitch) > _UNIFORM_TOL * max(pitch, 1.0)
    cuts = [0, *(np.nonzero(steps)[0] + 1).tolist(), len(centres)]
    return list(zip(cuts[:-1], cuts[1:]))


def _highres_maps(xs: np.ndarray, pitch_x: float, ys: np.ndarray, pitch_y: float) -> list:
    """(name, grid, box) of the high-res cells, centred at xs [cols] × ys [rows] (original pixels),
    in token order: one map if the spacing is uniform, else one per run of equally spaced cells —
    per run of rows when each row is uniform, per row and run when rows have seams."""
    x_runs, y_runs = _uniform_runs(xs, pitch_x), _uniform_runs(ys, pitch_y)
    if len(x_runs) == 1:
        groups = [(rows, x_runs) for rows in y_runs]
    else:
        groups = [((r, r + 1), x_runs) for r in range(len(ys))]
    maps = []
    for (r0, r1), runs in groups:
        for c0, c1 in runs:
            box = (xs[c0] - pitch_x / 2, ys[r0] - pitch_y / 2, xs[c1 - 1] + pitch_x / 2, ys[r1 - 1] + pitch_y / 2)
            maps.append((f"highres_r{r0}_c{c0}", (r1 - r0, c1 - c0), box))
    return [("highres", *maps[0][1:])] if len(maps) == 1 else maps


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor, which needs torchvision.

    ProcessorMixin finds a processor's parts from its __init__ signature, so from_pretrained loads
    only the tokenizer and the image processor (the torchvision backend when torchvision is
    installed, else the PIL one — what AutoProcessor would pick). Images go through the parent's own
    code unchanged (the stock class cannot be built without torchvision; tests/test_family_llava_next.py
    checks the output against the image processor and the tokenizer called alone)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        # The parent's video_processor slot stays empty: ProcessorMixin only sets the parts this
        # signature names (image_processor, tokenizer).
        super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class LlavaNextAdapter(ImageTextAdapter):
    """LLaVA-NeXT; query token: the expression's last token (model.query_at=generation_prompt: the
    end of the chat template's generation prompt). Positions: the default 1-D ones from the mask."""

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(self.load_processor(), text_attn)
        self.tile, self.patch = config.vision_config.image_size, config.vision_config.patch_size
        self.pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
        self.max_tiles = self.max_tiles_of(config)
        self.check_processor()

    def load_processor(self):
        return AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir)

    def max_tiles_of(self, config) -> int | None:
        """N of anyres_max_N (None: no shrink)."""
        return None

    def check_processor(self) -> None:
        """The layout assumes the processor cuts tiles of the vision tower's input size, with the
        model's pinpoints; anything else would misplace every cell."""
        improc = self.processor.image_processor
        crop = getattr(improc, "crop_size", None) or {}
        size = dict(improc.size)
        tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
        base = (size["height"], size["width"]) if size.get("height") else (size.get("shortest_edge"),) * 2
        pinpoints = [tuple(p) for p in improc.image_grid_pinpoints]
        if tile != self.tile or base != (self.tile, self.tile) or pinpoints != self.pinpoints:
            raise InputError(f"{self.model_name}: the image processor (size {size}, crop {crop}, pinpoints {pinpoints}) "
                             f"does not match the model (tile {self.tile}, pinpoints {self.pinpoints})")

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        try:
            prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        except ValueError as e:
            raise InputError(f"{self.model_name}: {e}") from None
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        layouts, image_positions = [], []
        for b, (row, image) in enumerate(zip(batch["input_ids"], images)):
            layout, (rows, cols) = anyres_tokens(image.size, self.tile, self.patch, self.pinpoints, self.max_tiles)
            positions = row.eq(self.image_token_id).nonzero()[:, 0]          # base, then high-res rows + newline
            base = layout.maps[0].size
            if positions.numel() != base + rows * (cols + 1):
                raise RuntimeError(f"row {b}: {positions.numel()} image tokens, the layout of image {images[b].size} "
                                   f"expects {base} + {rows}×({cols} + newline)")
            highres = positions[base:].view(rows, cols + 1)[:, :cols].reshape(-1)
            image_positions.append(torch.cat([positions[:base], highres]).cpu())
            layouts.append(layout)
        return self.finish(batch, layouts, prompts, "anyres", image_positions)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: NeXT's layout plus the anyres_max_N shrink; the image-only processor."""

    def load_processor(self):
        return LlavaOnevisionImageOnlyProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir)

    def max_tiles_of(self, config) -> int | None:
        aspect = str(config.vision_aspect_ratio)
        if not aspect.startswith("anyres_max_"):
            raise InputError(f"{self.model_name}: vision_aspect_ratio={aspect!r} is not supported (expected anyres_max_N)")
        return int(aspect.removeprefix("anyres_max_"))
