"""Gemma 4: a tiny random Gemma4ForConditionalGeneration (tests/tiny_gemma4.py: sliding and global layers,
keys as values, bidirectional image blocks, shared key/value layers, per-layer inputs) with Gemma 4's
processor classes, saved and loaded back through load_adapter."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from localization_heads.collector import capture_rows
from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.gemma4 import Gemma4Adapter
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import cell_boxes
from tests import tiny_gemma4
from tests.family_checks import assert_generate_batch_equals_eager, assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import zero_attention_outputs

QUERIES = ["the red circle .", "a cat"]


def images():
    return [coord_image(150, 60), coord_image(48, 80)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_gemma4.write_checkpoint(tmp_path_factory.mktemp("gemma4"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_registry_picks_gemma4_with_the_processor_this_machine_can_run(pair):
    fast, _ = pair
    assert isinstance(fast, Gemma4Adapter) and fast.family == "gemma4" and fast.pooling == tiny_gemma4.POOLING
    assert type(fast.processor).__name__ == "Gemma4Processor"
    if torchvision_imports():
        assert hasattr(fast.processor, "video_processor")
    else:   # the image-only subclass on the PIL backend
        assert not hasattr(fast.processor, "video_processor")
        assert type(fast.processor.image_processor).__name__ == "Gemma4ImageProcessorPil"


def test_prompt_is_the_chat_template_ending_with_the_expression(pair, checkpoint):
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["<bos><|turn>user\n<|image|>the red circle ."]
    ids = prepared.inputs["input_ids"][0]
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".")
    assert (ids == fast.tokenizer.bos_token_id).sum() == 1 and ids[0] == fast.tokenizer.bos_token_id
    positions = prepared.image_positions[0]            # one run between <|image> and <image|>
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + prepared.layouts[0].num_tokens))
    assert ids[positions[0] - 1] == fast.model.config.boi_token_id
    assert ids[positions[-1] + 1] == fast.model.config.eoi_token_id
    assert torch.equal(prepared.inputs["mm_token_type_ids"][0].nonzero()[:, 0], positions)
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .<turn|>\n<|turn>model\n")


def test_capture_equals_eager_on_one_image_and_a_left_padded_batch(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def test_capture_sees_the_sliding_window_and_the_bidirectional_image_block(pair):
    """Sliding layers (0, 2; layer 2 reuses layer 0's keys) give exactly zero weight to keys older than
    the window, global layers do not; without mm_token_type_ids the image block turns causal and the
    rows change."""
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    rows = capture_rows(fast, prepared)[:, 0]                                     # [L, H, N]
    old = torch.arange(rows.shape[-1] - tiny_gemma4.SLIDING_WINDOW)              # outside the last query's window
    assert rows[[0, 2]][..., old].abs().max() == 0 and rows[[1, 3]][..., old].min() > 0
    inputs = {k: v for k, v in prepared.inputs.items() if k != "mm_token_type_ids"}
    causal = capture_rows(fast, prepared.with_inputs(inputs))[:, 0]
    assert (causal - rows).abs().max() > 1e-4


@pytest.mark.parametrize("size, grid", [
    ((150, 60), (5, 13)),      # resized to 156 × 60: the x scale 1.04, the y scale 1.0
    ((48, 80), (10, 6)),
    ((2, 250), (70, 1)),       # too narrow for one 12 px column: the processor's own fallback, 12 × 840 px
])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, grid):
    """Geometry proven through the model: with the vision tower's attention outputs zeroed each patch
    feature is local, so the patches whose gradient reaches a token (3×3 pooling included) are the
    token's pixels; decoded on a coordinate image they span the token's layout cell (≤ 1 px)."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    (cell_map,) = prepared.layouts[0].maps
    width, height = size
    assert cell_map.grid == grid and cell_map.box == (0.0, 0.0, width, height)
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.o_proj.linear") == 2
    pixels = prepared.inputs["pixel_values"].detach().requires_grad_(True)       # [1, P, p·p·3], in [0, 1]
    positions = prepared.inputs["image_position_ids"]                            # [1, P, 2] (x, y)
    features = model.model.get_image_features(pixels, positions).pooler_output[0]   # [V, D]
    patch = tiny_gemma4.PATCH
    colours = pixels.detach()[0].view(-1, patch, patch, 3)                       # [P, y, x, RGB]
    resized_w, resized_h = [(int(v) + 1) * patch for v in positions[0].max(0).values]
    half_x, half_y = 0.5 * width / resized_w, 0.5 * height / resized_h          # half a resized pixel
    probe = torch.randn(features.shape[-1], generator=torch.Generator().manual_seed(0))
    scores = features @ probe                                                    # [V]
    (grads,) = torch.autograd.grad(scores, pixels, grad_outputs=torch.eye(scores.shape[0]),
                                   is_grads_batched=True)                        # [V, 1, P, p·p·3]: one per token
    traced = np.zeros((features.shape[0], 4))
    for t, grad in enumerate(grads):
        fed = colours[grad[0].abs().sum(-1) > 0]                                  # [k, y, x, RGB] of its patches
        xs, ys = fed[..., 0] * width, fed[..., 1] * height
        traced[t] = [xs.min() - half_x, ys.min() - half_y, xs.max() + half_x, ys.max() + half_y]
    np.testing.assert_allclose(traced, cell_boxes(cell_map), atol=1.0)


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images)


def test_generate_mode_row_equals_eager(pair):
    """The first generated token's row (mm_token_type_ids extended by a text token) is the same under
    capture and eager on a left-padded batch."""
    assert_generate_batch_equals_eager(*pair, images(), QUERIES)


def test_a_text_only_checkpoint_or_a_pooling_the_tower_does_not_have_is_refused(checkpoint, tmp_path):
    text_only = json.loads((checkpoint / "config.json").read_text()) | {"vision_config": None}
    (tmp_path / "config.json").write_text(json.dumps(text_only))
    with pytest.raises(InputError, match="vision_config=None"):
        load_adapter(model_cfg(tmp_path))
    with pytest.raises(InputError, match="pooling_kernel_size=2 but the vision tower's is 3"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"pooling_kernel_size": 2}))


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (the stock processor's video part)")
def test_image_only_processor_matches_the_stock_processor(checkpoint):
    from transformers import AutoProcessor

    from localization_heads.families.gemma4 import image_only_processor_class

    stock = AutoProcessor.from_pretrained(checkpoint)
    mine = image_only_processor_class().from_pretrained(checkpoint, backend="pil")
    text = ["<bos><|turn>user\n<|image|>the red circle ."] * 2
    a = stock(images=[[im] for im in images()], text=text, return_tensors="pt", padding=True, add_special_tokens=False)
    b = mine(images=[[im] for im in images()], text=text, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image_position_ids"], b["image_position_ids"])
    # Same size and patches; the two backends' bicubic resizes round a few pixels to the next 8-bit level.
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1.01 / 255, rtol=0)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=gemma4_31b_it").model
    assert set(model) == set(reference) | {"image_kwargs"}
    assert model.name == "google/gemma-4-31B-it" and model.conv_mode == "auto" and model.dtype == "bfloat16"
