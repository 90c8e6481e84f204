"""Measure the method on the bundled toy model with the tool's own stages, against baselines.

Protocol (the paper's, §4 of method.md), on freshly generated shapes-world sets:
  1. stage=batch on a calibration set (collect attention), stage=select → k heads (both logics);
  2. stage=batch on a separate test set with those heads fixed, stage=evaluate → Acc@0.5;
  3. baselines on the same test attention files: centre box of the mean object size, whole image,
     mean of all heads, per-sample top-k without selection, the model's own answer decoded as a
     box, every single head (best free head = best non-designated one), and the oracle (the
     ground-truth object mask on the patch grid through the same box step).
The designated heads (models/toy-llava/designated_heads.json) are read here only to score the
result; the pipeline never sees them.

    python -m lab.toy_report --calib-scenes 250 --test-scenes 250 --out /tmp/toy_report --write-card
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from localization_heads import analyze as analysis
from localization_heads import bbox
from localization_heads import cli as pipeline
from localization_heads import settings
from localization_heads.collector import load_attention
from localization_heads.dataio import read_jsonl
from localization_heads.evaluate import iou_xyxy
from lab import toyworld
from localization_heads.config import LogicSettings
from localization_heads.layout import Layout

MODEL_DIR = Path(__file__).resolve().parents[1] / "localization_heads" / "models" / "toy-llava"
CALIB_SEED, TEST_SEED = 1001, 2002
# The box step's foreground threshold: the paper's (mean) and the half-maximum variant.
THRESHOLDS = ("mean", "half_max")
RESULTS_MARK = "## Results with the tool"


class Toy:
    """The model under test: its folder, how stages are run on it, where they write."""

    def __init__(self, model_dir: Path = MODEL_DIR):
        self.model_dir = Path(model_dir)
        self.subdir = settings.sanitize(str(self.model_dir))

    def run(self, *overrides: str):
        return pipeline.run(pipeline.compose("model=toy", f"model.name={self.model_dir}", "data.num_workers=0", *overrides))

    def designated_heads(self) -> list[list[int]]:
        return json.loads((self.model_dir / "designated_heads.json").read_text())["heads"]


def scene_masks(n_scenes: int, seed: int) -> list[list[np.ndarray]]:
    """Object masks per scene, regenerated exactly as write_dataset drew them (same rng stream)."""
    rng = np.random.default_rng(seed)
    return [[o.mask for o in toyworld.make_scene(rng).objects] for _ in range(n_scenes)]


def accuracy(ious: list[float]) -> dict:
    arr = np.asarray(ious, dtype=np.float64)
    return {"acc@0.5": float((arr >= 0.5).mean()), "miou": float(arr.mean()), "n": int(arr.size)}


def answer_box(text: str, width: int, height: int, sizes: dict) -> list[float] | None:
    """The toy model's answer ("colour shape size hpos vpos") as a box: the mean box of that size
    centred in the named ninth of the canvas; None when the words are missing."""
    words = text.split()
    hpos = next((w for w in words if w in toyworld.HPOS), None)
    vpos = next((w for w in words if w in toyworld.VPOS), None)
    size = next((w for w in words if w in toyworld.SIZES), None)
    if hpos is None or vpos is None or size is None:
        return None
    cx = (toyworld.HPOS.index(hpos) + 0.5) * width / 3
    cy = (toyworld.VPOS.index(vpos) + 0.5) * height / 3
    fw, fh = sizes[size]
    return [cx - fw * width / 2, cy - fh * height / 2, cx + fw * width / 2, cy + fh * height / 2]


def measure(calib_scenes: int, test_scenes: int, out: Path, k: int = 3, toy: Toy | None = None,
            thresholds: tuple[str, ...] = THRESHOLDS, answer: bool = True) -> dict:
    """The whole protocol; `thresholds` and `answer` trim it for quick runs (tests)."""
    toy = toy or Toy()
    run = toy.run
    started = time.time()
    calib_dir = Path(toyworld.write_dataset(calib_scenes, CALIB_SEED, str(out / "calib"))).parent
    test_dir = Path(toyworld.write_dataset(test_scenes, TEST_SEED, str(out / "test"))).parent
    calib_rows = [r for _, r in read_jsonl(calib_dir / "data.jsonl")]
    test_rows = [r for _, r in read_jsonl(test_dir / "data.jsonl")]

    # 1. calibrate: collect once, select under each logic.
    run("stage=batch", f"data.data_file={calib_dir / 'data.jsonl'}", "data.process_all=true",
        "data.batch_size=16", f"data.output_dir={out / 'calib_out'}", "logic=paper")
    attention_dir = out / "calib_out" / toy.subdir
    report: dict = {"calib": {"scenes": calib_scenes, "expressions": len(calib_rows), "seed": CALIB_SEED},
                    "test": {"scenes": test_scenes, "expressions": len(test_rows), "seed": TEST_SEED},
                    "designated_heads": toy.designated_heads(), "logics": {}}
    for logic in ("paper", "selection_v1"):
        selected = run("stage=select", f"logic={logic}", f"logic.select.k={k}", f"data.attention_dir={attention_dir}")
        heads_file = out / f"selected_heads_{logic}.json"
        heads_file.write_text((attention_dir / "selected_heads.json").read_text())
        entry = {"selected_heads": selected["heads"], "tau": selected["tau"], "counts": selected["counts"][:8],
                 "designated_found": sorted(map(tuple, selected["heads"])) == sorted(map(tuple, toy.designated_heads()))}
        # 2. test with the heads fixed, through the real batch and evaluate stages.
        for threshold in thresholds:
            pred = out / f"test_{logic}_{threshold}"
            run("stage=batch", f"data.data_file={test_dir / 'data.jsonl'}", "data.process_all=true",
                "data.batch_size=16", f"data.output_dir={pred}", f"logic={logic}", f"logic.heads={heads_file}",
                f"logic.mask.threshold={threshold}")
            evaluation = run("stage=evaluate", f"data.data_file={test_dir / 'data.jsonl'}", f"data.output_dir={pred}")
            entry[threshold] = {"acc@0.5": evaluation["acc@0.5"], "miou": evaluation["miou"],
                                "missing": evaluation["missing"],
                                "by_expression": accuracy_by_expression(test_rows, pred / toy.subdir)}
        report["logics"][logic] = entry

    # 3. baselines on the test attention files (collected in step 2 under logic=paper).
    designated = {tuple(h) for h in toy.designated_heads()}
    report["baselines"] = {t: baselines(test_rows, out / f"test_paper_{thresholds[0]}" / toy.subdir, calib_rows, test_scenes, k,
                                        designated, t) for t in thresholds}
    if answer:
        report["model_answer"] = model_answer_baseline(toy, test_rows, test_dir, out, calib_rows)
    report["wall_seconds"] = round(time.time() - started, 1)
    return report


def accuracy_by_expression(rows: list[dict], pred_dir: Path) -> dict:
    """stage=evaluate's per-row IoUs (evaluation_rows.csv) split into relational expressions ("... on
    the left .") and the rest: the two differ in what a head must do (compare positions vs match attributes)."""
    with open(pred_dir / "evaluation_rows.csv", newline="") as f:
        iou_by_id = {r["id"]: float(r["iou"]) for r in csv.DictReader(f)}
    ious: dict[str, list[float]] = {"relational": [], "attribute": []}
    for row in rows:
        kind = "relational" if toyworld.is_relational(row["prompt"]) else "attribute"
        ious[kind].append(iou_by_id[row["id"]])
    return {kind: accuracy(v) for kind, v in ious.items() if v}


def mean_size_fractions(rows: list[dict]) -> dict:
    """Mean object (w/W, h/H) per size word, and overall under "all"."""
    def frac(rs):
        return (float(np.mean([(r["bbox"][2] - r["bbox"][0]) / r["width"] for r in rs])),
                float(np.mean([(r["bbox"][3] - r["bbox"][1]) / r["height"] for r in rs])))
    sizes = {s: frac([r for r in rows if r["target"]["size"] == s]) for s in toyworld.SIZES}
    sizes["all"] = frac(rows)
    return sizes


def baselines(test_rows, pred_dir: Path, calib_rows, test_scenes: int, k: int, designated: set,
              threshold: str) -> dict:
    paper = LogicSettings.from_config(pipeline.compose("model=toy", "logic=paper", f"logic.mask.threshold={threshold}").logic)
    sizes = mean_size_fractions(calib_rows)
    masks = scene_masks(test_scenes, TEST_SEED)
    ious: dict[str, list[float]] = {"centre box (mean object size)": [], "whole image": [], "mean of all heads": [],
                                    f"per-sample top-{k}, no selection": [], "oracle (GT mask on the grid)": []}
    single: dict[tuple[int, int], list[float]] = {}
    for row in test_rows:
        gt, w, h = row["bbox"], row["width"], row["height"]
        fw, fh = sizes["all"]
        ious["centre box (mean object size)"].append(iou_xyxy([w * (1 - fw) / 2, h * (1 - fh) / 2, w * (1 + fw) / 2, h * (1 + fh) / 2], gt))
        ious["whole image"].append(iou_xyxy([0, 0, w, h], gt))
        record = load_attention(pred_dir / f"{row['id']}.pkl")
        attn, layout = record["attn"], Layout.from_meta(record["meta"])
        layers, heads = attn.shape[:2]
        all_heads = [(l, hh) for l in range(layers) for hh in range(heads)]
        ious["mean of all heads"].append(_iou(bbox.localize(attn, layout, all_heads, paper), gt))
        ranked = analysis.analyze(attn, layout.one_map.grid, paper)["ranked"][:k]
        ious[f"per-sample top-{k}, no selection"].append(
            _iou(bbox.localize(attn, layout, [(r["layer"], r["head"]) for r in ranked], paper), gt))
        for head in all_heads:
            single.setdefault(head, []).append(_iou(bbox.localize(attn, layout, [head], paper), gt))
        scene = int(row["id"].split("_")[0][1:])
        oracle = toyworld.oracle_grid_map(masks[scene][row["target"]["index"]], w, h)
        ious["oracle (GT mask on the grid)"].append(
            _iou(bbox.locate(bbox.smooth(oracle, float(paper.smoothing.sigma), str(paper.smoothing.mode),
                                         float(paper.smoothing.truncate)), layout, paper.mask), gt))
    result = {name: accuracy(v) for name, v in ious.items()}
    per_head = {f"L{l}H{hh}": accuracy(v)["acc@0.5"] for (l, hh), v in sorted(single.items())}
    free = {name: acc for name, acc in per_head.items()
            if (int(name[1:].split("H")[0]), int(name.split("H")[1])) not in designated}
    best_free = max(free, key=free.get)
    result["best free head"] = {"head": best_free, "acc@0.5": free[best_free]}
    result["single heads"] = per_head
    return result


def _iou(located: dict, gt) -> float:
    return iou_xyxy(located["bbox_xyxy"], gt) if located["bbox_xyxy"] is not None else 0.0


def model_answer_baseline(toy: Toy, test_rows, test_dir: Path, out: Path, calib_rows) -> dict:
    """Generate the model's answer for every test row (stage=batch, use_generate) and score it as a box."""
    pred = out / "test_generate"
    toy.run("stage=batch", f"data.data_file={test_dir / 'data.jsonl'}", "data.process_all=true", "data.batch_size=16",
        f"data.output_dir={pred}", "logic=paper", "model.use_generate=true")
    sizes = mean_size_fractions(calib_rows)
    ious, exact = [], []
    for row in test_rows:
        text = load_attention(pred / toy.subdir / f"{row['id']}.pkl")["meta"].get("generated_text", "")
        box = answer_box(text, row["width"], row["height"], sizes)
        ious.append(iou_xyxy(box, row["bbox"]) if box else 0.0)
        exact.append(text.split()[:5] == toyworld.answer_words(row["target"]))
    return dict(accuracy(ious), answer_exact=float(np.mean(exact)))


def format_report(report: dict) -> str:
    n = report["test"]["expressions"]
    se = lambda p: math.sqrt(max(p * (1 - p), 1e-12) / n)  # noqa: E731 — binomial standard error
    lines = [f"Calibration: {report['calib']['expressions']} expressions ({report['calib']['scenes']} scenes, seed "
             f"{report['calib']['seed']}); test: {n} expressions ({report['test']['scenes']} scenes, seed "
             f"{report['test']['seed']}). Designated heads: "
             + ", ".join(f"L{l}H{h}" for l, h in report["designated_heads"]) + ". "
             "Box step: logic=paper's (σ=1, largest region's hull) with the foreground threshold at the mean "
             "(paper) or at half the maximum.", "",
             "| method | heads | Acc@0.5 (mean) | mIoU (mean) | Acc@0.5 (half max) | mIoU (half max) |",
             "|---|---|---|---|---|---|"]
    for logic, r in report["logics"].items():
        heads = ", ".join(f"L{l}H{h}" for l, h in r["selected_heads"])
        cells = " | ".join(f"{r[t]['acc@0.5']:.3f} ± {se(r[t]['acc@0.5']):.3f} | {r[t]['miou']:.3f}" for t in THRESHOLDS)
        lines.append(f"| selected heads, fixed (logic={logic}) | {heads}{' = designated' if r['designated_found'] else ''} | {cells} |")
    for name in report["baselines"][THRESHOLDS[0]]:
        if name in ("single heads", "best free head"):
            continue
        cells = " | ".join(f"{report['baselines'][t][name]['acc@0.5']:.3f} | {report['baselines'][t][name]['miou']:.3f}"
                           for t in THRESHOLDS)
        lines.append(f"| {name} | | {cells} |")
    answer = report["model_answer"]
    lines.append(f"| model's own answer as a box (ninth of the canvas, mean size) | | {answer['acc@0.5']:.3f} | "
                 f"{answer['miou']:.3f} | {answer['acc@0.5']:.3f} | {answer['miou']:.3f} |")
    by_kind = report["logics"]["paper"]["half_max"].get("by_expression", {})
    best = {t: report["baselines"][t]["best free head"] for t in THRESHOLDS}
    lines += ["", "Best free (non-designated) head alone: "
              + "; ".join(f"{best[t]['head']} Acc@0.5 {best[t]['acc@0.5']:.3f} ({t})" for t in THRESHOLDS) + ". "
              f"Answer exact match (colour shape size hpos vpos): {answer['answer_exact']:.3f}. "
              f"Wall time {report['wall_seconds']} s on this machine."]
    if by_kind:
        lines += ["", "Selected heads (logic=paper, half max) by expression: "
                  + "; ".join(f"{kind} {r['acc@0.5']:.3f} (n={r['n']})" for kind, r in by_kind.items())
                  + ". Relational expressions (\"the circle on the left .\") need a head to compare positions among "
                  "look-alikes; attribute expressions only to match colour, shape and size."]
    return "\n".join(lines)


def write_card(report: dict, table: str, out: Path, model_dir: Path = MODEL_DIR) -> None:
    """results.json, the card's results section, and selected_heads.json (stage=select's output
    under logic=paper, used by the README's quick start)."""
    (model_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (model_dir / "selected_heads.json").write_text((out / "selected_heads_paper.json").read_text())
    card = model_dir / "README.md"
    text = card.read_text()
    head = text.split(RESULTS_MARK)[0].rstrip()
    card.write_text(f"{head}\n\n{RESULTS_MARK}\n\nMeasured by `python -m lab.toy_report` (the tool's own stages: "
                    f"batch → select → batch with fixed heads → evaluate).\n\n{table}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-scenes", type=int, default=250)
    ap.add_argument("--test-scenes", type=int, default=250)
    ap.add_argument("--out", default="_overhaul/toy_report")
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--write-card", action="store_true", help="write results.json and the model card's results")
    args = ap.parse_args(argv)
    report = measure(args.calib_scenes, args.test_scenes, Path(args.out), toy=Toy(args.model_dir))
    table = format_report(report)
    print(table)
    if args.write_card:
        write_card(report, table, Path(args.out), args.model_dir)


if __name__ == "__main__":
    main()
