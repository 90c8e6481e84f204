"""A tiny random SAM checkpoint (SamModel + SamProcessor with its PIL image processor), written to disk
the way the hub holds facebook/sam-vit-* so tests load it through from_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig, SamVisionConfig
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

# The encoder sees a 64 px square (the real SAM: 1024) cut into 8 px patches: an 8×8 embedding, masks 32×32.
IMAGE, PATCH, WIDTH = 64, 8, 16


def write_sam_checkpoint(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vision = SamVisionConfig(hidden_size=32, output_channels=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                             image_size=IMAGE, patch_size=PATCH, mlp_dim=64, window_size=4, global_attn_indexes=[1],
                             num_pos_feats=WIDTH // 2)
    prompt = SamPromptEncoderConfig(hidden_size=WIDTH, image_size=IMAGE, patch_size=PATCH, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    SamModel(config).save_pretrained(out)
    images = SamImageProcessorPil(size={"longest_edge": IMAGE}, pad_size={"height": IMAGE, "width": IMAGE},
                                  mask_size={"longest_edge": IMAGE // 4}, mask_pad_size={"height": IMAGE // 4, "width": IMAGE // 4})
    SamProcessor(image_processor=images).save_pretrained(out)
    return out
