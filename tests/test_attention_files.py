"""Attention files: damaged ones refused with one line, and select votes only over one run's."""

from __future__ import annotations

import json

import torch

from tests.cli_runs import EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, rows_file, good_rows, batch_args, folder


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
