"""GLM-4.1V (glm4v), GLM-4.5V (glm4v_moe) and GLM-4.6V (glm46v): tiny random checkpoints with the real
processor classes (image part; the PIL image processor), saved as the hub holds them and loaded back
through families.load_adapter; every check runs for all three model types."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.glm4v import PROCESSOR_CLASSES, Glm4vAdapter
from localization_heads.families.qwen_vl import image_only_processor_class, torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, assert_generate_equals_eager_step,
                                 assert_token_k_is_made_of_the_kth_patch_group, coord_image, coord_images, load_pair,
                                 model_cfg)
from tests.tiny_vlm import word_tokenizer

# Two non-square images of different sizes → different token counts in one left-padded batch; sides
# under 256 px so the coordinate image's 8-bit colours resolve x and y to half a pixel.
WIDE, TALL = (250, 150), (120, 200)
QUERIES = ["the red circle .", "a small dog"]
PATCH, MERGE = 14, 2                        # GLM-4.1V / 4.5V / 4.6V: 14 px patches, 2×2 merge (28 px tokens)
# The hub template's output for one user turn with an image (GLM-4.5V / 4.6V add "/nothink" and an empty
# <think></think> after the header when thinking is off; the image and expression come first either way).
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MODELS = {"glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration", Glm4vImageProcessorPil),
          "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", Glm4vImageProcessorPil),
          "glm46v": ("Glm46VConfig", "Glm46VForConditionalGeneration", Glm46VImageProcessorPil)}


def write_checkpoint(out: Path, model_type: str) -> Path:
    """A tiny random checkpoint: 3 text layers (4 heads over 2 KV heads, GLM's partial 3-D RoPE), 2 vision
    blocks; smart_resize between 2 and 64 tokens (its pixel bounds count both frames
    of the temporal patch; the real one: 112² px to 28² · 15000 px)."""
    torch.manual_seed(0)
    tok = word_tokenizer(["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>",
                          "<|begin_of_video|>", "<|end_of_video|>"], pad="<|endoftext|>", eos="<|user|>",
                         named={"image_token": "<|image|>", "video_token": "<|video|>"}, chat_template=CHAT_TEMPLATE)
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in [
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"), ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"), ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>")]}
    # head_dim 32, half of it rotary (GLM's partial_rotary_factor 0.5): 8 frequencies split t/h/w as 2/3/3.
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5})
    if model_type == "glm4v_moe":   # first layer dense, then 4 routed experts (2 per token) + 1 shared
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=128, patch_size=PATCH,
                  image_size=56, spatial_merge_size=MERGE, temporal_patch_size=2)
    config_name, model_name, image_processor_class = MODELS[model_type]
    config = getattr(transformers, config_name)(text_config=text, vision_config=vision, **ids)
    getattr(transformers, model_name)(config).save_pretrained(out)
    factor = PATCH * MERGE
    image_processor = image_processor_class(size={"shortest_edge": 4 * factor**2, "longest_edge": 128 * factor**2},
                                            patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    image_only_processor_class(model_type, PROCESSOR_CLASSES)(image_processor=image_processor, tokenizer=tok,
                                                              chat_template=CHAT_TEMPLATE).save_pretrained(out)
    # The stock processor (where torchvision exists) also loads a video processor: its settings, as the hub has them.
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Glm46VVideoProcessor" if model_type == "glm46v" else "Glm4vVideoProcessor",
         "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2}))
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def images():
    return [coord_image(*WIDE), coord_image(*TALL)]


def test_the_checkpoint_loads_as_glm_with_the_processor_this_machine_can_run(pair):
    fast, _ = pair
    model_type = fast.model.config.model_type
    assert isinstance(fast, Glm4vAdapter) and fast.family == "glm4v" and model_type in MODELS
    assert type(fast.processor).__name__ == PROCESSOR_CLASSES[model_type]
    if torchvision_imports():
        assert hasattr(fast.processor, "video_processor")
    else:
        assert not hasattr(fast.processor, "video_processor")
        assert type(fast.processor.image_processor) is MODELS[model_type][2]


def test_prompt_one_run_of_image_tokens_between_the_markers_and_the_query_token(pair, checkpoint):
    fast, _ = pair
    prepared = fast.prepare(images()[:1], QUERIES[:1])
    assert prepared.prompts == ["[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>the red circle ."]
    ids, positions = prepared.inputs["input_ids"][0], prepared.image_positions[0]
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + positions.numel()))
    assert fast.tokenizer.convert_ids_to_tokens([int(ids[positions[0] - 1]), int(ids[positions[-1] + 1]), int(ids[-1])]) \
        == ["<|begin_of_image|>", "<|end_of_image|>", "."]
    # the image tokens are type 1 for GLM's 3-D RoPE; the call passes no 1-D position_ids
    assert prepared.inputs["mm_token_type_ids"][0, positions].eq(1).all()
    assert "position_ids" not in fast.call_inputs(prepared)
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare(images()[:1], QUERIES[:1]).prompts[0].endswith("the red circle .<|assistant|>\n")


def test_capture_equals_eager_and_batched_rows_equal_rows_run_alone(pair):
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, images(), QUERIES)


def test_every_cell_covers_the_pixels_the_processor_fed_into_its_token(pair):
    """Decode pixel_values of a coordinate image: each token's merge² patches come from its layout cell of
    the original image (to within a pixel), both axes stretched separately by smart_resize."""
    fast, _ = pair
    width, height = WIDE
    prepared = fast.prepare([coord_image(width, height)], QUERIES[:1])
    layout = prepared.layouts[0]
    (cell_map,) = layout.maps
    _, patch_rows, patch_cols = prepared.inputs["image_grid_thw"][0].tolist()
    resized_w, resized_h = patch_cols * PATCH, patch_rows * PATCH
    assert resized_w / resized_h != pytest.approx(width / height, rel=1e-3)
    assert cell_map.box == (0.0, 0.0, width, height) and cell_map.grid == (patch_rows // MERGE, patch_cols // MERGE)
    improc = fast.processor.image_processor
    # pixel_values [V·m·m, 3·temporal·p·p] → [V, m, m, 3, p, p] (first frame), colours back in [0, 1]
    pixels = prepared.inputs["pixel_values"].view(layout.num_tokens, MERGE, MERGE, 3, 2, PATCH, PATCH)[:, :, :, :, 0]
    rgb = pixels * torch.tensor(improc.image_std).view(3, 1, 1) + torch.tensor(improc.image_mean).view(3, 1, 1)
    xs = rgb[..., 0, :, :].reshape(layout.num_tokens, -1) * width
    ys = rgb[..., 1, :, :].reshape(layout.num_tokens, -1) * height
    half_x, half_y = 0.5 * width / resized_w, 0.5 * height / resized_h
    fed = torch.stack([xs.min(1).values - half_x, ys.min(1).values - half_y,
                       xs.max(1).values + half_x, ys.max(1).values + half_y], dim=1).double().numpy()
    np.testing.assert_allclose(fed, cell_boxes(cell_map), atol=1.0)


def test_image_token_k_is_made_of_the_kth_group_of_patches(checkpoint, pair):
    """Through the model: with the tower's attention outputs zeroed every feature is local; perturbing the
    k-th group of merge² patch rows (the ones decoded above) changes image token k and no other."""
    fast, _ = pair
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    for block in model.model.visual.blocks:
        torch.nn.init.zeros_(block.attn.proj.weight)
    prepared = fast.prepare([coord_image(*WIDE)], QUERIES[:1])
    assert_token_k_is_made_of_the_kth_patch_group(model, prepared, MERGE ** 2, every=3)


def test_generate_mode_captures_the_first_generated_token(pair):
    """The record equals eager attention of the model's own first decoding step (its 3-D positions)."""
    assert_generate_equals_eager_step(*pair, images()[0], QUERIES[0])


def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "tall": TALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


def test_a_processor_merging_differently_from_the_tower_or_another_family_is_refused(checkpoint, tmp_path,
                                                                                     hf_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    saved = json.loads((broken / "processor_config.json").read_text())
    saved["image_processor"]["merge_size"] = 1
    (broken / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="merge_size=1 differs from the vision tower's spatial_merge_size=2"):
        load_adapter(model_cfg(broken))
    with pytest.raises(InputError, match="model_type 'llava' is not one of the GLM-4.xV types"):
        load_adapter(model_cfg(hf_checkpoint, family="glm4v"))


@pytest.mark.skipif(not torchvision_imports(), reason="needs torchvision (the stock processor's video part)")
def test_image_only_processor_matches_the_stock_processor(checkpoint):
    from transformers import AutoProcessor

    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    stock = AutoProcessor.from_pretrained(checkpoint)
    mine = image_only_processor_class(model_type, PROCESSOR_CLASSES).from_pretrained(checkpoint, backend="pil")
    text = ["<|begin_of_image|><|image|><|end_of_image|>the red circle ."] * 2
    a = stock(images=images(), text=text, return_tensors="pt", padding=True)
    b = mine(images=images(), text=text, return_tensors="pt", padding=True)
    for key in ("input_ids", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-5, rtol=0)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=glm41v_9b").model
    assert set(model) == set(reference)
    assert model.name == "zai-org/GLM-4.1V-9B-Thinking" and model.dtype == "bfloat16" and model.conv_mode == "auto"
