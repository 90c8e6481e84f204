"""Per-item steps shared by the single-item stages and the batch runner: analysis, the heads to
combine, and the files written for one id."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from omegaconf import DictConfig

import analyze as analysis
import bbox
import viz
from images import load_image
from dataio import InputError, PlainUnpickler, atomic_write_bytes, atomic_write_json, file_stamps, safe_output_path
from settings import box_settings, fixed_heads


def run_analysis(record: dict, cfg: DictConfig) -> dict:
    return analysis.analyze(record["attn"], tuple(record["meta"]["grid"]), cfg.logic)


def heads_for(result: dict, record: dict, cfg: DictConfig) -> tuple[list[dict], str]:
    """The heads to combine and where they came from: fixed heads, or this sample's top-k."""
    fixed, source = fixed_heads(cfg.logic)
    if fixed is None:
        chosen = result["ranked"][: int(cfg.logic.top_k)]
        if not chosen:
            raise InputError(f"no head passed criterion 1 and the filters (logic.filters.min_layer="
                             f"{cfg.logic.filters.min_layer}, bottom_row={cfg.logic.filters.bottom_row}, model has "
                             f"{record['attn'].shape[0]} layers); relax the filters or give logic.heads")
        return chosen, source
    num_layers, num_heads = record["attn"].shape[:2]
    bad = [(l, h) for l, h in fixed if not (0 <= l < num_layers and 0 <= h < num_heads)]
    if bad:
        raise InputError(f"logic.heads {bad} outside this model's {num_layers} layers × {num_heads} heads")
    by_index = {(r["layer"], r["head"]): r for r in result["heads"]}
    return [by_index[p] for p in fixed], source


def write_outputs(out_dir: Path, item_id: str, record: dict, result: dict, cfg: DictConfig, *,
                  figure: bool) -> dict:
    """<id>_analysis.pkl, <id>_mask.png, <id>_bbox.json and (figure=True) <id>_top{K}.png."""
    heads, source = heads_for(result, record, cfg)
    loc = bbox.localize(record["attn"], record["meta"], [(h["layer"], h["head"]) for h in heads], cfg.logic)
    suffixes = [".pkl", "_analysis.pkl", "_mask.png"] + ([f"_top{len(heads)}.png"] if figure else [])
    atomic_write_bytes(safe_output_path(out_dir, item_id, "_analysis.pkl"), pickle.dumps(result))
    atomic_write_bytes(safe_output_path(out_dir, item_id, "_mask.png"), viz.mask_png(loc["mask"]))
    if figure:
        image = load_image(record["meta"]["image_file"])
        png = viz.figure_png(image, record["attn"], record["meta"], heads, loc)
        atomic_write_bytes(safe_output_path(out_dir, item_id, f"_top{len(heads)}.png"), png)
    summary = {
        "id": item_id,
        "query": record["meta"].get("query"),
        "image_file": record["meta"].get("image_file"),
        "bbox_xyxy": loc["bbox_xyxy"],
        "box_convention": "xyxy, original-image pixels, half-open [x0, x1) × [y0, y1)",
        "image_size": list(record["meta"]["image_size"]),
        "selected_heads": heads,
        "heads_source": source,
        "logic": str(cfg.logic.name),
        "mask_method": str(cfg.logic.mask.method),
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
