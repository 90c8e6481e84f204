"""Idefics3 and SmolVLM 2: tiny random Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration
checkpoints with the real processor classes, saved as the hub holds them and loaded back through
adapters.load_adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoImageProcessor, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                          Idefics3VisionConfig, LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration,
                          SmolVLMVisionConfig)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from localization_heads.families import load_adapter
from localization_heads.families.idefics3 import Idefics3Adapter, ImageOnlySmolVLMProcessor, SmolVLMAdapter
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg
from tests.tiny_vlm import assert_layout_matches_trace, traced_cell_boxes, word_tokenizer, zero_attention_outputs

# 64 px tiles of 8 px patches → 8×8 → pixel shuffle 2 → 4×4 = 16 tokens per view; longest edge 128 px
# (Idefics3-8B: 364 / 14 = 26 → 13×13 = 169, longest edge 1456).
TILE, PATCH, LONGEST, SEQ = 64, 8, 128, 16
# The Idefics3-8B-Llama3 template; SmolVLM 2's starts with <|im_start|> instead.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
TAGS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


FAMILIES = {
    # family: (chat template start, config, vision config, model, adapter)
    "idefics3": ("<|begin_of_text|>", Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration,
                 Idefics3Adapter),
    "smolvlm": ("<|im_start|>", SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, SmolVLMAdapter),
}


def write_checkpoint(out: Path, family: str) -> Path:
    torch.manual_seed(0)
    start, config_class, vision_class, model_class, _ = FAMILIES[family]
    tok = word_tokenizer(["User:", "Assistant:", *TAGS], pad="<pad>", bos=start, eos="<end_of_utterance>",
                         chat_template=CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = vision_class(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4)
    config = config_class(vision_config=vision, text_config=text, scale_factor=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))
    model_class(config).save_pretrained(out)
    kwargs = {"size": {"longest_edge": LONGEST}, "max_image_size": {"longest_edge": TILE}, "do_image_splitting": True}
    if family == "idefics3":
        Idefics3Processor(Idefics3ImageProcessorPil(**kwargs), tok, image_seq_len=SEQ).save_pretrained(out)
    else:   # the stock SmolVLMProcessor needs torchvision (video): save as the hub names it
        ImageOnlySmolVLMProcessor(SmolVLMImageProcessorPil(**kwargs), tok, image_seq_len=SEQ).save_pretrained(out)
        saved = json.loads((out / "processor_config.json").read_text())
        (out / "processor_config.json").write_text(json.dumps(dict(saved, processor_class="SmolVLMProcessor")))
        (out / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": "SmolVLMVideoProcessor", "processor_class": "SmolVLMProcessor"}))
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


def test_prompt_tiles_and_separators(pair):
    """(150, 60) → longest edge 128 → (128, 52) → stretched to (128, 64): 1×2 tiles + the global view;
    the tile tags and the <global-img> tag sit between views and are not cells."""
    fast, _ = pair
    start, *_, adapter_class = FAMILIES[fast.family]
    assert type(fast) is adapter_class
    prepared = fast.prepare([coord_image(150, 60)], ["the red circle ."])
    assert prepared.prompts == [f"{start}User:<image>the red circle ."]
    assert [m.name for m in prepared.layouts[0].maps] == ["tile_0_0", "tile_0_1", "thumbnail"]
    ids, positions = prepared.inputs["input_ids"][0], prepared.image_positions[0]
    before = [fast.tokenizer.convert_ids_to_tokens(int(ids[p - 1])) for p in positions.view(3, SEQ)[:, 0]]
    assert before == ["<row_1_col_1>", "<row_1_col_2>", "<global-img>"]
    assert ids[-1] == fast.tokenizer.convert_tokens_to_ids(".")


def test_generation_prompt_ends_with_the_assistant_tag(checkpoint):
    adapter = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert adapter.prepare([coord_image(64, 64)], ["the red circle ."]).prompts[0].endswith(
        "the red circle .<end_of_utterance>\nAssistant:")


def test_capture_equals_eager(pair):
    """(150, 60): 1×2 tiles + global = 48 tokens; (48, 80): 2×2 tiles + global = 80 tokens."""
    fast, eager = pair
    assert_capture_equals_eager(fast, eager, [coord_image(150, 60), coord_image(48, 80)], ["the red circle .", "a cat"])


@pytest.mark.parametrize("size, image_kwargs, views", [
    ((150, 60), {}, 3), ((48, 80), {}, 5), ((150, 60), {"do_image_splitting": False}, 1)])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, image_kwargs, views):
    adapter = load_adapter(model_cfg(checkpoint, image_kwargs=image_kwargs))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    assert len(prepared.layouts[0].maps) == views
    model = adapter.model
    assert zero_attention_outputs(model.model.vision_model, "self_attn.out_proj") == 2

    def image_features(pixels):                                                 # [views, 3, T, T] → [views, SEQ, D]
        return model.model.get_image_features(pixels[None]).pooler_output[0].view(len(pixels), SEQ, -1)

    image_processor = adapter.processor.image_processor
    traced = traced_cell_boxes(image_features, prepared.inputs["pixel_values"][0], image_processor.image_mean,
                               image_processor.image_std, size)
    assert_layout_matches_trace(prepared.layouts[0], traced)


def test_cli(checkpoint, tmp_path):
    """The shared test images (aspect ≤ 1.67) all become 2×2 tiles at this scale: use two that do not."""
    images = {"wide": tmp_path / "wide.png", "tall": tmp_path / "tall.png"}
    coord_image(150, 60).save(images["wide"])
    coord_image(48, 80).save(images["tall"])
    assert_cli_runs(checkpoint, tmp_path, images)


def test_image_only_smolvlm_processor_feeds_what_the_stock_processors_feed(pair, checkpoint):
    """SmolVLM: the stock image processor's pixel_values and one run of image_seq_len tokens per view;
    with torchvision installed, the same batch as the stock SmolVLMProcessor."""
    fast, _ = pair
    if fast.family != "smolvlm":
        pytest.skip("Idefics3 loads the stock processor")
    images = [coord_image(150, 60), coord_image(48, 80)]
    prompts = [fast.prepare([im], ["the red circle ."]).prompts[0] for im in images]
    ours = fast.processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True,
                          add_special_tokens=False)
    stock = AutoImageProcessor.from_pretrained(checkpoint)([[im] for im in images], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], stock["pixel_values"], atol=0, rtol=0)
    counts = (ours["input_ids"] == fast.image_token_id).sum(dim=1).tolist()
    assert counts == [SEQ * len(layout.maps) for layout in fast.prepare(images, ["a", "a"]).layouts] == [48, 80]
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"     # as the adapter pads
    real = processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(ours[key], real[key], atol=0, rtol=0)
