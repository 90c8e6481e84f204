"""Adapter for InternVL in Hugging Face format (`InternVLForConditionalGeneration` + `InternVLProcessor`,
model_type "internvl"): OpenGVLab/InternVL3-*-hf, InternVL3.5-*-HF.

Layout (tiles, then a thumbnail): the processor picks a canvas of cols × rows tiles of T×T pixels whose
aspect ratio is closest to the image's (`get_optimal_tiled_canvas`, between min_patches and max_patches
tiles), STRETCHES the image to (rows·T, cols·T) and cuts it row-major; with more than one tile it adds a
thumbnail, the whole image stretched to T×T. Tile (r, c) therefore covers [c·W/cols, r·H/rows,
(c+1)·W/cols, (r+1)·H/rows] of the original image (x and y scale separately) and the thumbnail [0, 0, W, H].
Each view becomes a (T/p·ratio)² raster of tokens (pixel shuffle, ratio = downsample_ratio), all of an
image's views in one run of `<IMG_CONTEXT>` between `<img>` and `</img>` (no separators).

Processor: InternVLProcessor also holds a video processor, which needs torchvision. Images never touch
it, so this adapter always loads `ImageOnlyInternVLProcessor` (the same class without the video part):
identical input_ids and pixel_values for images, and the image processor backend AutoImageProcessor picks
(torchvision when installed, PIL otherwise).

Query token: the chat template's user turn holds the image and the expression; by default the prompt
ends with the expression's last token (model.query_at=generation_prompt: the end of "<|im_start|>assistant\\n").
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.layout import Layout


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor. ProcessorMixin loads the sub-processors named in
    __init__'s signature, so this one loads only the image processor and the tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        # The parent passes (image_processor, tokenizer, video_processor=None) on to ProcessorMixin, which
        # pairs them with this signature's two sub-processors: the missing video processor is never set.
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


def tile_grid(image_size: tuple[int, int], images_kwargs: dict, image_processor) -> tuple[int, int]:
    """(rows, cols) of tiles the image processor cuts a W×H image into, with the settings of the call
    (`images_kwargs` as the processor merges them; unset keys fall back to the image processor's own)."""
    def setting(name):
        return images_kwargs.get(name, getattr(image_processor, name))

    max_patches = setting("max_patches")
    if not setting("crop_to_patches") or max_patches <= 1:
        return 1, 1
    width, height = image_size
    size = setting("size")
    tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    cols, rows = get_optimal_tiled_canvas((height, width), tile, setting("min_patches"), max_patches)
    return rows, cols


def tiles_layout(image_size: tuple[int, int], tiles: tuple[int, int], side: int) -> Layout:
    """Tiles row-major, then the thumbnail when there is more than one tile; each view a side × side map."""
    width, height = image_size
    rows, cols = tiles
    if rows * cols == 1:
        return Layout.single("tiles", image_size, (side, side), (0, 0, width, height))
    maps = [(f"tile_{r}_{c}", (side, side), (c * width / cols, r * height / rows, (c + 1) * width / cols,
                                              (r + 1) * height / rows))
            for r in range(rows) for c in range(cols)]
    maps.append(("thumbnail", (side, side), (0, 0, width, height)))
    return Layout.stack("tiles", image_size, maps)


def _first(value) -> int:
    """Height of a size given as an int or [height, width] (square tiles either way)."""
    return int(value if isinstance(value, int) else value[0])


class TiledAdapter(ImageTextAdapter):
    """A family whose processor cuts the image into a GotOcr2 tile grid plus a thumbnail (InternVL,
    Aya Vision): its __init__ loads the model and sets `side` (tokens per view side),
    `image_kwargs` and `call_images_kwargs`."""

    side: int

    def layout(self, image_size: tuple[int, int]) -> Layout:
        tiles = tile_grid(image_size, self.call_images_kwargs, self.processor.image_processor)
        return tiles_layout(image_size, tiles, self.side)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # The chat template already holds the special tokens (<BOS_TOKEN> for Aya Vision).
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        return self.finish(batch, [self.layout(im.size) for im in images], prompts, "the tile grid")


class InternVLAdapter(TiledAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(ImageOnlyInternVLProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir),
                           text_attn)
        # Tokens per tile side: patches per side, then pixel shuffle by downsample_ratio.
        vision = config.vision_config
        patches = _first(vision.image_size) // _first(vision.patch_size)
        self.side = int(patches * config.downsample_ratio)
        if self.side * self.side != self.processor.image_seq_length:
            raise RuntimeError(f"{self.model_name}: processor image_seq_length {self.processor.image_seq_length} "
                               f"≠ ({patches} patches · {config.downsample_ratio})² tokens per tile")
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)

