"""One small interface between the pipeline and a model family.

An adapter knows how to load its checkpoint format, build the prompt, turn (image, expression)
pairs into language-model inputs, find the image tokens of each row, and say where the grid lies
on the image. The collector calls only what is here and never asks which model it has.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from capture import register_capture
from dataio import InputError
from llava.geometry import Geometry



@dataclass
class Prepared:
    """A batch ready for `adapter.language_model_call`.

    inputs: keyword tensors for the model call (left-padded; position_ids from the mask).
    image_positions: [B, V] key index of each visual token, per row (padding moves them).
    geometry: per row, where the grid lies on that row's image.
    """

    inputs: dict[str, torch.Tensor]
    image_positions: torch.Tensor
    geometry: list[Geometry]
    prompts: list[str] = field(default_factory=list)


class Adapter:
    """Base class; subclasses set the attributes in __init__ and implement prepare()."""

    model_name: str
    model: torch.nn.Module     # the module whose forward/generate take Prepared.inputs
    tokenizer: object
    num_layers: int
    num_heads: int
    grid: tuple[int, int]      # (rows, cols)
    conv_mode: str
    device: torch.device
    dtype: torch.dtype
    image_token: str = "<image>"
    # Extra arguments for model.generate (e.g. never emit the image placeholder).
    generate_kwargs: dict = {}

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        """What every family reads from the model config; subclasses load the rest."""
        self.model_name = str(cfg.name)
        self.conv_mode = str(cfg.conv_mode)
        self.cache_dir = cfg.get("cache_dir") or None
        self.device, self.dtype = device, dtype

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        raise NotImplementedError

    def append_tokens(self, prepared: Prepared, token_ids: torch.Tensor) -> Prepared:
        """The batch with one more token [B] at the end of every row (image positions unchanged)."""
        inputs = dict(prepared.inputs)
        ones = inputs["attention_mask"].new_ones(token_ids.shape[0], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
        if "input_ids" in inputs:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], token_ids[:, None]], dim=1)
        else:
            new = self.model.get_input_embeddings()(token_ids[:, None])                 # [B, 1, D]
            inputs["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], new], dim=1)
        return Prepared(inputs, prepared.image_positions, prepared.geometry, prepared.prompts)

    def decode_generated(self, sequences: torch.Tensor, prepared: Prepared) -> list[str]:
        """Text of the new tokens; `sequences` is what model.generate returned."""
        prompt_len = prepared.inputs["input_ids"].shape[1] if "input_ids" in prepared.inputs else 0
        return self.tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_device(device: str, device_id: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{device_id}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"model.device={device} but CUDA is not available; use model.device=cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise InputError(f"model.dtype={dtype!r} is unknown; use auto, float32, float16 or bfloat16") from None


def read_checkpoint_config(name: str, cache_dir: str | None) -> dict:
    """config.json of a local folder or hub repo, as raw JSON (AutoConfig would misread the
    original LLaVA format, whose model_type "llava" names the Hugging Face class)."""
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise InputError(f"{local}: no config.json; model.name must be a checkpoint folder or hub id")
    else:
        from transformers.utils import cached_file

        try:
            path = cached_file(name, "config.json", cache_dir=cache_dir)
        except OSError as e:
            raise InputError(f"model.name={name!r}: cannot fetch config.json ({e.__class__.__name__}); "
                             "check the id, your network, or point model.name at a local folder") from None
    return json.loads(Path(path).read_text())


def checkpoint_format(config: dict) -> str:
    """"original" for liuhaotian-style LlavaLlamaForCausalLM, "hf" for LlavaForConditionalGeneration."""
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in config.get("architectures", []):
        return "original"
    if config.get("model_type") == "llava" and "vision_config" in config:
        return "hf"
    raise InputError(f"unsupported checkpoint (model_type={config.get('model_type')!r}, "
                     f"architectures={config.get('architectures')}); supported: original LLaVA-1.5, llava-hf")


def load_adapter(model_cfg, attn_capture: str = "sdpa") -> Adapter:
    """Load the checkpoint named by model_cfg.name once; attn_capture: "sdpa" (capturing function)
    or "eager" (output_attentions=True)."""
    if model_cfg.get("cache_dir"):
        # Libraries that read the environment rather than our argument (hub downloads of the
        # vision tower inside transformers) see the same cache.
        os.environ["HF_HOME"] = os.environ["HF_HUB_CACHE"] = str(model_cfg.cache_dir)
    if model_cfg.get("use_flash_attn"):
        raise InputError("model.use_flash_attn=true cannot return attention rows; keep it false "
                         "(the default capture already runs SDPA for the forward pass)")
    text_attn = {"sdpa": register_capture(), "eager": "eager"}.get(attn_capture)
    if text_attn is None:
        raise InputError(f"model.attn_capture={attn_capture!r} is unknown; use sdpa or eager")
    device = resolve_device(str(model_cfg.device), int(model_cfg.get("device_id", 0)))
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), device)
    raw = read_checkpoint_config(str(model_cfg.name), model_cfg.get("cache_dir"))
    if checkpoint_format(raw) == "original":
        from llava.original import OriginalLlavaAdapter as cls
    else:
        from llava.hf import HFLlavaAdapter as cls
    return cls(model_cfg, raw, text_attn=text_attn, device=device, dtype=dtype)
