"""Adapter for DeepSeek-VL (`DeepseekVLForConditionalGeneration`, model_type "deepseek_vl":
deepseek-community/deepseek-vl-1.3b-chat) and DeepSeek-VL hybrid (`DeepseekVLHybridForConditionalGeneration`,
model_type "deepseek_vl_hybrid": deepseek-community/deepseek-vl-7b-chat).

Layout (pad to square, one map): the image processor scales the image so its longer side is the input
side S (each side rounded, at least min_size px), pastes it centred on an S×S square of the mean colour
(the offset floors) and the SigLIP tower turns that square into (image_size / patch_size)² tokens
(24×24 = 576 at 384/16), one run of <image_placeholder> tokens in raster order. The grid spans the
padded square, so its box reaches past the image on the padded axis (like LLaVA-1.5's "pad").

Hybrid: the image is padded to square at the high resolution (high_res_size, 1024 px) for the SAM
encoder, and that square is resized to the SigLIP side for the low-resolution tower: both see the same
square. The SAM features (64×64 at 1024/16, plus its global-attention layer's through a second neck,
weighted by high_res_vision_alpha) are resized bilinearly to 4·24 and brought to 24×24 by two stride-2
3×3 convolutions, then concatenated per cell with the SigLIP token. One token per cell: the layout is the
same single map, on the SigLIP cell. The SAM half reads a wider, shifted area: about 3 cells of the square,
centred ¼ to ½ cell up and left of the cell (each stride-2 convolution centres output i on input 2i, not
2i + ½; measured at the released sizes 1024/16 → 24², tiny widths).
vision_token_mixers: the attention modules of both towers (SAM's windowed and global attention mix
patches across the image). The convolutions after them are local but reach about 1.5 cells around a
cell, more than stage=check_layout's one-cell tolerance, so their output (high_res_vision_proj, the
last module of the high-res branch) is zeroed too: the check then proves the SigLIP branch's cells;
the SAM branch's placement depends only on the architecture and is traced in tests/test_family_deepseek_vl.py.

Prompt: the checkpoint's chat template (a system sentence, then "User: <image_placeholder>{expression}
\\n\\nAssistant:"); the query token is the expression's last token (model.query_at=generation_prompt:
the end of "Assistant:"). Positions: 1-D, counted from each row's first real token (base call_inputs).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, attention_modules, chat_prompt
from localization_heads.layout import Layout


def pad_square_box(image_size: tuple[int, int], side: int, min_size: int) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] in original pixels of the square the image processor makes: the image scaled
    so its longer side is `side` (each side rounded, at least `min_size`), centred on the square."""
    width, height = image_size
    scale = side / max(width, height)
    new_w, new_h = max(round(width * scale), min_size), max(round(height * scale), min_size)
    canvas = max(new_w, new_h)
    # The processor pads rows when the resized image is wider, columns when it is taller.
    ox = (canvas - new_w) // 2 if new_h > new_w else 0
    oy = (canvas - new_h) // 2 if new_w > new_h else 0
    sx, sy = new_w / width, new_h / height
    return -ox / sx, -oy / sy, (canvas - ox) / sx, (canvas - oy) / sy


class DeepseekVLAdapter(ImageTextAdapter):
    # The image-processor setting that sizes the padded square: its own input side, or (hybrid) the
    # high-resolution side, whose square the low-resolution tower sees resized.
    square_size_key = {"deepseek_vl": "size", "deepseek_vl_hybrid": "high_res_size", "janus": "size"}

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.model_type = config.model_type
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        if side * side != self.processor.num_image_tokens:
            raise RuntimeError(f"{self.model_name}: the processor's num_image_tokens {self.processor.num_image_tokens} "
                               f"≠ ({vision.image_size} / {vision.patch_size})² SigLIP patches")
        self.grid = (side, side)
        # The settings of every processor call: model.image_kwargs over the image processor's own.
        self.image_kwargs = {k: v for k, v in (cfg.image_kwargs or {}).items() if v is not None}
        setting = lambda key: self.image_kwargs.get(key, getattr(self.processor.image_processor, key))   # noqa: E731
        for key in ("do_resize", "do_pad"):
            if not setting(key):
                raise InputError(f"{self.model_name}: image processor {key}={setting(key)!r}; the layout needs the "
                                 "resize to the square side and the pad to square (leave it true)")
        size = setting(self.square_size_key[self.model_type])
        self.square_side = int(size["height"] if isinstance(size, dict) else size.height)
        self.min_size = int(setting("min_size"))

    def layout(self, image_size: tuple[int, int]) -> Layout:
        return Layout.single("pad", image_size, self.grid, pad_square_box(image_size, self.square_side, self.min_size))

    def shown_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts as the model reads them (Janus's processor may add a system sentence)."""
        return prompts

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               images_kwargs=self.image_kwargs)
        layouts = [self.layout(im.size) for im in images]
        prepared = self.finish(batch, layouts, self.shown_prompts(prompts), f"the {self.grid[0]}×{self.grid[1]} grid")
        if "high_res_pixel_values" in prepared.inputs:
            prepared.inputs["high_res_pixel_values"] = prepared.inputs["high_res_pixel_values"].to(self.dtype)
        return prepared

    def vision_token_mixers(self) -> list[torch.nn.Module]:
        model = self.model.model
        if self.model_type != "deepseek_vl_hybrid":
            return attention_modules(model.vision_model)
        return (attention_modules(model.vision_model) + attention_modules(model.high_res_vision_model)
                + [model.high_res_vision_proj])
