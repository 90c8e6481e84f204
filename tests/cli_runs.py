"""Running the tool as a user would, for the tests of what it promises (docs/promises.md): the
bundled toy model, small JSONL files, and the checks every such test makes.

`cli(...)` runs `python pipeline.py ...` in this process (runpy, so Hydra parses the overrides and
main() sets the exit code exactly as on a terminal); `subprocess_cli(...)` starts a real process
where the process itself is under test (signals, kill -9, quoting)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from localization_heads import settings
from tests.conftest import write_jsonl


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"
TOY = ["model=toy", "data.num_workers=0", "logic=paper", "logic.mask.threshold=half_max"]
EXIT_OK, EXIT_NOT_RUN, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


@pytest.fixture
def cli(capfd):
    """cli(*overrides) → (exit code, everything printed)."""
    def run(*overrides: str) -> tuple[int, str]:
        argv = sys.argv
        sys.argv = [str(REPO / "pipeline.py"), *overrides]
        code = 0
        try:
            runpy.run_path(str(REPO / "pipeline.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
        out, err = capfd.readouterr()
        return code, out + err
    return run


def subprocess_cli(*overrides: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """Appends one entry per model load: the config checks must all come before it."""
    loads = []
    real = settings.load_adapter_from
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loads.append(1) or real(cfg))
    return loads


def rows_file(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)


def good_rows(n: int = 3) -> list[dict]:
    images = ["toy_tall.png", "toy_wide.png", "toy_square.png", "toy_tall4.png"]
    prompts = ["the triangle .", "the blue square .", "the square .", "the yellow circle ."]
    return [{"id": f"r{i}", "prompt": prompts[i % 4], "image_path": str(EXAMPLES / images[i % 4])} for i in range(n)]


def batch_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["stage=batch", *TOY, f"data.data_file={data}", "data.process_all=true", f"data.output_dir={out}", *more]


def folder(out: Path) -> Path:
    return out / "toy-llava"


@pytest.fixture
def mounts():
    """mount(path, options): a small tmpfs at `path` (read-only, or nearly full), or skip where
    this process may not mount; unmounted afterwards."""
    mounted = []

    def mount(path: Path, options: str):
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def readonly(mounts):
    """readonly(path): make `path` a read-only folder, even for root (a read-only tmpfs)."""
    import os

    def make(path: Path):
        if os.geteuid() != 0:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o555)
        else:
            mounts(path, "ro,size=1m")

    return make


def bbox_of(out: Path, item_id: str) -> dict:
    return json.loads((folder(out) / f"{item_id}_bbox.json").read_text())


HOLD = """
import sys, time
from localization_heads.locks import RowLocks
with RowLocks(sys.argv[1], sys.argv[2:]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def hold_rows():
    """hold_rows(folder, *ids): another process holds those rows, as a running batch would."""
    holders = []

    def hold(where: Path, *ids: str):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(where), *ids], cwd=REPO, stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


def failures_of(out: Path) -> dict[str, str]:
    path = folder(out) / "failures.jsonl"
    return {json.loads(l)["id"]: json.loads(l)["error"] for l in path.read_text().splitlines()} if path.exists() else {}


def stamps(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every file under `root`, those under `skip` left out."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and (skip is None or skip not in p.parents)}


@contextmanager
def only_writes_into(root: Path, out: Path) -> Iterator[None]:
    """No file under `root` outside the output folder `out` is created, changed or removed, and
    no finished row in `out` (its <id>_bbox.json) is lost or changed."""
    outside, finished = stamps(root, out), {p.name: p.read_bytes() for p in out.rglob("*_bbox.json")}
    yield
    assert stamps(root, out) == outside, "a file outside the output folder was touched"
    assert {p.name: p.read_bytes() for p in out.rglob("*_bbox.json")} == finished, "a finished row was lost"


def error_line(log: str, text: str) -> str:
    """The one log line holding `text`; fails if there is none or it is a traceback's."""
    lines = [line for line in log.splitlines() if text in line]
    assert lines and "Traceback" not in log, log[-3000:]
    return lines[0]


def select_and_evaluate(folder: Path, data: Path) -> tuple[dict, dict]:
    """stage=select then stage=evaluate on the model folder `folder` (the toy): (selected_heads.json,
    evaluation.json), without the keys that name the folder itself."""
    from localization_heads import cli as pipeline

    base = ["model=toy", "logic=paper", f"data.output_dir={folder.parent}", f"data.data_file={data}"]
    pipeline.run(pipeline.compose("stage=select", *base))
    pipeline.run(pipeline.compose("stage=evaluate", *base))
    heads = json.loads((folder / "selected_heads.json").read_text())
    evaluation = json.loads((folder / "evaluation.json").read_text())
    heads.pop("attention_dir"), evaluation.pop("pred_dir")
    return heads, evaluation
