"""The one interface between the pipeline and a model family.

An adapter loads its checkpoint, builds the family's prompt, turns (image, expression) pairs into the
exact model call, finds each row's image CELL tokens, and says where they lie on the image (a
layout.Layout per row). The collector calls only what is here and never asks which model it has.
Query token: the last prompt token (the end of the expression, or the end of the generation prompt
when the family's template adds one — each adapter states which).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from localization_heads.dataio import InputError
from localization_heads.layout import Layout


@dataclass
class Prepared:
    """A batch ready for the model call.

    inputs: keyword tensors of the call (left-padded: every row's last real token is at the end).
    image_positions: per row, [V_b] key index of each cell token in the layout's order (rows of a
        batch may hold different numbers of image tokens; separators are not listed).
    layouts: per row, where those cells lie on that row's original image.
    """

    inputs: dict[str, torch.Tensor]
    image_positions: list[torch.Tensor]
    layouts: list[Layout]
    prompts: list[str] = field(default_factory=list)

    def with_inputs(self, inputs: dict[str, torch.Tensor]) -> "Prepared":
        return Prepared(inputs, self.image_positions, self.layouts, self.prompts)


class Adapter:
    """Base class; a family sets the attributes in __init__ and implements prepare()."""

    family: str                # registry name
    model_name: str
    model: torch.nn.Module     # the module whose forward/generate take call_inputs(prepared)
    tokenizer: object
    num_layers: int            # decoder layers of the language model
    attention_layers: list[int]   # model indices of those with softmax attention: the L axis of every record
    num_heads: int
    conv_mode: str
    device: torch.device
    dtype: torch.dtype
    # Extra arguments for model.generate (e.g. never emit the image placeholder).
    generate_kwargs: dict = {}

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        """What every family reads from the model settings (config.ModelSettings); subclasses load the rest."""
        self.model_name = str(cfg.name)
        self.conv_mode = str(cfg.conv_mode)
        self.query_at = str(cfg.query_at)
        if self.query_at not in QUERY_AT:
            raise InputError(f"model.query_at={self.query_at!r} is unknown; use one of {', '.join(QUERY_AT)}")
        self.cache_dir = cfg.cache_dir or None
        self.device, self.dtype = device, dtype
        self.placement = placement(cfg)

    def prepare(self, images: list[Image.Image], queries: list[str]) -> Prepared:
        raise NotImplementedError

    def call_inputs(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        """Keyword arguments of the exact forward call. Default: positions counted from each row's
        first real token, because LLaVA-style models would otherwise shift left-padded rows.
        Families with their own position scheme (Qwen's M-RoPE) override this and pass none."""
        inputs = dict(prepared.inputs)
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
        return inputs

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
        for key in ("mm_token_type_ids", "token_type_ids"):   # text tokens are type 0
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros(token_ids.shape[0], 1)], dim=1)
        return prepared.with_inputs(inputs)

    def query_token_ids(self, prepared: Prepared) -> torch.Tensor:
        """[B] id of each row's query token: its last token (left padding puts it at the end).
        A family whose call carries embeddings instead of ids overrides this."""
        return prepared.inputs["input_ids"][:, -1]
    def vision_token_mixers(self) -> list[torch.nn.Module]:
        """The modules of the image path that mix patches; stage=check_layout zeroes their outputs so
        that every image token depends on its own pixels only. Default: every attention module of the
        model's vision encoder (get_encoder(modality="image")). A family whose image path mixes patches
        otherwise (convolutions across patches, a resampler) or keeps its tower elsewhere overrides this."""
        encoder = self.model.get_encoder(modality="image")
        return [] if encoder is self.model else attention_modules(encoder)

    def local_kernels(self) -> AbstractContextManager:
        """A context in which the image path's convolutions reach no neighbouring position (a CNN tower:
        each spatial kernel cut to its centre tap); stage=check_layout enters it beside zeroing
        vision_token_mixers. Default: nothing to cut."""
        return nullcontext()

    def embedding_module(self) -> torch.nn.Module:
        """The module whose forward receives the language model's input embeddings, image features
        merged, as `inputs_embeds` or as its first positional argument (stage=check_layout reads the image
        tokens there). Default: the model's decoder (get_decoder())."""
        return self.model.get_decoder()

    def decode_generated(self, sequences: torch.Tensor, prepared: Prepared) -> list[str]:
        """Text of the new tokens; `sequences` is what model.generate returned."""
        prompt_len = prepared.inputs["input_ids"].shape[1] if "input_ids" in prepared.inputs else 0
        return self.tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)


QUERY_AT = ("expression", "generation_prompt")


def chat_prompt(processor, query: str, query_at: str = "expression") -> str:
    """The family's own chat template with the image and the expression in the user turn.

    query_at "expression" (default, the paper's protocol): the prompt ends with the expression's last
    token — the template's text after it (end of turn, assistant header) is cut off. "generation_prompt":
    the whole user turn plus the assistant header, so the query is the last token of that header."""
    if query_at not in QUERY_AT:
        raise ValueError(f"model.query_at={query_at!r} is unknown; use one of {QUERY_AT}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=query_at == "generation_prompt",
                                         tokenize=False)
    if query_at == "generation_prompt":
        return text
    end = text.rfind(query)
    if end < 0:
        raise ValueError(f"the chat template does not contain the expression {query!r} verbatim")
    return text[: end + len(query)]


class ImageTextAdapter(Adapter):
    """A Hugging Face image-text-to-text checkpoint: a processor and AutoModelForImageTextToText, the
    language model on the capturing attention and the vision tower on SDPA. Families subclass it."""

    chat_template = True   # the prompt comes from the checkpoint's chat template (model.conv_mode=auto)

    def load(self, processor, text_attn: str):
        """Load the model beside `processor`; returns the model's config."""
        if self.chat_template and self.conv_mode != "auto":
            raise InputError(f"model.conv_mode={self.conv_mode!r}: {type(self).__name__} builds its prompt with the "
                             "checkpoint's own chat template; use model.conv_mode=auto")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # last real token at the end of every row
        self.model = place(AutoModelForImageTextToText.from_pretrained(
            self.model_name, cache_dir=self.cache_dir, dtype=self.dtype,
            attn_implementation={"text_config": text_attn, "vision_config": "sdpa", "": "sdpa"},
            **self.placement,
        ), self.device).eval()
        self.device = input_device(self.model)
        config = self.model.config
        self.image_token_id = config.image_token_id
        # A generated placeholder would be taken for an image on the capture pass.
        self.generate_kwargs = {"suppress_tokens": [self.image_token_id]}
        self.num_layers = config.text_config.num_hidden_layers
        self.attention_layers = attention_layers(config.text_config)
        self.num_heads = config.text_config.num_attention_heads
        return config

    def image_kwargs_of(self, cfg) -> tuple[dict, dict]:
        """(model.image_kwargs without nulls, the merged image settings every processor call uses):
        the processor's class defaults override its saved preprocessor config, so the layout must read
        the same merged settings as the call."""
        image_kwargs = {k: v for k, v in (cfg.image_kwargs or {}).items() if v is not None}
        merged = self.processor._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                              images_kwargs=image_kwargs)["images_kwargs"]
        return image_kwargs, merged

    def finish(self, batch, layouts: list[Layout], prompts: list[str], what: str = "the layout",
               image_positions: list[torch.Tensor] | None = None) -> Prepared:
        """Prepared from a processor batch: the image-token positions (default: every image token of
        the row) checked against each row's layout, tensors on the model's device, pixels in its dtype."""
        if image_positions is None:
            image_positions = token_positions(batch["input_ids"], self.image_token_id)   # per row [V_b]
        for b, (positions, layout) in enumerate(zip(image_positions, layouts)):
            if positions.numel() != layout.num_tokens:
                raise RuntimeError(f"row {b}: {positions.numel()} image tokens, but {layout.num_tokens} in "
                                   f"{len(layout.maps)} map(s) expected from {what}")
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return Prepared(inputs, image_positions, layouts, prompts)


def placement(cfg) -> dict:
    """from_pretrained's big-model arguments (accelerate): model.device_map (auto | balanced |
    sequential | {module: device}) with model.max_memory ({0: 70GiB, cpu: 200GiB}) and
    model.offload_folder (layers past max_memory go to disk there); {} for one device."""
    if cfg.device_map is None:
        return {}
    return {"device_map": cfg.device_map, "max_memory": cfg.max_memory, "offload_folder": cfg.offload_folder}


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device`, unless a device map has placed it already."""
    return model if getattr(model, "hf_device_map", None) else model.to(device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: the device its input embeddings run on. A layer offloaded to
    the CPU or disk keeps its weights on `meta`; accelerate's hook names the device it runs on."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embed.weight.device


# text_config.layer_types values: layers with softmax attention (captured) and layers without it
# (Qwen3.5's Gated DeltaNet, LFM2's short convolution). Any other value is refused, never guessed.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
OTHER_LAYER_TYPES = ("linear_attention", "conv")


def attention_layers(text_config) -> list[int]:
    """Model indices of the layers with softmax attention: every layer, or those `layer_types` marks
    as attention (hybrid models). An unknown layer type is an InputError naming it."""
    count = text_config.num_hidden_layers
    types = getattr(text_config, "layer_types", None)
    if types is None:
        return list(range(count))
    if len(types) != count:
        raise InputError(f"text_config.layer_types has {len(types)} entries for num_hidden_layers={count}; "
                         "the checkpoint's config.json is inconsistent")
    for i, kind in enumerate(types):
        if kind not in ATTENTION_LAYER_TYPES + OTHER_LAYER_TYPES:
            raise InputError(f"text_config.layer_types[{i}]={kind!r} is a layer type this tool does not know "
                             f"(attention: {', '.join(ATTENTION_LAYER_TYPES)}; without attention: "
                             f"{', '.join(OTHER_LAYER_TYPES)})")
    layers = [i for i, kind in enumerate(types) if kind in ATTENTION_LAYER_TYPES]
    if not layers:
        raise InputError("text_config.layer_types has no attention layer; there are no heads to capture")
    return layers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_positions(input_ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Per row of [B, N] ids, the [V_b] positions holding `token_id`, in order."""
    return [row.eq(token_id).nonzero()[:, 0].cpu() for row in input_ids]


def attention_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules under `root` whose class name ends in "Attention" (CLIPAttention,
    SiglipAttention, Qwen2_5_VLVisionAttention, ...)."""
    found, names = [], []
    for name, module in root.named_modules():
        if type(module).__name__.endswith("Attention") and not any(name.startswith(f"{n}.") for n in names):
            found.append(module)
            names.append(name)
    return found
