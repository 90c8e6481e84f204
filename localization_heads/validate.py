"""Everything a run needs, checked before the model loads: config values, input rows, the output
folder, the model's whereabouts. A problem stops the run with one InputError (exit code 2) that
lists every problem found, one line each, saying where it is and what to do."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from localization_heads.families import FAMILIES
from localization_heads.families.base import QUERY_AT
from localization_heads.bbox import MASK_METHODS, THRESHOLDS
from localization_heads.dataio import InputError, id_problem, jsonl_objects
from localization_heads.families.llava import TEMPLATES
from localization_heads.refine import REFINERS
from localization_heads.settings import ATTN_DTYPES, fixed_heads, model_dir, model_path

MAX_LISTED = 50   # problems shown; a 10k-row file with one systematic error stays readable

# Keys whose value is one of a closed set (a missing key keeps the code's default).
CHOICES = {
    "model.attn_capture": ("sdpa", "eager"),
    "model.dtype": ("auto", "float32", "float16", "bfloat16"),
    "model.conv_mode": ("auto", *TEMPLATES),
    "model.query_at": QUERY_AT,
    "model.family": ("auto", *FAMILIES),
    "logic.smoothing.mode": ("reflect", "nearest", "mirror", "constant", "wrap", "grid-constant", "grid-mirror",
                             "grid-wrap"),   # scipy.ndimage's boundary modes
    "logic.mask.refine": REFINERS,
    "data.attn_dtype": tuple(ATTN_DTYPES),
    "logic.threshold.method": ("chord",),
    "logic.threshold.scope": ("sample", "dataset"),
    "logic.entropy.method": ("size", "mass"),
    "logic.mask.method": MASK_METHODS,
    "logic.mask.threshold": THRESHOLDS,
}
# Integer keys and their smallest allowed value.
INTEGERS = {
    "logic.top_k": 1, "logic.threshold.min_keep": 0, "logic.filters.min_layer": 0, "logic.select.k": 1,
    "logic.select.per_sample": 1, "data.batch_size": 1, "data.num_workers": 0, "data.start_index": 0,
    "model.device_id": 0, "model.max_new_tokens": 1, "model.num_beams": 1, "data.num_shards": 1, "data.shard": 0,
}
# Real-valued keys and their smallest allowed value.
NUMBERS = {"logic.smoothing.sigma": 0.0, "logic.smoothing.truncate": 0.0, "logic.entropy.binarize_threshold": 0.0,
           "logic.filters.bottom_row_threshold": 0.0}
BOOLEANS = ("data.process_all", "data.resume", "data.visualize_batch", "data.device_per_shard", "model.use_generate",
            "model.do_sample", "model.use_flash_attn", "logic.filters.bottom_row", "logic.select.allow_non_train",
            "logic.mask.sam_point")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _problems_error(source: str, problems: list[str]) -> InputError:
    shown = problems[:MAX_LISTED]
    more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
    head = f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}; fix and rerun (nothing was run):"
    return InputError("\n  ".join([head, *shown, *more]))


# ---------------------------------------------------------------- config

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def config_problems(cfg: DictConfig) -> list[str]:
    """'key=value: what to do' for every config value the run cannot use."""
    problems = []

    def value(key):
        return OmegaConf.select(cfg, key, default=None)

    for key, allowed in CHOICES.items():
        v = value(key)
        if v is not None and v not in allowed:
            problems.append(f"{key}={v!r}: unknown; use one of {', '.join(allowed)}")
    for key, least in INTEGERS.items():
        v = value(key)
        if v is not None and not (_is_int(v) and v >= least):
            problems.append(f"{key}={v!r}: must be an integer >= {least}")
    for key, least in NUMBERS.items():
        v = value(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v) and v >= least):
            problems.append(f"{key}={v!r}: must be a finite number >= {least}")
    for key in BOOLEANS:
        v = value(key)
        if v is not None and not isinstance(v, bool):
            problems.append(f"{key}={v!r}: must be true or false")
    if value("model.use_flash_attn") is True:
        problems.append("model.use_flash_attn=true: flash kernels return no attention rows; keep it false")
    device = value("model.device")
    if device is not None and not DEVICE.fullmatch(str(device)):
        problems.append(f"model.device={device!r}: use auto, cpu, cuda or cuda:<index>")
    end, start = value("data.end_index"), value("data.start_index")
    if end is not None and not (_is_int(end) and _is_int(start) and end >= start):
        problems.append(f"data.end_index={end!r}: must be null or an integer >= data.start_index ({start})")
    try:
        heads, _ = fixed_heads(cfg.logic)
    except InputError as e:
        problems.append(str(e))
    else:
        negative = [pair for pair in heads or [] if min(pair) < 0]
        if negative:
            problems.append(f"logic.heads: {negative} are negative; layer and head indices start at 0")
    return problems


STAGE_INPUTS = {   # stage → keys it cannot run without
    "collect": ("data.image_file", "data.query"), "pipeline": ("data.image_file", "data.query"),
    "analyze": ("data.attention_file",), "visualize": ("data.attention_file",),
    "batch": ("data.data_file",), "evaluate": ("data.data_file",), "select": (), "report": (),
}


def input_problems(cfg: DictConfig) -> list[str]:
    stage = str(cfg.stage)
    problems = [f"{key} is required for stage={stage}" for key in STAGE_INPUTS[stage]
                if OmegaConf.select(cfg, key, default=None) in (None, "")]
    attention = OmegaConf.select(cfg, "data.attention_file", default=None)
    if stage in ("analyze", "visualize") and attention and not str(attention).endswith(".pkl"):
        # <id>.pkl is how outputs name a row's attention file; <id>_*.* are written beside it.
        problems.append(f"data.attention_file={attention}: expected an attention file named <id>.pkl; rename it")
    if stage in ("collect", "pipeline"):
        query = OmegaConf.select(cfg, "data.query", default=None)
        if query is not None and not (isinstance(query, str) and query.strip()):
            problems.append(f"data.query={query!r}: give a non-empty referring expression")
        problem = id_problem(str(cfg.data.id))
        if problem:
            problems.append(f"data.id: {problem}")
    return problems


def output_folder(cfg: DictConfig) -> tuple[Path, str] | None:
    """(the folder the stage writes into, the key that chooses it); None if there is none yet."""
    stage, data = str(cfg.stage), cfg.data
    if stage in ("collect", "pipeline", "batch"):
        return model_dir(cfg), "data.output_dir"
    if stage == "select":
        return (Path(str(data.attention_dir)), "data.attention_dir") if data.attention_dir else (model_dir(cfg), "data.output_dir")
    if stage in ("evaluate", "report"):
        return (Path(str(data.pred_dir)), "data.pred_dir") if data.pred_dir else (model_dir(cfg), "data.output_dir")
    return (Path(str(data.attention_file)).parent, "data.attention_file") if data.attention_file else None


def folder_problem(folder: Path, create: bool, key: str = "data.output_dir") -> str | None:
    """Write (and remove) a probe file, so a read-only or full folder is found before the model runs."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            return None   # the stage itself says what it expected there
        probe = folder / f".write-probe.{secrets.token_hex(4)}.tmp"
        with open(probe, "xb") as f:
            f.write(b"probe")
        probe.unlink()
    except OSError as e:
        return f"{folder}: cannot write outputs here ({e.strerror or e}); choose another {key}"
    return None


class OutputRootCheck(Callback):
    """Hydra makes its log folder under data.output_dir before any of our code runs; an unwritable
    one would end in Hydra's traceback (exit code 1). Registered in conf/config.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        problem = folder_problem(Path(str(config.data.output_dir)), create=True)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)


def check_model(cfg) -> None:
    """Call before loading the model (cfg: config.Settings or the DictConfig): a hub id that is not cached and cannot be fetched fails now,
    in a second, instead of after the hub client's retries (~30 s of warnings without a network)."""
    problem = model_problem(cfg)
    if problem:
        raise InputError(problem)


def model_problem(cfg) -> str | None:
    name = model_path(str(cfg.model.name))
    if Path(name).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cfg.model.cache_dir or None
    try:
        if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str):
            return None
    except ValueError:   # not a valid repo id either
        return f"model.name={name!r}: neither a local folder nor a hub id; point it at a checkpoint folder"
    where = f"model.name={name!r} is not a local folder and not in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{where}, and HF_HUB_OFFLINE is set; download it first or point model.name at a local folder"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return (f"{where}, and {host}:{port} cannot be reached ({e.strerror or e}); download it where there is "
                "a network, or point model.name at a local folder")
    return None


def check_config(cfg: DictConfig) -> None:
    """Everything about `cfg` that can be known before a model loads or a row runs."""
    stage = str(cfg.stage)
    problems = config_problems(cfg) + input_problems(cfg)
    written = output_folder(cfg)
    if written is not None:
        folder, key = written
        problems.append(folder_problem(folder, stage in ("collect", "pipeline", "batch"), key))
    # The model: here for the single-item stages; stage=batch checks it only if a row needs it.
    if not any(problems) and stage in ("collect", "pipeline"):
        problems.append(model_problem(cfg))
    problems = [p for p in problems if p]
    if problems:
        raise _problems_error("config", problems)


# ---------------------------------------------------------------- JSONL rows

def _row_problems(row: dict, required: tuple[str, ...]) -> list[str]:
    problems = [f"{key}: missing; every row needs {', '.join(required)}" for key in required if key not in row]
    if "id" in row:
        item_id = row["id"]
        if not isinstance(item_id, str) and not _is_int(item_id):
            problems.append(f"id: {json.dumps(item_id)} is not an id; give a string or an integer")
        else:
            problem = id_problem(str(item_id))
            if problem:
                problems.append(f"id: {problem}")
    if "prompt" in row and not isinstance(row["prompt"], str):
        problems.append(f"prompt: a {type(row['prompt']).__name__} ({json.dumps(row['prompt'])[:60]}); "
                        "give one referring expression as a string (one row per expression)")
    if "image_path" in row and not (isinstance(row["image_path"], str) and row["image_path"].strip()):
        problems.append(f"image_path: {json.dumps(row['image_path'])[:60]} is not a path; give the image file as a string")
    return problems


def jsonl_rows(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a JSONL file, or one InputError listing every problem
    of the file (bad JSON, missing keys, wrong types, ids that cannot name files, duplicate ids)."""
    rows, problems, seen = [], [], {}
    for lineno, row, problem in jsonl_objects(path):
        if problem:
            problems.append(problem)
            continue
        found = _row_problems(row, required)
        problems += [f"{path}:{lineno}: {p}" for p in found]
        if found:
            continue
        item_id = str(row["id"])
        if item_id in seen:
            problems.append(f"{path}:{lineno}: id: duplicate id {item_id!r} (first on line {seen[item_id]}); "
                            "ids must be unique")
            continue
        seen[item_id] = lineno
        rows.append((lineno, row))
    if problems:
        raise _problems_error(str(path), problems)
    return rows
