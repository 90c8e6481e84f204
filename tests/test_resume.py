"""Resume keyed on content: a rerun redoes exactly the rows whose inputs, settings or files
changed, says why, and needs the model only for rows whose attention must be collected again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from localization_heads.collector import load_attention
from tests.cli_runs import (REPO, EXAMPLES, EXIT_OK, EXIT_NOT_RUN, EXIT_ROWS_FAILED, cli, model_loads, rows_file,
                            good_rows, batch_args, folder, bbox_of, failures_of)


# ---------------------------------------------------------------- resume keyed on content

def test_a_row_whose_prompt_was_edited_is_redone(cli, tmp_path):
    rows = good_rows(2)
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    untouched = (folder(out) / "r1.pkl").stat().st_mtime_ns
    rows[0]["prompt"] = "the small yellow circle ."
    rows_file(tmp_path, rows)
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "redoing 1 rows: prompt changed (r0)" in log
    assert bbox_of(out, "r0")["query"] == "the small yellow circle ."
    assert load_attention(folder(out) / "r0.pkl")["meta"]["query"] == "the small yellow circle ."
    assert (folder(out) / "r1.pkl").stat().st_mtime_ns == untouched


def test_a_row_whose_image_file_was_replaced_is_redone(cli, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    data = rows_file(tmp_path, [{"id": "a", "prompt": "the triangle .", "image_path": "scene.png"}])
    out = tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert bbox_of(out, "a")["image_size"] == [96, 146]
    image.write_bytes((EXAMPLES / "toy_wide.png").read_bytes())   # same path, other picture
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "image file changed (a)" in log
    assert bbox_of(out, "a")["image_size"] == [155, 123]


def test_a_row_with_a_file_from_another_run_is_redone(cli, tmp_path):
    """A mask written by a run with other settings (say, two runs at once before locks) does not
    belong to the row's _bbox.json: the row is not complete."""
    data, out, other = rows_file(tmp_path, good_rows(1)), tmp_path / "out", tmp_path / "other"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    mask = (folder(out) / "r0_mask.png").read_bytes()
    assert cli(*batch_args(data, other, "logic.mask.threshold=mean"))[0] == EXIT_OK
    foreign = (folder(other) / "r0_mask.png").read_bytes()
    assert foreign != mask
    (folder(out) / "r0_mask.png").write_bytes(foreign)
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "files replaced since the row was finished (r0)" in log
    assert (folder(out) / "r0_mask.png").read_bytes() == mask


def test_a_row_missing_one_of_its_files_is_redone(cli, tmp_path):
    data, out = rows_file(tmp_path, good_rows(1)), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    (folder(out) / "r0_analysis.pkl").unlink()
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and (folder(out) / "r0_analysis.pkl").is_file()

def test_a_clean_run_of_another_jsonl_keeps_the_failure_list(cli, tmp_path):
    out = tmp_path / "out"
    broken = [{"id": "gone", "prompt": "the square .", "image_path": "no.png"}]
    first = rows_file(tmp_path, good_rows(1) + broken, "first.jsonl")
    assert cli(*batch_args(first, out))[0] == EXIT_ROWS_FAILED
    second = rows_file(tmp_path, [dict(good_rows(2)[1], id="other")], "second.jsonl")
    assert cli(*batch_args(second, out))[0] == EXIT_OK
    assert set(failures_of(out)) == {"gone"}
    broken[0]["image_path"] = str(EXAMPLES / "toy_square.png")   # fixed: the rerun clears its entry
    rows_file(tmp_path, good_rows(1) + broken, "first.jsonl")
    assert cli(*batch_args(first, out))[0] == EXIT_OK
    assert failures_of(out) == {}

def test_a_rerun_that_needs_no_model_runs_without_it(cli, tmp_path):
    """Outputs copied to a machine without the model: new logic is applied from the saved attention."""

    model = tmp_path / "toy-llava"
    shutil.copytree(REPO / "localization_heads" / "models" / "toy-llava", model)
    data, out = rows_file(tmp_path, good_rows(2)), tmp_path / "out"
    assert cli(*batch_args(data, out, f"model.name={model}"))[0] == EXIT_OK
    shutil.rmtree(model)
    code, log = cli(*batch_args(data, out, f"model.name={model}", "logic.mask.threshold=mean"))
    assert code == EXIT_OK and "2 to redo from saved attention, 0 to run through the model" in log, log
    assert bbox_of(out, "r0")["settings"]["logic"]["mask"]["threshold"] == "mean"

# ---------------------------------------------------------------- reruns from elsewhere

def test_a_rerun_from_another_folder_finds_the_rows_complete_and_reboxes_from_the_rows_paths(
        cli, tmp_path, monkeypatch, model_loads):
    """What outputs record does not depend on the working directory: a finished batch run with a
    relative data file is complete when rerun from elsewhere (the toy model's folder is recorded as an
    absolute path), and a new logic re-boxes from the saved attention with the image path of the row
    as this run resolves it, not the relative one saved in the file."""
    data_dir = tmp_path / "data"
    images = data_dir / "images"
    images.mkdir(parents=True)
    rows = []
    for row in good_rows(2):
        (images / Path(row["image_path"]).name).write_bytes(Path(row["image_path"]).read_bytes())
        rows.append(dict(row, image_path=f"images/{Path(row['image_path']).name}"))
    rows_file(data_dir, rows)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert cli(*batch_args(Path("data/data.jsonl"), out))[0] == EXIT_OK
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, log = cli(*batch_args(data_dir / "data.jsonl", out))
    assert code == EXIT_OK and "2 complete" in log and "collection settings changed" not in log
    code, log = cli(*batch_args(data_dir / "data.jsonl", out, "logic.top_k=1", "data.visualize_batch=true"))
    assert code == EXIT_OK and "2 to redo from saved attention" in log, log
    summary = json.loads((folder(out) / "r0_bbox.json").read_text())
    assert summary["image_file"] == str(images / "toy_tall.png") and (folder(out) / "r0_top1.png").is_file()
    assert len(model_loads) == 1                                   # only the first run needed the model


def test_a_run_that_never_reaches_a_failed_row_keeps_its_failure_listed(cli, tmp_path):
    """failures.jsonl keeps the entry of a row this run did not settle: here the model cannot load,
    nothing runs (exit 2), and the earlier failure stays listed for evaluate and report."""
    rows = good_rows(1) + [{"id": "gone", "prompt": "the square .", "image_path": str(tmp_path / "no.png")}]
    data = rows_file(tmp_path, rows)
    assert cli(*batch_args(data, tmp_path / "out"))[0] == EXIT_ROWS_FAILED
    failures = folder(tmp_path / "out") / "failures.jsonl"
    code, _ = cli(*batch_args(data, tmp_path / "out", f"model.name={tmp_path / 'no-such-model'}"))
    assert code == EXIT_NOT_RUN
    assert [json.loads(line)["id"] for line in failures.read_text().splitlines()] == ["gone"]


def test_a_ground_truth_edit_redoes_the_box_step_without_the_model(cli, tmp_path, model_loads):
    rows = [dict(r, bbox=[9, 49, 66, 106]) for r in good_rows(2)]
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out, "data.visualize_batch=true"))[0] == EXIT_OK
    figure = (folder(out) / "r0_top3.png").read_bytes()
    rows[0]["bbox"] = [0, 0, 20, 20]
    rows_file(tmp_path, rows)
    code, log = cli(*batch_args(data, out, "data.visualize_batch=true"))
    assert code == EXIT_OK and "redoing 1 rows: ground truth changed (r0)" in log
    assert "1 to redo from saved attention, 0 to run through the model" in log and len(model_loads) == 1
    assert bbox_of(out, "r0")["gt_bbox"] == [0, 0, 20, 20] and bbox_of(out, "r1")["gt_bbox"] == [9, 49, 66, 106]
    assert (folder(out) / "r0_top3.png").read_bytes() != figure
