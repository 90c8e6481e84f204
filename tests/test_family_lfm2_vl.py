"""LFM2-VL: a tiny random checkpoint (tests/tiny_lfm2_vl.py) at the real image settings, loaded through
load_adapter. Its image processor exists only for torchvision, so these run under a torch + torchvision
environment (/work/venv-tv); without torchvision the adapter refuses with one line (tested here too)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from localization_heads.collector import collect
from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, coord_image, coord_images, load_pair,
                                 model_cfg)

# A large image (split into 3 × 2 tiles of 512 px plus a 20 × 12 thumbnail) and a small one (one 11 × 7 view).
LARGE, SMALL = (1000, 600), (250, 150)
QUERIES = ["the red circle .", "a small dog"]
needs_torchvision = pytest.mark.skipif(not torchvision_imports(), reason="LFM2-VL's image processor needs torchvision")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not torchvision_imports():
        pytest.skip("LFM2-VL's image processor needs torchvision")
    from tests import tiny_lfm2_vl

    return tiny_lfm2_vl.write_checkpoint(tmp_path_factory.mktemp("lfm2_vl"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def images():
    return [coord_image(*LARGE), coord_image(*SMALL)]


@pytest.mark.skipif(torchvision_imports(), reason="the refusal is for machines without torchvision")
def test_without_torchvision_the_adapter_refuses_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "lfm2_vl", "architectures": ["Lfm2VlForConditionalGeneration"]}))
    with pytest.raises(InputError, match="needs torchvision|only for torchvision"):
        load_adapter(model_cfg(tmp_path))


@needs_torchvision
def test_the_attention_layers_and_the_query_token(checkpoint, pair):
    from tests import tiny_lfm2_vl

    fast, _ = pair
    assert fast.family == "lfm2_vl" and fast.attention_layers == tiny_lfm2_vl.ATTENTION_LAYERS
    (record,) = collect(fast, images()[1:], QUERIES[:1])
    assert record["meta"]["layers"] == tiny_lfm2_vl.ATTENTION_LAYERS and record["attn"].shape[0] == 2
    ids = fast.prepare(images()[:1], QUERIES[:1]).inputs["input_ids"][0]
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")


@needs_torchvision
def test_capture_equals_eager_alone_and_in_a_left_padded_batch(pair):
    """The short row's padding (1,700 tokens) runs through the convolution layers too."""
    assert_capture_equals_eager(*pair, images(), QUERIES)


@needs_torchvision
def test_every_cell_covers_the_pixels_the_processor_fed_into_its_token(pair):
    """Decode pixel_values of coordinate images: each token's 2 × 2 patches (32 × 32 px of its view) come
    from its layout cell, tiles and thumbnail alike, within the coordinate image's 8-bit resolution plus
    the resize kernel's reach (a one-cell error would be 50 px off)."""
    fast, _ = pair
    for size in (LARGE, SMALL):
        width, height = size
        prepared = fast.prepare([coord_image(*size)], QUERIES[:1])
        layout = prepared.layouts[0]
        shapes = prepared.inputs["spatial_shapes"].tolist()
        assert [(ph // 2, pw // 2) for ph, pw in shapes] == [m.grid for m in layout.maps]
        for view, (token_map, (ph, pw)) in enumerate(zip(layout.maps, shapes)):
            patches = prepared.inputs["pixel_values"][view, : ph * pw].float().view(ph, pw, 16, 16, 3)
            rgb = patches * 0.5 + 0.5                                    # IMAGENET_STANDARD mean 0.5, std 0.5
            tokens = rgb.view(ph // 2, 2, pw // 2, 2, 16, 16, 3).permute(0, 2, 1, 4, 3, 5, 6)
            tokens = tokens.reshape(token_map.size, -1, 3)                # [V_view, 32·32, 3], row-major cells
            xs, ys = tokens[..., 0] * width, tokens[..., 1] * height
            fed = torch.stack([xs.min(1).values, ys.min(1).values, xs.max(1).values, ys.max(1).values], 1).double()
            x0, y0, x1, y1 = token_map.box
            scale = max((x1 - x0) / (pw * 16), (y1 - y0) / (ph * 16))  # original px per resized px
            slack = max(width, height) / 255 + 1.5 * scale + 1
            np.testing.assert_allclose(fed.numpy(), cell_boxes(token_map), atol=slack)


@needs_torchvision
def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"large": LARGE, "small": SMALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


def test_the_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=lfm2_vl_1_6b").model
    assert set(model) == set(reference)
    assert model.name == "LiquidAI/LFM2-VL-1.6B" and model.dtype == "bfloat16" and model.conv_mode == "auto"
