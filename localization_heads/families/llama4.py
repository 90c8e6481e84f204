"""Adapter for Llama 4 (model_type "llama4": Llama4ForConditionalGeneration + Llama4Processor;
meta-llama/Llama-4-Scout-17B-16E-Instruct, Llama-4-Maverick-17B-128E-Instruct).

Layout (tiles, then a global view): the image processor picks a canvas of rows × cols tiles of T×T pixels
(T = size, 336; at most max_patches tiles; `get_best_fit`), resizes the image into it KEEPING its aspect
ratio — never upscaling past max(side, T) unless resize_to_max_canvas — and pads it at the right and
bottom, then cuts the canvas row-major. With more than one tile it adds a global view, the whole image
stretched to T×T. If the image became new_w × new_h canvas pixels, tile (r, c) covers
[c·T·W/new_w, r·T·H/new_h, (c+1)·T·W/new_w, (r+1)·T·H/new_h] of the original image (past its right or
bottom edge where the canvas is padding) and the global view [0, 0, W, H]. Each view is a side × side
raster of <|patch|> tokens (side = T/p · pixel_shuffle_ratio: 336/14 · 0.5 = 12; the pixel shuffle merges
2×2 patches).

Tokens: <|image_start|>, per tile row the row's tiles separated by <|tile_x_separator|> and followed by
<|tile_y_separator|>, then <|image|> and the global view, <|image_end|>; a one-tile image is
<|image_start|><|image|> + its tile + <|image_end|>. Only <|patch|> tokens (config.image_token_id) are
cells; the tile grid is read from the separators of the call's own input_ids.

Text model: chunked attention (attention_chunk_size) on the RoPE layers and global attention on every
4th (NoPE) layer, each with its own mask, MoE feed-forward; positions are the default 1-D ones from the
mask (the chunked mask is left-padding aware). The NoPE layers' temperature tuning counts positions from
the padded row's first slot, so a left-padded row differs from the row run alone only once a prompt
passes floor_scale (8192) tokens.

Processor: Llama4ImageProcessor exists only on the torchvision backend; without torchvision the adapter
refuses to load (InputError saying what to install).
Query token: the chat template's user turn holds the image and the expression; by default the prompt
ends with the expression's last token (model.query_at=generation_prompt: the end of
"<|header_start|>assistant<|header_end|>\\n\\n").
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from transformers import AutoProcessor

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout

LAYER_TYPES = ("full_attention", "chunked_attention")


def canvas_resize(image_size: tuple[int, int], tiles: tuple[int, int], tile: int,
                  resize_to_max_canvas: bool) -> tuple[int, int]:
    """(new_w, new_h): the size the image processor resizes a W×H image to inside a canvas of
    rows × cols tiles (aspect kept, floor on the fitted side; upscaling capped at max(side, T))."""
    width, height = image_size
    target_h, target_w = tiles[0] * tile, tiles[1] * tile
    if not resize_to_max_canvas:
        target_h, target_w = min(max(height, tile), target_h), min(max(width, tile), target_w)
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.floor(height * target_w / width), target_h)
    else:
        new_h, new_w = target_h, min(math.floor(width * target_h / height), target_w)
    return max(new_w, 1), max(new_h, 1)


def tiles_layout(image_size: tuple[int, int], tiles: tuple[int, int], tile: int, side: int,
                 resize_to_max_canvas: bool) -> Layout:
    """Tiles row-major, then the global view when there is more than one tile; each a side × side map."""
    width, height = image_size
    rows, cols = tiles
    new_w, new_h = canvas_resize(image_size, tiles, tile, resize_to_max_canvas)
    tw, th = tile * width / new_w, tile * height / new_h            # one tile in original pixels
    if rows * cols == 1:
        return Layout.single("llama4_tiles", image_size, (side, side), (0.0, 0.0, tw, th))
    maps = [(f"tile_{r}_{c}", (side, side), (c * tw, r * th, (c + 1) * tw, (r + 1) * th))
            for r in range(rows) for c in range(cols)]
    maps.append(("global", (side, side), (0, 0, width, height)))
    return Layout.stack("llama4_tiles", image_size, maps)


class Llama4Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        if not torchvision_imports():
            raise InputError(f"{self.model_name}: Llama 4's image processor (Llama4ImageProcessor) needs torchvision; "
                             "install the torchvision build that matches your torch")
        self.check_layer_types(raw_config.get("text_config") or {})
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)
        self.tile, self.side = self.check_processor(config.vision_config)
        tokens = self.tokenizer.convert_tokens_to_ids
        self.x_separator = tokens(self.processor.tile_token)
        self.y_separator = tokens(self.processor.tile_global_token)
        self.image_start, self.image_end = tokens(self.processor.start_of_img_token), tokens(self.processor.end_of_img_token)

    def check_layer_types(self, text_config: dict) -> None:
        """Refuse a text model whose layers this capture was not checked against."""
        for i, kind in enumerate(text_config.get("layer_types") or []):
            if kind not in LAYER_TYPES:
                raise InputError(f"{self.model_name}: config.json text_config.layer_types[{i}]={kind!r} is not supported "
                                 f"(known: {', '.join(LAYER_TYPES)})")

    def check_processor(self, vision) -> tuple[int, int]:
        """(tile side T in pixels, tokens per tile side); the processor must cut the tiles the vision
        tower was built for, with its patch and pixel shuffle."""
        size = self.call_images_kwargs.get("size") or self.processor.image_processor.size
        tile = size["height"] if isinstance(size, dict) else size.height
        mismatch = [f"{name}={mine} (model: {theirs})" for name, mine, theirs in [
            ("image processor size", tile, vision.image_size), ("processor patch_size", self.processor.patch_size,
                                                                 vision.patch_size),
            ("processor downsample_ratio", self.processor.downsample_ratio, round(vision.pixel_shuffle_ratio ** -2))]
            if mine != theirs]
        if mismatch:
            raise InputError(f"{self.model_name}: {'; '.join(mismatch)}; fix the checkpoint's processor config or "
                             "model.image_kwargs")
        return tile, int(tile // vision.patch_size * vision.pixel_shuffle_ratio)

    def tile_grid(self, ids: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of tiles in one row's image, from its separators: one <|tile_y_separator|> per tile row,
        cols − 1 <|tile_x_separator|> per tile row; none at all for a one-tile image."""
        starts, ends = (ids == self.image_start).nonzero()[:, 0], (ids == self.image_end).nonzero()[:, 0]
        if len(starts) != 1 or len(ends) != 1:
            raise RuntimeError(f"expected one image per prompt, found {len(starts)} <|image_start|> tokens")
        span = ids[starts[0]:ends[0]]
        rows = int((span == self.y_separator).sum())
        if rows == 0:
            return 1, 1
        return rows, int((span == self.x_separator).sum()) // rows + 1

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # The chat template already holds <|begin_of_text|>.
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        resize_to_max_canvas = bool(self.call_images_kwargs.get(
            "resize_to_max_canvas", self.processor.image_processor.resize_to_max_canvas))
        layouts = [tiles_layout(image.size, self.tile_grid(ids), self.tile, self.side, resize_to_max_canvas)
                   for image, ids in zip(images, batch["input_ids"])]
        return self.finish(batch, layouts, prompts, "the tile separators")
