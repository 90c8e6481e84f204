"""SAM refinement (refine.py) with a tiny random SAM written to disk and loaded back through
from_pretrained: the mask equals Hugging Face's plain SAM call, embeddings are batched and cached,
and stage=pipeline / stage=batch write the refined mask beside the heads' coarse one. A random SAM
segments nothing meaningful; these tests check the plumbing, shapes and bookkeeping, not mask quality."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from localization_heads import bbox
from localization_heads import evaluate
from localization_heads import cli as pipeline
from localization_heads import refine
from localization_heads.config import MaskSettings, Settings
from localization_heads.images import load_image
from localization_heads.dataio import InputError
from tests import tiny_sam
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    return tiny_sam.write_sam_checkpoint(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="module")
def refiner(sam_checkpoint):
    return refine.SamRefiner.load(str(sam_checkpoint), torch.device("cpu"))


def run_stage(*overrides):
    return pipeline.run(pipeline.compose(*overrides))


def settings_of(*overrides) -> Settings:
    return Settings.from_config(pipeline.compose(*overrides))


def common(checkpoint, sam_checkpoint, out):
    return ["model=toy", f"model.name={checkpoint}", f"data.output_dir={out}", "data.num_workers=0", "logic=paper",
            "logic.mask.refine=sam", f"logic.mask.sam_model={sam_checkpoint}"]


def read_mask(path):
    return np.asarray(Image.open(path)) > 0


# --- the refiner ---

@pytest.mark.parametrize("point", [None, [30.5, 20.5]])
def test_segment_equals_the_plain_hugging_face_call(refiner, images, point):
    """Cached embeddings and our prompt scaling give exactly what processor → model → post_process gives."""
    image, box = load_image(images["wide"]), [10.0, 20.0, 41.0, 51.0]
    mask, score = refiner.segment(str(images["wide"]), box, point)
    kwargs = {"input_boxes": [[box]]}
    if point:
        kwargs.update(input_points=[[[point]]], input_labels=[[[1]]])
    inputs = refiner.processor(images=[image], return_tensors="pt", **kwargs)
    inputs = {k: v.float() if k.startswith("input_") and k != "input_labels" else v for k, v in inputs.items()}
    with torch.no_grad():
        out = refiner.model(**inputs, multimask_output=False)
    expected = refiner.processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                    inputs["reshaped_input_sizes"])[0][0, 0].numpy()
    assert mask.shape == (64, 96) and mask.dtype == bool          # the image's resolution, [H, W]
    assert np.array_equal(mask, expected)
    assert score == pytest.approx(float(out.iou_scores[0, 0, 0]), abs=1e-6)


def test_images_encoded_together_equal_images_encoded_alone(sam_checkpoint, images):
    together = refine.SamRefiner.load(str(sam_checkpoint), torch.device("cpu"))
    alone = refine.SamRefiner.load(str(sam_checkpoint), torch.device("cpu"))
    files = [str(images["wide"]), str(images["tall"])]
    together.encode([(f, load_image(f)) for f in files])
    for f in files:
        alone.encode([(f, load_image(f))])
        torch.testing.assert_close(together._cache[f].features, alone._cache[f].features, atol=1e-5, rtol=1e-5)
        assert together._cache[f].original_size == alone._cache[f].original_size


def test_an_image_is_encoded_once_and_the_cache_is_bounded(sam_checkpoint, images, monkeypatch):
    small = refine.SamRefiner.load(str(sam_checkpoint), torch.device("cpu"), capacity=2)
    batches = []
    encoder = small.model.get_image_embeddings
    monkeypatch.setattr(small.model, "get_image_embeddings", lambda px: batches.append(len(px)) or encoder(px))
    wide, tall, square = (str(images[k]) for k in ("wide", "tall", "square"))
    small.encode([(wide, load_image(wide)), (tall, load_image(tall)), (wide, load_image(wide))])
    small.segment(wide, [0, 0, 10, 10])
    small.segment(tall, [0, 0, 10, 10])
    assert batches == [2]                       # one call, each distinct image once, rows reuse it
    small.segment(square, [0, 0, 10, 10])       # a third image evicts the least recently used (wide)
    small.segment(wide, [0, 0, 10, 10])
    assert batches == [2, 1, 1]


def test_heat_peak_is_the_centre_of_the_highest_seen_pixel():
    heat = np.zeros((4, 6))
    heat[2, 5] = 3.0
    heat[0, 0] = np.nan
    assert refine.heat_peak(heat) == [5.5, 2.5]


def test_no_box_means_no_prompt_and_the_empty_coarse_mask_stays(refiner, images):
    class Untouchable:
        name = "sam"

        def segment(self, *args):
            raise AssertionError("SAM must not run without a box")

    loc = {"mask": np.zeros((64, 96), dtype=bool), "heat": np.zeros((64, 96)), "bbox_xyxy": None}
    mask, info = refine.refine(Untouchable(), loc, {"image_file": str(images["wide"])}, MaskSettings(sam_point=True))
    assert mask is loc["mask"] and info["status"] == "no_box" and info["score"] is None


def test_an_image_whose_size_changed_since_collection_is_refused(refiner, images):
    loc = {"mask": np.zeros((10, 10), dtype=bool), "heat": np.zeros((10, 10)), "bbox_xyxy": [0, 0, 5, 5]}
    with pytest.raises(InputError, match="96x64 px now but was 10x10"):
        refine.refine(refiner, loc, {"image_file": str(images["wide"])}, MaskSettings(sam_point=False))


def test_unknown_refiner_and_non_sam_checkpoints_are_refused(hf_checkpoint):
    with pytest.raises(InputError, match="logic.mask.refine='crf' is unknown"):
        refine.load_refiner(settings_of("logic.mask.refine=crf"))
    with pytest.raises(InputError, match="is a 'llava' checkpoint"):
        refine.load_refiner(settings_of("model=toy", "logic.mask.refine=sam", f"logic.mask.sam_model={hf_checkpoint}"))
    assert refine.load_refiner(settings_of()) is None        # the default: no refinement, nothing loaded


# --- the stages ---

def test_pipeline_writes_sams_mask_and_keeps_the_heads_mask_and_box(hf_checkpoint, sam_checkpoint, refiner, images,
                                                                    tmp_path):
    item = [f"data.image_file={images['wide']}", "data.query=the red circle ."]
    plain = run_stage("stage=pipeline", *common(hf_checkpoint, sam_checkpoint, tmp_path / "plain")[:-2], *item)
    summary = run_stage("stage=pipeline", *common(hf_checkpoint, sam_checkpoint, tmp_path / "sam"), *item)
    folder, plain_folder = tmp_path / "sam" / hf_checkpoint.name, tmp_path / "plain" / hf_checkpoint.name
    assert summary["bbox_xyxy"] == plain["bbox_xyxy"] is not None      # REC keeps the heads' box
    coarse, mask = read_mask(folder / "sample_mask_coarse.png"), read_mask(folder / "sample_mask.png")
    assert np.array_equal(coarse, read_mask(plain_folder / "sample_mask.png"))
    expected, score = refiner.segment(str(images["wide"]), summary["bbox_xyxy"])
    assert mask.shape == (64, 96) and np.array_equal(mask, expected)
    written = json.loads((folder / "sample_bbox.json").read_text())["refinement"]
    assert written == {"method": "sam", "model": str(sam_checkpoint), "prompt": "box", "point_xy": None,
                       "status": "ok", "score": pytest.approx(score, abs=1e-6),
                       "sam_bbox_xyxy": bbox.box_from_mask(expected)}
    assert plain["refinement"] is None and not (plain_folder / "sample_mask_coarse.png").exists()


def test_pipeline_with_the_peak_point_and_an_unrefined_rerun(hf_checkpoint, sam_checkpoint, images, tmp_path):
    item = [f"data.image_file={images['tall']}", "data.query=a cat"]
    summary = run_stage("stage=pipeline", *common(hf_checkpoint, sam_checkpoint, tmp_path), *item,
                        "logic.mask.sam_point=true")
    x, y = summary["refinement"]["point_xy"]
    assert summary["refinement"]["prompt"] == "box+point" and 0 < x < 48 and 0 < y < 80
    folder = tmp_path / hf_checkpoint.name
    assert (folder / "sample_mask_coarse.png").is_file()
    run_stage("stage=pipeline", *common(hf_checkpoint, sam_checkpoint, tmp_path)[:-2], *item)
    assert not (folder / "sample_mask_coarse.png").exists()          # no stale coarse mask beside a coarse one


def batch_rows(tmp_path, images):
    return write_jsonl(tmp_path / "data.jsonl", [
        {"id": "w1", "prompt": "the red circle .", "image_path": str(images["wide"])},
        {"id": "w2", "prompt": "a cat", "image_path": str(images["wide"])},
        {"id": "t", "prompt": "the small dog", "image_path": str(images["tall"])},
        {"id": "gone", "prompt": "a bird", "image_path": str(tmp_path / "missing.png")},
    ])


def test_batch_encodes_each_batchs_images_once_and_writes_masks(hf_checkpoint, sam_checkpoint, images, tmp_path,
                                                                 monkeypatch):
    encoded = []
    original = refine.SamRefiner.encode
    monkeypatch.setattr(refine.SamRefiner, "encode",
                        lambda self, items: encoded.append(sorted(k for k, _ in items)) or original(self, items))
    data = batch_rows(tmp_path, images)
    result = run_stage("stage=batch", *common(hf_checkpoint, sam_checkpoint, tmp_path), f"data.data_file={data}",
                       "data.process_all=true", "data.batch_size=4")
    assert result["written"] == 3 and result["failed"] == 1           # the missing image is that row's failure
    assert encoded == [sorted([str(images["wide"]), str(images["tall"]), str(images["wide"])])]
    folder = tmp_path / hf_checkpoint.name
    for item_id, size in [("w1", (64, 96)), ("w2", (64, 96)), ("t", (80, 48))]:
        assert read_mask(folder / f"{item_id}_mask.png").shape == size
        assert read_mask(folder / f"{item_id}_mask_coarse.png").shape == size
        assert json.loads((folder / f"{item_id}_bbox.json").read_text())["refinement"]["method"] == "sam"


def test_a_sam_failure_is_that_rows_failure(hf_checkpoint, sam_checkpoint, images, tmp_path, monkeypatch):
    original = refine.SamRefiner.segment

    def segment(self, image_file, box, point=None):
        if image_file == str(images["tall"]):
            raise RuntimeError("SAM blew up")
        return original(self, image_file, box, point)

    monkeypatch.setattr(refine.SamRefiner, "segment", segment)
    data = batch_rows(tmp_path, images)
    result = run_stage("stage=batch", *common(hf_checkpoint, sam_checkpoint, tmp_path), f"data.data_file={data}",
                       "data.process_all=true", "data.batch_size=4")
    folder = tmp_path / hf_checkpoint.name
    failures = [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]
    assert result["written"] == 2 and {f["id"] for f in failures} == {"t", "gone"}
    assert "SAM blew up" in next(f["error"] for f in failures if f["id"] == "t")
    assert (folder / "w1_bbox.json").is_file() and not (folder / "t_bbox.json").exists()


def test_refined_batch_scores_with_ciou(hf_checkpoint, sam_checkpoint, images, tmp_path):
    """The whole RES path on a tiny scale: batch with SAM, then stage=evaluate reads the refined masks."""
    from localization_heads.cocomask import encode

    data = batch_rows(tmp_path, images)
    run_stage("stage=batch", *common(hf_checkpoint, sam_checkpoint, tmp_path), f"data.data_file={data}",
              "data.process_all=true", "data.batch_size=2")
    folder = tmp_path / hf_checkpoint.name
    truth = np.zeros((64, 96), dtype=bool)
    truth[20:50, 10:40] = True
    rows = [{"id": "w1", "bbox": [10, 20, 40, 50], "width": 96, "height": 64, "segmentation": encode(truth)},
            {"id": "gone", "bbox": [0, 0, 5, 5], "width": 96, "height": 64, "segmentation": encode(truth)}]
    gt = write_jsonl(tmp_path / "gt.jsonl", rows)
    summary = evaluate.evaluate(gt, folder)
    pred = read_mask(folder / "w1_mask.png")
    inter, union = (pred & truth).sum(), (pred | truth).sum()
    assert summary["ciou"] == pytest.approx(inter / (union + truth.sum()))   # the failed row adds its truth to the union
    assert summary["mask_status_counts"] == {"ok": 1, "missing": 0, "failed": 1, "stale": 0}
