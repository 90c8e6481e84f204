"""Phi-4-multimodal: a tiny random Phi4MultimodalForCausalLM (SigLIP-style tower of 32 × 32 patches a crop as the
real one, 2×2 average pooling, Phi-3-like text model, a one-block audio encoder never used) with the real
Phi4MultimodalProcessor and a PEFT-format `vision-lora/` adapter, saved and loaded back through load_adapter.
Phi4MultimodalImageProcessor exists only on the torchvision backend: without torchvision only the refusal is tested."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

from localization_heads.dataio import InputError
from localization_heads.families import load_adapter
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import cell_boxes
from tests.family_checks import (assert_capture_equals_eager, assert_cli_runs, coord_image, coord_images,
                                 load_pair, model_cfg)
from tests.tiny_vlm import word_tokenizer, zero_attention_outputs

# 64 px crops of 2 px patches: 32 × 32 patches → pooled 16 × 16 tokens a crop, as 448 / 14 (the processor counts
# 256 + 16 global tokens whatever the sizes); up to 6 crops (the hub: 36).
CROP, PATCH, MAX_CROPS = 64, 2, 6
# The Phi-4-multimodal template for one user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "peft_type": "LORA", "bias": "none", "use_dora": False, "use_rslora": False}
# (W, H) → crops (cols, rows), high-res tokens (rows, cols):
# (150, 60): 3 × 1 crops, resized to 160 × 64 and padded 32 px on the right → 16 × 40 tokens;
# (100, 70): 2 × 2 crops, resized to 128 × 89 and padded 39 px below: 19 patch rows masked, the last token row
#            pools an image row and a padding row → 23 × 32 tokens;
# (40, 30): one crop, upscaled to 64 × 48 → 12 × 16 tokens (no global-only image: the global view always follows).
WIDE, PADDED, SMALL = (150, 60), (100, 70), (40, 30)

needs_torchvision = pytest.mark.skipif(not torchvision_imports(), reason="Phi4MultimodalImageProcessor needs torchvision")


def write_checkpoint(out: Path, lora: dict | None = LORA) -> Path:
    torch.manual_seed(0)
    tok = word_tokenizer(["<|user|>", "<|end|>", "<|assistant|>"], pad="<|endoftext|>", eos="<|endoftext|>",
                         named={"image_token": "<|image|>", "audio_token": "<|audio|>"}, chat_template=CHAT_TEMPLATE)
    config = Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=CROP, patch_size=PATCH, crop_size=CROP, image_token_id=tok.image_token_id),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=4,
                          nemo_conv_channels=8, ext_pw_out_channel=32, depthwise_seperable_out_channel=32,
                          audio_token_id=tok.audio_token_id))
    model = Phi4MultimodalForCausalLM(config)
    model.save_pretrained(out)
    if lora is not None:
        folder = out / "vision-lora"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(lora))
        weights = {}
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and name.split(".")[-1] in LORA["target_modules"]:
                weights[f"base_model.model.{name}.lora_A.weight"] = torch.randn(LORA["r"], module.in_features) * 0.1
                weights[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, LORA["r"]) * 0.1
        save_file(weights, str(folder / "adapter_model.safetensors"))
    from transformers import Phi4MultimodalProcessor
    from transformers.models.phi4_multimodal.feature_extraction_phi4_multimodal import Phi4MultimodalFeatureExtractor
    from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import Phi4MultimodalImageProcessor

    images = Phi4MultimodalImageProcessor(size={"height": CROP, "width": CROP}, patch_size=PATCH, dynamic_hd=MAX_CROPS)
    processor = Phi4MultimodalProcessor(images, Phi4MultimodalFeatureExtractor(), tok)
    processor.chat_template = CHAT_TEMPLATE     # as transformers' conversion script sets it
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if not torchvision_imports():
        pytest.skip("Phi4MultimodalImageProcessor needs torchvision")
    return write_checkpoint(tmp_path_factory.mktemp("phi4_multimodal") / "tiny-phi4-multimodal")


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint)


@pytest.mark.skipif(torchvision_imports(), reason="the refusal is for machines without torchvision")
def test_without_torchvision_the_checkpoint_is_refused_with_what_to_install(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi4_multimodal"}))
    with pytest.raises(InputError, match="needs torchvision"):
        load_adapter(model_cfg(tmp_path))


@needs_torchvision
def test_the_image_run_holds_cells_newlines_and_one_separator(pair, checkpoint):
    """(150, 60): 16 high-res rows of 40 cells, each followed by a newline, the global separator, then 16 global
    rows of 16 cells and a newline — one run of <|image|> tokens, of which only the cells are listed."""
    fast, _ = pair
    assert fast.family == "phi4_multimodal" and fast.attention_layers == [0, 1, 2]
    prepared = fast.prepare([coord_image(*WIDE)], ["the red circle ."])
    assert prepared.prompts == ["<|user|><|image|>the red circle ."]
    layout = prepared.layouts[0]
    assert [(m.name, m.grid) for m in layout.maps] == [("hd", (16, 40)), ("global", (16, 16))]
    ids = prepared.inputs["input_ids"][0]
    run = ids.eq(fast.image_token_id).nonzero()[:, 0]
    assert run.numel() == 16 * 41 + 1 + 16 * 17 and bool((run.diff() == 1).all())
    cells = prepared.image_positions[0]
    newlines = sorted(set(run.tolist()) - set(cells.tolist()))
    start = int(run[0])
    assert newlines == [start + 41 * r + 40 for r in range(16)] + [start + 16 * 41] + \
        [start + 16 * 41 + 1 + 17 * r + 16 for r in range(16)]
    assert fast.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    header = load_adapter(model_cfg(checkpoint, query_at="generation_prompt"))
    assert header.prepare([coord_image(*WIDE)], ["a cat"]).prompts[0].endswith("a cat<|end|><|assistant|>")


@needs_torchvision
def test_capture_equals_eager_alone_and_in_a_left_padded_batch(pair):
    """(150, 60): 3 crops, 929 image tokens; (40, 30): one crop, 481; the vision LoRA merged in both."""
    assert_capture_equals_eager(*pair, [coord_image(*WIDE), coord_image(*SMALL)], ["the red circle .", "a cat"])


@needs_torchvision
def test_the_vision_lora_is_merged_into_the_text_layers(checkpoint, pair):
    """Every LoRA layer's weight is the saved base weight plus (alpha / r) · B·A; without vision-lora/ the
    base weights run (different rows)."""
    fast, _ = pair
    base = load_file(str(next(checkpoint.glob("model*.safetensors"))))
    lora = load_file(str(checkpoint / "vision-lora" / "adapter_model.safetensors"))
    modules = dict(fast.model.named_modules())
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora}
    assert len(names) == 3 * 4
    for name in names:
        delta = lora[f"base_model.model.{name}.lora_B.weight"] @ lora[f"base_model.model.{name}.lora_A.weight"]
        torch.testing.assert_close(modules[name].weight, base[f"{name}.weight"] + LORA["lora_alpha"] / LORA["r"] * delta,
                                   atol=1e-6, rtol=0)


@needs_torchvision
def test_a_lora_option_it_cannot_merge_or_a_mismatched_processor_is_refused(checkpoint, tmp_path):
    broken = tmp_path / "dora"
    shutil.copytree(checkpoint, broken)
    (broken / "vision-lora" / "adapter_config.json").write_text(json.dumps({**LORA, "use_dora": True}))
    with pytest.raises(InputError, match="use_dora=True is a LoRA option"):
        load_adapter(model_cfg(broken))
    with pytest.raises(InputError, match=r"image processor size=128 \(model: 64\)"):
        load_adapter(model_cfg(checkpoint, image_kwargs={"size": {"height": 128, "width": 128}}))


def traced_boxes(features, pixels: torch.Tensor, mean, std, image_size, tokens) -> np.ndarray:
    """[len(tokens), 4] original-image box of the IMAGE pixels (of any crop) feeding each listed token; NaN where
    only padding feeds it. The padding (and the global view's pixels blended with it) is told apart by its
    blue channel (coord_image: 0.5, padding: 1.0); R and G decode to x and y."""
    width, height = image_size
    pixels = pixels.detach().float().requires_grad_(True)                        # [crops, 3, T, T]
    out = features(pixels)                                                        # [V, D]
    probe = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    decoded = pixels.detach() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    image = decoded[:, 2] < 0.52
    boxes = np.full((len(tokens), 4), np.nan)
    for i, t in enumerate(tokens):
        (grad,) = torch.autograd.grad(out[t] @ probe, pixels, retain_graph=True)
        support = (grad.abs().sum(dim=1) > 0) & image                             # [crops, T, T]
        crops = support.flatten(1).any(1).nonzero()[:, 0]
        if crops.numel() == 0:
            continue
        assert crops.numel() == 1, f"token {t} is fed by {crops.numel()} crops"
        ys, xs = support[crops[0]].nonzero(as_tuple=True)
        x, y = decoded[crops[0], 0][ys, xs].numpy() * width, decoded[crops[0], 1][ys, xs].numpy() * height
        step_x = (x.max() - x.min()) / max(xs.unique().numel() - 1, 1)
        step_y = (y.max() - y.min()) / max(ys.unique().numel() - 1, 1)
        boxes[i] = [x.min() - step_x / 2, y.min() - step_y / 2, x.max() + step_x / 2, y.max() + step_y / 2]
    return boxes


@needs_torchvision
@pytest.mark.parametrize("size, hd", [(WIDE, (16, 40)), (PADDED, (23, 32)), (SMALL, (12, 16))])
def test_every_cell_covers_the_pixels_its_token_is_made_of(checkpoint, size, hd):
    """Through the model's own image embedding (SigLIP attention outputs zeroed, the 2×2 pooling, crops joined and
    the padding cut): on a coordinate image the image pixels feeding each sampled cell token (corners, centre,
    the padded edge) decode inside its cell (± 1.5 px: 8-bit colours and the resize kernels) and span the whole
    cell when it lies inside the image; a cell beyond the image gets none."""
    adapter = load_adapter(model_cfg(checkpoint))
    prepared = adapter.prepare([coord_image(*size)], ["the red circle ."])
    layout = prepared.layouts[0]
    assert layout.maps[0].grid == hd
    embed = adapter.model.model.embed_tokens_extend.image_embed
    assert zero_attention_outputs(embed.img_processor.encoder, "self_attn.out_proj") == 2
    inputs = prepared.inputs
    ids, positions = inputs["input_ids"], prepared.image_positions[0]

    def features(pixels):                                                        # [V, D]
        text = adapter.model.model.embed_tokens(ids)
        merged = embed(ids, text, pixels[None], inputs["image_sizes"], inputs["image_attention_mask"])
        return merged[0, positions]

    improc = adapter.processor.image_processor
    tokens = sample_cells(layout)
    traced = traced_boxes(features, inputs["image_pixel_values"][0], improc.image_mean, improc.image_std, size, tokens)
    cells = np.concatenate([cell_boxes(m) for m in layout.maps])[tokens]
    width, height = size
    tol = 1.5
    outside = (cells[:, 0] >= width) | (cells[:, 1] >= height)
    inside = (cells[:, 2] <= width) & (cells[:, 3] <= height)
    assert np.isnan(traced[outside]).all(), "a cell beyond the image is fed image pixels"
    assert not np.isnan(traced[inside]).any(), "a cell inside the image is fed no image pixels"
    fed = ~np.isnan(traced[:, 0])        # edge cells: a blended border row may leave them only padding
    assert (traced[fed, :2] >= cells[fed, :2] - tol).all() and (traced[fed, 2:] <= cells[fed, 2:] + tol).all(), \
        "image pixels outside the token's cell"
    np.testing.assert_allclose(traced[inside], cells[inside], atol=tol)


def sample_cells(layout) -> list[int]:
    """Per map the four corner cells, the centre and the centre of the second-last row (a full trace of every
    token costs a backward pass each: minutes on two CPU cores)."""
    out = []
    for m in layout.maps:
        rows, cols = m.grid
        picks = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (rows // 2, cols // 2),
                 (max(rows - 2, 0), cols // 2)]
        out += sorted({m.start + r * cols + c for r, c in picks})
    return out


@needs_torchvision
def test_cli_pipeline_and_batch(checkpoint, tmp_path):
    paths = coord_images(tmp_path, {"wide": WIDE, "small": SMALL})
    assert_cli_runs(checkpoint, tmp_path / "out", paths)


def test_real_checkpoint_config_has_every_model_key():
    from localization_heads import cli as pipeline

    reference = pipeline.compose("stage=collect", "model=llava15_7b_hf").model
    model = pipeline.compose("stage=collect", "model=phi4_multimodal").model
    assert set(model) - {"image_kwargs"} == set(reference)
    assert model.name == "microsoft/Phi-4-multimodal-instruct" and model.dtype == "bfloat16"
