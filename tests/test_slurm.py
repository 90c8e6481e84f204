"""The README's SLURM command, run for real: `hydra/launcher=submitit_slurm` submits one job per
shard to the cluster on this machine (.ci/start_slurm.sh; CI starts it as root). Two shards of the
toy model write what one unsharded run writes; a failing shard fails the multirun; a job cancelled
with scancel (SIGTERM then SIGKILL, as at a time limit) keeps its finished rows and a rerun of the
same command completes them."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localization_heads import cli as pipeline
from tests.cli_runs import select_and_evaluate
from tests.conftest import write_jsonl
from tests.test_sharded_runs import ARGS, EXAMPLES, per_id_files, same_box_file

REPO = Path(__file__).resolve().parents[1]


def slurm_partition() -> str:
    """The cluster's default partition (or its first), or a skip saying why SLURM is not usable here."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (sinfo/sbatch missing); .ci/run installs and starts it as root")
    for _ in range(10):
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True)
        rows = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2]
        up = [p for p, state in rows if state.startswith(("idle", "mix", "alloc"))]
        if up:
            default = [p for p in up if p.endswith("*")]
            return (default or up)[0].rstrip("*")
        time.sleep(1)
    pytest.skip(f"SLURM has no usable node (sinfo: {proc.stdout.strip() or proc.stderr.strip()}); "
                "start a cluster with .ci/start_slurm.sh as root")


@pytest.fixture(scope="module")
def partition() -> str:
    return slurm_partition()


def slurm_command(out: Path, data: Path, partition: str, *overrides: str) -> list[str]:
    """README "Sharded runs": one SLURM job per shard (no GPU on this cluster, 1 CPU each)."""
    return [sys.executable, "pipeline.py", "-m", "stage=batch", *ARGS, f"data.data_file={data}",
            f"data.output_dir={out}", "data.num_shards=2", "data.shard=range(0,2)",
            "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20", *overrides]


def examples(times: int = 1) -> list[dict]:
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    for row in rows:
        row["image_path"] = str(EXAMPLES.parent / row["image_path"])
    return [dict(row, id=f"{row['id']}_{k}") if times > 1 else row for k in range(times) for row in rows]


@pytest.fixture(scope="module")
def runs(partition, tmp_path_factory):
    """(SLURM-sharded folder, unsharded folder, data file, the multirun's process)."""
    root = tmp_path_factory.mktemp("slurm")
    rows = examples() + [{"id": "gone", "prompt": "the red circle .", "image_path": "no/such.png", "bbox": [0, 0, 5, 5]}]
    data = write_jsonl(root / "rows.jsonl", rows)
    proc = subprocess.run(slurm_command(root / "sharded", data, partition), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    pipeline.run(pipeline.compose("stage=batch", *ARGS, f"data.data_file={data}", f"data.output_dir={root / 'plain'}"))
    return root / "sharded" / "toy-llava", root / "plain" / "toy-llava", data, proc


def test_a_failing_shard_fails_the_slurm_multirun(runs):
    """The shard holding the row with no image ends with exit code 3; its job fails, so does the multirun."""
    *_, proc = runs
    assert proc.returncode != 0
    assert "failed with exit code 3" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_slurm_shards_write_what_one_run_writes(runs):
    sharded, plain, _, proc = runs
    jobs = list((sharded.parent / "hydra" / "multirun").glob("*/*/.submitit/*/*_0_log.out"))
    assert len(jobs) == 2, "two SLURM jobs, one per shard"
    assert per_id_files(sharded) == per_id_files(plain)
    assert len(list(plain.glob("*_bbox.json"))) == 12
    for box in plain.glob("*_bbox.json"):
        assert same_box_file(json.loads((sharded / box.name).read_text()), json.loads(box.read_text())), box.name
    for mask in plain.glob("*_mask.png"):
        assert (sharded / mask.name).read_bytes() == mask.read_bytes(), mask.name
    assert [json.loads(l)["id"] for l in (sharded / "failures.jsonl").read_text().splitlines()] == ["gone"]


def test_select_and_evaluate_read_the_union_of_slurm_shards(runs):
    sharded, plain, data, _ = runs
    results = {name: select_and_evaluate(folder, data) for name, folder in (("sharded", sharded), ("plain", plain))}
    assert results["sharded"] == results["plain"]
    assert results["sharded"][0]["n_samples"] == 12 and results["sharded"][1]["n"] == 13


def squeue(jobs: list[str]) -> str:
    return subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True).stdout.strip()


def test_a_cancelled_job_keeps_its_rows_and_the_rerun_completes(partition, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", examples(times=4))    # 48 rows: the jobs outlive the first rows
    out = tmp_path / "out"
    folder = out / "toy-llava"
    driver = subprocess.Popen(slurm_command(out, data, partition), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(list(folder.glob("*_bbox.json"))) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
        # submitit submits the shards as one job array: <array id>_<shard>
        jobs = sorted(p.name for p in out.glob("hydra/multirun/*/*/.submitit/*_*") if p.is_dir())
        assert len(jobs) == 2 and driver.poll() is None, "both jobs running when the first rows are written"
        subprocess.run(["scancel", *jobs], check=True)
        while squeue(jobs) and time.monotonic() < deadline:
            time.sleep(1)
        assert not squeue(jobs), "the cancelled jobs ended"
    finally:
        # Without SLURM accounting (sacct) the launcher cannot see a cancelled job end; a user
        # would stop it the same way (Ctrl-C) and rerun.
        left = [p.name for p in out.glob("hydra/multirun/*/*/.submitit/*_*") if p.is_dir()]
        if left and squeue(left):   # a failed check above: no job outlives the test
            subprocess.run(["scancel", *left])
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
    finished = sorted(p.name[: -len("_bbox.json")] for p in folder.glob("*_bbox.json"))
    assert 2 <= len(finished) < 48, "cancelled part-way"
    for item in finished:   # a finished row is whole: every file it lists is there
        summary = json.loads((folder / f"{item}_bbox.json").read_text())
        assert all((folder / name).is_file() for name in summary["row_files"]), item
    stamps = {item: (folder / f"{item}_bbox.json").stat().st_mtime_ns for item in finished}

    rerun = subprocess.run(slurm_command(out, data, partition), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert len(list(folder.glob("*_bbox.json"))) == 48
    assert {item: (folder / f"{item}_bbox.json").stat().st_mtime_ns for item in finished} == stamps   # kept, not redone
    rerun_logs = sorted(out.glob("hydra/multirun/*/*/"))[-1].glob("[01]/*.log")
    complete = [re.search(r"batch: \d+ rows: (\d+) complete", p.read_text()) for p in rerun_logs]
    assert sum(int(m.group(1)) for m in complete) == len(finished)   # the log says what was kept
