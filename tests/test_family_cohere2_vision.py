"""Command A Vision: a tiny random Cohere2VisionForConditionalGeneration (SigLIP tower, pixel shuffle 2, SwiGLU
projector, Cohere2 text with sliding-window and full layers) with the real Cohere2VisionProcessor, saved and
loaded back through load_adapter. Cohere2VisionImageProcessor exists only on the torchvision backend: without
torchvision only the refusal is tested."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Cohere2Config, Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, SiglipVisionConfig

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.qwen_vl import torchvision_imports
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, coord_image, coord_images,
                                 load_pair, model_cfg)
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# 64 px tiles of 8 px patches → 8×8 patches → pixel shuffle 2 → 4×4 = 16 tokens a view, up to 6 tiles
# (command-a-vision-07-2025: 512 px tiles of 16 px patches → 16×16 = 256 tokens, up to 12 tiles).
TILE, PATCH, SIDE, MAX_PATCHES = 64, 8, 4, 6
NAMED = {"image_token": "<|IMG_PATCH|>", "boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>",
         "img_line_break_token": "<|IMG_LINE_BREAK|>"}
# The Command A template for one user turn (system preamble left out); the image is the tokenizer's image token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|START_OF_TURN_TOKEN|>' + ('<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>') }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|IMG_PATCH|>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' }}{% endif %}")
# (W, H) → tiles (rows, cols) by the least upscaling: (150, 60) → 1×3 + global (the closest aspect ratio, Aya
# Vision's rule, would also give 1×3), (48, 80) → 2×1 + global (Aya: 3×2), (60, 50) → one tile.
WIDE, TALL, SMALL = (150, 60), (48, 80), (60, 50)

needs_torchvision = pytest.mark.skipif(not torchvision_imports(), reason="Cohere2VisionImageProcessor needs torchvision")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>"],
                         pad="<PAD>", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", named=NAMED,
                         chat_template=CHAT_TEMPLATE)
    vision = SiglipVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)
    text = Cohere2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=12, max_position_embeddings=1024,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Cohere2VisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                                 alignment_intermediate_size=64, image_token_id=tok.image_token_id)
    Cohere2VisionForConditionalGeneration(config).save_pretrained(out)
    from transformers import Cohere2VisionProcessor
    from transformers.models.cohere2_vision.image_processing_cohere2_vision import Cohere2VisionImageProcessor

    images = Cohere2VisionImageProcessor(size={"height": TILE, "width": TILE}, max_patches=MAX_PATCHES, patch_size=SIDE)
    Cohere2VisionProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if not torchvision_imports():
        pytest.skip("Cohere2VisionImageProcessor needs torchvision")
    return write_checkpoint(tmp_path_factory.mktemp("cohere2_vision") / "tiny-cohere2-vision")


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


@pytest.mark.skipif(torchvision_imports(), reason="the refusal is for machines without torchvision")
def test_without_torchvision_the_checkpoint_is_refused_with_what_to_install(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "cohere2_vision"}))
    with pytest.raises(InputError, match="needs torchvision"):
        load_adapter(model_cfg(tmp_path))


@needs_torchvision
def test_prompt_tiles_line_breaks_and_query_token(pair, checkpoint):
    """(150, 60): 1×3 tiles and the global view, each 16 image tokens closed by <|IMG_LINE_BREAK|>; only the
    image tokens are cells; the prompt ends with the expression."""
    fast, _ = pair
    assert fast.family == "cohere2_vision" and fast.side == SIDE
    prepared = fast.prepare([coord_image(*WIDE)], ["the red circle ."])
    assert prepared.prompts == ["<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><|IMG_PATCH|>the red circle ."]
    assert [m.name for m in prepared.layouts[0].maps] == ["tile_0_0", "tile_0_1", "tile_0_2", "thumbnail"]
    tokens = fast.tokenizer.convert_ids_to_tokens(prepared.inputs["input_ids"][0])
    start = tokens.index("<|START_OF_IMG|>")
    expected = ["<|START_OF_IMG|>", *(["<|IMG_PATCH|>"] * SIDE * SIDE + ["<|IMG_LINE_BREAK|>"]) * 4, "<|END_OF_IMG|>"]
    assert tokens[start:start + len(expected)] == expected and tokens[-1] == "."
    cells = [p for p, t in enumerate(tokens) if t == "<|IMG_PATCH|>"]
    assert prepared.image_positions[0].tolist() == cells
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare([coord_image(*WIDE)], ["a cat"]).prompts[0].endswith(
        "a cat<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>")


@needs_torchvision
def test_capture_equals_eager_on_sliding_and_full_layers(pair):
    """(150, 60): 1×3 tiles + global; (48, 80): 2×1 tiles + global; the sliding window (12) is shorter than
    either prompt, and the shorter one is left-padded."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(*WIDE), coord_image(*TALL)], ["the red circle .", "a cat"])


@needs_torchvision
@pytest.mark.parametrize("size, tiles", [(WIDE, (1, 3)), (TALL, (2, 1)), (SMALL, (1, 1))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, tiles):
    """Through the model (SigLIP tower made local, the projector's pixel shuffle included): on a coordinate
    image each token's pixels decode to its layout cell, in every tile and the global view."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    rows, cols = tiles
    assert adapter.tile_grid(size) == tiles
    assert len(prepared.layouts[0].maps) == (rows * cols + 1 if rows * cols > 1 else 1)
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 2

    def image_features(pixel_values):                                            # [views, 16, D]
        return model.model.get_image_features(pixel_values).pooler_output

    improc = adapter.processor.image_processor
    traced = traced_cell_boxes(image_features, prepared.inputs["pixel_values"], improc.image_mean, improc.image_std,
                               size)
    assert_layout_matches_trace(prepared.layouts[0], traced)


@needs_torchvision
def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "tall": TALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


@needs_torchvision
def test_a_processor_that_does_not_fit_the_tower_is_refused(checkpoint):
    with pytest.raises(InputError, match=r"image processor size=128 \(model: 64\)"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"size": {"height": 128, "width": 128}}))


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=command_a_vision").model
    assert set(model) - {"image_kwargs"} == set(reference)
    assert model.name == "CohereLabs/command-a-vision-07-2025" and model.dtype == "bfloat16"
