"""Molmo2: a tiny random Molmo2ForConditionalGeneration saved with the hub's file set (preprocessor_config.json
of Molmo2ImageProcessor, tokenizer + chat_template.jinja, no processor_config.json) and loaded back through
load_adapter; a low-res view plus overlapping high-res crops, pooled patches, <im_col> separators and a
bidirectional block over the image tokens."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Molmo2Config, Molmo2ForConditionalGeneration
from transformers.models.molmo2.configuration_molmo2 import (Molmo2AdapterConfig, Molmo2TextConfig,
                                                              Molmo2VisionConfig)
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.molmo2 import (ImageOnlyMolmo2Processor, Molmo2Adapter, TorchMolmo2ImageProcessor,
                                                views_layout)
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import word_tokenizer, zero_attention_outputs

# 36 px crops of 4 px patches = 9×9 patches (odd, like the released 378 / 14 = 27), 2×2 pooling → 5×5 cells a
# view with a one-patch border; overlap margins of 2 patches → windows of 5 patches.
CROP, PATCH, MARGINS, MAX_CROPS = 36, 4, [2, 2], 6
SPECIALS = ["<|im_start|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<im_low>",
            "<frame_start>", "<frame_end>"]
# Molmo2's template for one image and one user turn: the image placeholder first, then the turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is not string %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|image|>' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    # The released tokenizers' bos and eos are both <|im_end|>; the processor puts bos before every prompt.
    tok = word_tokenizer(SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", bos="<|im_end|>", chat_template=CHAT_TEMPLATE,
                         named={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = tok.convert_tokens_to_ids
    vision = Molmo2VisionConfig(image_size=[CROP, CROP], patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    # The image adapter (pooling attention, then a SwiGLU projector: five matrices, quadratic in its input) at the
    # default init std 0.02 shrinks the features to ~1e-8, below float32's resolution of the ~0.02 placeholder
    # embeddings they are added to: no pixel would move the language model's input (stage=check_layout). At
    # std 0.2 they are about as large as the token embeddings, as in a trained model.
    adapter = Molmo2AdapterConfig(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=4, head_dim=8, intermediate_size=64, text_hidden_size=64,
                                  initializer_range=0.2)
    text = Molmo2TextConfig(vocab_size=len(tok), additional_vocab_size=0, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_hidden_layers=3, intermediate_size=128,
                            max_position_embeddings=1024)
    config = Molmo2Config(vision_config=vision, adapter_config=adapter, text_config=text,
                          image_start_token_id=ids("<im_start>"), low_res_image_start_token_id=ids("<low_res_im_start>"),
                          image_end_token_id=ids("<im_end>"), image_patch_id=ids("<im_patch>"),
                          frame_start_token_id=ids("<frame_start>"), frame_end_token_id=ids("<frame_end>"))
    Molmo2ForConditionalGeneration(config).save_pretrained(out)
    Molmo2ImageProcessor(size={"height": CROP, "width": CROP}, patch_size=PATCH, max_crops=MAX_CROPS,
                         overlap_margins=MARGINS, pooling_size=[2, 2], image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("molmo2"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_registry_picks_molmo2_from_config_json(pair):
    fast, _ = pair
    assert isinstance(fast, Molmo2Adapter) and fast.family == "molmo2"
    assert isinstance(fast.processor, ImageOnlyMolmo2Processor)
    image_class = Molmo2ImageProcessor if torchvision_imports() else TorchMolmo2ImageProcessor
    assert type(fast.processor.image_processor) is image_class


def test_prompt_views_and_separators(pair):
    """bos, <|image|> expanded into <low_res_im_start> 5 rows <im_end> <im_start> rows <im_end>, every row of
    cells followed by <im_col>; the prompt ends with the expression's last token."""
    fast, _ = pair
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.prompts == ["<|image|><|im_start|>user\nthe red circle ."]
    tokens = fast.tokenizer.convert_ids_to_tokens(prepared.inputs["input_ids"][0])
    assert tokens[-1] == "." and tokens[0] == "<|im_end|>"
    low, high = prepared.layouts[0].maps
    assert (low.grid, high.grid) == ((5, 5), (5, 12))
    expected = ["<low_res_im_start>", *(["<im_patch>"] * 5 + ["<im_col>"]) * 5, "<im_end>",
                "<im_start>", *(["<im_patch>"] * 12 + ["<im_col>"]) * 5, "<im_end>"]
    assert tokens[1:1 + len(expected)] == expected
    positions = prepared.image_positions[0]
    assert positions.numel() == 25 + 60 and all(tokens[i] == "<im_patch>" for i in positions.tolist())
    # The whole image span is one bidirectional block.
    types = prepared.inputs["mm_token_type_ids"][0]
    assert types[1:1 + len(expected)].eq(1).all() and types[1 + len(expected):].eq(0).all()


def test_generation_prompt_ends_with_the_assistant_header(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    prompt = adapter.prepare([coord_image(64, 64)], ["the red circle ."]).prompts[0]
    assert prompt.endswith("the red circle .<|im_end|>\n<|im_start|>assistant\n")


def test_torch_image_processor_equals_the_torchvision_one(pair, checkpoint):
    """Without torchvision the image processor resizes and normalizes in torch; where torchvision exists it
    must give the stock processor's pixel_values, and the image-only processor the stock Molmo2Processor's batch."""
    pytest.importorskip("torchvision")
    fast, _ = pair
    images = [coord_image(150, 60), coord_image(48, 80), coord_image(97, 203)]
    ours = TorchMolmo2ImageProcessor.from_pretrained(checkpoint)(images, return_tensors="pt")
    stock = Molmo2ImageProcessor.from_pretrained(checkpoint)(images, return_tensors="pt")
    for key in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"):
        torch.testing.assert_close(ours[key], stock[key], atol=1e-6, rtol=0)
    from transformers import AutoProcessor

    prompts = [fast.prepare([im], ["a cat"]).prompts[0] for im in images]
    stock_processor = AutoProcessor.from_pretrained(checkpoint)
    stock_processor.tokenizer.padding_side = "left"      # as the adapter pads
    real = stock_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    batch = fast.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_token_pooling"):
        torch.testing.assert_close(batch[key], real[key], atol=1e-6, rtol=0)


def test_capture_equals_eager(pair):
    """(150, 60): 25 + 5×12 cells; (48, 80): 25 + 10×7 cells; bidirectional image block, left padding."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


def traced_token_boxes(adapter, prepared) -> tuple[np.ndarray, np.ndarray]:
    """([V, 4] original-image box of the pixels feeding each image token, [V] the (last) crop they came from).

    With the vision tower's attention outputs zeroed each patch feature is local, and the adapter pools
    within a window, so a token's pixels are those with a non-zero gradient. pixel_values are patches
    [crops, P, p·p·3] (p×p×RGB per patch); on a coordinate image R and G decode to the original x and y."""
    model, inputs = adapter.model, prepared.inputs
    width, height = prepared.layouts[0].image_size
    pixels = inputs["pixel_values"].detach().float().requires_grad_(True)
    features = model.model.get_image_features(pixels, inputs["image_token_pooling"], inputs["image_grids"],
                                              inputs["image_num_crops"]).pooler_output[0]       # [V, D]
    crops, patches, _ = pixels.shape
    side, p = int(round(patches ** 0.5)), PATCH
    # [crops, P, p·p·3] → [crops, 3, S, S] pixel images
    as_images = lambda t: t.reshape(crops, side, side, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(crops, 3, side * p,
                                                                                                   side * p)
    decoded = as_images(pixels.detach()) * 0.5 + 0.5                                         # [0, 1]
    probe = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0))
    # One batched backward: row t of the output gradient is probe on token t, zero elsewhere.
    (grads,) = torch.autograd.grad(features, pixels, torch.eye(features.shape[0])[:, :, None] * probe,
                                   is_grads_batched=True)                              # [V, crops, P, p·p·3]
    boxes, sources = np.zeros((features.shape[0], 4)), np.zeros(features.shape[0], dtype=int)
    for t in range(features.shape[0]):
        support = as_images(grads[t]).abs().sum(dim=1) > 0                                  # [crops, S, S]
        xs, ys, steps = [], [], []
        for crop in support.flatten(1).any(dim=1).nonzero()[:, 0].tolist():
            # A pooling window may straddle two crops' kept regions: each part is a rectangle of its crop.
            rows_at, cols_at = support[crop].nonzero(as_tuple=True)
            cols, rows = cols_at.unique().numel(), rows_at.unique().numel()
            assert rows_at.numel() == rows * cols, f"token {t}: its pixels in crop {crop} are not a rectangle"
            x = decoded[crop, 0][rows_at, cols_at].numpy() * width
            y = decoded[crop, 1][rows_at, cols_at].numpy() * height
            xs.append(x)
            ys.append(y)
            steps.append(((x.max() - x.min()) / (cols - 1), (y.max() - y.min()) / (rows - 1)))
            sources[t] = crop
        x, y = np.concatenate(xs), np.concatenate(ys)
        step_x, step_y = np.median(steps, axis=0)
        boxes[t] = [x.min() - step_x / 2, y.min() - step_y / 2, x.max() + step_x / 2, y.max() + step_y / 2]
    return boxes, sources


@pytest.mark.parametrize("size, high_grid, crops", [((150, 60), (5, 12), 4), ((48, 80), (10, 7), 6),
                                                    ((130, 130), (7, 7), 4), ((36, 36), (5, 5), 1)])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, high_grid, crops):
    """Geometry through the model: each token's pixels (through the overlapping crops, whose margins are dropped,
    and the pooling) decode to its layout cell, clipped to the image where the pooling padded the grid."""
    adapter = load_adapter(model_cfg(checkpoint))
    assert zero_attention_outputs(adapter.model.model.vision_tower, "o_proj") == 2
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    assert [m.name for m in layout.maps] == ["low_res", "high_res"] and layout.maps[1].grid == high_grid
    traced, sources = traced_token_boxes(adapter, prepared)
    width, height = size
    cells = np.concatenate([cell_boxes(m) for m in layout.maps])
    cells = np.clip(cells, 0, [width, height, width, height])                  # padding cells: the image part
    error = np.abs(cells - traced).max(axis=1)
    assert error.max() <= 1.0, f"cell {int(error.argmax())} off by {error.max():.2f} px"
    # The low-res view is crop 0; the high-res cells come from all the other crops.
    assert (sources[:25] == 0).all() and set(sources[25:].tolist()) == set(range(1, crops + 1))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1920, 1080), (300, 300), (100, 2000)])
def test_layout_matches_the_processor_at_the_released_settings(size):
    """At Molmo2-8B's image settings (378 px crops, 14 px patches, margins 4, 8 crops, 2×2 pooling) the layout's
    grids are the image processor's own, and each view's box is the stretched image plus its pooling padding."""
    processor = TorchMolmo2ImageProcessor(size={"height": 378, "width": 378}, patch_size=14, max_crops=8,
                                          overlap_margins=[4, 4], pooling_size=[2, 2])
    width, height = size
    layout = views_layout(size, processor._merge_and_standardize_kwargs())
    grids, _ = processor.get_image_grid_and_crops(height, width)
    assert [*layout.maps[0].grid, *layout.maps[1].grid] == grids
    low = layout.maps[0]
    assert low.grid == (14, 14)
    np.testing.assert_allclose(low.box, [0, 0, width * 28 / 27, height * 28 / 27])
    # n pooled cells cover 2n canvas patches, or 2n − 1 and one padded patch after them.
    rows, cols = layout.maps[1].grid
    x0, y0, x1, y1 = layout.maps[1].box
    assert (x0, y0) == (0, 0)
    assert min(abs(x1 - width), abs(x1 - width * 2 * cols / (2 * cols - 1))) < 1e-9
    assert min(abs(y1 - height), abs(y1 - height * 2 * rows / (2 * rows - 1))) < 1e-9


def test_cli(checkpoint, tmp_path, images):
    assert_cli_runs(checkpoint, tmp_path, images)


@pytest.mark.parametrize("image_kwargs, words", [
    ({"size": {"height": 36, "width": 40}}, "size={height: 36, width: 40}"),
    ({"overlap_margins": [5, 5]}, "overlap_margins=[5, 5]"),
    ({"size": {"height": 40, "width": 40}}, "size=40"),
])
def test_unmappable_image_settings_are_refused_at_load(checkpoint, image_kwargs, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_adapter(model_cfg(checkpoint, image_kwargs=image_kwargs))
