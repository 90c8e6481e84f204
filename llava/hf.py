"""Adapter for Hugging Face-format LLaVA (`LlavaForConditionalGeneration` + `LlavaProcessor`):
llava-hf/llava-1.5-7b-hf and the bundled toy model.

The processor expands the "<image>" placeholder into V = rows·cols image tokens, so each row's
visual keys are simply where input_ids == config.image_token_id.
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor

from adapters.base import ImageTextAdapter, Prepared
from llava.conversation import build_prompt
from llava.geometry import geometry_from_image_processor


class HFLlavaAdapter(ImageTextAdapter):
    chat_template = False    # LLaVA-1.5's own templates (model.conv_mode: referseg, plain)

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.image_token = self.processor.image_token
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)
        self.pad = bool(getattr(self.processor.image_processor, "do_pad", False))

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [build_prompt(self.conv_mode, q, self.image_token) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        layouts = [geometry_from_image_processor(self.processor.image_processor, im.size, self.grid, self.pad).layout()
                   for im in images]
        # A count that is off by one per row means the CLS token was kept (vision_feature_select_strategy).
        return self.finish(batch, layouts, prompts, f"the {self.grid[0]}×{self.grid[1]} grid")
