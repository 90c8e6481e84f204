"""stage=batch: JSONL rows → attention, analysis, mask and box per id, batched through the model,
resumable, failures listed (one bad row never takes the others down)."""
from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import DictConfig

from collector import collect, load_attention, load_image, save_attention
from dataio import InputError, atomic_write_text, resolve_path, safe_output_path
from outputs import run_analysis, write_outputs
import settings
from settings import attn_dtype, box_settings, collect_settings, fixed_heads, gen_kwargs, model_dir
import validate

log = logging.getLogger("batch")


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
    """The rows to run: all of the file (data.process_all) or [start_index, end_index). The whole
    file is checked first, so a bad row anywhere stops the run before the model loads."""
    data_file = Path(str(cfg.data.data_file))
    rows = validate.jsonl_rows(data_file, required=("id", "prompt", "image_path"))
    if not cfg.data.process_all:
        start = int(cfg.data.start_index)
        end = int(cfg.data.end_index) if cfg.data.end_index is not None else len(rows)
        if (start, end) != (0, len(rows)):
            log.warning("batch: only rows [%d, %d) of the %d in %s (data.start_index, data.end_index); "
                        "add data.process_all=true to run them all", start, min(end, len(rows)), len(rows), data_file)
        rows = rows[start:end]
    return rows, data_file.parent


def run_batch(cfg: DictConfig) -> dict:
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
            adapter = settings.load_adapter_from(cfg)
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
