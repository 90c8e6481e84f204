"""Adapter for PaliGemma and PaliGemma 2 (`PaliGemmaForConditionalGeneration` + `PaliGemmaProcessor`,
model_type "paligemma"): google/paligemma-3b-mix-224, google/paligemma2-3b-mix-224, ...

Layout: one map. The image is stretched to the SigLIP square and every patch is one token:
(image_size / patch_size)² tokens (16×16 at 224 px) over [0, 0, W, H], before <bos> and the text.

Prompt: PaliGemma has no chat template; its processor builds "<image>…<bos>{prefix}\\n" and the prefix
(image + text) attends bidirectionally (token_type_ids 0), the generated suffix causally (1). The prefix
here is the expression. Query token: the expression's last token (the trailing "\\n" is cut off), or with
model.query_at=generation_prompt the "\\n" where generation starts.

Model call: token_type_ids always (without them the prefix would be causal under eager but not SDPA);
the processor's training `labels` are dropped; positions count from 1 on each row's first real token, as
PaliGemma numbers them. Generated tokens are suffix tokens (type 1). PaliGemma 2's Gemma 2 text model
soft-caps attention logits, which SDPA cannot run: capture.py computes those layers with the eager formula.
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor

from localization_heads.families.base import ImageTextAdapter, Prepared, position_ids_from_mask
from localization_heads.layout import Layout


class PaliGemmaAdapter(ImageTextAdapter):
    chat_template = False   # the processor's own prompt format: <image>…<bos>{expression}\n

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        separator = self.tokenizer.encode("\n", add_special_tokens=False)
        if len(separator) != 1:
            raise RuntimeError(f"{self.model_name}: the tokenizer splits PaliGemma's \\n separator into {separator}")
        self.newline_id = separator[0]
        side = config.vision_config.image_size // config.vision_config.patch_size
        if side * side != self.processor.image_seq_length:
            raise RuntimeError(f"{self.model_name}: processor image_seq_length {self.processor.image_seq_length} "
                               f"≠ ({config.vision_config.image_size} / {config.vision_config.patch_size})² patches")
        self.grid = (side, side)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [f"{self.processor.image_token}{q}" for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        batch.pop("labels", None)                                 # training targets; the call needs none
        if self.query_at == "expression":                        # the row ends with the expression
            if not torch.all(batch["input_ids"][:, -1] == self.newline_id):
                raise RuntimeError("PaliGemma prompts should end with the processor's \\n separator")
            batch = {k: v[:, :-1] if k != "pixel_values" else v for k, v in batch.items()}
        layouts = [Layout.single("stretch", im.size, self.grid, (0, 0, im.width, im.height)) for im in images]
        end = "\n" if self.query_at == "generation_prompt" else ""
        shown = [f"{self.processor.image_token}{self.tokenizer.bos_token}{q}{end}" for q in queries]
        return self.finish(batch, layouts, shown, f"the {self.grid[0]}×{self.grid[1]} grid")

    def call_inputs(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        inputs = dict(prepared.inputs)
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"]) + 1     # PaliGemma counts from 1
        return inputs

    def append_tokens(self, prepared: Prepared, token_ids: torch.Tensor) -> Prepared:
        """Generated tokens belong to the causal suffix (token type 1), as in PaliGemma's generate."""
        appended = super().append_tokens(prepared, token_ids)
        inputs = dict(appended.inputs)
        inputs["token_type_ids"] = inputs["token_type_ids"].clone()
        inputs["token_type_ids"][:, -1] = 1
        return appended.with_inputs(inputs)
