"""Aya Vision: a tiny random AyaVisionForConditionalGeneration (SigLIP tower, pixel shuffle 2, Cohere2 text with
sliding-window and full layers) with the real processor classes, saved and loaded back through load_adapter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, Cohere2Config, SiglipVisionConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from localization_heads.families.aya_vision import AyaVisionAdapter
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# 64 px tiles of 8 px patches → 8×8 patches → pixel shuffle 2 → 4×4 = 16 tokens a view
# (aya-vision-8b: 364 / 14 = 26 → 13×13 = 169), up to 6 tiles (the hub: 12).
TILE, PATCH, MAX_PATCHES = 64, 8, 6
TILE_TOKENS = [f"TILE_{k}" for k in range(1, MAX_PATCHES + 1)] + ["TILE_GLOBAL"]
# The aya-vision template for one user turn (system preamble left out).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|START_OF_TURN_TOKEN|>' + ('<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>') }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                          "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", *TILE_TOKENS],
                         pad="<PAD>", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", chat_template=CHAT_TEMPLATE,
                         named={"image_token": "<image>"})
    vision = SiglipVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)
    text = Cohere2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=12, max_position_embeddings=1024,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                             image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
                             vision_feature_select_strategy="full", vision_feature_layer=-1)
    AyaVisionForConditionalGeneration(config).save_pretrained(out)
    images = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                      max_patches=MAX_PATCHES, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    AyaVisionProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, img_size=TILE, downsample_factor=2,
                       chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("aya_vision"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_prompt_tiles_and_separators(pair):
    fast, _ = pair
    assert isinstance(fast, AyaVisionAdapter) and fast.family == "aya_vision" and fast.side == 4
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.prompts == ["<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>the red circle ."]
    tokens = fast.tokenizer.convert_ids_to_tokens(prepared.inputs["input_ids"][0])
    assert tokens[-1] == "."
    names = [m.name for m in prepared.layouts[0].maps]
    assert names == ["tile_0_0", "tile_0_1", "tile_0_2", "thumbnail"]
    start = tokens.index("<|START_OF_IMG|>")
    expected = ["<|START_OF_IMG|>", *[t for k in (1, 2, 3) for t in [f"TILE_{k}"] + ["<|IMG_PATCH|>"] * 16],
                "TILE_GLOBAL", *["<|IMG_PATCH|>"] * 16, "<|END_OF_IMG|>"]
    assert tokens[start:start + len(expected)] == expected


def test_capture_equals_eager(pair):
    """(150, 60): 3×1 tiles + global; (48, 80): 2×3 tiles + global; sliding-window layers shorter than the prompt."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


@pytest.mark.parametrize("size, tiles", [((150, 60), (1, 3)), ((48, 80), (3, 2)), ((64, 60), (1, 1))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, tiles):
    """Through the model (local SigLIP tower, pixel shuffle included): each token's pixels decode to its cell."""
    from localization_heads.families import load_adapter
    from tests.family_checks import model_cfg

    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    rows, cols = tiles
    assert len(prepared.layouts[0].maps) == (rows * cols + 1 if rows * cols > 1 else 1)
    model, config = adapter.model, adapter.model.config
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 2

    def image_features(pixel_values):
        out = model.model.get_image_features(pixel_values, vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
        return out.pooler_output.reshape(pixel_values.shape[0], -1, config.text_config.hidden_size)   # [views, 16, D]

    traced = traced_cell_boxes(image_features, prepared.inputs["pixel_values"], [0.5] * 3, [0.5] * 3, size)
    assert_layout_matches_trace(prepared.layouts[0], traced)


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images)
