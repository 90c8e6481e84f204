"""The Python API: the CLI's method, one image (or a batch) at a time, without files.

    from localization_heads import Grounder
    g = Grounder.from_pretrained("toy", overrides=["logic=paper",
                                                   "logic.heads=models/toy-llava/selected_heads.json",
                                                   "logic.mask.threshold=half_max"])
    r = g.ground("examples/images/toy_tall.png", "the small yellow circle .")
    r.box, r.heads        # [x0, y0, x1, y1] on the original image (or None), [(layer, head), ...]

`overrides` are the CLI's own keys: the API composes the CLI's Hydra config (cli.compose), checks it
as the CLI does (validate.config_problems) and runs the CLI's functions (collector.collect,
outputs.run_analysis, outputs.ground), so the same inputs give the same box, mask and heads
through both. The model (and SAM, with logic.mask.refine=sam) is loaded once per Grounder.

Also here: `load_attention` (an attention file of any version), `analyze_record` (the per-sample
analysis of a record) and `select_heads` (dataset-level voting over records, stage=select).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from localization_heads import collector
from localization_heads import outputs
from localization_heads.config import LogicSettings, Settings
from localization_heads.dataio import InputError
from localization_heads.images import load_image, to_rgb
from localization_heads.layout import Layout
from localization_heads.settings import PACKAGE, attn_dtype, collect_kwargs, collect_settings

load_attention = collector.load_attention


@dataclass(frozen=True)
class GroundingResult:
    """What the CLI writes for one (image, query), as objects."""

    query: str
    box: list[float] | None            # [x0, y0, x1, y1] original-image pixels, half-open; None: nothing localized
    heatmap: np.ndarray                # [H, W] float64 on the original image (NaN where the model saw nothing)
    mask: np.ndarray                   # [H, W] bool (SAM's mask when logic.mask.refine=sam)
    heads: list[tuple[int, int]]       # the (layer, head) pairs combined
    heads_source: str                  # fixed heads (which file), per-sample top-k, or the fallback
    layout: Layout                     # where the image's tokens lie on the original image
    attention: dict                    # {"attn": [L, H, 1, V] float32, "meta": {...}}: what stage=collect saves
    analysis: dict                     # the per-sample analysis: {"tau", "ranked", "fallback", "heads"}
    refinement: dict | None = None     # what SAM did (logic.mask.refine=sam), else None


def compose_settings(model: str = "toy", overrides: Sequence[str] = ()) -> Settings:
    """The settings `localization-heads <overrides>` would run with, for `model`: a conf/model name
    (toy, qwen25vl_7b, ...), a hub id or a local checkpoint folder. A hub id that a conf/model file
    names gets that file's settings; any other id or folder gets the default model settings with
    the family's own prompt (model.conv_mode=auto). Bad values raise InputError, as the CLI refuses them."""
    from localization_heads import validate
    from localization_heads.cli import compose

    cfg = compose(*_model_overrides(model, overrides), *overrides)
    problems = validate.config_problems(cfg)
    if problems:
        raise InputError("; ".join(problems))
    return Settings.from_config(cfg)


def _model_overrides(model: str, overrides: Sequence[str]) -> list[str]:
    from omegaconf import OmegaConf

    from localization_heads.cli import override

    confs = PACKAGE / "conf" / "model"
    if (confs / f"{model}.yaml").is_file():
        return [f"model={model}"]
    for conf in sorted(confs.glob("*.yaml")):
        if OmegaConf.load(conf).get("name") == model:
            return [f"model={conf.stem}"]
    chosen = [override("model.name", model)]
    if not any(o.startswith("model.conv_mode=") for o in overrides):
        chosen.append("model.conv_mode=auto")
    return chosen


class Grounder:
    """A loaded model and the run's settings: ground(image, query) → GroundingResult."""

    def __init__(self, settings: Settings, adapter, refiner=None):
        self.settings, self.adapter, self.refiner = settings, adapter, refiner

    @classmethod
    def from_pretrained(cls, model: str = "toy", overrides: Sequence[str] = ()) -> "Grounder":
        """Load `model` (a conf/model name, a hub id or a local folder) once, with the CLI's `overrides`
        (e.g. ["logic=paper", "logic.heads=runs/calib/selected_heads.json", "model.device=cuda:0"])."""
        from localization_heads import refine, validate
        from localization_heads.settings import load_adapter_from

        settings = compose_settings(model, overrides)
        validate.check_model(settings)
        return cls(settings, load_adapter_from(settings), refine.load_refiner(settings))

    @property
    def logic(self) -> LogicSettings:
        return self.settings.logic

    def ground(self, image: str | Path | Image.Image, query: str) -> GroundingResult:
        """Ground one referring expression in one image (a file path or a PIL image)."""
        return self.ground_batch([image], [query], batch_size=1)[0]

    def ground_batch(self, images: Sequence[str | Path | Image.Image], queries: Sequence[str],
                     batch_size: int | None = None) -> list[GroundingResult]:
        """Ground queries[i] in images[i]; `batch_size` rows per forward pass (default data.batch_size),
        left-padded as stage=batch pads them."""
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries; give one query per image")
        size = int(batch_size or self.settings.data.batch_size)
        if size < 1:
            raise InputError(f"batch_size={size}: must be at least 1")
        results = []
        for start in range(0, len(images), size):
            chunk = [_as_image(im) for im in images[start:start + size]]
            records = collector.collect(self.adapter, [im for im, _ in chunk], list(queries[start:start + size]),
                                        **collect_kwargs(self.settings))
            results += [self._finish(record, image, image_file) for record, (image, image_file) in zip(records, chunk)]
        return results

    def _finish(self, record: dict, image: Image.Image, image_file: str | None) -> GroundingResult:
        # The attention as stage=collect saves it (data.attn_dtype), so the boxes equal the CLI's.
        record["attn"] = record["attn"].to(attn_dtype(self.settings)).float()
        record["meta"]["collect_settings"] = collect_settings(self.settings)
        if image_file is not None:
            record["meta"]["image_file"] = image_file
        result = outputs.run_analysis(record, self.logic)
        # SAM reads a file by its path; an in-memory image is handed over under a key of its own.
        in_memory = (f"<in-memory image {uuid.uuid4().hex}>", image) if image_file is None else None
        grounded = outputs.ground(record, result, self.logic, self.refiner, image=in_memory)
        loc = grounded["loc"]
        return GroundingResult(
            query=record["meta"]["query"], box=loc["bbox_xyxy"], heatmap=loc["heat"], mask=grounded["mask"],
            heads=[(h["layer"], h["head"]) for h in grounded["heads"]], heads_source=grounded["heads_source"],
            layout=Layout.from_meta(record["meta"]), attention=record, analysis=result,
            refinement=grounded["refinement"])

    def __repr__(self) -> str:
        return (f"Grounder(model={self.settings.model.name!r}, logic={self.logic.name!r}, "
                f"heads={self.logic.heads_source!r})")


def _as_image(image) -> tuple[Image.Image, str | None]:
    """(RGB image, its file or None): files are read by the CLI's rule (images.load_image), a PIL image
    is converted by the same rule."""
    if isinstance(image, Image.Image):
        return to_rgb(image, Path("<PIL image>")), None
    if isinstance(image, (str, Path)):
        return load_image(image), str(image)
    raise InputError(f"image {type(image).__name__}: give a file path or a PIL image")


def analyze_record(record: dict, logic: LogicSettings | None = None) -> dict:
    """The per-sample analysis of an attention record (load_attention, GroundingResult.attention):
    {"tau", "ranked": head records best first, "fallback", "heads": every head}. logic: default the
    paper's (conf/logic/paper.yaml)."""
    return outputs.run_analysis(record, logic or _default_logic())


def select_heads(records: Iterable[dict | str | Path], logic: LogicSettings | None = None) -> dict:
    """Dataset-level head selection (stage=select) over attention records or attention files of one
    model: {"heads": [[layer, head], ...] (the k most voted), "counts", "tau", ...}. Files are read one
    at a time. logic: default the paper's."""
    def named():
        for i, r in enumerate(records):
            yield (Path(r).name, load_attention(r)) if isinstance(r, (str, Path)) else (f"record {i}", r)

    return outputs.select_over(named(), logic or _default_logic())


def _default_logic() -> LogicSettings:
    return compose_settings("toy", ["logic=paper"]).logic
