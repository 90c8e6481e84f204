"""Quoting queries and paths, and the modes of the files written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localization_heads import cli as pipeline
from localization_heads.collector import load_attention
from tests.cli_runs import REPO, EXAMPLES, TOY, EXIT_OK, cli, subprocess_cli, rows_file, good_rows, batch_args, folder


# ---------------------------------------------------------------- quoting, file modes

# docs/cli.md's "Quoting" examples, run as written (only `python pipeline.py` made absolute).
README_QUOTING = [
    ("""python pipeline.py stage=pipeline model=toy 'data.image_file="photos/photo (1), ü.png"' """
     """'data.query="the small, yellow circle (left)"'""",
     "photos/photo (1), ü.png", "the small, yellow circle (left)"),
    ("""python pipeline.py stage=pipeline model=toy "data.image_file=\\"photos/Ann's photo.png\\"" """
     """"data.query=\\"the dog's tail\\"\"""",
     "photos/Ann's photo.png", "the dog's tail"),
]


@pytest.mark.parametrize("command, image_file, query", README_QUOTING)
def test_the_readme_shows_how_to_quote_and_it_works_in_a_shell(command, image_file, query, tmp_path):
    assert command in (REPO / "docs" / "cli.md").read_text()
    (tmp_path / "photos").mkdir()
    (tmp_path / image_file).write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    result = subprocess.run(["bash", "-c", command.replace("python pipeline.py", f"{sys.executable} {REPO / 'pipeline.py'}")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    summary = json.loads((tmp_path / "_overhaul/outputs/localization_heads/toy-llava/sample_bbox.json").read_text())
    assert summary["query"] == query and summary["image_file"] == image_file


TRICKY = ["the dog's tail", "the small, yellow circle", "photo (1).png", "über café ☕", 'say "hi"', "a=b", "[x]",
          "{a: 1}", "back\\slash", "${oc.env:HOME}", "it's \"both\"", "50% off #1", "trailing\\", "\\${x}", "'"]


def test_override_passes_any_text_through_hydra():
    for text in TRICKY:
        assert pipeline.compose(pipeline.override("data.query", text)).data.query == text


def test_any_query_and_path_reach_the_model_through_the_real_cli(tmp_path):
    query = "the dog's \"small\", yellow (left) circle — ü ${x} \\"
    image = tmp_path / "dir, with (parens)" / "it's ü [1].png"
    image.parent.mkdir()
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    result = subprocess_cli("stage=collect", *TOY, f"data.output_dir={tmp_path / 'out'}",
                            pipeline.override("data.image_file", str(image)), pipeline.override("data.query", query))
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    meta = load_attention(folder(tmp_path / "out") / "sample.pkl")["meta"]
    assert meta["query"] == query and meta["image_file"] == str(image)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_are_created_with_the_users_umask(umask, mode, cli, tmp_path):

    old = os.umask(umask)
    try:
        code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"))
    finally:
        os.umask(old)
    assert code == EXIT_OK
    files = [p for p in folder(tmp_path / "out").iterdir() if p.is_file() and not p.name.startswith(".")]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {mode}
