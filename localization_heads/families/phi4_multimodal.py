"""Adapter for Phi-4-multimodal (model_type "phi4_multimodal": Phi4MultimodalForCausalLM + Phi4MultimodalProcessor;
microsoft/Phi-4-multimodal-instruct in Hugging Face format). Images and text only; the audio path is never used.

Layout (dynamic-HD crops, then a global view): the image processor picks a grid of cols × rows crops of
T px (448) — ceil(W/T) × ceil(H/T), or the closest aspect ratio within dynamic_hd crops — resizes the image
KEEPING its aspect ratio to new_w × new_h inside that canvas, pads it white at the right and bottom, and cuts
the canvas into crops. SigLIP patches of p px (14), the last patch columns / rows wholly on padding masked
out, each crop's (T/p)² patches average-pooled 2×2: the model joins the crops into ONE high-res grid and keeps
its useful part, uh × uw tokens of 2p canvas px each (the mask's unmasked patches, every other one). The global
view is the whole padded canvas stretched to T×T: (T/2p)² = 16×16 tokens. With s = W/new_w (x) and H/new_h (y)
original px per canvas px, the high-res map covers [0, 0, uw·2p·s, uh·2p·s] (reaching past the image where a
token pools padding) and the global map [0, 0, cols·T·s, rows·T·s] (the canvas, padding included).

Tokens: the processor writes one run of `<|image|>` tokens (config.vision_config.image_token_id) per image,
which the model fills in order with: per high-res row its uw cells and a learned newline (sub-GN), one global
separator (glb-GN), then per global row its 16 cells and a newline. Only the cells are listed; the newlines
and the separator have the image token's id but no place on the image.

Vision LoRA: the language model's linear layers carry a LoRA adapter for vision inputs, shipped in the
checkpoint's `vision-lora/` folder (PEFT format; transformers' own recipe is model.load_adapter(...,
subfolder="vision-lora") + set_adapter("vision"), which needs peft). This adapter merges it into the weights
at load — W += (lora_alpha / r) · B·A for every listed linear layer — the same product peft adds at every
forward (up to float rounding), without peft. A LoRA option it cannot reproduce (DoRA, rsLoRA patterns, biases,
modules_to_save) is refused with one line naming it; a checkpoint without `vision-lora/` runs its base weights
(with a warning). Capture and eager load the same merged weights.

Text model: Phi-3-like (fused qkv, partial RoPE), full causal attention, positions 1-D from each row's first
real token (base call_inputs). The real checkpoint's longrope switches to its long factors when the batch's
largest position passes original_max_position_embeddings (4096): a batch holding such a row (a large image,
≥ ~16 crops) gives the other rows the long factors too, unlike those rows run alone.

Processor: Phi4MultimodalImageProcessor exists only on the torchvision backend; without torchvision the adapter
refuses to load (InputError saying what to install). Query token: the chat template's user turn holds the image
and the expression; by default the prompt ends with the expression's last token (model.query_at=generation_prompt:
the end of "<|end|><|assistant|>").
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from localization_heads.dataio import InputError
from localization_heads.families.base import (Adapter, Prepared, attention_layers, attention_modules, chat_prompt,
                                              input_device, place)
from localization_heads.families.qwen_vl import torchvision_imports
from localization_heads.layout import Layout

log = logging.getLogger(__name__)

LORA_FOLDER = "vision-lora"
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# adapter_config.json keys whose non-default value changes what the LoRA computes beyond B·A · alpha / r.
LORA_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def lora_files(name: str, cache_dir: str | None) -> tuple[Path, Path] | None:
    """(adapter_config.json, adapter_model.safetensors) of the checkpoint's vision LoRA, or None without one."""
    local = Path(name).expanduser()
    if local.is_dir():
        files = [local / LORA_FOLDER / f for f in ("adapter_config.json", "adapter_model.safetensors")]
        return (files[0], files[1]) if all(f.is_file() for f in files) else None
    from transformers.utils import cached_file

    found = [cached_file(name, f"{LORA_FOLDER}/{f}", cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    return (Path(found[0]), Path(found[1])) if all(found) else None


def merge_lora(model: torch.nn.Module, config_file: Path, weights_file: Path) -> int:
    """Add a PEFT LoRA adapter into the linear layers it names: W += (lora_alpha / r) · B·A (computed in
    float32). Returns how many layers changed; anything but a plain LoRA is an InputError."""
    from safetensors.torch import load_file

    config = json.loads(config_file.read_text())
    for key, plain in LORA_UNSUPPORTED.items():
        if config.get(key) not in (None, plain):
            raise InputError(f"{config_file}: {key}={config[key]!r} is a LoRA option this tool does not merge "
                             f"(supported: {key}={plain!r})")
    scale = config["lora_alpha"] / config["r"]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise InputError(f"{weights_file}: {key!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, ab in pairs.items():
            linear = modules.get(name)
            if not isinstance(linear, torch.nn.Linear) or set(ab) != {"A", "B"}:
                raise InputError(f"{weights_file}: LoRA weights for {name!r}, which is not a linear layer of the model "
                                 "(or lacks its lora_A / lora_B pair)")
            delta = ab["B"].float() @ ab["A"].float() * scale                      # [out, in]
            linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    return len(pairs)


class Phi4MultimodalAdapter(Adapter):
    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        if not torchvision_imports():
            raise InputError(f"{self.model_name}: Phi-4-multimodal's image processor (Phi4MultimodalImageProcessor) "
                             "needs torchvision; install the torchvision build that matches your torch")
        if self.conv_mode != "auto":
            raise InputError(f"model.conv_mode={self.conv_mode!r}: Phi-4-multimodal builds its prompt with the "
                             "checkpoint's own chat template; use model.conv_mode=auto")
        self.processor = AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"   # last real token at the end of every row
        if self.processor.chat_template is None:
            # Phi4MultimodalProcessor's __init__ takes no chat_template, so from_pretrained drops the saved one;
            # it is the tokenizer's (transformers' conversion script copies it from there).
            self.processor.chat_template = self.tokenizer.chat_template
        self.image_kwargs = {k: v for k, v in (cfg.image_kwargs or {}).items() if v is not None}
        merged = self.processor._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                              images_kwargs=self.image_kwargs)["images_kwargs"]
        self.settings = self.processor.image_processor._merge_and_standardize_kwargs(**merged)
        self.check_vision(raw_config.get("vision_config") or {})
        self.model = place(AutoModelForCausalLM.from_pretrained(
            self.model_name, cache_dir=self.cache_dir, dtype=self.dtype,
            attn_implementation={"": text_attn, "vision_config": "sdpa", "audio_config": "sdpa"}, **self.placement,
        ), self.device).eval()
        lora = lora_files(self.model_name, self.cache_dir)
        if lora is None:
            log.warning("%s: no %s/ adapter in the checkpoint; running the base weights (the released model needs "
                        "its vision LoRA for image inputs)", self.model_name, LORA_FOLDER)
        else:
            merge_lora(self.model, *lora)
        self.device = input_device(self.model)
        config = self.model.config
        self.image_token_id = config.vision_config.image_token_id
        self.generate_kwargs = {"suppress_tokens": [self.image_token_id]}
        self.num_layers = config.num_hidden_layers
        self.attention_layers = attention_layers(config)
        self.num_heads = config.num_attention_heads

    def check_vision(self, vision: dict) -> None:
        """The crops the processor cuts must be the tower's input and pool to the 16×16 tokens the processor
        counts (it writes 256 + 16 global tokens whatever the sizes)."""
        size, patch = self.settings["size"], self.settings["patch_size"]
        tile = size["height"] if isinstance(size, dict) else size.height
        crop, image_size, tower_patch = (vision.get(k, d) for k, d in (("crop_size", 448), ("image_size", 448),
                                                                        ("patch_size", 14)))
        mismatch = [f"{name}={mine} (model: {theirs})" for name, mine, theirs in [
            ("image processor size", tile, crop), ("image processor patch_size", patch, tower_patch),
            ("vision_config.image_size", image_size, crop)] if mine != theirs]
        if not mismatch and tile // patch != 32:
            mismatch = [f"image processor size / patch_size = {tile // patch} patches a crop (the processor's token "
                        "count assumes 32: 16×16 pooled tokens)"]
        if mismatch:
            raise InputError(f"{self.model_name}: {'; '.join(mismatch)}; fix the checkpoint's configs or model.image_kwargs")
        self.tile, self.patch = tile, patch

    def vision_token_mixers(self) -> list[torch.nn.Module]:
        """The SigLIP encoder's attention; the 2×2 pooling stays inside one token."""
        return attention_modules(self.model.model.embed_tokens_extend.image_embed.img_processor.encoder)

    def embedding_module(self) -> torch.nn.Module:
        """The image embedding's dropout: its input is the language model's input embeddings, image features
        merged (Phi4MultimodalModel merges them inside its own forward)."""
        return self.model.model.embed_tokens_extend.image_embed.drop

    def layout(self, image_size: tuple[int, int]) -> Layout:
        """The processor's own crop arithmetic (_get_crop_layout, _get_crop_attention_mask) for a W×H image."""
        width, height = image_size
        improc, tile, patch = self.processor.image_processor, self.tile, self.patch
        (cols, rows), (new_w, new_h), padding = improc._get_crop_layout(height, width, tile,
                                                                        max_num=self.settings["dynamic_hd"])
        mask = improc._get_crop_attention_mask((cols, rows), padding, patch, tile // patch)   # [rows·32, cols·32]
        pooled = mask[0::2, 0::2]                         # one entry per 2×2 pooled token, as the model reads it
        useful_h, useful_w = int(pooled[:, 0].sum()), int(pooled[0, :].sum())
        sx, sy = width / new_w, height / new_h                 # original px per canvas px
        token, side = 2 * patch, tile // (2 * patch)
        return Layout.stack("phi4_dynamic_hd", image_size, [
            ("hd", (useful_h, useful_w), (0, 0, useful_w * token * sx, useful_h * token * sy)),
            ("global", (side, side), (0, 0, cols * tile * sx, rows * tile * sy))])

    def cell_positions(self, ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        """[V] positions of the cells in one row's run of image tokens: every row of each map ends with a
        newline token, and one separator sits between the maps."""
        run = ids.eq(self.image_token_id).nonzero()[:, 0].cpu()
        hd, glob = layout.maps
        cells = [torch.ones(*m.grid, dtype=torch.bool) for m in (hd, glob)]
        keep = torch.cat([torch.nn.functional.pad(cells[0], (0, 1)).flatten(), torch.zeros(1, dtype=torch.bool),
                          torch.nn.functional.pad(cells[1], (0, 1)).flatten()])
        if run.numel() != keep.numel():
            raise RuntimeError(f"{run.numel()} image tokens, but {keep.numel()} expected from the crop grid "
                               f"(high-res {hd.grid}, global {glob.grid}, a newline per row and one separator)")
        return run[keep]

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [chat_prompt(self.processor, q, self.query_at) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               add_special_tokens=False, images_kwargs=self.image_kwargs)
        layouts = [self.layout(image.size) for image in images]
        positions = [self.cell_positions(ids, layout) for ids, layout in zip(batch["input_ids"], layouts)]
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        inputs["image_pixel_values"] = inputs["image_pixel_values"].to(self.dtype)
        return Prepared(inputs, positions, layouts, prompts)
