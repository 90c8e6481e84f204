"""DeepSeek-VL and DeepSeek-VL hybrid: tiny random checkpoints (SigLIP tower; the hybrid adds a SAM
encoder) with the real processor classes, the released chat template and an offline tokenizer, saved
and loaded back through load_adapter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLHybridConfig,
                          DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor, DeepseekVLProcessor)
from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
    DeepseekVLHybridImageProcessorPil)

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.deepseek_vl import DeepseekVLAdapter, pad_square_box
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_generate_batch_equals_eager,
                                 coord_image, load_pair, model_cfg)
from tests.tiny_vlm import traced_cell_boxes, word_tokenizer, zero_attention_outputs

# SigLIP 64 px / patch 8 → 8×8 tokens (released: 384 / 16 → 24×24); the hybrid's SAM sees the square at
# 128 px / patch 8 (released: 1024 / 16).
IMAGE, PATCH, HIGH_RES = 64, 8, 128
KINDS = ("deepseek_vl", "deepseek_vl_hybrid")
# The released checkpoints' template (deepseek-community/deepseek-vl-7b-chat).
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<｜end▁of▁sentence｜>'] %}{% set i = 0 %}You are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language.\n\n{% for message in messages %}{% if message['role']|lower == 'user' %}"
    "User: {% elif message['role']|lower == 'assistant' %}Assistant:{% if not (loop.last and not add_generation_prompt "
    "and message['content'][0]['type']=='text' and message['content'][0]['text']=='') %} {% endif %}{% else %}"
    "{{ message['role'].capitalize() }}: {% endif %}{% for content in message['content'] %}{% if content['type'] == "
    "'image' %}<image_placeholder>{% elif content['type'] == 'text' %}{% set text = content['text'] %}{% if loop.first "
    "%}{% set text = text.lstrip() %}{% endif %}{% if loop.last %}{% set text = text.rstrip() %}{% endif %}{% if not "
    "loop.first and message['content'][loop.index0-1]['type'] == 'text' %}{{ ' ' + text }}{% else %}{{ text }}"
    "{% endif %}{% endif %}{% endfor %}{% if not loop.last or add_generation_prompt %}{% if message['role']|lower == "
    "'user' %}{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "Assistant:{% endif %}")


def text_config(tok) -> dict:
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def vision_config() -> dict:
    return dict(model_type="siglip_vision_model", image_size=IMAGE, patch_size=PATCH, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def write_checkpoint(out: Path, kind: str = "deepseek_vl") -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["User:", "Assistant:"], pad="<pad>", bos="<｜begin▁of▁sentence｜>",
                         eos="<｜end▁of▁sentence｜>", named={"image_token": "<image_placeholder>"},
                         chat_template=CHAT_TEMPLATE)
    image_token_id = tok.convert_tokens_to_ids("<image_placeholder>")
    tokens = (IMAGE // PATCH) ** 2
    if kind == "deepseek_vl":
        model = DeepseekVLForConditionalGeneration(DeepseekVLConfig(
            text_config=text_config(tok), vision_config=vision_config(), image_token_id=image_token_id))
        processor = DeepseekVLProcessor(DeepseekVLImageProcessorPil(size={"height": IMAGE, "width": IMAGE}), tok,
                                        chat_template=CHAT_TEMPLATE, num_image_tokens=tokens)
    else:
        sam = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
                   num_attention_heads=4, image_size=HIGH_RES, patch_size=PATCH, mlp_dim=64, global_attn_indexes=[1],
                   window_size=4)
        model = DeepseekVLHybridForConditionalGeneration(DeepseekVLHybridConfig(
            text_config=text_config(tok), vision_config=vision_config(), high_res_vision_config=sam,
            image_token_id=image_token_id))
        with torch.no_grad():   # zero at init: let the SAM global-attention branch count as in the released model
            model.model.high_res_vision_alpha.fill_(0.5)
        images = DeepseekVLHybridImageProcessorPil(size={"height": IMAGE, "width": IMAGE},
                                                   high_res_size={"height": HIGH_RES, "width": HIGH_RES})
        processor = DeepseekVLHybridProcessor(images, tok, chat_template=CHAT_TEMPLATE, num_image_tokens=tokens)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


QUERIES = ["the red circle .", "a cat"]


def images():
    return [coord_image(150, 60), coord_image(48, 80)]


def test_prompt_is_the_chat_template_and_the_query_is_the_expressions_last_token(pair, checkpoint):
    fast, _ = pair
    assert isinstance(fast, DeepseekVLAdapter) and fast.family == "deepseek_vl"
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts[0].startswith("You are a helpful language and vision assistant.")
    assert prepared.prompts[0].endswith("\n\nUser: <image_placeholder>the red circle .")
    ids = prepared.inputs["input_ids"][0]
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    positions = prepared.image_positions[0]
    assert positions.numel() == 64 and torch.equal(positions, torch.arange(positions[0], positions[0] + 64))
    assert fast.tokenizer.convert_ids_to_tokens(ids[positions[-1] + 1: positions[-1] + 2].tolist()) == ["the"]
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .\n\nAssistant:")


def test_capture_equals_eager_on_one_image_and_a_left_padded_batch(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def test_generate_mode_row_equals_eager(pair):
    fast, eager = pair
    assert_generate_batch_equals_eager(fast, eager, images(), QUERIES)


@pytest.mark.parametrize("size, side, box", [
    # 150×60 at side 64: 64 × 26 px (60·64/150 = 25.6 rounds up), 19 rows of padding above.
    ((150, 60), 64, (0.0, -19 * 60 / 26, 150.0, 45 * 60 / 26)),
    # 48×80: 38 × 64 px (38.4), 13 columns of padding left, 13 right.
    ((48, 80), 64, (-13 * 48 / 38, 0.0, 51 * 48 / 38, 80.0)),
    # 300×4: the short side stops at min_size 14 instead of 1 px; 25 rows above.
    ((300, 4), 64, (0.0, -25 * 4 / 14, 300.0, 39 * 4 / 14)),
    ((70, 70), 64, (0.0, 0.0, 70.0, 70.0)),
])
def test_the_grid_spans_the_padded_square(size, side, box):
    assert pad_square_box(size, side, 14) == pytest.approx(box)


def test_every_cell_inside_the_image_covers_the_pixels_its_token_is_made_of(checkpoint):
    """Through the model: with the SigLIP tower's attention outputs zeroed, the pixels whose gradient
    reaches a token decode (coordinate image) to its cell (≤ 1 px); cells on the padding see only the
    mean colour."""
    adapter = load_adapter(model_cfg(checkpoint))
    model = adapter.model.model
    assert zero_attention_outputs(model.vision_model, "self_attn.out_proj") == 2
    improc = adapter.processor.image_processor
    for size in [(150, 60), (48, 80)]:
        prepared = adapter.prepare([coord_image(*size)], QUERIES[:1])
        extra = {k: v for k, v in prepared.inputs.items() if k == "high_res_pixel_values"}

        def features(pixels):
            return model.get_image_features(pixels, **extra).pooler_output                  # [1, V, D]

        traced = traced_cell_boxes(features, prepared.inputs["pixel_values"], improc.image_mean, improc.image_std, size)
        (cells,) = prepared.layouts[0].maps
        boxes = cell_boxes(cells)
        width, height = size
        inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
        assert inside.sum() >= 16
        assert np.abs(boxes[inside] - traced[0][inside]).max() <= 1.0
        padding = (boxes[:, 3] <= 0) | (boxes[:, 1] >= height) | (boxes[:, 2] <= 0) | (boxes[:, 0] >= width)
        assert padding.sum() >= 8
        pixels = prepared.inputs["pixel_values"][0].view(3, 8, 8, 8, 8).permute(1, 3, 0, 2, 4).reshape(64, 3, -1)
        mean = (torch.tensor(improc.background_color) / 255 - torch.tensor(improc.image_mean)) / torch.tensor(improc.image_std)
        torch.testing.assert_close(pixels[torch.from_numpy(padding)], mean[None, :, None].expand(int(padding.sum()), 3, 64),
                                   atol=1e-5, rtol=0)


def test_hybrid_high_res_features_are_centred_in_their_cell(checkpoint):
    """The SAM branch (attention outputs zeroed): the high-res pixels that reach each token's features
    (3.5 cells wide here, after the neck, the resize and two stride-2 convolutions) are centred inside
    its own cell — here a quarter cell up and left of its centre, from the stride-2 convolutions."""
    adapter = load_adapter(model_cfg(checkpoint))
    if adapter.model_type != "deepseek_vl_hybrid":
        pytest.skip("one tower")
    model = adapter.model.model
    assert zero_attention_outputs(model.high_res_vision_model, "attn.proj") == 2
    prepared = adapter.prepare([coord_image(150, 60)], QUERIES[:1])
    pixels = prepared.inputs["high_res_pixel_values"].detach().clone().requires_grad_(True)   # [1, 3, S, S]
    features = model.get_high_res_image_features(pixels).last_hidden_state                   # [1, V, C]
    side, cell = adapter.grid[0], HIGH_RES / adapter.grid[0]
    # Interior cells (the image edge clips the support), one per row, no two on a diagonal.
    for row, col in [(1, 4), (2, 1), (3, 6), (4, 2), (5, 5), (6, 3)]:
        token = row * side + col
        (grad,) = torch.autograd.grad(features[0, token].sum(), pixels, retain_graph=True)
        ys, xs = (grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
        centre = torch.tensor([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2], dtype=torch.float)
        offset = centre - torch.tensor([(col + 0.5) * cell, (row + 0.5) * cell])
        assert offset.abs().max() < cell / 2, f"token {token}: support centred {offset.tolist()} px from its cell"


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images, fixed_token_count=True)


def test_an_image_processor_that_does_not_pad_is_refused(checkpoint):
    with pytest.raises(InputError, match="do_pad=False"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"do_pad": False}))


def test_real_checkpoint_configs_have_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    for name, hub in [("deepseek_vl_1_3b_chat", "deepseek-community/deepseek-vl-1.3b-chat"),
                      ("deepseek_vl_7b_chat", "deepseek-community/deepseek-vl-7b-chat")]:
        model = pipeline.compose("stage=collect", f"model={name}").model
        assert set(model) == set(reference) and model.name == hub and model.conv_mode == "auto"
