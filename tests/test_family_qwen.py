"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE, hybrid text models): tiny random
checkpoints (tests/tiny_qwen.py) loaded through adapters.load_adapter, every check run for every model
type. Qwen3.5's left-padded batches go through its linear-attention layers too: each batched record
equals the same sample alone (assert_capture_equals_eager), also with a padding run longer than the
64-token chunks of the gated delta rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from localization_heads.families import load_adapter
from localization_heads.families.base import position_ids_from_mask
from localization_heads.families.qwen_vl import PROCESSOR_CLASSES, torchvision_imports
from localization_heads.capture import AttentionCapture
from localization_heads.collector import capture_rows, collect
from localization_heads.dataio import InputError
from localization_heads.layout import cell_boxes
from tests import tiny_qwen
from tests.family_checks import (TOL, assert_capture_equals_eager, assert_cli_runs, assert_generate_equals_eager_step,
                                 assert_token_k_is_made_of_the_kth_patch_group, coord_image, coord_images, load_pair,
                                 model_cfg)

# Two non-square images of different sizes → different token counts in one left-padded batch. Sides
# stay under 256 px so the coordinate image's 8-bit colours resolve x and y to half a pixel.
WIDE, TALL = (250, 150), (120, 200)
QUERIES = ["the red circle .", "a small dog"]


@pytest.fixture(scope="module", params=tiny_qwen.MODEL_TYPES)
def checkpoint(request, tmp_path_factory):
    return tiny_qwen.write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(checkpoint):
    """(capturing adapter, eager adapter)."""
    return load_pair(checkpoint)


def images():
    return [coord_image(*WIDE), coord_image(*TALL)]


def test_the_checkpoint_loads_as_its_family_with_the_processor_this_machine_can_run(checkpoint, pair):
    fast, _ = pair
    model_type = fast.model.config.model_type
    assert fast.family == "qwen_vl" and model_type in tiny_qwen.MODEL_TYPES
    assert type(fast.processor).__name__ == PROCESSOR_CLASSES[model_type]
    if torchvision_imports():
        assert hasattr(fast.processor, "video_processor")
    else:   # the image-only subclass on the PIL backend
        assert not hasattr(fast.processor, "video_processor")
        assert type(fast.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    # The query token is the expression's last token, or the end of the assistant header.
    ids = fast.prepare(images()[:1], QUERIES[:1]).inputs["input_ids"][0]
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prompt = header.prepare(images()[:1], QUERIES[:1]).prompts[0]
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


# Model indices of the layers with softmax attention: Qwen3.5's default layer_types put one full-attention
# layer after every three linear-attention ones (8 tiny layers: 3 and 7).
ATTENTION_LAYERS = {"qwen3_5": [3, 7], "qwen3_5_moe": [3, 7]}


def test_records_hold_the_attention_layers_by_model_index(pair):
    fast, eager = pair
    expected = ATTENTION_LAYERS.get(fast.model.config.model_type, list(range(fast.num_layers)))
    assert fast.attention_layers == eager.attention_layers == expected
    (record,) = collect(fast, images()[:1], QUERIES[:1])
    assert record["meta"]["layers"] == expected and record["attn"].shape[:2] == (len(expected), fast.num_heads)


def test_a_long_left_padding_run_leaves_the_linear_layers_unchanged(pair):
    """A 400 × 300 image (112 prompt tokens) beside a short one: the short row's padding spans more than
    one 64-token chunk of the linear layers' chunked delta rule."""
    fast, _ = pair
    pictures, queries = [coord_image(400, 300), coord_image(*TALL)], QUERIES
    batched = collect(fast, pictures, queries)
    lengths = fast.prepare(pictures, queries).inputs["attention_mask"].sum(1)
    assert int(lengths.max() - lengths.min()) > 64
    for i in range(2):
        torch.testing.assert_close(batched[i]["attn"], collect(fast, pictures[i:i + 1], queries[i:i + 1])[0]["attn"],
                                   atol=TOL, rtol=0)


def test_an_unknown_layer_type_is_refused_before_any_row(checkpoint, tmp_path):
    import json
    import shutil

    config = json.loads((checkpoint / "config.json").read_text())
    if "layer_types" not in config["text_config"]:
        pytest.skip("a dense model type: no layer_types")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    last = len(config["text_config"]["layer_types"]) - 1
    config["text_config"]["layer_types"][last] = "hybrid"   # valid in transformers (Zamba2), not capturable
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=rf"text_config.layer_types\[{last}\]='hybrid'"):
        load_adapter(model_cfg(broken))


def test_a_llava_prompt_template_or_checkpoint_is_refused(checkpoint, hf_checkpoint):
    with pytest.raises(InputError, match="conv_mode"):
        load_adapter(model_cfg(checkpoint, conv_mode="referseg"))
    with pytest.raises(InputError, match="model_type 'llava'"):
        load_adapter(model_cfg(hf_checkpoint, family="qwen_vl"))


def test_capture_equals_eager_and_batched_rows_equal_rows_run_alone(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)
    # M-RoPE: the call carries no position_ids; the 1-D positions LLaVA needs would change the rows.
    prepared = fast.prepare(images(), QUERIES)
    inputs = fast.call_inputs(prepared)
    assert "position_ids" not in inputs
    capture = AttentionCapture(fast.attention_layers, max_steps=1)
    with torch.inference_mode():
        fast.model(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]),
                   attention_capture=capture, use_cache=False, logits_to_keep=1)
    one_d = capture.layers(0)
    assert (one_d - capture_rows(fast, prepared)).abs().max() > 100 * TOL


def test_every_cell_covers_the_pixels_the_processor_fed_into_its_token(pair):
    """Decode pixel_values of a coordinate image: the original-image extent of each token's pixels is
    its layout cell, to within one pixel, on both axes (scaled separately)."""
    fast, _ = pair
    width, height = WIDE
    prepared = fast.prepare([coord_image(width, height)], QUERIES[:1])
    layout = prepared.layouts[0]
    (cell_map,) = layout.maps
    _, patch_rows, patch_cols = prepared.inputs["image_grid_thw"][0].tolist()
    improc = fast.processor.image_processor
    patch, merge = improc.patch_size, improc.merge_size
    resized_w, resized_h = patch_cols * patch, patch_rows * patch
    # smart_resize rounds each side on its own: the model sees a stretched image, x and y scales differ.
    assert resized_w / resized_h != pytest.approx(width / height, rel=1e-3)
    assert cell_map.box == (0.0, 0.0, width, height)
    assert cell_map.grid == (patch_rows // merge, patch_cols // merge)

    # pixel_values [V·m·m, 3·temporal·p·p] → [V, m, m, 3, p, p] (first frame), colours back in [0, 1]
    pixels = prepared.inputs["pixel_values"].view(layout.num_tokens, merge, merge, 3, improc.temporal_patch_size,
                                                  patch, patch)[:, :, :, :, 0]
    rgb = pixels * torch.tensor(improc.image_std).view(3, 1, 1) + torch.tensor(improc.image_mean).view(3, 1, 1)
    xs = rgb[..., 0, :, :].reshape(layout.num_tokens, -1) * width             # [V, m·m·p·p] original x
    ys = rgb[..., 1, :, :].reshape(layout.num_tokens, -1) * height
    half_x, half_y = 0.5 * width / resized_w, 0.5 * height / resized_h        # half a resized pixel
    fed = torch.stack([xs.min(1).values - half_x, ys.min(1).values - half_y,
                       xs.max(1).values + half_x, ys.max(1).values + half_y], dim=1).double().numpy()
    np.testing.assert_allclose(fed, cell_boxes(cell_map), atol=1.0)


def test_the_vision_tower_keeps_the_order_of_the_pixel_values(checkpoint, pair):
    """Image token k of the language model comes from the k-th group of merge² patch rows (the ones
    decoded above), also where Qwen2.5-VL's tower reorders patches into windows: with the tower's
    attention outputs zeroed every feature is local, and perturbing one group changes one token."""
    fast, _ = pair
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    for block in model.model.visual.blocks:
        torch.nn.init.zeros_(block.attn.proj.weight)
        torch.nn.init.zeros_(block.attn.proj.bias)
    prepared = fast.prepare([coord_image(*WIDE)], QUERIES[:1])
    assert_token_k_is_made_of_the_kth_patch_group(model, prepared, fast.merge ** 2, every=4)


def test_generate_mode_captures_the_first_generated_token(pair):
    """The record's row equals eager attention of the model's own first decoding step (KV cache,
    its own M-RoPE positions) — which needs mm_token_type_ids extended by the appended token."""
    fast, eager = pair
    record = assert_generate_equals_eager_step(fast, eager, images()[0], QUERIES[0])
    assert record["meta"]["mode"] == "generate" and isinstance(record["meta"]["generated_text"], str)


def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "tall": TALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (the stock processor's video part)")
def test_image_only_processor_matches_the_stock_processor(checkpoint):
    from transformers import AutoProcessor

    from localization_heads.families.qwen_vl import image_only_processor_class

    model_type = load_adapter(model_cfg(checkpoint)).model.config.model_type
    stock = AutoProcessor.from_pretrained(checkpoint)
    mine = image_only_processor_class(model_type).from_pretrained(checkpoint, backend="pil")
    text = ["<|vision_start|><|image_pad|><|vision_end|>the red circle ."] * 2
    a = stock(images=images(), text=text, return_tensors="pt", padding=True)
    b = mine(images=images(), text=text, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["qwen2vl_7b", "qwen25vl_7b", "qwen3vl_8b", "qwen35_4b", "qwen35_9b"])
def test_real_checkpoint_configs_have_every_model_key_and_the_chat_template(name):
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", f"model={name}").model
    assert set(model) == set(reference)
    assert model.name.startswith("Qwen/") and model.conv_mode == "auto" and model.query_at == "expression"
