"""Hydra entrypoint: `python pipeline.py stage=<stage> [group=option] [key=value ...]`.

Stages pass files to each other under <data.output_dir>/<model>/:
  collect    image + query        → <id>.pkl             attn [L, H, 1, V] + meta
  analyze    <id>.pkl             → <id>_analysis.pkl    ranked heads
  visualize  <id>.pkl             → <id>_top{K}.png, <id>_mask.png, <id>_bbox.json
  pipeline   collect + analyze + visualize for one image
  batch      JSONL rows → all of the above per id (batched forward, resumable, failures listed)
  select     folder of <id>.pkl   → selected_heads.json, selected_heads_counts.csv (voting, k heads)
  evaluate   JSONL with bbox + folder of <id>_bbox.json → evaluation.json, evaluation_rows.csv
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import analyze as analysis
import bbox
import viz
from collector import collect, load_attention, load_image, save_attention
from dataio import (InputError, PlainUnpickler, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl,
                    resolve_path, safe_output_path)

log = logging.getLogger("pipeline")
REPO = Path(__file__).resolve().parent
STAGES = ("collect", "analyze", "visualize", "pipeline", "batch", "select", "evaluate")
ATTN_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------- paths and small helpers

def model_path(name: str) -> str:
    """A relative local folder is looked up from here, then from the repository (model=toy)."""
    p = Path(name).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO / p).is_dir():
        return str(REPO / p)
    return name


def sanitize(name: str) -> str:
    p = Path(name)
    stem = p.name if p.is_dir() else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def model_dir(cfg: DictConfig) -> Path:
    return Path(cfg.data.output_dir) / sanitize(model_path(str(cfg.model.name)))


def _stem(path: Path) -> str:
    return path.name[: -len(".pkl")] if path.name.endswith(".pkl") else path.stem


def collect_settings(cfg: DictConfig) -> dict:
    """What an attention file depends on besides its image and query (kept in its meta)."""
    keys = ("conv_mode", "attn_capture", "use_generate", "max_new_tokens", "do_sample", "num_beams", "dtype")
    return {"model": model_path(str(cfg.model.name)), **{k: cfg.model.get(k) for k in keys},
            "attn_dtype": str(cfg.data.attn_dtype)}   # plain str/int/bool: survives weights-only loading


def box_settings(cfg: DictConfig) -> dict:
    """What a box depends on besides the attention: the logic, with fixed heads resolved."""
    heads, _ = fixed_heads(cfg.logic)
    # As it reads back from <id>_bbox.json, so a rerun compares like with like.
    return json.loads(json.dumps({"logic": OmegaConf.to_container(cfg.logic, resolve=True), "heads": heads}))


def gen_kwargs(cfg: DictConfig) -> dict:
    return {"max_new_tokens": int(cfg.model.max_new_tokens), "do_sample": bool(cfg.model.do_sample),
            "num_beams": int(cfg.model.num_beams)}


def attn_dtype(cfg: DictConfig) -> torch.dtype:
    name = str(cfg.data.attn_dtype)
    if name not in ATTN_DTYPES:
        raise InputError(f"data.attn_dtype={name!r} is unknown; use float16 or float32")
    return ATTN_DTYPES[name]


def load_adapter_from(cfg: DictConfig):
    from llava.adapter import load_adapter

    model_cfg = OmegaConf.merge(cfg.model, {"name": model_path(str(cfg.model.name))})
    return load_adapter(model_cfg, str(cfg.model.attn_capture))


def fixed_heads(logic: DictConfig) -> tuple[list[tuple[int, int]] | None, str]:
    """logic.heads: None (per-sample ranking), a selected_heads.json path, or [[layer, head], ...]."""
    heads = logic.get("heads")
    if heads is None:
        return None, f"per-sample top-{int(logic.top_k)}"
    if isinstance(heads, (list, ListConfig)):
        pairs, source = list(heads), "logic.heads"
    else:
        path = Path(str(heads))
        if not path.is_file():
            raise InputError(f"logic.heads={heads}: file not found (expected selected_heads.json from stage=select)")
        try:
            pairs, source = json.loads(path.read_text())["heads"], str(path)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}: not a heads file (expected JSON with 'heads': [[layer, head], ...])") from None
    try:
        parsed = [(int(l), int(h)) for l, h in pairs]
    except (TypeError, ValueError):
        raise InputError(f"logic.heads from {source}: expected [[layer, head], ...], got {pairs}") from None
    if not parsed:
        raise InputError(f"logic.heads from {source} is empty")
    return parsed, f"fixed ({source})"


# ---------------------------------------------------------------- per-item steps

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


# ---------------------------------------------------------------- stages

def stage_collect(cfg: DictConfig) -> Path:
    if not cfg.data.image_file:
        raise InputError("data.image_file is required for stage=collect/pipeline")
    image = load_image(cfg.data.image_file)
    adapter = load_adapter_from(cfg)
    record = collect(adapter, [image], [cfg.data.query], attn_capture=str(cfg.model.attn_capture),
                     use_generate=bool(cfg.model.use_generate), gen_kwargs=gen_kwargs(cfg))[0]
    record["meta"].update(image_file=str(cfg.data.image_file), collect_settings=collect_settings(cfg))
    path = safe_output_path(model_dir(cfg), str(cfg.data.id), ".pkl")
    save_attention(path, record, attn_dtype(cfg))
    log.info("attention [L, H, 1, V] = %s → %s", list(record["attn"].shape), path)
    return path


def _attention_file(cfg: DictConfig) -> Path:
    if not cfg.data.attention_file:
        raise InputError("data.attention_file is required for stage=analyze/visualize")
    return Path(str(cfg.data.attention_file))


def stage_analyze(cfg: DictConfig, path: Path | None = None) -> dict:
    path = path or _attention_file(cfg)
    record = load_attention(path)
    result = run_analysis(record, cfg)
    out = path.with_name(f"{_stem(path)}_analysis.pkl")
    atomic_write_bytes(out, pickle.dumps(result))
    log.info("tau=%.4f; %d heads pass; best: %s → %s", result["tau"], len(result["ranked"]),
             ", ".join(f"L{r['layer']}H{r['head']}(SE={r['spatial_entropy']:.3f})" for r in result["ranked"][:5]), out)
    return result


def stage_visualize(cfg: DictConfig, path: Path | None = None) -> dict:
    path = path or _attention_file(cfg)
    record = load_attention(path)
    if "image_file" not in record["meta"]:
        raise InputError(f"{path}: meta has no image_file; cannot draw")
    analysis_file = path.with_name(f"{_stem(path)}_analysis.pkl")
    result = load_analysis(analysis_file) if analysis_file.is_file() else run_analysis(record, cfg)
    summary = write_outputs(path.parent, _stem(path), record, result, cfg, figure=True)
    log.info("bbox %s from %s heads %s", summary["bbox_xyxy"], summary["heads_source"],
             [(h["layer"], h["head"]) for h in summary["selected_heads"]])
    return summary


def stage_pipeline(cfg: DictConfig) -> dict:
    path = stage_collect(cfg)
    stage_analyze(cfg, path)
    return stage_visualize(cfg, path)


def stage_select(cfg: DictConfig) -> dict:
    folder = Path(str(cfg.data.attention_dir)) if cfg.data.attention_dir else model_dir(cfg)
    files = sorted(p for p in folder.glob("*.pkl") if not p.name.endswith("_analysis.pkl"))
    if not files:
        raise InputError(f"{folder}: no attention files (<id>.pkl); run stage=batch first or set data.attention_dir")
    tables, models, held_out = [], set(), []
    for p in files:
        record = load_attention(p)
        models.add(record["meta"].get("model_name"))
        if record["meta"].get("split", "train") != "train":
            held_out.append(f"{p.name} (split={record['meta']['split']})")
        tables.append(analysis.measure_heads(record["attn"], tuple(record["meta"]["grid"]), cfg.logic))
    if len({(t.attn_sum.size, t.num_heads) for t in tables}) != 1:
        raise InputError(f"{folder}: attention files of different model shapes; select one model at a time")
    if held_out and not cfg.logic.select.allow_non_train:
        raise InputError(f"{folder}: {len(held_out)} attention files come from non-train rows, e.g. {held_out[0]}; "
                         "heads must be selected on training data (logic.select.allow_non_train=true to override)")
    result = analysis.select_heads(tables, cfg.logic)
    result.update(model=sorted(m for m in models if m), logic=OmegaConf.to_container(cfg.logic, resolve=True),
                  attention_dir=str(folder))
    atomic_write_json(folder / "selected_heads.json", result)
    rows = ["layer,head,count,frequency"] + [f"{c['layer']},{c['head']},{c['count']},{c['frequency']:.6f}"
                                             for c in result["counts"]]
    atomic_write_text(folder / "selected_heads_counts.csv", "\n".join(rows) + "\n")
    log.info("selected heads %s from %d samples (tau=%s) → %s", result["heads"], len(tables),
             result["tau"], folder / "selected_heads.json")
    return result


def stage_evaluate(cfg: DictConfig) -> dict:
    import evaluate

    pred_dir = Path(str(cfg.data.pred_dir)) if cfg.data.pred_dir else model_dir(cfg)
    summary = evaluate.evaluate(cfg.data.data_file, pred_dir)
    print(evaluate.format_table([dict(summary, split=Path(str(cfg.data.data_file)).stem)]))
    return summary


# ---------------------------------------------------------------- batch

class _RowImages(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers, in parallel with the forward pass. A row whose image
    fails yields its error instead, so the batch goes on."""

    def __init__(self, rows: list[tuple[int, dict]], base: Path):
        self.rows, self.base = rows, base

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        lineno, row = self.rows[i]
        path = resolve_path(str(row["image_path"]), self.base)
        try:
            return lineno, row, str(path), load_image(path), None
        except InputError as e:
            return lineno, row, str(path), None, str(e)


def _resume_state(out_dir: Path, item_id: str, figure: str | None, collect_now: dict, box_now: dict) -> str:
    """"done" (outputs complete for these settings), "rebox" (attention is there and current: redo
    only analysis and box, no model), or "collect". Complete rows are judged from the small
    _bbox.json alone; an attention file is opened only when the box is stale."""
    attn_file = out_dir / f"{item_id}.pkl"
    if not attn_file.is_file():
        return "collect"
    try:
        summary = json.loads((out_dir / f"{item_id}_bbox.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    outputs = ["_analysis.pkl", "_mask.png"] + ([figure] if figure else [])
    if (summary.get("collect_settings") == collect_now and summary.get("settings") == box_now
            and all((out_dir / f"{item_id}{s}").is_file() for s in outputs)):
        return "done"
    try:
        current = load_attention(attn_file)["meta"].get("collect_settings") == collect_now
    except InputError:
        current = False
    return "rebox" if current else "collect"


def select_rows(cfg: DictConfig) -> tuple[list[tuple[int, dict]], Path]:
    data_file = Path(str(cfg.data.data_file))
    rows = list(read_jsonl(data_file, required=("id", "prompt", "image_path")))
    if not cfg.data.process_all:
        end = cfg.data.end_index if cfg.data.end_index is not None else len(rows)
        rows = rows[int(cfg.data.start_index): int(end)]
    seen: dict[str, int] = {}
    for lineno, row in rows:
        item_id = str(row["id"])
        safe_output_path(".", item_id, "")  # reject ids that would escape the output folder
        if item_id in seen:
            raise InputError(f"{data_file}:{lineno}: duplicate id {item_id!r} (first on line {seen[item_id]})")
        seen[item_id] = lineno
    return rows, data_file.parent


def stage_batch(cfg: DictConfig) -> dict:
    rows, base = select_rows(cfg)
    out_dir = model_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads, _ = fixed_heads(cfg.logic)  # a bad heads file fails now, not on every row
    figure = f"_top{len(heads) if heads else int(cfg.logic.top_k)}.png" if cfg.data.visualize_batch else None
    if cfg.data.resume:
        collect_now, box_now = collect_settings(cfg), box_settings(cfg)
        state = {str(r[1]["id"]): _resume_state(out_dir, str(r[1]["id"]), figure, collect_now, box_now) for r in rows}
    else:
        state = {str(r[1]["id"]): "collect" for r in rows}
    todo = [r for r in rows if state[str(r[1]["id"])] == "collect"]
    rebox = [str(r[1]["id"]) for r in rows if state[str(r[1]["id"])] == "rebox"]
    log.info("batch: %d rows: %d complete, %d to redo from saved attention, %d to run through the model → %s",
             len(rows), len(rows) - len(todo) - len(rebox), len(rebox), len(todo), out_dir)
    failures: list[dict] = []
    dtype = attn_dtype(cfg)
    # Saving, analysis, boxes and figures run on one writer thread while the model works.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[str, Future]] = [
            (item_id, writer.submit(_finish_item, out_dir, item_id, None, cfg, dtype, bool(figure))) for item_id in rebox]
        done = 0
        if todo:
            adapter = load_adapter_from(cfg)
            loader = torch.utils.data.DataLoader(_RowImages(todo, base), batch_size=int(cfg.data.batch_size),
                                                 num_workers=int(cfg.data.num_workers), collate_fn=list)
            for items in loader:
                for item_id, record_or_error in _collect_items(adapter, items, cfg):
                    if isinstance(record_or_error, str):
                        failures.append({"id": item_id, "error": record_or_error})
                        continue
                    pending.append((item_id, writer.submit(_finish_item, out_dir, item_id, record_or_error, cfg,
                                                           dtype, bool(figure))))
                done += _drain(pending, failures, block=False)
        done += _drain(pending, failures, block=True)
    _write_failures(out_dir, failures)
    log.info("batch: %d written, %d failed%s", done, len(failures),
             f" (listed in {out_dir / 'failures.jsonl'})" if failures else "")
    return {"rows": len(rows), "written": done, "failed": len(failures), "out_dir": str(out_dir)}


def _collect_items(adapter, items, cfg: DictConfig):
    """(id, record) per good row, (id, error) per bad one. A failing batch is retried row by row
    so one bad row cannot take the others down."""
    good = []
    for lineno, row, path, image, error in items:
        if error is None and not (isinstance(row["prompt"], str) and row["prompt"].strip()):
            error = f"line {lineno}: empty prompt"
        if error:
            yield str(row["id"]), error
        else:
            good.append((row, path, image))
    groups = [good] if len(good) > 0 else []
    settings = collect_settings(cfg)
    while groups:
        group = groups.pop(0)
        try:
            records = collect(adapter, [g[2] for g in group], [g[0]["prompt"] for g in group],
                              attn_capture=str(cfg.model.attn_capture), use_generate=bool(cfg.model.use_generate),
                              gen_kwargs=gen_kwargs(cfg))
        except Exception as e:  # noqa: BLE001 — isolate, report, keep going
            if len(group) > 1:
                groups.extend([g] for g in group)
                continue
            yield str(group[0][0]["id"]), f"{e.__class__.__name__}: {e}"
            continue
        for (row, path, _), record in zip(group, records):
            record["meta"].update(image_file=path, id=str(row["id"]), collect_settings=dict(settings))
            if "split" in row:  # stage=select refuses non-train rows unless told otherwise
                record["meta"]["split"] = str(row["split"])
            yield str(row["id"]), record


def _finish_item(out_dir: Path, item_id: str, record: dict | None, cfg: DictConfig, dtype: torch.dtype, figure: bool):
    """Save a fresh record (record=None: reuse the saved attention) and write its outputs."""
    if record is None:
        record = load_attention(out_dir / f"{item_id}.pkl")
    else:
        save_attention(safe_output_path(out_dir, item_id, ".pkl"), record, dtype)
    result = run_analysis(record, cfg)
    write_outputs(out_dir, item_id, record, result, cfg, figure=figure)


def _drain(pending: list, failures: list, block: bool) -> int:
    done = 0
    for entry in list(pending):
        item_id, future = entry
        if not block and not future.done():
            continue
        pending.remove(entry)
        try:
            future.result()
            done += 1
        except Exception as e:  # noqa: BLE001
            failures.append({"id": item_id, "error": f"{e.__class__.__name__}: {e}"})
    return done


def _write_failures(out_dir: Path, failures: list[dict]) -> None:
    path = out_dir / "failures.jsonl"
    if failures:
        atomic_write_text(path, "".join(json.dumps(f) + "\n" for f in failures))
        for f in failures:
            log.error("failed %s: %s", f["id"], f["error"])
    elif path.exists():
        path.unlink()  # a clean rerun leaves no stale failure list


# ---------------------------------------------------------------- entrypoint

def compose(*overrides: str) -> DictConfig:
    """The config `python pipeline.py <overrides>` would run with (for scripts and tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run(cfg: DictConfig):
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage!r} is unknown; use one of {', '.join(STAGES)}")
    return globals()[f"stage_{stage}"](cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
