"""Gemma 3n: a tiny random Gemma3nForConditionalGeneration (tests/tiny_gemma3n.py: timm's MobileNetV5
encoder at tiny widths with the released strides, sliding and full layers, shared key/value layers, AltUp,
LAuReL, per-layer inputs) with Gemma 3n's processor classes, saved and loaded back through load_adapter.

The tower is built by timm, which imports torchvision: without them only the refusals run here (CI runs
this file again in its torch + torchvision environment, where timm is installed)."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from localization_heads.check_layout import builtin_image, check_image, local_vision
from localization_heads.collector import capture_rows
from localization_heads.dataio import InputError
from localization_heads.families import gemma3n, load_adapter
from localization_heads.families.gemma3n import Gemma3nAdapter, timm_imports
from localization_heads.layout import cell_boxes
from tests import tiny_gemma3n
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_generate_batch_equals_eager,
                                 coord_image, load_pair, model_cfg)

needs_timm = pytest.mark.skipif(not timm_imports(), reason="Gemma 3n's vision tower is built by timm (needs torchvision)")
QUERIES = ["the red circle .", "a cat"]


def images():
    return [coord_image(150, 60), coord_image(48, 80)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not timm_imports():
        pytest.skip("Gemma 3n's vision tower is built by timm (needs torchvision)")
    return tiny_gemma3n.write_checkpoint(tmp_path_factory.mktemp("gemma3n") / "tiny-gemma3n")


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


@needs_timm
def test_registry_picks_gemma3n_and_reads_the_grid_off_the_tower(pair):
    fast, _ = pair
    assert isinstance(fast, Gemma3nAdapter) and fast.family == "gemma3n"
    assert fast.grid == (tiny_gemma3n.SIDE, tiny_gemma3n.SIDE)
    assert fast.attention_layers == [0, 1, 2, 3, 4]
    assert type(fast.processor).__name__ == "Gemma3nProcessor"


@needs_timm
def test_prompt_is_the_chat_template_ending_with_the_expression(pair, checkpoint):
    """The query token is the expression's last token; the 16 soft tokens sit between <start_of_image>
    and <end_of_image>, whose ids lie in the vision block of the vocabulary as in the released one."""
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["<bos><start_of_turn>user\n<image_soft_token>the red circle ."]
    ids = prepared.inputs["input_ids"][0]
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".") == fast.query_token_ids(prepared)[0]
    assert (ids == fast.tokenizer.bos_token_id).sum() == 1 and ids[0] == fast.tokenizer.bos_token_id
    positions = prepared.image_positions[0]
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + tiny_gemma3n.TOKENS))
    config = fast.model.config
    assert ids[positions[0] - 1] == config.boi_token_id and ids[positions[-1] + 1] == config.eoi_token_id
    assert config.eoi_token_id == config.vision_config.vocab_offset < config.image_token_id < config.audio_token_id
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prompt = header.prepare(images()[:1], QUERIES[:1]).prompts[0]
    assert prompt.endswith("the red circle .<end_of_turn>\n<start_of_turn>model\n")


@needs_timm
def test_capture_equals_eager_on_one_image_and_a_left_padded_batch(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


@needs_timm
def test_capture_sees_the_sliding_window_and_the_shared_keys(pair):
    """Sliding layers (0, 1 and 3, which reuses layer 1's keys) give exactly zero weight to keys older than
    the window, full layers (2 and 4, which reuses layer 2's) do not."""
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    rows = capture_rows(fast, prepared)[:, 0]                                     # [L, H, N]
    old = torch.arange(rows.shape[-1] - tiny_gemma3n.SLIDING_WINDOW)
    assert rows[[0, 1, 3]][..., old].abs().max() == 0 and rows[[2, 4]][..., old].min() > 0


@needs_timm
def test_generate_mode_row_equals_eager(pair):
    """The first generated token's row (the shared key/value layers read the cache) is the same under
    capture and eager on a left-padded batch."""
    fast, eager = pair
    assert_generate_batch_equals_eager(fast, eager, images(), QUERIES)


def fed_pixels(adapter, size: tuple[int, int], local) -> tuple[list[np.ndarray], np.ndarray]:
    """Per token, [k, 2] original-image (x, y) of the resized pixels whose gradient reaches it inside the
    context `local` (decoded on a coordinate image: pixel centres, to the 8-bit colour code's step); the
    layout's [V, 4] cell boxes."""
    prepared = adapter.prepare([coord_image(*size)], ["a"])
    (cell_map,) = prepared.layouts[0].maps
    assert cell_map.grid == adapter.grid and cell_map.box == (0.0, 0.0, *size)
    pixels = prepared.inputs["pixel_values"].detach().requires_grad_(True)      # [1, 3, h, w], in [0, 1]
    with torch.enable_grad(), local:
        features = adapter.model.get_image_features(pixels).pooler_output[0]    # [V, D]
        probe = torch.randn(features.shape[-1], generator=torch.Generator().manual_seed(0))
        scores = features @ probe                                               # [V]
        (grads,) = torch.autograd.grad(scores, pixels, grad_outputs=torch.eye(scores.shape[0]),
                                       is_grads_batched=True)                  # [V, 1, 3, h, w]
    colours = pixels.detach()[0, :2].permute(1, 2, 0)                           # [h, w, (x, y)]
    fed = [colours[g[0].abs().sum(0) > 0].numpy() * size for g in grads]
    return fed, cell_boxes(cell_map)


@needs_timm
@pytest.mark.parametrize("size", [(150, 60), (48, 80), (192, 192)])
def test_in_the_checks_local_tower_every_token_reads_only_its_cell(pair, size):
    """Geometry through the model, with the tower made local as stage=check_layout makes it (attention
    and the stride-32 stage zeroed, every spatial kernel cut to its centre tap): every pixel whose gradient
    reaches a token lies in the token's layout cell (≤ 1 px). A transposed or flipped raster, or another
    grid, would fail."""
    fast, _ = pair
    pixels = fast.prepare([coord_image(*size)], ["a"]).inputs["pixel_values"]
    with torch.inference_mode():
        before = fast.model.get_image_features(pixels).pooler_output
    fed, boxes = fed_pixels(fast, size, local_vision(fast))
    for token, xy in enumerate(fed):
        assert len(xy), token
        np.testing.assert_array_less(boxes[token, :2] - 1, xy.min(0))
        np.testing.assert_array_less(xy.max(0), boxes[token, 2:] + 1)
    with torch.inference_mode():                                                # the tower is whole again
        torch.testing.assert_close(fast.model.get_image_features(pixels).pooler_output, before, atol=0, rtol=0)
    assert not any(parametrize.is_parametrized(module) for module in fast.model.modules())


@needs_timm
def test_the_stride_32_map_reaches_a_third_of_a_cell_past_every_other_token(pair, monkeypatch):
    """Why the check zeroes the stride-32 stage: with only the attention zeroed and the kernels cut, tokens
    0 and 2 of each row / column also read a stride-32 sample 15 px (of 48) past their right / bottom edge;
    no token reads anything farther, and the pixels of each token are centred in its cell."""
    fast, _ = pair
    attention = [m for m in fast.vision_token_mixers() if type(m).__name__ == "MultiQueryAttention2d"]
    monkeypatch.setattr(fast, "vision_token_mixers", lambda: attention)
    size = (192, 192)                                                            # no resampling: 1 px = 1 px
    fed, boxes = fed_pixels(fast, size, local_vision(fast))
    cell = np.array(size) / fast.grid[::-1]
    past = np.array([xy.max(0) - boxes[t, 2:] for t, xy in enumerate(fed)])     # [V, 2] reach past the far edges
    np.testing.assert_allclose(past.max(0), cell / 3 - 0.5, atol=0.5)            # pixel 48k + 63's centre
    for token, xy in enumerate(fed):
        np.testing.assert_array_less(boxes[token, :2] - 1, xy.min(0))
        x0, y0, x1, y1 = boxes[token]
        assert x0 < xy[:, 0].mean() < x1 and y0 < xy[:, 1].mean() < y1, token


@needs_timm
def test_without_the_centre_taps_the_check_cannot_hold(pair, monkeypatch):
    """Why the check cuts the kernels: with attention and the stride-32 stage zeroed but whole kernels,
    a painted rectangle moves tokens more than one cell away (the receptive field is wider than the image)."""
    fast, _ = pair
    monkeypatch.setattr(fast, "local_kernels", contextlib.nullcontext)
    (result,) = check_image(fast, builtin_image().resize((160, 120)))
    assert result.misplaced > 0, result.line()


@needs_timm
def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images, fixed_token_count=True)


def test_without_timm_the_adapter_refuses_in_one_line(tmp_path, monkeypatch):
    """Checked before anything loads (the checkpoint's config alone cannot be read without timm)."""
    monkeypatch.setattr(gemma3n, "timm_imports", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma3n", "vision_config": {"architecture": "mobilenetv5_300m_enc"}}))
    with pytest.raises(InputError, match="timm MobileNetV5 and timm does not import here; install it"):
        load_adapter(model_cfg(tmp_path))


def test_a_tower_other_than_mobilenetv5_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n", "vision_config": {"architecture": "resnet50"}}))
    with pytest.raises(InputError, match="vision_config.architecture='resnet50'"):
        load_adapter(model_cfg(tmp_path))


@needs_timm
def test_a_token_count_the_tower_does_not_make_is_refused(checkpoint, tmp_path):
    for name in checkpoint.iterdir():
        (tmp_path / name.name).symlink_to(name)
    (tmp_path / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text()) | {"vision_soft_tokens_per_image": 9}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="4×4 map, vision_soft_tokens_per_image=9"):
        load_adapter(model_cfg(tmp_path))


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=gemma3n_e4b_it").model
    assert set(model) == set(reference)
    assert model.name == "google/gemma-3n-E4B-it" and model.conv_mode == "auto" and model.dtype == "bfloat16"
