"""Tiny random checkpoints in both LLaVA formats, written to disk the way the hub holds them, so
tests load them through the same from_pretrained path users run."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "the", "a", "red", "blue", "circle", "square", "cat",
         "on", "left", ".", "bird", "small", "dog"]
# 56 px / patch 8 → a 7×7 grid: small enough for fast tests, not a perfect-square guess away from V.
IMAGE, PATCH = 56, 8


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4)


def text_config() -> LlamaConfig:
    # Grouped-query attention (4 heads, 2 KV heads) so the capture's GQA path is exercised.
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=2, eos_token_id=3, pad_token_id=0)


def write_hf_checkpoint(out: Path, *, pad: bool = True, seed: int = 0) -> Path:
    """llava-hf layout: LlavaForConditionalGeneration + LlavaProcessor in one folder."""
    torch.manual_seed(seed)
    grid = IMAGE // PATCH
    config = LlavaConfig(vision_config=vision_config(), text_config=text_config(), image_token_id=WORDS.index("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=grid * grid)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    if pad:   # original LLaVA-1.5 preprocessing
        images = LlavaImageProcessorPil(do_pad=True, size={"height": IMAGE, "width": IMAGE}, do_center_crop=False,
                                        crop_size={"height": IMAGE, "width": IMAGE})
    else:     # llava-hf default: shortest edge, then centre crop
        images = LlavaImageProcessorPil(do_pad=False, size={"shortest_edge": IMAGE}, do_center_crop=True,
                                        crop_size={"height": IMAGE, "width": IMAGE})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=PATCH, image_token="<image>",
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(out)
    return out


def write_original_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """liuhaotian layout: a Llama checkpoint whose state dict also holds model.mm_projector.*, a
    config.json with LLaVA's mm_* keys, and the CLIP tower in its own folder (mm_vision_tower)."""
    torch.manual_seed(seed)
    tower = out / "clip-tower"
    CLIPVisionModel(vision_config()).save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(tower)
    text = text_config()
    llama = LlamaForCausalLM(text)
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    mm_hidden = vision_config().hidden_size
    state["model.mm_projector.0.weight"] = torch.randn(text.hidden_size, mm_hidden) * 0.2
    state["model.mm_projector.0.bias"] = torch.zeros(text.hidden_size)
    state["model.mm_projector.2.weight"] = torch.randn(text.hidden_size, text.hidden_size) * 0.2
    state["model.mm_projector.2.bias"] = torch.zeros(text.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = text.to_dict()
    config.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(tower),
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=mm_hidden, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer().save_pretrained(out)
    return out
