"""Shapes world: procedurally generated scenes with referring expressions (issue #3).

A scene is a textured canvas (width, height drawn from 96..160 px, often non-square) holding 1-4
non-overlapping coloured shapes. Every object that can be singled out gets one referring
expression ("the red circle .", "the big square .", "the triangle on the left .") whose referent
is checked to be unique. The bundled toy LLaVA (lab/train_toy.py) is trained on these scenes.

The model sees the canvas padded to a centred square (fill = CLIP mean colour), resized to
112x112 and cut into 8 px patches: a 14x14 grid. `oracle_grid_map` projects an object's pixel
mask onto that grid; it is the oracle baseline and the training target of the induced heads.

Each row carries the referent's exact pixel mask as COCO RLE (`segmentation`), so referring
segmentation (cIoU) can be scored on the toy world as on RefCOCO.

CLI: python -m lab.toyworld --n N --seed S --out DIR  ->  DIR/images/*.png, DIR/data.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from localization_heads import cocomask

COLOURS = {  # name -> RGB; saturated so they stand out from the grey-ish backgrounds
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 205, 35),
    "purple": (145, 55, 185),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
# Object side as a fraction of the padded square's side, so "big"/"small" look the same to the
# model whatever the canvas size (the model only sees the 112 px resized square).
SIZE_FRAC = {"small": (0.22, 0.27), "big": (0.36, 0.44)}
TRIANGLE_SCALE = 1.2  # a triangle fills half its box: enlarge it so its area matches the others
CANVAS_RANGE = (96, 160)
PAD_FILL = (122, 116, 104)  # int(255 * OPENAI_CLIP_MEAN), what the llava processor pads with
GRID = (14, 14)  # (rows, cols) of the model's patch grid
HPOS = ("left", "center", "right")
VPOS = ("top", "middle", "bottom")

# Every word the expressions and answers use: the toy model's word-level vocabulary.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    ["the", "on", ".", "object"]
    + list(COLOURS) + list(SHAPES) + list(SIZES)
    + ["left", "right", "top", "bottom", "center", "middle"]
)
VOCAB = SPECIAL_TOKENS + WORDS


@dataclass(eq=False)  # identity comparison: masks are arrays
class SceneObject:
    colour: str
    shape: str
    size: str
    mask: np.ndarray  # [H, W] bool
    bbox: list  # [x0, y0, x1, y1] pixels, half-open

    @property
    def centre(self) -> tuple:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def attrs(self, width: int, height: int) -> dict:
        cx, cy = self.centre
        return {
            "colour": self.colour, "shape": self.shape, "size": self.size, "bbox": list(self.bbox),
            "hpos": HPOS[min(2, int(3 * cx / width))], "vpos": VPOS[min(2, int(3 * cy / height))],
        }


@dataclass
class Scene:
    image: Image.Image
    objects: list
    expressions: list = field(default_factory=list)  # [(object index, expression text)]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def answer_words(target: dict) -> list:
    """What the toy model is trained to say about the referent: colour shape size hpos vpos."""
    return [target["colour"], target["shape"], target["size"], target["hpos"], target["vpos"]]


# ----------------------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-saturation texture: base grey + smooth blobs + stripes or pixel noise. [H, W, 3] float."""
    base = rng.uniform(70, 190) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
    # A few soft blobs of lighter/darker tone.
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(15, 60)
        img += rng.uniform(-30, 30) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    if rng.random() < 0.5:  # stripes at a random angle
        ang, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        img += rng.uniform(5, 18) * np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period)[..., None]
    img += rng.normal(0, rng.uniform(3, 12), size=img.shape)
    return img


def _shape_mask(shape: str, width: int, height: int, box: tuple) -> np.ndarray:
    """[H, W] bool mask of `shape` inscribed in box (x0, y0, x1, y1), half-open pixels."""
    x0, y0, x1, y1 = box
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:  # upward triangle
        d.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    return np.asarray(m) > 0


def _mask_bbox(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _place_objects(rng: np.random.Generator, width: int, height: int) -> list:
    """Attributes and boxes of 1-4 objects whose boxes keep a gap of about half a grid cell."""
    side = max(width, height)
    gap = side / GRID[0] / 2
    n_want = int(rng.integers(1, 5))
    placed = []  # (colour, shape, size, box)
    for _ in range(n_want):
        if placed and rng.random() < 0.35:
            # Re-use an attribute of an earlier object so that expressions must disambiguate.
            c, s, _, _ = placed[int(rng.integers(len(placed)))]
            colour = c if rng.random() < 0.5 else str(rng.choice(list(COLOURS)))
            shape = s if colour != c else str(rng.choice(SHAPES))
        else:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        size = str(rng.choice(SIZES))
        for _attempt in range(30):
            d = int(round(side * rng.uniform(*SIZE_FRAC[size]) * (TRIANGLE_SCALE if shape == "triangle" else 1)))
            if d > min(width, height) - 4:
                break
            x0 = int(rng.integers(2, width - d - 1))
            y0 = int(rng.integers(2, height - d - 1))
            box = (x0, y0, x0 + d, y0 + d)
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for *_, b in placed):
                placed.append((colour, shape, size, box))
                break
    return placed


def is_relational(expression: str) -> bool:
    """True for expressions that single out their object by position among look-alikes ("... on the left .")."""
    return " on the " in expression


def _expressions_for(objs: list, i: int, width: int, height: int) -> list:
    """All expressions that single out object i among objs; [] if none does."""
    t = objs[i]
    out = []
    keysets = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",)]
    for keys in keysets:
        same = [o for o in objs if all(getattr(o, k) == getattr(t, k) for k in keys)]
        words = [getattr(t, k) for k in keys] + (["object"] if keys == ("colour",) else [])
        if len(same) == 1:
            out.append(" ".join(["the"] + words))
            continue
        if keys == ("colour",):
            continue
        # Several matches: the referent may still be the clear extreme along one axis.
        margin = max(width, height) / 10
        for axis, lo, hi in ((0, "left", "right"), (1, "top", "bottom")):
            mine = t.centre[axis]
            others = [o.centre[axis] for o in same if o is not t]
            if all(mine < v - margin for v in others):
                out.append(" ".join(["the"] + words + ["on", "the", lo]))
            if all(mine > v + margin for v in others):
                out.append(" ".join(["the"] + words + ["on", "the", hi]))
    return out


def make_scene(rng: np.random.Generator) -> Scene:
    """One random scene with one expression per object that can be singled out."""
    while True:
        if rng.random() < 0.25:
            width = height = int(rng.integers(CANVAS_RANGE[0], CANVAS_RANGE[1] + 1))
        else:
            width, height = (int(v) for v in rng.integers(CANVAS_RANGE[0], CANVAS_RANGE[1] + 1, size=2))
        img = _background(rng, width, height)
        objs = []
        for colour, shape, size, box in _place_objects(rng, width, height):
            mask = _shape_mask(shape, width, height, box)
            rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-15, 15, size=3)
            shade = rng.normal(0, 6, size=(height, width, 1))  # keeps objects slightly textured
            img = np.where(mask[..., None], rgb + shade, img)
            objs.append(SceneObject(colour, shape, size, mask, _mask_bbox(mask)))
        exprs = []
        for i in range(len(objs)):
            options = _expressions_for(objs, i, width, height)
            if options:
                exprs.append((i, str(rng.choice(options)) + " ."))
        if exprs:
            image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
            return Scene(image, objs, exprs)


# ----------------------------------------------------------------------------- grid geometry

def _cell_weights(n_pix: int, offset: int, side: int, n_cells: int) -> np.ndarray:
    """[n_cells, n_pix]: fraction of each padded-square grid cell covered by each original pixel."""
    edges = np.arange(n_cells + 1) * side / n_cells
    lo = np.arange(n_pix) + offset
    overlap = np.clip(np.minimum(edges[1:, None], lo[None, :] + 1) - np.maximum(edges[:-1, None], lo[None, :]), 0, None)
    return overlap / (side / n_cells)


def oracle_grid_map(obj_mask: np.ndarray, width: int, height: int, grid: tuple = GRID) -> np.ndarray:
    """[rows, cols] fraction of each cell of the centred padded square covered by the object.

    obj_mask: [height, width] bool in original pixels. The square has side max(width, height) and
    the canvas starts at ((side - width) // 2, (side - height) // 2), as the llava processor pads.
    """
    side = max(width, height)
    wy = _cell_weights(height, (side - height) // 2, side, grid[0])  # [rows, H]
    wx = _cell_weights(width, (side - width) // 2, side, grid[1])  # [cols, W]
    return wy @ obj_mask.astype(np.float64) @ wx.T


# A cell that is exactly half covered sums to 0.5 in exact arithmetic but, by the order the CPU's BLAS
# adds in, to 0.49999999999999994 on some machines (AMD EPYC): "at least half" allows for that.
COVER_TOL = 1e-9


def half_covered(cov: np.ndarray) -> np.ndarray:
    """[rows, cols] bool: the cells an oracle_grid_map covers at least half of (within COVER_TOL)."""
    return cov >= 0.5 - COVER_TOL


def cells_to_box(cells: np.ndarray, width: int, height: int) -> list:
    """Union box of the True cells of a [rows, cols] grid, mapped back to original pixels."""
    rows, cols = cells.shape
    side = max(width, height)
    ys, xs = np.nonzero(cells)
    ox, oy = (side - width) // 2, (side - height) // 2
    x0 = xs.min() * side / cols - ox
    x1 = (xs.max() + 1) * side / cols - ox
    y0 = ys.min() * side / rows - oy
    y1 = (ys.max() + 1) * side / rows - oy
    return [float(np.clip(x0, 0, width)), float(np.clip(y0, 0, height)),
            float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height))]


def oracle_box(obj_mask: np.ndarray, width: int, height: int, grid: tuple = GRID) -> list:
    """Box of the cells the object covers at least half of (the most covered cell if none)."""
    cov = oracle_grid_map(obj_mask, width, height, grid)
    cells = half_covered(cov)
    if not cells.any():
        cells = cov >= cov.max()
    return cells_to_box(cells, width, height)


# ----------------------------------------------------------------------------- dataset files

def scene_rows(scene: Scene, scene_id: str, image_path: str) -> list:
    """One JSONL row per expression of the scene; `segmentation` is the referent's exact mask (the
    pixels painted with its colour) as COCO RLE, the ground truth of stage=evaluate's cIoU."""
    w, h = scene.width, scene.height
    objects = [o.attrs(w, h) for o in scene.objects]
    return [
        {"id": f"{scene_id}_{k}", "prompt": expr, "image_path": image_path, "bbox": objects[i]["bbox"],
         "width": w, "height": h, "segmentation": cocomask.encode(scene.objects[i].mask),
         "target": dict(objects[i], index=i), "objects": objects}
        for k, (i, expr) in enumerate(scene.expressions)
    ]


def write_dataset(n: int, seed: int, out_dir: str) -> str:
    """Writes n scenes to out_dir/images/*.png and their expressions to out_dir/data.jsonl."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        for s in range(n):
            scene = make_scene(rng)
            rel = f"images/s{s:05d}.png"
            scene.image.save(os.path.join(out_dir, rel))
            for row in scene_rows(scene, f"s{s:05d}", rel):
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    path = write_dataset(args.n, args.seed, args.out)
    with open(path) as f:
        print(f"wrote {sum(1 for _ in f)} expressions from {args.n} scenes to {path}")


if __name__ == "__main__":
    main()
