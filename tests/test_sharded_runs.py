"""A real Hydra multirun of 2 shards (joblib launcher, CPU, the bundled toy model) writes the same
files as one unsharded run; select and evaluate read the union; progress goes to the log as plain
lines; a failing shard fails the multirun."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localization_heads import cli as pipeline
from localization_heads.collector import load_attention
from tests.cli_runs import select_and_evaluate
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "localization_data.jsonl"
# Batch size 1: a row's numbers then do not depend on which rows share its forward pass (left
# padding), so sharded and unsharded files can be compared bit for bit.
ARGS = ["model=toy", "logic=paper", "data.process_all=true", "data.num_workers=0", "data.batch_size=1"]


def multirun(out: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", "-m", "stage=batch", *ARGS, f"data.data_file={data}",
                           f"data.output_dir={out}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The examples (12 rows with ground truth) and one row whose image is missing."""
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    for row in rows:
        row["image_path"] = str(EXAMPLES.parent / row["image_path"])
    rows.append({"id": "gone", "prompt": "the red circle .", "image_path": "no/such.png", "bbox": [0, 0, 5, 5]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """(sharded folder, unsharded folder, the multirun's process)."""
    root = tmp_path_factory.mktemp("runs")
    proc = multirun(root / "sharded", data, "data.num_shards=2", "data.shard=range(0,2)")
    # The shard holding the row with no image ends with exit code 3 (rows failed): its job fails and
    # so does the multirun, while the other shard finishes all its rows.
    assert proc.returncode != 0 and "failed with exit code 3" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    pipeline.run(pipeline.compose("stage=batch", *ARGS, f"data.data_file={data}", f"data.output_dir={root / 'plain'}"))
    return root / "sharded" / "toy-llava", root / "plain" / "toy-llava", proc


def per_id_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("failures")}


def test_shards_write_the_same_files_as_one_run(runs):
    sharded, plain, _ = runs
    assert per_id_files(sharded) == per_id_files(plain)
    assert len(list(plain.glob("*_bbox.json"))) == 12
    for box in plain.glob("*_bbox.json"):
        assert same_box_file(json.loads((sharded / box.name).read_text()), json.loads(box.read_text())), box.name
    for mask in plain.glob("*_mask.png"):
        assert (sharded / mask.name).read_bytes() == mask.read_bytes(), mask.name
    for attn in plain.glob("*.pkl"):
        if not attn.name.endswith("_analysis.pkl"):
            torch.testing.assert_close(load_attention(sharded / attn.name)["attn"], load_attention(attn)["attn"],
                                       rtol=0, atol=0)


def same_box_file(a: dict, b: dict) -> bool:
    """Equal but for `row_files`, the size and time stamps of each run's own files (resume's check)."""
    return {k: v for k, v in a.items() if k != "row_files"} == {k: v for k, v in b.items() if k != "row_files"}


def test_shards_share_one_failure_list(runs):
    """Both shards update failures.jsonl, each replacing only its own rows' entries: the failing
    row of one shard is listed once and the other shard's clean run does not drop it."""
    sharded, plain, _ = runs
    assert sorted(p.name for p in sharded.glob("failures*.jsonl")) == ["failures.jsonl"]
    assert [json.loads(l)["id"] for l in (sharded / "failures.jsonl").read_text().splitlines()] == ["gone"]
    assert [json.loads(l)["id"] for l in (plain / "failures.jsonl").read_text().splitlines()] == ["gone"]


def test_select_and_evaluate_read_the_union(runs, data):
    sharded, plain, _ = runs
    results = {name: select_and_evaluate(folder, data) for name, folder in (("sharded", sharded), ("plain", plain))}
    assert results["sharded"] == results["plain"]
    heads, evaluation = results["sharded"]
    assert heads["n_samples"] == 12 and evaluation["n"] == 13
    assert evaluation["status_counts"]["failed"] == 1 and "not found" in evaluation["missing_reasons"]["gone"]


def test_progress_goes_to_the_job_logs_as_plain_lines(runs):
    """Not a terminal: one line per few rows in each shard's log, no bar redrawn, no colour codes."""
    sharded, _, proc = runs
    logs = sorted((sharded.parent / "hydra" / "multirun").glob("*/*/[01]/pipeline.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert "batch: " in text and " rows/s, elapsed " in text and "ETA" in text
    for text in [proc.stdout, proc.stderr] + [log.read_text() for log in logs]:
        assert "\r" not in text and "\x1b[" not in text


def test_a_failing_shard_fails_the_multirun(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "the square .",
                                                 "image_path": str(EXAMPLES.parent / "images" / "toy_square.png")}])
    proc = multirun(tmp_path, data, "data.num_shards=2", "data.shard=0,2")
    assert proc.returncode != 0
    assert "data.shard=2 must be in 0..1" in proc.stdout + proc.stderr
