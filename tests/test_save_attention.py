"""data.save_attention: all (every head) | heads (logic.heads only, [k, 1, V]) | none (no attention
file). The boxes and masks are the same whichever is kept; a heads-only file serves analyze,
visualize and resume for a logic that uses its heads, and a rerun that needs other heads sends the
row through the model again and says why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from localization_heads import cli as pipeline
from localization_heads.collector import load_attention
from localization_heads.dataio import InputError
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "localization_data.jsonl"
HEADS_FILE = REPO / "localization_heads" / "models" / "toy-llava" / "selected_heads.json"
HEADS = [tuple(p) for p in json.loads(HEADS_FILE.read_text())["heads"]]
TOY = ["model=toy", "logic=paper", "data.process_all=true", "data.num_workers=0", "data.batch_size=2",
       f"logic.heads={HEADS_FILE}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()][:4]
    for row in rows:
        row["image_path"] = str(EXAMPLES.parent / row["image_path"])
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def batch(out: Path, data: Path, *overrides: str) -> dict:
    return pipeline.run(pipeline.compose("stage=batch", *TOY, f"data.data_file={data}", f"data.output_dir={out}",
                                         *overrides))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for storage in ("all", "heads", "none"):
        result = batch(root / storage, data, f"data.save_attention={storage}", "data.visualize_batch=true")
        assert result["written"] == 4 and result["failed"] == 0
    return {storage: root / storage / "toy-llava" for storage in ("all", "heads", "none")}


def ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_bbox.json")] for p in folder.glob("*_bbox.json"))


def test_every_storage_gives_the_same_boxes_and_masks(runs):
    assert len(ids(runs["all"])) == 4
    for storage in ("heads", "none"):
        assert ids(runs[storage]) == ids(runs["all"])
        for item in ids(runs["all"]):
            a = json.loads((runs["all"] / f"{item}_bbox.json").read_text())
            b = json.loads((runs[storage] / f"{item}_bbox.json").read_text())
            assert b["bbox_xyxy"] == a["bbox_xyxy"] and b["selected_heads"][0]["layer"] == a["selected_heads"][0]["layer"]
            assert [(h["layer"], h["head"]) for h in b["selected_heads"]] == HEADS
            assert (runs[storage] / f"{item}_mask.png").read_bytes() == (runs["all"] / f"{item}_mask.png").read_bytes()
            assert (runs[storage] / f"{item}_top3.png").is_file()


def test_heads_file_holds_the_fixed_heads_rows_and_the_full_meta(runs):
    item = ids(runs["all"])[0]
    raw = torch.load(runs["heads"] / f"{item}.pkl", weights_only=True)
    full = load_attention(runs["all"] / f"{item}.pkl")
    assert tuple(raw["attn"].shape) == (len(HEADS), 1, full["attn"].shape[-1])          # [k, 1, V]
    assert [tuple(p) for p in raw["meta"]["stored_heads"]] == HEADS
    assert {k: v for k, v in raw["meta"].items() if k != "stored_heads"} == \
        {k: v for k, v in full["meta"].items() if k in raw["meta"]}
    loaded = load_attention(runs["heads"] / f"{item}.pkl")
    assert loaded["attn"].shape == full["attn"].shape                                   # [L, H, 1, V]
    for layer, head in HEADS:
        torch.testing.assert_close(loaded["attn"][layer, head], full["attn"][layer, head], rtol=0, atol=0)
    kept = torch.zeros(full["attn"].shape[:2], dtype=torch.bool)
    kept[tuple(torch.tensor(HEADS).T)] = True
    assert torch.isnan(loaded["attn"][~kept]).all()   # a head not stored never passes for attention
    heads_bytes = (runs["heads"] / f"{item}.pkl").stat().st_size
    assert heads_bytes < (runs["all"] / f"{item}.pkl").stat().st_size / 2


def test_none_writes_every_output_but_the_attention(runs):
    folder = runs["none"]
    assert not list(p for p in folder.glob("*.pkl") if not p.name.endswith("_analysis.pkl"))
    for item in ids(runs["all"]):
        for suffix in ("_analysis.pkl", "_mask.png", "_bbox.json", "_top3.png"):
            assert (folder / f"{item}{suffix}").is_file()


def test_analyze_and_visualize_read_a_heads_file_when_the_logic_uses_its_heads(runs, tmp_path):
    item = ids(runs["all"])[0]
    attn_file = tmp_path / f"{item}.pkl"
    attn_file.write_bytes((runs["heads"] / f"{item}.pkl").read_bytes())
    base = ["model=toy", "logic=paper", f"data.attention_file={attn_file}"]
    result = pipeline.run(pipeline.compose("stage=analyze", *base, f"logic.heads={HEADS_FILE}"))
    assert sorted((h["layer"], h["head"]) for h in result["heads"]) == sorted(HEADS)
    summary = pipeline.run(pipeline.compose("stage=visualize", *base, f"logic.heads={HEADS_FILE}"))
    assert summary["bbox_xyxy"] == json.loads((runs["all"] / f"{item}_bbox.json").read_text())["bbox_xyxy"]
    with pytest.raises(InputError, match=r"holds only heads .*every head is needed; set logic.heads"):
        pipeline.run(pipeline.compose("stage=visualize", *base, "logic.heads=null"))
    other = [list(HEADS[0]), [0, 0] if HEADS[0] != (0, 0) else [0, 1]]
    with pytest.raises(InputError, match=r"lacks heads"):
        pipeline.run(pipeline.compose("stage=analyze", *base, f"logic.heads={json.dumps(other)}"))


def test_select_refuses_heads_files(runs):
    with pytest.raises(InputError, match="holds only heads .* stage=select votes over every head"):
        pipeline.run(pipeline.compose("stage=select", "model=toy", "logic=paper", f"data.attention_dir={runs['heads']}"))


def test_resume_keeps_heads_rows_and_recollects_those_missing_heads(data, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "out"
    batch(out, data, "data.save_attention=heads")
    assert "4 complete" in log_of(caplog, lambda: batch(out, data, "data.save_attention=heads"))
    # Every head wanted now: the heads-only files cannot serve, the rows go through the model again.
    text = log_of(caplog, lambda: batch(out, data, "data.save_attention=all"))
    assert "0 complete, 0 to redo from saved attention, 4 to run through the model" in text
    assert "holds only heads" in text and "every head is needed" in text
    assert load_attention(out / "toy-llava" / f"{ids(out / 'toy-llava')[0]}.pkl")["meta"].get("stored_heads") is None
    # A full file serves any heads: other heads are redone from it without the model.
    other = json.dumps([[1, 0], [2, 1]])
    text = log_of(caplog, lambda: batch(out, data, "data.save_attention=heads", f"logic.heads={other}"))
    assert "4 to redo from saved attention, 0 to run through the model" in text
    # ... and heads-only files of those heads cannot serve the toy's own heads.
    batch(out, data, "data.save_attention=heads", f"logic.heads={other}", "data.resume=false")
    text = log_of(caplog, lambda: batch(out, data, "data.save_attention=heads"))
    assert "4 to run through the model" in text and "lacks heads" in text


def log_of(caplog, action) -> str:
    caplog.clear()
    action()
    return caplog.text


def test_heads_without_logic_heads_is_refused_before_any_row(data, tmp_path):
    with pytest.raises(InputError, match="data.save_attention=heads keeps the rows of logic.heads only"):
        batch(tmp_path, data, "data.save_attention=heads", "logic.heads=null")
    with pytest.raises(InputError, match="data.save_attention='most': unknown"):
        batch(tmp_path, data, "data.save_attention=most")
    assert not (tmp_path / "toy-llava").exists() or not list((tmp_path / "toy-llava").glob("*.pkl"))
