"""Typed settings: the Hydra config of a run, turned ONCE into frozen dataclasses where it enters
(cli.run, api.Grounder.from_pretrained). Past that edge no code sees an OmegaConf object: the method
(analyze, bbox, refine, viz, outputs) takes these settings or plain arguments.

Attribute names are the config keys (`logic.mask.threshold`, `data.batch_size`), so code reads the
same as the config it came from. `LogicSettings.fixed_heads` is `logic.heads` resolved (a
selected_heads.json read) once per run, never per row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from localization_heads.dataio import InputError


def _plain(node) -> Any:
    """A config node (DictConfig, ListConfig or plain data) as plain Python data, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _build(cls, node):
    """`cls` from a mapping of its fields (keys it does not know are refused; missing ones keep the
    defaults); nested settings classes are built from their sub-mappings."""
    data = dict(_plain(node) or {})
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{cls.__name__.removesuffix('Settings').lower()}: unknown keys {unknown} "
                         f"(known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        kwargs[name] = _build(sub, value) if sub is not None else value
    return cls(**kwargs)


@dataclass(frozen=True)
class ThresholdSettings:
    method: str = "chord"          # criterion 1: chord elbow of the per-head image-attention sums
    scope: str = "sample"          # tau per sample (reference) | dataset (paper)
    min_keep: int = 1              # fallback: this many heads by attention sum


@dataclass(frozen=True)
class EntropySettings:
    method: str = "size"           # size (paper) | mass (reference code)
    binarize_threshold: float = 0.001


@dataclass(frozen=True)
class FilterSettings:
    bottom_row: bool = False
    bottom_row_threshold: float = 0.05
    min_layer: int = 0


@dataclass(frozen=True)
class SmoothingSettings:
    sigma: float = 1.0
    mode: str = "reflect"
    truncate: float = 4.0


@dataclass(frozen=True)
class MaskSettings:
    threshold: str = "mean"        # mean | half_max
    method: str = "largest_hull"   # largest_hull | mean_relu
    refine: str = "none"           # none | sam
    sam_model: str = "facebook/sam-vit-huge"
    sam_point: bool = False


@dataclass(frozen=True)
class SelectSettings:
    k: int = 3
    per_sample: int = 10
    allow_non_train: bool = False


@dataclass(frozen=True)
class LogicSettings:
    """logic.*: how heads are ranked, selected and combined into a box."""

    name: str = "paper"
    top_k: int = 3
    heads: Any = None              # as configured: None, a selected_heads.json path or [[layer, head], ...]
    threshold: ThresholdSettings = field(default_factory=ThresholdSettings)
    entropy: EntropySettings = field(default_factory=EntropySettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    smoothing: SmoothingSettings = field(default_factory=SmoothingSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    # `heads` resolved once (settings.fixed_heads): [(layer, head), ...] or None, and where they came from.
    fixed_heads: tuple[tuple[int, int], ...] | None = field(default=None, init=False)
    heads_source: str = field(default="", init=False)

    def __post_init__(self):
        from localization_heads.settings import fixed_heads

        if isinstance(self.heads, (list, tuple)):   # hashable and immutable, like the rest
            object.__setattr__(self, "heads", tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in self.heads))
        pairs, source = fixed_heads(self)
        object.__setattr__(self, "fixed_heads", None if pairs is None else tuple(pairs))
        object.__setattr__(self, "heads_source", source)

    @classmethod
    def from_config(cls, node) -> "LogicSettings":
        """From cfg.logic (a DictConfig or a plain mapping); reads a heads file here, once."""
        return _build(cls, node)

    def to_dict(self) -> dict:
        """The logic as configured (plain JSON data, as the outputs record it)."""
        d = asdict(self)
        d.pop("fixed_heads")
        d.pop("heads_source")
        if isinstance(self.heads, tuple):
            d["heads"] = [list(p) if isinstance(p, tuple) else p for p in self.heads]
        return d


@dataclass(frozen=True)
class ModelSettings:
    """model.*: which checkpoint, and how it is loaded and queried."""

    name: str = "models/toy-llava"
    family: str = "auto"
    cache_dir: str | None = None
    device: str = "auto"
    device_id: int = 0
    dtype: str = "auto"
    conv_mode: str = "auto"
    query_at: str = "expression"
    attn_capture: str = "sdpa"
    use_generate: bool = False
    max_new_tokens: int = 32
    do_sample: bool = False
    num_beams: int = 1
    use_flash_attn: bool = False
    image_kwargs: dict | None = None   # processor image settings (families with tiling / pan-and-scan)

    @classmethod
    def from_config(cls, node) -> "ModelSettings":
        return _build(cls, node)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataSettings:
    """data.*: inputs, outputs and how a batch run is split and resumed."""

    id: str = "sample"
    image_file: str | None = None
    query: str | None = None
    attention_file: str | None = None
    data_file: str | None = None
    process_all: bool = False
    start_index: int = 0
    end_index: int | None = 1
    output_dir: str = "outputs"
    visualize_batch: bool = False
    batch_size: int = 1
    num_workers: int = 2
    attn_dtype: str = "float16"
    resume: bool = True
    attention_dir: str | None = None
    pred_dir: str | None = None
    num_shards: int = 1
    shard: int = 0
    device_per_shard: bool = False

    @classmethod
    def from_config(cls, node) -> "DataSettings":
        return _build(cls, node)


@dataclass(frozen=True)
class Settings:
    """A whole run: `stage`, `model`, `logic`, `data` (cfg.hydra, Hydra's own, stays out)."""

    stage: str = "pipeline"
    model: ModelSettings = field(default_factory=ModelSettings)
    logic: LogicSettings = field(default_factory=LogicSettings)
    data: DataSettings = field(default_factory=DataSettings)

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        """From the composed DictConfig (cli.compose, @hydra.main); validate.check_config has
        already checked it."""
        return cls(stage=str(cfg.stage), model=ModelSettings.from_config(cfg.model),
                   logic=LogicSettings.from_config(cfg.logic), data=DataSettings.from_config(cfg.data))


_NESTED = {("LogicSettings", "threshold"): ThresholdSettings, ("LogicSettings", "entropy"): EntropySettings,
           ("LogicSettings", "filters"): FilterSettings, ("LogicSettings", "smoothing"): SmoothingSettings,
           ("LogicSettings", "mask"): MaskSettings, ("LogicSettings", "select"): SelectSettings}
