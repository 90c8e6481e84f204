"""JSONL rows: every bad row of the file listed at once (exit 2) by every stage that reads it;
the ground truth read and scored one way by evaluate and report."""

from __future__ import annotations

import json

import pytest

from tests.cli_runs import (EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, model_loads, rows_file, good_rows, batch_args,
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
