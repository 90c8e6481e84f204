"""Interrupts, kills and full disks: only complete rows count as complete, nothing finished is
lost, and a rerun completes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localization_heads import cli as pipeline
from tests.cli_runs import (REPO, EXIT_OK, EXIT_ROWS_FAILED, EXIT_INTERRUPTED, cli, rows_file, good_rows, batch_args,
                            folder, mounts)


def test_a_full_disk_fails_rows_not_the_run_and_a_rerun_completes(cli, tmp_path, mounts):
    """Room for a few of the 12 rows: the rest fail (exit 3, each listed in the log even though
    failures.jsonl cannot be written either); with room again a rerun finishes them all."""
    out = tmp_path / "out"
    mounts(folder(out), "size=128k")
    args = batch_args(rows_file(tmp_path, good_rows(12)), out, f"hydra.run.dir={tmp_path / 'hydra'}")
    code, log = cli(*args)
    assert code == EXIT_ROWS_FAILED and "No space left on device" in log
    finished = len(list(folder(out).glob("*_bbox.json")))
    assert 0 < finished < 12
    subprocess.run(["mount", "-o", "remount,size=4m", str(folder(out))], check=True)
    code, log = cli(*args)
    assert code == EXIT_OK and f"{finished} complete" in log
    assert len(list(folder(out).glob("*_bbox.json"))) == 12

# ---------------------------------------------------------------- interrupts and workers

@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A JSONL long enough (48 rows) to interrupt, and its uninterrupted outputs to compare with."""
    where = tmp_path_factory.mktemp("long")
    data = rows_file(where, good_rows(48))
    reference = where / "reference"
    result = pipeline.run(pipeline.compose(*batch_args(data, reference)))
    assert result["written"] == 48
    return data, folder(reference)


def start_batch(data: Path, out: Path, *more: str) -> subprocess.Popen:
    """The batch in its own process group (as a terminal starts it), with two decoding workers.
    Batch size 1 as in the reference run: left padding moves float rounding (1e-5) with the batch."""
    return subprocess.Popen([sys.executable, "pipeline.py", *batch_args(data, out, "data.num_workers=2", *more)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_rows(proc: subprocess.Popen, out: Path, n: int = 4, timeout: float = 120) -> None:
    """Until `n` rows are finished: the run is in the middle of its work."""

    end = time.monotonic() + timeout
    while len(list(folder(out).glob("*_bbox.json"))) < n:
        assert proc.poll() is None and time.monotonic() < end, "the batch ended before it could be interrupted"
        time.sleep(0.05)


def assert_same_outputs(got: Path, expected: Path) -> None:
    """File for file: the same names, attention, analysis, masks and boxes (file stamps aside)."""
    def names(where: Path) -> list[str]:
        return sorted(p.name for p in where.iterdir() if not p.name.startswith(".") and p.name != "failures.jsonl")

    assert names(got) == names(expected)
    for name in names(expected):
        a, b = got / name, expected / name
        if name.endswith("_bbox.json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert {k: v for k, v in ja.items() if k != "row_files"} == {k: v for k, v in jb.items() if k != "row_files"}
        elif name.endswith(".pkl") and not name.endswith("_analysis.pkl"):
            ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert torch.equal(ra["attn"], rb["attn"]) and ra["meta"] == rb["meta"], name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_kill_9_leaves_no_process_behind_and_a_rerun_completes_the_run(long_run, tmp_path, cli):

    data, reference = long_run
    out = tmp_path / "out"
    proc = start_batch(data, out)
    wait_for_rows(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    with pytest.raises(ProcessLookupError):   # no image-decoding worker (or anything else) survived
        os.killpg(proc.pid, 0)
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert_same_outputs(folder(out), reference)


def test_ctrl_c_stops_within_seconds_without_a_traceback_and_a_rerun_completes_the_run(long_run, tmp_path, cli):

    data, reference = long_run
    out = tmp_path / "out"
    proc = start_batch(data, out)
    wait_for_rows(proc, out)
    os.killpg(proc.pid, signal.SIGINT)      # what Ctrl-C in a terminal does
    start = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 10
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "Traceback" not in text and "interrupted" in text
    finished = len(list(folder(out).glob("*_bbox.json")))
    assert finished < 48, "the run went on after Ctrl-C"
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and f"{finished} complete" in log
    assert_same_outputs(folder(out), reference)


def test_a_failure_is_on_disk_as_it_happens_and_survives_kill_9(long_run, tmp_path):
    """SIGTERM (a SLURM time limit), an OOM kill or kill -9 do not lose the reasons rows failed."""
    data, _ = long_run
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["image_path"] = str(tmp_path / "gone.png")
    broken, out = rows_file(tmp_path, rows), tmp_path / "out"
    proc = start_batch(broken, out)
    wait_for_rows(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(folder(out).glob("*_bbox.json"))) < 48, "the run ended before it was killed"
    entries = [json.loads(line) for line in (folder(out) / "failures.jsonl").read_text().splitlines()]
    assert [(e["id"], e["line"]) for e in entries] == [("r1", 2)] and "gone.png: image not found" in entries[0]["error"]


# At data.batch_size > 1 a row's attention depends, by float rounding, on the rows padded beside it
# (left padding changes the length the kernels reduce over). docs/promises.md states the tolerance.
ATTENTION_TOLERANCE = 1e-4


def test_a_resumed_run_at_batch_size_4_matches_an_uninterrupted_one_within_the_stated_tolerance(cli, tmp_path):
    """A resume after kill -9 meets the rows in other batches; here the first run stops after 5
    rows (deterministically, where a kill would stop anywhere), so every later row has other neighbours."""
    data = rows_file(tmp_path, good_rows(24))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cli(*batch_args(data, reference, "data.batch_size=4"))[0] == EXIT_OK
    assert cli(*batch_args(data, resumed, "data.batch_size=4", "data.process_all=false", "data.end_index=5"))[0] == EXIT_OK
    code, log = cli(*batch_args(data, resumed, "data.batch_size=4"))
    assert code == EXIT_OK and "5 complete" in log
    for i in range(24):
        a, b = (torch.load(folder(run) / f"r{i}.pkl", weights_only=True) for run in (reference, resumed))
        assert a["meta"] == b["meta"] and torch.allclose(a["attn"].float(), b["attn"].float(), rtol=0, atol=ATTENTION_TOLERANCE)
        boxes = [json.loads((folder(run) / f"r{i}_bbox.json").read_text()) for run in (reference, resumed)]
        heads = [[(h["layer"], h["head"]) for h in box["selected_heads"]] for box in boxes]
        assert boxes[0]["bbox_xyxy"] == boxes[1]["bbox_xyxy"] and heads[0] == heads[1], f"r{i}"
