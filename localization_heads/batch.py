"""stage=batch: JSONL rows → attention, analysis, mask and box per id, batched through the model.

  rows      the whole data file is checked before anything runs (validate.jsonl_rows)
  locks     the run holds its rows (locks.py): another run on any of them refuses to start
  resume    a row is complete when its _bbox.json records this row's inputs (prompt, image file),
            these settings, and the size and time of each of the row's other files; a row whose
            attention is still current is redone from it without the model; the log says why
  shards    data.num_shards=N data.shard=i: only the rows shard i owns (shards.py), same folder
  images    decoded by data.num_workers threads a little ahead of the model
  progress  a bar on a terminal, a log line per 5 % or per minute elsewhere (progress.py)
  failures  a failing row is logged, listed in failures.jsonl and skipped; the others finish
  Ctrl-C    stops after the row being written; only complete rows remain and a rerun resumes
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from localization_heads.config import Settings
from localization_heads.collector import collect, load_attention, save_attention
from localization_heads.dataio import InputError, atomic_write_text, file_stamps, resolve_path, safe_output_path
from localization_heads.images import load_image
from localization_heads.locks import RowLocks
from localization_heads.layout import analysis_record
from localization_heads.outputs import figure_suffix, run_analysis, write_outputs
from localization_heads.progress import Progress
from localization_heads import refine
from localization_heads import settings
from localization_heads import shards
from localization_heads.settings import attn_dtype, box_settings, collect_settings, gen_kwargs, model_dir, row_source, source_change
from localization_heads import validate

log = logging.getLogger("batch")
FAILURES = "failures.jsonl"
LISTED = 5   # ids shown per log line


@dataclass(frozen=True)
class Row:
    lineno: int
    id: str
    prompt: str
    image: Path      # resolved against the JSONL's folder
    source: dict     # settings.row_source: what the row's outputs are made from
    split: str | None
    bbox: list | None = None   # the ground truth, drawn in <id>_top{K}.png and kept in <id>_bbox.json


def select_rows(cfg: Settings) -> list[Row]:
    """The rows to run: all of the file (data.process_all) or [start_index, end_index), then those
    of this shard. The whole file is checked first, so a bad row anywhere stops the run before the
    model loads."""
    data_file = Path(str(cfg.data.data_file))
    rows = validate.jsonl_rows(data_file, required=("id", "prompt", "image_path"))
    if not cfg.data.process_all:
        start = int(cfg.data.start_index)
        end = int(cfg.data.end_index) if cfg.data.end_index is not None else len(rows)
        if (start, end) != (0, len(rows)):
            log.warning("batch: only rows [%d, %d) of the %d in %s (data.start_index, data.end_index); "
                        "add data.process_all=true to run them all", start, min(end, len(rows)), len(rows), data_file)
        rows = rows[start:end]
    rows = shards.rows_of_shard(rows, cfg.data.num_shards, cfg.data.shard)
    selected = []
    for lineno, row in rows:
        item_id, image = str(row["id"]), resolve_path(row["image_path"], data_file.parent)
        source = row_source(item_id, row["prompt"], row["image_path"], image)
        split = str(row["split"]) if "split" in row else None
        selected.append(Row(lineno, item_id, row["prompt"], image, source, split, row.get("bbox")))
    return selected


def run_batch(cfg: Settings) -> dict:
    rows = select_rows(cfg)
    out_dir = model_dir(cfg)
    figure = figure_suffix(cfg.logic) if cfg.data.visualize_batch else None
    failures: list[dict] = []
    with RowLocks(out_dir, [r.id for r in rows]) as locks:
        rebox, todo = plan(out_dir, rows, cfg, figure)
        log.info("batch: %d rows: %d complete, %d to redo from saved attention, %d to run through the model → %s",
                 len(rows), len(rows) - len(rebox) - len(todo), len(rebox), len(todo), out_dir)
        # Rows this run settles: complete already, or written or failed now. Only their entries in
        # failures.jsonl are replaced; rows never reached (Ctrl-C, a model that cannot load) keep theirs.
        waiting = {r.id for r in rebox + todo}
        settled = {r.id for r in rows if r.id not in waiting}
        try:
            written = process(out_dir, rebox, todo, cfg, figure, failures, settled, total=len(rows))
        finally:   # interrupted or not, the failures so far are listed
            settled |= {f["id"] for f in failures}
            listed = record_failures(out_dir, Path(str(cfg.data.data_file)).resolve(), settled, failures, locks)
    log.info("batch: %d written, %d failed%s", written, len(failures),
             f" (listed in {out_dir / FAILURES})" if failures and listed else "")
    return {"rows": len(rows), "written": written, "failed": len(failures), "out_dir": str(out_dir)}


# ---------------------------------------------------------------- resume

def plan(out_dir: Path, rows: list[Row], cfg: Settings, figure: str | None) -> tuple[list[Row], list[Row]]:
    """(rows to redo from their saved attention, rows to run through the model); the rest are complete."""
    if not cfg.data.resume:
        return [], list(rows)
    collect_now, box_now = collect_settings(cfg), box_settings(cfg.logic)
    rebox, todo, why = [], [], defaultdict(list)
    for row in rows:
        state, reason = row_state(out_dir, row, figure, collect_now, box_now)
        if state == "rebox":
            rebox.append(row)
        elif state == "collect":
            todo.append(row)
        if reason:
            why[reason].append(row.id)
    for reason, ids in why.items():
        log.info("batch: redoing %d rows: %s (%s%s)", len(ids), reason, ", ".join(ids[:LISTED]),
                 ", ..." if len(ids) > LISTED else "")
    return rebox, todo


def row_state(out_dir: Path, row: Row, figure: str | None, collect_now: dict, box_now: dict) -> tuple[str, str | None]:
    """("done", None); ("rebox", why): the attention is current, redo analysis and box without the
    model; or ("collect", why). `why` is None for a row never run. A complete row is judged from
    its small _bbox.json and file stats; the attention file is opened only when it is not complete."""
    attn_file = out_dir / f"{row.id}.pkl"
    try:
        summary = json.loads((out_dir / f"{row.id}_bbox.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not attn_file.is_file():
        return "collect", "attention file missing" if summary is not None else None
    why = outputs_stale(out_dir, row, summary, figure, collect_now, box_now)
    if why is None:
        return "done", None
    try:
        meta = load_attention(attn_file)["meta"]
    except InputError:
        return "collect", "attention file unreadable"
    recollect = source_change(meta.get("source"), row.source) or (
        None if meta.get("collect_settings") == collect_now else "collection settings changed")
    return ("collect", recollect) if recollect else ("rebox", why)


def outputs_stale(out_dir: Path, row: Row, summary, figure: str | None, collect_now: dict, box_now: dict) -> str | None:
    """Why a row's finished outputs (its _bbox.json `summary`) are not this run's, or None."""
    if not isinstance(summary, dict):
        return "outputs incomplete"
    why = source_change(summary.get("source"), row.source)
    if why:
        return why
    if summary.get("collect_settings") != collect_now:
        return "collection settings changed"
    if summary.get("settings") != box_now:
        return "logic changed"
    files = summary.get("row_files")
    wanted = [f"{row.id}{s}" for s in (".pkl", "_analysis.pkl", "_mask.png", figure) if s]
    if not isinstance(files, dict) or not set(wanted) <= files.keys():
        return "outputs incomplete"
    try:
        if file_stamps(out_dir, list(files)) != files:
            return "files replaced since the row was finished"
    except OSError:
        return "outputs incomplete"
    return None


# ---------------------------------------------------------------- the run

def process(out_dir: Path, rebox: list[Row], todo: list[Row], cfg: Settings, figure: str | None,
            failures: list[dict], written_ids: set[str], total: int) -> int:
    """Run `todo` through the model and write every row; returns the number written (their ids are
    added to `written_ids`). Saving, analysis, boxes and figures run on one writer thread while the
    model works on the next batch. Progress counts all `total` rows of the run, the complete ones as
    done from the start."""
    dtype, batch_size = attn_dtype(cfg), int(cfg.data.batch_size)
    # SAM (logic.mask.refine=sam), loaded once per run and only when a row needs a mask; else None
    refiner = refine.load_refiner(cfg) if rebox or todo else None
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    pending: deque[tuple[Row, Future]] = deque()
    rebox_left = deque(rebox)
    progress = Progress("batch", total, initial=total - len(rebox) - len(todo))

    def finish_later(row: Row, record: dict | None) -> None:
        pending.append((row, writer.submit(finish_row, out_dir, row, record, cfg, dtype, bool(figure), refiner)))

    batches = decoded_batches(todo, batch_size, int(cfg.data.num_workers))
    written = 0
    with progress:
        try:
            if todo:
                validate.check_model(cfg)
                adapter = settings.load_adapter_from(cfg)
                for batch in batches:
                    if refiner is not None:   # SAM's image encoder over the batch's images in one call, ahead of its rows
                        writer.submit(refiner.prefetch, [(str(row.image), image) for row, image, error in batch if error is None])
                    for row, record_or_error in collect_batch(adapter, batch, cfg):
                        if isinstance(record_or_error, str):
                            failures.append(failure(row, record_or_error))
                            progress.update(1, failed=len(failures))
                        else:
                            finish_later(row, record_or_error)
                    # Rows redone from saved attention share the writer, a batch of them per model batch.
                    for _ in range(min(batch_size, len(rebox_left))):
                        finish_later(rebox_left.popleft(), None)
                    # The model runs ahead of the writer by two batches at most: each row holds its attention.
                    written += drain(pending, failures, written_ids, progress, keep=2 * batch_size)
            while rebox_left:
                finish_later(rebox_left.popleft(), None)
            written += drain(pending, failures, written_ids, progress, keep=0)
        except KeyboardInterrupt:
            writer.shutdown(wait=True, cancel_futures=True)   # the row being written finishes; queued ones are dropped
            written += drain(pending, failures, written_ids, progress, keep=0)
            log.warning("batch: interrupted after writing %d rows", written)
            raise
        finally:
            batches.close()
            writer.shutdown(wait=True)
    return written


def decoded_batches(rows: list[Row], batch_size: int, workers: int) -> Iterator[list[tuple[Row, object, str | None]]]:
    """Batches of (row, image, error) in row order, decoded by `workers` threads up to two
    batches ahead (0: here, just in time). Threads rather than DataLoader processes: PIL decodes
    with the GIL released, and a thread cannot outlive the run (worker processes survived a kill -9
    of their parent, holding memory, for minutes)."""
    if workers == 0:
        for start in range(0, len(rows), batch_size):
            yield [decode(row) for row in rows[start:start + batch_size]]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    ahead: deque[Future] = deque()
    queue = iter(rows)
    try:
        while True:
            while len(ahead) < 2 * batch_size and (row := next(queue, None)) is not None:
                ahead.append(pool.submit(decode, row))
            if not ahead:
                return
            yield [ahead.popleft().result() for _ in range(min(batch_size, len(ahead)))]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def decode(row: Row) -> tuple[Row, object, str | None]:
    try:
        return row, load_image(row.image), None
    except InputError as e:
        return row, None, str(e)


def collect_batch(adapter, batch: list, cfg: Settings) -> Iterator[tuple[Row, dict | str]]:
    """(row, record) per good row, (row, error) per bad one. A failing batch is retried row by row
    so one bad row cannot take the others down."""
    good = []
    for row, image, error in batch:
        if error is None and not row.prompt.strip():
            error = "prompt is empty; give a referring expression"
        if error:
            yield row, error
        else:
            good.append((row, image))
    groups = [good] if good else []
    settings_now = collect_settings(cfg)
    while groups:
        group = groups.pop(0)
        try:
            records = collect(adapter, [image for _, image in group], [row.prompt for row, _ in group],
                              attn_capture=str(cfg.model.attn_capture), use_generate=bool(cfg.model.use_generate),
                              gen_kwargs=gen_kwargs(cfg))
        except Exception as e:  # noqa: BLE001 — isolate, report, keep going
            if len(group) > 1:
                groups.extend([g] for g in group)
                continue
            yield group[0][0], f"{e.__class__.__name__}: {e}"
            continue
        for (row, _), record in zip(group, records):
            record["meta"].update(image_file=str(row.image), id=row.id, collect_settings=dict(settings_now),
                                  source=row.source)
            if row.split is not None:   # stage=select refuses non-train rows unless told otherwise
                record["meta"]["split"] = row.split
            if row.bbox is not None:    # the ground truth, drawn in <id>_top{K}.png and kept in <id>_bbox.json
                record["meta"]["gt_bbox"] = row.bbox
            yield row, record


def finish_row(out_dir: Path, row: Row, record: dict | None, cfg: Settings, dtype: torch.dtype, figure: bool,
               refiner: refine.SamRefiner | None = None) -> None:
    """Save a fresh record (record=None: reuse the saved attention) and write the row's outputs."""
    if record is None:
        record = load_attention(out_dir / f"{row.id}.pkl")
        # The row as this run reads it: its image path resolved from here, its ground truth and split.
        record["meta"].update(image_file=str(row.image), source=row.source, gt_bbox=row.bbox)
        if row.split is not None:
            record["meta"]["split"] = row.split
    else:
        save_attention(safe_output_path(out_dir, row.id, ".pkl"), record, dtype)
        # Boxes from the attention as saved, so a row redone from its file gets the same outputs.
        record["attn"] = record["attn"].to(dtype).float()
    view = analysis_record(record)   # multi-map layouts: the canvas, computed once for analysis and box
    write_outputs(out_dir, row.id, view, run_analysis(view, cfg.logic), cfg.logic, figure=figure, refiner=refiner)


def drain(pending: deque, failures: list[dict], written_ids: set[str], progress: Progress, keep: int) -> int:
    """Collect finished writes, oldest first, waiting while more than `keep` are pending; returns
    the number written."""
    written = 0
    while pending and (len(pending) > keep or pending[0][1].done()):
        row, future = pending.popleft()
        try:
            future.result()
            written += 1
            written_ids.add(row.id)
        except CancelledError:
            continue   # dropped by an interrupt: not written, not failed; a rerun does it
        except Exception as e:  # noqa: BLE001
            failures.append(failure(row, f"{e.__class__.__name__}: {e}"))
        progress.update(1, failed=len(failures))
    return written


# ---------------------------------------------------------------- failures

def failure(row: Row, error: str) -> dict:
    return {"id": row.id, "error": error, "line": row.lineno}


def record_failures(out_dir: Path, data_file: Path, settled: set[str], failures: list[dict], locks: RowLocks) -> bool:
    """failures.jsonl lists the failed rows of every run into this folder: a run replaces the
    entries of the rows it settled (its data file; ids complete, written or failed now) and keeps
    all others, so another JSONL, another shard or a row this run never reached keeps its entry.
    The failures are logged first, so a full disk loses nothing; returns whether the file could be
    updated."""
    for f in failures:
        log.error("failed %s (line %d): %s", f["id"], f["line"], f["error"])
    path, mine = out_dir / FAILURES, settled
    ours = [dict(f, data_file=str(data_file)) for f in failures]
    try:
        with locks.shared_file():
            kept = [e for e in read_failures(path)
                    if not (e.get("data_file", str(data_file)) == str(data_file) and e.get("id") in mine)]
            if kept or ours:
                atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept + ours))
            elif path.exists():
                path.unlink()
    except OSError as e:
        log.error("could not update %s (%s); the failed rows are listed above", path, e)
        return False
    return True


def read_failures(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line torn by a crash of an older version
        if isinstance(entry, dict) and "id" in entry:
            entries.append(entry)
    return entries
