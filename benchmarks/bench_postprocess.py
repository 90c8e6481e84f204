"""CPU work per row outside the forward pass — what stage=batch's writer thread does for each row
(batch.finish_row: write <id>.pkl, analysis, box, mask, _analysis.pkl, _bbox.json, the figure when
asked) — at the real L·H and V of LLaVA-1.5-7B and Qwen2.5-VL-7B (benchmarks/shapes.py, random
attention), in rows per second. Every condition runs in the same process, interleaved round by
round so machine load hits them alike; the median round is reported.

    python benchmarks/bench_postprocess.py [--rows 40] [--figure-rows 6] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from benchmarks.shapes import IMAGE, SHAPES, late_heads, random_record  # noqa: E402
from localization_heads import cli  # noqa: E402
from localization_heads.batch import Row, finish_row  # noqa: E402
from localization_heads.collector import keep_heads  # noqa: E402
from localization_heads.outputs import run_analysis  # noqa: E402

MODELS = ("LLaVA-1.5-7B", "Qwen2.5-VL-7B")
# (label, fixed heads?, data.save_attention, figure?)
CONDITIONS = [
    ("fixed heads, save all, no figure", True, "all", False),
    ("fixed heads, save heads, no figure", True, "heads", False),
    ("fixed heads, save none, no figure", True, "none", False),
    ("per-sample top-k (all heads), save all, no figure", False, "all", False),
    ("fixed heads, save all, figure", True, "all", True),
    ("per-sample top-k (all heads), save all, figure", False, "all", True),
]


def config(shape, fixed: bool, storage: str):
    heads = str([list(h) for h in late_heads(shape)]).replace(" ", "")
    return cli.compose("logic=paper", f"data.save_attention={storage}", f"logic.heads={heads if fixed else 'null'}")


def rows_per_second(shape, cfg, figure: bool, n: int, image: Path, out: Path) -> float:
    records = [random_record(shape, seed=i, image_file=str(image)) for i in range(n)]
    rows = [Row(i, f"row{i}", r["meta"]["query"], image, r["meta"]["source"], None, r["meta"]["gt_bbox"])
            for i, r in enumerate(records)]
    start = time.perf_counter()
    for row, record in zip(rows, records):
        finish_row(out, row, record, cfg, figure)
    return n / (time.perf_counter() - start)


def analysis_ms(shape, cfg, n: int, heads_only: bool) -> float:
    records = [random_record(shape, seed=i) for i in range(n)]
    if heads_only:
        records = [keep_heads(r, [tuple(h) for h in late_heads(shape)]) for r in records]
    start = time.perf_counter()
    for record in records:
        run_analysis(record, cfg)
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40, help="rows per round without a figure")
    parser.add_argument("--figure-rows", type=int, default=6, help="rows per round with a figure")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shapes = [s for s in SHAPES if s.name in MODELS]
    results: dict[tuple[str, str], list[float]] = {}
    analysis: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.png"
        Image.new("RGB", IMAGE, (90, 120, 60)).save(image)
        for _ in range(args.rounds):
            for shape in shapes:
                for label, fixed, storage, figure in CONDITIONS:
                    out = Path(tmp) / "out"
                    out.mkdir(exist_ok=True)
                    cfg = config(shape, fixed, storage)
                    n = args.figure_rows if figure else args.rows
                    results.setdefault((shape.name, label), []).append(
                        rows_per_second(shape, cfg, figure, n, image, out))
                for what, fixed, storage in (("fixed heads, heads-only record", True, "heads"),
                                             ("every head", False, "all")):
                    cfg = config(shape, fixed, storage)
                    analysis.setdefault((shape.name, what), []).append(
                        analysis_ms(shape, cfg, args.rows, heads_only=storage == "heads"))
    print(f"rows/s per writer thread, median of {args.rounds} rounds ({args.rows} rows a round, "
          f"{args.figure_rows} with a figure); image {IMAGE[0]}×{IMAGE[1]}")
    print()
    print("| condition | " + " | ".join(f"{s.name} (L·H = {s.num_layers * s.num_heads}, V = {s.num_tokens})"
                                         for s in shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    base = {s.name: statistics.median(results[(s.name, CONDITIONS[0][0])]) for s in shapes}
    for label, *_ in CONDITIONS:
        cells = []
        for s in shapes:
            rate = statistics.median(results[(s.name, label)])
            cells.append(f"{rate:.1f} rows/s ({rate / base[s.name]:.2f}×)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("outputs.run_analysis alone, ms per row (median of rounds):")
    for s in shapes:
        parts = [f"{what}: {statistics.median(analysis[(s.name, what)]):.1f} ms"
                 for what in ("fixed heads, heads-only record", "every head")]
        print(f"- {s.name}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
