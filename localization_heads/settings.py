"""What a run's settings mean: where the model and its outputs live, what each output depends on
(so resume can tell a current file from a stale one), the fixed heads, and the loaded adapter.
`cfg` here is a config.Settings (or, for the checks in validate.py, the DictConfig it is built from:
both read `cfg.model.name`, `cfg.data.output_dir`)."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from localization_heads.dataio import InputError
from localization_heads.progress import quiet_library_bars
from localization_heads.shards import shard_device

PACKAGE = Path(__file__).resolve().parent
ATTN_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def model_path(name: str) -> str:
    """A local folder as an absolute path (a relative one is looked up from the working directory,
    then from the package: model=toy), so what the outputs record does not depend on the working
    directory; a hub id as it is."""
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if not p.is_absolute() and (PACKAGE / p).is_dir():
        return str(PACKAGE / p)
    return name


def bundled_path(name: str) -> Path:
    """A file path as given, or, when that is relative and missing, the package's own file of that
    name (models/toy-llava/selected_heads.json works from any folder)."""
    p = Path(name).expanduser()
    if not p.exists() and not p.is_absolute() and (PACKAGE / p).exists():
        return PACKAGE / p
    return p


def sanitize(name: str) -> str:
    """The output subfolder of a model: a local folder's name (also once the folder is gone, so
    its outputs are still found), or the hub id with '/' → '-'."""
    p = Path(name)
    stem = p.name if p.is_dir() or p.is_absolute() or name.startswith((".", "~")) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def model_dir(cfg) -> Path:
    return Path(cfg.data.output_dir) / sanitize(model_path(str(cfg.model.name)))


def collect_settings(cfg) -> dict:
    """What an attention file depends on besides its image and query (kept in its meta)."""
    keys = ("family", "conv_mode", "query_at", "image_kwargs", "attn_capture", "use_generate", "max_new_tokens",
            "do_sample", "num_beams", "dtype")
    model = cfg.model.to_dict()   # plain data: survives weights-only loading
    return {"model": model_path(str(cfg.model.name)), **{k: model.get(k) for k in keys},
            "attn_dtype": str(cfg.data.attn_dtype)}


def box_settings(logic) -> dict:
    """What a box depends on besides the attention: the logic (config.LogicSettings), with fixed
    heads resolved."""
    heads = None if logic.fixed_heads is None else [list(p) for p in logic.fixed_heads]
    # As it reads back from <id>_bbox.json, so a rerun compares like with like.
    return json.loads(json.dumps({"logic": logic.to_dict(), "heads": heads}))


def row_source(item_id: str, prompt, image_path: str, resolved: Path) -> dict:
    """What one row's outputs are made from, recorded in them so a rerun can tell an edited row:
    the id, the prompt, and the image file as the row names it, with its size and modification
    time (what make and rsync compare; copies that keep times, cp -p or rsync -a, stay current)."""
    try:
        stat = resolved.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime = None
    return {"id": item_id, "prompt": prompt, "image_path": image_path, "image_bytes": size, "image_mtime_ns": mtime}


def source_change(recorded: dict | None, now: dict) -> str | None:
    """Why outputs recorded from `recorded` are not outputs of `now` (row_source dicts), or None."""
    if not isinstance(recorded, dict):
        return "made without a record of its inputs"
    if recorded.get("prompt") != now["prompt"]:
        return "prompt changed"
    if recorded.get("image_path") != now["image_path"]:
        return "image path changed"
    if (recorded.get("image_bytes"), recorded.get("image_mtime_ns")) != (now["image_bytes"], now["image_mtime_ns"]):
        return "image file changed"
    return None


def gen_kwargs(cfg) -> dict:
    return {"max_new_tokens": int(cfg.model.max_new_tokens), "do_sample": bool(cfg.model.do_sample),
            "num_beams": int(cfg.model.num_beams)}


def collect_kwargs(cfg) -> dict:
    """The keyword arguments of collector.collect that the model settings fix."""
    return {"attn_capture": str(cfg.model.attn_capture), "use_generate": bool(cfg.model.use_generate),
            "gen_kwargs": gen_kwargs(cfg)}


def attn_dtype(cfg) -> torch.dtype:
    name = str(cfg.data.attn_dtype)
    if name not in ATTN_DTYPES:
        raise InputError(f"data.attn_dtype={name!r} is unknown; use float16 or float32")
    return ATTN_DTYPES[name]


def run_device(cfg) -> str:
    """model.device, or with data.device_per_shard the shard's own GPU (one machine, several GPUs):
    the device of every model the run loads (the VLM and SAM)."""
    if cfg.data.device_per_shard:
        return shard_device(str(cfg.model.device), int(cfg.data.shard), torch.cuda.device_count())
    return str(cfg.model.device)


def load_adapter_from(cfg):
    """The adapter of cfg.model (config.ModelSettings), on the run's device."""
    from localization_heads.families import load_adapter

    quiet_library_bars()
    model = replace(cfg.model, name=model_path(str(cfg.model.name)), device=run_device(cfg))
    return load_adapter(model, str(cfg.model.attn_capture))


def fixed_heads(logic) -> tuple[list[tuple[int, int]] | None, str]:
    """logic.heads: None (per-sample ranking), a selected_heads.json path, or [[layer, head], ...].
    Reads the file: config.LogicSettings calls this once per run and keeps the answer."""
    heads = logic.heads
    if heads is None:
        return None, f"per-sample top-{int(logic.top_k)}"
    if not isinstance(heads, str) and hasattr(heads, "__iter__"):
        pairs, source = list(heads), "logic.heads"
    else:
        path = bundled_path(str(heads))
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
