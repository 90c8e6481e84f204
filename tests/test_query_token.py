"""The query token must be known: the token whose attention is read is recorded in the attention
file's meta and <id>_bbox.json, shown in the figure, and a warning says when it is an unknown
word, a special token or blank."""

from __future__ import annotations

import json

import pytest

from localization_heads import viz
from localization_heads.collector import load_attention
from tests.cli_runs import EXAMPLES, TOY, EXIT_OK, cli, folder


@pytest.mark.parametrize("query, token, warned", [("the triangle .", ".", False), ("the cat", "<unk>", True)])
def test_the_query_token_is_recorded_shown_and_questioned(query, token, warned, cli, tmp_path, monkeypatch):
    headers = []
    real = viz.build_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        headers.append(fig._suptitle.get_text())
        return fig

    monkeypatch.setattr(viz, "build_figure", spy)
    out = tmp_path / "out"
    code, log = cli("stage=pipeline", *TOY, f"data.output_dir={out}", f"data.image_file={EXAMPLES / 'toy_tall.png'}",
                    f"data.query={query}")
    assert code == EXIT_OK
    assert load_attention(folder(out) / "sample.pkl")["meta"]["query_token"] == token
    assert json.loads((folder(out) / "sample_bbox.json").read_text())["query_token"] == token
    assert f"attention of the query token “{token}”" in headers[0]
    assert ("the attention is read from the unknown token" in log) == warned
