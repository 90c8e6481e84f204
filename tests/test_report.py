"""stage=report: one static page per run folder, for runs with and without ground truth and for a
single image; checked in a real headless Chromium."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localization_heads import cli as pipeline
from localization_heads import report
from tests import browser
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "localization_data.jsonl"
TOY = ["model=toy", "logic=paper", f"logic.heads={REPO / 'localization_heads/models/toy-llava/selected_heads.json'}",
       "logic.mask.threshold=half_max", "data.num_workers=0", "data.batch_size=4"]
PAGE_FACTS = """JSON.stringify({
  metrics: document.querySelectorAll('#metrics tr').length,
  cards: document.querySelectorAll('figure.card').length,
  images: document.images.length,
  loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  missing: document.querySelectorAll('.noimg').length})"""


def example_rows(with_gt: bool) -> list[dict]:
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    for row in rows:
        row["image_path"] = str(EXAMPLES.parent / row["image_path"])
        if not with_gt:
            row.pop("bbox")
    return rows + [{"id": "gone", "prompt": "the red circle .", "image_path": "no/such.png",
                    **({"bbox": [0, 0, 5, 5]} if with_gt else {})}]


def run(*overrides: str):
    return pipeline.run(pipeline.compose(*overrides))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy model on the 12 examples (ground truth) and a row whose image is missing; reported."""
    root = tmp_path_factory.mktemp("with_gt")
    data = write_jsonl(root / "rows.jsonl", example_rows(with_gt=True))
    base = [*TOY, f"data.data_file={data}", f"data.output_dir={root}"]
    run("stage=batch", *base, "data.process_all=true")
    run("stage=evaluate", *base)
    page = run("stage=report", *base)
    return page, base


def test_metrics_equal_stage_evaluate_with_a_fixed_seed_interval(toy_run):
    page, _ = toy_run
    evaluation = json.loads((page.parents[1] / "evaluation.json").read_text())
    rows = list(csv.DictReader((page.parent / "rows.csv").open()))
    ious = np.array([float(r["iou"]) for r in rows])
    assert len(rows) == evaluation["n"] == 13
    assert (ious >= 0.5).mean() == evaluation["acc@0.5"] and ious.mean() == pytest.approx(evaluation["miou"])
    text = page.read_text()
    low, high = report.bootstrap_interval((ious >= 0.5).astype(float))
    assert low < evaluation["acc@0.5"] < high
    assert f"{evaluation['acc@0.5']:.3f} (95 % bootstrap interval {low:.3f} – {high:.3f})" in text
    assert {r["status"] for r in rows if r["id"] == "gone"} == {"failed"}


def test_report_is_rebuilt_identically_and_thumbnails_are_made_once(toy_run):
    page, base = toy_run
    thumbs = sorted((page.parent / "thumbs").iterdir())
    assert len(thumbs) == 12                                   # every row but the one without an image
    assert all(max(Image.open(t).size) == report.THUMB_PX for t in thumbs)
    before, stamps = page.read_text(), {t: t.stat().st_mtime_ns for t in thumbs}
    run("stage=report", *base)
    assert page.read_text() == before
    assert {t: t.stat().st_mtime_ns for t in sorted((page.parent / "thumbs").iterdir())} == stamps


def test_page_shows_the_head_map_and_elbow_curve(toy_run):
    page, _ = toy_run
    for name in ("heads.png", "elbow.png"):
        assert Image.open(page.parent / name).size[0] > 300
        assert f'src="{name}"' in page.read_text()


def test_report_without_ground_truth(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", example_rows(with_gt=False)[:3])
    base = [*TOY, f"data.data_file={data}", f"data.output_dir={tmp_path}"]
    run("stage=batch", *base, "data.process_all=true")
    text = run("stage=report", *base).read_text()
    assert "No ground-truth boxes: accuracy is not computed." in text and "Acc@0.5" not in text
    assert text.count("no ground truth") == 3 and text.count('<figure class=card>') == 3


def test_report_of_a_single_image_run(tmp_path):
    """stage=pipeline writes one <id>_bbox.json and no JSONL: the report covers the folder."""
    run("stage=pipeline", *TOY, f"data.output_dir={tmp_path}", f"data.image_file={EXAMPLES.parent / 'images/toy_tall.png'}",
        "data.query=the small yellow circle .")
    page = run("stage=report", *TOY, f"data.output_dir={tmp_path}", "data.data_file=null")
    text = page.read_text()
    assert "the 1 predictions in" in text and text.count('<figure class=card>') == 1
    assert "the small yellow circle ." in text and (page.parent / "elbow.png").is_file()


def test_an_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "toy-llava").mkdir()
    with pytest.raises(report.InputError, match="no predictions"):
        run("stage=report", *TOY, f"data.output_dir={tmp_path}", "data.data_file=null")


def test_large_runs_show_worst_best_and_a_fixed_random_sample():
    rows = [report.Row(f"r{i:04d}", gt=[0, 0, 1, 1], iou=(i * 37 % 200) / 200, status="ok") for i in range(200)]
    groups = report.gallery_groups(rows)
    assert [title for title, _ in groups] == ["Worst 24", "Best 24", "Random sample of 24 (seed 0)"]
    worst, best, sample = (g for _, g in groups)
    assert [r.iou for r in worst] == sorted(r.iou for r in rows)[:24]
    assert [r.iou for r in best] == sorted((r.iou for r in rows), reverse=True)[:24]
    assert [r.id for r in sample] == [r.id for r in report.gallery_groups(rows)[2][1]]   # the same every time
    small = report.gallery_groups(rows[:30])
    assert len(small) == 1 and len(small[0][1]) == 30


def test_bootstrap_interval_matches_the_binomial_spread():
    hits = (np.arange(500) % 5 != 0).astype(float)          # p = 0.8, n = 500
    low, high = report.bootstrap_interval(hits)
    half = 1.96 * np.sqrt(0.8 * 0.2 / 500)
    assert low == pytest.approx(0.8 - half, abs=0.006) and high == pytest.approx(0.8 + half, abs=0.006)
    assert report.bootstrap_interval(hits) == (low, high)


needs_chromium = pytest.mark.skipif(browser.find_chromium() is None,
                                        reason="no Chromium installed (bash .ci/run installs Debian's chromium)")


@needs_chromium
def test_page_loads_in_a_real_browser_without_errors(toy_run):
    page, _ = toy_run
    facts = browser.load(page.as_uri(), PAGE_FACTS)
    assert facts.errors == []
    assert json.loads(facts.value) == {"metrics": 8, "cards": 13, "images": 2 + 12, "loaded": 14, "missing": 1}


@needs_chromium
def test_the_browser_check_sees_a_broken_image(toy_run, tmp_path):
    """The check above can fail: a page whose thumbnail is gone reports the failed load."""
    page, _ = toy_run
    broken = tmp_path / "index.html"
    broken.write_text(page.read_text().replace('src="thumbs/', f'src="{page.parent.as_uri()}/thumbs/missing-'))
    (tmp_path / "rows.csv").write_text("")
    facts = browser.load(broken.as_uri(), PAGE_FACTS)
    assert any("ERR_FILE_NOT_FOUND" in e for e in facts.errors)
    assert json.loads(facts.value)["loaded"] == 0


def test_the_page_names_what_made_it_and_links_thumbnails_to_row_figures(toy_run, tmp_path):
    """Model, logic, mask threshold, heads, package version and date on the page; a row drawn with
    data.visualize_batch=true links its thumbnail to its own figure."""
    from localization_heads import __version__

    page, base = toy_run
    text = page.read_text()
    made = re.search(r"<p class=muted id=made-by>(.*?)</p>", text).group(1)
    assert "toy-llava" in made and "logic paper" in made and "mask threshold half_max" in made
    assert "selected_heads.json" in made and __version__ in made
    assert 'href="../' not in text   # no figures were drawn in this run
    run("stage=batch", *base, "data.process_all=true", "data.visualize_batch=true")
    text = run("stage=report", *base).read_text()
    assert re.search(r'<a href="\.\./toy_square_0_top3\.png"><img src="thumbs/', text)
