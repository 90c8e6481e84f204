"""Adapter for Hugging Face-format LLaVA (`LlavaForConditionalGeneration` + `LlavaProcessor`):
llava-hf/llava-1.5-7b-hf and the bundled toy model.

The processor expands the "<image>" placeholder into V = rows·cols image tokens, so each row's
visual keys are simply where input_ids == config.image_token_id.
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from adapters.base import Adapter, Prepared
from llava.conversation import build_prompt
from llava.geometry import geometry_from_image_processor


class HFLlavaAdapter(Adapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        cache_dir = self.cache_dir
        self.processor = AutoProcessor.from_pretrained(self.model_name, cache_dir=cache_dir)
        self.processor.tokenizer.padding_side = "left"  # last real token at the end of every row
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_name, cache_dir=cache_dir, dtype=dtype,
            attn_implementation={"text_config": text_attn, "vision_config": "sdpa", "": "sdpa"},
        ).to(device).eval()
        config = self.model.config
        self.image_token_id = config.image_token_id
        # A generated placeholder would be expanded again as an image on the capture pass.
        self.generate_kwargs = {"suppress_tokens": [self.image_token_id]}
        self.num_layers = config.text_config.num_hidden_layers
        self.num_heads = config.text_config.num_attention_heads
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)
        self.pad = bool(getattr(self.processor.image_processor, "do_pad", False))

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [build_prompt(self.conv_mode, q, self.image_token) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        input_ids = batch["input_ids"]                                   # [B, N]
        rows, cols = self.grid
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        if not torch.all(counts == rows * cols):
            raise RuntimeError(f"expected {rows * cols} image tokens per row for grid {self.grid}, got "
                               f"{counts.tolist()}; vision_feature_select_strategy must drop CLS")
        image_positions = [row.nonzero()[:, 0] for row in is_image]                 # per row [V]
        layouts = [geometry_from_image_processor(self.processor.image_processor, im.size, self.grid, self.pad).layout()
                   for im in images]
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return Prepared(inputs, image_positions, layouts, prompts)
