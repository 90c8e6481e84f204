"""Grounding evaluation: IoU of predicted vs. ground-truth boxes, Acc@{0.25,0.5,0.75} and mean IoU;
and, for rows whose ground truth has a `segmentation`, the referring-segmentation (RES) metrics of
the predicted masks: cIoU and mask mIoU.

Boxes are xyxy in original-image pixels with continuous coordinates and the half-open convention
(a box [x0, y0, x1, y1] covers x0 <= x < x1), so area = (x1 - x0) * (y1 - y0) with no "+1".
Every ground-truth row counts in the denominator: a missing prediction file, an unreadable one,
or a null box scores IoU 0 and is listed, so a run that crashes on hard items cannot look better.

Masks: <id>_mask.png beside <id>_bbox.json against the row's `segmentation` (COCO RLE or polygons,
cocomask.py). cIoU = Σ intersection / Σ union over all rows with a segmentation (the paper's RES
metric: large objects weigh more); mask mIoU = the mean of the per-row IoUs. A missing or unusable
predicted mask counts as an empty mask (intersection 0, union the ground truth's area) and scores IoU 0;
an empty ground truth scores IoU 1 against an empty predicted mask (nothing there, nothing found).

A prediction made from other inputs than the JSONL row (its prompt or image file changed since;
recorded as `source` in <id>_bbox.json) is stale: IoU 0, listed, never scored as ok.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from localization_heads import cocomask
from localization_heads.dataio import (InputError, atomic_write_json, atomic_write_text, box_problem, is_number, read_jsonl,
                                      resolve_path, safe_output_path)
from localization_heads.progress import track
from localization_heads.settings import row_source, source_change

log = logging.getLogger("evaluate")
THRESHOLDS = (0.25, 0.5, 0.75)
UNSCORED = ("missing", "stale", "failed")   # no current prediction to score
MAX_LISTED = 100  # evaluation.json stays readable on a 10k-row split; the CSV has every row


def iou_xyxy(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes; 0 when either is degenerate (x1 <= x0 or y1 <= y0) or they only touch."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    if ax1 <= ax0 or ay1 <= ay0 or bx1 <= bx0 or by1 <= by0:
        return 0.0
    iw = min(ax1, bx1) - max(ax0, bx0)
    ih = min(ay1, by1) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _valid_xyxy(box: Any) -> bool:
    return box_problem(box) is None


@dataclass(frozen=True)
class GroundTruth:
    id: str
    bbox: tuple[float, float, float, float] | None   # None: no ground-truth box (report only)
    size: tuple[int, int] | None  # (width, height) when the JSONL has them
    segmentation: Any = None  # COCO RLE dict or polygons (RES rows); None: box evaluation only
    where: str = ""  # "<data_file>:<line>", for errors in the segmentation found while scoring
    source: dict | None = None    # settings.row_source of the row, when it has prompt and image_path


@dataclass(frozen=True)
class RowResult:
    id: str
    iou: float
    status: str  # ok | missing | failed | no_box | stale
    reason: str = ""
    size_mismatch: bool = False


def load_ground_truth(data_file: str | Path, require_bbox: bool = True) -> list[GroundTruth]:
    """The rows of the data JSONL, checked as stage=batch checks its rows (every problem of the file
    listed at once) and with a valid xyxy `bbox` (rows without one have bbox None when
    require_bbox=False: a report over a run without ground truth). The one reader of ground truth
    for stage=evaluate and stage=report."""
    from localization_heads.validate import jsonl_rows   # here: validate → refine → viz → evaluate

    def segmentation_problem(where: str, row: dict) -> list[str]:
        if row.get("segmentation") is None:
            return []
        try:
            _check_segmentation(row["segmentation"], _size(row), where)
        except InputError as e:
            return [str(e)]
        return []

    required = ("id", "bbox") if require_bbox else ("id",)
    rows: list[GroundTruth] = []
    for lineno, row in jsonl_rows(data_file, required, extra=segmentation_problem):
        item_id = str(row["id"])
        box = row.get("bbox")
        prompt, image = row.get("prompt"), row.get("image_path")
        source = (row_source(item_id, prompt, image, resolve_path(image, Path(data_file).parent))
                  if isinstance(prompt, str) and isinstance(image, str) else None)
        rows.append(GroundTruth(item_id, tuple(float(v) for v in box) if box is not None else None, _size(row),
                                row.get("segmentation"), f"{data_file}:{lineno}", source))
    if not rows:
        raise InputError(f"{data_file}: no rows; nothing to evaluate")
    return rows


def _size(row: dict) -> tuple[int, int] | None:
    w, h = row.get("width"), row.get("height")
    return (int(w), int(h)) if is_number(w) and is_number(h) else None


def load_failures(pred_dir: str | Path) -> dict[str, str]:
    """id -> error from <pred_dir>/failures.jsonl (every run's and shard's failed rows); a torn last
    line (crash mid-append) keeps what came before."""
    path = Path(pred_dir) / "failures.jsonl"
    reasons: dict[str, str] = {}
    if not path.is_file():
        return reasons
    try:
        for _, row in read_jsonl(path, required=("id",)):
            reasons[str(row["id"])] = str(row.get("error", "unknown error"))
    except InputError:
        pass
    return reasons


def score_prediction(gt: GroundTruth, pred_dir: Path, failures: dict[str, str]) -> RowResult:
    """IoU of one ground-truth row against <pred_dir>/<id>_bbox.json, with why it is 0 when it is."""
    path = safe_output_path(pred_dir, gt.id, "_bbox.json")
    if not path.is_file():
        if gt.id in failures:
            return RowResult(gt.id, 0.0, "failed", failures[gt.id])
        return RowResult(gt.id, 0.0, "missing", "no prediction file")
    try:
        pred = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return RowResult(gt.id, 0.0, "failed", f"unreadable {path.name}: {e}")
    if not isinstance(pred, dict) or "bbox_xyxy" not in pred:
        return RowResult(gt.id, 0.0, "failed", f"{path.name} has no 'bbox_xyxy'")
    stale = staleness(gt, pred)
    if stale:
        return RowResult(gt.id, 0.0, "stale", f"{stale} since {path.name} was made; rerun stage=batch")
    box = pred["bbox_xyxy"]
    if box is None:
        return RowResult(gt.id, 0.0, "no_box", "prediction has no box")
    if not _valid_xyxy(box):
        return RowResult(gt.id, 0.0, "failed", f"{path.name}: bad bbox_xyxy {box!r}")
    size = pred.get("image_size")
    # a box predicted on a resized image would silently score low; flag it instead of guessing a rescale
    mismatch = (gt.size is not None and isinstance(size, (list, tuple)) and len(size) == 2
                and [int(v) if is_number(v) else v for v in size] != list(gt.size))
    return RowResult(gt.id, iou_xyxy(box, gt.bbox), "ok", size_mismatch=mismatch)


@dataclass(frozen=True)
class MaskResult:
    id: str
    inter: int  # pixels in both masks
    union: int  # pixels in either
    iou: float
    status: str  # ok | missing | failed | stale (all but ok: scored as an empty mask)
    reason: str = ""


def _check_segmentation(seg: Any, size: tuple[int, int] | None, where: str) -> None:
    """The form of a row's segmentation, checked on loading; decoding waits for scoring so that only one
    mask is in memory at a time."""
    if isinstance(seg, dict):
        hw = seg.get("size")
        if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)
                and isinstance(seg.get("counts"), (str, list))):
            raise InputError(f"{where}: key 'segmentation' must be COCO RLE {{\"size\": [H, W], \"counts\": ...}} "
                             f"or a list of polygons, got {json.dumps(seg)[:80]}")
        if size is not None and hw != [size[1], size[0]]:
            raise InputError(f"{where}: key 'segmentation' has size [H, W] = {hw} but the row's width, height "
                             f"are {size[0]}, {size[1]}")
    elif isinstance(seg, list) and seg:
        if size is None:
            raise InputError(f"{where}: key 'segmentation' holds polygons, which need the row's 'width' and 'height'")
    else:
        raise InputError(f"{where}: key 'segmentation' must be COCO RLE or a non-empty list of polygons, "
                         f"got {json.dumps(seg)[:80]}")


def truth_mask(gt: GroundTruth) -> np.ndarray:
    """The row's ground-truth mask [H, W] bool."""
    seg = gt.segmentation
    width, height = gt.size if gt.size is not None else (seg["size"][1], seg["size"][0])
    try:
        return cocomask.to_mask(seg, height, width)
    except (ValueError, TypeError) as e:
        raise InputError(f"{gt.where}: key 'segmentation': {e}") from None


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG (any mode) → [H, W] bool, foreground above mid-grey."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def score_mask(gt: GroundTruth, pred_dir: Path, box: RowResult) -> MaskResult:
    """Intersection and union of <pred_dir>/<id>_mask.png with the row's segmentation; a missing or
    unusable prediction is an empty mask."""
    truth = truth_mask(gt)
    area = int(np.count_nonzero(truth))

    def empty(status: str, reason: str) -> MaskResult:
        return MaskResult(gt.id, 0, area, 0.0, status, reason)

    if box.status == "stale" or not safe_output_path(pred_dir, gt.id, "_bbox.json").is_file():
        return empty(box.status, box.reason)  # made from other inputs, or never finished: its mask is not trusted
    path = safe_output_path(pred_dir, gt.id, "_mask.png")
    if not path.is_file():
        return empty("missing", f"no {path.name}")
    try:
        pred = read_mask(path)
    except (OSError, UnidentifiedImageError) as e:
        return empty("failed", f"unreadable {path.name}: {e}")
    if pred.shape != truth.shape:
        return empty("failed", f"{path.name} is {pred.shape[1]}x{pred.shape[0]} px, the ground truth "
                               f"{truth.shape[1]}x{truth.shape[0]}")
    inter, union = int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred | truth))
    return MaskResult(gt.id, inter, union, inter / union if union else 1.0, "ok")


def summarize_masks(masks: list[MaskResult]) -> dict[str, Any]:
    """cIoU (Σ intersection / Σ union; null when every mask and prediction is empty) and mask mIoU over
    the rows with a ground-truth segmentation."""
    n = len(masks)
    inter, union = sum(m.inter for m in masks), sum(m.union for m in masks)
    not_ok = [m for m in masks if m.status != "ok"]
    return {
        "mask_n": n,
        "ciou": inter / union if union else None,
        "mask_miou": sum(m.iou for m in masks) / n if n else None,
        "mask_status_counts": {s: sum(m.status == s for m in masks) for s in ("ok", "missing", "failed", "stale")},
        "mask_missing_ids": [m.id for m in not_ok[:MAX_LISTED]],
        "mask_missing_reasons": {m.id: m.reason for m in not_ok[:MAX_LISTED]},
    }


def staleness(gt: GroundTruth, pred: dict) -> str | None:
    """Why a prediction was not made from this JSONL row, or None. Predictions of other tools (no
    `source`) are checked by their `query` when they have one."""
    if gt.source is None:
        return None
    if "source" in pred:
        return source_change(pred["source"], gt.source)
    if "query" in pred and pred["query"] != gt.source["prompt"]:
        return "prompt changed"
    return None


def check_scored(results: list[RowResult], data_file: str | Path, pred_dir: str | Path) -> None:
    """Say on the console how many rows have no current prediction (they score IoU 0); InputError
    when that is every row: nothing could be scored, and "Acc 0.000" would look like a result."""
    unscored = [r for r in results if r.status in UNSCORED]
    if not unscored:
        return
    counts = ", ".join(f"{s} {n}" for s in UNSCORED if (n := sum(r.status == s for r in unscored)))
    line = f"{len(unscored)} of {len(results)} predictions missing / stale ({counts}) in {pred_dir}"
    if len(unscored) == len(results):
        example = unscored[0]
        raise InputError(f"{line}; nothing could be scored (e.g. {example.id}: {example.reason}); "
                         f"run stage=batch on {data_file} first, or point data.pred_dir at its predictions")
    log.warning("%s; they score IoU 0 and are listed", line)


def summarize(results: list[RowResult], data_file: str | Path, pred_dir: str | Path) -> dict[str, Any]:
    n = len(results)
    not_ok = [r for r in results if r.status != "ok"]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "missing", "failed", "no_box", "stale")}
    summary: dict[str, Any] = {"n": n, "missing": len(not_ok), "status_counts": counts}
    summary["missing_ids"] = [r.id for r in not_ok[:MAX_LISTED]]
    summary["missing_reasons"] = {r.id: r.reason for r in not_ok[:MAX_LISTED]}
    for t in THRESHOLDS:
        summary[f"acc@{t}"] = sum(r.iou >= t for r in results) / n
    summary["miou"] = sum(r.iou for r in results) / n
    mismatched = [r.id for r in results if r.size_mismatch]
    summary["size_mismatch"] = len(mismatched)
    summary["size_mismatch_ids"] = mismatched[:MAX_LISTED]
    summary["data_file"] = str(data_file)
    summary["pred_dir"] = str(pred_dir)
    return summary


def rows_csv(results: list[RowResult], masks: dict[str, MaskResult] | None = None) -> str:
    """One line per row; the mask_* cells are empty for rows without a ground-truth segmentation."""
    masks = masks or {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "iou", "hit@0.5", "status", "reason", "mask_iou", "mask_inter", "mask_union",
                     "mask_status", "mask_reason"])
    for r in results:
        m = masks.get(r.id)
        mask_cells = [f"{m.iou:.6f}", m.inter, m.union, m.status, m.reason] if m else [""] * 5
        writer.writerow([r.id, f"{r.iou:.6f}", int(r.iou >= 0.5), r.status, r.reason, *mask_cells])
    return buf.getvalue()


def evaluate(data_file: str | Path, pred_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every row of data_file against pred_dir; write evaluation.json + evaluation_rows.csv into out_dir."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found; run the grounding step first")
    truth = load_ground_truth(data_file)
    failures = load_failures(pred_dir)
    results = [score_prediction(gt, pred_dir, failures) for gt in track(truth, "evaluate", unit="rows")]
    masks = {gt.id: score_mask(gt, pred_dir, r) for gt, r in zip(truth, results) if gt.segmentation is not None}
    check_scored(results, data_file, pred_dir)
    summary = summarize(results, data_file, pred_dir)
    summary.update(summarize_masks(list(masks.values())))
    out = Path(out_dir) if out_dir is not None else pred_dir
    atomic_write_text(out / "evaluation_rows.csv", rows_csv(results, masks))
    atomic_write_json(out / "evaluation.json", summary)
    return summary


def _cell(row: dict[str, Any], *keys: str) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _percent(value: Any, width: int) -> str:
    return f"{f'{100 * value:.2f}' if value is not None else '-':>{width}}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: split, n, Acc@0.5 and mIoU in percent, then (when any row has masks) the number
    of rows with a ground-truth mask, cIoU and mask mIoU. Takes evaluate() summaries plus a 'split'."""
    with_masks = any(_cell(row, "ciou", "mask_miou") is not None for row in rows)
    header = f"{'split':<12} {'n':>7} {'Acc@0.5':>8} {'mIoU':>7}"
    lines = [header + (f" {'n_mask':>7} {'cIoU':>7} {'mask-mIoU':>9}" if with_masks else "")]
    for row in rows:
        split = str(_cell(row, "split") or "-")
        n = _cell(row, "n")
        line = (f"{split:<12} {n if n is not None else '-':>7} {_percent(_cell(row, 'acc@0.5', 'Acc@0.5'), 8)} "
                f"{_percent(_cell(row, 'miou', 'mIoU'), 7)}")
        if with_masks:
            n_mask = _cell(row, "mask_n")
            line += (f" {n_mask if n_mask is not None else '-':>7} {_percent(_cell(row, 'ciou'), 7)} "
                     f"{_percent(_cell(row, 'mask_miou'), 9)}")
        lines.append(line)
    return "\n".join(lines)
