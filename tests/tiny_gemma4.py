"""Tiny random Gemma 4 checkpoints written the way the hub holds them (model, tokenizer with Gemma 4's
turn tokens and chat template, Gemma4Processor's settings with its image, audio and video parts), so
tests and the benchmark load them through the same from_pretrained path users run.

The processor is built without its video processor (that class needs torchvision, which this
project's CPU torch cannot import); save_processor adds the audio feature extractor's and the video
processor's settings to processor_config.json as the stock processor would save them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from localization_heads.families.gemma4 import image_only_processor_class
from tests.tiny_vlm import word_tokenizer

# Gemma 4's template for one user turn (system turn, tools and thinking left out).
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}")
NAMED = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
         "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}

# Tiny image settings: patch 4 px, 3×3 pooling (the real one) → a token is 12×12 px of the resized
# image; at most 70 tokens (the smallest budget the processor accepts; the released models use 280).
PATCH, POOLING, MAX_SOFT_TOKENS = 4, 3, 70
SLIDING_WINDOW = 12   # shorter than a prompt, so sliding layers drop the first image tokens


def tokenizer():
    return word_tokenizer(["<|turn>", "<turn|>", "<|video|>"], pad="<pad>", bos="<bos>", eos="<eos>",
                          named=NAMED, chat_template=CHAT_TEMPLATE)


def config(tok, *, text: dict | None = None, vision: dict | None = None) -> Gemma4Config:
    """Every special of the released text models in 4 layers: sliding and global layers, global layers
    with their own head size and one key/value head whose keys are also the values (31B, 26B), image
    tokens bidirectional in sliding layers (31B, 26B), per-layer inputs and the last two layers reusing
    earlier layers' keys and values (E2B, E4B). `text` / `vision` override any key."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image|>"), ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"),
            ("video_token_id", "<|video|>"), ("audio_token_id", "<|audio|>"), ("boa_token_id", "<|audio>")]}
    text_cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                    num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=SLIDING_WINDOW,
                    layer_types=["sliding_attention", "full_attention"] * 2, use_bidirectional_attention="vision",
                    hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tok), num_kv_shared_layers=2,
                    final_logit_softcapping=30.0, max_position_embeddings=4096,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, patch_size=PATCH, pooling_kernel_size=POOLING,
                      position_embedding_size=256, standardize=True)
    text_cfg.update(text or {})
    vision_cfg.update(vision or {})
    return Gemma4Config(text_config=text_cfg, vision_config=vision_cfg, audio_config=None, **ids)


def save_processor(out: Path, tok, *, patch: int = PATCH, max_soft_tokens: int = MAX_SOFT_TOKENS) -> None:
    """The image-only Gemma4Processor saved, plus the audio and video settings the stock one writes."""
    images = Gemma4ImageProcessorPil(patch_size=patch, max_soft_tokens=max_soft_tokens, pooling_kernel_size=POOLING)
    processor = image_only_processor_class()(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                             image_seq_length=max_soft_tokens)
    processor.save_pretrained(out)
    path = out / "processor_config.json"
    saved = json.loads(path.read_text())
    saved["feature_extractor"] = json.loads(Gemma4AudioFeatureExtractor().to_json_string())
    saved["video_processor"] = {"video_processor_type": "Gemma4VideoProcessor", "patch_size": patch,
                                "max_soft_tokens": max_soft_tokens, "pooling_kernel_size": POOLING}
    path.write_text(json.dumps(saved, indent=2))


def write_checkpoint(out: Path, *, seed: int = 0, text: dict | None = None) -> Path:
    torch.manual_seed(seed)
    tok = tokenizer()
    Gemma4ForConditionalGeneration(config(tok, text=text)).save_pretrained(out)
    save_processor(out, tok)
    return out
