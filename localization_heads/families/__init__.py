"""The family registry: which adapter runs a checkpoint, chosen from the checkpoint's own config.json.

Every family lives in one module behind the interface of adapters/base.py; this module imports none
of them until it loads one (FAMILIES names them by "module:Class"), so there is no import cycle.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from localization_heads.capture import register_capture
from localization_heads.dataio import InputError

# family → "module:Class". model.family=auto picks one with detect_family().
FAMILIES = {
    "llava_original": "localization_heads.families.llava:OriginalLlavaAdapter",
    "llava_hf": "localization_heads.families.llava:HFLlavaAdapter",
    "llava_next": "localization_heads.families.llava_next:LlavaNextAdapter",
    "llava_onevision": "localization_heads.families.llava_next:LlavaOnevisionAdapter",
    "internvl": "localization_heads.families.internvl:InternVLAdapter",
    "gemma3": "localization_heads.families.gemma3:Gemma3Adapter",
    "paligemma": "localization_heads.families.paligemma:PaliGemmaAdapter",
    "idefics3": "localization_heads.families.idefics3:Idefics3Adapter",
    "smolvlm": "localization_heads.families.idefics3:SmolVLMAdapter",
    "qwen_vl": "localization_heads.families.qwen_vl:QwenVLAdapter",
    "molmo2": "localization_heads.families.molmo2:Molmo2Adapter",
    "aya_vision": "localization_heads.families.aya_vision:AyaVisionAdapter",
    "glm4v": "localization_heads.families.glm4v:Glm4vAdapter",
    "llama4": "localization_heads.families.llama4:Llama4Adapter",
    "lfm2_vl": "localization_heads.families.lfm2_vl:Lfm2VlAdapter",
    "gemma4": "localization_heads.families.gemma4:Gemma4Adapter",
    "mistral3": "localization_heads.families.mistral3:Mistral3Adapter",
    "deepseek_vl": "localization_heads.families.deepseek_vl:DeepseekVLAdapter",
    "janus": "localization_heads.families.janus:JanusAdapter",
    "minicpmv4_6": "localization_heads.families.minicpmv4_6:MiniCPMV4_6Adapter",
    "ovis2_5": "localization_heads.families.ovis2_5:Ovis2_5Adapter",
    "cohere2_vision": "localization_heads.families.cohere2_vision:Cohere2VisionAdapter",
    "phi4_multimodal": "localization_heads.families.phi4_multimodal:Phi4MultimodalAdapter",
    "gemma3n": "localization_heads.families.gemma3n:Gemma3nAdapter",
}
# config.json model_type → family (the original LLaVA format is recognised by its mm_* keys).
MODEL_TYPES = {
    "llava": "llava_hf",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "internvl": "internvl",
    "gemma3": "gemma3",
    "paligemma": "paligemma",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "qwen2_vl": "qwen_vl",
    "qwen2_5_vl": "qwen_vl",
    "qwen3_vl": "qwen_vl",
    "molmo2": "molmo2",
    "aya_vision": "aya_vision",
    "glm4v": "glm4v",
    "glm4v_moe": "glm4v",
    "glm46v": "glm4v",
    "llama4": "llama4",
    "qwen3_5": "qwen_vl",
    "qwen3_5_moe": "qwen_vl",
    "lfm2_vl": "lfm2_vl",
    "gemma4": "gemma4",
    "mistral3": "mistral3",
    "deepseek_vl": "deepseek_vl",
    "deepseek_vl_hybrid": "deepseek_vl",
    "janus": "janus",
    "minicpmv4_6": "minicpmv4_6",
    "ovis2_5": "ovis2_5",
    "cohere2_vision": "cohere2_vision",
    "phi4_multimodal": "phi4_multimodal",
    "gemma3n": "gemma3n",
}


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


def detect_family(config: dict) -> str:
    """The family of a checkpoint from its raw config.json."""
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in config.get("architectures", []):
        return "llava_original"
    family = MODEL_TYPES.get(config.get("model_type"))
    if family is None or (family == "llava_hf" and "vision_config" not in config):
        raise InputError(f"unsupported checkpoint (model_type={config.get('model_type')!r}, "
                         f"architectures={config.get('architectures')}); supported model types: "
                         f"{', '.join(sorted(MODEL_TYPES))} and original LLaVA-1.5 (model.family=<name> forces one of "
                         f"{', '.join(sorted(FAMILIES))})")
    return family


def adapter_class(family: str):
    if family not in FAMILIES:
        raise InputError(f"model.family={family!r} is unknown; use auto or one of {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def load_adapter(model, attn_capture: str = "sdpa"):
    """Load the checkpoint named by model.name once; model: config.ModelSettings (or a mapping of
    its keys, missing ones at their defaults); attn_capture: "sdpa" (capturing function) or "eager"
    (output_attentions=True). model.cache_dir goes to every from_pretrained as an argument; the
    environment is never changed."""
    from localization_heads.config import ModelSettings

    model_cfg = model if isinstance(model, ModelSettings) else ModelSettings.from_config(model)
    if model_cfg.use_flash_attn:
        raise InputError("model.use_flash_attn=true cannot return attention rows; keep it false "
                         "(the default capture already runs SDPA for the forward pass)")
    text_attn = {"sdpa": register_capture(), "eager": "eager"}.get(attn_capture)
    if text_attn is None:
        raise InputError(f"model.attn_capture={attn_capture!r} is unknown; use sdpa or eager")
    device = resolve_device(str(model_cfg.device), int(model_cfg.device_id))
    dtype = resolve_dtype(str(model_cfg.dtype), device)
    raw = read_checkpoint_config(str(model_cfg.name), model_cfg.cache_dir or None)
    family = str(model_cfg.family or "auto")
    family = detect_family(raw) if family == "auto" else family
    adapter = adapter_class(family)(model_cfg, raw, text_attn=text_attn, device=device, dtype=dtype)
    adapter.family = family
    return adapter
