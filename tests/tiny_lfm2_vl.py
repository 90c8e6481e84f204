"""A tiny random LFM2-VL checkpoint written the way the hub holds LiquidAI/LFM2-VL-1.6B: the real
processor classes (Lfm2VlProcessor, Lfm2VlImageProcessor — torchvision only) at the real image settings
(the class defaults, which the 1.6B preprocessor_config.json keeps: 512 px tiles, 64–256 tokens per view,
2–10 tiles, a thumbnail, 16 px patches, 2 × 2 unshuffle), a word-level tokenizer with the image marker
tokens and a ChatML template, and an LFM2 text model whose layers alternate convolution and attention
like LFM2-1.2B's (attention at 2 and 5 of 6).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ATTENTION_LAYERS = [2, 5]
SPECIAL = ["<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>",
           "<|img_thumbnail|>"] + [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
WORDS = ["<unk>", "user", "assistant", "the", "red", "circle", "a", "small", "dog", ".", "on", "left"]
TEMPLATE = ("{{- '<|startoftext|>' }}{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
            "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
            "{%- if content.type == 'image' %}{{- '<image>' }}{%- elif 'text' in content %}{{- content.text }}"
            "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", unk_token="<unk>", eos_token="<|im_end|>",
                                  bos_token="<|startoftext|>", extra_special_tokens={"image_token": "<image>"})
    out.add_tokens([t for t in SPECIAL if t not in ("<|pad|>", "<|im_end|>", "<|startoftext|>", "<image>")],
                   special_tokens=True)
    return out


def write_checkpoint(out: Path, *, seed: int = 0) -> Path:
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlImageProcessor, Lfm2VlProcessor

    torch.manual_seed(seed)
    tok = tokenizer()
    text = dict(model_type="lfm2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, conv_L_cache=3,
                layer_types=["full_attention" if i in ATTENTION_LAYERS else "conv" for i in range(6)],
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=16, num_patches=256, vision_use_head=False)
    config = Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          projector_hidden_size=64, downsample_factor=2)
    Lfm2VlForConditionalGeneration(config).save_pretrained(out)
    Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(), tokenizer=tok, chat_template=TEMPLATE).save_pretrained(out)
    return out
