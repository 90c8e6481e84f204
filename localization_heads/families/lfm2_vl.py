"""Adapter for LFM2-VL (model_type "lfm2_vl"; Lfm2VlForConditionalGeneration + Lfm2VlProcessor):
LiquidAI/LFM2-VL-450M, -1.6B, -3B.

Text model: LFM2, a hybrid of short-convolution layers and attention layers (text_config.layer_types
"conv" / "full_attention"); only the attention layers have heads, so records hold those
(adapter.attention_layers, meta["layers"]). The convolution layers zero the hidden states of padding
tokens (the 2-D attention mask), so left padding leaves each row as it is alone. Positions: 1-D RoPE,
counted from each row's first real token (the base class's call_inputs).

Layout (the image processor's _get_split_layout, the same call the processor uses to count tokens):
- an image that fits (≤ max_image_tokens · (patch · downsample)² pixels, × max_pixels_tolerance) is
  STRETCHED to (h, w), multiples of patch · downsample (32 px) by a smart resize between min_image_tokens
  and max_image_tokens tokens: one (h/32, w/32) map over [0, 0, W, H];
- a larger one is stretched to cols × rows tiles of tile_size (512) px, cut row-major, each a
  (tile/32)² map over its share of the image, then (use_thumbnail) the smart-resized whole image.
SigLIP2 NaFlex patches of 16 px, pixel-unshuffled 2 × 2 into one token, row-major. In the prompt the
views are `<|img_row_R_col_C|>` + tile tokens ..., `<|img_thumbnail|>` + thumbnail tokens, all between
`<|image_start|>` and `<|image_end|>`; the markers are not cells.

Processor: transformers has only a torchvision image processor for LFM2-VL (no PIL backend), so this
family needs torchvision; without it the adapter refuses to load with one line saying so.

Query token: the chat template's user turn holds the image and the expression; by default the prompt ends
with the expression's last token (model.query_at=generation_prompt: the end of "<|im_start|>assistant\\n").
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

# The image processor's settings that decide the layout (Lfm2VlImageProcessor._get_split_layout's).
SPLIT_KEYS = ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens", "max_image_tokens",
              "encoder_patch_size", "tile_size", "max_pixels_tolerance")


def view_grid(height: int, width: int, patch: int, factor: int) -> tuple[int, int]:
    """(rows, cols) of tokens of a view resized to height × width: patches, then factor × factor unshuffle
    (the processor's _compute_tokens_for_image)."""
    return math.ceil((height // patch) / factor), math.ceil((width // patch) / factor)


class Lfm2VlAdapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        if not torchvision_imports():
            raise InputError(f"{self.model_name}: LFM2-VL's image processor exists only for torchvision in "
                             "transformers; install torchvision matching your torch (pip install torchvision)")
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        if config.downsample_factor != self.processor.image_processor.downsample_factor:
            raise InputError(f"{self.model_name}: downsample_factor {config.downsample_factor} of the model ≠ "
                             f"{self.processor.image_processor.downsample_factor} of the image processor")
        self.image_kwargs, merged = self.image_kwargs_of(cfg)
        improc = self.processor.image_processor
        self.settings = improc._merge_and_standardize_kwargs(**merged)

    def layout(self, image_size: tuple[int, int]) -> Layout:
        width, height = image_size
        s = self.settings
        split = {k: s[k] for k in SPLIT_KEYS}
        if not s["do_image_splitting"]:
            split["min_tiles"] = split["max_tiles"] = 1
        do_split, rows, cols, new_h, new_w = self.processor.image_processor._get_split_layout(height, width, **split)
        patch, factor = s["encoder_patch_size"], s["downsample_factor"]
        whole = view_grid(new_h, new_w, patch, factor)
        if not do_split:
            return Layout.single("resize", image_size, whole, (0, 0, width, height))
        tile = view_grid(s["tile_size"], s["tile_size"], patch, factor)
        maps = [(f"tile_{r}_{c}", tile, (c * width / cols, r * height / rows, (c + 1) * width / cols,
                                         (r + 1) * height / rows))
                for r in range(rows) for c in range(cols)]
        if s["use_thumbnail"]:
            maps.append(("thumbnail", whole, (0, 0, width, height)))
        return Layout.stack("tiles", image_size, maps)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # One image per prompt: nested, or the processor would give every image to the first prompt.
        batch = self.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                               images_kwargs=self.image_kwargs)
        return self.finish(batch, [self.layout(im.size) for im in images], prompts, "the tile layout")
