"""LLaVA-1.5 in both checkpoint formats: the original (liuhaotian/llava-v1.5-7b, `LlavaLlamaForCausalLM`)
and Hugging Face's (llava-hf/llava-1.5-7b-hf, `LlavaForConditionalGeneration`), the bundled toy model
included.

Prompt: LLaVA-1.5's own templates (model.conv_mode referseg | plain); no assistant turn is opened, so
the query is the end of the expression (method.md §2).

Geometry: every preprocessing LLaVA-1.5 uses (pad-to-square, resize, centre crop) maps the original
W×H image to the model's square input by an axis-aligned scale and shift, so the whole transform is one
rectangle of ORIGINAL-image pixel coordinates that the (rows, cols) grid spans (it may extend past the
image for padding). The grid is never inferred from sqrt(V).

Original format, built from stock transformers parts instead of a fork:
- language model: `LlamaForCausalLM` loaded from the checkpoint with a LlamaConfig made of its
  config.json (the mm_* keys are LLaVA's; the projector weights in the same files are read apart);
- vision tower: `CLIPVisionModel` from `mm_vision_tower` (a hub id or a local folder), features =
  hidden state of `mm_vision_select_layer` (−2) without CLS → [V, C];
- projector: `mm_projector_type` "linear" or "mlpNx_gelu" (LLaVA-1.5: mlp2x_gelu);
- image: pad to square with the CLIP mean colour ("pad"), then the tower's CLIP processor;
- prompt: the text is split at "<image>" and the projected features are spliced there
  (LLaVA's IMAGE_TOKEN_INDEX = −200 never reaches the embedding table).

Hugging Face format: the processor expands the "<image>" placeholder into V = rows·cols image tokens,
so each row's visual keys are simply where input_ids == config.image_token_id.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.utils import cached_file

from localization_heads.dataio import InputError
from localization_heads.families.base import Adapter, ImageTextAdapter, Prepared
from localization_heads.layout import Layout


# ---------------------------------------------------------------- prompt

REFERSEG_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

TEMPLATES = {
    # The reference code's prompt for LLaVA-1.5: system string, image, expression.
    "referseg": REFERSEG_SYSTEM + "\n{image}\n{query}",
    # Image then expression, nothing else: the bundled toy model is trained on this.
    "plain": "{image}\n{query}",
}


def build_prompt(conv_mode: str, query: str, image_token: str) -> str:
    """The model's input text for one expression; raises ValueError naming the known modes.
    "auto" (every family's default: its own template) is "referseg" for LLaVA-1.5."""
    conv_mode = "referseg" if conv_mode == "auto" else conv_mode
    if conv_mode not in TEMPLATES:
        raise ValueError(f"model.conv_mode={conv_mode!r} is unknown; use one of {sorted(TEMPLATES)}")
    return TEMPLATES[conv_mode].format(image=image_token, query=query.strip())



# ---------------------------------------------------------------- geometry

def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(S, ox, oy): LLaVA's expand2square pastes the image at (ox, oy) on an S×S canvas."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Original LLaVA-1.5 "pad" preprocessing: centre the image on a square of the mean colour."""
    side, ox, oy = pad_offsets(*image.size)
    if side == image.width == image.height:
        return image
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, (ox, oy))
    return canvas


def compute_geometry(
    image_size: tuple[int, int],
    grid: tuple[int, int],
    *,
    pad: bool,
    shortest_edge: int | None = None,
    crop_size: tuple[int, int] | None = None,
) -> Layout:
    """The one-map layout of a `grid` after pad → resize → centre crop, followed the way the Hugging
    Face image processors do them; its method names the steps ("pad", "crop", "pad+crop", "resize").

    shortest_edge: resize keeping aspect so the short side equals it (None: resize to the final
    square, which stretches nothing when the input is already square). crop_size: (height, width)
    of a centre crop after resizing, or None.
    """
    width, height = image_size
    x0, y0, w, h = 0.0, 0.0, float(width), float(height)  # current canvas in original pixels
    steps = []
    if pad:
        side, ox, oy = pad_offsets(width, height)
        x0, y0, w, h = -ox, -oy, float(side), float(side)
        steps.append("pad")
    if shortest_edge is not None and crop_size is not None:
        # Same integer arithmetic as transformers.image_transforms.get_resize_output_image_size
        # and the backends' centre crop; checked against the processor in tests/test_geometry.py.
        cw_px, ch_px = int(round(w)), int(round(h))
        short, long = (cw_px, ch_px) if cw_px <= ch_px else (ch_px, cw_px)
        new_short, new_long = shortest_edge, int(shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if cw_px <= ch_px else (new_long, new_short)
        crop_h, crop_w = crop_size
        top, left = int((new_h - crop_h) / 2.0), int((new_w - crop_w) / 2.0)
        sx, sy = w / new_w, h / new_h
        x0, y0, w, h = x0 + left * sx, y0 + top * sy, crop_w * sx, crop_h * sy
        if (new_w, new_h) != (crop_w, crop_h):
            steps.append("crop")
    if not steps:
        steps.append("resize")
    return Layout.single("+".join(steps), (width, height), grid, (x0, y0, x0 + w, y0 + h))


def geometry_from_image_processor(processor, image_size: tuple[int, int], grid: tuple[int, int],
                                  pad: bool) -> Layout:
    """The one-map layout of a Hugging Face image processor's settings (resize by shortest edge or to
    height×width, optional centre crop) after an optional pad-to-square."""
    size = dict(processor.size)
    crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    if size.get("shortest_edge"):
        crop_hw = (crop["height"], crop["width"]) if crop else (size["shortest_edge"],) * 2
        return compute_geometry(image_size, grid, pad=pad, shortest_edge=size["shortest_edge"], crop_size=crop_hw)
    if crop and (crop["height"], crop["width"]) != (size["height"], size["width"]):
        raise ValueError(f"unsupported image processor: resize to {size} then crop {crop}")
    # Resized straight to height×width: the grid spans the (padded) canvas, stretched if not square.
    return compute_geometry(image_size, grid, pad=pad)


# ---------------------------------------------------------------- Hugging Face format

class HFLlavaAdapter(ImageTextAdapter):
    chat_template = False    # LLaVA-1.5's own templates (model.conv_mode: referseg, plain)

    def __init__(self, cfg, raw_config: dict, *, text_attn: str, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, device, dtype)
        config = self.load(AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir), text_attn)
        self.image_token = self.processor.image_token
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)
        self.pad = bool(getattr(self.processor.image_processor, "do_pad", False))

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        prompts = [build_prompt(self.conv_mode, q, self.image_token) for q in queries]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        layouts = [geometry_from_image_processor(self.processor.image_processor, im.size, self.grid, self.pad)
                   for im in images]
        # A count that is off by one per row means the CLS token was kept (vision_feature_select_strategy).
        return self.finish(batch, layouts, prompts, f"the {self.grid[0]}×{self.grid[1]} grid")



# ---------------------------------------------------------------- original format

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
        self.attention_layers = list(range(self.num_layers))
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
        layouts = [geometry_from_image_processor(self.image_processor, im.size, self.grid, self.pad)
                   for im in images]
        return Prepared({"inputs_embeds": inputs_embeds, "attention_mask": attention_mask},
                        image_positions, layouts, prompts)
