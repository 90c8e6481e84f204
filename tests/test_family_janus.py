"""Janus-Pro: a tiny random JanusForConditionalGeneration (SigLIP-style tower, aligner, Llama text; the VQ
image generator is built but unused) with the real JanusProcessor, the released chat template and system
prompt, and an offline tokenizer, saved and loaded back through load_adapter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from localization_heads.families import load_adapter
from localization_heads.families.janus import JanusAdapter
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_generate_batch_equals_eager,
                                 coord_image, load_pair, model_cfg)
from tests.tiny_vlm import traced_cell_boxes, word_tokenizer, zero_attention_outputs

IMAGE, PATCH = 64, 8          # 8×8 = 64 tokens (Janus-Pro: 384 / 16 → 24×24 = 576)
# The released template (deepseek-community/Janus-Pro-7B).
CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<｜end▁of▁sentence｜>']%}{%set i=0%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: {%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}{%if loop.last%}"
    "{%set text=text.rstrip()%}{%endif%}{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}{%else%}{{text}}{%endif%}{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<|User|>:", "<|Assistant|>:"], pad="<pad>", bos="<｜begin▁of▁sentence｜>",
                         eos="<｜end▁of▁sentence｜>", chat_template=CHAT_TEMPLATE,
                         named={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                "eoi_token": "<end_of_image>"})
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                  projection_dim=64, mlp_ratio=2.0, num_image_tokens=(IMAGE // PATCH) ** 2)
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, num_patches=IMAGE // PATCH, projection_dim=64, image_token_embed_dim=64,
              num_hidden_layers=1, resolution=IMAGE)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    JanusForConditionalGeneration(config).save_pretrained(out)
    JanusProcessor(JanusImageProcessorPil(size={"height": IMAGE, "width": IMAGE}), tok, chat_template=CHAT_TEMPLATE,
                   use_default_system_prompt=True, num_image_tokens=(IMAGE // PATCH) ** 2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("janus"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


QUERIES = ["the red circle .", "a cat"]


def images():
    return [coord_image(150, 60), coord_image(48, 80)]


def test_prompt_is_system_then_user_turn_and_the_query_is_the_expressions_last_token(pair, checkpoint):
    """The processor's system sentence, then "<|User|>: " and the image run between its markers (not
    cells), a newline and the expression."""
    fast, _ = pair
    assert isinstance(fast, JanusAdapter) and fast.family == "janus"
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts[0] == DEFAULT_SYSTEM_PROMPT + "<|User|>: <image_placeholder>\nthe red circle ."
    tokens = fast.tokenizer.convert_ids_to_tokens(prepared.inputs["input_ids"][0].tolist())
    positions = prepared.image_positions[0]
    first, last = int(positions[0]), int(positions[-1])
    assert last - first + 1 == positions.numel() == 64
    assert tokens[first - 2: first] == ["<|User|>:", "<begin_of_image>"]
    assert tokens[last + 1:] == ["<end_of_image>", "the", "red", "circle", "."]
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .\n\n<|Assistant|>:")


def test_capture_equals_eager_on_one_image_and_a_left_padded_batch(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def test_generate_mode_row_equals_eager_and_never_emits_an_image_token(pair):
    fast, eager = pair
    assert_generate_batch_equals_eager(fast, eager, images(), QUERIES)
    markers = fast.tokenizer.convert_tokens_to_ids(["<image_placeholder>", "<begin_of_image>", "<end_of_image>"])
    assert sorted(fast.generate_kwargs["suppress_tokens"]) == sorted(markers)


@pytest.mark.parametrize("size", [(150, 60), (48, 80)])
def test_every_cell_inside_the_image_covers_the_pixels_its_token_is_made_of(checkpoint, size):
    """Through the model: with the tower's attention outputs zeroed, the pixels whose gradient reaches a
    token decode (coordinate image) to its cell on the padded square (≤ 1 px), for every cell inside the image."""
    adapter = load_adapter(model_cfg(checkpoint))
    model = adapter.model.model
    assert zero_attention_outputs(model.vision_model, "self_attn.projection_layer") == 2
    improc = adapter.processor.image_processor
    prepared = adapter.prepare([coord_image(*size)], QUERIES[:1])
    traced = traced_cell_boxes(lambda pixels: model.get_image_features(pixels).pooler_output,
                               prepared.inputs["pixel_values"], improc.image_mean, improc.image_std, size)
    (cells,) = prepared.layouts[0].maps
    boxes = cell_boxes(cells)
    width, height = size
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
    assert inside.sum() >= 16
    assert np.abs(boxes[inside] - traced[0][inside]).max() <= 1.0


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images, fixed_token_count=True)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=janus_pro_7b").model
    assert set(model) == set(reference)
    assert model.name == "deepseek-community/Janus-Pro-7B" and model.conv_mode == "auto"
