"""Adapter for Gemma 3 (`Gemma3ForConditionalGeneration` + `Gemma3Processor`, model_type "gemma3"):
google/gemma-3-4b-it, -12b-it, -27b-it.

Layout (pooled views): a view is stretched to the SigLIP square (896 px for the released models) and its
patches (64×64) are average-pooled into a side × side map (16×16 = mm_tokens_per_image tokens), one block
of image tokens between <start_of_image> and <end_of_image>. The first view is the whole image,
[0, 0, W, H]. With pan-and-scan (model.image_kwargs.do_pan_and_scan=true) the crops follow, each its
own block over the box of the original image it was cut from — found by running the image processor's
own pan-and-scan on index arrays, so the boxes are the processor's, not a copy of its arithmetic.

Attention: the model builds its masks from token_type_ids for whatever attention the text model runs:
image tokens attend bidirectionally within their block, and sliding-window layers see only the last
sliding_window keys. The capture receives that same mask (its rows equal eager's in the tests).
The prompt's positions are counted from each row's first real token (the base call_inputs).

Query token: the chat template's user turn holds the image and the expression; by default the prompt
ends with the expression's last token (model.query_at=generation_prompt: the end of "<start_of_turn>model\\n").
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor

from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.layout import Layout

PAN_AND_SCAN = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


def crop_boxes(image_size: tuple[int, int], images_kwargs: dict, image_processor) -> list[tuple[int, int, int, int]]:
    """[x0, y0, x1, y1] of every pan-and-scan crop of a W×H image, in the processor's order, with the
    settings of the call; none when pan-and-scan is off or the image is not elongated enough."""
    if not images_kwargs.get("do_pan_and_scan"):
        return []
    width, height = image_size
    settings = {name: images_kwargs[name] for name in PAN_AND_SCAN}
    # The PIL backend crops one [C, H, W] image, the torchvision backend a [..., H, W] batch; both slice.
    cut = getattr(image_processor, "pan_and_scan", None) or image_processor.pan_and_scan_batched
    xs = torch.arange(width).expand(1, height, width)       # each pixel's column (a view, no copy)
    ys = torch.arange(height)[:, None].expand(1, height, width)
    return [(int(cx[0, 0, 0]), int(cy[0, 0, 0]), int(cx[0, 0, -1]) + 1, int(cy[0, -1, 0]) + 1)
            for cx, cy in zip(cut(xs, **settings), cut(ys, **settings))]


def views_layout(image_size: tuple[int, int], crops: list[tuple[int, int, int, int]], side: int) -> Layout:
    """The whole image, then each crop; every view a side × side map over its box."""
    width, height = image_size
    if not crops:
        return Layout.single("stretch", image_size, (side, side), (0, 0, width, height))
    maps = [("image", (side, side), (0, 0, width, height))]
    maps += [(f"crop_{k}", (side, side), box) for k, box in enumerate(crops)]
    return Layout.stack("pan_and_scan", image_size, maps)


class Gemma3Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.side = self.model.model.multi_modal_projector.tokens_per_side       # the pooled map's side
        tokens = config.mm_tokens_per_image
        if self.side * self.side != tokens or self.processor.image_seq_length != tokens:
            raise RuntimeError(f"{self.model_name}: mm_tokens_per_image {tokens}, processor "
                               f"image_seq_length {self.processor.image_seq_length}, pooled side {self.side} disagree")
        # Pan-and-scan is off unless model.image_kwargs asks for it (the class default wins over the saved config).
        self.image_kwargs, self.call_images_kwargs = self.image_kwargs_of(cfg)

    def layout(self, image_size: tuple[int, int]) -> Layout:
        crops = crop_boxes(image_size, self.call_images_kwargs, self.processor.image_processor)
        return views_layout(image_size, crops, self.side)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # One image per prompt: the processor wants them nested per row. The chat template already
        # starts with <bos>, so the tokenizer must not add another.
        batch = self.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        return self.finish(batch, [self.layout(im.size) for im in images], prompts, "pan-and-scan")
