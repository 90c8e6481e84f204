"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (dense and MoE) checkpoints written the way the hub holds them (model,
tokenizer with the family's chat template, the family's real processor class), so tests and the
benchmark load them through the same from_pretrained path users run.

The processor is built without its video processor (that class needs torchvision, which this project's
CPU torch cannot import); save_processor writes the video processor's settings by hand, as the stock
processor would save them. adapters/qwen_vl.py decides which of the two loads the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from localization_heads.families.qwen_vl import image_only_processor_class

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe")
QWEN3_TYPES = ("qwen3_vl", "qwen3_5", "qwen3_5_moe")    # Qwen3-VL's vision side, template and processor
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "the", "red", "blue",
         "circle", "square", "cat", "on", "left", ".", "bird", "small", "dog"]

# The real templates' output for one user turn with an image (Qwen2/2.5-VL add a default system turn).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}"
    "{{- message.content }}{%- else %}{%- for content in message.content %}{%- if content.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def patch_size(model_type: str) -> int:
    return 16 if model_type in QWEN3_TYPES else 14


def tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; the special tokens split off whatever text touches them."""
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                  eos_token="<|im_end|>",
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                        "vision_bos_token": "<|vision_start|>",
                                                        "vision_eos_token": "<|vision_end|>"})
    out.add_tokens(["<|im_start|>"], special_tokens=True)
    return out


def config(model_type: str, tok: PreTrainedTokenizerFast, *, text: dict | None = None, vision: dict | None = None):
    """The family's config: tiny by default (3 text layers, 4 heads over 2 KV heads, 2 vision blocks);
    `text` / `vision` override any key (the benchmark passes the real 7B shape). Qwen3.5: 8 text layers,
    layer_types left to the config's default (3 linear-attention layers, then 1 full: attention at 3 and 7)."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text_cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    patch = patch_size(model_type)
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        vision_cfg = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=patch,
                          spatial_merge_size=2, temporal_patch_size=2)
    elif model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        # window 56 px = 2×2 merged tokens: block 0 attends within windows (the tokens are reordered
        # window by window inside the tower and back after it), block 1 over the whole image.
        vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
    elif model_type == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                          deepstack_visual_indexes=[0])
        text_cfg.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    elif model_type in ("qwen3_5", "qwen3_5_moe"):
        if model_type == "qwen3_5":
            from transformers import Qwen3_5Config as Config
        else:
            from transformers import Qwen3_5MoeConfig as Config
            text_cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32)
        vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        # head 32 with the real partial_rotary_factor 0.25: 8 rotary dims, M-RoPE sections summing to 4
        text_cfg.update(num_hidden_layers=8, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    else:
        raise ValueError(f"not a Qwen-VL model type: {model_type}")
    text_cfg.update(text or {})
    vision_cfg.update(vision or {})
    return Config(text_config=text_cfg, vision_config=vision_cfg, **ids)


def processor(model_type: str, tok: PreTrainedTokenizerFast, *, size: dict | None = None):
    """The family's processor class (image part only) with the PIL image processor. `size` is
    smart_resize's pixel range {"shortest_edge": min, "longest_edge": max}; by default 4 to 256 merged
    tokens, small enough for tests."""
    factor = patch_size(model_type) * 2
    size = size or {"shortest_edge": 4 * factor**2, "longest_edge": 256 * factor**2}
    images = Qwen2VLImageProcessorPil(patch_size=patch_size(model_type), merge_size=2, temporal_patch_size=2, size=size)
    template = QWEN3_TEMPLATE if model_type in QWEN3_TYPES else QWEN2_TEMPLATE
    return image_only_processor_class(model_type)(image_processor=images, tokenizer=tok, chat_template=template)


def save_processor(out: Path, model_type: str, tok: PreTrainedTokenizerFast, *, size: dict | None = None) -> None:
    """processor(...) saved as the stock processor would be: its video processor's settings included
    (same patches as the images), so the stock AutoProcessor loads it where torchvision exists."""
    processor(model_type, tok, size=size).save_pretrained(out)
    path = out / "processor_config.json"
    saved = json.loads(path.read_text())
    kind = "Qwen3VLVideoProcessor" if model_type in QWEN3_TYPES else "Qwen2VLVideoProcessor"
    saved["video_processor"] = {"video_processor_type": kind, "patch_size": patch_size(model_type), "merge_size": 2,
                                "temporal_patch_size": 2}
    path.write_text(json.dumps(saved, indent=2))


def model_class(model_type: str):
    import transformers

    return getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3_vl": "Qwen3VLForConditionalGeneration",
                                  "qwen3_5": "Qwen3_5ForConditionalGeneration",
                                  "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}[model_type])


def write_checkpoint(out: Path, model_type: str, *, seed: int = 0) -> Path:
    """A tiny random checkpoint of `model_type` in `out`."""
    torch.manual_seed(seed)
    tok = tokenizer()
    model_class(model_type)(config(model_type, tok)).save_pretrained(out)
    save_processor(out, model_type, tok)
    return out
