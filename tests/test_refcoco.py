"""lab/refcoco.py on small fixtures in the real formats: REFER pickles + instances.json, lmms-lab parquet, calib."""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from localization_heads import cocomask
from localization_heads.dataio import InputError
from lab.refcoco import convert_parquet, convert_refer, draw_calib, load_refs, main

# --- REFER fixtures: refcoco/refs(unc).p + refcoco/instances.json ---

REFS = [
    {"ref_id": 10, "ann_id": 100, "image_id": 1, "split": "train", "category_id": 1,
     "file_name": "COCO_train2014_000000000001_100.jpg",
     "sentences": [{"sent_id": 1000, "sent": "man on left", "raw": "Man on left", "tokens": ["man", "on", "left"]},
                   {"sent_id": 1001, "sent": "guy in red", "raw": "guy in red", "tokens": ["guy", "in", "red"]}]},
    {"ref_id": 11, "ann_id": 101, "image_id": 2, "split": "val", "category_id": 18,
     "file_name": "COCO_train2014_000000000002_101.jpg",
     "sentences": [{"sent_id": 1002, "sent": "dog", "raw": "Dog!", "tokens": ["dog"]}]},
    {"ref_id": 12, "ann_id": 102, "image_id": 2, "split": "testA", "category_id": 1,
     "file_name": "COCO_train2014_000000000002_102.jpg",
     "sentences": [{"sent_id": 1003, "sent": "woman", "raw": "woman", "tokens": ["woman"]}]},
]

INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 500, "height": 375}],
    "annotations": [{"id": 100, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 1, "area": 1200.0},
                    {"id": 101, "image_id": 2, "bbox": [0.5, 1.5, 100, 50.25], "category_id": 18, "area": 5025.0},
                    {"id": 102, "image_id": 2, "bbox": [200, 100, 50, 60], "category_id": 1, "area": 3000.0}],
    "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
}


def write_refer(root: Path, refs=REFS, instances=INSTANCES) -> tuple[Path, Path]:
    folder = root / "refcoco"
    folder.mkdir(exist_ok=True)
    refs_path = folder / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    inst_path = folder / "instances.json"
    inst_path.write_text(json.dumps(instances))
    return refs_path, inst_path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rectangle_mask(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_refer_val_rows_are_exact(tmp_path):
    refs, inst = write_refer(tmp_path)
    out = tmp_path / "out" / "val.jsonl"
    convert_refer(refs, inst, tmp_path / "coco", "val", out)
    assert read_rows(out) == [{
        "id": "refcoco_val_11_1002", "prompt": "dog",
        "image_path": str(tmp_path / "coco" / "COCO_train2014_000000000002.jpg"),
        "bbox": [0.5, 1.5, 100.5, 51.75], "width": 500, "height": 375, "split": "val",
        "ref_id": 11, "ann_id": 101, "image_id": 2, "sent_id": 1002, "category_id": 18,
        "source": "refer:refs(unc).p"}]


def test_refer_one_row_per_sentence_and_split_all(tmp_path):
    refs, inst = write_refer(tmp_path)
    rows = convert_refer(refs, inst, tmp_path / "coco", "all", tmp_path / "all.jsonl")
    assert [r["id"] for r in rows] == ["refcoco_train_10_1000", "refcoco_train_10_1001",
                                      "refcoco_val_11_1002", "refcoco_testA_12_1003"]
    assert [r["prompt"] for r in rows[:2]] == ["man on left", "guy in red"]
    assert rows[0]["bbox"] == [10.0, 20.0, 40.0, 60.0]
    assert all(isinstance(v, float) for v in rows[0]["bbox"])
    assert read_rows(tmp_path / "all.jsonl") == rows


def test_refer_dataset_prefix_override_and_relative_images(tmp_path, monkeypatch):
    refs, inst = write_refer(tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = convert_refer(refs, inst, "coco/train2014", "testA", tmp_path / "jsonl" / "t.jsonl", dataset="RefCOCO+")
    assert rows[0]["id"] == "RefCOCO+_testA_12_1003"
    # relative to the JSONL's folder, which is how dataio.resolve_path reads it back
    assert rows[0]["image_path"] == os.path.join("..", "coco", "train2014", "COCO_train2014_000000000002.jpg")


def with_segmentations(segmentations: dict) -> dict:
    anns = [dict(a, segmentation=segmentations[a["id"]]) if a["id"] in segmentations else a
            for a in INSTANCES["annotations"]]
    return {**INSTANCES, "annotations": anns}


def test_refer_carries_the_referents_mask_as_rle(tmp_path):
    """Polygons (several parts: their union) and a crowd annotation's uncompressed RLE both become
    compressed RLE of the image's size; an annotation without one gives a row without the key."""
    crowd = rectangle_mask(375, 500, 200, 100, 250, 160)
    instances = with_segmentations({
        101: [[0.5, 1.5, 100.5, 1.5, 100.5, 51.75, 0.5, 51.75], [300, 300, 310, 300, 310, 310, 300, 310]],
        102: {"size": [375, 500], "counts": cocomask.mask_to_counts(crowd)},
    })
    refs, inst = write_refer(tmp_path, instances=instances)
    rows = {r["ref_id"]: r for r in convert_refer(refs, inst, tmp_path, "all", tmp_path / "o.jsonl")}
    assert "segmentation" not in rows[10]
    two_parts = cocomask.decode(rows[11]["segmentation"])
    # the box polygon covers pixel columns 1..100 and rows 2..51 (pycocotools' rounding), plus a 10×10 square
    assert rows[11]["segmentation"]["size"] == [375, 500] and isinstance(rows[11]["segmentation"]["counts"], str)
    assert two_parts.sum() == 100 * 50 + 100
    assert np.array_equal(two_parts, rectangle_mask(375, 500, 1, 2, 101, 52) | rectangle_mask(375, 500, 300, 300, 310, 310))
    assert np.array_equal(cocomask.decode(rows[12]["segmentation"]), crowd)
    assert read_rows(tmp_path / "o.jsonl")[2]["segmentation"] == rows[11]["segmentation"]


def test_refer_bad_segmentation_names_the_annotation(tmp_path):
    refs, inst = write_refer(tmp_path, instances=with_segmentations({101: {"size": [375, 500], "counts": [7]}}))
    with pytest.raises(InputError, match=r"instances\.json: annotation 101: segmentation is not COCO polygons or RLE"):
        convert_refer(refs, inst, tmp_path, "val", tmp_path / "o.jsonl")


def py2_pickle(obj) -> bytes:
    """What Python 2's pickle.dump(obj, f, 2) writes for lists, dicts, str (bytes) and small ints."""
    def enc(o) -> bytes:
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, bytes):
            return b"U" + bytes([len(o)]) + o
        return b"J" + o.to_bytes(4, "little", signed=True)
    return b"\x80\x02" + enc(obj) + b"."


def test_python2_refs_pickle_strings_are_decoded(tmp_path):
    # the published refs(unc).p was written by Python 2: its str must come back as text, UTF-8 included
    py2 = [{b"ref_id": 11, b"ann_id": 101, b"image_id": 2, b"split": b"val",
            b"sentences": [{b"sent_id": 1002, b"sent": "caf\u00e9 table".encode("utf-8")}]}]
    refs, inst = write_refer(tmp_path)
    refs.write_bytes(py2_pickle(py2))
    rows = convert_refer(refs, inst, tmp_path, "val", tmp_path / "o.jsonl")
    assert rows[0]["prompt"] == "caf\u00e9 table" and rows[0]["split"] == "val"


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Hostile(marker)}]))
    with pytest.raises(InputError, match=r"refs\(unc\)\.p: not a plain refs pickle \(refuses to load .*system"):
        load_refs(refs_path)
    assert not marker.exists()


def test_refs_entry_without_sentences(tmp_path):
    bad = [dict(REFS[0]), {k: v for k, v in REFS[1].items() if k != "sentences"}]
    refs, inst = write_refer(tmp_path, refs=bad)
    with pytest.raises(InputError, match=r"refs\(unc\)\.p: entry 1 \(ref_id 11\): missing key 'sentences'"):
        convert_refer(refs, inst, tmp_path, "val", tmp_path / "o.jsonl")


def test_annotation_missing_from_instances(tmp_path):
    bad = {**INSTANCES, "annotations": INSTANCES["annotations"][:1]}
    refs, inst = write_refer(tmp_path, instances=bad)
    with pytest.raises(InputError, match=r"ann_id 101 not found in instances\.json"):
        convert_refer(refs, inst, tmp_path, "val", tmp_path / "o.jsonl")


def test_instances_without_images_key(tmp_path):
    refs, inst = write_refer(tmp_path, instances={"annotations": []})
    with pytest.raises(InputError, match=r"instances\.json: missing key 'images'"):
        convert_refer(refs, inst, tmp_path, "val", tmp_path / "o.jsonl")


def test_unknown_split_lists_the_splits_present(tmp_path):
    refs, inst = write_refer(tmp_path)
    with pytest.raises(InputError, match=r"no refs with split 'testB'; splits present: testA, train, val"):
        convert_refer(refs, inst, tmp_path, "testB", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_refer_and_one_line_error(tmp_path, capsys):
    refs, inst = write_refer(tmp_path)
    out = tmp_path / "cli.jsonl"
    assert main(["refer", "--refs", str(refs), "--instances", str(inst), "--images", str(tmp_path),
                 "--split", "train", "--out", str(out)]) == 0
    assert len(read_rows(out)) == 2
    assert main(["refer", "--refs", str(tmp_path / "nope.p"), "--instances", str(inst), "--images", ".",
                 "--split", "val", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "nope.p" in err


# --- lmms-lab parquet fixtures ---

def png_bytes(size=(7, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def lmms_rows(png: bytes) -> list[dict]:
    image = {"bytes": png, "path": "COCO_train2014_000000000001.jpg"}
    return [
        {"question_id": "q1", "question": "Please carefully observe the area circled in the image.",
         "answer": ["man on left", "guy in red"], "segmentation": [1.0, 1.0, 5.0, 1.0, 5.0, 4.0, 1.0, 4.0],
         "bbox": [10.0, 20.0, 30.0, 40.0], "iscrowd": 0, "file_name": "COCO_train2014_000000000001.jpg",
         "image": image},
        {"question_id": "q2", "question": "Please carefully observe the area circled in the image.",
         "answer": ["chair"], "segmentation": [], "bbox": [1.0, 2.0, 3.0, 4.0], "iscrowd": 0,
         "file_name": "COCO_train2014_000000000001.jpg", "image": image},
    ]


def write_parquet(path: Path, rows: list[dict], drop: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if drop:
        table = table.drop_columns([drop])
    pq.write_table(table, path)
    return path


def test_parquet_explodes_answers_and_saves_images_once(tmp_path):
    png = png_bytes()
    src = write_parquet(tmp_path / "RefCOCO" / "data" / "val-00000-of-00001.parquet", lmms_rows(png))
    out = tmp_path / "conv" / "val.jsonl"
    convert_parquet(src, None, "val", out)
    common = {"image_path": "images/COCO_train2014_000000000001.jpg", "width": 7, "height": 5, "split": "val",
              "source": "parquet:val-00000-of-00001.parquet", "exploded_from": "answer"}
    # the flat polygon (1,1)-(5,4) covers pixels x 1..4, y 1..3; q2's empty one gives no key
    q1_mask = {"segmentation": cocomask.encode(rectangle_mask(5, 7, 1, 1, 5, 4))}
    assert read_rows(out) == [
        {"id": "refcoco_val_q1_0", "prompt": "man on left", **common, "bbox": [10.0, 20.0, 40.0, 60.0],
         "question_id": "q1", "expr_index": 0, "n_expr": 2, **q1_mask},
        {"id": "refcoco_val_q1_1", "prompt": "guy in red", **common, "bbox": [10.0, 20.0, 40.0, 60.0],
         "question_id": "q1", "expr_index": 1, "n_expr": 2, **q1_mask},
        {"id": "refcoco_val_q2_0", "prompt": "chair", **common, "bbox": [1.0, 2.0, 4.0, 6.0],
         "question_id": "q2", "expr_index": 0, "n_expr": 1},
    ]
    saved = list((tmp_path / "conv" / "images").iterdir())
    assert [p.name for p in saved] == ["COCO_train2014_000000000001.jpg"]
    assert saved[0].read_bytes() == png
    # key order as written: the fixed fields come first
    first = json.loads(out.read_text().splitlines()[0])
    assert list(first)[:4] == ["id", "prompt", "image_path", "bbox"]


def test_parquet_with_images_dir_points_there(tmp_path):
    src = write_parquet(tmp_path / "p.parquet", lmms_rows(png_bytes((9, 4))))
    rows = convert_parquet(src, tmp_path / "coco", "testA", tmp_path / "o.jsonl", dataset="refcoco")
    assert rows[0]["image_path"] == str(tmp_path / "coco" / "COCO_train2014_000000000001.jpg")
    assert (rows[0]["width"], rows[0]["height"]) == (9, 4)
    assert not (tmp_path / "images").exists()


def test_parquet_folder_takes_the_split_shards_only(tmp_path):
    folder = tmp_path / "RefCOCOg" / "data"
    write_parquet(folder / "val-00000-of-00001.parquet", lmms_rows(png_bytes())[:1])
    write_parquet(folder / "test-00000-of-00001.parquet", lmms_rows(png_bytes()))
    rows = convert_parquet(folder, None, "test", tmp_path / "o.jsonl")
    assert [r["id"] for r in rows] == ["refcocog_test_q1_0", "refcocog_test_q1_1", "refcocog_test_q2_0"]
    with pytest.raises(InputError, match="no shards for split 'testB'; splits present: test, val"):
        convert_parquet(folder, None, "testB", tmp_path / "o.jsonl")
    with pytest.raises(InputError, match="file name says split 'val'"):
        convert_parquet(folder / "val-00000-of-00001.parquet", None, "test", tmp_path / "o.jsonl")


def test_parquet_missing_bbox_column(tmp_path):
    src = write_parquet(tmp_path / "p.parquet", lmms_rows(png_bytes()), drop="bbox")
    with pytest.raises(InputError, match=r"p\.parquet: missing column 'bbox'"):
        convert_parquet(src, None, "val", tmp_path / "o.jsonl")


def test_parquet_bad_bbox_names_row(tmp_path):
    rows = lmms_rows(png_bytes())
    rows[1]["bbox"] = [1.0, 2.0, -3.0, 4.0]
    src = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(InputError, match=r"p\.parquet: row 1 \(question_id q2\): bbox must be"):
        convert_parquet(src, None, "val", tmp_path / "o.jsonl")


# --- calib ---

def write_split_jsonl(path: Path, splits: list[str]) -> Path:
    rows = [{"id": f"r{i}", "prompt": "x", "image_path": "imgs/a.jpg", "bbox": [0, 0, 1, 1], "split": s}
            for i, s in enumerate(splits)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_calib_is_reproducible_by_seed(tmp_path):
    src = write_split_jsonl(tmp_path / "train.jsonl", ["train"] * 50)
    a = draw_calib(src, 10, 0, tmp_path / "a.jsonl")
    b = draw_calib(src, 10, 0, tmp_path / "b.jsonl")
    c = draw_calib(src, 10, 1, tmp_path / "c.jsonl")
    assert a == b and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert [r["id"] for r in a] != [r["id"] for r in c]
    ids = [int(r["id"][1:]) for r in a]
    assert len(set(ids)) == 10 and ids == sorted(ids)


def test_calib_refuses_non_train_rows(tmp_path):
    src = write_split_jsonl(tmp_path / "mixed.jsonl", ["train", "val", "train"])
    with pytest.raises(InputError, match=r"mixed\.jsonl:2: row 'r1' has split 'val'.*--allow-non-train"):
        draw_calib(src, 3, 0, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    rows = draw_calib(src, 3, 0, tmp_path / "o.jsonl", allow_non_train=True)
    assert [r["split"] for r in rows] == ["train", "val", "train"]


def test_calib_rebases_relative_image_paths(tmp_path):
    src = write_split_jsonl(tmp_path / "data" / "train.jsonl", ["train"])
    (tmp_path / "data" / "imgs").mkdir()
    (tmp_path / "data" / "imgs" / "a.jpg").write_bytes(b"")
    rows = draw_calib(src, 1, 0, tmp_path / "calib" / "c.jsonl")
    assert rows[0]["image_path"] == os.path.join("..", "data", "imgs", "a.jpg")


def test_calib_n_larger_than_file(tmp_path):
    src = write_split_jsonl(tmp_path / "t.jsonl", ["train"] * 3)
    with pytest.raises(InputError, match="asked for --n 5 rows but the file has 3"):
        draw_calib(src, 5, 0, tmp_path / "o.jsonl")


def test_cli_calib(tmp_path):
    src = write_split_jsonl(tmp_path / "t.jsonl", ["train"] * 5)
    out = tmp_path / "c.jsonl"
    assert main(["calib", "--in", str(src), "--n", "2", "--seed", "3", "--out", str(out)]) == 0
    assert len(read_rows(out)) == 2
