"""Config mistakes, output folders and models that cannot be reached: refused before anything
runs (exit 2), every problem listed at once, one line each."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from localization_heads.collector import load_attention, save_attention


from tests.cli_runs import (only_writes_into, error_line, REPO, EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, EXIT_ROWS_FAILED, cli, model_loads, rows_file,
                            good_rows, batch_args, folder, mounts, readonly)


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


def test_heads_outside_the_model_are_refused_before_any_row(cli, tmp_path, model_loads):
    data, out = rows_file(tmp_path, good_rows(3)), tmp_path / "out"
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out), "logic.heads=[[99,0],[1,2]]")
    line = error_line(log, "logic.heads: [[99, 0]] outside the model's 6 layers × 4 heads")
    assert code == EXIT_NOT_RUN and "config.json" in line and model_loads == []
    assert not list(folder(out).glob("r*"))


def saved_run_without_its_model(cli, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model folder, data file, output folder) of a batch of 2 rows run on a copy of the toy model,
    the copy then deleted: a rerun can only re-box the saved attention."""
    model = tmp_path / "toy-llava"
    shutil.copytree(REPO / "localization_heads" / "models" / "toy-llava", model)
    data, out = rows_file(tmp_path, good_rows(2)), tmp_path / "out"
    assert cli(*batch_args(data, out, f"model.name={model}"))[0] == EXIT_OK
    shutil.rmtree(model)
    return model, data, out


def test_heads_outside_the_saved_attention_are_refused_when_the_model_is_gone(cli, tmp_path, model_loads):
    """A rerun that would only re-box saved attention reads L and H from the first attention file."""
    model, data, out = saved_run_without_its_model(cli, tmp_path)
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out, f"model.name={model}", "logic.heads=[[5,4]]"))
    assert code == EXIT_NOT_RUN and error_line(log, "logic.heads: [[5, 4]] outside the model's 6 layers × 4 heads (r0.pkl)")


def test_heads_on_layers_without_attention_are_refused_before_any_row(cli, tmp_path, model_loads):
    """Qwen3.5: layers 0–2 and 4–6 are Gated DeltaNet layers without attention; its config.json says so
    (here through the config class's default layer_types), so [[1, 0]] is refused before the model loads."""
    from tests import tiny_qwen

    model = tmp_path / "tiny-qwen35"
    tiny_qwen.config("qwen3_5", tiny_qwen.tokenizer()).save_pretrained(model)
    data, out = rows_file(tmp_path, good_rows(2)), tmp_path / "out"
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out, f"model.name={model}", "model.family=qwen_vl",
                                    "logic.heads=[[1,0],[3,2]]"))
    line = error_line(log, "logic.heads: [[1, 0]] outside the model's heads: attention layers [3, 7]")
    assert code == EXIT_NOT_RUN and "× 4 heads" in line and model_loads == []


def test_heads_on_layers_the_saved_attention_lacks_are_refused_when_the_model_is_gone(cli, tmp_path, model_loads):
    """Without the model, a re-box reads the attention layers from meta["layers"] of the first saved file."""
    model, data, out = saved_run_without_its_model(cli, tmp_path)
    for pkl in folder(out).glob("r?.pkl"):   # as a hybrid model writes them: rows are model layers 1, 3, …, 11
        record = load_attention(pkl)
        record["meta"]["layers"] = [2 * i + 1 for i in range(record["attn"].shape[0])]
        save_attention(pkl, record)
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out, f"model.name={model}", "logic.heads=[[2,0]]"))
    assert code == EXIT_NOT_RUN and error_line(
        log, "logic.heads: [[2, 0]] outside the model's heads: attention layers [1, 3, 5, 7, 9, 11] (model indices")


def test_a_lock_file_that_cannot_be_opened_is_one_line(cli, tmp_path, model_loads):
    """Say, created by another user on a shared folder (here: a folder in its place, which even root cannot open)."""
    data, out = rows_file(tmp_path, good_rows(1)), tmp_path / "out"
    (folder(out) / ".rows.lock").mkdir(parents=True)
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out))
    line = error_line(log, f"{folder(out) / '.rows.lock'}: cannot open the rows' lock file")
    assert code == EXIT_NOT_RUN and "chmod a+rw" in line and model_loads == []


def test_runs_started_in_the_same_second_log_into_two_folders(cli, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):   # the quickest runs there are: both refused at once, each within milliseconds
        assert cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={tmp_path / 'none.jsonl'}")[0] == EXIT_NOT_RUN
    logs = sorted(p.parent for p in (out / "hydra").rglob("*.log"))
    assert len(logs) == 2 and logs[0] != logs[1]


def test_an_unreachable_sam_fails_in_seconds_not_after_retries(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: no network
    data, out = rows_file(tmp_path, good_rows(1)), tmp_path / "out"
    start = time.monotonic()
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out), "logic.mask.refine=sam", "logic.mask.sam_model=nobody/no-sam")
    assert code == EXIT_NOT_RUN and time.monotonic() - start < 20
    assert error_line(log, "logic.mask.sam_model='nobody/no-sam' is not a local folder and not in the Hugging Face cache, "
                           "and 127.0.0.1:9 cannot be reached")


@pytest.mark.parametrize("stage", ["evaluate", "report"])
def test_a_read_only_results_folder_gets_advice_that_can_work(stage, cli, tmp_path, readonly):
    data, out = rows_file(tmp_path, [dict(r, bbox=[0, 0, 9, 9]) for r in good_rows(1)]), tmp_path / "out"
    readonly(folder(out))
    code, log = cli(f"stage={stage}", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    line = error_line(log, f"{folder(out)}: cannot write outputs here")
    assert code == EXIT_NOT_RUN and "make the folder writable, or copy it" in line and "choose another" not in line
