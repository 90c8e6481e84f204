"""Adapter for the original LLaVA-1.5 format (liuhaotian/llava-v1.5-7b, `LlavaLlamaForCausalLM`),
built from stock transformers parts instead of a fork:

- language model: `LlamaForCausalLM` loaded from the checkpoint with a LlamaConfig made of its
  config.json (the mm_* keys are LLaVA's; the projector weights in the same files are read apart);
- vision tower: `CLIPVisionModel` from `mm_vision_tower` (a hub id or a local folder), features =
  hidden state of `mm_vision_select_layer` (−2) without CLS → [V, C];
- projector: `mm_projector_type` "linear" or "mlpNx_gelu" (LLaVA-1.5: mlp2x_gelu);
- image: pad to square with the CLIP mean colour ("pad"), then the tower's CLIP processor;
- prompt: the text is split at "<image>" and the projected features are spliced there
  (LLaVA's IMAGE_TOKEN_INDEX = −200 never reaches the embedding table).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import cached_file

from dataio import InputError
from adapters.base import Adapter, Prepared
from llava.conversation import build_prompt
from llava.geometry import expand2square, geometry_from_image_processor

PROJECTOR_PREFIX = "model.mm_projector."
# Keys of an original config.json that describe LLaVA's multimodal parts, not the Llama model.
_LLAVA_KEYS = re.compile(r"^(mm_|image_aspect_ratio|tune_mm|freeze_mm|use_mm|model_type$|architectures$)")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise InputError(f"mm_projector_type={kind!r} is not supported (linear, mlpNx_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _checkpoint_file(name: str, filename: str, cache_dir: str | None) -> str | None:
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local / filename) if (local / filename).is_file() else None
    return cached_file(name, filename, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)


def load_projector_state(name: str, cache_dir: str | None) -> dict[str, torch.Tensor]:
    """The `model.mm_projector.*` tensors, read from whichever shard holds them (safetensors or
    .bin through weights-only loading)."""
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = _checkpoint_file(name, index_name, cache_dir)
        if index:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            files = sorted({f for k, f in weight_map.items() if k.startswith(PROJECTOR_PREFIX)})
        else:
            files = [single] if _checkpoint_file(name, single, cache_dir) else []
        state: dict[str, torch.Tensor] = {}
        for fname in files:
            path = _checkpoint_file(name, fname, cache_dir)
            tensors = load_file(path) if fname.endswith(".safetensors") else torch.load(
                path, map_location="cpu", weights_only=True)
            state.update({k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)})
        if state:
            return state
    raise InputError(f"{name}: no {PROJECTOR_PREFIX}* weights found in the checkpoint files")


class OriginalLlavaAdapter(Adapter):
    image_token = "<image>"     # LLaVA's placeholder; the projected features are spliced in its place

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        cache_dir = self.cache_dir
        if raw_config.get("mm_use_im_start_end"):
            raise InputError(f"{self.model_name}: mm_use_im_start_end=true checkpoints are not supported")
        llama_config = LlamaConfig.from_dict({k: v for k, v in raw_config.items() if not _LLAVA_KEYS.match(k)})
        self.model = LlamaForCausalLM.from_pretrained(
            self.model_name, config=llama_config, cache_dir=cache_dir, dtype=dtype, attn_implementation=text_attn,
        ).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, cache_dir=cache_dir)
        tower = raw_config["mm_vision_tower"]
        self.vision_tower = CLIPVisionModel.from_pretrained(
            tower, cache_dir=cache_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(tower, cache_dir=cache_dir)
        self.select_layer = int(raw_config.get("mm_vision_select_layer", -2))
        if raw_config.get("mm_vision_select_feature", "patch") != "patch":
            raise InputError(f"{self.model_name}: only mm_vision_select_feature=patch is supported")
        self.projector = build_projector(raw_config.get("mm_projector_type", "linear"),
                                         self.vision_tower.config.hidden_size, llama_config.hidden_size)
        self.projector.load_state_dict(load_projector_state(self.model_name, cache_dir))
        self.projector.to(device=device, dtype=dtype).eval()
        self.pad = raw_config.get("image_aspect_ratio") == "pad"
        self.pad_fill = tuple(int(x * 255) for x in self.image_processor.image_mean)  # (122, 116, 104) for CLIP
        self.num_layers = llama_config.num_hidden_layers
        self.num_heads = llama_config.num_attention_heads
        side = self.vision_tower.config.image_size // self.vision_tower.config.patch_size
        self.grid = (side, side)

    def _prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image, as LLaVA's tokenizer_image_token makes them."""
        before, after = prompt.split(self.image_token)
        head = self.tokenizer(before).input_ids                       # with BOS
        tail = self.tokenizer(after).input_ids
        if self.tokenizer.bos_token_id is not None and tail[:1] == [self.tokenizer.bos_token_id]:
            tail = tail[1:]
        return head, tail

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, V, D] projected patch features (CLS dropped)."""
        if self.pad:
            images = [expand2square(im, self.pad_fill) for im in images]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = self.vision_tower(pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        return self.projector(hidden[self.select_layer][:, 1:])

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [build_prompt(self.conv_mode, q, self.image_token) for q in queries]
        features = self.image_features(images)                        # [B, V, D]
        embed = self.model.get_input_embeddings()
        rows = []
        for prompt, feats in zip(prompts, features):
            head, tail = self._prompt_ids(prompt)
            ids = torch.tensor(head + tail, device=self.device)
            text = embed(ids)
            rows.append((len(head), torch.cat([text[: len(head)], feats, text[len(head):]])))
        length = max(r[1].shape[0] for r in rows)
        num_vis = features.shape[1]
        inputs_embeds = features.new_zeros(len(rows), length, features.shape[-1])   # [B, N, D]
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        image_positions = []
        for b, (image_at, emb) in enumerate(rows):
            offset = length - emb.shape[0]                            # left padding
            inputs_embeds[b, offset:] = emb
            attention_mask[b, offset:] = 1
            image_positions.append(offset + image_at + torch.arange(num_vis))
        layouts = [geometry_from_image_processor(self.image_processor, im.size, self.grid, self.pad).layout()
                   for im in images]
        return Prepared({"inputs_embeds": inputs_embeds, "attention_mask": attention_mask},
                        image_positions, layouts, prompts)
