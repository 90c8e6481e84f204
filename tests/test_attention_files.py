"""Attention files: damaged ones refused with one line, and select votes only over one run's."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import torch

from tests.cli_runs import only_writes_into, error_line, EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, rows_file, good_rows, batch_args, folder


def test_nan_in_an_attention_file_is_an_error_naming_the_file(cli, tmp_path):
    cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"))
    path = folder(tmp_path / "out") / "r0.pkl"
    raw = torch.load(path, weights_only=True)
    raw["attn"][2, 1, 0, 5] = float("nan")
    bad = tmp_path / "nan.pkl"
    torch.save(raw, bad)
    code, out = cli("stage=analyze", *TOY, f"data.attention_file={bad}", f"data.output_dir={tmp_path / 'out'}")
    assert code == EXIT_NOT_RUN and f"{bad}: 'attn' holds 1 NaN/inf values" in out
    assert not (tmp_path / "nan_analysis.pkl").exists()

# ---------------------------------------------------------------- select and evaluate see what they should

def test_select_votes_over_the_rows_of_the_given_jsonl_only(cli, tmp_path):
    out = tmp_path / "out"
    data = rows_file(tmp_path, good_rows(3))
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert cli("stage=pipeline", *TOY, f"data.output_dir={out}", f"data.image_file={EXAMPLES / 'toy_wide.png'}",
               "data.query=the blue square .", "data.id=single")[0] == EXIT_OK
    code, log = cli("stage=select", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    selected = json.loads((folder(out) / "selected_heads.json").read_text())
    assert code == EXIT_OK and selected["n_samples"] == 3 and f"voting over the 3 rows of {data}" in log
    code, log = cli("stage=select", *TOY, f"data.output_dir={out}")
    selected = json.loads((folder(out) / "selected_heads.json").read_text())
    assert code == EXIT_OK and selected["n_samples"] == 4 and "voting over all 4 attention files" in log

def test_an_attention_file_not_named_id_pkl_is_refused(cli, tmp_path):
    odd = tmp_path / "foo.pt"
    odd.write_bytes(b"")
    code, out = cli("stage=visualize", *TOY, f"data.attention_file={odd}")
    assert code == EXIT_NOT_RUN and "expected an attention file named <id>.pkl" in out



@pytest.mark.parametrize("damage, says", [
    (lambda raw: raw.update(attn="abc"), "'attn' is a str, expected a tensor [L, H, 1, V]"),
    (lambda raw: raw.update(meta=[1, 2]), "'meta' is a list, expected a dict"),
    (lambda raw: raw["meta"].update(image_size="abc"), "meta 'image_size' is 'abc', expected [width, height]"),
    (lambda raw: raw["meta"].update(image_size=[0, 0]), "meta 'image_size' is [0, 0], expected [width, height]"),
])
def test_a_malformed_attention_file_is_one_line(damage, says, cli, tmp_path):
    out = tmp_path / "out"
    assert cli(*batch_args(rows_file(tmp_path, good_rows(1)), out))[0] == EXIT_OK
    raw = torch.load(folder(out) / "r0.pkl", weights_only=True)
    damage(raw)
    bad = tmp_path / "bad" / "x.pkl"
    bad.parent.mkdir()
    torch.save(raw, bad)
    with only_writes_into(tmp_path, bad.parent):
        for stage in ("analyze", "visualize"):
            code, log = cli(f"stage={stage}", *TOY, f"data.attention_file={bad}", f"data.output_dir={bad.parent}")
            assert code == EXIT_NOT_RUN and error_line(log, f"{bad}: {says}")
    assert not list(bad.parent.glob("x_*"))


def test_a_reference_file_whose_image_size_is_not_its_images_is_refused(cli, tmp_path):
    """A plain pickle of the reference code: its image_size places the box, so it must be the image's."""
    attn = np.random.default_rng(0).random((6, 4, 1, 196)).astype(np.float32)
    image = EXAMPLES / "toy_tall.png"                                     # 96 x 146
    path = tmp_path / "ref" / "ref.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"attn": attn, "meta": {"image_size": [300, 200], "image_file": str(image),
                                                          "query": "the triangle ."}}))
    with only_writes_into(tmp_path, path.parent):
        code, log = cli("stage=visualize", *TOY, f"data.attention_file={path}", f"data.output_dir={path.parent}")
    line = error_line(log, f"{image}: 96x146 px, but ref.pkl was collected from a 300x200 px image")
    assert code == EXIT_NOT_RUN and "collect it again" in line
    assert not list(path.parent.glob("ref_*"))


def test_select_refuses_attention_files_of_different_collection_settings(cli, tmp_path):
    out = tmp_path / "out"
    rows = good_rows(4)
    assert cli(*batch_args(rows_file(tmp_path, rows[:2], "a.jsonl"), out))[0] == EXIT_OK
    assert cli(*batch_args(rows_file(tmp_path, rows[2:], "b.jsonl"), out, "data.attn_dtype=float32"))[0] == EXIT_OK
    with only_writes_into(tmp_path, out):
        code, log = cli("stage=select", *TOY, f"data.output_dir={out}")
    line = error_line(log, "attention files of different models or collection settings: r0.pkl and r2.pkl")
    assert code == EXIT_NOT_RUN and "attn_dtype: 'float16' vs 'float32'" in line
    assert not (folder(out) / "selected_heads.json").exists()
    code, _ = cli("stage=select", *TOY, f"data.output_dir={out}", f"data.data_file={tmp_path / 'a.jsonl'}")
    assert code == EXIT_OK and json.loads((folder(out) / "selected_heads.json").read_text())["n_samples"] == 2
