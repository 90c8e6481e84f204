"""The Python API (localization_heads.api) as a specification: one code path with the CLI (the same
inputs give the same box, mask and heads), the model loaded once, paths and PIL images alike,
batches, the public helpers, and an import that changes nothing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import localization_heads
from localization_heads import cli
from localization_heads import settings
from localization_heads.api import Grounder, GroundingResult, analyze_record, compose_settings, load_attention, select_heads
from localization_heads.dataio import InputError
from localization_heads.layout import Layout

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images"
TOY = ["logic=paper", "logic.heads=models/toy-llava/selected_heads.json", "logic.mask.threshold=half_max"]
QUERY = "the small yellow circle ."


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder.from_pretrained("toy", overrides=TOY)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """stage=pipeline on the toy through the CLI's own entry (cli.run): the bbox summary and its folder."""
    out = tmp_path_factory.mktemp("cli")
    summary = cli.run(cli.compose("stage=pipeline", "model=toy", f"data.image_file={IMAGES / 'toy_tall.png'}",
                                  f"data.query={QUERY}", f"data.output_dir={out}", *TOY))
    return summary, Path(summary["image_file"]), out / "toy-llava"


def test_api_and_cli_give_the_same_box_mask_and_heads(grounder, cli_run):
    summary, _, folder = cli_run
    r = grounder.ground(IMAGES / "toy_tall.png", QUERY)
    assert isinstance(r, GroundingResult)
    assert r.box is not None and r.box == summary["bbox_xyxy"]
    assert r.heads == [(h["layer"], h["head"]) for h in summary["selected_heads"]]
    assert r.heads_source == summary["heads_source"]
    written = np.asarray(Image.open(folder / "sample_mask.png")) > 0
    np.testing.assert_array_equal(r.mask, written)
    # the attention equals the saved file's, and the analysis the saved analysis
    saved = load_attention(folder / "sample.pkl")
    np.testing.assert_array_equal(r.attention["attn"].numpy(), saved["attn"].numpy())
    assert analyze_record(saved, grounder.logic)["ranked"] == r.analysis["ranked"]


def test_result_is_on_the_original_image(grounder):
    r = grounder.ground(IMAGES / "toy_tall.png", QUERY)
    width, height = Image.open(IMAGES / "toy_tall.png").size
    assert r.heatmap.shape == r.mask.shape == (height, width) and r.mask.dtype == bool
    assert r.layout == Layout.from_meta(r.attention["meta"]) and r.layout.image_size == (width, height)
    layers, heads = grounder.adapter.num_layers, grounder.adapter.num_heads
    assert tuple(r.attention["attn"].shape) == (layers, heads, 1, r.layout.num_tokens)
    x0, y0, x1, y1 = r.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert r.mask[int(y0):int(y1), int(x0):int(x1)].any() and not r.mask[:, :int(x0)].any()


def test_a_pil_image_grounds_like_its_file(grounder):
    path = IMAGES / "toy_wide.png"
    from_file = grounder.ground(path, "the square on the right .")
    from_pil = grounder.ground(Image.open(path), "the square on the right .")
    assert from_pil.box == from_file.box and from_pil.heads == from_file.heads
    np.testing.assert_array_equal(from_pil.mask, from_file.mask)
    assert "image_file" not in from_pil.attention["meta"]


def test_ground_batch_keeps_the_order_and_loads_the_model_once(grounder, monkeypatch):
    loads = []
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loads.append(1))
    names = ["toy_tall.png", "toy_wide.png", "toy_square.png"]
    queries = [QUERY, "the square on the right .", "the green triangle ."]
    batched = grounder.ground_batch([IMAGES / n for n in names], queries, batch_size=2)
    assert [r.query for r in batched] == queries and loads == []
    for name, query, r in zip(names, queries, batched):
        alone = grounder.ground(IMAGES / name, query)
        assert r.heads == alone.heads
        # left padding changes the sums by float rounding only (≤ 1e-5, test_capture): at most a pixel
        assert (r.box is None) == (alone.box is None)
        if r.box is not None:
            assert r.box == pytest.approx(alone.box, abs=1.0)


def test_select_heads_over_files_equals_stage_select(cli_run, grounder, tmp_path):
    _, _, folder = cli_run
    expected = cli.run(cli.compose("stage=select", "model=toy", "logic=paper", "logic.select.k=2",
                                   f"data.attention_dir={folder}", f"data.output_dir={tmp_path}"))
    logic = compose_settings("toy", ["logic=paper", "logic.select.k=2"]).logic
    got = select_heads([folder / "sample.pkl"], logic)
    assert got["heads"] == expected["heads"] and got["counts"] == expected["counts"]
    # records in memory vote the same way as the files they came from
    assert select_heads([load_attention(folder / "sample.pkl")], logic)["heads"] == expected["heads"]


def test_model_argument_is_a_conf_name_a_hub_id_or_a_folder():
    assert compose_settings("toy").model.name == "models/toy-llava"
    qwen = compose_settings("Qwen/Qwen2.5-VL-7B-Instruct")         # the id of conf/model/qwen25vl_7b.yaml
    assert qwen.model.dtype == "bfloat16" and qwen.model.name == "Qwen/Qwen2.5-VL-7B-Instruct"
    other = compose_settings("someone/some-vlm")
    assert other.model.name == "someone/some-vlm" and other.model.conv_mode == "auto"
    folder = compose_settings(str(REPO / "localization_heads" / "models" / "toy-llava"), ["model.conv_mode=plain"])
    assert folder.model.conv_mode == "plain"


def test_bad_overrides_are_refused_as_the_cli_refuses_them(tmp_path):
    with pytest.raises(InputError, match="logic.mask.threshold='median'"):
        compose_settings("toy", ["logic.mask.threshold=median"])
    with pytest.raises(InputError, match="file not found"):
        compose_settings("toy", [f"logic.heads={tmp_path / 'missing.json'}"])
    with pytest.raises(InputError, match="one query per image"):
        Grounder(compose_settings("toy"), adapter=None).ground_batch([IMAGES / "toy_tall.png"], [])


def test_fixed_heads_file_is_read_once_per_run(monkeypatch, tmp_path):
    """logic.heads is resolved when the settings are built; rows never read the file again."""
    heads_file = tmp_path / "selected_heads.json"
    heads_file.write_text(json.dumps({"heads": [[1, 2], [0, 3]]}))
    logic = compose_settings("toy", ["logic=paper", f"logic.heads={heads_file}"]).logic
    heads_file.unlink()
    assert logic.fixed_heads == ((1, 2), (0, 3)) and str(heads_file) in logic.heads_source


def test_importing_the_package_changes_nothing_and_loads_nothing_heavy():
    code = (
        "import os, sys, pkgutil, importlib, matplotlib\n"
        "env = dict(os.environ); backend = matplotlib.rcParams._get_backend_or_none()\n"
        "import localization_heads\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib.pyplot', 'omegaconf', 'hydra') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for m in pkgutil.walk_packages(localization_heads.__path__, 'localization_heads.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert matplotlib.rcParams._get_backend_or_none() == backend\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "print(sorted(localization_heads.__all__))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Grounder" in proc.stdout and localization_heads.Grounder is Grounder


def test_the_example_in_docs_api_prints_what_the_page_says():
    """docs/api.md's example, run as written from the repository, prints the page's output (numbers
    compared to 1e-6 relative: the last bits of a float sum depend on the CPU)."""
    page = (REPO / "docs" / "api.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    expected = page.split("prints", 1)[1].split("```\n", 1)[1].split("```", 1)[0].strip().splitlines()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = proc.stdout.strip().splitlines()
    number = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
    assert len(got) == len(expected)
    for line, want in zip(got, expected):
        assert re.sub(number, "#", line) == re.sub(number, "#", want), (line, want)
        assert [float(v) for v in re.findall(number, line)] == pytest.approx(
            [float(v) for v in re.findall(number, want)], rel=1e-6), (line, want)
