"""Bytes one row's attention file takes with data.save_attention=all and =heads (k = 3), at the
real shapes of five models (benchmarks/shapes.py: real L, H, layout and meta; random attention),
measured by writing the files with the pipeline's own writer (outputs.store_attention).

    python benchmarks/bench_storage.py            # prints a Markdown table
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes import SHAPES, late_heads, random_record  # noqa: E402
from localization_heads import cli  # noqa: E402
from localization_heads.outputs import store_attention  # noqa: E402

REFCOCO_VAL = 10_834   # expressions in RefCOCO val


def row_bytes(shape, storage: str, folder: Path) -> int:
    heads = late_heads(shape)
    cfg = cli.compose(f"data.save_attention={storage}", "data.attn_dtype=float16",
                      f"logic.heads={[list(h) for h in heads]}".replace(" ", ""))
    store_attention(folder, f"{storage}", random_record(shape), cfg)
    return (folder / f"{storage}.pkl").stat().st_size


def main() -> None:
    print("| model | L × H | V (640×480 image) | `all` bytes/row | `heads` (k = 3) bytes/row | ratio | "
          f"`all` for RefCOCO val ({REFCOCO_VAL:,} rows) | `heads` for RefCOCO val |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        with tempfile.TemporaryDirectory() as tmp:
            full, heads = row_bytes(shape, "all", Path(tmp)), row_bytes(shape, "heads", Path(tmp))
        print(f"| {shape.name} | {shape.num_layers} × {shape.num_heads} | {shape.num_tokens:,} | {full:,} | {heads:,} | "
              f"{full / heads:.0f}× | {full * REFCOCO_VAL / 1e9:.1f} GB | {heads * REFCOCO_VAL / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
