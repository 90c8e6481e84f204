"""Adapter for Mistral 3 (`Mistral3ForConditionalGeneration`, model_type "mistral3"): Mistral Small 3.1 /
3.2 24B and Ministral 3 — a Pixtral vision tower, 2×2 patch merging, a Mistral text model.

Tokens: the image becomes a raster of rows × cols [IMG] tokens, each row followed by [IMG_BREAK]
except the last, which ends with [IMG_END]. Break and end tokens are other ids and are not cells.
Geometry: the Pixtral image processor scales the image down, keeping its aspect ratio, when a side
exceeds size.longest_edge (1540 px), then rounds each side UP to a multiple of patch·merge
(14·2 = 28 px) and stretches the image to that size; a merged token covers one 28 px square of it,
in raster order. So the one map covers [0, 0, W, H] with separate x and y scales; rows and cols are
the processor's image_sizes divided by patch·merge.

Processor: PixtralProcessor cannot be imported without torchvision (its module imports the torchvision
image processor). The adapter therefore does what it does for one image per prompt on every machine:
the checkpoint's image processor (PIL backend) with patch·merge as its patch size, and the template's
[IMG] replaced by the raster above. tests/test_family_mistral3.py checks that the ids and pixels equal
the stock PixtralProcessor's where torchvision exists.

Prompt: the checkpoint's chat template ([INST] … [/INST]); positions counted from each row's first
real token (the base call_inputs). Query token: the expression's last token by default;
model.query_at=generation_prompt ends the prompt with [/INST] (Mistral has no assistant header).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.layout import Layout

IMAGE, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"


@dataclass
class PixtralParts:
    """The two parts of a Pixtral processor the adapter uses (what ImageTextAdapter.load reads)."""

    tokenizer: object
    image_processor: object


def raster_text(rows: int, cols: int) -> str:
    """The placeholder text of a rows × cols image: cols [IMG] then [IMG_BREAK] per row, the last
    row ending with [IMG_END] instead."""
    return (IMAGE * cols + BREAK) * (rows - 1) + IMAGE * cols + END


class Mistral3Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.model_name, cache_dir=self.cache_dir)
        # backend="pil": transformers picks the torchvision image processor whenever the package is
        # installed; both resize alike (the test compares them where torchvision imports).
        images = AutoImageProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir, backend="pil")
        config = self.load(PixtralParts(tokenizer, images), text_attn)
        self.cell = config.vision_config.patch_size * config.spatial_merge_size        # px of the resized image
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (IMAGE, BREAK, END)}
        if ids[IMAGE] != config.image_token_id:
            raise InputError(f"{self.model_name}: config.json image_token_index={config.image_token_id} but the "
                             f"tokenizer's {IMAGE} is {ids[IMAGE]}; the checkpoint's files disagree")
        unknown = [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise InputError(f"{self.model_name}: the tokenizer has no {', '.join(unknown)} token; a Pixtral image "
                             "needs [IMG], [IMG_BREAK] and [IMG_END]")
        self.break_ids = [ids[BREAK], ids[END]]
        self.generate_kwargs = {"suppress_tokens": list(ids.values())}

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.tokenizer, q, self.query_at) for q in queries]
        pixels = self.processor.image_processor(images, patch_size={"height": self.cell, "width": self.cell},
                                                return_tensors="pt")
        grids = [(int(h) // self.cell, int(w) // self.cell) for h, w in pixels["image_sizes"]]   # (rows, cols)
        texts = []
        for prompt, grid in zip(prompts, grids):
            if prompt.count(IMAGE) != 1:
                raise RuntimeError(f"the chat template gave {prompt.count(IMAGE)} {IMAGE} placeholders, expected one")
            texts.append(prompt.replace(IMAGE, raster_text(*grid)))
        # The template starts with the BOS token already.
        batch = dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        batch.update(pixels)
        layouts = [Layout.single("pixtral_resize", image.size, grid, (0, 0, *image.size))
                   for image, grid in zip(images, grids)]
        return self.finish(batch, layouts, prompts, "image_sizes")
