"""stage=check_layout as a specification: on every family's tiny checkpoint (the builders of the family
tests) the model itself confirms the layout — each painted rectangle moves its target cell's input
embedding and no token more than one cell away — and a deliberately wrong layout (a transposed grid, a
one-cell shift, swapped tiles) is caught at every image size.

The tiny checkpoints tile at a fifth of the real scale (56–64 px tiles), so the sizes here are the
default sizes' aspect ratios at a fifth of their pixels: the same tilings, pinpoints and crops appear.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch

from localization_heads.check_layout import (builtin_image, check_image, local_vision, targets, view_name)
from localization_heads.families import load_adapter
from localization_heads.families.base import Prepared
from localization_heads.layout import Layout
from tests import tiny_models, tiny_qwen
from tests.family_checks import coord_image, model_cfg

SIZES = [(160, 120), (240, 80), (80, 200), (100, 100)]      # config's defaults / 5
ELONGATED = [(240, 80), (80, 200)]                          # tiled or cropped in every tiled family


def _next(out):
    from tests.test_family_llava_next import write_next
    return write_next(out)


def _onevision(out):
    from tests.test_family_llava_next import write_onevision
    return write_onevision(out)


def _internvl(out):
    from tests.test_family_internvl import write_checkpoint
    return write_checkpoint(out)


def _gemma3(out):
    from tests.test_family_gemma3 import write_checkpoint
    return write_checkpoint(out)


def _paligemma(out, text):
    from tests.test_family_paligemma import write_checkpoint
    return write_checkpoint(out, text)


def _idefics3(out, family):
    from tests.test_family_idefics3 import write_checkpoint
    return write_checkpoint(out, family)


def _built_by(module: str, *args):
    """The write_checkpoint(out, *args) of a family's test module, imported when used."""
    def build(out):
        import importlib
        return importlib.import_module(module).write_checkpoint(out, *args)
    return build


PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
# name: (builder(folder) → checkpoint, model config overrides)
FAMILIES = {
    "llava_hf_pad": (tiny_models.write_hf_checkpoint, {}),
    "llava_hf_crop": (lambda out: tiny_models.write_hf_checkpoint(out, pad=False), {}),
    "llava_original": (tiny_models.write_original_checkpoint, {}),
    "llava_next": (_next, {}),
    "llava_onevision": (_onevision, {}),
    **{t: (lambda out, t=t: tiny_qwen.write_checkpoint(out, t), {}) for t in tiny_qwen.MODEL_TYPES},
    "internvl": (_internvl, {}),
    "gemma3": (_gemma3, {}),
    "gemma3_pan_and_scan": (_gemma3, {"image_kwargs": PAN_AND_SCAN}),
    "paligemma": (lambda out: _paligemma(out, "gemma"), {}),
    "paligemma2": (lambda out: _paligemma(out, "gemma2"), {}),
    "idefics3": (lambda out: _idefics3(out, "idefics3"), {}),
    "smolvlm": (lambda out: _idefics3(out, "smolvlm"), {}),
    "internvl35": (_built_by("tests.test_family_internvl35"), {}),
    "aya_vision": (_built_by("tests.test_family_aya_vision"), {}),
    "glm4v": (_built_by("tests.test_family_glm4v", "glm4v"), {}),
    "llama4": (_built_by("tests.test_family_llama4"), {}),
    "lfm2_vl": (_built_by("tests.tiny_lfm2_vl"), {}),
    "gemma4": (_built_by("tests.tiny_gemma4"), {}),
    "mistral3": (_built_by("tests.test_family_mistral3"), {}),
    "molmo2": (_built_by("tests.test_family_molmo2"), {}),
    "deepseek_vl": (_built_by("tests.test_family_deepseek_vl", "deepseek_vl"), {}),
    "deepseek_vl_hybrid": (_built_by("tests.test_family_deepseek_vl", "deepseek_vl_hybrid"), {}),
    "janus": (_built_by("tests.test_family_janus"), {}),
    "ovis2_5": (_built_by("tests.test_family_ovis2_5"), {}),
    "minicpmv4_6": (_built_by("tests.test_family_minicpmv4_6"), {}),
    "cohere2_vision": (_built_by("tests.test_family_cohere2_vision"), {}),
    "phi4_multimodal": (_built_by("tests.test_family_phi4_multimodal"), {}),
    "gemma3n": (_built_by("tests.tiny_gemma3n"), {}),
}
# Their image processors exist only on the torchvision backend: checked in CI's torchvision environment.
NEEDS_TORCHVISION = ("llama4", "lfm2_vl", "cohere2_vision", "phi4_multimodal")
# Their vision towers are built by timm (which imports torchvision): checked where timm is installed.
NEEDS_TIMM = ("gemma3n",)
# Families whose images can have two views of the same grid (tiles, crops), whose tokens can be swapped.
# Not Molmo2: its low- and high-res grids are equal only for a one-crop image, where both views cover the
# same pixels cell for cell, so swapping them is no error.
TILED = ("internvl", "gemma3_pan_and_scan", "idefics3", "smolvlm", "minicpmv4_6", "cohere2_vision")


@pytest.fixture(scope="module", params=list(FAMILIES))
def adapter(request, tmp_path_factory):
    if request.param in NEEDS_TORCHVISION:
        pytest.importorskip("torchvision")
    if request.param in NEEDS_TIMM:
        pytest.importorskip("timm")
    build, overrides = FAMILIES[request.param]
    checkpoint = build(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}")
    loaded = load_adapter(model_cfg(checkpoint, **overrides))
    loaded.test_name = request.param
    return loaded


def run_check(adapter, sizes=SIZES) -> dict[tuple[int, int], list]:
    image = builtin_image()
    return {size: check_image(adapter, image.resize(size), batch_size=4) for size in sizes}


def test_every_family_passes_in_every_view(adapter):
    by_size = run_check(adapter)
    for size, results in by_size.items():
        layout = adapter.prepare([builtin_image().resize(size)], ["a"]).layouts[0]
        assert {r.view for r in results} == {view_name(m.name) for m in layout.maps}
        aimed = Counter(view_name(layout.maps[t.map_index].name) for t in targets(layout))
        assert aimed, f"{size}: no cell inside the image"
        for r in results:   # a view wholly on padding (Llama 4's padded tiles) gets no rectangle
            assert r.misplaced == 0, f"{size} {r.line()}"
            assert r.aimed == aimed[r.view] and r.hit >= r.aimed, f"{size} {r.line()}"
    if adapter.test_name in TILED:
        assert any(len(results) > 2 for results in by_size.values()), "no size was tiled"


# ---------------------------------------------------------------- deliberately wrong layouts

def _with_maps(layout: Layout, maps) -> Layout:
    return Layout(layout.method, layout.image_size, tuple(maps))


def transposed(prepared: Prepared) -> Prepared:
    """Every map's tokens read as if the (rows, cols) grid were stored column-major."""
    positions = []
    for pos, layout in zip(prepared.image_positions, prepared.layouts):
        parts = [pos[m.start: m.start + m.size].view(m.grid[1], m.grid[0]).T.reshape(-1) for m in layout.maps]
        positions.append(torch.cat(parts))
    return Prepared(prepared.inputs, positions, prepared.layouts, prepared.prompts)


def shifted(prepared: Prepared) -> Prepared:
    """Every map's box one cell to the right of where its tokens are."""
    def shift(m):
        cell = (m.box[2] - m.box[0]) / m.grid[1]
        return dataclasses.replace(m, box=(m.box[0] + cell, m.box[1], m.box[2] + cell, m.box[3]))

    layouts = [_with_maps(layout, [shift(m) for m in layout.maps]) for layout in prepared.layouts]
    return Prepared(prepared.inputs, prepared.image_positions, layouts, prepared.prompts)


def swappable(layout: Layout):
    """The first two maps of equal grids in different views (two tiles, a crop and the whole image), or None."""
    for i, a in enumerate(layout.maps):
        for b in layout.maps[i + 1:]:
            if a.grid == b.grid and view_name(a.name) != view_name(b.name):
                return a, b
    return None


def swapped(prepared: Prepared) -> Prepared:
    """Two views of equal grids trade tokens (each view's box stays)."""
    positions = []
    for pos, layout in zip(prepared.image_positions, prepared.layouts):
        pos = pos.clone()
        if swappable(layout):
            a, b = swappable(layout)
            pos[a.start: a.start + a.size], pos[b.start: b.start + b.size] = \
                pos[b.start: b.start + b.size].clone(), pos[a.start: a.start + a.size].clone()
        positions.append(pos)
    return Prepared(prepared.inputs, positions, prepared.layouts, prepared.prompts)


@pytest.mark.parametrize("broken", [transposed, shifted, swapped])
def test_a_wrong_layout_is_caught(adapter, broken, monkeypatch):
    """Transposed and shifted layouts are caught at a wide and a tall size; swapped views wherever two
    views have the same grid (both sizes, in every tiled family)."""
    if broken is swapped and adapter.test_name not in TILED:
        pytest.skip("swapped views are checked on the families in TILED")
    prepare = adapter.prepare
    monkeypatch.setattr(adapter, "prepare", lambda images, queries: broken(prepare(images, queries)))
    checked = 0
    for size, results in run_check(adapter, ELONGATED).items():
        if broken is swapped and not swappable(prepare([builtin_image().resize(size)], ["a"]).layouts[0]):
            continue
        checked += 1
        assert any(r.misplaced for r in results), f"{broken.__name__} layout passed at {size}: " + \
            "; ".join(r.line() for r in results)
    assert checked


# ---------------------------------------------------------------- the pieces

def test_targets_are_two_cells_per_view_inside_the_image_off_the_diagonal():
    """Cells on padding are never aimed at; a square grid's two targets are not on its diagonal."""
    pad = Layout.single("pad", (200, 100), (4, 4), (0, -50, 200, 150))       # rows 0 and 3 are padding
    aims = targets(pad)
    assert len(aims) == 2
    for t in aims:
        r, c = divmod(t.cell, 4)
        assert r in (1, 2) and r != c
        x0, y0, x1, y1 = t.box
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
    tiles = Layout.stack("tiles", (100, 100), [("tile_0_0", (4, 4), (0, 0, 50, 100)), ("tile_0_1", (4, 4), (50, 0, 100, 100)),
                                               ("thumbnail", (4, 4), (0, 0, 100, 100))])
    assert sorted({t.map_index for t in targets(tiles)}) == [0, 1, 2] and len(targets(tiles)) == 6


def test_the_vision_tower_is_local_only_inside_the_check(tmp_path):
    """Inside local_vision a painted patch moves only its own token; the hooks are gone afterwards."""
    adapter = load_adapter(model_cfg(tiny_models.write_hf_checkpoint(tmp_path / "llava")))
    image = coord_image(56, 56)
    painted = image.copy()
    painted.paste((0, 0, 0), (0, 0, 8, 8))                                  # the first 8 px patch only

    def features(im):                                                      # [V, D]
        pixels = adapter.prepare([im], ["a"]).inputs["pixel_values"]
        return adapter.model.get_image_features(pixel_values=pixels).pooler_output[0]

    def moved():                                                           # [V] bool
        return (features(image) - features(painted)).norm(dim=-1) > 1e-6

    with torch.inference_mode():
        before = moved()
        with local_vision(adapter) as calls:
            inside = moved()
        after = moved()
    assert calls and inside.nonzero().flatten().tolist() == [0]
    assert before.all() and torch.equal(before, after)


def test_image_features_that_reach_no_embedding_are_an_error_not_a_misplaced_layout(hf_checkpoint):
    """When painting moves no token at all (features never merged, or negligible next to the token
    embeddings they are added to), the check says so instead of calling every view misplaced."""
    adapter = load_adapter(model_cfg(hf_checkpoint))
    projector = adapter.model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        with pytest.raises(RuntimeError, match="no painted rectangle moved any image token"):
            check_image(adapter, builtin_image().resize((160, 120)))
    finally:
        handle.remove()


# ---------------------------------------------------------------- the stage

def _run(*overrides: str) -> int:
    from localization_heads import cli

    return cli.execute(cli.compose("stage=check_layout", "model=toy", *overrides))


def test_the_stage_prints_one_line_per_view_and_exits_0(hf_checkpoint, tmp_path, capsys):
    """The default sizes on the built-in image, then a user's image at its own size first."""
    assert _run(f"model.name={hf_checkpoint}") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check_layout ")]
    assert [line.split()[1] for line in lines] == ["800x600", "1200x400", "400x1000", "500x500"]
    assert all(line.split()[2] == "grid" and line.endswith(" ok") for line in lines)
    image = tmp_path / "photo.png"
    coord_image(300, 200).save(image)
    assert _run(f"model.name={hf_checkpoint}", f"data.image_file={image}", "check_layout.sizes=[[90,60]]") == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("check_layout ")] == ["300x200", "90x60"]


def test_the_stage_exits_2_when_the_layout_is_wrong(hf_checkpoint, monkeypatch, capsys):
    from localization_heads.families.llava import HFLlavaAdapter

    prepare = HFLlavaAdapter.prepare
    monkeypatch.setattr(HFLlavaAdapter, "prepare", lambda self, images, queries: shifted(prepare(self, images, queries)))
    assert _run(f"model.name={hf_checkpoint}", "check_layout.sizes=[[160,120]]") == 2
    assert "MISPLACED" in capsys.readouterr().out


@pytest.mark.parametrize("sizes", ["[[800]]", "[[0,10]]", "[]", "800"])
def test_bad_sizes_are_refused_before_the_model_loads(sizes, caplog):
    assert _run("model.name=/nonexistent", f"check_layout.sizes={sizes}") == 2
    assert "check_layout.sizes" in caplog.text and "[width, height]" in caplog.text
