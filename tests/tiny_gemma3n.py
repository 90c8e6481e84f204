"""Tiny random Gemma 3n checkpoints written the way the hub holds them (model, tokenizer with Gemma 3n's
turn and multimodal tokens and chat template, Gemma3nProcessor with its SigLIP image processor and audio
feature extractor), so tests load them through the same from_pretrained path users run.

The vision tower is timm's own MobileNetV5 encoder (`mobilenetv5_300m_enc`, the released tower's
architecture name) built from a short block list passed as `model_args`: every block kind of the
released tower (edge residual, universal inverted residuals with start / mid depthwise kernels,
multi-query attention with and without key/value downsampling, the multi-scale fusion adapter) at tiny
widths, with the released strides — so a token is 48 px of the resized image, as at 768 px / 16 tokens.
Building or loading one needs timm (and so torchvision).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_vlm import word_tokenizer

# 192 px square input, five stride-2 steps: stage 2 is 12×12 (stride 16), stage 3 6×6 (stride 32); the
# fusion adapter average-pools the 12×12 map 3×3 into 4×4 = 16 tokens of 48 px (released: 768 px, 48×48 → 16×16).
IMAGE, SIDE = 192, 4
TOKENS = SIDE * SIDE
SLIDING_WINDOW = 12   # shorter than a prompt, so sliding layers drop the first image tokens
# timm's block strings (its _gen_mobilenet_v5 format): the released stages, one or two blocks each.
ARCH = [["er_r1_k3_s2_e4_c8"],
        ["uir_r1_a3_k5_s2_e6_c16", "uir_r1_a5_k0_s1_e4_c16"],
        ["uir_r1_a5_k5_s2_e6_c24", "uir_r1_a5_k0_s1_e4_c24", "mqa_r1_k3_h2_v2_s1_d8_c24", "uir_r1_a0_k0_s1_e2_c24"],
        ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]

# The gemma-3n-*-it template for one user turn (system turn left out).
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
# In the released vocabulary the text tokens come first, then the vision block (<end_of_image>,
# <image_soft_token>, ...) and the audio block (<end_of_audio>, <audio_soft_token>, ...), which the model
# embeds with its own tables; added in that order, the tiny ids keep that structure.
NAMED = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>", "sot_token": "<start_of_turn>",
         "eot_token": "<end_of_turn>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
         "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}


def tokenizer():
    return word_tokenizer([], pad="<pad>", bos="<bos>", eos="<eos>", named=NAMED, chat_template=CHAT_TEMPLATE)


def block_args() -> list:
    """The decoded block list (plain JSON; timm fills it in place when it builds, so each build gets a copy)."""
    from timm.models._efficientnet_builder import decode_arch_def

    return decode_arch_def(ARCH)


def config(tok, *, text: dict | None = None):
    """Every special of the released text models in 5 layers: sliding and full layers, the last two reusing
    earlier layers' keys and values, AltUp with 4 streams, LAuReL, per-layer inputs, activation sparsity in
    the first two layers, final soft-capping. `text` overrides any text key."""
    from transformers import Gemma3nConfig

    ids = {name: tok.convert_tokens_to_ids(NAMED[token]) for name, token in
           [("boi_token_id", "boi_token"), ("eoi_token_id", "eoi_token"), ("image_token_id", "image_token"),
            ("boa_token_id", "boa_token"), ("eoa_token_id", "eoa_token"), ("audio_token_id", "audio_token")]}
    vision_offset, audio_offset = ids["eoi_token_id"], ids["eoa_token_id"]
    text_cfg = dict(vocab_size=len(tok), vocab_size_per_layer_input=vision_offset, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=4,
                    num_kv_shared_layers=2, sliding_window=SLIDING_WINDOW, max_position_embeddings=1024,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                 "sliding_attention", "full_attention"],
                    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0],
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    text_cfg.update(text or {})
    # layer_scale 0.5 instead of timm's 1e-5 init, so the random residual branches (attention included) matter.
    vision_cfg = dict(architecture="mobilenetv5_300m_enc", vocab_offset=vision_offset,
                      vocab_size=audio_offset - vision_offset,
                      model_args={"block_args": block_args(), "stem_size": 8, "msfa_output_resolution": SIDE,
                                  "layer_scale_init_value": 0.5})
    audio_cfg = dict(vocab_offset=audio_offset, vocab_size=len(tok) - audio_offset, hidden_size=16,
                     input_feat_size=8, conf_num_hidden_layers=1, conf_num_attention_heads=2,
                     sscp_conv_channel_size=[4, 4])
    return Gemma3nConfig(text_config=text_cfg, vision_config=vision_cfg, audio_config=audio_cfg,
                         vision_soft_tokens_per_image=TOKENS, **ids)


def save_processor(out: Path, tok, *, image: int = IMAGE, tokens: int = TOKENS) -> None:
    """Gemma3nProcessor as the hub holds it: SigLIP resize to a square without normalisation, 8-bit rescale."""
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessorPil

    images = SiglipImageProcessorPil(size={"height": image, "width": image}, do_normalize=False, resample=2,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=images, tokenizer=tok,
                     chat_template=CHAT_TEMPLATE, image_seq_length=tokens).save_pretrained(out)


def write_checkpoint(out: Path, *, seed: int = 0, text: dict | None = None) -> Path:
    from transformers import Gemma3nForConditionalGeneration

    torch.manual_seed(seed)
    tok = tokenizer()
    model = Gemma3nForConditionalGeneration(config(tok, text=text))
    model.config.vision_config.model_args["block_args"] = block_args()   # the plain list, not timm's filled one
    model.save_pretrained(out)
    save_processor(out, tok)
    return out
