"""MiniCPM-V 4.6: a tiny random MiniCPMV4_6ForConditionalGeneration (NaViT SigLIP tower with the window-attention
merger after its first layer, the 2×2 projector merger, Qwen3.5's hybrid text model: Gated-DeltaNet layers
and a full-attention layer in four) with the real MiniCPMV4_6Processor (image part; the PIL image processor),
saved as the hub holds it and loaded back through families.load_adapter.

Scale: 4 px patches and scale_resolution 64 (the released: 14 px, 448), so a token is 16 px and a view about
4×4 tokens; max_slice_nums 4 (released: 9). Sides stay under 256 px so the coordinate image's 8-bit colours
resolve x and y to half a pixel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.minicpmv4_6 import ImageOnlyMiniCPMV4_6Processor, MiniCPMV4_6Adapter
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, coord_image, coord_images,
                                 load_pair, model_cfg)
from tests.tiny_vlm import word_tokenizer, zero_attention_outputs

PATCH, SCALE, MAX_SLICES = 4, 64, 4
# (250, 150) → a 3×5 source view + 2×2 slices of 3×5 tokens; (120, 200) → a 5×3 source + 2×2 slices of 5×3;
# (60, 40) is under 64² px: the source view only, upscaled to 3×5 tokens.
WIDE, TALL, SMALL = (250, 150), (120, 200), (60, 40)
QUERIES = ["the red circle .", "a small dog"]
# Token names are this test's; the processor reads them off the tokenizer, the adapter the ids off config.json.
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
         "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
         "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}"
    "{{- message.content }}{%- else %}{%- for content in message.content %}{%- if content.type == 'image' %}"
    "{{- '<|image_pad|>\\n' }}{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def write_checkpoint(out: Path) -> Path:
    """8 Qwen3.5 text layers (layer_types left to the default: attention at 3 and 7; head 32 with 8 rotary
    dims), a 2-layer tower (window merger after layer 0) with a 16×16 position table."""
    torch.manual_seed(0)
    tok = word_tokenizer(["<|im_start|>"], pad="<|endoftext|>", eos="<|im_end|>", named=NAMED,
                         chat_template=CHAT_TEMPLATE)
    text = dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH,
                  image_size=64)
    config = MiniCPMV4_6Config(text_config=text, vision_config=vision, insert_layer_id=0,
                               image_token_id=tok.convert_tokens_to_ids(NAMED["image_token"]),
                               video_token_id=tok.convert_tokens_to_ids(NAMED["video_token"]))
    MiniCPMV4_6ForConditionalGeneration(config).save_pretrained(out)
    image_processor = MiniCPMV4_6ImageProcessorPil(patch_size=PATCH, scale_resolution=SCALE, max_slice_nums=MAX_SLICES)
    ImageOnlyMiniCPMV4_6Processor(image_processor=image_processor, tokenizer=tok,
                                  chat_template=CHAT_TEMPLATE).save_pretrained(out)
    for name in ("processor_config.json", "tokenizer_config.json"):   # the stock class, as the hub names it
        path = out / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "MiniCPMV4_6Processor"}, indent=2))
    # The stock processor (where torchvision exists) also loads a video processor: its settings, as the hub has them.
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "MiniCPMV4_6VideoProcessor", "patch_size": PATCH, "scale_resolution": SCALE,
         "max_slice_nums": 1}))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("minicpmv4_6") / "tiny-minicpmv4_6")


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def images():
    """Two images with different token counts (75 and 15) for the left-padded batches."""
    return [coord_image(*WIDE), coord_image(*SMALL)]


def test_the_checkpoint_loads_with_the_processor_this_machine_can_run_and_its_attention_layers(pair):
    fast, _ = pair
    assert isinstance(fast, MiniCPMV4_6Adapter) and fast.family == "minicpmv4_6"
    assert type(fast.processor).__name__.endswith("MiniCPMV4_6Processor")
    if torchvision_imports():
        assert hasattr(fast.processor, "video_processor")
    else:
        assert not hasattr(fast.processor, "video_processor")
        assert type(fast.processor.image_processor) is MiniCPMV4_6ImageProcessorPil
    assert fast.num_layers == 8 and fast.attention_layers == [3, 7]


def test_prompt_views_separators_and_query_token(pair, checkpoint):
    """(250, 150): <image> + the source view's 15 tokens + </image>, then two rows of two <slice>…</slice>;
    only the image tokens are cells, in the layout's order (source, slice_0_0, slice_0_1, slice_1_0, slice_1_1)."""
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["<|im_start|>user\n<|image_pad|>\nthe red circle ."]
    layout = prepared.layouts[0]
    assert [(m.name, m.grid) for m in layout.maps] == [("source", (3, 5))] + [
        (f"slice_{r}_{c}", (3, 5)) for r in range(2) for c in range(2)]
    assert layout.maps[4].box == (125.0, 75.0, 250.0, 150.0)
    ids, positions = prepared.inputs["input_ids"][0], prepared.image_positions[0]
    runs = positions.view(5, 15)
    assert (runs.diff(dim=1) == 1).all()                                       # each view one run
    tokens = fast.tokenizer.convert_ids_to_tokens
    assert tokens([int(ids[p - 1]) for p in runs[:, 0]]) == ["<image>"] + ["<slice>"] * 4
    assert tokens([int(ids[p + 1]) for p in runs[:, -1]]) == ["</image>"] + ["</slice>"] * 4
    assert tokens(int(ids[-1])) == "."
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_small_image_has_the_source_view_only(pair):
    """No slices under scale_resolution² pixels: one map, the image stretched (upscaled) over [0, 0, W, H]."""
    layout = pair[0].prepare([coord_image(*SMALL)], QUERIES[:1]).layouts[0]
    assert [(m.name, m.grid, m.box) for m in layout.maps] == [("source", (3, 5), (0.0, 0.0, 60.0, 40.0))]


def test_capture_equals_eager_alone_and_left_padded_through_the_hybrid_layers(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def decoded_boxes(prepared, image_size) -> list[np.ndarray]:
    """Per view, [tokens, 4]: the original-image box of the pixels the processor fed into each token
    (a token = a 4×4 block of patches of its view), from a coordinate image's pixel_values."""
    width, height = image_size
    improc_mean, improc_std = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    pixels = prepared.inputs["pixel_values"][0].float()                        # [3, p, total_patches · p]
    patches = pixels.view(3, PATCH, -1, PATCH).permute(2, 0, 1, 3)             # [total_patches, 3, p, p]
    rgb = patches * improc_std + improc_mean
    out, start = [], 0
    for rows, cols in prepared.inputs["target_sizes"].tolist():
        view = rgb[start:start + rows * cols].view(rows // 4, 4, cols // 4, 4, 3, PATCH, PATCH)
        view = view.permute(0, 2, 4, 1, 5, 3, 6).reshape(rows // 4 * (cols // 4), 3, -1)   # [tokens, 3, pixels]
        xs, ys = view[:, 0] * width, view[:, 1] * height
        step_x = (xs.max(1).values - xs.min(1).values) / (4 * PATCH - 1)
        step_y = (ys.max(1).values - ys.min(1).values) / (4 * PATCH - 1)
        out.append(torch.stack([xs.min(1).values - step_x / 2, ys.min(1).values - step_y / 2,
                                xs.max(1).values + step_x / 2, ys.max(1).values + step_y / 2], 1).double().numpy())
        start += rows * cols
    return out


@pytest.mark.parametrize("size", [WIDE, TALL, SMALL])
def test_every_cell_of_every_view_covers_the_pixels_fed_into_its_token(pair, size):
    """Decode pixel_values of a coordinate image: each token's 16×16 patch pixels come from its layout cell
    (source view and every slice) to within a pixel."""
    fast, _ = pair
    prepared = fast.prepare([coord_image(*size)], QUERIES[:1])
    layout = prepared.layouts[0]
    boxes = decoded_boxes(prepared, size)
    assert len(boxes) == len(layout.maps)
    for token_map, fed in zip(layout.maps, boxes):
        np.testing.assert_allclose(fed, cell_boxes(token_map), atol=1.0, err_msg=token_map.name)


def test_the_token_of_each_cell_is_made_of_that_cells_patches(checkpoint, pair):
    """Through the model: with the tower's attention outputs zeroed (encoder layers and the window merger)
    every feature is local; perturbing the 4×4 patches of one cell of one view changes the image feature the
    layout lists for that cell and no other — through the window merger's reordering and the projector."""
    fast, _ = pair
    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(checkpoint).eval()
    assert zero_attention_outputs(model.model.vision_tower, "self_attn.out_proj") == 3
    prepared = fast.prepare([coord_image(*WIDE)], QUERIES[:1])
    layout, sizes = prepared.layouts[0], prepared.inputs["target_sizes"]
    pixels = prepared.inputs["pixel_values"]                                   # [1, 3, p, total_patches · p]
    first = [0] + np.cumsum([r * c for r, c in sizes.tolist()]).tolist()       # first patch of each view

    def features(pv):                                                          # [tokens, D]
        with torch.inference_mode():
            return torch.cat(model.model.get_image_features(pv, sizes).pooler_output)

    base = features(pixels)
    for view, cell in [(0, 7), (1, 3), (4, 14), (3, 5)]:
        token_map = layout.maps[view]
        rows, cols = sizes[view].tolist()
        r, c = divmod(cell, token_map.grid[1])
        painted = pixels.clone()
        for pr in range(4 * r, 4 * r + 4):
            for pc in range(4 * c, 4 * c + 4):
                patch = first[view] + pr * cols + pc
                painted[..., patch * PATCH:(patch + 1) * PATCH] += 1.0
        changed = ((features(painted) - base).abs().amax(-1) > 1e-6).nonzero()[:, 0].tolist()
        assert changed == [token_map.start + cell], (token_map.name, cell)


def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "small": SMALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


def copy_checkpoint(checkpoint: Path, out: Path) -> Path:
    out.mkdir()
    for path in checkpoint.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def test_settings_the_layout_cannot_describe_are_refused(checkpoint, tmp_path):
    with pytest.raises(InputError, match="downsample_mode='8x' is unknown"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"downsample_mode": "8x"}))
    with pytest.raises(InputError, match="downsample_mode='4x' differs from the model's downsample_mode='16x'"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"downsample_mode": "4x"}))
    with pytest.raises(InputError, match="patch_size=8 differs from the vision tower's patch_size=4"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"patch_size": 8}))
    broken = copy_checkpoint(checkpoint, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["merger_times"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="merger_times=2 is not supported"):
        load_adapter(model_cfg(broken))


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (the stock processor's video part)")
def test_image_only_processor_matches_the_stock_processor(checkpoint):
    from transformers import AutoProcessor

    stock = AutoProcessor.from_pretrained(checkpoint)
    mine = ImageOnlyMiniCPMV4_6Processor.from_pretrained(
        checkpoint, image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint))
    text = ["<|im_start|>user\n<|image_pad|>\nthe red circle ."] * 2
    a = stock(images=images(), text=text, return_tensors="pt", padding=True)
    b = mine(images=images(), text=text, return_tensors="pt", padding=True)
    for key in ("input_ids", "target_sizes"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=2 / 255, rtol=0)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=minicpm_v46").model
    assert set(model) == set(reference)
    assert model.name == "openbmb/MiniCPM-V-4.6" and model.dtype == "bfloat16" and model.conv_mode == "auto"
