"""Adapter for Molmo2 (`Molmo2ForConditionalGeneration` + `Molmo2Processor`, model_type "molmo2"):
allenai/Molmo2-8B, Molmo2-4B, Molmo2-O-7B.

Layout (a low-resolution view, then one high-resolution map):
- low-res: the whole image stretched to S×S (S = size, 378 px), S/p patches a side (p = patch_size, 14);
- high-res: the image stretched to a canvas of tiling_h × tiling_w windows plus the overlap margins
  (`compute_crop_geometry`), cut into OVERLAPPING S×S crops. The crops overlap, but their margins are dropped
  before pooling: the kept patches tile the canvas exactly once, in raster order (`_build_overlapping_crops`'
  patch_index_grid), so the whole high-res view is ONE uniform patch grid over the stretched canvas.
Each view's patch grid (R, C) is pooled in pool_h × pool_w windows after padding it to multiples of the pool,
half the padding before (floor) and half after (`arange_for_pooling`): a pooled cell i spans patches
[i·pool − pad_before, (i+1)·pool − pad_before). A grid with an odd patch count (27 for the released models)
thus has a border row/column of cells that cover one patch: the map's box extends past the image there by
the padded patches, and padding cells still see only image pixels (their share outside is no pixel).
Tokens: `<low_res_im_start>` low-res rows `<im_end>`, `<im_start>` high-res rows `<im_end>`; every row of cells is
followed by `<im_col>` (another id). Only `<im_patch>` tokens are cells.

Attention: the processor marks every image token (patches, separators) in mm_token_type_ids; the model turns
them into one bidirectional block of the text mask for whatever attention the text model runs, so the capture
gets the same mask as eager. Positions: 1-D RoPE, counted from each row's first real token (base call_inputs).

Processor: Molmo2's image processor exists only on the torchvision backend, and Molmo2Processor also holds a
torchvision video processor. Images never touch the video part, so this adapter always loads
`ImageOnlyMolmo2Processor`; where torchvision cannot import, its image processor is `TorchMolmo2ImageProcessor`,
the stock class with the two torchvision calls it makes on images (bilinear resize without antialiasing, and
normalize) done in plain torch — the same arithmetic (tests/test_family_molmo2.py compares both under torchvision).

Query token: the chat template puts `<|image|>` before the user turn; by default the prompt ends with the
expression's last token (model.query_at=generation_prompt: the end of "<|im_start|>assistant\\n").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor, compute_crop_geometry
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt, token_positions
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout


class TorchMolmo2ImageProcessor(Molmo2ImageProcessor):
    """Molmo2ImageProcessor without torchvision: on PIL input it only resizes (bilinear, antialias=False,
    on float tensors) and normalizes, which torch does alone."""

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        if antialias:
            raise ValueError("Molmo2 resizes without antialiasing; TorchMolmo2ImageProcessor implements only that")
        return F.interpolate(image, size=(size.height, size.width), mode="bilinear", align_corners=False,
                             antialias=False)

    def normalize(self, image: torch.Tensor, mean, std, inplace: bool = False, **kwargs) -> torch.Tensor:
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std


class ImageOnlyMolmo2Processor(Molmo2Processor):
    """Molmo2Processor without its video processor. ProcessorMixin reads the sub-processors off this
    signature (image processor, tokenizer); the stock __init__ hands ProcessorMixin (image, video, tokenizer)
    positionally, so the tokenizer goes in the video slot too, where it lands in the tokenizer attribute."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, tokenizer, chat_template=chat_template, **kwargs)


def load_processor(name: str, cache_dir: str | None) -> ImageOnlyMolmo2Processor:
    """The image-only processor; the stock (torchvision) image processor where torchvision imports."""
    image_class = Molmo2ImageProcessor if torchvision_imports() else TorchMolmo2ImageProcessor
    image_processor = image_class.from_pretrained(name, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    return ImageOnlyMolmo2Processor.from_pretrained(name, cache_dir=cache_dir, image_processor=image_processor,
                                                    tokenizer=tokenizer)


def pooled_map(patches: tuple[int, int], pool: tuple[int, int], image_size: tuple[int, int]):
    """(grid, box) of a view whose R×C patch grid covers the whole W×H image (stretched), pooled in
    pool_h × pool_w windows with the padding split as arange_for_pooling splits it."""
    width, height = image_size
    grid, edges = [], []
    for count, size, extent in zip(patches, pool, (height, width)):
        cells = math.ceil(count / size)
        before = (cells * size - count) // 2
        grid.append(cells)
        # patch j spans [j, j + 1) · extent / count of the original image
        edges.append((-before * extent / count, (cells * size - before) * extent / count))
    (y0, y1), (x0, x1) = edges
    return (grid[0], grid[1]), (x0, y0, x1, y1)


def views_layout(image_size: tuple[int, int], settings: dict) -> Layout:
    """The low-res view, then the high-res canvas, with the image processor's standardized settings."""
    width, height = image_size
    crop, patch = settings["size"].height, settings["patch_size"]
    pool = tuple(settings["pooling_size"])
    _, _, canvas_h, canvas_w = compute_crop_geometry(height, width, settings["max_crops"],
                                                     settings["overlap_margins"], crop, patch)
    low = pooled_map((crop // patch, crop // patch), pool, image_size)
    high = pooled_map((canvas_h // patch, canvas_w // patch), pool, image_size)
    return Layout.stack("overlapping_crops", image_size, [("low_res", *low), ("high_res", *high)])


class Molmo2Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(load_processor(self.model_name, self.cache_dir), text_attn)
        self.image_kwargs, call_images_kwargs = self.image_kwargs_of(cfg)
        image_processor = self.processor.image_processor
        self.settings = image_processor._merge_and_standardize_kwargs(**call_images_kwargs)
        check_settings(self.settings, config)
        self.generate_kwargs = {"suppress_tokens": sorted({config.image_patch_id, *self.processor.image_token_ids})}

    def layout(self, image_size: tuple[int, int]) -> Layout:
        return views_layout(image_size, self.settings)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # The processor puts its bos (<|im_end|> for the released tokenizers) before each prompt itself.
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        layouts = [self.layout(im.size) for im in images]
        for b, (layout, grids) in enumerate(zip(layouts, batch["image_grids"].tolist())):
            expected = [*layout.maps[0].grid, *layout.maps[1].grid]
            if grids != expected:
                raise RuntimeError(f"row {b}: the processor's image_grids {grids} ≠ the layout's {expected}")
        return self.finish(batch, layouts, prompts, "the low-res and high-res grids",
                           token_positions(batch["input_ids"], self.image_token_id))


def check_settings(settings: dict, config) -> None:
    """Refuse image settings the layout cannot describe, before any row."""
    size = settings["size"]
    if size.height != size.width:
        raise InputError(f"molmo2 image setting size={{height: {size.height}, width: {size.width}}}: the crops "
                         "must be square; set model.image_kwargs.size to a square size")
    crop_patches = size.height // settings["patch_size"]
    margins = list(settings["overlap_margins"])
    if crop_patches - sum(margins) <= 0:
        raise InputError(f"molmo2 image setting overlap_margins={margins}: the margins leave no window inside a "
                         f"crop of {crop_patches} patches; use smaller margins")
    positions = config.vision_config.num_position_embeddings
    if crop_patches * crop_patches != positions:
        raise InputError(f"molmo2 image setting size={size.height} with patch_size={settings['patch_size']}: "
                         f"{crop_patches}² patches a crop, but the vision tower has {positions} positions")
