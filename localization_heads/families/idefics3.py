"""Adapters for Idefics3 (`Idefics3ForConditionalGeneration` + `Idefics3Processor`, model_type "idefics3":
HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-Instruct) and SmolVLM 2
(`SmolVLMForConditionalGeneration` + `SmolVLMProcessor`, model_type "smolvlm": HuggingFaceTB/SmolVLM2-*).

Layout (tiles, then a global view): the image processor scales the image's longest edge to
size["longest_edge"], then stretches it to multiples of the tile T (max_image_size["longest_edge"]) and cuts
rows × cols tiles row-major, followed by the whole image stretched to T×T; an image that fits one tile is
only that global view. rows and cols come from the image processor's own `get_number_of_image_patches`
with the settings of the call. The two resizes compose into one stretch of the original image, so tile
(r, c) covers [c·W/cols, r·H/rows, (c+1)·W/cols, (r+1)·H/rows] and the global view [0, 0, W, H]. Each view
is a (T/p/scale_factor)² raster of <image> tokens (pixel shuffle); the <fake_token_around_image>,
<row_r_col_c>, <global-img> and newline tokens between views are not cells.

Query token: the chat template's user turn is "User:<image>{expression}<end_of_utterance>"; by default the
prompt ends with the expression's last token (model.query_at=generation_prompt: with "\\nAssistant:").

SmolVLMProcessor also holds a video processor, which needs torchvision; images never touch it, so the
SmolVLM adapter always loads `ImageOnlySmolVLMProcessor` (the same class without the video part).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin

from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.families.internvl import tiles_layout
from localization_heads.layout import Layout


class Idefics3Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(self.load_processor(), text_attn)
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size // config.scale_factor      # tokens per view side
        if self.side * self.side != self.processor.image_seq_len:
            raise RuntimeError(f"{self.model_name}: processor image_seq_len {self.processor.image_seq_len} ≠ "
                               f"({vision.image_size} / {vision.patch_size} / {config.scale_factor})² tokens per view")
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)

    def load_processor(self):
        return AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir)

    def layout(self, image_size: tuple[int, int]) -> Layout:
        width, height = image_size
        _, rows, cols = self.processor.image_processor.get_number_of_image_patches(height, width, self.call_images_kwargs)
        # (0, 0): no split, the global view only.
        return tiles_layout(image_size, (max(rows, 1), max(cols, 1)), self.side)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # One image per prompt, nested per row; the chat template already holds the special tokens.
        batch = self.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        return self.finish(batch, [self.layout(im.size) for im in images], prompts, "the tile grid")


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without its video processor (see adapters.internvl.ImageOnlyInternVLProcessor)."""

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        # ProcessorMixin pairs the parent's (image_processor, tokenizer, video_processor=None) with this
        # signature's two sub-processors: the missing video processor is never set.
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len,
                         chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's own only adds the video processor's frame settings; an image chat needs none.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class SmolVLMAdapter(Idefics3Adapter):
    def load_processor(self):
        return ImageOnlySmolVLMProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir)
