"""Gemma 3: a tiny random Gemma3ForConditionalGeneration with the real processor classes, saved and
loaded back through adapters.load_adapter; sliding-window layers, bidirectional image blocks, pan-and-scan."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from localization_heads.families import load_adapter
from localization_heads.families.gemma3 import Gemma3Adapter
from localization_heads.collector import capture_rows
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_generate_batch_equals_eager,
                                 coord_image, load_pair, model_cfg)
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# 64 px views of 8 px patches → 8×8 patches → 2×2 average pooling → 4×4 = 16 tokens per view
# (Gemma 3: 896 / 14 = 64 → 4×4 pooling → 16×16 = 256).
IMAGE, PATCH, TOKENS = 64, 8, 16
SLIDING_WINDOW = 12          # shorter than a prompt, so sliding layers drop the first image tokens
# Pan-and-scan at this tiny scale (the processor's default minimum crop is 256 px).
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
# The gemma-3-*-it template, system-turn handling left out.
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<start_of_turn>", "<end_of_turn>"], pad="<pad>", bos="<bos>", eos="<eos>",
                         chat_template=CHAT_TEMPLATE,
                         named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                "eoi_token": "<end_of_image>"})
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=SLIDING_WINDOW, max_position_embeddings=1024,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():   # zero at init: every image token would be the same vector
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.save_pretrained(out)
    # do_pan_and_scan saved true, as some checkpoints do: the processor's class default (false) wins.
    images = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, do_pan_and_scan=True)
    Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=TOKENS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


@pytest.fixture(scope="module")
def pan_pair(checkpoint):
    return load_pair(checkpoint, image_kwargs=PAN_AND_SCAN)


def test_registry_picks_gemma3_from_config_json(pair):
    fast, _ = pair
    assert isinstance(fast, Gemma3Adapter) and fast.family == "gemma3" and fast.side == 4


def test_prompt_is_the_chat_template_ending_with_the_expression(pair):
    fast, _ = pair
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.prompts == ["<bos><start_of_turn>user\n<start_of_image>the red circle ."]
    ids = prepared.inputs["input_ids"][0]
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".")
    assert (ids == fast.tokenizer.bos_token_id).sum() == 1 and ids[0] == fast.tokenizer.bos_token_id
    positions = prepared.image_positions[0]            # one block inside <start_of_image> … <end_of_image>
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + TOKENS))
    assert ids[positions[0] - 1] == fast.model.config.boi_token_id
    assert ids[positions[-1] + 1] == fast.model.config.eoi_token_id
    assert torch.equal(prepared.inputs["token_type_ids"][0].nonzero()[:, 0], positions)


def test_generation_prompt_ends_with_the_model_header(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prompt = adapter.prepare([coord_image(64, 64)], ["the red circle ."]).prompts[0]
    assert prompt.endswith("the red circle .<end_of_turn>\n<start_of_turn>model\n")


def test_capture_equals_eager_one_view_per_image(pair):
    """Pan-and-scan off (the processor's default, although the saved config says true): one 4×4 block each."""
    fast, eager = pair
    assert fast.prepare([coord_image(150, 60)], ["a"]).image_positions[0].numel() == TOKENS
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


def test_capture_equals_eager_with_pan_and_scan(pan_pair):
    """(150, 60): the image + 3 crops = 64 tokens; (48, 80): the image + 2 crops = 48 tokens."""
    fast, eager = pan_pair
    counts = [fast.prepare([coord_image(*s)], ["a"]).image_positions[0].numel() for s in [(150, 60), (48, 80)]]
    assert counts == [4 * TOKENS, 3 * TOKENS]
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


def test_capture_sees_the_sliding_window_and_the_bidirectional_image_block(pair):
    """Sliding layers give exactly zero weight to keys older than the window, the full layer does not;
    and the rows change without token_type_ids (the image block would be causal)."""
    fast, _ = pair
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    rows = capture_rows(fast, prepared)[:, 0]                                     # [L, H, N]
    length = rows.shape[-1]
    old = torch.arange(length - SLIDING_WINDOW)                                  # outside the last query's window
    assert rows[[0, 2]][..., old].abs().max() == 0 and rows[1][..., old].min() > 0
    inputs = {k: v for k, v in prepared.inputs.items() if k != "token_type_ids"}
    causal = capture_rows(fast, prepared.with_inputs(inputs))[:, 0]
    assert (causal - rows).abs().max() > 1e-4


@pytest.mark.parametrize("size, pan_and_scan, crops", [
    ((150, 60), False, []),
    ((151, 60), True, [(0, 0, 51, 60), (51, 0, 102, 60), (102, 0, 151, 60)]),     # last crop cut short
    ((48, 81), True, [(0, 0, 48, 41), (0, 41, 48, 81)]),
])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, pan_and_scan, crops):
    """Geometry proven through the model: with a local vision tower, the pixels whose gradient reaches a
    token (4×4 pooling included) decode, on a coordinate image, to that token's cell of the layout."""
    adapter = load_adapter(model_cfg(checkpoint, image_kwargs=PAN_AND_SCAN if pan_and_scan else {}))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    assert [m.box for m in layout.maps[1:]] == [tuple(float(v) for v in box) for box in crops]
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 2
    image_processor = adapter.processor.image_processor
    traced = traced_cell_boxes(lambda pixels: model.model.get_image_features(pixels).pooler_output,
                               prepared.inputs["pixel_values"], image_processor.image_mean, image_processor.image_std, size)
    assert_layout_matches_trace(layout, traced)


def test_cli(checkpoint, tmp_path, images):
    """With pan-and-scan on, the wide and tall images get crops and the square one does not."""
    assert_cli_runs(checkpoint, tmp_path, images,
                    tuple(f"+model.image_kwargs.{key}={value}" for key, value in PAN_AND_SCAN.items()))


def test_generate_mode_row_equals_eager(pan_pair):
    """Generate mode: the first generated token's row over prompt + that token (token_type_ids extended
    with a text token) is the same under capture and eager, on a left-padded batch."""
    fast, eager = pan_pair
    images, queries = [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"]
    assert_generate_batch_equals_eager(fast, eager, images, queries)
