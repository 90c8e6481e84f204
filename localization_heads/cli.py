"""Hydra entrypoint: `python pipeline.py stage=<stage> [group=option] [key=value ...]`.

Stages pass files to each other under <data.output_dir>/<model>/:
  collect    image + query        → <id>.pkl             attn [L, H, 1, V] + meta
  analyze    <id>.pkl             → <id>_analysis.pkl    ranked heads
  visualize  <id>.pkl             → <id>_top{K}.png, <id>_mask.png, <id>_bbox.json
  pipeline   collect + analyze + visualize for one image
  batch      JSONL rows → all of the above per id (batched forward, resumable, failures listed)
  select     folder of <id>.pkl   → selected_heads.json, selected_heads_counts.csv (voting, k heads)
  evaluate   JSONL with bbox + folder of <id>_bbox.json → evaluation.json, evaluation_rows.csv
  report     the model's folder (+ JSONL) → report/index.html (metrics, heads, gallery)

Exit codes (README "What the tool promises"): 0 every row succeeded; 3 some rows failed (the others
finished, the failed ones are listed); 2 nothing ran (bad config or input, output folder busy or
not writable); 130 interrupted (finished rows kept; rerun to resume); 1 Hydra could not parse the
command line (before any of this code runs), or a crash (a bug: traceback).
"""
from __future__ import annotations

import logging
import pickle
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig

from localization_heads import refine
from localization_heads.collector import collect, load_attention, save_attention
from localization_heads.config import Settings
from localization_heads.dataio import InputError, atomic_write_bytes, atomic_write_json, atomic_write_text, safe_output_path
from localization_heads.images import load_image
from localization_heads.layout import analysis_record
from localization_heads.locks import RowLocks
from localization_heads.outputs import describe_analysis, load_analysis, run_analysis, select_over, write_outputs
from localization_heads.progress import track
from localization_heads import settings
from localization_heads.settings import PACKAGE, attn_dtype, collect_kwargs, collect_settings, model_dir, row_source, source_change
from localization_heads import validate

log = logging.getLogger("pipeline")
STAGES = ("collect", "analyze", "visualize", "pipeline", "batch", "select", "evaluate", "report")
EXIT_OK, EXIT_CRASH, EXIT_NOT_RUN, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# ---------------------------------------------------------------- stages (cfg: config.Settings)

def _stem(path: Path) -> str:
    return path.name[: -len(".pkl")] if path.name.endswith(".pkl") else path.stem


def stage_collect(cfg: Settings) -> Path:
    image_file, item_id = str(cfg.data.image_file), str(cfg.data.id)
    image = load_image(image_file)
    adapter = settings.load_adapter_from(cfg)
    record = collect(adapter, [image], [cfg.data.query], **collect_kwargs(cfg))[0]
    record["meta"].update(image_file=image_file, collect_settings=collect_settings(cfg),
                          source=row_source(item_id, cfg.data.query, image_file, Path(image_file)))
    path = safe_output_path(model_dir(cfg), item_id, ".pkl")
    save_attention(path, record, attn_dtype(cfg))
    log.info("attention [L, H, 1, V] = %s → %s", list(record["attn"].shape), path)
    return path


def _attention_file(cfg: Settings) -> Path:
    if not cfg.data.attention_file:
        raise InputError("data.attention_file is required for stage=analyze/visualize")
    return Path(str(cfg.data.attention_file))


def stage_analyze(cfg: Settings, path: Path | None = None) -> dict:
    path = path or _attention_file(cfg)
    record = load_attention(path)
    result = run_analysis(record, cfg.logic)
    out = path.with_name(f"{_stem(path)}_analysis.pkl")
    atomic_write_bytes(out, pickle.dumps(result))
    log.info("%s → %s", describe_analysis(result), out)
    return result


def stage_visualize(cfg: Settings, path: Path | None = None) -> dict:
    path = path or _attention_file(cfg)
    record = load_attention(path)
    if "image_file" not in record["meta"]:
        raise InputError(f"{path}: meta has no image_file; cannot draw")
    recorded = record["meta"].get("source")
    if recorded:   # the figure must show the image the model saw
        image_file = record["meta"]["image_file"]
        changed = source_change(recorded, row_source(recorded["id"], recorded["prompt"], recorded["image_path"],
                                                     Path(image_file)))
        if changed:
            raise InputError(f"{image_file}: {changed} since {path.name} was collected; collect it again")
    analysis_file = path.with_name(f"{_stem(path)}_analysis.pkl")
    record = analysis_record(record)   # multi-map layouts: the canvas, computed once for analysis and box
    result = load_analysis(analysis_file) if analysis_file.is_file() else run_analysis(record, cfg.logic)
    summary = write_outputs(path.parent, _stem(path), record, result, cfg.logic, figure=True,
                            refiner=refine.load_refiner(cfg))
    log.info("bbox %s from %s heads %s", summary["bbox_xyxy"], summary["heads_source"],
             [(h["layer"], h["head"]) for h in summary["selected_heads"]])
    return summary


def stage_pipeline(cfg: Settings) -> dict:
    path = stage_collect(cfg)
    stage_analyze(cfg, path)
    return stage_visualize(cfg, path)


def stage_select(cfg: Settings) -> dict:
    folder = Path(str(cfg.data.attention_dir)) if cfg.data.attention_dir else model_dir(cfg)
    files = _voters(cfg, folder)
    result = select_over(((p.name, load_attention(p)) for p in track(files, "select")), cfg.logic, str(folder))
    result.update(attention_dir=str(folder), data_file=str(cfg.data.data_file) if cfg.data.data_file else None)
    atomic_write_json(folder / "selected_heads.json", result)
    rows = ["layer,head,count,frequency"] + [f"{c['layer']},{c['head']},{c['count']},{c['frequency']:.6f}"
                                             for c in result["counts"]]
    atomic_write_text(folder / "selected_heads_counts.csv", "\n".join(rows) + "\n")
    log.info("selected heads %s from %d samples (tau=%s) → %s", result["heads"], result["n_samples"],
             result["tau"], folder / "selected_heads.json")
    return result


def _voters(cfg: Settings, folder: Path) -> list[Path]:
    """The attention files stage=select votes over: those of data.data_file's rows when it is
    given, else every <id>.pkl in the folder (single-image runs included); the log says which."""
    files = sorted(p for p in folder.glob("*.pkl") if not p.name.endswith("_analysis.pkl"))
    if cfg.data.data_file:
        rows = validate.jsonl_rows(Path(str(cfg.data.data_file)), required=("id",))
        by_id = {_stem(p): p for p in files}
        missing = [str(r["id"]) for _, r in rows if str(r["id"]) not in by_id]
        files = [by_id[str(r["id"])] for _, r in rows if str(r["id"]) in by_id]
        log.info("select: voting over the %d rows of %s that have an attention file in %s", len(files),
                 cfg.data.data_file, folder)
        if missing:
            log.warning("select: %d rows have no attention file (failed or not run), e.g. %s", len(missing),
                        ", ".join(missing[:5]))
    else:
        log.info("select: voting over all %d attention files in %s (data.data_file=<jsonl> restricts the vote "
                 "to that file's rows)", len(files), folder)
    if not files:
        which = f" for the rows of {cfg.data.data_file}" if cfg.data.data_file else ""
        raise InputError(f"{folder}: no attention files (<id>.pkl){which}; run stage=batch first or set data.attention_dir")
    return files


def stage_evaluate(cfg: Settings) -> dict:
    from localization_heads import evaluate

    pred_dir = Path(str(cfg.data.pred_dir)) if cfg.data.pred_dir else model_dir(cfg)
    summary = evaluate.evaluate(cfg.data.data_file, pred_dir)
    print(evaluate.format_table([dict(summary, split=Path(str(cfg.data.data_file)).stem)]))
    return summary


def stage_batch(cfg: Settings) -> dict:
    from localization_heads.batch import run_batch

    return run_batch(cfg)


def stage_report(cfg: Settings) -> Path:
    from localization_heads.report import build_report

    return build_report(cfg)


# ---------------------------------------------------------------- entrypoint

def override(key: str, value: str) -> str:
    """`key=value` that Hydra's override grammar reads back as exactly `value` (commas, quotes,
    parentheses, brackets, `${`, unicode): single-quoted, with quotes and the backslashes before
    them or at the end escaped, and `${` escaped so it is not interpolated. For scripts; README
    "Quoting" shows the same by hand."""
    text = re.sub(r"(\\*)'", lambda m: 2 * m.group(1) + "\\'", str(value))
    text = re.sub(r"(\\+)$", lambda m: 2 * m.group(1), text)
    text = re.sub(r"(\\*)\$\{", lambda m: 2 * m.group(1) + "\\${", text)
    return f"{key}='{text}'"


def compose(*overrides: str) -> DictConfig:
    """The config `python pipeline.py <overrides>` would run with (for scripts and tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PACKAGE / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run(cfg: DictConfig):
    """Check everything that can be checked without the model (validate.py), turn the config into
    typed settings (config.Settings: the only place past which no DictConfig travels), run the stage."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage!r} is unknown; use one of {', '.join(STAGES)}")
    validate.check_config(cfg)
    cfg = Settings.from_config(cfg)
    written = _row_written(cfg)
    with RowLocks(*written) if written else nullcontext():
        # A table, not globals(): a launcher (joblib, submitit) pickles `main` by value, and that
        # copy's globals hold only the names it references.
        stages = {"collect": stage_collect, "analyze": stage_analyze, "visualize": stage_visualize,
                  "pipeline": stage_pipeline, "batch": stage_batch, "select": stage_select,
                  "evaluate": stage_evaluate, "report": stage_report}
        return stages[stage](cfg)


def _row_written(cfg: Settings) -> tuple[Path, list[str]] | None:
    """(folder, [id]) of the one row a single-item stage writes; stage=batch locks its own rows."""
    stage = str(cfg.stage)
    if stage in ("collect", "pipeline"):
        return model_dir(cfg), [str(cfg.data.id)]
    if stage in ("analyze", "visualize"):
        path = _attention_file(cfg)
        return path.parent, [_stem(path)]
    return None


def execute(cfg: DictConfig) -> int:
    """run(cfg) → the exit code (module docstring); the error is logged, never a traceback."""
    try:
        result = run(cfg)
    except InputError as e:
        log.error("%s", e)
        return EXIT_NOT_RUN
    except KeyboardInterrupt:
        log.warning("interrupted; finished rows are kept: rerun the same command to resume")
        return EXIT_INTERRUPTED
    if isinstance(result, dict) and result.get("failed"):
        return EXIT_ROWS_FAILED
    return EXIT_OK


@hydra.main(version_base="1.3", config_path=str(PACKAGE / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    code = execute(cfg)
    if _in_multirun():
        # sys.exit in a launcher's worker (joblib) takes the other shards down with it, even with
        # code 0; an exception fails this job alone, the others finish, and the multirun exits non-zero.
        if code:
            raise RuntimeError(f"stage={cfg.stage} failed with exit code {code} (see the log above)")
        return
    sys.exit(code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
