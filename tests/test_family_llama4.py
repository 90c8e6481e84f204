"""Llama 4: a tiny random Llama4ForConditionalGeneration (chunked attention on the RoPE layers, a global
NoPE layer, MoE) with the real Llama4Processor and its default chat template, saved as the hub holds it
and loaded back through families.load_adapter. Llama4ImageProcessor exists only on the torchvision
backend: without torchvision only the refusal is tested."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Llama4Config, Llama4ForConditionalGeneration

from localization_heads.collector import capture_rows, collect
from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.llama4 import Llama4Adapter, canvas_resize
from localization_heads.families.qwen_vl import torchvision_imports
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, coord_image, coord_images, load_pair,
                                 model_cfg)
from localization_heads.layout import cell_boxes
from tests.tiny_vlm import word_tokenizer, zero_attention_outputs

# 112 px tiles of 14 px patches → 8×8 → pixel shuffle 0.5 → 4×4 = 16 tokens per view, up to 6 tiles
# (Scout: 336 / 14 = 24 → 12×12 = 144, up to 16 tiles).
TILE, PATCH, SEQ, MAX_TILES = 112, 14, 16, 6
# 4 text layers: RoPE layers 0-2 attend in chunks of 48 tokens, NoPE layer 3 globally (Scout: chunks of 8192).
CHUNK = 48
SPECIALS = ["<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>",
            "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
# (W, H) → tiles (rows, cols): (250, 70) → 1×3 + global, (100, 210) → 2×1 + global, (90, 60) → one tile.
WIDE, TALL, SMALL = (250, 70), (100, 210), (90, 60)

needs_torchvision = pytest.mark.skipif(not torchvision_imports(), reason="Llama4ImageProcessor needs torchvision")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(SPECIALS, pad="<|finetune_right_pad_id|>", bos="<|begin_of_text|>", eos="<|eot|>")
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, head_dim=16,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=CHUNK,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=TILE,
                  patch_size=PATCH, pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64,
                  vision_output_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("<|patch|>"),
                          boi_token_index=tok.convert_tokens_to_ids("<|image_start|>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<|image_end|>"))
    Llama4ForConditionalGeneration(config).save_pretrained(out)
    from transformers import Llama4ImageProcessor, Llama4Processor

    Llama4Processor(Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_patches=MAX_TILES), tok,
                    patch_size=PATCH, pixel_shuffle_ratio=0.5).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if not torchvision_imports():
        pytest.skip("Llama4ImageProcessor needs torchvision")
    return write_checkpoint(tmp_path_factory.mktemp("llama4"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_without_torchvision_the_checkpoint_is_refused_with_what_to_install(tmp_path):
    if torchvision_imports():
        pytest.skip("torchvision imports here")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    with pytest.raises(InputError, match="needs torchvision"):
        load_adapter(model_cfg(tmp_path))


@needs_torchvision
def test_prompt_tiles_separators_and_query_token(pair, checkpoint):
    """(250, 70): 1×3 tiles separated by <|tile_x_separator|>, <|tile_y_separator|> after the row, then
    <|image|> and the global view; only <|patch|> tokens are cells."""
    fast, _ = pair
    assert isinstance(fast, Llama4Adapter) and fast.family == "llama4"
    prepared = fast.prepare([coord_image(*WIDE)], ["the red circle ."])
    assert prepared.prompts == ["<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>the red circle ."]
    assert [m.name for m in prepared.layouts[0].maps] == ["tile_0_0", "tile_0_1", "tile_0_2", "global"]
    ids, positions = prepared.inputs["input_ids"][0], prepared.image_positions[0]
    before = fast.tokenizer.convert_ids_to_tokens([int(ids[p - 1]) for p in positions.view(4, SEQ)[:, 0]])
    assert before == ["<|image_start|>", "<|tile_x_separator|>", "<|tile_x_separator|>", "<|image|>"]
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[positions[-1] + 1])) == "<|image_end|>"
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare([coord_image(*WIDE)], ["a cat"]).prompts[0].endswith(
        "a cat<|eot|><|header_start|>assistant<|header_end|>\n\n")


@needs_torchvision
def test_capture_equals_eager_on_chunked_and_global_layers(pair):
    """Prompts of 78 and 59 tokens: on the chunked layers the last token sees only its chunk (tokens 48..,
    the end of the image), on the NoPE layer every token; left padding shifts neither (≤ 1e-5 against eager)."""
    fast, eager = pair
    assert fast.model.config.text_config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert_capture_equals_eager(fast, eager, [coord_image(*WIDE), coord_image(*TALL)], ["the red circle .", "a cat"])
    row = capture_rows(fast, fast.prepare([coord_image(*WIDE)], ["the red circle ."]))[:, 0]    # [L, H, N]
    length = row.shape[-1]
    first_in_chunk = (length - 1) // CHUNK * CHUNK
    assert row[:3, :, :first_in_chunk].abs().max() == 0 and row[3, :, :first_in_chunk].min() > 0


def traced_image_boxes(image_features, pixel_values: torch.Tensor, mean, std, image_size) -> np.ndarray:
    """[views, tokens, 4] original-image box of the IMAGE pixels feeding each token (NaN: padding only).

    As tests/tiny_vlm.traced_cell_boxes (a token's pixels are those its feature has a gradient for), except
    that the canvas padding is told apart from the image by its blue channel (coord_image: 0.5, padding: 0)
    and left out. Colours pass through Llama4ImageProcessor's bfloat16 normalisation."""
    width, height = image_size
    pixels = pixel_values.detach().float().requires_grad_(True)                 # [views, 3, T, T]
    features = image_features(pixels)                                           # [views, tokens, D]
    views, tokens, dim = features.shape
    probe = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    decoded = pixels.detach() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    image = decoded[:, 2] > 0.25                                                # [views, T, T]
    boxes = np.full((views, tokens, 4), np.nan)
    for t in range(tokens):
        (grad,) = torch.autograd.grad((features[:, t] @ probe).sum(), pixels, retain_graph=True)
        support = grad.abs().sum(dim=1) > 0
        for v in range(views):
            ys, xs = (support[v] & image[v]).nonzero(as_tuple=True)
            if ys.numel() == 0:
                continue
            x, y = decoded[v, 0][ys, xs].numpy() * width, decoded[v, 1][ys, xs].numpy() * height
            step_x = (x.max() - x.min()) / max(xs.unique().numel() - 1, 1)
            step_y = (y.max() - y.min()) / max(ys.unique().numel() - 1, 1)
            boxes[v, t] = [x.min() - step_x / 2, y.min() - step_y / 2, x.max() + step_x / 2, y.max() + step_y / 2]
    return boxes


def assert_layout_matches_trace_in_image(layout, traced: np.ndarray, image_size, tol: float = 1.5) -> None:
    """Each cell, clipped to the image, is the traced box of its token's image pixels (within `tol` px: the
    8-bit coordinates and the bfloat16 normalisation each cost up to half a pixel); a cell outside the
    image has only padding pixels."""
    width, height = image_size
    assert [m.size for m in layout.maps] == [traced.shape[1]] * traced.shape[0]
    for v, token_map in enumerate(layout.maps):
        cells = cell_boxes(token_map)
        clipped = np.stack([cells[:, 0].clip(0, width), cells[:, 1].clip(0, height),
                            cells[:, 2].clip(0, width), cells[:, 3].clip(0, height)], axis=1)
        outside = (clipped[:, 2] - clipped[:, 0] < 0.5) | (clipped[:, 3] - clipped[:, 1] < 0.5)
        assert np.isnan(traced[v, outside]).all(), f"map {token_map.name}: a cell outside the image sees image pixels"
        np.testing.assert_allclose(traced[v, ~outside], clipped[~outside], atol=tol, err_msg=f"map {token_map.name}")


@needs_torchvision
@pytest.mark.parametrize("size, tiles", [(WIDE, (1, 3)), (TALL, (2, 1)), (SMALL, (1, 1))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(pair, size, tiles):
    """Through the model: with the vision tower's attention outputs zeroed each token depends on its own
    2×2 patches only; on a coordinate image their pixels decode to the token's layout cell (tiles of the
    aspect-kept, padded canvas; the stretched global view)."""
    fast, _ = pair
    prepared = fast.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    rows, cols = tiles
    assert [m.name for m in layout.maps] == ([f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] + ["global"]
                                             if rows * cols > 1 else ["grid"])
    model = Llama4ForConditionalGeneration.from_pretrained(fast.model_name).eval()
    assert zero_attention_outputs(model.vision_model, "self_attn.o_proj") == 2

    def image_features(pixels):                                                   # [views, SEQ, D]
        return model.get_image_features(pixels).pooler_output

    image_processor = fast.processor.image_processor
    pixels = prepared.inputs["pixel_values"].float()
    traced = traced_image_boxes(image_features, pixels, image_processor.image_mean, image_processor.image_std, size)
    assert_layout_matches_trace_in_image(layout, traced, size)


def test_canvas_resize_keeps_the_aspect_and_caps_upscaling():
    # (90, 60) in one 112 px tile: upscaled to the tile's width, height floored (74 px, the rest padding).
    assert canvas_resize((90, 60), (1, 1), 112, False) == (112, 74)
    # (250, 70) in 1×3 tiles: never upscaled past max(side, T), so it stays 250 × 70 in a 336 × 112 canvas ...
    assert canvas_resize((250, 70), (1, 3), 112, False) == (250, 70)
    # ... unless resize_to_max_canvas: width fitted to 336, height 70 · 336 / 250 floored.
    assert canvas_resize((250, 70), (1, 3), 112, True) == (336, 94)


@needs_torchvision
def test_generate_mode_captures_the_first_generated_token(pair):
    """The record (one forward pass over prompt + first token) equals eager attention of the model's own
    first decoding step. The chunked layers' cache keeps only the last `attention_chunk_size` keys: their
    eager rows are right-aligned on the sequence (earlier keys lie in past chunks: weight 0 either way)."""
    fast, eager = pair
    image, query = coord_image(*WIDE), "the red circle ."
    (record,) = collect(fast, [image], [query], use_generate=True, gen_kwargs={"max_new_tokens": 2})
    prepared = eager.prepare([image], [query])
    with torch.inference_mode():
        out = eager.model.generate(**eager.call_inputs(prepared), max_new_tokens=2, do_sample=False,
                                   output_attentions=True, return_dict_in_generate=True, **eager.generate_kwargs)
    length = prepared.inputs["input_ids"].shape[1] + 1
    step = torch.zeros(fast.num_layers, fast.num_heads, length)                # [L, H, N + 1]
    for layer, attention in enumerate(out.attentions[1]):                       # each [1, H, 1, keys kept]
        step[layer, :, length - attention.shape[-1]:] = attention[0, :, -1].float()
    assert [a.shape[-1] for a in out.attentions[1]] == [CHUNK] * 3 + [length]
    torch.testing.assert_close(record["attn"], step[:, :, prepared.image_positions[0]].unsqueeze(2), atol=1e-5, rtol=0)


@needs_torchvision
def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "tall": TALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


@needs_torchvision
def test_a_processor_that_does_not_fit_the_tower_or_an_unknown_layer_type_is_refused(checkpoint, tmp_path):
    with pytest.raises(InputError, match=r"image processor size=224 \(model: 112\)"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"size": {"height": 224, "width": 224}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["layer_types"][1] = "sliding_attention"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"text_config.layer_types\[1\]='sliding_attention' is not supported"):
        load_adapter(model_cfg(broken))


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=llama4_scout").model
    assert set(model) - {"image_kwargs"} == set(reference)
    assert model.name == "meta-llama/Llama-4-Scout-17B-16E-Instruct" and model.dtype == "bfloat16"
