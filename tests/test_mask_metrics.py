"""stage=evaluate's referring-segmentation metrics: cIoU (Σ intersection / Σ union) and mask mIoU of
<id>_mask.png against the JSONL's `segmentation`, hand-computed on 10×10 fixtures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from localization_heads import cocomask
from localization_heads.dataio import InputError
from localization_heads.evaluate import evaluate, format_table


def square(x0, y0, x1, y1, size=10):
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_prediction(pred, item_id, mask):
    (pred / f"{item_id}_bbox.json").write_text(json.dumps({"bbox_xyxy": [0, 0, 1, 1], "image_size": [10, 10]}))
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(pred / f"{item_id}_mask.png")


def row(item_id, truth):
    out = {"id": item_id, "bbox": [0, 0, 1, 1], "width": 10, "height": 10}
    if truth is not None:
        out["segmentation"] = cocomask.encode(truth)
    return out


@pytest.fixture
def run(tmp_path):
    """Ground truth and prediction per row, with the intersection and union each must give."""
    empty = np.zeros((10, 10), dtype=bool)
    cases = {                       # truth, prediction (None: no mask file), I, U
        "disjoint": (square(0, 0, 4, 4), square(6, 6, 10, 10), 0, 32),
        "nested": (square(0, 0, 6, 6), square(0, 0, 3, 3), 9, 36),
        "empty_pred": (square(0, 0, 4, 4), empty, 0, 16),
        "empty_truth_found": (empty, empty, 0, 0),
        "empty_truth_false_alarm": (empty, square(0, 0, 5, 1), 0, 5),
        "no_mask_file": (square(2, 2, 4, 4), None, 0, 4),
    }
    pred = tmp_path / "pred"
    pred.mkdir()
    rows = [row(k, truth) for k, (truth, _, _, _) in cases.items()]
    for k, (_, mask, _, _) in cases.items():
        write_prediction(pred, k, mask)
    rows.append(row("never_ran", square(0, 0, 2, 5)))          # no <id>_bbox.json at all: I 0, U 10
    rows.append(row("box_only", None))                          # no segmentation: box metrics only
    write_prediction(pred, "box_only", square(0, 0, 1, 1))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, pred


def test_ciou_is_total_intersection_over_total_union(run):
    data, pred = run
    s = evaluate(data, pred)
    assert s["n"] == 8 and s["mask_n"] == 7
    assert s["ciou"] == pytest.approx((0 + 9 + 0 + 0 + 0 + 0 + 0) / (32 + 36 + 16 + 0 + 5 + 4 + 10))


def test_mask_miou_averages_per_row_ious(run):
    data, pred = run
    s = evaluate(data, pred)
    # disjoint 0, nested 9/36, empty prediction 0, empty truth found 1, false alarm 0, no file 0, never ran 0
    assert s["mask_miou"] == pytest.approx((0 + 0.25 + 0 + 1 + 0 + 0 + 0) / 7)
    assert s["mask_status_counts"] == {"ok": 5, "missing": 2, "failed": 0, "stale": 0}
    assert s["mask_missing_ids"] == ["no_mask_file", "never_ran"]


def test_per_row_mask_scores_in_the_csv(run):
    data, pred = run
    evaluate(data, pred)
    with (pred / "evaluation_rows.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert (rows["nested"]["mask_inter"], rows["nested"]["mask_union"]) == ("9", "36")
    assert float(rows["nested"]["mask_iou"]) == pytest.approx(0.25)
    assert rows["no_mask_file"]["mask_status"] == "missing" and rows["no_mask_file"]["mask_union"] == "4"
    assert rows["box_only"]["mask_iou"] == "" and rows["box_only"]["status"] == "ok"
    assert json.loads((pred / "evaluation.json").read_text())["ciou"] == pytest.approx(9 / 103)


def test_mask_of_another_size_counts_as_empty(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    write_prediction(pred, "a", np.ones((20, 20), dtype=bool))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row("a", square(0, 0, 5, 5))) + "\n")
    s = evaluate(data, pred)
    assert s["ciou"] == 0.0 and s["mask_status_counts"]["failed"] == 1
    assert "20x20" in s["mask_missing_reasons"]["a"]


def test_polygon_ground_truth_scores_like_its_rle(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    write_prediction(pred, "a", square(0, 0, 3, 3))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(dict(row("a", None), segmentation=[[0, 0, 6, 0, 6, 6, 0, 6]])) + "\n")
    assert evaluate(data, pred)["ciou"] == pytest.approx(9 / 36)


def test_without_segmentations_there_are_no_mask_scores(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row("a", None)) + "\n")
    write_prediction(pred, "a", None)
    s = evaluate(data, pred)
    assert s["mask_n"] == 0 and s["ciou"] is None and s["mask_miou"] is None
    assert format_table([dict(s, split="d")]).splitlines()[0].split() == ["split", "n", "Acc@0.5", "mIoU"]


def test_table_prints_mask_metrics_beside_the_box_metrics():
    table = format_table([{"split": "val", "n": 10834, "acc@0.5": 0.8, "miou": 0.7, "mask_n": 10834,
                           "ciou": 0.742, "mask_miou": 0.7}])
    lines = table.splitlines()
    assert lines[0].split() == ["split", "n", "Acc@0.5", "mIoU", "n_mask", "cIoU", "mask-mIoU"]
    assert lines[1].split() == ["val", "10834", "80.00", "70.00", "10834", "74.20", "70.00"]
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("bad, message", [
    ({"size": [10], "counts": "0"}, "COCO RLE"),
    ({"size": [5, 5], "counts": "0"}, r"size \[H, W\] = \[5, 5\]"),
    ("polygon", "non-empty list"),
])
def test_malformed_segmentation_names_file_line_and_key(tmp_path, bad, message):
    (tmp_path / "pred").mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row("ok", None)) + "\n" + json.dumps(dict(row("bad", None), segmentation=bad)) + "\n")
    with pytest.raises(InputError, match=rf"d\.jsonl:2: key 'segmentation'.*{message}"):
        evaluate(data, tmp_path / "pred")


def test_undecodable_segmentation_names_file_line_and_key(tmp_path):
    (tmp_path / "pred").mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(dict(row("a", None), segmentation={"size": [10, 10], "counts": [3, 2]})) + "\n")
    with pytest.raises(InputError, match=r"d\.jsonl:1: key 'segmentation': RLE counts sum to 5"):
        evaluate(data, tmp_path / "pred")


def test_a_stale_prediction_scores_an_empty_mask(tmp_path):
    """A prediction made from another prompt than the JSONL row's is stale: its mask, however good,
    counts as empty (I 0, U = the truth's area), like its box."""
    pred = tmp_path / "pred"
    pred.mkdir()
    truth = square(0, 0, 4, 4)
    (pred / "a_bbox.json").write_text(json.dumps({"bbox_xyxy": [0, 0, 4, 4], "image_size": [10, 10],
                                                  "query": "the old prompt"}))
    Image.fromarray(truth.astype(np.uint8) * 255, mode="L").save(pred / "a_mask.png")
    data = tmp_path / "data.jsonl"
    write_prediction(pred, "b", None)   # a current prediction beside it: there is something to score
    data.write_text(json.dumps(dict(row("a", truth), prompt="the new prompt", image_path="a.png")) + "\n"
                    + json.dumps(row("b", None)) + "\n")
    s = evaluate(data, pred)
    assert s["status_counts"]["stale"] == 1
    assert s["mask_status_counts"]["stale"] == 1 and s["ciou"] == 0.0
