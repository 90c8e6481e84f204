"""Adapter for Aya Vision (`AyaVisionForConditionalGeneration` + `AyaVisionProcessor`, model_type "aya_vision"):
CohereLabs/aya-vision-8b, -32b.

Layout (tiles, then a global view): the image processor is GotOcr2's, as InternVL's: a canvas of cols × rows
tiles of T px chosen by aspect ratio (`get_optimal_tiled_canvas`, 1..max_patches), the image STRETCHED to
(rows·T, cols·T) and cut row-major, then the whole image stretched to T×T when there is more than one tile.
Each view is a (T/p/downsample_factor)² raster of `<|IMG_PATCH|>` tokens (SigLIP patches, pixel shuffle 2:
13×13 = 169 for T = 364, p = 14). `TILE_k` before each tile, `TILE_GLOBAL` before the global view and
`<|START_OF_IMG|>` / `<|END_OF_IMG|>` around the image are not cells. (internvl.tiles_layout.)

Attention: the Cohere2 text model alternates sliding-window and full layers; the capture receives the
model's own mask for each (its rows equal eager's in the tests). Positions: 1-D, counted from each row's first
real token (base call_inputs).

Query token: the chat template's user turn holds the image and the expression; by default the prompt ends with
the expression's last token (model.query_at=generation_prompt: the end of the chatbot-turn header).
"""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from localization_heads.families.internvl import TiledAdapter


class AyaVisionAdapter(TiledAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size // config.downsample_factor      # tokens per view side
        processor_side = self.processor.img_size // self.processor.patch_size
        if self.side != processor_side:
            raise RuntimeError(f"{self.model_name}: the processor's {processor_side}² tokens a view ≠ "
                               f"({vision.image_size} / {vision.patch_size} / {config.downsample_factor})²")
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)
