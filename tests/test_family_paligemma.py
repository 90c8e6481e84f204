"""PaliGemma (Gemma text) and PaliGemma 2 (Gemma 2 text, attention-logit soft-capping): tiny random
PaliGemmaForConditionalGeneration checkpoints with the real processor classes, saved and loaded back
through adapters.load_adapter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (Gemma2Config, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                          PaliGemmaProcessor, SiglipVisionConfig)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from localization_heads.families import load_adapter
from localization_heads.families.paligemma import PaliGemmaAdapter
from localization_heads.collector import capture_rows
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

IMAGE, PATCH = 64, 8          # 8×8 = 64 tokens (PaliGemma-224: 224 / 14 = 16 → 256)
# PaliGemma 2 caps at 50; the tiny model's logits are O(1) (sharpened queries below), so cap at 1.
SOFTCAP = 1.0
TEXT = {"gemma": lambda **kw: GemmaConfig(**kw),
        "gemma2": lambda **kw: Gemma2Config(attn_logit_softcapping=SOFTCAP, sliding_window=16, **kw)}


def write_checkpoint(out: Path, text: str) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["\n"], pad="<pad>", bos="<bos>", eos="<eos>", named={"image_token": "<image>"})
    images = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    images.image_seq_length = (IMAGE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)     # adds the <loc…>/<seg…> tokens
    text_config = TEXT[text](vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    config = PaliGemmaConfig(vision_config=vision, text_config=text_config, projection_dim=64, hidden_size=64,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=len(tok))
    model = PaliGemmaForConditionalGeneration(config)
    with torch.no_grad():   # random init gives near-uniform attention: sharpen it so rows (and capping) differ
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(TEXT))
def checkpoint(request, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(f"paligemma-{request.param}"), request.param)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_prompt_is_image_bos_expression_and_the_query_is_its_last_token(pair):
    fast, _ = pair
    assert isinstance(fast, PaliGemmaAdapter) and fast.family == "paligemma"
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    ids, types = prepared.inputs["input_ids"][0], prepared.inputs["token_type_ids"][0]
    assert "labels" not in prepared.inputs and not types.any()          # all prefix: bidirectional
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".")
    assert torch.equal(prepared.image_positions[0], torch.arange(64)) and ids[64] == fast.tokenizer.bos_token_id


def test_generation_prompt_keeps_the_separator(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prepared = adapter.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.inputs["input_ids"][0, -1] == adapter.newline_id and prepared.prompts[0].endswith(".\n")


def test_capture_equals_eager(pair):
    """Every image is 8×8 tokens; the batch is left-padded by its prompts' lengths."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


def test_soft_capping_matters_at_this_scale(pair):
    """PaliGemma 2: the rows without soft-capping differ, so capture = eager above checks the capping."""
    fast, _ = pair
    layers = [layer.self_attn for layer in fast.model.model.language_model.layers]
    if getattr(layers[0], "attn_logit_softcapping", None) is None:
        pytest.skip("Gemma text: no soft-capping")
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    capped = capture_rows(fast, prepared)
    for layer in layers:
        layer.attn_logit_softcapping = None
    try:
        plain = capture_rows(fast, prepared)
    finally:
        for layer in layers:
            layer.attn_logit_softcapping = SOFTCAP
    assert (capped - plain).abs().max() > 1e-3


def test_first_generated_token_row_is_the_decode_step(pair):
    """Generate mode: the capture over prompt + first generated token (a suffix token, type 1) equals
    eager's own first decode step inside generate, on a left-padded batch."""
    fast, eager = pair
    prepared = fast.prepare([coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])
    with torch.inference_mode():
        out = eager.model.generate(**prepared.inputs, max_new_tokens=2, do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True)
    first = out.sequences[:, prepared.inputs["input_ids"].shape[1]]
    rows = capture_rows(fast, fast.append_tokens(prepared, first))                 # [L, B, H, N + 1]
    for layer, step in enumerate(out.attentions[1]):
        # A sliding-window layer's cache (PaliGemma 2) holds only the last `window` keys.
        window = step.shape[-1]
        torch.testing.assert_close(rows[layer][..., -window:], step[:, :, -1, :].float(), atol=1e-5, rtol=0)
        assert not rows[layer][..., :-window].any()


def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint))
    size = (150, 60)
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 2
    image_processor = adapter.processor.image_processor
    traced = traced_cell_boxes(lambda pixels: model.model.get_image_features(pixels).pooler_output,
                               prepared.inputs["pixel_values"], image_processor.image_mean, image_processor.image_std, size)
    assert_layout_matches_trace(prepared.layouts[0], traced)


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images, fixed_token_count=True)
