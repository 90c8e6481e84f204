"""Files in and out: JSONL rows with line-numbered errors, atomic writes, safe output paths."""
from __future__ import annotations

import codecs
import json
import math
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, Iterator

# File names are at most 255 bytes. The longest name made from an id is the temp file of its
# analysis, ".<id>_analysis.pkl.<8 hex>.tmp" (id + 27 bytes); 200 leaves room for new outputs.
MAX_ID_BYTES = 200
# "<id>_analysis.pkl" is both the analysis of <id> and the attention file of "<id>_analysis", so
# no id may end so. (No other output suffix ends in another one: _mask.png, _top{K}.png, _bbox.json.)
RESERVED_ID_ENDINGS = ("_analysis",)


class InputError(ValueError):
    """Bad user input; the message is one line naming the file, line or key and what to do."""


class PlainUnpickler(pickle.Unpickler):
    """Loads pickles of plain data (lists, dicts, strings, numbers) only: anything that asks for a
    class or function could run code, so it is refused outright."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}")


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, row, None) for each JSON object line, (line number, None, problem) for a line
    that is not one; blank lines are skipped. InputError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: JSONL file not found; check data.data_file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):   # Windows editors write one
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, (f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                     "save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete the line"
                continue
            if not isinstance(row, dict):
                yield lineno, None, f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                continue
            yield lineno, row, None


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, row) for each non-blank line; InputError names file:line and the bad key."""
    for lineno, row, problem in jsonl_objects(path):
        if problem:
            raise InputError(problem)
        missing = [k for k in required if k not in row]
        if missing:
            raise InputError(f"{path}:{lineno}: missing key {missing[0]!r} (required: {', '.join(required)})")
        yield lineno, row


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves a half file.
    The file gets mode 0666 minus the umask, like any file the user creates (mkstemp's 0600 would
    hide outputs from colleagues on a shared server)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (allow_nan=False): callers turn inf/nan into None first."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def file_stamps(folder: str | Path, names: list[str]) -> dict[str, list[int]]:
    """{name: [size, mtime_ns]} of files in `folder`: a row's _bbox.json records its other files
    so that a file replaced later (another run, a copy, a half-finished rerun) is noticed."""
    stamps = {}
    for name in names:
        stat = (Path(folder) / name).stat()
        stamps[name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def id_problem(item_id: str) -> str | None:
    """Why `item_id` cannot name output files (and what to do), or None when it can."""
    if not item_id:
        return "id is empty; give every row a non-empty id"
    if "/" in item_id or "\\" in item_id or item_id.startswith("."):
        return f"id {item_id!r} is not a plain file name; ids may not contain '/' or '\\' or start with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        return f"id {item_id!r} contains a control character; remove it"
    size = len(item_id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"id {item_id[:20]!r}... is {size} bytes long (UTF-8); shorten it to at most {MAX_ID_BYTES}"
    for ending in RESERVED_ID_ENDINGS:
        if item_id.endswith(ending):
            return (f"id {item_id!r} ends in {ending!r}, which names another id's output "
                    f"({item_id[:-len(ending)]}{ending}.pkl); rename it")
    return None


def is_number(v: Any) -> bool:
    """A finite int or float; bool is an int subclass, but true/false in a box is a data bug."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def box_problem(box: Any) -> str | None:
    """Why `box` is not an xyxy box in pixels (4 finite numbers, x1 >= x0, y1 >= y0), or None.
    JSON's NaN and Infinity, strings ("9196") and nested lists are all refused, never coerced."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(is_number(v) for v in box)):
        return f"{json.dumps(box)[:60]} is not 4 finite numbers [x0, y0, x1, y1] in pixels"
    if box[2] < box[0] or box[3] < box[1]:
        return f"{json.dumps(box)[:60]} has x1 < x0 or y1 < y0; give [x0, y0, x1, y1]"
    return None


def safe_output_path(root: str | Path, item_id: str, suffix: str) -> Path:
    """root/<item_id><suffix>, refusing ids that would escape root ("../x", "/abs", "a/b") or
    name another id's file."""
    item_id = str(item_id)
    problem = id_problem(item_id)
    if problem:
        raise InputError(problem)
    return Path(root) / f"{item_id}{suffix}"


def resolve_path(path: str, base: str | Path) -> Path:
    """A path from a JSONL row: absolute as is; relative ones against the JSONL's folder, and
    against the working directory when only that exists (the seed README's examples are written so)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    beside = Path(base) / p
    return beside if beside.exists() or not p.exists() else p
