"""Adapter for Janus / Janus-Pro (`JanusForConditionalGeneration` + `JanusProcessor`, model_type "janus"):
deepseek-community/Janus-Pro-7B, -1B. Only the understanding path (image → text) is used; the VQ image
tokenizer and generation head that Janus uses to draw images are loaded but never run.

Layout: DeepSeek-VL's (families/deepseek_vl.py): the image scaled so its longer side is 384 px, centred
on a square of the mean colour, and the SigLIP-style tower's (384 / 16)² = 24×24 = 576 tokens over that
square in raster order. The processor writes <begin_of_image> + 576 × <image_placeholder> + <end_of_image>;
the two markers are not cells.

Prompt: the checkpoint's chat template ("<|User|>: <image_placeholder>\\n{expression}"); the released
processors set use_default_system_prompt, so the processor puts its system sentence before it (the
recorded prompt shows it). The query token is the expression's last token (model.query_at=generation_prompt:
the end of "\\n\\n<|Assistant|>:"). Positions: 1-D, counted from each row's first real token (base call_inputs).
"""
from __future__ import annotations

import torch
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from localization_heads.families.deepseek_vl import DeepseekVLAdapter


class JanusAdapter(DeepseekVLAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, raw_config, text_attn=text_attn, device=device, dtype=dtype)
        markers = [self.processor.image_start_token, self.processor.image_end_token]
        # Neither marker may be generated: the capture pass would read it as part of an image.
        self.generate_kwargs = {"suppress_tokens": [self.image_token_id, *self.tokenizer.convert_tokens_to_ids(markers)]}

    def shown_prompts(self, prompts: list[str]) -> list[str]:
        """What the model reads: the processor adds its system sentence in front when asked to."""
        system = DEFAULT_SYSTEM_PROMPT if self.processor.use_default_system_prompt else ""
        return [system + p for p in prompts]
