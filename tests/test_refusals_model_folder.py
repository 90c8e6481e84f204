"""Damaged model folders: one line naming the folder and what is wrong (exit 2), never a
traceback; and the weights a row was collected with are part of what makes it complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from localization_heads import settings
from tests.cli_runs import (REPO, EXAMPLES, TOY, EXIT_OK, EXIT_NOT_RUN, cli, rows_file, good_rows, batch_args, folder,
                            bbox_of, only_writes_into, error_line)

TOY_FOLDER = REPO / "localization_heads" / "models" / "toy-llava"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scramble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = b"x" * 64
    path.write_bytes(bytes(data))


def narrow_embeddings(path: Path) -> None:
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = weights[key][:, :64].contiguous()
    save_file(weights, path, metadata={"format": "pt"})


DAMAGES = {   # name → (damage done to the copy, what the one line says)
    "corrupt config.json": (lambda d: (d / "config.json").write_text("{ not json"), "config.json: not readable JSON"),
    "no tokenizer files": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                           "cannot load the model"),
    "truncated weights": (lambda d: truncate(d / "model.safetensors"), "but its header describes"),
    "damaged weights": (lambda d: scramble_header(d / "model.safetensors"), "model.safetensors: its header is unreadable"),
    "no weights file": (lambda d: (d / "model.safetensors").unlink(), "no weights file"),
    "no processor config": (lambda d: (d / "processor_config.json").unlink(), "cannot load the model"),
    "weights of the wrong shape": (lambda d: narrow_embeddings(d / "model.safetensors"), "cannot load the model"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_folder_is_one_line_naming_it(damage, cli, tmp_path):
    model = tmp_path / "toy-llava"
    shutil.copytree(TOY_FOLDER, model)
    harm, says = DAMAGES[damage]
    harm(model)
    out = tmp_path / "out"
    with only_writes_into(tmp_path, out):
        code, log = cli("stage=pipeline", *TOY, f"model.name={model}", f"data.output_dir={out}",
                        f"data.image_file={EXAMPLES / 'toy_tall.png'}", "data.query=the triangle .")
    line = error_line(log, says)
    assert code == EXIT_NOT_RUN and str(model) in line and ("again" in line or "model.name" in line)
    assert "Traceback" not in log


def test_weights_replaced_in_the_model_folder_redo_the_rows(cli, tmp_path):
    model = tmp_path / "toy-llava"
    shutil.copytree(TOY_FOLDER, model)
    data, out = rows_file(tmp_path, good_rows(2)), tmp_path / "out"
    assert cli(*batch_args(data, out, f"model.name={model}"))[0] == EXIT_OK
    code, log = cli(*batch_args(data, out, f"model.name={model}"))
    assert code == EXIT_OK and "2 complete" in log
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))   # a new copy of the weights
    code, log = cli(*batch_args(data, out, f"model.name={model}"))
    assert code == EXIT_OK and "redoing 2 rows: model weights changed (r0, r1)" in log
    assert "0 complete, 0 to redo from saved attention, 2 to run through the model" in log
    recorded = bbox_of(out, "r0")["collect_settings"]["weights"]["files"]
    assert recorded["model.safetensors"] == [weights.stat().st_size, weights.stat().st_mtime_ns]


def test_a_hub_checkpoint_is_identified_by_its_cached_revision(tmp_path):
    """<cache>/models--org--name/snapshots/<commit>/: a new revision is other weights."""
    repo = tmp_path / "models--org--vlm"
    for commit in ("1111111111111111111111111111111111111111", "2222222222222222222222222222222222222222"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1111111111111111111111111111111111111111")
    first = settings.weights_identity("org/vlm", str(tmp_path))
    (repo / "refs" / "main").write_text("2222222222222222222222222222222222222222")
    second = settings.weights_identity("org/vlm", str(tmp_path))
    assert first == {"revision": "1" * 40} and second == {"revision": "2" * 40}
    now = {"model": "org/vlm", "weights": second}
    assert settings.collect_change({"model": "org/vlm", "weights": first}, now) == "model weights changed"
    assert settings.collect_change({"model": "org/vlm", "weights": second}, now) is None
    assert settings.collect_change({"model": "org/vlm", "weights": first}, dict(now, weights=None)) is None
