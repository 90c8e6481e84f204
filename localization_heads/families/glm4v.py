"""Adapter for GLM-4.1V-Thinking (model_type glm4v), GLM-4.5V (glm4v_moe) and GLM-4.6V (glm46v):
Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration, Glm46VForConditionalGeneration.

The image path is Qwen2-VL's (families/qwen_vl.py), so this is QwenVLAdapter with GLM's processor classes:
- tokens: the template's <|begin_of_image|><|image|><|end_of_image|> becomes ONE run of rows·cols <|image|>
  tokens between the two markers, rows, cols = image_grid_thw h / merge, w / merge (merge 2: each token is
  the vision tower's 2×2 conv-downsample of a 2×2 block of patches), in raster order;
- geometry: GLM's smart_resize stretches the whole image to multiples of patch·merge (28 px), each axis
  rounded on its own: one map over [0, 0, W, H] with separate x and y scales;
- positions: GLM's 3-D RoPE, built by the model from mm_token_type_ids, image_grid_thw and the attention
  mask (left padding included); no 1-D position_ids are passed;
- processor: the stock one where torchvision imports; else the same class without its video processor,
  on the PIL image processor (Glm4vImageProcessorPil / Glm46VImageProcessorPil).
Prompt: the checkpoint's chat template ("[gMASK]<sop><|user|>\\n<image>{expression}"); the query token is
the expression's last token (model.query_at=generation_prompt: the end of the template's "<|assistant|>"
header, which the Thinking models follow with their reasoning).
"""
from __future__ import annotations

from localization_heads.families.qwen_vl import QwenVLAdapter

# GLM-4.5V's hub processor is Glm4vProcessor; GLM-4.6V has its own (same image path).
PROCESSOR_CLASSES = {"glm4v": "Glm4vProcessor", "glm4v_moe": "Glm4vProcessor", "glm46v": "Glm46VProcessor"}


class Glm4vAdapter(QwenVLAdapter):
    processor_classes = PROCESSOR_CLASSES
    family_title = "GLM-4.xV"
