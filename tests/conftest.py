"""Shared fixtures: tiny checkpoints in both formats (built once per session) and small images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests import tiny_models


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    return tiny_models.write_hf_checkpoint(tmp_path_factory.mktemp("llava-hf"))


@pytest.fixture(scope="session")
def hf_crop_checkpoint(tmp_path_factory) -> Path:
    return tiny_models.write_hf_checkpoint(tmp_path_factory.mktemp("llava-hf-crop"), pad=False)


@pytest.fixture(scope="session")
def original_checkpoint(tmp_path_factory) -> Path:
    return tiny_models.write_original_checkpoint(tmp_path_factory.mktemp("llava-original"))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two non-square scenes (one wide, one tall) and a square one."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for name, size, box in [("wide", (96, 64), (10, 20, 40, 50)), ("tall", (48, 80), (8, 40, 40, 72)),
                            ("square", (64, 64), (30, 5, 60, 35))]:
        im = Image.new("RGB", size, (40, 90, 40))
        ImageDraw.Draw(im).ellipse(box, fill=(220, 20, 20))
        im.save(folder / f"{name}.png")
        out[name] = folder / f"{name}.png"
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
