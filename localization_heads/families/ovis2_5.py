"""Adapter for Ovis2.5 (model_type "ovis2_5": Ovis2_5ForConditionalGeneration + Ovis2_5Processor, the native
transformers format: ovis-community/ovis-2.5-9B, ovis-community/Ovis2.5-2B). The AIDC-AI/Ovis2.5-* repos
hold the remote-code format (same model_type, but llm_config / visual_tokenizer_config instead of
text_config / vision_config); it is refused at load with what to use instead.

Vision: a NaViT-like SigLIP2 tower at native resolution. The image processor's smart_resize stretches the
whole image to multiples of patch·merge (16·2 = 32 px) within a pixel range, each side rounded on its own
(sides under 32 px are first scaled up to 32, aspect ratios over 200 clamped: still the whole image), and
packs the patches merge×merge block by block, blocks in raster order. The visual tokenizer turns each block of merge² patches into one
probabilistic visual token (a softmax over a visual vocabulary, embedded through the visual embedding
table): rows × cols = image_grid_thw h / merge × w / merge tokens, one map over [0, 0, W, H] — Qwen2-VL's
layout (families/qwen_vl.py) — but not necessarily in raster order. The tower regroups the blocks window
by window (window_size / merge / patch blocks a side: 3 × 3 for the released 112 px windows) and undoes
it at the end; transformers 5.25's Ovis2_5Model feeds the visual tokenizer the last layer's hidden states
from BEFORE that undo, so the language model gets the tokens in WINDOW order (windows raster, blocks raster
inside each; the remote-code model undoes the order first). The adapter asks the loaded model which order
it uses (token_order: one painted block through a local tower) and lists each cell's token accordingly,
so it stays right if transformers changes this.
Tokens: the template's image token becomes <image_start> + rows·cols image tokens + <image_end>; the two
boundary tokens get learned "visual indicator" embeddings and are not cells.
Text model: Qwen3, 1-D RoPE, so positions are counted from each row's first real token (base call_inputs);
no M-RoPE, no mm_token_type_ids needed.
Processor: the stock one where torchvision imports; else the same class without its video processor,
on the PIL image processor (Ovis2_5ImageProcessorPil), as for Qwen-VL.
Query token: the chat template's user turn holds the image and the expression; by default the prompt ends
with the expression's last token (model.query_at=generation_prompt: the end of "<|im_start|>assistant\\n").
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers.vision_utils import get_vision_window_index

from localization_heads.dataio import InputError
from localization_heads.families.base import Adapter, Prepared
from localization_heads.families.qwen_vl import QwenVLAdapter

PROCESSOR_CLASSES = {"ovis2_5": "Ovis2_5Processor"}


class Ovis2_5Adapter(QwenVLAdapter):
    processor_classes = PROCESSOR_CLASSES
    family_title = "Ovis2.5"

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        if raw_config.get("model_type") == "ovis2_5" and "text_config" not in raw_config:
            found = "llm_config" if "llm_config" in raw_config else "no text_config"
            raise InputError(f"{cfg.name}: config.json has {found}: the remote-code Ovis2.5 format (AIDC-AI/Ovis2.5-*); "
                             "use the native transformers checkpoints (ovis-community/ovis-2.5-9B, "
                             "ovis-community/Ovis2.5-2B)")
        super().__init__(cfg, raw_config, text_attn=text_attn, device=device, dtype=dtype)
        self.vision = self.model.config.vision_config
        self.windowed = token_order(self) == "window"

    def window_index(self, grid: tuple[int, int]) -> torch.Tensor:
        """[rows·cols]: the raster index of the block behind each visual token, in the tower's window order."""
        thw = torch.tensor([[1, grid[0] * self.merge, grid[1] * self.merge]])
        index, _ = get_vision_window_index(thw, spatial_merge_size=self.merge, window_size=self.vision.window_size,
                                           patch_size=self.vision.patch_size)
        return index

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prepared = super().prepare(images, queries)
        if not self.windowed:
            return prepared
        # cell i (raster) is the token at offset argsort(window_index)[i] of the image's run
        positions = [run[torch.argsort(self.window_index(layout.one_map.grid))]
                     for run, layout in zip(prepared.image_positions, prepared.layouts)]
        return Prepared(prepared.inputs, positions, prepared.layouts, prepared.prompts)

    def call_inputs(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        """1-D positions from each row's first real token (the text model is Qwen3, not M-RoPE)."""
        return Adapter.call_inputs(self, prepared)


def token_order(adapter: Ovis2_5Adapter) -> str:
    """"raster" or "window": the order in which the loaded model hands the image's visual tokens to the language
    model. One random image of 1 × 2 windows goes through the tower made local (check_layout.local_vision), once
    as is and once with the first block of the second window changed; the token that moves says the order."""
    from localization_heads.check_layout import local_vision

    vision, merge = adapter.vision, adapter.merge
    side = vision.window_size // merge // vision.patch_size          # blocks a window side
    if side <= 1:
        return "raster"                                              # one block a window: both orders agree
    grid_thw = torch.tensor([[1, side * merge, 2 * side * merge]])
    patch_dim = vision.num_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid_thw.prod()), patch_dim, generator=generator)
    painted = pixels.clone()
    painted[side * merge**2:(side + 1) * merge**2] += 1.0           # block (0, side): raster index `side`
    embed = adapter.model.model.vision_tower.embeddings.patch_embedding
    hook = getattr(embed, "_hf_hook", None)                         # a device map runs it where its hook says
    device = getattr(hook, "execution_device", None) or embed.weight.device
    both = torch.cat([pixels, painted]).to(device, adapter.dtype)
    with torch.inference_mode(), local_vision(adapter):
        first, second = adapter.model.model.get_image_features(both, grid_thw.repeat(2, 1).to(device)).pooler_output
    change = (second - first).float().abs().amax(-1)                # [tokens]
    moved = (change > 0.01 * change.max()).nonzero()[:, 0].tolist()  # rounding noise of 16-bit weights stays below
    if moved == [side]:
        return "raster"
    if moved == [side * side]:
        return "window"
    raise RuntimeError(f"{adapter.model_name}: changing one block of patches moved visual tokens {moved}; expected "
                       f"token {side} (raster order) or {side * side} (window order) — the Ovis2.5 tower is not "
                       "what this adapter knows")
