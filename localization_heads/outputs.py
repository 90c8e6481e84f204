"""Per-item steps shared by the single-item stages and the batch runner: analysis, the heads to
combine, and the files written for one id."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from omegaconf import DictConfig

from localization_heads import analyze as analysis
from localization_heads import bbox
from localization_heads import refine
from localization_heads import viz
from localization_heads.collector import check_image_size
from localization_heads.images import load_image
from localization_heads.layout import analysis_record
from localization_heads.dataio import InputError, PlainUnpickler, atomic_write_bytes, atomic_write_json, file_stamps, safe_output_path
from localization_heads.settings import box_settings, fixed_heads


def run_analysis(record: dict, cfg: DictConfig) -> dict:
    view = analysis_record(record)
    return analysis.analyze(view["attn"], tuple(view["meta"]["grid"]), cfg.logic)


def describe_analysis(result: dict) -> str:
    """One log line: τ, how many heads pass (or that the fallback answered), the best five."""
    def entropy(r):
        return "inf" if r["spatial_entropy"] is None else f"{r['spatial_entropy']:.3f}"
    passing = "no head passes, fallback" if result.get("fallback") else f"{len(result['ranked'])} heads pass"
    best = ", ".join(f"L{r['layer']}H{r['head']}(SE={entropy(r)})" for r in result["ranked"][:5])
    return f"tau={result['tau']:.4f}; {passing}: {best}"


def heads_for(result: dict, record: dict, cfg: DictConfig) -> tuple[list[dict], str]:
    """The heads to combine and where they came from: fixed heads, this sample's top-k, or (no head
    passed) the analysis's fallback heads. An empty list (min_keep=0) gives an empty mask and no box."""
    fixed, source = fixed_heads(cfg.logic)
    if fixed is None:
        chosen = result["ranked"][: int(cfg.logic.top_k)]
        if result.get("fallback") or not chosen:
            source = (f"fallback: no head passed the criteria and filters (S >= tau, finite entropy, "
                      f"logic.filters.min_layer={cfg.logic.filters.min_layer}, bottom_row={cfg.logic.filters.bottom_row}); "
                      f"{len(chosen)} head(s) with the largest attention sum (logic.threshold.min_keep="
                      f"{cfg.logic.threshold.min_keep})")
        return chosen, source
    num_layers, num_heads = record["attn"].shape[:2]
    bad = [(l, h) for l, h in fixed if not (0 <= l < num_layers and 0 <= h < num_heads)]
    if bad:
        raise InputError(f"logic.heads {bad} outside this model's {num_layers} layers × {num_heads} heads")
    by_index = {(r["layer"], r["head"]): r for r in result["heads"]}
    return [by_index[p] for p in fixed], source


def figure_suffix(cfg: DictConfig) -> str:
    """_top{K}.png, K the number of heads asked for (fixed heads or top_k), however many were found."""
    fixed, _ = fixed_heads(cfg.logic)
    return f"_top{len(fixed) if fixed else int(cfg.logic.top_k)}.png"


def write_outputs(out_dir: Path, item_id: str, record: dict, result: dict, cfg: DictConfig, *,
                  figure: bool, refiner: refine.SamRefiner | None = None) -> dict:
    """<id>_analysis.pkl, <id>_mask.png (+ <id>_mask_coarse.png when SAM refines it), <id>_bbox.json
    and (figure=True) <id>_top{K}.png. refiner: SAM loaded once by the caller; else loaded here if asked for."""
    record = analysis_record(record)
    if figure:   # before anything is written: the image must be the one the attention was collected from
        image = load_image(record["meta"]["image_file"])
        check_image_size(record["meta"], image, f"{item_id}.pkl")
    heads, source = heads_for(result, record, cfg)
    loc = bbox.localize(record["attn"], record["meta"], [(h["layer"], h["head"]) for h in heads], cfg.logic)
    mask, refinement = refine.refine(refiner or refine.load_refiner(cfg), loc, record["meta"], cfg.logic.mask)
    figure_name = figure_suffix(cfg) if figure else None
    suffixes = [".pkl", "_analysis.pkl", "_mask.png"] + (["_mask_coarse.png"] if refinement is not None else []) \
        + ([figure_name] if figure else [])
    atomic_write_bytes(safe_output_path(out_dir, item_id, "_analysis.pkl"), pickle.dumps(result))
    refine.write_masks(out_dir, item_id, loc["mask"], mask, refined=refinement is not None)
    if figure:
        # The mask panel shows the mask written as <id>_mask.png: SAM's when it refined it.
        refined = refinement is not None and refinement["status"] == "ok"
        png = viz.figure_png(image, record["attn"], record["meta"], heads, dict(loc, mask=mask),
                             logic=str(cfg.logic.name), tau=result["tau"], heads_source=source,
                             mask_label="SAM mask (refined)" if refined else "mask")
        atomic_write_bytes(safe_output_path(out_dir, item_id, figure_name), png)
    summary = {
        "id": item_id,
        "query": record["meta"].get("query"),
        "query_token": record["meta"].get("query_token"),   # the token whose attention was read
        "image_file": record["meta"].get("image_file"),
        "bbox_xyxy": loc["bbox_xyxy"],
        "gt_bbox": record["meta"].get("gt_bbox"),   # the JSONL row's bbox, when batch had one
        "box_convention": "xyxy, original-image pixels, half-open [x0, x1) × [y0, y1)",
        "image_size": list(record["meta"]["image_size"]),
        "selected_heads": heads,
        "heads_source": source,
        "logic": str(cfg.logic.name),
        "mask_method": str(cfg.logic.mask.method),
        "refinement": refinement,
        "settings": box_settings(cfg),
        "collect_settings": record["meta"].get("collect_settings"),
        "source": record["meta"].get("source"),   # the row's inputs (settings.row_source)
        "row_files": file_stamps(out_dir, [f"{item_id}{s}" for s in suffixes]),
    }
    # The bbox file is written last: its presence marks the item complete (batch resume).
    atomic_write_json(safe_output_path(out_dir, item_id, "_bbox.json"), summary)
    return summary


def load_analysis(path: Path) -> dict:
    """Our own analysis files hold only plain data: refuse any class or function."""
    try:
        return PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise InputError(f"{path}: not an analysis file ({e})") from None
