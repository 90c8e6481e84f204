"""InternVL (Hugging Face format): a tiny random InternVLForConditionalGeneration with the real processor
classes, saved as the hub holds it and loaded back through adapters.load_adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig,
                          Qwen2Config)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from localization_heads.families import load_adapter
from localization_heads.families.internvl import ImageOnlyInternVLProcessor, InternVLAdapter
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# 64 px tiles of 8 px patches → 8×8 patches → pixel shuffle 0.5 → 4×4 = 16 tokens per view
# (InternVL3: 448 / 14 = 32 → 16×16 = 256).
TILE, PATCH, SEQ = 64, 8, 16
# The InternVL3-hf template (its default system turn left out).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def write_checkpoint(out: Path, *, max_patches: int = 6) -> Path:
    """The hub's file set: model, tokenizer (+ chat template), preprocessor_config.json (crop_to_patches
    false there, as on the hub: the processor's class default turns tiling on), processor_config.json,
    and a video_preprocessor_config.json that the stock AutoProcessor would need torchvision for."""
    torch.manual_seed(0)
    tok = word_tokenizer(["<|im_start|>"], pad="<|endoftext|>", eos="<|im_end|>", chat_template=CHAT_TEMPLATE,
                         named={"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    vision = InternVLVisionConfig(image_size=[TILE, TILE], patch_size=[PATCH, PATCH], hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return save_checkpoint(out, tok, vision, text, seq=SEQ, max_patches=max_patches)


def save_checkpoint(out: Path, tok, vision: InternVLVisionConfig, text, *, seq: int, max_patches: int,
                    **image_settings) -> Path:
    """The hub's InternVL file set: model, tokenizer, GotOcr2 preprocessor (tiles of the vision tower's
    image size, crop_to_patches saved false as the hub saves it), processor and video processor configs."""
    tile = vision.image_size[0]
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=seq,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    InternVLForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=False, min_patches=1,
                             max_patches=max_patches, **image_settings).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": seq, "processor_class": "InternVLProcessor"}))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor",
         "size": {"height": tile, "width": tile}}))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_registry_picks_internvl_from_config_json(pair):
    fast, _ = pair
    assert isinstance(fast, InternVLAdapter) and fast.family == "internvl"
    assert isinstance(fast.processor, ImageOnlyInternVLProcessor) and fast.side == 4


def test_prompt_is_the_chat_template_ending_with_the_expression(pair):
    fast, _ = pair
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.prompts == ["<|im_start|>user\n<IMG_CONTEXT>\nthe red circle ."]
    ids = prepared.inputs["input_ids"][0]
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".")
    # One run of image tokens between <img> and </img>.
    positions = prepared.image_positions[0]
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + positions.numel()))
    assert ids[positions[0] - 1] == fast.tokenizer.convert_tokens_to_ids("<img>")
    assert ids[positions[-1] + 1] == fast.tokenizer.convert_tokens_to_ids("</img>")


def test_generation_prompt_ends_with_the_assistant_header(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prompt = adapter.prepare([coord_image(64, 64)], ["the red circle ."]).prompts[0]
    assert prompt.endswith("the red circle .<|im_end|>\n<|im_start|>assistant\n")


def test_image_only_processor_feeds_what_the_stock_processors_feed(pair, checkpoint):
    """Same pixel_values as the stock image processor with the InternVL processor's tiling default, and
    image_seq_length tokens per view; with torchvision installed, the same batch as InternVLProcessor."""
    fast, _ = pair
    images = [coord_image(150, 60), coord_image(48, 80)]
    prompts = [fast.prepare([im], ["the red circle ."]).prompts[0] for im in images]
    ours = fast.processor(images=images, text=prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    stock = AutoImageProcessor.from_pretrained(checkpoint)(images, crop_to_patches=True, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], stock["pixel_values"], atol=0, rtol=0)
    counts = (ours["input_ids"] == fast.image_token_id).sum(dim=1)
    assert counts.tolist() == [SEQ * n for n in stock["num_patches"].tolist()]
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained(checkpoint)(images=images, text=prompts, return_tensors="pt", padding=True,
                                                     add_special_tokens=False)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(ours[key], real[key], atol=0, rtol=0)


def test_capture_equals_eager(pair):
    """(150, 60): 3×1 tiles + thumbnail = 64 tokens; (48, 80): 2×3 tiles + thumbnail = 112 tokens."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


@pytest.mark.parametrize("size, tiles", [((150, 60), (1, 3)), ((48, 80), (3, 2)), ((64, 60), (1, 1))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, tiles):
    """Geometry proven through the model: with a local vision tower, the pixels whose gradient reaches a
    token (pixel shuffle included) decode, on a coordinate image, to that token's cell of the layout."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    rows, cols = tiles
    assert [m.name for m in layout.maps] == ([f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] + ["thumbnail"]
                                             if rows * cols > 1 else ["grid"])
    model, config = adapter.model, adapter.model.config
    assert zero_attention_outputs(model.model.vision_tower, "attention.projection_layer") == 2

    def image_features(pixel_values):
        out = model.model.get_image_features(pixel_values, vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
        return out.pooler_output                                                # [views, 16, D]

    image_processor = adapter.processor.image_processor
    traced = traced_cell_boxes(image_features, prepared.inputs["pixel_values"], image_processor.image_mean,
                               image_processor.image_std, size)
    assert_layout_matches_trace(layout, traced)


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images)


@pytest.mark.parametrize("image_kwargs, names", [
    ({"max_patches": 2}, ["tile_0_0", "tile_0_1", "thumbnail"]),
    ({"crop_to_patches": False}, ["grid"]),
])
def test_image_kwargs_reach_the_processor_and_the_layout(checkpoint, image_kwargs, names):
    """model.image_kwargs override the processor's tiling; the layout follows the same settings (prepare
    checks every row's token count against its layout)."""
    adapter = load_adapter(model_cfg(checkpoint, image_kwargs=image_kwargs))
    prepared = adapter.prepare([coord_image(150, 60)], ["the red circle ."])
    assert [m.name for m in prepared.layouts[0].maps] == names
    assert prepared.image_positions[0].numel() == SEQ * len(names)
