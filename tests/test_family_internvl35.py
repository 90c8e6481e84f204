"""InternVL3.5 in Hugging Face format (OpenGVLab/InternVL3_5-*-HF, model_type internvl) runs on the InternVL
adapter: a tiny random InternVLForConditionalGeneration with a Qwen3 text model and the RELEASED image settings
(448 px tiles of 14 px patches, pixel shuffle 0.5 → 256 tokens a view, 1..12 tiles chosen by aspect ratio, a
thumbnail when there is more than one tile; crop_to_patches saved false, turned on by the processor's default)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import InternVLVisionConfig, Qwen3Config

from localization_heads.families import load_adapter
from localization_heads.families.internvl import InternVLAdapter
from tests.family_checks import assert_capture_equals_eager, coord_image, load_pair, model_cfg
from tests.test_family_internvl import CHAT_TEMPLATE, save_checkpoint
from tests.tiny_vlm import assert_layout_matches_trace, word_tokenizer

# InternVL3.5-8B-HF: vision image_size 448, patch 14, downsample_ratio 0.5, image_seq_length 256; the
# preprocessor is GotOcr2's with size 448, min_patches 1, max_patches 12, crop_to_patches false, ImageNet mean/std.
TILE, PATCH, SEQ, MAX_PATCHES = 448, 14, 256, 12
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<|im_start|>"], pad="<|endoftext|>", eos="<|im_end|>", chat_template=CHAT_TEMPLATE,
                         named={"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    vision = InternVLVisionConfig(image_size=[TILE, TILE], patch_size=[PATCH, PATCH], hidden_size=16,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    text = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return save_checkpoint(out, tok, vision, text, seq=SEQ, max_patches=MAX_PATCHES, image_mean=IMAGENET_MEAN,
                           image_std=IMAGENET_STD)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("internvl35"))


def test_released_settings_give_256_tokens_a_view(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint))
    assert isinstance(adapter, InternVLAdapter) and adapter.side == 16
    assert adapter.model.config.text_config.model_type == "qwen3"


def decoded_token_boxes(pixel_values: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """[views, 256, 4] original-image box of the pixels each token is made of, decoded from a coordinate
    image's pixel_values [views, 3, 448, 448]: token (i, j) of a view is its 28×28-pixel block (i, j) (2×2
    patches, pixel shuffle — that order is traced through the model in test_family_internvl.py)."""
    width, height = image_size
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    decoded = (pixel_values.float() * std + mean)[:, :2]                         # [views, 2, 448, 448] in [0, 1]
    block = PATCH * 2
    side = TILE // block
    blocks = decoded.reshape(-1, 2, side, block, side, block).permute(0, 2, 4, 1, 3, 5).reshape(-1, side * side, 2,
                                                                                               block * block)
    scale = torch.tensor([width, height]).view(1, 1, 2)
    low, high = blocks.amin(dim=-1) * scale, blocks.amax(dim=-1) * scale        # [views, 256, 2] pixel centres
    half_step = (high - low) / (block - 1) / 2
    return torch.cat([low - half_step, high + half_step], dim=-1).numpy()


@pytest.mark.parametrize("size, tiles", [((150, 60), (2, 5)), ((120, 240), (2, 1)), ((255, 40), (1, 6)),
                                         ((64, 64), (1, 1))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, tiles):
    """At the released settings: tiles row-major over the image stretched to rows·448 × cols·448, then the
    thumbnail; each token's pixels decode to its cell within 1 px."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    rows, cols = tiles
    assert [m.name for m in layout.maps] == ([f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] + ["thumbnail"]
                                             if rows * cols > 1 else ["grid"])
    assert prepared.image_positions[0].numel() == SEQ * len(layout.maps)
    assert_layout_matches_trace(layout, decoded_token_boxes(prepared.inputs["pixel_values"], size))


def test_capture_equals_eager(checkpoint):
    """(120, 240): 2 tiles + thumbnail = 768 tokens; (64, 64): one view of 256; left-padded together."""
    fast, eager = load_pair(checkpoint)
    assert_capture_equals_eager(fast, eager, [coord_image(120, 240), coord_image(64, 64)], ["the red circle .", "a cat"])
