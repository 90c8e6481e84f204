"""Adapter for Command A Vision (`Cohere2VisionForConditionalGeneration` + `Cohere2VisionProcessor`,
model_type "cohere2_vision"): CohereLabs/command-a-vision-07-2025.

Layout (tiles, then a global view), as Aya Vision's but with Cohere's own canvas choice: among the
cols × rows grids of at most max_patches tiles of T px (512), the image processor takes the one that
needs the least upscaling to cover the image (or, if every grid shrinks it, the least shrinking) — not
the closest aspect ratio — and min_patches plays no part. It STRETCHES the image to (rows·T, cols·T),
cuts it row-major, and with more than one tile appends the whole image stretched to T×T. Tile (r, c)
covers [c·W/cols, r·H/rows, (c+1)·W/cols, (r+1)·H/rows] of the original image, the global view
[0, 0, W, H] (internvl.tiles_layout). Each view is a (T/p/downsample_factor)² raster of image tokens
(SigLIP patches of 16 px, pixel shuffle 2: 16×16 = 256), row-major.

Tokens: `<|START_OF_IMG|>`, per view its 256 `<|IMG_PATCH|>` tokens followed by `<|IMG_LINE_BREAK|>`,
then `<|END_OF_IMG|>`; only the image tokens (config.image_token_id) are cells.

Attention: the Cohere2 text model alternates sliding-window and full layers; the capture receives the
model's own mask for each. Positions: 1-D, counted from each row's first real token (base call_inputs).

Processor: Cohere2VisionImageProcessor exists only on the torchvision backend; without torchvision the
adapter refuses to load (InputError saying what to install).
Query token: the chat template's user turn holds the image and the expression; by default the prompt ends
with the expression's last token (model.query_at=generation_prompt: the end of the chatbot-turn header).
"""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from localization_heads.dataio import InputError
from localization_heads.families.internvl import TiledAdapter, tiles_layout
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout


class Cohere2VisionAdapter(TiledAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        if not torchvision_imports():
            raise InputError(f"{self.model_name}: Command A Vision's image processor (Cohere2VisionImageProcessor) "
                             "needs torchvision; install the torchvision build that matches your torch")
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size // config.downsample_factor     # tokens per view side
        # The processor writes patch_size² image tokens a view; its "patch_size" is that side in tokens.
        mismatch = [f"{name}={mine} (model: {theirs})" for name, mine, theirs in [
            ("image processor size", self.tile(), vision.image_size),
            ("processor patch_size", self.processor.patch_size, self.side)] if mine != theirs]
        if mismatch:
            raise InputError(f"{self.model_name}: {'; '.join(mismatch)}; fix the checkpoint's processor config or "
                             "model.image_kwargs")

    def setting(self, name: str):
        """An image setting of the call: model.image_kwargs over the image processor's own."""
        value = self.call_images_kwargs.get(name)
        return getattr(self.processor.image_processor, name) if value is None else value

    def tile(self) -> int:
        """Tile side T in pixels (size is square: {"height": T, "width": T} or a SizeDict)."""
        size = self.setting("size")
        return int(size["height"] if isinstance(size, dict) else size.height)

    def tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles: the image processor's own canvas choice for a W×H image."""
        from transformers.models.cohere2_vision.image_processing_cohere2_vision import get_optimal_tiled_canvas

        max_patches = self.setting("max_patches")
        if not self.setting("crop_to_patches") or max_patches <= 1:
            return 1, 1
        width, height = image_size
        tile = self.tile()
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), self.setting("min_patches"), max_patches)
        return rows, cols

    def layout(self, image_size: tuple[int, int]) -> Layout:
        return tiles_layout(image_size, self.tile_grid(image_size), self.side)
