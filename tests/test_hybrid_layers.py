"""Hybrid models: the attention file's L axis holds only the layers with softmax attention, and
meta["layers"] names their model indices. Every head is named and chosen by (MODEL layer, head):
analysis, select, logic.heads, min_layer, the figures and the report. Files without meta["layers"]
read as 0..L−1.

The synthetic record: attention layers [3, 7, 11] of a 12-layer model, 2 heads, an 8×8 grid over a
64×64 image. Head (7, 1) looks at the top-left cell, (11, 0) at the bottom-right one, (3, 0) at the
bottom-left one; the other heads are flat (infinite entropy: they never pass).
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3_5TextConfig

from localization_heads import cli as pipeline
from localization_heads import report
from localization_heads.capture import AttentionCapture
from localization_heads.collector import load_attention, save_attention
from localization_heads.dataio import InputError
from localization_heads.families.base import attention_layers
from localization_heads.layout import Layout

LAYERS = [3, 7, 11]
HEADS = 2
GRID = (8, 8)
SIZE = 64
# (row of the L axis, head) → the cell it looks at
BLOBS = {(1, 1): (0, 0, 0.5), (2, 0): (7, 7, 0.4), (0, 0): (7, 0, 0.3)}


def hybrid_attn() -> torch.Tensor:
    attn = torch.full((len(LAYERS), HEADS, 1, GRID[0] * GRID[1]), 0.005)
    for (row, head), (r, c, peak) in BLOBS.items():
        attn[row, head, 0] = 0.002
        attn[row, head, 0, r * GRID[1] + c] = peak
    return attn


def write_record(folder, name: str, layers: list[int] | None = LAYERS) -> str:
    image = folder / "scene.png"
    if not image.is_file():
        Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(image)
    layout = Layout.single("resize", (SIZE, SIZE), GRID, (0, 0, SIZE, SIZE))
    meta = {"query": "the thing .", "image_size": [SIZE, SIZE], "layout": layout.to_dict(),
            "image_file": str(image), "model_name": "hybrid"}
    if layers is not None:
        meta["layers"] = layers
    path = folder / f"{name}.pkl"
    save_attention(path, {"attn": hybrid_attn(), "meta": meta}, torch.float32)
    return str(path)


def run(*overrides):
    return pipeline.run(pipeline.compose(*overrides))


def common(tmp_path):
    return ["model=toy", "logic=paper", f"data.output_dir={tmp_path}", "data.num_workers=0"]


def quadrant(box) -> tuple[int, int]:
    """(row, col) of the image quadrant under a box's centre."""
    x0, y0, x1, y1 = box
    return int((y0 + y1) / 2 // (SIZE / 2)), int((x0 + x1) / 2 // (SIZE / 2))


def test_analysis_names_heads_by_model_layer(tmp_path):
    path = write_record(tmp_path, "a")
    result = run("stage=analyze", *common(tmp_path), f"data.attention_file={path}")
    assert {h["layer"] for h in result["heads"]} == set(LAYERS)
    assert [(h["layer"], h["head"]) for h in result["ranked"]] == [(7, 1), (11, 0), (3, 0)]


@pytest.mark.parametrize("min_layer, ranked", [(4, [(7, 1), (11, 0)]), (8, [(11, 0)]), (12, [])])
def test_min_layer_compares_model_indices(tmp_path, min_layer, ranked):
    """Rows are 0..2: read as rows, min_layer=4 would drop every head."""
    path = write_record(tmp_path, "a")
    result = run("stage=analyze", *common(tmp_path), f"data.attention_file={path}",
                 f"logic.filters.min_layer={min_layer}")
    assert result["fallback"] == (not ranked)
    if ranked:
        assert [(h["layer"], h["head"]) for h in result["ranked"]] == ranked


@pytest.mark.parametrize("head, corner", [((7, 1), (0, 0)), ((11, 0), (1, 1)), ((3, 0), (1, 0))])
def test_fixed_heads_pick_the_row_of_their_model_layer(tmp_path, head, corner):
    path = write_record(tmp_path, "a")
    summary = run("stage=visualize", *common(tmp_path), f"data.attention_file={path}",
                  f"logic.heads=[[{head[0]},{head[1]}]]")
    assert [(h["layer"], h["head"]) for h in summary["selected_heads"]] == [head]
    assert quadrant(summary["bbox_xyxy"]) == corner


def test_a_fixed_head_on_a_layer_without_attention_is_refused(tmp_path):
    path = write_record(tmp_path, "a")
    with pytest.raises(InputError, match=r"outside this model's heads: attention layers \[3, 7, 11\]"):
        run("stage=visualize", *common(tmp_path), f"data.attention_file={path}", "logic.heads=[[1,1]]")


def test_select_and_report_use_model_layers(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_record(folder, name)
    base = [*common(tmp_path), f"data.attention_dir={folder}", "logic.select.k=2", "logic.select.per_sample=2"]
    result = run("stage=select", *base)
    assert result["heads"] == [[7, 1], [11, 0]]
    assert result["layers"] == LAYERS and result["num_heads"] == HEADS
    assert {c["layer"] for c in result["counts"]} <= set(LAYERS)
    assert json.loads((folder / "selected_heads.json").read_text())["heads"] == [[7, 1], [11, 0]]
    csv_rows = (folder / "selected_heads_counts.csv").read_text().splitlines()
    assert csv_rows[1].startswith("7,1,3,")

    selection = json.loads((folder / "selected_heads.json").read_text())
    for name in ("a", "b", "c"):
        run("stage=visualize", *common(tmp_path), f"data.attention_file={folder / name}.pkl",
            f"logic.heads={folder / 'selected_heads.json'}")
    page = run("stage=report", *common(tmp_path), f"data.pred_dir={folder}")
    assert (page.parent / "heads.png").is_file() and (page.parent / "elbow.png").is_file()
    layer_list, freq = report.frequency_table(selection, None)
    assert layer_list == tuple(LAYERS) and freq.shape == (3, HEADS)
    assert freq[1, 1] == pytest.approx(1.0) and freq[2, 0] == pytest.approx(1.0)
    mean_sums, (sum_layers, heads) = report.head_sums(sorted(folder.glob("*_analysis.pkl")))
    assert sum_layers == tuple(LAYERS) and heads == HEADS
    np.testing.assert_allclose(mean_sums, hybrid_attn().sum(-1).flatten().numpy(), atol=1e-6)
    # min_layer on model indices in the vote too
    assert run("stage=select", *base, "logic.filters.min_layer=8")["heads"] == [[11, 0]]


def test_a_file_without_layers_reads_as_every_layer(tmp_path):
    path = write_record(tmp_path, "old", layers=None)
    assert load_attention(path)["meta"]["layers"] == [0, 1, 2]
    result = run("stage=analyze", *common(tmp_path), f"data.attention_file={path}")
    assert [(h["layer"], h["head"]) for h in result["ranked"]] == [(1, 1), (2, 0), (0, 0)]
    with open(tmp_path / "old_analysis.pkl", "rb") as f:
        assert pickle.load(f)["ranked"][0]["layer"] == 1


@pytest.mark.parametrize("layers", [[3, 7], [7, 3, 11], [3, 3, 11], [-1, 7, 11], "3,7,11"])
def test_a_damaged_layers_list_is_refused(tmp_path, layers):
    path = write_record(tmp_path, "bad", layers=layers)
    with pytest.raises(InputError, match=r"meta\['layers'\]"):
        load_attention(path)


def test_capture_starts_a_call_at_the_first_attention_layer_and_checks_the_list():
    rows = {i: torch.full((1, 2, 5), float(i)) for i in LAYERS}
    capture = AttentionCapture(LAYERS, max_steps=1)
    for _ in range(2):                     # prefill, then a decode step that is not kept
        for i in LAYERS:
            capture.record(i, rows[i])
    assert len(capture.steps) == 1
    stacked = capture.layers(0)            # [L, B, H, N] in the listed order
    assert stacked.shape == (3, 1, 2, 5) and stacked[:, 0, 0, 0].tolist() == [3.0, 7.0, 11.0]
    with pytest.raises(RuntimeError, match="missed layers"):
        _capture_of([3, 7], LAYERS).layers(0)
    with pytest.raises(RuntimeError, match="does not list"):
        _capture_of([3, 7, 9, 11], LAYERS).layers(0)


def _capture_of(seen: list[int], expected: list[int]) -> AttentionCapture:
    capture = AttentionCapture(expected)
    for i in seen:
        capture.record(i, torch.zeros(1, 2, 5))
    return capture


def test_layer_types_give_the_attention_layers():
    config = Qwen3_5TextConfig(num_hidden_layers=8)           # 3 linear-attention layers, then 1 full
    assert attention_layers(config) == [3, 7]
    config.layer_types = ["conv", "full_attention", "sliding_attention", "conv"] * 2
    assert attention_layers(config) == [1, 2, 5, 6]
    config.layer_types = ["full_attention"] * 7 + ["hybrid"]   # attention and a recurrent state in one layer
    with pytest.raises(InputError, match=r"text_config.layer_types\[7\]='hybrid'"):
        attention_layers(config)
