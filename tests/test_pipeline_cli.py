"""The stages, driven with Hydra overrides exactly as a user types them, on tiny checkpoints of
both formats loaded through the real from_pretrained path."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from localization_heads import cli as pipeline
from localization_heads import settings
from localization_heads.collector import load_attention
from localization_heads.dataio import InputError
from localization_heads.layout import Layout
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run_stage(*overrides: str):
    return pipeline.run(pipeline.compose(*overrides))


def common(checkpoint: Path, out: Path) -> list[str]:
    return ["model=toy", f"model.name={checkpoint}", f"data.output_dir={out}", "data.num_workers=0"]


def outputs(out: Path, checkpoint: Path) -> Path:
    return out / checkpoint.name


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_pipeline_stage_writes_every_output(fmt, hf_checkpoint, original_checkpoint, images, tmp_path):
    """stage=pipeline: <id>.pkl [L, H, 1, V] + meta, analysis, figure, image-size mask, strict-JSON bbox."""
    ckpt = hf_checkpoint if fmt == "hf" else original_checkpoint
    run_stage("stage=pipeline", *common(ckpt, tmp_path), f"data.image_file={images['wide']}",
              "data.query=the red circle .", "logic=paper")
    folder = outputs(tmp_path, ckpt)
    record = load_attention(folder / "sample.pkl")
    assert record["attn"].shape == (3, 4, 1, 49)
    layout = Layout.from_meta(record["meta"])
    assert layout.one_map.grid == (7, 7) and layout.method == "pad" and record["meta"]["image_size"] == [96, 64]
    assert "grid" not in record["meta"] and "geometry" not in record["meta"]   # the layout is the one geometry
    assert record["meta"]["query"] == "the red circle ."
    ranked = pickle.loads((folder / "sample_analysis.pkl").read_bytes())["ranked"]
    assert {"layer", "head", "attn_sum", "spatial_entropy", "bottom_row_focus"} <= set(ranked[0])
    assert Image.open(folder / "sample_mask.png").size == (96, 64)
    assert (folder / "sample_top3.png").stat().st_size > 1000
    text = (folder / "sample_bbox.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["image_size"] == [96, 64] and len(summary["selected_heads"]) == 3
    x0, y0, x1, y1 = summary["bbox_xyxy"]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64


def test_collect_analyze_visualize_as_separate_stages(hf_checkpoint, images, tmp_path):
    """The stages hand files to each other: collect → analyze → visualize."""
    run_stage("stage=collect", *common(hf_checkpoint, tmp_path), f"data.image_file={images['tall']}",
              "data.query=a cat", "data.id=cat")
    attn_file = outputs(tmp_path, hf_checkpoint) / "cat.pkl"
    assert attn_file.is_file() and not (attn_file.parent / "cat_analysis.pkl").exists()
    run_stage("stage=analyze", *common(hf_checkpoint, tmp_path), f"data.attention_file={attn_file}", "logic=paper")
    assert (attn_file.parent / "cat_analysis.pkl").is_file()
    summary = run_stage("stage=visualize", *common(hf_checkpoint, tmp_path), f"data.attention_file={attn_file}",
                        "logic=paper")
    assert (attn_file.parent / "cat_top3.png").is_file() and summary["image_size"] == [48, 80]


def test_fixed_heads_replace_the_per_sample_ranking(hf_checkpoint, images, tmp_path):
    """logic.heads=[[l, h], ...] or a selected_heads.json: exactly those heads are combined."""
    args = [*common(hf_checkpoint, tmp_path), f"data.image_file={images['wide']}", "data.query=a cat"]
    summary = run_stage("stage=pipeline", *args, "logic.heads=[[2,1],[1,3]]")
    assert [(h["layer"], h["head"]) for h in summary["selected_heads"]] == [(2, 1), (1, 3)]
    heads_file = write_jsonl(tmp_path / "heads.json", [{"heads": [[0, 0]]}])
    summary = run_stage("stage=pipeline", *args, f"logic.heads={heads_file}")
    assert [(h["layer"], h["head"]) for h in summary["selected_heads"]] == [(0, 0)]
    with pytest.raises(InputError, match="outside"):
        run_stage("stage=pipeline", *args, "logic.heads=[[9,0]]")


def batch_rows(images, tmp_path) -> Path:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    return write_jsonl(tmp_path / "data.jsonl", [
        {"id": "wide", "prompt": "the red circle .", "image_path": str(images["wide"])},
        {"id": "tall", "prompt": "a small cat on the left", "image_path": str(images["tall"])},
        {"id": "gone", "prompt": "a dog", "image_path": "no/such/file.png"},
        {"id": "broken", "prompt": "a dog", "image_path": "broken.png"},
        {"id": "empty", "prompt": "  ", "image_path": str(images["square"])},
        {"id": "square", "prompt": "the blue square", "image_path": str(images["square"])},
    ])


def test_batch_isolates_failures_and_resumes(hf_checkpoint, images, tmp_path, monkeypatch):
    """Bad rows are listed in failures.jsonl and skipped; the rest finish; the model loads once;
    a rerun redoes nothing that is complete."""
    data = batch_rows(images, tmp_path)
    loads = []
    real = settings.load_adapter_from
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loads.append(1) or real(cfg))
    args = ["stage=batch", *common(hf_checkpoint, tmp_path), f"data.data_file={data}", "data.process_all=true",
            "data.batch_size=2", "logic=paper"]
    result = run_stage(*args)
    assert loads == [1] and result["written"] == 3 and result["failed"] == 3
    folder = outputs(tmp_path, hf_checkpoint)
    failures = {json.loads(l)["id"]: json.loads(l)["error"] for l in (folder / "failures.jsonl").read_text().splitlines()}
    assert set(failures) == {"gone", "broken", "empty"}
    assert "not found" in failures["gone"] and "cannot read image" in failures["broken"] and "empty" in failures["empty"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = run_stage(*args)
    assert again["written"] == 0 and again["failed"] == 3
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in folder.iterdir() if not p.name.startswith("failures"))
    assert not list(folder.glob(".*.tmp")), "atomic writes leave no temp files"


def test_batch_size_does_not_change_results(hf_checkpoint, images, tmp_path):
    """Batched (left-padded) rows equal batch size 1 to 1e-5 with float32 storage."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": k, "prompt": q, "image_path": str(images[k])}
        for k, q in [("wide", "the red circle on the left ."), ("tall", "a cat"), ("square", "the bird")]])
    for bs in (1, 3):
        run_stage("stage=batch", *common(hf_checkpoint, tmp_path / f"bs{bs}"), f"data.data_file={data}",
                  "data.process_all=true", f"data.batch_size={bs}", "data.attn_dtype=float32", "logic=paper")
    for k in ("wide", "tall", "square"):
        a = load_attention(outputs(tmp_path / "bs1", hf_checkpoint) / f"{k}.pkl")["attn"]
        b = load_attention(outputs(tmp_path / "bs3", hf_checkpoint) / f"{k}.pkl")["attn"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_files_default_to_float16(hf_checkpoint, images, tmp_path):
    run_stage("stage=collect", *common(hf_checkpoint, tmp_path), f"data.image_file={images['wide']}", "data.query=a cat")
    raw = torch.load(outputs(tmp_path, hf_checkpoint) / "sample.pkl", weights_only=True)
    assert raw["attn"].dtype == torch.float16 and raw["meta"]["attn_dtype"] == "float16"


@pytest.mark.parametrize("line, message", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    ('{"id": "x", "image_path": "a.png"}', r"data.jsonl:2: prompt: missing"),
    ('{"id": "../x", "prompt": "a", "image_path": "a.png"}', r"id '../x' is not a plain file name"),
    ('{"id": "/abs", "prompt": "a", "image_path": "a.png"}', r"id '/abs' is not a plain file name"),
    ('{"id": "ok", "prompt": "a", "image_path": "a.png"}', r"data.jsonl:2: id: duplicate id 'ok'"),
])
def test_bad_jsonl_names_file_line_and_field(line, message, hf_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ['{"id": "ok", "prompt": "a", "image_path": "a.png"}', line])
    with pytest.raises(InputError, match=message):
        run_stage("stage=batch", *common(hf_checkpoint, tmp_path), f"data.data_file={data}", "data.process_all=true")


def test_single_item_errors_name_the_input(hf_checkpoint, images, tmp_path):
    base = common(hf_checkpoint, tmp_path)
    with pytest.raises(InputError, match="missing.png: image not found"):
        run_stage("stage=pipeline", *base, f"data.image_file={tmp_path}/missing.png", "data.query=a")
    with pytest.raises(InputError, match="data.query=. .: give a non-empty referring expression"):
        run_stage("stage=pipeline", *base, f"data.image_file={images['wide']}", "data.query=' '")
    not_attention = tmp_path / "list.pkl"
    not_attention.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(InputError, match="list.pkl: not an attention file"):
        run_stage("stage=analyze", *base, f"data.attention_file={not_attention}")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_without_running_it(hf_checkpoint, tmp_path):
    """An attention file that would run a shell command is refused; the command never runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"attn": _Exploit(marker), "meta": {}}))
    with pytest.raises(InputError, match="not a safe attention file"):
        run_stage("stage=analyze", *common(hf_checkpoint, tmp_path), f"data.attention_file={evil}")
    assert not marker.exists()


def test_reference_format_pickle_is_accepted(hf_checkpoint, images, tmp_path):
    """A plain pickle of {"attn": CPU tensor, "meta": {...}} as the reference code writes it."""
    ref = tmp_path / "ref.pkl"
    attn = torch.rand(3, 4, 1, 49).half()
    ref.write_bytes(pickle.dumps({"attn": attn, "meta": {"image_file": str(images["wide"]), "query": "a cat",
                                                         "image_size": (96, 64), "vis_len": 49}}))
    run_stage("stage=visualize", *common(hf_checkpoint, tmp_path), f"data.attention_file={ref}", "logic=paper")
    summary = json.loads((tmp_path / "ref_bbox.json").read_text())
    assert summary["image_size"] == [96, 64] and summary["bbox_xyxy"] is not None


def test_cache_dir_is_passed_to_the_loaders_and_the_environment_is_left_alone(hf_checkpoint, images, tmp_path,
                                                                              monkeypatch):
    """model.cache_dir reaches every from_pretrained as an argument (adapter.cache_dir); a run no
    longer exports HF_HOME / HF_HUB_CACHE, which would change the process for a notebook user."""
    monkeypatch.setenv("HF_HOME", "unset")
    monkeypatch.setenv("HF_HUB_CACHE", "unset")
    loaded = []
    real = settings.load_adapter_from
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loaded.append(real(cfg)) or loaded[-1])
    run_stage("stage=collect", *common(hf_checkpoint, tmp_path), f"data.image_file={images['wide']}",
              "data.query=a cat", f"model.cache_dir={tmp_path / 'cache'}")
    assert [adapter.cache_dir for adapter in loaded] == [str(tmp_path / "cache")]
    assert os.environ["HF_HOME"] == os.environ["HF_HUB_CACHE"] == "unset"


def test_cli_entrypoint_reports_bad_input_in_one_line(tmp_path):
    """`python pipeline.py ...` exits 2 with a one-line error, no traceback."""
    proc = subprocess.run([sys.executable, "pipeline.py", "stage=analyze", f"data.attention_file={tmp_path}/nope.pkl",
                           f"data.output_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "h")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.pkl: attention file not found" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_centre_crop_processor_is_recorded_and_undone(hf_crop_checkpoint, images, tmp_path):
    """llava-hf's default centre crop: the grid spans only the middle of a wide image, and the box
    stays inside that region of the original image."""
    summary = run_stage("stage=pipeline", *common(hf_crop_checkpoint, tmp_path), f"data.image_file={images['wide']}",
                        "data.query=a cat", "logic=paper")
    meta = load_attention(outputs(tmp_path, hf_crop_checkpoint) / "sample.pkl")["meta"]
    layout = Layout.from_meta(meta)
    assert layout.method == "crop"
    x0, y0, x1, y1 = layout.one_map.box
    assert (x0, y0, x1, y1) == pytest.approx((16, 0, 80, 64), abs=1e-6)   # 96×64 → 84×56 → crop 56
    bx0, _, bx1, _ = summary["bbox_xyxy"]
    assert 16 <= bx0 < bx1 <= 80


def test_select_refuses_held_out_rows_unless_told(hf_checkpoint, images, tmp_path):
    """Heads are selected on training data: rows whose JSONL split is val/test are refused."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "a cat", "image_path": str(images["wide"]), "split": "train"},
        {"id": "b", "prompt": "a dog", "image_path": str(images["tall"]), "split": "val"}])
    base = common(hf_checkpoint, tmp_path)
    run_stage("stage=batch", *base, f"data.data_file={data}", "data.process_all=true", "logic=paper")
    with pytest.raises(InputError, match="b.pkl \\(split=val\\)"):
        run_stage("stage=select", *base, "logic=paper")
    result = run_stage("stage=select", *base, "logic=paper", "logic.select.allow_non_train=true")
    assert result["n_samples"] == 2 and len(result["heads"]) == 3
    csv_rows = (outputs(tmp_path, hf_checkpoint) / "selected_heads_counts.csv").read_text().splitlines()
    assert csv_rows[0] == "layer,head,count,frequency" and sum(int(r.split(",")[2]) for r in csv_rows[1:]) <= 2 * 10


def test_rerun_with_new_heads_redoes_boxes_from_saved_attention(hf_checkpoint, images, tmp_path, monkeypatch):
    """Resume knows what outputs depend on: new logic or heads → boxes are redone from the saved
    attention without loading the model; new collection settings → the model runs again."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "wide", "prompt": "a cat", "image_path": str(images["wide"])}])
    args = ["stage=batch", *common(hf_checkpoint, tmp_path), f"data.data_file={data}", "data.process_all=true",
            "logic=paper"]
    run_stage(*args)
    folder = outputs(tmp_path, hf_checkpoint)
    attn_stamp = (folder / "wide.pkl").stat().st_mtime_ns
    loads = []
    real = settings.load_adapter_from
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loads.append(1) or real(cfg))
    result = run_stage(*args, "logic.heads=[[1,1]]")
    summary = json.loads((folder / "wide_bbox.json").read_text())
    assert result["written"] == 1 and loads == []
    assert [(h["layer"], h["head"]) for h in summary["selected_heads"]] == [(1, 1)]
    assert (folder / "wide.pkl").stat().st_mtime_ns == attn_stamp
    assert run_stage(*args, "logic.heads=[[1,1]]")["written"] == 0        # now complete
    run_stage(*args, "logic.heads=[[1,1]]", "model.conv_mode=referseg")
    assert loads == [1] and (folder / "wide.pkl").stat().st_mtime_ns != attn_stamp
