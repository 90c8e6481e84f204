"""Mask refinement with SAM: the heads' box prompts Segment Anything, whose mask replaces the coarse
thresholded one (method.md §5.6; the paper's referring segmentation, Table 2, prompts SAM with the box).

    logic.mask.refine     none (default) | sam
    logic.mask.sam_model  hub id or local folder of a SAM checkpoint (SamModel: facebook/sam-vit-huge, ...)
    logic.mask.sam_point  also prompt the heat map's peak as a positive point (default false: box only)

SAM runs in two parts: the image encoder (a ViT over the image scaled to a 1024 px square, nearly all
of SAM's cost) and the prompt encoder + mask decoder (light). `SamRefiner.encode` embeds many images
in one encoder call and keeps the embeddings by image file (the most recent `capacity`), so stage=batch
encodes each forward batch's images together, and an image that several expressions refer to (RefCOCO:
about 7 per image) is encoded once; `SamRefiner.segment` decodes one row's mask from its image's
embedding. SAM runs in float32 on the device of `model.device`.

SAM 2 (Sam2Model, also in transformers) is refused: its image processor exists only as a torchvision
variant, and this tool neither requires torchvision nor can test that path without it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from localization_heads import bbox
from localization_heads import viz
from localization_heads.images import load_image
from localization_heads.dataio import InputError, atomic_write_bytes, safe_output_path

log = logging.getLogger("refine")
REFINERS = ("none", "sam")


@dataclass(frozen=True)
class _Embedding:
    features: torch.Tensor          # [C, h, w] image embedding (SAM ViT: [256, 64, 64])
    original_size: tuple[int, int]  # (H, W) of the image
    resized_size: tuple[int, int]   # (H', W'): the image scaled so that its longest side fits the encoder


class SamRefiner:
    """A loaded SamModel + SamProcessor and a bounded cache of image embeddings keyed by image file."""

    def __init__(self, model, processor, name: str, capacity: int = 32):
        self.model, self.processor, self.name, self.capacity = model.eval(), processor, name, capacity
        self.device = next(model.parameters()).device
        self._cache: OrderedDict[str, _Embedding] = OrderedDict()

    @classmethod
    def load(cls, name: str, device: torch.device, cache_dir: str | None = None, capacity: int = 32) -> "SamRefiner":
        from transformers import AutoConfig, SamModel, SamProcessor

        try:
            model_type = AutoConfig.from_pretrained(name, cache_dir=cache_dir).model_type
        except (OSError, ValueError) as e:
            raise InputError(f"logic.mask.sam_model={name!r}: cannot read its config ({e.__class__.__name__}); "
                             "give a SAM hub id (facebook/sam-vit-huge) or a local checkpoint folder") from None
        if model_type != "sam":
            why = " (SAM 2's image processor needs torchvision; not supported yet)" if model_type.startswith("sam2") else ""
            raise InputError(f"logic.mask.sam_model={name!r} is a {model_type!r} checkpoint{why}; only SAM "
                             "(SamModel: facebook/sam-vit-huge/-large/-base, SlimSAM, MedSAM) is supported")
        model = SamModel.from_pretrained(name, cache_dir=cache_dir, dtype=torch.float32).to(device)
        # Without torchvision this resolves to SamImageProcessorPil, the pure PIL/numpy variant.
        processor = SamProcessor.from_pretrained(name, cache_dir=cache_dir)
        return cls(model, processor, name, capacity)

    @torch.no_grad()
    def encode(self, images: list[tuple[str, Image.Image]]) -> None:
        """Embed [(image file, RGB image), ...] in one encoder call; files already cached are skipped."""
        todo = list({key: image for key, image in images if key not in self._cache}.items())
        if not todo:
            return
        inputs = self.processor(images=[image for _, image in todo], return_tensors="pt")
        features = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))   # [B, C, h, w]
        for (key, _), f, original, resized in zip(todo, features, inputs["original_sizes"],
                                                   inputs["reshaped_input_sizes"]):
            self._cache[key] = _Embedding(f, tuple(original.tolist()), tuple(resized.tolist()))
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def prefetch(self, images: list[tuple[str, Image.Image]]) -> None:
        """encode(), but a failure (e.g. out of memory for the whole batch) only leaves the images to be
        encoded one at a time by segment(), where an error is that row's."""
        try:
            self.encode(images)
        except Exception as e:  # noqa: BLE001 — the rows retry one by one and report their own errors
            log.warning("SAM could not encode %d images together (%s: %s); encoding them one at a time",
                        len(images), e.__class__.__name__, e)

    @torch.no_grad()
    def segment(self, image_file: str, box_xyxy: list[float],
                point_xy: list[float] | None = None) -> tuple[np.ndarray, float]:
        """SAM's mask [H, W] bool for one box prompt (xyxy, original pixels) and optional positive point
        (x, y), and SAM's own estimate of the mask's IoU."""
        if image_file not in self._cache:
            self.encode([(image_file, load_image(image_file))])
        self._cache.move_to_end(image_file)
        emb = self._cache[image_file]
        (height, width), (new_h, new_w) = emb.original_size, emb.resized_size
        to_encoder = torch.tensor([new_w / width, new_h / height])   # original pixels → the encoder's frame
        prompt = {"input_boxes": (torch.tensor(box_xyxy).view(2, 2) * to_encoder).view(1, 1, 4)}   # [image, box, 4]
        if point_xy is not None:
            prompt["input_points"] = (torch.tensor(point_xy) * to_encoder).view(1, 1, 1, 2)      # [image, box, point, 2]
            prompt["input_labels"] = torch.ones(1, 1, 1, dtype=torch.long)                       # 1 = foreground
        prompt = {k: v.to(self.device) for k, v in prompt.items()}
        out = self.model(image_embeddings=emb.features[None], multimask_output=False, **prompt)
        # pred_masks [image, box, 1, 256, 256] logits → [box, 1, H, W] bool at the original resolution
        masks = self.processor.post_process_masks(out.pred_masks.cpu(), [emb.original_size], [emb.resized_size])
        return masks[0][0, 0].numpy().astype(bool), float(out.iou_scores[0, 0, 0])


def load_refiner(cfg) -> SamRefiner | None:
    """The refiner logic.mask.refine asks for, loaded once (None for refine=none). cfg: config.Settings
    (SAM runs on the run's device; its cache holds two forward batches' images)."""
    method = str(cfg.logic.mask.refine)
    if method not in REFINERS:
        raise InputError(f"logic.mask.refine={method!r} is unknown; use one of {', '.join(REFINERS)}")
    if method == "none":
        return None
    from localization_heads.families import resolve_device
    from localization_heads.settings import model_path, run_device

    device = resolve_device(run_device(cfg), int(cfg.model.device_id))
    # Room for the images of two forward batches: rows of one image often straddle a batch boundary.
    capacity = max(32, 2 * int(cfg.data.batch_size))
    return SamRefiner.load(model_path(str(cfg.logic.mask.sam_model)), device, cfg.model.cache_dir or None, capacity)


def heat_peak(heat: np.ndarray) -> list[float]:
    """(x, y) of the centre of the heat map's highest pixel ([H, W], NaN = unseen)."""
    y, x = np.unravel_index(int(np.nanargmax(heat)), heat.shape)
    return [float(x) + 0.5, float(y) + 0.5]


def refine(refiner: SamRefiner | None, loc: dict, meta: dict, mask_settings) -> tuple[np.ndarray, dict | None]:
    """The mask to write as <id>_mask.png, and what refinement made it (None: the coarse mask, unrefined).
    loc: bbox.localize's output (mask, heat, bbox_xyxy); meta: the attention file's (image_file: the
    refiner's key for the image); mask_settings: logic.mask (config.MaskSettings: sam_point)."""
    if refiner is None:
        return loc["mask"], None
    use_point = bool(mask_settings.sam_point)
    info = {"method": "sam", "model": refiner.name, "prompt": "box+point" if use_point else "box"}
    if loc["bbox_xyxy"] is None:   # the heads found nothing: no prompt, the (empty) coarse mask stays
        return loc["mask"], dict(info, point_xy=None, status="no_box", score=None, sam_bbox_xyxy=None)
    point = heat_peak(loc["heat"]) if use_point else None
    mask, score = refiner.segment(str(meta["image_file"]), loc["bbox_xyxy"], point)
    if mask.shape != loc["mask"].shape:
        raise InputError(f"{meta['image_file']}: the image is {mask.shape[1]}x{mask.shape[0]} px now but was "
                         f"{loc['mask'].shape[1]}x{loc['mask'].shape[0]} when its attention was collected; collect it again")
    return mask, dict(info, point_xy=point, status="ok", score=score, sam_bbox_xyxy=bbox.box_from_mask(mask))


def write_masks(out_dir: Path, item_id: str, coarse: np.ndarray, mask: np.ndarray, refined: bool) -> None:
    """<id>_mask.png (the refined mask when there is one) and, when refined, <id>_mask_coarse.png (the
    heads' own); an unrefined rerun removes a coarse file left from an earlier refined one."""
    atomic_write_bytes(safe_output_path(out_dir, item_id, "_mask.png"), viz.mask_png(mask))
    coarse_path = safe_output_path(out_dir, item_id, "_mask_coarse.png")
    if refined:
        atomic_write_bytes(coarse_path, viz.mask_png(coarse))
    else:
        coarse_path.unlink(missing_ok=True)
