"""stage=check_layout: prove on the user's own checkpoint that the layout puts every image token where
its pixels are.

A test on a tiny checkpoint cannot promise that a real one is mapped right: hub configs differ from the
classes' defaults (pixel ranges, tile limits, pinpoints). This check asks the model itself:

1. The vision encoder is made local for the check's duration: forward hooks zero the output of every
   module that mixes patches (adapter.vision_token_mixers(): by default every attention module of the
   vision encoder), and a CNN tower's spatial kernels are cut to their centre taps
   (adapter.local_kernels()), so each image token depends on its own pixels only. Nothing else
   changes; the hooks are removed afterwards.
2. For each image size (several aspect ratios, so tiling, pinpoints and crops are exercised), the layout
   of the unpainted image picks two target cells per view (a tile, the thumbnail, the base or high-res
   view, a crop), off the diagonal. One image per target is painted with a small rectangle — 40 % of the
   target cell per axis, centred on it, in a colour contrasting with what is there — and run up to the
   language model's input: a forward pre-hook on adapter.embedding_module() reads `inputs_embeds`
   (image features already merged into the text) and stops the call, so the language model never runs.
3. A cell token is hit when its input embedding moved by more than CHANGED of the largest move in its
   map. In every map, every hit cell must lie within one cell of the painted rectangle, and the target
   cell itself must be hit. A transposed grid, a one-cell shift or swapped tiles fail both ways.
   When no rectangle moves any token at all, there is nothing to judge: the check raises.

One line per view (image size, view, rectangles aimed at it, cells hit, cells the rectangles overlap,
cells misplaced); the stage exits 0 when nothing is misplaced, 2 otherwise.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from localization_heads.families.base import Adapter, Prepared
from localization_heads.layout import Layout, cell_boxes

SQUARE = 0.4        # painted rectangle: this share of its target cell's width and height
CHANGED = 0.02      # a token is hit when it moved by more than this share of its map's largest move
NOISE = 1e-3        # ... and by more than this share of the median image-token embedding norm
QUERY = "the red circle ."   # words every tiny test vocabulary has


class _Reached(Exception):
    """Raised by the pre-hook to stop the model at the language model's input."""

    def __init__(self, embeds: torch.Tensor):
        super().__init__("inputs_embeds reached")
        self.embeds = embeds


@contextmanager
def local_vision(adapter: Adapter):
    """Zero the output of every patch-mixing module of the image path while inside; yields the list
    of calls seen (one entry per hooked call), so the caller can tell the hooks ran."""
    mixers = adapter.vision_token_mixers()
    if not mixers:
        raise RuntimeError(f"{type(adapter).__name__}: no attention module found in the vision encoder; the family "
                           "must say which modules mix patches (Adapter.vision_token_mixers)")
    calls = []

    def zero(module, args, output):
        calls.append(type(module).__name__)
        if isinstance(output, torch.Tensor):
            return torch.zeros_like(output)
        if isinstance(output, tuple) and isinstance(output[0], torch.Tensor):
            return (torch.zeros_like(output[0]), *output[1:])
        raise TypeError(f"{type(module).__name__} returns {type(output).__name__}; cannot zero it")

    handles = [m.register_forward_hook(zero) for m in mixers]
    try:
        with adapter.local_kernels():
            yield calls
    finally:
        for h in handles:
            h.remove()


def image_embeddings(adapter: Adapter, prepared: Prepared) -> list[torch.Tensor]:
    """Per row, [V, D] float32 CPU: the language model's input embedding of each cell token, in the
    layout's order. The call stops at the language model's input."""
    module = adapter.embedding_module()

    def stop(mod, args, kwargs):
        embeds = kwargs.get("inputs_embeds", args[0] if args else None)
        if embeds is None:
            raise RuntimeError(f"{type(mod).__name__} was called without inputs_embeds; the family must name the "
                               "module that receives the merged image features (Adapter.embedding_module)")
        raise _Reached(embeds)

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        adapter.model(**adapter.call_inputs(prepared), use_cache=False)
    except _Reached as reached:
        embeds = reached.embeds                                                   # [B, N, D]
    else:
        raise RuntimeError(f"the model never called {type(module).__name__} (Adapter.embedding_module)")
    finally:
        handle.remove()
    return [embeds[b, positions.to(embeds.device)].float().cpu() for b, positions in enumerate(prepared.image_positions)]


# ---------------------------------------------------------------- where to paint

def view_name(map_name: str) -> str:
    """The view a map belongs to: a high-res view split into uniform runs ("highres_r3_c0") is one view."""
    return re.sub(r"_r\d+_c\d+$", "", map_name)


@dataclass(frozen=True)
class Target:
    map_index: int
    cell: int
    box: tuple[int, int, int, int]     # painted pixels [x0, y0, x1, y1) of the original image


def targets(layout: Layout) -> list[Target]:
    """Two cells per view, nearest to (¾, ¼) and (¼, ¾) of the view (off the diagonal, so a transposed
    grid moves them), among the cells that lie inside the image; each with its painted rectangle."""
    width, height = layout.image_size
    by_view: dict[str, list[int]] = {}
    for i, m in enumerate(layout.maps):
        by_view.setdefault(view_name(m.name), []).append(i)
    out = []
    for indices in by_view.values():
        cells = [(i, k, box) for i in indices for k, box in enumerate(cell_boxes(layout.maps[i]))
                 if box[0] >= -1e-6 and box[1] >= -1e-6 and box[2] <= width + 1e-6 and box[3] <= height + 1e-6]
        if not cells:
            continue
        boxes = np.array([box for _, _, box in cells])
        x0, y0, x1, y1 = boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        chosen = []
        for fx, fy in ((0.75, 0.25), (0.25, 0.75)):
            point = np.array([x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)])
            pick = int(np.argmin(((centres - point) ** 2).sum(axis=1)))
            if pick not in chosen:
                chosen.append(pick)
        out += [Target(cells[p][0], cells[p][1], _rectangle(cells[p][2], width, height)) for p in chosen]
    return out


def _rectangle(cell: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Whole pixels of a SQUARE-sized rectangle centred on the cell box (at least one pixel)."""
    cx, cy = (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2
    hw, hh = SQUARE * (cell[2] - cell[0]) / 2, SQUARE * (cell[3] - cell[1]) / 2
    x0, y0 = int(np.ceil(cx - hw)), int(np.ceil(cy - hh))
    x1, y1 = max(int(np.floor(cx + hw)), x0 + 1), max(int(np.floor(cy + hh)), y0 + 1)
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def paint(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """A copy with `box` filled in the colour farthest from what is there (per channel 0 or 255)."""
    region = np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    colour = tuple(0 if v >= 128 else 255 for v in region)
    out = image.copy()
    out.paste(colour, box)
    return out


# ---------------------------------------------------------------- judging

@dataclass
class ViewResult:
    size: tuple[int, int]
    view: str
    aimed: int = 0          # rectangles aimed at this view
    hit: int = 0            # cells hit, over all rectangles
    expected: int = 0       # cells the rectangles overlap, over all rectangles
    misplaced: int = 0      # hit cells more than one cell from a rectangle, plus target cells not hit

    def line(self) -> str:
        status = "ok" if self.misplaced == 0 else "MISPLACED"
        return (f"{self.size[0]}x{self.size[1]} {self.view:<12} rectangles {self.aimed:<2} cells hit {self.hit:<4} "
                f"expected {self.expected:<4} misplaced {self.misplaced:<3} {status}")


def _overlaps(boxes: np.ndarray, box, grow_w: float = 0.0, grow_h: float = 0.0) -> np.ndarray:
    """[n] bool: cell boxes (each grown by grow_w / grow_h on every side) overlap `box` with positive area."""
    x0, y0, x1, y1 = box
    return ((np.minimum(boxes[:, 2] + grow_w, x1) > np.maximum(boxes[:, 0] - grow_w, x0))
            & (np.minimum(boxes[:, 3] + grow_h, y1) > np.maximum(boxes[:, 1] - grow_h, y0)))


def judge(layout: Layout, target: Target, moved: np.ndarray, floor: float, results: dict[str, ViewResult]) -> None:
    """Add one painted image's verdict to the per-view results; moved: [V] how far each token moved."""
    for i, m in enumerate(layout.maps):
        d = moved[m.start: m.start + m.size]
        top = float(d.max())
        hits = d > max(CHANGED * top, floor) if top > floor else np.zeros(m.size, bool)
        boxes = cell_boxes(m)
        cell_w, cell_h = (m.box[2] - m.box[0]) / m.grid[1], (m.box[3] - m.box[1]) / m.grid[0]
        near = _overlaps(boxes, target.box, cell_w, cell_h)
        result = results[view_name(m.name)]
        result.hit += int(hits.sum())
        result.expected += int(_overlaps(boxes, target.box).sum())
        result.misplaced += int((hits & ~near).sum())
        if i == target.map_index:
            result.aimed += 1
            result.misplaced += int(not hits[target.cell])


@torch.inference_mode()
def check_image(adapter: Adapter, image: Image.Image, batch_size: int = 4) -> list[ViewResult]:
    """Per view of `image`'s layout, the verdict of its painted rectangles (see the module docstring)."""
    with local_vision(adapter) as calls:
        base = adapter.prepare([image], [QUERY])
        layout = base.layouts[0]
        (reference,) = image_embeddings(adapter, base)                                # [V, D]
        if not calls:
            raise RuntimeError("the vision encoder's attention modules never ran: Adapter.vision_token_mixers "
                               "names modules the image path does not use")
        floor = NOISE * float(reference.norm(dim=-1).median())
        results = {view_name(m.name): ViewResult(image.size, view_name(m.name)) for m in layout.maps}
        aims = targets(layout)
        largest = 0.0
        for start in range(0, len(aims), batch_size):
            chunk = aims[start: start + batch_size]
            prepared = adapter.prepare([paint(image, t.box) for t in chunk], [QUERY] * len(chunk))
            for target, row_layout, embeds in zip(chunk, prepared.layouts, image_embeddings(adapter, prepared)):
                if row_layout != layout:
                    raise RuntimeError(f"painting changed the layout of a {image.size} image")
                moved = (embeds - reference).norm(dim=-1).numpy()                     # [V]
                largest = max(largest, float(moved.max()))
                judge(layout, target, moved, floor, results)
        # Nothing moved at all says nothing about the layout: without this, every view would read as misplaced.
        if aims and largest <= floor:
            raise RuntimeError(f"no painted rectangle moved any image token of a {image.size} image (largest move "
                               f"{largest:.3g}, noise floor {floor:.3g}): the image features do not reach "
                               f"{type(adapter.embedding_module()).__name__}'s inputs_embeds, or are negligible "
                               "next to the token embeddings they are added to")
    return list(results.values())


def check_layout(adapter: Adapter, image: Image.Image, sizes: list[tuple[int, int]],
                 batch_size: int = 4) -> list[ViewResult]:
    """check_image at each (width, height), the image stretched to it; prints one line per view."""
    results = []
    for width, height in sizes:
        sized = image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)
        for result in check_image(adapter, sized, batch_size):
            print(f"check_layout {result.line()}", flush=True)
            results.append(result)
    return results


def builtin_image() -> Image.Image:
    """512×512, R rising left to right, G top to bottom, B in 64 px checks: no two regions alike."""
    ramp = np.linspace(0, 255, 512)
    checks = ((np.arange(512)[:, None] // 64 + np.arange(512)[None, :] // 64) % 2) * 160 + 48
    rgb = np.stack([np.broadcast_to(ramp[None, :], (512, 512)), np.broadcast_to(ramp[:, None], (512, 512)),
                    checks], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
