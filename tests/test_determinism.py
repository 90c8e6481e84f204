"""The same attention file gives the same heads and boxes, whichever stage computes them: stage=batch
analyses exactly the values it saves (cast to data.attn_dtype), so stage=analyze / visualize, a resume
and an interrupted-then-resumed batch write byte-identical files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from localization_heads import cli as pipeline
from tests.conftest import write_jsonl

QUERIES = {"wide": "the red circle on the left .", "tall": "a small cat", "square": "the blue square"}


def run_stage(*overrides: str):
    return pipeline.run(pipeline.compose(*overrides))


def base(checkpoint: Path, out: Path, logic: str) -> list[str]:
    return ["model=toy", f"model.name={checkpoint}", f"data.output_dir={out}", "data.num_workers=0",
            f"logic={logic}", "data.visualize_batch=true"]


def data_file(images, tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", [{"id": k, "prompt": q, "image_path": str(images[k])}
                                                 for k, q in QUERIES.items()])


def content(path: Path):
    """A file's bytes; for <id>_bbox.json its JSON without `row_files`, the size and modification
    time of the row's other files (what resume checks), which differ between two writes by nature."""
    if path.name.endswith("_bbox.json"):
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "row_files"}
    return path.read_bytes()


def files(folder: Path) -> dict[str, object]:
    return {p.name: content(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("logic", ["selection_v1", "paper"])
def test_batch_then_analyze_visualize_and_resume_write_identical_files(logic, hf_checkpoint, images, tmp_path):
    """Outputs of stage=batch are reproduced bit for bit by stage=analyze and stage=visualize on the
    saved <id>.pkl, and by a resume that redoes the box from it."""
    args = base(hf_checkpoint, tmp_path, logic)
    run_stage("stage=batch", *args, f"data.data_file={data_file(images, tmp_path)}", "data.process_all=true")
    folder = tmp_path / hf_checkpoint.name
    batch = files(folder)
    figure = "_top5.png" if logic == "selection_v1" else "_top3.png"
    for item_id in QUERIES:
        attention = f"data.attention_file={folder / f'{item_id}.pkl'}"
        run_stage("stage=analyze", *args, attention)
        assert content(folder / f"{item_id}_analysis.pkl") == batch[f"{item_id}_analysis.pkl"]
        (folder / f"{item_id}_analysis.pkl").unlink()             # visualize analyses afresh
        run_stage("stage=visualize", *args, attention)
        for suffix in ("_analysis.pkl", "_bbox.json", "_mask.png", figure):
            assert content(folder / f"{item_id}{suffix}") == batch[f"{item_id}{suffix}"], suffix
    for item_id in QUERIES:                                       # resume: box redone from the saved file
        (folder / f"{item_id}_bbox.json").unlink()
    result = run_stage("stage=batch", *args, f"data.data_file={data_file(images, tmp_path)}", "data.process_all=true")
    assert result["written"] == len(QUERIES)
    assert files(folder) == batch


def test_interrupted_batch_resumes_to_the_files_of_an_uninterrupted_run(hf_checkpoint, images, tmp_path):
    """Rows 0–1 first, one of them cut off after its attention was saved (no box yet), then the
    whole file with resume: every file equals that of one uninterrupted run. Batch size 1, so both
    runs put each row through the model alone (left padding is collection, not analysis)."""
    data = data_file(images, tmp_path)
    whole = base(hf_checkpoint, tmp_path / "whole", "selection_v1")
    run_stage("stage=batch", *whole, f"data.data_file={data}", "data.process_all=true")
    parts = base(hf_checkpoint, tmp_path / "parts", "selection_v1")
    run_stage("stage=batch", *parts, f"data.data_file={data}", "data.end_index=2")
    folder = tmp_path / "parts" / hf_checkpoint.name
    assert {p.name for p in folder.glob("*_bbox.json")} == {"wide_bbox.json", "tall_bbox.json"}
    (folder / "tall_bbox.json").unlink()
    result = run_stage("stage=batch", *parts, f"data.data_file={data}", "data.process_all=true")
    assert result["written"] == 2                                 # tall re-boxed, square collected
    assert files(folder) == files(tmp_path / "whole" / hf_checkpoint.name)


def test_no_head_passing_still_gives_an_answer(hf_checkpoint, images, tmp_path):
    """The tiny model (3 layers) under min_layer=3 has no eligible head: the analysis falls back to
    the head with the largest attention sum, the figure is drawn, and _bbox.json says why."""
    args = base(hf_checkpoint, tmp_path, "selection_v1")
    summary = run_stage("stage=pipeline", *args, f"data.image_file={images['wide']}", "data.query=a cat",
                        "logic.filters.min_layer=3")
    folder = tmp_path / hf_checkpoint.name
    analysis = pipeline.load_analysis(folder / "sample_analysis.pkl")
    assert analysis["fallback"] is True and len(analysis["ranked"]) == 1
    top = max(analysis["heads"], key=lambda h: h["attn_sum"])
    assert [(h["layer"], h["head"]) for h in summary["selected_heads"]] == [(top["layer"], top["head"])]
    assert summary["heads_source"].startswith("fallback: no head passed")
    assert "min_keep=1" in summary["heads_source"]
    assert (folder / "sample_top5.png").stat().st_size > 1000
    assert json.loads((folder / "sample_bbox.json").read_text())["heads_source"] == summary["heads_source"]


def test_an_empty_fallback_still_writes_every_output(hf_checkpoint, images, tmp_path):
    """min_keep=0 and no eligible head: no heads, an empty mask, bbox null, figure drawn, reason given."""
    summary = run_stage("stage=pipeline", *base(hf_checkpoint, tmp_path, "selection_v1"),
                        f"data.image_file={images['wide']}", "data.query=a cat", "logic.filters.min_layer=3",
                        "logic.threshold.min_keep=0")
    assert summary["selected_heads"] == [] and summary["bbox_xyxy"] is None
    assert summary["heads_source"].startswith("fallback: no head passed") and "min_keep=0" in summary["heads_source"]
    folder = tmp_path / hf_checkpoint.name
    assert (folder / "sample_top5.png").is_file() and (folder / "sample_mask.png").is_file()
