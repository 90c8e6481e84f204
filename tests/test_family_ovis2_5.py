"""Ovis2.5: a tiny random Ovis2_5ForConditionalGeneration (SigLIP2-style NaViT tower with one window-attention
and one full-attention block, the probabilistic visual tokenizer and its embedding table, a Qwen3 text model)
with the real Ovis2_5Processor (image part; the PIL image processor), saved as the hub's native-format
checkpoints hold it and loaded back through families.load_adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Ovis2_5Config, Ovis2_5ForConditionalGeneration
from transformers.models.ovis2_5.image_processing_pil_ovis2_5 import Ovis2_5ImageProcessorPil

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.ovis2_5 import PROCESSOR_CLASSES, Ovis2_5Adapter, token_order
from localization_heads.families.qwen_vl import image_only_processor_class, torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_token_k_is_made_of_the_kth_patch_group,
                                 coord_image, coord_images, load_pair, model_cfg)
from tests.tiny_vlm import word_tokenizer, zero_attention_outputs

# Sides under 256 px so the coordinate image's 8-bit colours resolve x and y to half a pixel; smart_resize
# gives (250, 150) → 256 × 160 px = 8 × 5 tokens, (120, 200) → 128 × 192 px = 4 × 6 tokens.
WIDE, TALL = (250, 150), (120, 200)
QUERIES = ["the red circle .", "a small dog"]
PATCH, MERGE = 16, 2                       # the released models: 16 px patches, 2×2 blocks per visual token
# Token names are this test's; the adapter reads the ids from config.json (image_token_id, image_start_token_id, ...).
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<|image_start|>",
         "image_end_token": "<|image_end|>", "video_start_token": "<|video_start|>", "video_end_token": "<|video_end|>"}
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}"
    "{{- message.content }}{%- else %}{%- for content in message.content %}{%- if content.type == 'image' %}"
    "{{- '<|image_pad|>\\n' }}{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def write_checkpoint(out: Path) -> Path:
    """3 Qwen3 text layers (4 heads over 2 KV heads); a 2-block tower whose first block attends within
    64 px windows (2×2 visual tokens, reordered window by window inside the tower and back after it);
    a visual vocabulary of 60 + 4 indicator rows; smart_resize between 4 and 64 tokens (the released
    processor: 448² to 1344·1792 px)."""
    torch.manual_seed(0)
    tok = word_tokenizer(["<|im_start|>"], pad="<|endoftext|>", eos="<|im_end|>", named=NAMED,
                         chat_template=CHAT_TEMPLATE)
    ids = {f"{name}_id": tok.convert_tokens_to_ids(token) for name, token in NAMED.items()}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, image_size=64, window_size=64,
                  layer_types=["window_attention", "full_attention"], vocab_size=64)
    Ovis2_5ForConditionalGeneration(Ovis2_5Config(text_config=text, vision_config=vision, **ids)).save_pretrained(out)
    factor = PATCH * MERGE
    image_processor = Ovis2_5ImageProcessorPil(size={"shortest_edge": 4 * factor**2, "longest_edge": 64 * factor**2})
    image_only_processor_class("ovis2_5", PROCESSOR_CLASSES)(image_processor=image_processor, tokenizer=tok,
                                                             chat_template=CHAT_TEMPLATE).save_pretrained(out)
    # The stock processor (where torchvision exists) also loads a video processor: its settings, as the hub has them.
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Ovis2_5VideoProcessor", "patch_size": PATCH, "merge_size": MERGE,
         "temporal_patch_size": 1}))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ovis2_5") / "tiny-ovis2_5")


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def images():
    return [coord_image(*WIDE), coord_image(*TALL)]


def test_the_checkpoint_loads_as_ovis_with_the_processor_this_machine_can_run(pair):
    fast, _ = pair
    assert isinstance(fast, Ovis2_5Adapter) and fast.family == "ovis2_5"
    assert type(fast.processor).__name__ == "Ovis2_5Processor"
    if torchvision_imports():
        assert hasattr(fast.processor, "video_processor")
    else:
        assert not hasattr(fast.processor, "video_processor")
        assert type(fast.processor.image_processor) is Ovis2_5ImageProcessorPil


def test_prompt_one_run_of_image_tokens_between_the_indicators_and_the_query_token(pair, checkpoint):
    """<|image_start|> + 8·5 image tokens + <|image_end|>: the two indicators get learned visual embeddings
    but are not cells; the query is the expression's last token, positions are 1-D from the first real token."""
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["<|im_start|>user\n<|image_pad|>\nthe red circle ."]
    ids, positions = prepared.inputs["input_ids"][0], prepared.image_positions[0]
    assert positions.numel() == 40 and prepared.layouts[0].maps[0].grid == (5, 8)
    first = int(positions.min())
    assert torch.equal(positions.sort().values, torch.arange(first, first + 40))      # one run, every token a cell
    assert fast.tokenizer.convert_ids_to_tokens([int(ids[first - 1]), int(ids[first + 40]), int(ids[-1])]) \
        == ["<|image_start|>", "<|image_end|>", "."]
    assert torch.equal(fast.call_inputs(prepared)["position_ids"][0], torch.arange(ids.numel()))
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .<|im_end|>\n<|im_start|>assistant\n")


def test_cells_are_listed_in_the_window_order_the_model_feeds_its_tokens(pair):
    """transformers 5.25 hands the language model the visual tokens window by window (2×2 blocks a window
    here): the first row of cells is tokens 0 1 | 4 5 | 8 9 | 12 13 of the run; the adapter found that order
    by asking the model (token_order), and the next test proves it through the tower."""
    fast, _ = pair
    assert fast.windowed and token_order(fast) == "window"
    positions = fast.prepare(images()[:1], QUERIES[:1]).image_positions[0]
    offsets = positions - positions.min()
    assert offsets.view(5, 8)[0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert offsets.view(5, 8)[1].tolist() == [2, 3, 6, 7, 10, 11, 14, 15]


def test_capture_equals_eager_and_batched_rows_equal_rows_run_alone(pair):
    fast, eager = pair
    assert fast.attention_layers == [0, 1, 2]
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def test_every_cell_covers_the_pixels_the_processor_fed_into_its_token(pair):
    """Decode pixel_values of a coordinate image: each token's merge² patches come from its layout cell of
    the original image (to within a pixel), both axes stretched separately by smart_resize."""
    fast, _ = pair
    for width, height in (WIDE, TALL):
        prepared = fast.prepare([coord_image(width, height)], QUERIES[:1])
        (cell_map,) = prepared.layouts[0].maps
        _, patch_rows, patch_cols = prepared.inputs["image_grid_thw"][0].tolist()
        resized_w, resized_h = patch_cols * PATCH, patch_rows * PATCH
        assert cell_map.box == (0.0, 0.0, width, height) and cell_map.grid == (patch_rows // MERGE, patch_cols // MERGE)
        improc = fast.processor.image_processor
        count = cell_map.size
        # pixel_values [V·m·m, 3·p·p] (temporal patch 1) → [V, m, m, 3, p, p], colours back in [0, 1]
        pixels = prepared.inputs["pixel_values"].view(count, MERGE, MERGE, 3, PATCH, PATCH)
        rgb = pixels * torch.tensor(improc.image_std).view(3, 1, 1) + torch.tensor(improc.image_mean).view(3, 1, 1)
        xs = rgb[..., 0, :, :].reshape(count, -1) * width
        ys = rgb[..., 1, :, :].reshape(count, -1) * height
        half_x, half_y = 0.5 * width / resized_w, 0.5 * height / resized_h
        fed = torch.stack([xs.min(1).values - half_x, ys.min(1).values - half_y,
                           xs.max(1).values + half_x, ys.max(1).values + half_y], dim=1).double().numpy()
        np.testing.assert_allclose(fed, cell_boxes(cell_map), atol=1.0)


def test_the_token_of_each_cell_is_made_of_that_cells_block_of_patches(checkpoint, pair):
    """Through the model: with the tower's attention outputs zeroed every feature is local; perturbing the
    block of merge² patch rows of cell k (decoded above) changes the token the layout lists for cell k and no
    other — through the window reordering and the visual tokenizer's softmax over its vocabulary."""
    fast, _ = pair
    model = Ovis2_5ForConditionalGeneration.from_pretrained(checkpoint).eval()
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 2
    prepared = fast.prepare([coord_image(*WIDE)], QUERIES[:1])
    offsets = prepared.image_positions[0] - prepared.image_positions[0].min()                # cell → token
    assert_token_k_is_made_of_the_kth_patch_group(model, prepared, MERGE**2, every=3, token_of=offsets)


def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "tall": TALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


def copy_checkpoint(checkpoint: Path, out: Path) -> Path:
    out.mkdir()
    for path in checkpoint.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def test_the_remote_code_format_and_a_processor_merging_differently_are_refused(checkpoint, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "ovis2_5", "llm_config": {}, "visual_tokenizer_config": {}}))
    with pytest.raises(InputError, match="config.json has llm_config: the remote-code Ovis2.5 format"):
        load_adapter(model_cfg(remote))
    broken = copy_checkpoint(checkpoint, tmp_path / "broken")
    saved = json.loads((broken / "processor_config.json").read_text())
    saved["image_processor"]["merge_size"] = 1
    (broken / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="merge_size=1 differs from the vision tower's spatial_merge_size=2"):
        load_adapter(model_cfg(broken))


def test_an_unknown_text_layer_type_is_refused(checkpoint, tmp_path):
    broken = copy_checkpoint(checkpoint, tmp_path / "layers")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["layer_types"] = ["full_attention", "moe", "full_attention"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"text_config.layer_types\[1\]='moe'"):
        load_adapter(model_cfg(broken))


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (the stock processor's video part)")
def test_image_only_processor_matches_the_stock_processor(checkpoint):
    from transformers import AutoProcessor

    stock = AutoProcessor.from_pretrained(checkpoint)
    mine = image_only_processor_class("ovis2_5", PROCESSOR_CLASSES).from_pretrained(checkpoint, backend="pil")
    text = ["<|im_start|>user\n<|image_pad|>\nthe red circle ."] * 2
    a = stock(images=images(), text=text, return_tensors="pt", padding=True)
    b = mine(images=images(), text=text, return_tensors="pt", padding=True)
    for key in ("input_ids", "image_grid_thw"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-5, rtol=0)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=ovis25_9b").model
    assert set(model) == set(reference)
    assert model.name == "ovis-community/ovis-2.5-9B" and model.dtype == "bfloat16" and model.conv_mode == "auto"
