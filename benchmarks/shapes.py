"""Real attention-file shapes of five 7B-class models for one 640×480 image (a typical COCO /
RefCOCO picture): L and H from each model's published config, the layout (hence V) from the
family's own geometry code with the published processor settings, and a meta with the keys
collector.collect and stage=batch write. Shared by bench_storage.py and bench_postprocess.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from localization_heads.collector import FORMAT
from localization_heads.families.gemma3 import views_layout
from localization_heads.families.internvl import tiles_layout
from localization_heads.families.llava import compute_geometry
from localization_heads.families.llava_next import anyres_tokens
from localization_heads.layout import Layout, legacy_keys

IMAGE = (640, 480)   # (W, H)


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    num_layers: int
    num_heads: int
    layout: Layout

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens


def llava15(size) -> Layout:        # CLIP-L/14 at 336 px, pad to square: 24×24
    return compute_geometry(size, (24, 24), pad=True, shortest_edge=336, crop_size=(336, 336)).layout()


def qwen25vl(size) -> Layout:       # patch 14, 2×2 merge, min/max_pixels of the released processor
    height, width = smart_resize(size[1], size[0], factor=28, min_pixels=3136, max_pixels=12845056)
    return Layout.single("smart_resize", size, (height // 28, width // 28), (0, 0, *size))


def onevision(size) -> Layout:      # SigLIP 384 px / 14, anyres_max_9, pinpoints 1×1 … 6×6 tiles
    pinpoints = [(384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7)]
    return anyres_tokens(size, 384, 14, pinpoints, max_tiles=9)[0]


def internvl3(size) -> Layout:      # 448 px tiles of 16×16 tokens, 1..12 tiles + thumbnail
    cols, rows = get_optimal_tiled_canvas((size[1], size[0]), (448, 448), 1, 12)
    return tiles_layout(size, (rows, cols), 16)


def gemma3(size) -> Layout:         # SigLIP 896 px pooled to 16×16, pan-and-scan off (the default)
    return views_layout(size, [], 16)


SHAPES = [
    Shape("LLaVA-1.5-7B", "llava_original", 32, 32, llava15(IMAGE)),
    Shape("Qwen2.5-VL-7B", "qwen_vl", 28, 28, qwen25vl(IMAGE)),
    Shape("LLaVA-OneVision-7B", "llava_onevision", 28, 28, onevision(IMAGE)),
    Shape("InternVL3-8B", "internvl", 28, 28, internvl3(IMAGE)),
    Shape("Gemma 3 4B", "gemma3", 34, 8, gemma3(IMAGE)),
]


def random_record(shape: Shape, seed: int = 0, image_file: str = "image.png") -> dict:
    """A record as stage=batch holds it before writing: attn [L, H, 1, V] float32 rows that sum to
    1 over the whole sequence (here: 0.6 of it on the image, peaked around one cell per head), and
    a meta with every key collector.collect and batch put there."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, v = shape.num_layers, shape.num_heads, shape.num_tokens
    logits = torch.randn(layers, heads, 1, v, generator=g)
    peak = torch.randint(0, v, (layers, heads, 1, 1), generator=g)
    logits += 4.0 * (torch.arange(v) == peak)
    attn = 0.6 * logits.softmax(-1)
    meta = {"format": FORMAT, "query": "the man on the left in a red shirt", "prompt": "<image>\nthe man on the left in a red shirt",
            "model_name": shape.name, "family": shape.family, "image_size": list(shape.layout.image_size),
            "vis_len": v, "num_layers": layers, "num_heads": heads, "layout": shape.layout.to_dict(),
            **legacy_keys(shape.layout), "mode": "forward", "attn_capture": "sdpa", "model_dtype": "bfloat16",
            "image_file": image_file, "id": f"row{seed}", "gt_bbox": [100.0, 80.0, 300.0, 400.0],
            "collect_settings": {"model": shape.name, "family": "auto", "conv_mode": "auto", "query_at": "expression",
                                 "image_kwargs": None, "attn_capture": "sdpa", "use_generate": False,
                                 "max_new_tokens": 8, "do_sample": False, "num_beams": 1, "dtype": "bfloat16",
                                 "attn_dtype": "float16"},
            "source": {"id": f"row{seed}", "prompt": "the man on the left in a red shirt", "image_path": image_file,
                       "image_bytes": 123456, "image_mtime_ns": 1_700_000_000_000_000_000}}
    return {"attn": attn, "meta": meta}


def late_heads(shape: Shape, k: int = 3) -> list[list[int]]:
    """k fixed heads in the later half of the layers, as stage=select tends to find them."""
    return [[shape.num_layers // 2 + i, (5 * i + 1) % shape.num_heads] for i in range(k)]
