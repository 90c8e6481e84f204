"""Grounding evaluation: IoU of predicted vs. ground-truth boxes, Acc@{0.25,0.5,0.75} and mean IoU.

Boxes are xyxy in original-image pixels with continuous coordinates and the half-open convention
(a box [x0, y0, x1, y1] covers x0 <= x < x1), so area = (x1 - x0) * (y1 - y0) with no "+1".
Every ground-truth row counts in the denominator: a missing prediction file, an unreadable one,
or a null box scores IoU 0 and is listed, so a run that crashes on hard items cannot look better.
A prediction made from other inputs than the JSONL row (its prompt or image file changed since;
recorded as `source` in <id>_bbox.json) is stale: IoU 0, listed, never scored as ok.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dataio import InputError, atomic_write_json, atomic_write_text, read_jsonl, resolve_path, safe_output_path
from settings import row_source, source_change

THRESHOLDS = (0.25, 0.5, 0.75)
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


def _is_number(v: Any) -> bool:
    # bool is an int subclass; true/false in a bbox is a data bug, not a coordinate
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_xyxy(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)
            and box[2] >= box[0] and box[3] >= box[1])


@dataclass(frozen=True)
class GroundTruth:
    id: str
    bbox: tuple[float, float, float, float]
    size: tuple[int, int] | None  # (width, height) when the JSONL has them
    source: dict | None = None    # settings.row_source of the row, when it has prompt and image_path


@dataclass(frozen=True)
class RowResult:
    id: str
    iou: float
    status: str  # ok | missing | failed | no_box | stale
    reason: str = ""
    size_mismatch: bool = False


def load_ground_truth(data_file: str | Path) -> list[GroundTruth]:
    """Rows of the data JSONL with a validated xyxy `bbox`; ids must be unique file-name-safe strings."""
    rows: list[GroundTruth] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(data_file, required=("id", "bbox")):
        item_id = str(row["id"])
        try:
            safe_output_path(".", item_id, "")
        except InputError as e:
            raise InputError(f"{data_file}:{lineno}: key 'id': {e}") from None
        if item_id in seen:
            raise InputError(f"{data_file}:{lineno}: key 'id': {item_id!r} already used on line {seen[item_id]}; ids must be unique")
        seen[item_id] = lineno
        box = row["bbox"]
        if not _valid_xyxy(box):
            raise InputError(f"{data_file}:{lineno}: key 'bbox' must be 4 finite numbers [x0, y0, x1, y1] "
                             f"in pixels with x1 >= x0 and y1 >= y0, got {box!r}")
        w, h = row.get("width"), row.get("height")
        size = (int(w), int(h)) if _is_number(w) and _is_number(h) else None
        prompt, image = row.get("prompt"), row.get("image_path")
        source = (row_source(item_id, prompt, image, resolve_path(image, Path(data_file).parent))
                  if isinstance(prompt, str) and isinstance(image, str) else None)
        rows.append(GroundTruth(item_id, tuple(float(v) for v in box), size, source))
    if not rows:
        raise InputError(f"{data_file}: no rows; nothing to evaluate")
    return rows


def load_failures(pred_dir: str | Path) -> dict[str, str]:
    """id -> error from <pred_dir>/failures.jsonl; a torn last line (crash mid-append) keeps what came before."""
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
                and [int(v) if _is_number(v) else v for v in size] != list(gt.size))
    return RowResult(gt.id, iou_xyxy(box, gt.bbox), "ok", size_mismatch=mismatch)


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


def rows_csv(results: list[RowResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "iou", "hit@0.5", "status", "reason"])
    for r in results:
        writer.writerow([r.id, f"{r.iou:.6f}", int(r.iou >= 0.5), r.status, r.reason])
    return buf.getvalue()


def evaluate(data_file: str | Path, pred_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every row of data_file against pred_dir; write evaluation.json + evaluation_rows.csv into out_dir."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found; run the grounding step first")
    truth = load_ground_truth(data_file)
    failures = load_failures(pred_dir)
    results = [score_prediction(gt, pred_dir, failures) for gt in truth]
    summary = summarize(results, data_file, pred_dir)
    out = Path(out_dir) if out_dir is not None else pred_dir
    atomic_write_text(out / "evaluation_rows.csv", rows_csv(results))
    atomic_write_json(out / "evaluation.json", summary)
    return summary


def _cell(row: dict[str, Any], *keys: str) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: split, n, Acc@0.5 and mIoU in percent. Takes evaluate() summaries plus a 'split'."""
    lines = [f"{'split':<12} {'n':>7} {'Acc@0.5':>8} {'mIoU':>7}"]
    for row in rows:
        split = str(_cell(row, "split") or "-")
        n = _cell(row, "n")
        acc = _cell(row, "acc@0.5", "Acc@0.5")
        miou = _cell(row, "miou", "mIoU")
        lines.append(f"{split:<12} {n if n is not None else '-':>7} "
                     f"{f'{100 * acc:.2f}' if acc is not None else '-':>8} "
                     f"{f'{100 * miou:.2f}' if miou is not None else '-':>7}")
    return "\n".join(lines)
