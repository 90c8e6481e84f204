"""Per-item steps shared by the single-item stages and the batch runner: analysis, the heads to
combine, and the files written for one id."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Iterable

from localization_heads import analyze as analysis
from localization_heads import bbox
from localization_heads import refine
from localization_heads import viz
from localization_heads.config import LogicSettings
from localization_heads.images import load_image
from localization_heads.layout import Layout, analysis_record
from localization_heads.dataio import InputError, PlainUnpickler, atomic_write_bytes, atomic_write_json, file_stamps, safe_output_path
from localization_heads.settings import box_settings


def run_analysis(record: dict, logic: LogicSettings) -> dict:
    """The per-sample analysis (analyze.analyze) of an attention record on its analysis view."""
    view = analysis_record(record)
    return analysis.analyze(view["attn"], Layout.from_meta(view["meta"]).one_map.grid, logic, view["meta"].get("layers"))


def select_over(records: Iterable[tuple[str, dict]], logic: LogicSettings, where: str = "the records") -> dict:
    """Dataset-level head selection (analyze.select_heads) over (name, attention record) pairs of one
    model, read one at a time: {"k", "tau", "heads": [[layer, head], ...], "counts", ..., "model",
    "logic"}. Records of rows whose split is not "train" are refused unless
    logic.select.allow_non_train; `where` names the records in errors."""
    tables, models, held_out = [], set(), []
    for name, record in records:
        models.add(record["meta"].get("model_name"))
        if record["meta"].get("split", "train") != "train":
            held_out.append(f"{name} (split={record['meta']['split']})")
        view = analysis_record(record)
        tables.append(analysis.measure_heads(view["attn"], Layout.from_meta(view["meta"]).one_map.grid, logic,
                                             view["meta"].get("layers")))
    if not tables:
        raise InputError(f"{where}: no attention records to select heads from")
    if len({(tuple(t.layers), t.num_heads) for t in tables}) != 1:
        raise InputError(f"{where}: attention files of different model shapes; select one model at a time")
    if held_out and not logic.select.allow_non_train:
        raise InputError(f"{where}: {len(held_out)} attention files come from non-train rows, e.g. {held_out[0]}; "
                         "heads must be selected on training data (logic.select.allow_non_train=true to override)")
    result = analysis.select_heads(tables, logic)
    result.update(model=sorted(m for m in models if m), logic=logic.to_dict())
    return result


def describe_analysis(result: dict) -> str:
    """One log line: τ, how many heads pass (or that the fallback answered), the best five."""
    def entropy(r):
        return "inf" if r["spatial_entropy"] is None else f"{r['spatial_entropy']:.3f}"
    passing = "no head passes, fallback" if result.get("fallback") else f"{len(result['ranked'])} heads pass"
    best = ", ".join(f"L{r['layer']}H{r['head']}(SE={entropy(r)})" for r in result["ranked"][:5])
    return f"tau={result['tau']:.4f}; {passing}: {best}"


def heads_for(result: dict, record: dict, logic: LogicSettings) -> tuple[list[dict], str]:
    """The heads to combine and where they came from: fixed heads, this sample's top-k, or (no head
    passed) the analysis's fallback heads. An empty list (min_keep=0) gives an empty mask and no box."""
    fixed, source = logic.fixed_heads, logic.heads_source
    if fixed is None:
        chosen = result["ranked"][: int(logic.top_k)]
        if result.get("fallback") or not chosen:
            source = (f"fallback: no head passed the criteria and filters (S >= tau, finite entropy, "
                      f"logic.filters.min_layer={logic.filters.min_layer}, bottom_row={logic.filters.bottom_row}); "
                      f"{len(chosen)} head(s) with the largest attention sum (logic.threshold.min_keep="
                      f"{logic.threshold.min_keep})")
        return chosen, source
    by_index = {(r["layer"], r["head"]): r for r in result["heads"]}   # model layer indices
    bad = [tuple(p) for p in fixed if tuple(p) not in by_index]
    if bad:
        layers = sorted({r["layer"] for r in result["heads"]})
        raise InputError(f"logic.heads {bad} outside this model's heads: attention layers {layers} (model indices) × "
                         f"{record['attn'].shape[1]} heads")
    return [by_index[tuple(p)] for p in fixed], source


def figure_suffix(logic: LogicSettings) -> str:
    """_top{K}.png, K the number of heads asked for (fixed heads or top_k), however many were found."""
    return f"_top{len(logic.fixed_heads) if logic.fixed_heads else int(logic.top_k)}.png"


def ground(record: dict, result: dict, logic: LogicSettings, refiner: refine.SamRefiner | None = None,
           image: tuple[str, object] | None = None) -> dict:
    """The box step of one analysed record (what the CLI writes and the API returns): {"view": the
    record on its one-map analysis view, "layout": that view's Layout, "heads": the head records
    combined, "heads_source", "loc": bbox.localize's grid_map/heat/mask/bbox_xyxy, "mask": the mask
    to write (SAM's when it refined it), "refinement": what refined it or None}. image: (key, RGB
    image) for SAM when the record has no image file (the API's in-memory images)."""
    view = analysis_record(record)
    layout = Layout.from_meta(view["meta"])
    heads, source = heads_for(result, view, logic)
    loc = bbox.localize(view["attn"], layout, [(h["layer"], h["head"]) for h in heads], logic, view["meta"].get("layers"))
    meta = view["meta"]
    if refiner is not None and image is not None:
        refiner.encode([image])
        meta = dict(meta, image_file=image[0])
    mask, refinement = refine.refine(refiner, loc, meta, logic.mask)
    return {"view": view, "layout": layout, "heads": heads, "heads_source": source, "loc": loc, "mask": mask,
            "refinement": refinement}


def write_outputs(out_dir: Path, item_id: str, record: dict, result: dict, logic: LogicSettings, *,
                  figure: bool, refiner: refine.SamRefiner | None = None) -> dict:
    """<id>_analysis.pkl, <id>_mask.png (+ <id>_mask_coarse.png when SAM refines it), <id>_bbox.json
    and (figure=True) <id>_top{K}.png. refiner: SAM, loaded once by the caller when logic.mask.refine=sam."""
    grounded = ground(record, result, logic, refiner)
    record, heads, source, loc = grounded["view"], grounded["heads"], grounded["heads_source"], grounded["loc"]
    mask, refinement = grounded["mask"], grounded["refinement"]
    figure_name = figure_suffix(logic) if figure else None
    suffixes = [".pkl", "_analysis.pkl", "_mask.png"] + (["_mask_coarse.png"] if refinement is not None else []) \
        + ([figure_name] if figure else [])
    atomic_write_bytes(safe_output_path(out_dir, item_id, "_analysis.pkl"), pickle.dumps(result))
    refine.write_masks(out_dir, item_id, loc["mask"], mask, refined=refinement is not None)
    if figure:
        image = load_image(record["meta"]["image_file"])
        # The mask panel shows the mask written as <id>_mask.png: SAM's when it refined it.
        refined = refinement is not None and refinement["status"] == "ok"
        png = viz.figure_png(image, record["attn"], record["meta"], heads, dict(loc, mask=mask),
                             logic=str(logic.name), tau=result["tau"], heads_source=source,
                             mask_label="SAM mask (refined)" if refined else "mask")
        atomic_write_bytes(safe_output_path(out_dir, item_id, figure_name), png)
    summary = {
        "id": item_id,
        "query": record["meta"].get("query"),
        "image_file": record["meta"].get("image_file"),
        "bbox_xyxy": loc["bbox_xyxy"],
        "gt_bbox": record["meta"].get("gt_bbox"),   # the JSONL row's bbox, when batch had one
        "box_convention": "xyxy, original-image pixels, half-open [x0, x1) × [y0, y1)",
        "image_size": list(record["meta"]["image_size"]),
        "selected_heads": heads,
        "heads_source": source,
        "logic": str(logic.name),
        "mask_method": str(logic.mask.method),
        "refinement": refinement,
        "settings": box_settings(logic),
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
