"""JSONL rows: every bad row of the file listed at once (exit 2) by every stage that reads it;
the ground truth read and scored one way by evaluate and report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.cli_runs import (only_writes_into, error_line, EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, model_loads, rows_file, good_rows, batch_args,
                            folder)


# ---------------------------------------------------------------- JSONL rows

@pytest.mark.parametrize("row, message", [
    ({"id": None, "prompt": "a", "image_path": "a.png"}, "id: null is not an id; give a string or an integer"),
    ({"id": True, "prompt": "a", "image_path": "a.png"}, "id: true is not an id"),
    ({"id": "x", "prompt": ["the dog", "the cat"], "image_path": "a.png"},
     "prompt: a list ([\"the dog\", \"the cat\"]); give one referring expression as a string"),
    ({"id": "x", "prompt": "a", "image_path": 7}, "image_path: 7 is not a path"),
    ({"id": "x" * 300, "prompt": "a", "image_path": "a.png"}, "is 300 bytes long (UTF-8); shorten it to at most 200"),
    ({"id": "x" * 236, "prompt": "a", "image_path": "a.png"}, "is 236 bytes long"),
    ({"id": "a\nb", "prompt": "a", "image_path": "a.png"}, "contains a control character"),
    ({"id": ".hidden", "prompt": "a", "image_path": "a.png"}, "is not a plain file name"),
    ({"id": "r0_analysis", "prompt": "a", "image_path": "a.png"}, "ends in '_analysis', which names another id's output"),
    ({"id": "x", "image_path": "a.png"}, "prompt: missing"),
])
def test_bad_rows_are_refused_with_a_precise_message(row, message, cli, tmp_path, model_loads):
    data = rows_file(tmp_path, [good_rows(1)[0], row])
    code, out = cli(*batch_args(data, tmp_path / "out"))
    assert code == EXIT_NOT_RUN and f"{data}:2: " in out and message in out and "Traceback" not in out
    assert model_loads == [] and not list(folder(tmp_path / "out").glob("*.pkl"))


def test_every_bad_row_of_the_file_is_listed_at_once(cli, tmp_path):
    data = rows_file(tmp_path, [
        good_rows(1)[0],
        "{not json",
        {"id": None, "prompt": "a", "image_path": "a.png"},
        {"id": "y", "prompt": 3, "image_path": "a.png"},
        {"id": "r0", "prompt": "a", "image_path": "a.png"},
    ])
    code, out = cli(*batch_args(data, tmp_path / "out"))
    assert code == EXIT_NOT_RUN and "4 problems" in out
    for line in (f"{data}:2: not valid JSON", f"{data}:3: id: null", f"{data}:4: prompt: a int",
                 f"{data}:5: id: duplicate id 'r0' (first on line 1)"):
        assert line in out


def test_integer_ids_name_files_as_their_digits(cli, tmp_path):
    row = dict(good_rows(1)[0], id=1234)
    code, _ = cli(*batch_args(rows_file(tmp_path, [row]), tmp_path / "out"))
    assert code == EXIT_OK and (folder(tmp_path / "out") / "1234_bbox.json").is_file()

def test_evaluate_refuses_predictions_made_from_another_prompt_or_image(cli, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes((EXAMPLES / "toy_wide.png").read_bytes())
    rows = [dict(r, bbox=[9, 49, 66, 106]) for r in good_rows(3)]
    rows[2]["image_path"] = "scene.png"
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    rows[0]["prompt"] = "the small circle ."                          # edited after the batch ran
    rows_file(tmp_path, rows)
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())       # replaced after the batch ran
    assert cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={data}")[0] == EXIT_OK
    evaluation = json.loads((folder(out) / "evaluation.json").read_text())
    assert evaluation["status_counts"]["stale"] == 2 and evaluation["status_counts"]["ok"] == 1
    assert evaluation["missing_reasons"]["r0"].startswith("prompt changed since r0_bbox.json was made")
    assert evaluation["missing_reasons"]["r2"].startswith("image file changed")


# ---------------------------------------------------------------- every reader of a JSONL applies the rules

@pytest.mark.parametrize("bad_id", ["../escape", "/tmp/abs-escape", "a/b"])
def test_report_refuses_ids_that_would_write_outside_its_folder(bad_id, cli, tmp_path):
    data, out = rows_file(tmp_path, good_rows(1)), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    rows_file(tmp_path, good_rows(1) + [dict(good_rows(2)[1], id=bad_id)])
    with only_writes_into(tmp_path, out):
        code, log = cli("stage=report", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    assert code == EXIT_NOT_RUN and "is not a plain file name" in error_line(log, f"{data}:2: id: ")
    assert not (folder(out) / "report").exists() and not Path("/tmp/abs-escape").exists()


@pytest.mark.parametrize("box", ["NaN", "Infinity", '"9196"', "[1, 2, 3]", '["1", 2, 3, 4]'])
def test_a_bad_ground_truth_box_in_a_batch_row_is_refused_before_the_model(box, cli, tmp_path, model_loads):
    row = json.dumps(good_rows(2)[1])[:-1] + f', "bbox": {box}}}'
    data, out = rows_file(tmp_path, [good_rows(1)[0], row]), tmp_path / "out"
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out))
    assert code == EXIT_NOT_RUN and "is not 4 finite numbers" in error_line(log, f"{data}:2: bbox: ")
    assert model_loads == []


def test_a_jsonl_that_is_not_utf8_is_one_line_naming_file_and_line(cli, tmp_path, model_loads):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_bytes(json.dumps(good_rows(1)[0]).encode() + b"\n" +
                     json.dumps(dict(good_rows(2)[1], prompt="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out))
        assert code == EXIT_NOT_RUN and "save the file as UTF-8" in error_line(log, f"{data}:2: not UTF-8 text (byte 0xe9")
        code, log = cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
        assert code == EXIT_NOT_RUN and error_line(log, f"{data}:2: not UTF-8 text")
    assert model_loads == []


def test_a_jsonl_with_a_utf8_byte_order_mark_is_read(cli, tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in good_rows(2)).encode())
    code, _ = cli(*batch_args(data, out))
    assert code == EXIT_OK and (folder(out) / "r0_bbox.json").is_file()


@pytest.mark.parametrize("rows, more, message", [
    ([], [], "no rows; nothing to run"),
    (good_rows(2), ["data.process_all=false", "data.start_index=5", "data.end_index=null"], "no rows in [5, 2) of its 2"),
])
def test_a_batch_that_selects_no_row_is_not_a_success(rows, more, message, cli, tmp_path, model_loads):
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    with only_writes_into(tmp_path, out):
        code, log = cli(*batch_args(data, out), *more)
    assert code == EXIT_NOT_RUN and error_line(log, message) and model_loads == []


def test_evaluate_lists_every_bad_row_at_once(cli, tmp_path):
    rows = [dict(r, bbox=[0, 0, 10, 10]) for r in good_rows(4)]
    rows[1]["bbox"], rows[3]["id"] = "9196", "../x"
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    folder(out).mkdir(parents=True)
    with only_writes_into(tmp_path, out):
        code, log = cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    assert code == EXIT_NOT_RUN and "2 problems" in log
    assert error_line(log, f"{data}:2: bbox: ") and error_line(log, f"{data}:4: id: ")


# ---------------------------------------------------------------- one reader, one scorer

def test_report_and_evaluate_read_and_score_the_rows_alike(cli, tmp_path):
    """A stale prediction scores 0 in both; a malformed box is refused by both."""
    rows = [dict(r, bbox=[9, 49, 66, 106]) for r in good_rows(4)]
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    rows[0]["prompt"] = "the small circle ."                          # edited after the batch ran: stale
    rows_file(tmp_path, rows)
    assert cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={data}")[0] == EXIT_OK
    evaluation = json.loads((folder(out) / "evaluation.json").read_text())
    code, log = cli("stage=report", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    assert code == EXIT_OK and evaluation["status_counts"]["stale"] == 1
    assert f"Acc@0.5 {evaluation['acc@0.5']:.3f} on 4" in log and "1 of 4 predictions missing / stale (stale 1)" in log
    report_rows = {r["id"]: r for r in csv.DictReader((folder(out) / "report" / "rows.csv").open())}
    assert report_rows["r0"]["status"] == "stale" and float(report_rows["r0"]["iou"]) == 0.0
    rows[1]["bbox"] = "9196"
    rows_file(tmp_path, rows)
    for stage in ("evaluate", "report"):
        code, log = cli(f"stage={stage}", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
        assert code == EXIT_NOT_RUN and error_line(log, f"{data}:2: bbox: ")


@pytest.mark.parametrize("stage", ["evaluate", "report"])
def test_nothing_to_score_is_not_a_result(stage, cli, tmp_path):
    rows = [dict(r, bbox=[0, 0, 10, 10]) for r in good_rows(3)]
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    folder(out).mkdir(parents=True)
    with only_writes_into(tmp_path, out):
        code, log = cli(f"stage={stage}", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    assert code == EXIT_NOT_RUN and "nothing could be scored" in error_line(log, "3 of 3 predictions missing / stale (missing 3)")
    assert not (folder(out) / "evaluation.json").exists() and not (folder(out) / "report").exists()
