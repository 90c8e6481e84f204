"""One run per row: a run holds a lock on every row it writes."""

from __future__ import annotations

from tests.cli_runs import (EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, model_loads, rows_file, good_rows, batch_args,
                            folder, hold_rows)


def test_a_second_run_on_rows_being_written_refuses(cli, tmp_path, hold_rows, model_loads):
    data, out = rows_file(tmp_path, good_rows(3)), tmp_path / "out"
    hold_rows(folder(out), "r1")
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_NOT_RUN and "another run is writing 1 of these rows right now ('r1')" in log
    assert model_loads == [] and not list(folder(out).glob("r*"))


def test_runs_on_different_rows_of_one_folder_go_together(cli, tmp_path, hold_rows):
    """Shards: another process holds r0; a run over r1 and r2 proceeds."""
    out = tmp_path / "out"
    hold_rows(folder(out), "r0")
    code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(3)[1:]), out))
    assert code == EXIT_OK and (folder(out) / "r2_bbox.json").is_file()


def test_a_single_image_run_refuses_while_its_id_is_being_written(cli, tmp_path, hold_rows):
    out = tmp_path / "out"
    hold_rows(folder(out), "sample")
    code, log = cli("stage=pipeline", *TOY, f"data.output_dir={out}", f"data.image_file={EXAMPLES / 'toy_tall.png'}",
                    "data.query=the triangle .")
    assert code == EXIT_NOT_RUN and "('sample')" in log
