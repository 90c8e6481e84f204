"""Mistral 3: a tiny random Mistral3ForConditionalGeneration (Pixtral tower, 2×2 patch merging, Mistral
text) with the Pixtral image processor, a Mistral-style tokenizer and template, saved as the hub holds
it (PixtralProcessor settings included) and loaded back through load_adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.mistral3 import Mistral3Adapter
from localization_heads.families.qwen_vl import torchvision_imports
from tests.family_checks import assert_generate_batch_equals_eager, assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# Patch 4 px, 2×2 merging → a token is 8×8 px of the resized image; images are scaled down to fit
# 64 px (Mistral Small 3.1: patch 14, 28 px tokens, 1540 px).
PATCH, MERGE, LONGEST_EDGE = 4, 2, 64
# Mistral Small 3.1's template for one user turn (its default system prompt left out).
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- if message['role'] == 'user' -%}[INST]"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for block in message['content'] -%}{%- if block['type'] == 'image' -%}[IMG]"
    "{%- elif block['type'] == 'text' -%}{{ block['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}[/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}{%- endif -%}{%- endfor -%}")
QUERIES = ["the red circle .", "a cat"]


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], pad="<pad>", bos="<s>",
                         eos="</s>", chat_template=CHAT_TEMPLATE)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  head_dim=8, patch_size=PATCH, image_size=LONGEST_EDGE)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=MERGE, vision_feature_layer=-1,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    Mistral3ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH, "width": PATCH}
                             ).save_pretrained(out)
    # What PixtralProcessor.save_pretrained writes (the class needs torchvision to be built at all).
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": PATCH, "spatial_merge_size": MERGE,
         "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mistral3"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def images():
    return [coord_image(150, 60), coord_image(48, 80)]


def test_prompt_is_a_raster_of_image_rows_with_break_and_end_tokens(pair, checkpoint):
    """(150, 60) is scaled to 64 × 25 and rounded up to 64 × 32 px: 4 rows of 8 [IMG], [IMG_BREAK] after
    rows 1-3 and [IMG_END] after row 4; the cells are the [IMG] tokens only."""
    fast, _ = pair
    assert isinstance(fast, Mistral3Adapter) and fast.family == "mistral3"
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["<s>[INST][IMG]the red circle ."]
    tokens = fast.tokenizer.convert_ids_to_tokens(prepared.inputs["input_ids"][0].tolist())
    assert tokens[:2] == ["<s>", "[INST]"] and tokens[-1] == "."
    image = tokens[2:2 + 4 * 9]
    assert image == (["[IMG]"] * 8 + ["[IMG_BREAK]"]) * 3 + ["[IMG]"] * 8 + ["[IMG_END]"]
    (cell_map,) = prepared.layouts[0].maps
    assert cell_map.grid == (4, 8) and cell_map.box == (0.0, 0.0, 150.0, 60.0)
    assert [tokens[i] for i in prepared.image_positions[0]] == ["[IMG]"] * 32
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .[/INST]")


def test_capture_equals_eager_on_one_image_and_a_left_padded_batch(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


@pytest.mark.parametrize("size, grid", [
    ((150, 60), (4, 8)),      # scaled down to 64 × 25, rounded up to 64 × 32 px
    ((48, 80), (8, 5)),       # 38 × 64 → 40 × 64 px
    ((30, 20), (3, 4)),       # small enough: only rounded up, 32 × 24 px
])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, grid):
    """Geometry proven through the model: with the Pixtral tower's attention outputs zeroed every patch
    feature is local, so the pixels whose gradient reaches a merged token are its 2×2 patches; decoded on
    a coordinate image they span the token's layout cell (≤ 1 px)."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    assert layout.maps[0].grid == grid
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_tower, "attention.o_proj") == 2
    sizes = prepared.inputs["image_sizes"]

    def features(pixels):
        out = model.model.get_image_features(pixels, sizes, vision_feature_layer=model.config.vision_feature_layer)
        return torch.stack(out.pooler_output)                                    # [1, V, D]

    improc = adapter.processor.image_processor
    traced = traced_cell_boxes(features, prepared.inputs["pixel_values"], improc.image_mean, improc.image_std, size)
    assert_layout_matches_trace(layout, traced)


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images)


def test_generate_mode_row_equals_eager(pair):
    assert_generate_batch_equals_eager(*pair, images(), QUERIES)


def test_a_checkpoint_whose_image_token_the_tokenizer_does_not_know_is_refused(checkpoint, tmp_path):
    for name in checkpoint.iterdir():
        (tmp_path / name.name).symlink_to(name)
    (tmp_path / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text()) | {"image_token_index": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="image_token_index=0 but the tokenizer's \\[IMG\\] is"):
        load_adapter(model_cfg(tmp_path))


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (PixtralProcessor imports it)")
def test_the_adapter_feeds_what_the_stock_pixtral_processor_gives(checkpoint, pair):
    from transformers import AutoProcessor

    fast, _ = pair
    stock = AutoProcessor.from_pretrained(checkpoint)
    assert type(stock).__name__ == "PixtralProcessor"
    stock.tokenizer.padding_side = "left"
    prepared = fast.prepare(images(), QUERIES)
    theirs = stock(images=images(), text=prepared.prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(prepared.inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(prepared.inputs["image_sizes"], theirs["image_sizes"])
    # Same sizes; the two backends' bicubic resizes round a few pixels to the next 8-bit level.
    one_level = 1.01 / 255 / min(stock.image_processor.image_std)
    torch.testing.assert_close(prepared.inputs["pixel_values"], theirs["pixel_values"], atol=one_level, rtol=0)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=mistral3_small_24b").model
    assert set(model) == set(reference)
    assert model.name.startswith("mistralai/Mistral-Small-3.") and model.conv_mode == "auto"
