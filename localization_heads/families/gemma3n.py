"""Adapter for Gemma 3n (`Gemma3nForConditionalGeneration` + `Gemma3nProcessor`, model_type "gemma3n"):
google/gemma-3n-E4B-it, -E2B-it. Images and text only (the audio tower is unused).

Tokens: the chat template's <image_soft_token> becomes "\\n\\n<start_of_image>" + 256 × <image_soft_token>
+ "<end_of_image>\\n\\n"; the 256 soft tokens are one 16 × 16 raster.
Geometry: the SigLIP image processor stretches the whole image to 768 × 768 (no crops, no aspect
kept). The vision tower is timm's MobileNetV5 (a CNN with multi-query attention blocks in its last two
stages); its multi-scale fusion adapter resizes the stride-16 and stride-32 feature maps to 48 × 48,
fuses them and average-pools 3 × 3 into the output_resolution map (16 × 16), which the model flattens
row by row ([C, h, w] → [h·w, C]) into the soft tokens. So one map of output_resolution cells over
[0, 0, W, H]; the grid is read from the loaded tower and checked against vision_soft_tokens_per_image
and the processor's image_seq_length.

A CNN's token is not made of its cell's pixels only: every convolution reaches past the cell (the
tower's receptive field is wider than the 768 px image), and the stride-32 map's 32-px cells, upsampled
by nearest neighbour, straddle the 48-px tokens (every other token reads one stride-32 sample 15 px past
its right / bottom edge). stage=check_layout therefore makes the tower local in three ways: the
multi-query attention outputs and the stride-32 stage's output are zeroed (vision_token_mixers), and
every spatial kernel is cut to its centre tap (local_kernels). Each token then reads pixels of its own
cell only; tests/test_family_gemma3n.py traces that, and the straddle with the stride-32 stage on.

Attention: Gemma 3n's text model alternates sliding-window and full layers (causal everywhere, image
tokens included), reuses earlier layers' keys and values in its last layers (KV sharing), and adds AltUp
streams, LAuReL and per-layer inputs around them; the capture receives the keys and masks every layer
really uses (equal to eager in the tests). Prompt positions are counted from each row's first real
token (the base call_inputs).

Query token: the user turn holds the image and the expression; by default the prompt ends with the
expression's last token (model.query_at=generation_prompt: the end of "<start_of_turn>model\\n").

timm: transformers builds the tower with timm (which needs torchvision); the library imports neither
unless a Gemma 3n checkpoint is loaded, and without timm the adapter refuses in one line.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from PIL import Image
from torch.nn.utils import parametrize
from transformers import AutoProcessor

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.layout import Layout

TOWER = "mobilenetv5"   # timm architecture names of the MobileNetV5 encoders


def timm_imports() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:   # missing, or without the torchvision it imports
        return False
    return True


class CentreTap(torch.nn.Module):
    """A convolution weight [out, in/groups, kh, kw] with every tap but the centre one zeroed."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        kh, kw = weight.shape[-2:]
        mask = torch.zeros(kh, kw, dtype=weight.dtype, device=weight.device)
        mask[kh // 2, kw // 2] = 1
        return weight * mask


class Gemma3nAdapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        architecture = (raw_config.get("vision_config") or {}).get("architecture")
        if not str(architecture).startswith(TOWER):
            raise InputError(f"{self.model_name}: config.json vision_config.architecture={architecture!r}: this adapter "
                             f"knows Gemma 3n's MobileNetV5 tower ({TOWER}*) only")
        if not timm_imports():
            raise InputError(f"{self.model_name}: Gemma 3n's vision tower is a timm MobileNetV5 and timm does not import "
                             "here; install it with torchvision matching your torch (pip install timm torchvision)")
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.image_kwargs, _ = self.image_kwargs_of(cfg)
        fusion = self.model.model.vision_tower.timm_model.msfa
        self.grid = tuple(fusion.output_resolution)                                  # (rows, cols)
        tokens = self.grid[0] * self.grid[1]
        if tokens != config.vision_soft_tokens_per_image or tokens != self.processor.image_seq_length:
            raise InputError(f"{self.model_name}: the vision tower's {self.grid[0]}×{self.grid[1]} map, "
                             f"vision_soft_tokens_per_image={config.vision_soft_tokens_per_image} and the processor's "
                             f"image_seq_length={self.processor.image_seq_length} disagree; fix the checkpoint's configs")
        # A generated placeholder would ask for image or audio features on the capture pass.
        self.generate_kwargs = {"suppress_tokens": [config.image_token_id, config.audio_token_id]}

    def vision_token_mixers(self) -> list[torch.nn.Module]:
        """What carries one cell's pixels into another cell's token besides the kernels (stage=check_layout
        zeroes these): the attention of every MobileAttention block — its output joins the block's residual,
        so zeroing it leaves the block's input (the blocks themselves end in "Attention" but hold the
        residual: the base class's search would zero the whole map) — and every stage whose coarser map
        the fusion adapter upsamples (stride 32: its 32-px cells straddle the 48-px tokens)."""
        tower = self.model.model.vision_tower.timm_model
        attention = [m.attn for m in tower.modules() if type(m).__name__ == "MobileAttention"]
        # Fusion inputs after the first (the finest map): feature i > 0 is the output of stage blocks[i - 1].
        coarse = [tower.blocks[i - 1] for i in tower.msfa_indices[1:]]
        return attention + coarse

    @contextmanager
    def local_kernels(self):
        """Every spatial convolution of the tower (stem, depthwise and expansion kernels) reduced to its
        centre tap while inside: the same strides and 'same' padding, so each output position reads the
        one input position under its kernel's centre. The weights are untouched (a parametrization,
        removed on exit)."""
        convs = [m for m in self.model.model.vision_tower.modules()
                 if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1]
        for conv in convs:
            parametrize.register_parametrization(conv, "weight", CentreTap())
        try:
            yield
        finally:
            for conv in convs:
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # One image per prompt, nested per row; the template starts with <bos> already.
        batch = self.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        layouts = [Layout.single("stretch", im.size, self.grid, (0, 0, *im.size)) for im in images]
        return self.finish(batch, layouts, prompts, "the vision tower's output map")
