"""Config mistakes, output folders and models that cannot be reached: refused before anything
runs (exit 2), every problem listed at once, one line each."""

from __future__ import annotations

import time

import pytest

from tests.cli_runs import (EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, EXIT_ROWS_FAILED, cli, model_loads, rows_file,
                            good_rows, batch_args, folder, readonly)


# ---------------------------------------------------------------- exit codes

def test_every_row_succeeding_exits_0(cli, tmp_path):
    code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(2)), tmp_path / "out"))
    assert code == EXIT_OK and (folder(tmp_path / "out") / "r1_bbox.json").is_file()


def test_failed_rows_exit_3_and_the_others_finish(cli, tmp_path):
    rows = good_rows(2) + [{"id": "gone", "prompt": "the square .", "image_path": str(tmp_path / "no.png")}]
    code, out = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out"))
    assert code == EXIT_ROWS_FAILED
    assert (folder(tmp_path / "out") / "r1_bbox.json").is_file()
    assert "gone" in (folder(tmp_path / "out") / "failures.jsonl").read_text()


def test_a_run_where_every_row_fails_is_not_a_success(cli, tmp_path):
    rows = [{"id": f"gone{i}", "prompt": "the square .", "image_path": f"no{i}.png"} for i in range(2)]
    code, _ = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out"))
    assert code == EXIT_ROWS_FAILED


@pytest.mark.parametrize("override, message", [
    ("logic.mask.threshold=bogus", "logic.mask.threshold='bogus': unknown; use one of mean, half_max"),
    ("logic.mask.method=hull", "logic.mask.method='hull': unknown"),
    ("logic.entropy.method=shannon", "logic.entropy.method='shannon': unknown"),
    ("logic.threshold.scope=global", "logic.threshold.scope='global': unknown"),
    ("model.attn_capture=flash", "model.attn_capture='flash': unknown"),
    ("model.dtype=f16", "model.dtype='f16': unknown"),
    ("data.attn_dtype=bfloat16", "data.attn_dtype='bfloat16': unknown"),
    ("logic.top_k=0", "logic.top_k=0: must be an integer >= 1"),
    ("logic.select.k=0", "logic.select.k=0: must be an integer >= 1"),
    ("logic.smoothing.sigma=-1", "logic.smoothing.sigma=-1: must be a finite number >= 0"),
    ("logic.heads=[[0]]", "logic.heads from logic.heads: expected [[layer, head], ...]"),
    ("logic.heads=[[-1,0]]", "are negative"),
    ("logic.heads=no/such/heads.json", "file not found"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.resume=maybe", "data.resume='maybe': must be true or false"),
    ("model.device=gpu", "model.device='gpu': use auto, cpu, cuda or cuda:<index>"),
])
def test_config_mistakes_stop_the_run_before_the_model_loads(override, message, cli, tmp_path, model_loads):
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"), override)
    assert code == EXIT_NOT_RUN and message in out and "Traceback" not in out
    assert model_loads == []


def test_every_config_mistake_is_listed_at_once(cli, tmp_path):
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"),
                    "logic.top_k=0", "logic.mask.threshold=bogus", "data.batch_size=0")
    assert code == EXIT_NOT_RUN and "3 problems" in out
    assert all(k in out for k in ("logic.top_k=0", "logic.mask.threshold='bogus'", "data.batch_size=0"))


def test_unknown_stage_exits_2(cli, tmp_path):
    code, out = cli("stage=colect", *TOY, f"data.output_dir={tmp_path}")
    assert code == EXIT_NOT_RUN and "stage='colect' is unknown" in out

def test_a_batch_over_part_of_the_file_says_so(cli, tmp_path):
    data = rows_file(tmp_path, good_rows(3))
    code, out = cli("stage=batch", *TOY, f"data.data_file={data}", f"data.output_dir={tmp_path / 'out'}")
    assert code == EXIT_OK
    assert "only rows [0, 1) of the 3" in out and "data.process_all=true" in out

# ---------------------------------------------------------------- output folder

def test_an_output_folder_that_is_a_file_stops_the_run_before_hydra(cli, tmp_path, model_loads):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), blocker / "out"))
    assert code == EXIT_NOT_RUN and "cannot write outputs here" in out and "Traceback" not in out
    assert model_loads == []


def test_an_unwritable_model_folder_stops_the_run_before_the_model_loads(cli, tmp_path, model_loads, readonly):
    """The Hydra log folder is writable; only <output_dir>/<model>/ is not."""
    out = tmp_path / "out"
    readonly(folder(out))
    code, text = cli(*batch_args(rows_file(tmp_path, good_rows(1)), out))
    assert code == EXIT_NOT_RUN and f"{folder(out)}: cannot write outputs here" in text
    assert model_loads == []

def test_an_unreachable_model_fails_in_seconds_not_after_retries(cli, tmp_path, monkeypatch):

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: no network
    args = ["stage=pipeline", "model.name=nobody/not-a-cached-model", f"data.output_dir={tmp_path}",
            f"data.image_file={EXAMPLES / 'toy_tall.png'}", "data.query=the triangle ."]
    start = time.monotonic()
    code, log = cli(*args)
    assert code == EXIT_NOT_RUN and time.monotonic() - start < 10
    assert "is not a local folder and not in the Hugging Face cache, and 127.0.0.1:9 cannot be reached" in log
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, log = cli(*args)
    assert code == EXIT_NOT_RUN and "HF_HUB_OFFLINE is set" in log
