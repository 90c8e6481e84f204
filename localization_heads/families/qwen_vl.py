"""Adapter for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (model_type qwen2_vl / qwen2_5_vl / qwen3_vl /
qwen3_5 / qwen3_5_moe; Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
Qwen3VLForConditionalGeneration, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration).

Qwen3.5 is Qwen3-VL's vision side and processor (Qwen3VLProcessor, 16 px patches, merge 2) in front of a
hybrid text model: three Gated-DeltaNet (linear attention) layers, then one full-attention layer
(text_config.layer_types). Only the full-attention layers have heads, so records hold those
(adapter.attention_layers, meta["layers"] = [3, 7, 11, ...]). The linear layers zero the hidden states
of padding tokens (the model's 2-D attention mask), so a left-padded row keeps the recurrent state of
the same prompt run alone (tests/test_family_qwen.py checks it to 1e-5).

Tokens: the processor expands the template's <|image_pad|> into ONE run of rows·cols tokens, where
image_grid_thw = (1, patch_rows, patch_cols) and rows, cols = patch_rows / merge, patch_cols / merge
(merge 2: each token is a 2×2 block of patches), in raster order.
Geometry: smart_resize stretches the whole image to multiples of patch·merge (28 px; Qwen3-VL 32 px),
each axis rounded on its own, so the one map covers [0, 0, W, H] with separate x and y scales.
Positions: M-RoPE. The model builds 3-D positions from mm_token_type_ids, image_grid_thw and the
attention mask (left padding included); 1-D position_ids would override them, so none are passed.
Prompt: the checkpoint's chat template, image then expression in the user turn (chat_prompt).

Processor: where torchvision imports, the stock AutoProcessor. Without it (the CPU torch wheel cannot
load torchvision) the stock class cannot be built, because its video processor needs torchvision; the
same class minus the video processor is used, with the PIL image processor (Qwen2VLImageProcessorPil).
For images both compute the same smart_resize and patches (tests/test_family_qwen.py compares their
input_ids, image_grid_thw and pixel_values where torchvision exists).
"""
from __future__ import annotations

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

from localization_heads.families.base import ImageTextAdapter, Prepared, chat_prompt, token_positions
from localization_heads.dataio import InputError
from localization_heads.layout import Layout

PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor", "qwen3_5_moe": "Qwen3VLProcessor"}


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:   # missing, or built for another torch ("operator torchvision::nms does not exist")
        return False
    return True


def image_only_processor_class(model_type: str, classes: dict[str, str] = PROCESSOR_CLASSES) -> type:
    """The family's processor class (`classes[model_type]`, a transformers class name) without the video processor.

    ProcessorMixin reads its sub-processors off the __init__ signature, so from_pretrained loads only
    the image processor and the tokenizer. The stock __init__ still runs (it sets the image, video and
    vision-start tokens each class expects); ProcessorMixin pairs its positional sub-processors with
    the two names of this signature, so the video slot (None) is dropped. The subclass keeps the stock
    class name, so a processor saved from it loads as the stock class where torchvision exists."""
    stock = getattr(transformers, classes[model_type])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    return type(stock.__name__, (stock,), {"__init__": __init__, "__module__": __name__,
                                           "__doc__": f"{stock.__name__} for images only (no torchvision)."})


def load_processor(name: str, model_type: str, cache_dir: str | None, classes: dict[str, str] = PROCESSOR_CLASSES):
    """The stock processor where torchvision imports, else the image-only one on the PIL backend."""
    if torchvision_imports():
        return AutoProcessor.from_pretrained(name, cache_dir=cache_dir)
    # backend="pil": transformers picks the torchvision image processor whenever the package is
    # installed, even one that cannot import.
    return image_only_processor_class(model_type, classes).from_pretrained(name, cache_dir=cache_dir, backend="pil")


class QwenVLAdapter(ImageTextAdapter):
    # model_type → processor class; GLM-4.xV (families/glm4v.py) reuses this adapter with its own.
    processor_classes = PROCESSOR_CLASSES
    family_title = "Qwen-VL"

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        model_type = raw_config.get("model_type")
        if model_type not in self.processor_classes:
            raise InputError(f"{self.model_name}: model_type {model_type!r} is not one of the {self.family_title} types "
                             f"{', '.join(self.processor_classes)}; use model.family=auto")
        config = self.load(load_processor(self.model_name, model_type, self.cache_dir, self.processor_classes), text_attn)
        self.merge = config.vision_config.spatial_merge_size
        processor_merge = self.processor.image_processor.merge_size
        if processor_merge != self.merge:   # the token grid would not be image_grid_thw / merge
            raise InputError(f"{self.model_name}: the image processor's merge_size={processor_merge} differs from the "
                             f"vision tower's spatial_merge_size={self.merge}; fix the checkpoint's processor config")
        # A generated image or video placeholder would ask for visual features on the capture pass.
        self.generate_kwargs = {"suppress_tokens": [config.image_token_id, config.video_token_id]}

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        image_positions = token_positions(batch["input_ids"], self.image_token_id)          # per row [V_b]
        layouts = []
        for b, (image, (_, patch_rows, patch_cols)) in enumerate(zip(images, batch["image_grid_thw"].tolist())):
            grid = (patch_rows // self.merge, patch_cols // self.merge)                       # (rows, cols)
            positions = image_positions[b]
            if positions.numel() != grid[0] * grid[1] or not bool((positions.diff() == 1).all()):
                raise RuntimeError(f"row {b}: expected one run of {grid[0] * grid[1]} image tokens for grid {grid}, "
                                   f"got {positions.numel()}")
            width, height = image.size
            layouts.append(Layout.single("smart_resize", (width, height), grid, (0, 0, width, height)))
        return self.finish(batch, layouts, prompts, "image_grid_thw", image_positions)

    def call_inputs(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        """The processor's tensors as they are: no position_ids (M-RoPE, see the module docstring)."""
        return dict(prepared.inputs)
