"""Adapter for Gemma 4 (`Gemma4ForConditionalGeneration` + `Gemma4Processor`, model_type "gemma4"):
google/gemma-4-31B-it, -26B-A4B-it, -E4B-it, -E2B-it. Images and text only (audio and video unused).

Tokens: the chat template's <|image|> becomes <|image> + n × <|image|> + <image|>; the n soft tokens
are one raster of pooled patches, rows·cols of them.
Geometry: the processor resizes the whole image, keeping its aspect ratio, to the largest size whose
sides are multiples of patch·pooling (16·3 = 48 px) within the patch budget (max_soft_tokens·pooling²
patches; 280 tokens by default), each side rounded DOWN on its own; the vision tower average-pools
pooling × pooling patches into one token, raster order. So the one map covers [0, 0, W, H] with
slightly different x and y scales; rows and cols are read from the processor's own
image_position_ids (the patch grid), never recomputed.

Attention: the text model alternates sliding-window and global layers (global layers have their own
head size and key/value heads, keys doubling as values on the 31B / 26B), the small models reuse
earlier layers' keys and values in their last layers and add per-layer inputs. With
use_bidirectional_attention="vision" (31B, 26B) image tokens attend to their whole image in the
sliding layers; the model builds that mask from mm_token_type_ids, which the processor returns. The
capture receives the masks and keys every layer really uses (equal to eager in the tests).
Prompt positions are counted from each row's first real token (the base call_inputs).

Query token: the user turn holds the image and the expression; by default the prompt ends with the
expression's last token (model.query_at=generation_prompt: the end of "<|turn>model\\n").

Processor: where torchvision imports, the stock AutoProcessor. Without it the stock class cannot be
built (its video processor needs torchvision): the same class with only the image processor (PIL
backend) and the tokenizer is used, its own __init__ running unchanged (see image_only_processor_class).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor, Gemma4Processor, ProcessorMixin

from localization_heads.dataio import InputError
from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout


class _WithoutAudioAndVideo(ProcessorMixin):
    """Sits between Gemma4Processor and ProcessorMixin: the stock __init__ passes every sub-processor
    by keyword, and ProcessorMixin refuses those the image-only class does not declare."""

    def __init__(self, *args, feature_extractor=None, video_processor=None, **kwargs):
        ProcessorMixin.__init__(self, *args, **kwargs)


def image_only_processor_class() -> type:
    """Gemma4Processor with only the image processor and the tokenizer.

    ProcessorMixin reads the sub-processors off the __init__ signature, so from_pretrained loads
    those two. The stock __init__ still runs (it sets the image, boi/eoi, video and audio tokens the
    call reads); its missing sub-processors are dropped by _WithoutAudioAndVideo, next in the MRO. The
    subclass keeps the stock class name, so a processor saved from it loads as the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        Gemma4Processor.__init__(self, None, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type("Gemma4Processor", (Gemma4Processor, _WithoutAudioAndVideo),
                {"__init__": __init__, "__module__": __name__,
                 "__doc__": "Gemma4Processor for images only (no torchvision)."})


def load_processor(name: str, cache_dir: str | None):
    """The stock processor where torchvision imports, else the image-only one on the PIL backend."""
    if torchvision_imports():
        return AutoProcessor.from_pretrained(name, cache_dir=cache_dir)
    return image_only_processor_class().from_pretrained(name, cache_dir=cache_dir, backend="pil")


def pooled_grid(position_ids: torch.Tensor, pooling: int) -> tuple[int, int]:
    """(rows, cols) of the pooled map of one image from its [max_patches, 2] (x, y) patch positions
    (padding patches are (-1, -1))."""
    real = position_ids[(position_ids >= 0).all(-1)]
    patch_cols, patch_rows = (int(v) + 1 for v in real.max(0).values)
    if patch_rows % pooling or patch_cols % pooling or real.shape[0] != patch_rows * patch_cols:
        raise RuntimeError(f"patch grid {patch_rows}×{patch_cols} ({real.shape[0]} patches) is not a full raster "
                           f"of {pooling}×{pooling} pooling blocks")
    return patch_rows // pooling, patch_cols // pooling


class Gemma4Adapter(ImageTextAdapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        vision = raw_config.get("vision_config")
        if not vision:
            raise InputError(f"{self.model_name}: config.json vision_config={vision!r}: a text-only Gemma 4 "
                             "checkpoint has no image tokens; use an image-text checkpoint (e.g. google/gemma-4-31B-it)")
        config = self.load(load_processor(self.model_name, self.cache_dir), text_attn)
        self.image_kwargs, call = self.image_kwargs_of(cfg)
        settings = self.processor.image_processor._merge_and_standardize_kwargs(**call)
        for key in ("pooling_kernel_size", "patch_size"):
            expected = getattr(config.vision_config, key)
            if settings[key] != expected:
                raise InputError(f"{self.model_name}: image processor {key}={settings[key]} but the vision tower's is "
                                 f"{expected}; fix the checkpoint's preprocessor settings or model.image_kwargs.{key}")
        self.pooling = config.vision_config.pooling_kernel_size
        # A generated placeholder would ask for features on the capture pass of generate mode.
        self.generate_kwargs = {"suppress_tokens": [t for t in (config.image_token_id, config.video_token_id,
                                                                config.audio_token_id) if t is not None]}

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        # One image per prompt, nested per row; the template starts with <bos> already.
        batch = self.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        layouts = []
        for image, position_ids in zip(images, batch["image_position_ids"]):
            width, height = image.size
            grid = pooled_grid(position_ids, self.pooling)                             # (rows, cols)
            layouts.append(Layout.single("aspect_resize", (width, height), grid, (0, 0, width, height)))
        return self.finish(batch, layouts, prompts, "image_position_ids")
