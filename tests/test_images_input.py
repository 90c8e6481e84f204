"""Images as they are: one rule for the model and the figure."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localization_heads import cli as pipeline
from localization_heads.dataio import InputError
from tests.cli_runs import EXIT_OK, cli, rows_file, batch_args


# ---------------------------------------------------------------- images as they are

def odd_images(where: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name → (file, the RGB pixels the rule in images.py says the model must see)."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)            # 0 .. 64,491
    Image.fromarray(ramp).save(where / "gray16.png")
    out["gray16"] = (where / "gray16.png", np.repeat(np.rint(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=2))

    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([200, 30, 30, 30, 30, 200] + [0] * 762)
    palette.paste(1, (0, 0, 32, 48))                                              # left half: colour 1, transparent
    palette.save(where / "palette.png", transparency=1)
    expected = np.zeros((48, 64, 3), np.uint8)
    expected[:, :32], expected[:, 32:] = 255, (200, 30, 30)
    out["palette"] = (where / "palette.png", expected)

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (0, 100, 200), np.linspace(0, 255, 64).astype(np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(where / "rgba.png")
    a = rgba[..., 3:4] / 255.0
    out["rgba"] = (where / "rgba.png", np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8))

    la = np.stack([np.full((48, 64), 40, np.uint8), np.full((48, 64), 128, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(where / "la.png")
    out["la"] = (where / "la.png", np.full((48, 64, 3), round(40 * 128 / 255 + 255 * 127 / 255), np.uint8))

    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(where / "cmyk.tif")
    out["cmyk"] = (where / "cmyk.tif", np.broadcast_to(np.array([255, 0, 0], np.uint8), (48, 64, 3)))

    Image.new("L", (64, 48), 90).save(where / "gray.png")
    out["gray"] = (where / "gray.png", np.full((48, 64, 3), 90, np.uint8))

    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :16] = (250, 250, 0)                                                # yellow band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6                                                              # "rotate 90° clockwise to view"
    Image.fromarray(stored).save(where / "exif.png", exif=exif)
    out["exif"] = (where / "exif.png", stored)

    frames = [Image.new("RGB", (64, 48), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(where / "anim.gif", save_all=True, append_images=frames[1:])
    out["anim"] = (where / "anim.gif", np.broadcast_to(np.array([255, 0, 0], np.uint8), (48, 64, 3)))
    return out


def test_images_are_read_by_one_stated_rule(tmp_path, caplog):
    from localization_heads.images import load_image

    caplog.set_level("INFO")
    for name, (path, expected) in odd_images(tmp_path).items():
        got = np.asarray(load_image(path))
        assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1, name
    assert "anim.gif: animated (3 frames); the model sees the first frame only" in caplog.text
    assert "exif.png: EXIF orientation 6 is not applied" in caplog.text


def test_a_float_image_is_refused_not_guessed(tmp_path):
    from localization_heads.images import load_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="float.tif: 32-bit float image"):
        load_image(tmp_path / "float.tif")


def test_the_model_and_the_figure_see_the_same_converted_pixels(cli, tmp_path, monkeypatch):
    from localization_heads import batch
    from localization_heads import viz

    seen_by_model, drawn = [], {}
    real_collect, real_figure = batch.collect, viz.figure_png

    def spy_collect(adapter, images, queries, **kw):
        seen_by_model.extend(np.asarray(image) for image in images)
        return real_collect(adapter, images, queries, **kw)

    def spy_figure(image, attn, meta, heads, result, **labels):
        drawn[meta["id"]] = np.asarray(image)
        return real_figure(image, attn, meta, heads, result, **labels)

    monkeypatch.setattr(batch, "collect", spy_collect)
    monkeypatch.setattr(viz, "figure_png", spy_figure)
    images = odd_images(tmp_path / "images")
    rows = [{"id": name, "prompt": "the square .", "image_path": str(path)} for name, (path, _) in images.items()]
    code, _ = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out", "data.visualize_batch=true"))
    assert code == EXIT_OK
    for name, (_, expected) in images.items():
        assert any(m.shape == expected.shape and np.abs(m.astype(int) - expected).max() <= 1 for m in seen_by_model), name
        assert np.abs(drawn[name].astype(int) - expected).max() <= 1, name


def test_a_huge_image_is_drawn_small_in_bounded_memory():
    """A 2000 × 1500 image took 300 MB and 10 s to draw (a 10,000² one 12 GB); the figure is
    drawn from the image scaled to at most 512 px on its longest side."""
    import tracemalloc

    from localization_heads import bbox
    from localization_heads import viz
    from localization_heads.config import LogicSettings
    from localization_heads.families.llava import compute_geometry

    image = Image.new("RGB", (2000, 1500), (40, 90, 40))
    geometry = compute_geometry(image.size, (14, 14), pad=True)
    attn = torch.rand(3, 4, 1, 196)
    logic = LogicSettings.from_config(pipeline.compose("logic=paper").logic)
    loc = bbox.locate(bbox.combine_heads(attn, (14, 14), [(1, 1)], 1.0), geometry, logic.mask)
    heads = [{"layer": 1, "head": 1, "spatial_entropy": 0.5}]
    tracemalloc.start()
    try:
        png = viz.figure_png(image, attn, {"layout": geometry.to_dict(), "query": "x"}, heads, loc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6 and Image.open(io.BytesIO(png)).size[0] < 1600   # the figure, not the image, sets its size
