"""evaluate.py as a specification: IoU on hand-made boxes, and scores on a tiny prediction folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from localization_heads.dataio import InputError
from localization_heads.evaluate import evaluate, format_table, iou_xyxy


# --- IoU: continuous coordinates, half-open boxes, area = (x1-x0)(y1-y0) ---

def test_identical_boxes_have_iou_one():
    assert iou_xyxy([10, 20, 30, 60], [10, 20, 30, 60]) == 1.0


def test_boxes_touching_at_an_edge_do_not_overlap():
    # half-open: [0,10) and [10,20) share no pixel
    assert iou_xyxy([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert iou_xyxy([0, 0, 10, 10], [0, 10, 10, 20]) == 0.0
    assert iou_xyxy([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0


def test_disjoint_boxes_have_iou_zero():
    assert iou_xyxy([0, 0, 5, 5], [50, 50, 60, 60]) == 0.0


def test_nested_box_iou_is_area_ratio():
    # 10x10 inside 20x20: 100 / 400
    assert iou_xyxy([5, 5, 15, 15], [0, 0, 20, 20]) == 0.25


def test_half_overlap_hand_computed():
    # two 10x10 boxes shifted by 5 in x: inter 5*10 = 50, union 100 + 100 - 50 = 150
    assert iou_xyxy([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


def test_fractional_coordinates_are_continuous():
    # inter 0.5*1 = 0.5, union 1 + 1 - 0.5 = 1.5
    assert iou_xyxy([0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0]) == pytest.approx(1 / 3)


def test_iou_is_symmetric():
    a, b = [0, 0, 10, 10], [3, 4, 17, 9]
    assert iou_xyxy(a, b) == iou_xyxy(b, a)


@pytest.mark.parametrize("degenerate", [[5, 5, 5, 15], [5, 5, 15, 5], [10, 10, 0, 0]])
def test_degenerate_box_has_iou_zero(degenerate):
    assert iou_xyxy(degenerate, [0, 0, 20, 20]) == 0.0
    assert iou_xyxy([0, 0, 20, 20], degenerate) == 0.0
    assert iou_xyxy(degenerate, degenerate) == 0.0


# --- evaluate(): every ground-truth row counts ---

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pred(pred_dir: Path, item_id: str, box, size=(100, 100)) -> None:
    (pred_dir / f"{item_id}_bbox.json").write_text(
        json.dumps({"bbox_xyxy": box, "image_size": list(size)}), encoding="utf-8")


@pytest.fixture
def tiny_run(tmp_path):
    gt = [
        {"id": "hit", "bbox": [0, 0, 10, 10], "width": 100, "height": 100},
        {"id": "miss", "bbox": [0, 0, 10, 10], "width": 100, "height": 100},
        {"id": "gone", "bbox": [0, 0, 10, 10], "width": 100, "height": 100},
        {"id": "nobox", "bbox": [0, 0, 10, 10], "width": 100, "height": 100},
    ]
    data = write_jsonl(tmp_path / "data.jsonl", gt)
    pred = tmp_path / "pred"
    pred.mkdir()
    write_pred(pred, "hit", [0, 0, 10, 8])      # IoU 0.8
    write_pred(pred, "miss", [5, 0, 15, 10])    # IoU 1/3
    write_pred(pred, "nobox", None)
    (pred / "failures.jsonl").write_text(json.dumps({"id": "gone", "error": "CUDA OOM"}) + "\n")
    return data, pred


def test_evaluate_counts_missing_and_null_boxes_as_zero(tiny_run):
    data, pred = tiny_run
    s = evaluate(data, pred)
    assert s["n"] == 4
    assert s["acc@0.25"] == 0.5   # hit (0.8) and miss (0.333)
    assert s["acc@0.5"] == 0.25   # hit only
    assert s["acc@0.75"] == 0.25
    assert s["miou"] == pytest.approx((0.8 + 1 / 3) / 4)
    assert s["missing"] == 2
    assert s["missing_ids"] == ["gone", "nobox"]
    assert s["missing_reasons"]["gone"] == "CUDA OOM"
    assert s["status_counts"] == {"ok": 2, "missing": 0, "failed": 1, "no_box": 1, "stale": 0}
    assert s["data_file"] == str(data) and s["pred_dir"] == str(pred)


def test_evaluate_writes_json_and_per_row_csv(tiny_run):
    data, pred = tiny_run
    s = evaluate(data, pred)
    assert json.loads((pred / "evaluation.json").read_text()) == s
    with (pred / "evaluation_rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["hit@0.5"], r["status"]) for r in rows] == [
        ("hit", "1", "ok"), ("miss", "0", "ok"), ("gone", "0", "failed"), ("nobox", "0", "no_box")]
    assert float(rows[0]["iou"]) == pytest.approx(0.8)


def test_evaluate_out_dir_and_plain_missing(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "bbox": [0, 0, 4, 4]}, {"id": "b", "bbox": [0, 0, 4, 4]}])
    pred = tmp_path / "pred"
    pred.mkdir()
    write_pred(pred, "b", [0, 0, 4, 4])
    s = evaluate(data, pred, out_dir=tmp_path / "scores")
    assert s["status_counts"]["missing"] == 1 and s["miou"] == 0.5
    assert (tmp_path / "scores" / "evaluation.json").is_file()
    assert not (pred / "evaluation.json").exists()


def test_unreadable_prediction_counts_as_failed(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "bbox": [0, 0, 4, 4]}, {"id": "b", "bbox": [0, 0, 4, 4]}])
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a_bbox.json").write_text('{"bbox_xyxy": [0, 0,')
    write_pred(pred, "b", [0, 0, 4, 4])
    s = evaluate(data, pred)
    assert s["n"] == 2 and s["missing_ids"] == ["a"] and s["status_counts"]["failed"] == 1
    assert "unreadable" in s["missing_reasons"]["a"]


def test_image_size_mismatch_is_flagged(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "bbox": [0, 0, 4, 4], "width": 640, "height": 480}])
    pred = tmp_path / "pred"
    pred.mkdir()
    write_pred(pred, "a", [0, 0, 4, 4], size=(336, 336))
    s = evaluate(data, pred)
    assert s["size_mismatch_ids"] == ["a"] and s["miou"] == 1.0


@pytest.mark.parametrize("bad", [[0, 0, 10], [0, 0, "10", 10], [10, 0, 0, 10], [0, 0, float("inf"), 1], None])
def test_bad_ground_truth_bbox_names_file_line_and_key(tmp_path, bad):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "ok", "bbox": [0, 0, 1, 1]}) + "\n"
                    + json.dumps({"id": "bad", "bbox": bad}).replace("Infinity", "1e999") + "\n")
    pred = tmp_path / "pred"
    pred.mkdir()
    with pytest.raises(InputError, match=r"d\.jsonl:2: bbox: "):
        evaluate(data, pred)


def test_duplicate_ids_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "bbox": [0, 0, 1, 1]}] * 2)
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError, match=r"d\.jsonl:2: id: duplicate id 'a'"):
        evaluate(data, tmp_path / "pred")


def test_format_table_is_fixed_width():
    table = format_table([{"split": "val", "n": 10834, "acc@0.5": 0.5612, "miou": 0.483},
                          {"split": "testA", "n": 5657, "acc@0.5": 0.6}])
    lines = table.splitlines()
    assert lines[0].split() == ["split", "n", "Acc@0.5", "mIoU"]
    assert lines[1].split() == ["val", "10834", "56.12", "48.30"]
    assert lines[2].split() == ["testA", "5657", "60.00", "-"]
    assert len({len(line) for line in lines}) == 1


def test_nothing_to_score_is_an_input_error_not_a_zero(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "bbox": [0, 0, 4, 4]}, {"id": "b", "bbox": [0, 0, 4, 4]}])
    pred = tmp_path / "pred"
    pred.mkdir()
    with pytest.raises(InputError, match=r"2 of 2 predictions missing / stale \(missing 2\)"):
        evaluate(data, pred)
    assert not (pred / "evaluation.json").exists()
