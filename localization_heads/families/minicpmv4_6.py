"""Adapter for MiniCPM-V 4.6 (model_type "minicpmv4_6": MiniCPMV4_6ForConditionalGeneration +
MiniCPMV4_6Processor; openbmb/MiniCPM-V-4.6, openbmb/MiniCPM-V-4.6-Thinking).

Text model: Qwen3.5's HYBRID text model (Gated-DeltaNet layers, one full-attention layer in four:
text_config.layer_types); records hold only the attention layers (adapter.attention_layers, meta["layers"]).
The model passes the call's position_ids straight to it, so they are counted from each row's first real
token (base call_inputs); the linear layers zero padding tokens' hidden states through the 2-D mask.

Layout (MiniCPM's slicing): a source view, then slices.
- source: the whole image stretched to (h, w), each side rounded on its own to a multiple of patch·4
  (find_best_resize: scaled to about scale_resolution² when larger, or when the image is not sliced);
- slices: when the image is larger than scale_resolution² the processor picks a grid of gy × gx slices
  (get_sliced_grid, at most max_slice_nums), stretches the whole image to gy·h_s × gx·w_s (get_refine_size)
  and cuts it into equal slices, row-major: slice (r, c) covers [c·W/gx, r·H/gy, (c+1)·W/gx, (r+1)·H/gy].
Each view is a raster of (patch rows / 4) × (patch cols / 4) tokens ("16x": the tower's window merger joins
2×2 patches after layer insert_layer_id — its windows come out in raster order of the 2×2 blocks — and the
projector's merger joins 2×2 of those; "4x" skips the window merger: / 2). The processor's target_sizes
give each view's patch grid; the slice grid is its own get_sliced_grid, checked against the view count.
Tokens: "<image_id>0</image_id>" + image_start + n₀ image tokens + image_end, then per slice row the row's
slices, each slice_start + nₛ image tokens + slice_end, rows joined by "\\n". Only the image token is a cell.

Processor: the stock one (AutoProcessor) where torchvision imports. Without it the stock class cannot be
built (its video processor needs torchvision): ImageOnlyMiniCPMV4_6Processor is the same class without the
video processor, on the PIL image processor (MiniCPMV4_6ImageProcessorPil; the same slicing arithmetic).
Query token: the chat template's user turn holds the image and the expression; by default the prompt ends
with the expression's last token (model.query_at=generation_prompt: the end of the assistant header).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
from transformers.processing_utils import ProcessorMixin

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt, token_positions
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout

# downsample_mode → patches a token side: "16x" = window merger (2) × projector merger (2); "4x" = projector only.
TOKEN_SIDE = {"16x": 4, "4x": 2}


class ImageOnlyMiniCPMV4_6Processor(MiniCPMV4_6Processor):
    """MiniCPMV4_6Processor without its video processor. ProcessorMixin reads the sub-processors off this
    signature (image processor, tokenizer); the attributes the stock __init__ sets for images are set here
    (the stock one also reads the video processor's)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.slice_mode = image_processor.slice_mode
        self.default_use_image_id = image_processor.use_image_id
        self.image_token_divisor = TOKEN_SIDE.get(image_processor.downsample_mode, 4) ** 2
        for name in ("image_token", "video_token", "image_token_id", "video_token_id", "image_start_token",
                     "image_end_token", "slice_start_token", "slice_end_token", "image_id_start_token",
                     "image_id_end_token"):
            setattr(self, name, getattr(tokenizer, name))


def load_processor(name: str, cache_dir: str | None):
    """The stock processor where torchvision imports, else the image-only one on the PIL backend."""
    if torchvision_imports():
        return AutoProcessor.from_pretrained(name, cache_dir=cache_dir)
    return ImageOnlyMiniCPMV4_6Processor.from_pretrained(
        name, cache_dir=cache_dir, image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(name, cache_dir=cache_dir),
        tokenizer=AutoTokenizer.from_pretrained(name, cache_dir=cache_dir))


def slices_layout(image_size: tuple[int, int], views: list[tuple[int, int]], slice_grid: tuple[int, int] | None,
                  side: int) -> Layout:
    """The source view over [0, 0, W, H], then gy × gx slices row-major; views: each view's (patch rows,
    patch cols) in token order; side: patches a token side."""
    width, height = image_size
    grids = [(rows // side, cols // side) for rows, cols in views]
    maps = [("source", grids[0], (0, 0, width, height))]
    if slice_grid is not None:
        gy, gx = slice_grid
        sw, sh = width / gx, height / gy
        maps += [(f"slice_{r}_{c}", grids[1 + r * gx + c], (c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))
                 for r in range(gy) for c in range(gx)]
    return Layout.stack("minicpm_slices", image_size, maps)


class MiniCPMV4_6Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        check_merges(raw_config)
        config = self.load(load_processor(self.model_name, self.cache_dir), text_attn)
        self.image_kwargs, call_images_kwargs = self.image_kwargs_of(cfg)
        self.settings = self.processor.image_processor._merge_and_standardize_kwargs(**call_images_kwargs)
        self.side = check_settings(self.settings, config)
        self.generate_kwargs = {"suppress_tokens": [config.image_token_id, config.video_token_id]}

    def slice_grid(self, image: Image.Image) -> tuple[int, int] | None:
        """(gy, gx) slices the image processor cuts this image into, or None (source view only)."""
        if not self.settings["slice_mode"]:
            return None
        width, height = image.size
        grid = self.processor.image_processor.get_sliced_grid((height, width), self.settings["max_slice_nums"],
                                                              self.settings["scale_resolution"])
        return None if grid is None else (grid[0], grid[1])

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        batch = self.processor(images=[im.convert("RGB") for im in images], text=prompts, return_tensors="pt",
                               padding=True, images_kwargs=self.image_kwargs)
        sizes = batch["target_sizes"].tolist()                                   # [views of the batch, 2]
        layouts, start = [], 0
        for b, image in enumerate(images):
            grid = self.slice_grid(image)
            count = 1 + (grid[0] * grid[1] if grid else 0)
            if start + count > len(sizes):
                raise RuntimeError(f"row {b}: the processor gave {len(sizes)} views for the batch, the layout needs more")
            layouts.append(slices_layout(image.size, [tuple(s) for s in sizes[start:start + count]], grid, self.side))
            start += count
        if start != len(sizes):
            raise RuntimeError(f"the processor gave {len(sizes)} views, the layouts {start}")
        return self.finish(batch, layouts, prompts, "target_sizes and the slice grid",
                           token_positions(batch["input_ids"], self.image_token_id))


def check_merges(raw_config: dict) -> None:
    """Refuse, before the model loads, merges other than the released models' (TOKEN_SIDE assumes them)."""
    vision = raw_config.get("vision_config") or {}
    found = {"merge_kernel_size": (list(raw_config.get("merge_kernel_size", [2, 2])), [2, 2]),
             "merger_times": (raw_config.get("merger_times", 1), 1),
             "vision_config.window_kernel_size": (list(vision.get("window_kernel_size", [2, 2])), [2, 2])}
    for key, (value, known) in found.items():
        if value != known:
            raise InputError(f"minicpmv4_6 config.json {key}={value} is not supported (the layout knows {known}: "
                             "2×2 merges, one merger round, as the released models)")


def check_settings(settings: dict, config) -> int:
    """Refuse settings the layout cannot describe, before any row; returns patches a token side."""
    mode = settings["downsample_mode"]
    if mode not in TOKEN_SIDE:
        raise InputError(f"minicpmv4_6 image setting downsample_mode={mode!r} is unknown; use one of "
                         f"{', '.join(TOKEN_SIDE)}")
    if mode != config.downsample_mode:
        raise InputError(f"minicpmv4_6 image setting downsample_mode={mode!r} differs from the model's "
                         f"downsample_mode={config.downsample_mode!r}; set model.image_kwargs.downsample_mode to match")
    if settings["patch_size"] != config.vision_config.patch_size:
        raise InputError(f"minicpmv4_6 image setting patch_size={settings['patch_size']} differs from the vision "
                         f"tower's patch_size={config.vision_config.patch_size}; fix the checkpoint's processor config")
    return TOKEN_SIDE[mode]
