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
from typing import Callable
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from localization_heads.families import FAMILIES
from localization_heads.families.base import QUERY_AT
from localization_heads.bbox import MASK_METHODS, THRESHOLDS
from localization_heads.dataio import InputError, box_problem, id_problem, jsonl_objects
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
    "data.save_attention": ("all", "heads", "none"),
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
    "data.gpus_per_shard": 1,
    "check_layout.batch_size": 1,
}
# Real-valued keys and their smallest allowed value.
NUMBERS = {"logic.smoothing.sigma": 0.0, "logic.smoothing.truncate": 0.0, "logic.entropy.binarize_threshold": 0.0,
           "logic.filters.bottom_row_threshold": 0.0}
BOOLEANS = ("data.process_all", "data.resume", "data.visualize_batch", "data.device_per_shard", "model.use_generate",
            "model.do_sample", "model.use_flash_attn", "logic.filters.bottom_row", "logic.select.allow_non_train",
            "logic.mask.sam_point")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")   # accelerate's strategies
MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", re.IGNORECASE)      # accelerate's sizes: 70GiB, 500MB


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
    problems += placement_problems(cfg)
    end, start = value("data.end_index"), value("data.start_index")
    if end is not None and not (_is_int(end) and _is_int(start) and end >= start):
        problems.append(f"data.end_index={end!r}: must be null or an integer >= data.start_index ({start})")
    problems += size_problems(value("check_layout.sizes"))
    try:
        heads, _ = fixed_heads(cfg.logic)
    except InputError as e:
        problems.append(str(e))
    else:
        negative = [pair for pair in heads or [] if min(pair) < 0]
        if negative:
            problems.append(f"logic.heads: {negative} are negative; layer and head indices start at 0")
        if value("data.save_attention") == "heads" and heads is None:
            problems.append("data.save_attention=heads keeps the rows of logic.heads only, and logic.heads is null; "
                            "set logic.heads (e.g. to stage=select's selected_heads.json) or use data.save_attention=all")
    if value("data.save_attention") == "none" and value("stage") in ("collect", "pipeline"):
        problems.append(f"data.save_attention=none: stage={value('stage')} passes the attention on in <id>.pkl; "
                        "use all or heads (stage=batch writes its outputs without it)")
    return problems


def placement_problems(cfg: DictConfig) -> list[str]:
    """model.device_map / max_memory / offload_folder and data.gpus_per_shard: values accelerate can
    read, and no GPU that this machine (or this SLURM job) does not have."""
    import torch

    def value(key):
        return OmegaConf.select(cfg, key, default=None)

    problems = []
    visible = torch.cuda.device_count()
    per_shard = value("data.gpus_per_shard")
    device_map, max_memory = value("model.device_map"), value("model.max_memory")
    if _is_int(per_shard) and per_shard > visible:
        problems.append(f"data.gpus_per_shard={per_shard}: {visible} GPU(s) visible here (CUDA_VISIBLE_DEVICES); "
                        "ask for at most that many, or run where the GPUs are")
    if _is_int(per_shard) and per_shard > 1 and device_map is None:
        problems.append(f"data.gpus_per_shard={per_shard}: one model on several GPUs needs model.device_map "
                        "(e.g. auto); with null, use data.gpus_per_shard=1")
    # GPU indices in model.* count the shard's own GPUs when data.gpus_per_shard is set.
    gpus = per_shard if _is_int(per_shard) and per_shard <= visible else visible
    if device_map is not None:
        if isinstance(device_map, DictConfig):
            for module, device in device_map.items():
                problem = _device_problem(device, gpus)
                if problem:
                    problems.append(f"model.device_map.{module}={device!r}: {problem}")
        elif device_map not in DEVICE_MAPS:
            problems.append(f"model.device_map={device_map!r}: use null, {', '.join(DEVICE_MAPS)} or "
                            "{module: device, ...} (device: a GPU index, cpu or disk)")
    for key in ("model.max_memory", "model.offload_folder"):
        if value(key) is not None and device_map is None:
            problems.append(f"{key} is read only with model.device_map; set model.device_map=auto or drop {key}")
    if max_memory is not None:
        if not isinstance(max_memory, DictConfig):
            problems.append(f"model.max_memory={max_memory!r}: give {{device: size, ...}}, e.g. {{0: 70GiB, cpu: 200GiB}}")
        else:
            for device, size in max_memory.items():
                problem = _device_problem(device, gpus, allowed=("cpu", "mps", "disk"))
                if problem:
                    problems.append(f"model.max_memory key {device!r}: {problem}")
                if not ((_is_int(size) and size >= 0) or (isinstance(size, str) and MEMORY.fullmatch(size.strip()))):
                    problems.append(f"model.max_memory.{device}={size!r}: give a size such as 70GiB, 500MB or bytes")
    return problems


def _device_problem(device, gpus: int, allowed: tuple[str, ...] = ("cpu", "disk", "mps")) -> str | None:
    """Why `device` (a GPU index, cuda:<i>, cpu, disk) is not one a device map can use here, or None."""
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        device = int(device[5:])
    if _is_int(device):
        if not 0 <= device < gpus:
            return f"no GPU {device} here ({gpus} visible to this run)"
        return None
    if device in allowed:
        return None
    return f"unknown device; use a GPU index or one of {', '.join(allowed)}"
def size_problems(sizes) -> list[str]:
    """check_layout.sizes: a list of [width, height] in pixels."""
    if sizes is None:
        return []
    ok = isinstance(sizes, (list, ListConfig)) and len(sizes) > 0 and all(
        isinstance(s, (list, ListConfig)) and len(s) == 2 and all(_is_int(v) and v >= 1 for v in s) for s in sizes)
    return [] if ok else [f"check_layout.sizes={OmegaConf.to_container(sizes) if OmegaConf.is_config(sizes) else sizes!r}: "
                          "give a list of [width, height] in pixels, e.g. [[800, 600], [1200, 400]]"]


STAGE_INPUTS = {   # stage → keys it cannot run without
    "collect": ("data.image_file", "data.query"), "pipeline": ("data.image_file", "data.query"),
    "analyze": ("data.attention_file",), "visualize": ("data.attention_file",),
    "batch": ("data.data_file",), "evaluate": ("data.data_file",), "select": (), "report": (), "check_layout": (),
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


def folder_problem(folder: Path, create: bool, key: str = "data.output_dir", advice: str | None = None) -> str | None:
    """Write (and remove) a probe file, so a read-only or full folder is found before the model runs.
    `advice`: what to do instead of choosing another `key`."""
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
        return f"{folder}: cannot write outputs here ({e.strerror or e}); {advice or f'choose another {key}'}"
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
        return model_folder_problem(Path(name).expanduser())
    return hub_problem("model.name", name, getattr(cfg.model, "cache_dir", None) or None)


def check_refiner(cfg) -> None:
    """Before loading SAM (logic.mask.refine=sam): its hub id, checked as the VLM's is (cfg:
    config.Settings or the DictConfig)."""
    if str(cfg.logic.mask.refine) != "sam":
        return
    name = model_path(str(cfg.logic.mask.sam_model))
    problem = None if Path(name).expanduser().is_dir() else hub_problem("logic.mask.sam_model", name,
                                                                        getattr(cfg.model, "cache_dir", None) or None)
    if problem:
        raise InputError(problem)


def hub_problem(key: str, name: str, cache_dir: str | None) -> str | None:
    """Why the hub id `name` (config key `key`) cannot be loaded, found in a second: not a hub
    id, or not cached while the hub is off (HF_HUB_OFFLINE) or cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str):
            return None
    except ValueError:   # not a valid repo id either
        return f"{key}={name!r}: neither a local folder nor a hub id; point it at a checkpoint folder"
    where = f"{key}={name!r} is not a local folder and not in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{where}, and HF_HUB_OFFLINE is set; download it first or point {key} at a local folder"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return (f"{where}, and {host}:{port} cannot be reached ({e.strerror or e}); download it where there is "
                f"a network, or point {key} at a local folder")
    return None


def model_heads(cfg: DictConfig) -> tuple[list[int], int] | None:
    """(model indices of the attention layers, heads H) of the text model, read from the checkpoint's
    config.json (a local folder or the hub cache) without loading the model; None when it is not here
    or does not say. Hybrid models list only their softmax-attention layers (Qwen3.5: 3, 7, …)."""
    name = model_path(str(cfg.model.name))
    path = Path(name) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", cache_dir=getattr(cfg.model, "cache_dir", None) or None)
        except ValueError:
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return _heads_from_transformers(path.parent) or _heads_from_json(path)


def _heads_from_transformers(folder: Path) -> tuple[list[int], int] | None:
    """Through the model type's config class, which fills in what config.json leaves to defaults
    (e.g. a hybrid model's layer_types). None for a type transformers does not know (the original
    LLaVA format) or a config it cannot read (reported when the model loads)."""
    from transformers import AutoConfig

    from localization_heads.families.base import attention_layers

    try:
        text = AutoConfig.from_pretrained(folder).get_text_config()
        heads = text.num_attention_heads
    except Exception:   # any failure here is the model load's to report, with its own message
        return None
    return (attention_layers(text), heads) if _is_int(heads) and heads > 0 else None


def _heads_from_json(path: Path) -> tuple[list[int], int] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        text = raw.get("text_config") or raw.get("llm_config") or raw   # the original LLaVA format: top level
        layers = text.get("num_hidden_layers", raw.get("num_hidden_layers"))
        heads = text.get("num_attention_heads", raw.get("num_attention_heads"))
    except (OSError, ValueError, AttributeError):
        return None   # a damaged config.json is reported when the model loads
    return (list(range(layers)), heads) if all(_is_int(v) and v > 0 for v in (layers, heads)) else None


def heads_fit_problem(cfg: DictConfig, shape: tuple[list[int], int] | None, where: str) -> str | None:
    """Why logic.heads names heads the model does not have, or None. shape: (model indices of the
    attention layers, heads per layer)."""
    heads, _ = fixed_heads(cfg.logic)
    if not heads or shape is None:
        return None
    layers, num_heads = shape
    outside = [[l, h] for l, h in heads if not (l in layers and 0 <= h < num_heads)]
    if not outside:
        return None
    if layers == list(range(len(layers))):
        return (f"logic.heads: {outside} outside the model's {len(layers)} layers × {num_heads} heads ({where}); "
                f"give layer < {len(layers)} and head < {num_heads}, or heads selected for this model")
    return (f"logic.heads: {outside} outside the model's heads: attention layers {layers} (model indices; the "
            f"others have no attention) × {num_heads} heads ({where}); give heads selected for this model")


def check_heads_fit(cfg: DictConfig, out_dir: Path, rows: list) -> None:
    """Before any row of a batch: logic.heads against the model's heads, from its config.json or,
    when the model is not here, from the first saved attention file of the rows to redo."""
    if not fixed_heads(cfg.logic)[0]:
        return   # nothing to check: no need to read the model's config
    shape, where = model_heads(cfg), "its config.json"
    if shape is None:
        from localization_heads.collector import load_attention

        for row in rows:
            try:
                record = load_attention(out_dir / f"{row.id}.pkl")
            except InputError:
                continue
            attn = record["attn"]   # [L, H, 1, V]; meta["layers"]: the model index of each row of L
            shape, where = (list(record["meta"]["layers"]), attn.shape[1]), f"{row.id}.pkl"
            break
    problem = heads_fit_problem(cfg, shape, where)
    if problem:
        raise InputError(problem)


def model_folder_problem(folder: Path) -> str | None:
    """What a glance at a local checkpoint shows to be damaged, without loading it: config.json,
    the weight files and their sizes. Anything subtler is found by loading (settings.load_adapter_from)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{folder}: no config.json; model.name must be a checkpoint folder or a hub id"
    except (OSError, ValueError) as e:
        return f"{folder / 'config.json'}: not readable JSON ({e}); the checkpoint is damaged: copy it again"
    if not isinstance(config, dict):
        return f"{folder / 'config.json'}: not a JSON object; the checkpoint is damaged: copy it again"
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        return f"{folder}: no weights file (*.safetensors or pytorch_model.bin); the copy is incomplete: copy the weights again"
    for path in (p for p in weights if p.suffix == ".safetensors"):
        problem = safetensors_problem(path)
        if problem:
            return f"{path}: {problem}; the file is damaged or its copy incomplete: copy it again"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, a JSON header whose data_offsets say where
    each tensor ends, then the data: its size must be exactly what the header describes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                return "its header is unreadable"
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a readable safetensors file"
    if size != 8 + length + end:
        return f"{size} bytes, but its header describes {8 + length + end}"
    return None


def check_config(cfg: DictConfig) -> None:
    """Everything about `cfg` that can be known before a model loads or a row runs."""
    stage = str(cfg.stage)
    problems = config_problems(cfg) + input_problems(cfg)
    written = output_folder(cfg)
    if written is not None:
        folder, key = written
        # evaluate and report write beside the predictions they read: another data.pred_dir has none
        advice = ("stage=evaluate and stage=report write beside the predictions: make the folder writable, or copy it "
                  "(cp -a keeps the predictions current) and set data.pred_dir to the copy"
                  if stage in ("evaluate", "report") else None)
        problems.append(folder_problem(folder, stage in ("collect", "pipeline", "batch"), key, advice))
    # The model: here for the single-item stages; stage=batch checks it only if a row needs it.
    if not any(problems) and stage in ("collect", "pipeline", "check_layout"):
        problems.append(model_problem(cfg))
    if not any(problems) and stage in ("pipeline", "visualize"):
        try:
            check_refiner(cfg)
        except InputError as e:
            problems.append(str(e))
    if not any(problems) and stage in ("collect", "pipeline", "batch") and fixed_heads(cfg.logic)[0]:
        problems.append(heads_fit_problem(cfg, model_heads(cfg), f"{model_path(str(cfg.model.name))}/config.json"))
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
    # The ground truth: optional for a batch (null = none), required by evaluate.
    if "bbox" in row and (row["bbox"] is not None or "bbox" in required):
        problem = box_problem(row["bbox"])
        if problem:
            problems.append(f"bbox: {problem}")
    return problems


def jsonl_rows(path: str | Path, required: tuple[str, ...],
               extra: Callable[[str, dict], list[str]] | None = None) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a JSONL file, or one InputError listing every problem
    of the file (not UTF-8, bad JSON, missing keys, wrong types, ids that cannot name files, bad
    boxes, duplicate ids). Every stage that reads a JSONL reads it here. `extra(where, row)`: more
    problems of a row, each a line starting with `where` ("<file>:<line>")."""
    rows, problems, seen = [], [], {}
    for lineno, row, problem in jsonl_objects(path):
        if problem:
            problems.append(problem)
            continue
        found = [f"{path}:{lineno}: {p}" for p in _row_problems(row, required)]
        if not found and extra is not None:
            found = extra(f"{path}:{lineno}", row)
        problems += found
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
