"""stage=report: one static HTML page per run folder, <model dir>/report/index.html, that opens
from disk with no server and no script.

What it shows:
  - metrics: n, Acc@0.25 / 0.5 / 0.75, mIoU over every row with a ground-truth box (failed and
    missing rows count as IoU 0, as in stage=evaluate), failures, and a 95 % bootstrap interval on
    Acc@0.5 (fixed seed);
  - the L × H head-selection frequency heat map of the selected_heads.json the run used (rows: the
    layers with attention, labelled by model index: a hybrid model's other layers have no heads);
  - the τ elbow curve: the per-head image-attention sums (averaged over the run's analysis files),
    sorted, with the chord, its elbow and the selection's τ;
  - a gallery of overlays (image, combined heat map, predicted box, ground-truth box and IoU):
    worst first, best and a random sample (fixed seed) of GALLERY rows each — or every row when
    the run is small — with thumbnails of at most THUMB_PX px written once under report/thumbs/;
  - report/rows.csv, every row (the gallery is a sample for large runs; the page says so).

Which rows: those of data.data_file when the folder holds predictions for its ids; otherwise (a
single-image run, or a JSONL that is not this folder's) every <id>_bbox.json in the folder.
"""
from __future__ import annotations

import csv
import datetime
import glob
import hashlib
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from localization_heads import analyze
from localization_heads import evaluate
from localization_heads import viz
from localization_heads.bbox import combine_heads, grid_to_image
from localization_heads.collector import load_attention
from localization_heads.layout import analysis_record
from localization_heads.images import load_image
from localization_heads.dataio import InputError, atomic_write_bytes, atomic_write_text, resolve_path
from localization_heads.layout import Layout
from localization_heads.outputs import load_analysis
from localization_heads.progress import track
from localization_heads.settings import model_dir

log = logging.getLogger("report")

GALLERY = 24          # thumbnails per group (worst, best, random)
THUMB_PX = 256        # longest side of a thumbnail
ELBOW_FILES = 1000    # analysis files averaged for the elbow curve (a fixed-seed sample beyond)
RESAMPLES = 10_000    # bootstrap resamples
SEED = 0
BBOX = "_bbox.json"


@dataclass
class Row:
    id: str
    prompt: str | None = None
    image: Path | None = None
    pred: list[float] | None = None
    gt: list[float] | None = None
    iou: float | None = None
    status: str = "missing"       # ok | no_box | failed | missing | stale
    reason: str = ""
    summary: dict = field(default_factory=dict)   # the <id>_bbox.json


# ---------------------------------------------------------------- rows

def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def collect_rows(folder: Path, data_file: str | None) -> tuple[list[Row], str]:
    """The run's rows with predictions, ground truth and status, and a phrase saying where they came from.
    The JSONL is read and its rows scored exactly as stage=evaluate reads and scores them."""
    predicted = {p.name[: -len(BBOX)] for p in folder.glob(f"*{BBOX}")}
    truth: list[evaluate.GroundTruth] = []
    if data_file and Path(str(data_file)).is_file():
        truth = evaluate.load_ground_truth(data_file, require_bbox=False)
        if predicted and not any(gt.id in predicted for gt in truth):
            log.warning("report: %s has none of the %d predictions in %s; reporting the folder instead",
                        data_file, len(predicted), folder)
            truth = []
    failures = evaluate.load_failures(folder)
    if truth:
        source = f"the {len(truth)} rows of {data_file}"
        entries = truth
        base = Path(str(data_file)).parent
    else:
        if not predicted:
            raise InputError(f"{folder}: no predictions (<id>{BBOX}) to report; run stage=batch or stage=pipeline first "
                             "(or set data.pred_dir)")
        source = f"the {len(predicted)} predictions in {folder}"
        entries, base = [evaluate.GroundTruth(item_id, None, None) for item_id in sorted(predicted)], Path(".")
    rows = [_row(folder, gt, base, failures) for gt in track(entries, "report", unit="rows")]
    scored = [evaluate.RowResult(r.id, r.iou, r.status, r.reason) for r in rows if r.gt is not None]
    if scored:
        evaluate.check_scored(scored, data_file or folder, folder)
    return rows, source


def _row(folder: Path, truth: evaluate.GroundTruth, base: Path, failures: dict[str, str]) -> Row:
    """A JSONL row (truth.source set) or a prediction of the folder (its ground truth from the
    _bbox.json, which batch copied from the JSONL row it ran)."""
    item_id = truth.id
    summary = _read_summary(folder / f"{item_id}{BBOX}")
    recorded = truth.source or {}
    image = summary.get("image_file") or (str(resolve_path(recorded["image_path"], base)) if recorded else None)
    recorded_gt = viz.as_box(summary.get("gt_bbox"))
    if truth.bbox is None and recorded_gt is not None:   # the ground truth batch copied from its JSONL row
        truth = evaluate.GroundTruth(item_id, tuple(recorded_gt), None, source=truth.source)
    row = Row(item_id, recorded.get("prompt") or summary.get("query"), Path(image) if image else None,
              viz.as_box(summary.get("bbox_xyxy")), list(truth.bbox) if truth.bbox is not None else None,
              summary=summary)
    if truth.bbox is not None:   # scored exactly as stage=evaluate scores it
        scored = evaluate.score_prediction(truth, folder, failures)
        row.iou, row.status, row.reason = scored.iou, scored.status, scored.reason
    elif summary:
        row.status, row.reason = ("ok", "") if row.pred is not None else ("no_box", "prediction has no box")
    else:
        row.status, row.reason = ("failed", failures[item_id]) if item_id in failures else ("missing", "no prediction file")
    return row


# ---------------------------------------------------------------- metrics

def bootstrap_interval(hits: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of 0/1 `hits`. Resampling n rows with
    replacement draws Binomial(n, p̂) hits, so the resampled means are drawn that way directly
    (the same distribution, without an n × resamples index array for 20,000 rows)."""
    n = hits.size
    means = np.random.default_rng(seed).binomial(n, hits.mean(), size=resamples) / n
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def metrics(rows: list[Row]) -> dict:
    scored = [r for r in rows if r.gt is not None]
    out = {"rows": len(rows), "with_gt": len(scored), "failed": sum(r.status in evaluate.UNSCORED for r in rows),
           "no_box": sum(r.status == "no_box" for r in rows)}
    if scored:
        ious = np.array([r.iou for r in scored], dtype=np.float64)
        out.update({f"acc@{t}": float((ious >= t).mean()) for t in evaluate.THRESHOLDS})
        out["miou"] = float(ious.mean())
        out["acc@0.5_ci95"] = bootstrap_interval((ious >= 0.5).astype(np.float64))
    return out


# ---------------------------------------------------------------- figures

def _axes(figsize) -> tuple[Figure, object]:
    """A one-axes Figure on an Agg canvas, outside pyplot (no global state, notebooks untouched)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def find_selection(folder: Path, cfg, rows: list[Row]) -> Path | None:
    """The selected_heads.json of this folder, else the one the run's boxes were made with."""
    candidates = [folder / "selected_heads.json", cfg.logic.heads]
    candidates += [r.summary.get("settings", {}).get("logic", {}).get("heads") for r in rows[:1]]
    for c in candidates:
        if isinstance(c, (str, Path)) and Path(c).is_file():
            return Path(c)
    return None


def _analysis_sample(folder: Path, rows: list[Row]) -> list[Path]:
    """The analysis files of the report's own rows (the rows its metrics count), a seeded sample of
    ELBOW_FILES when there are more."""
    files = [folder / f"{r.id}_analysis.pkl" for r in rows]
    files = [f for f in files if f.is_file()]
    if len(files) > ELBOW_FILES:
        keep = np.random.default_rng(SEED).choice(len(files), size=ELBOW_FILES, replace=False)
        files = [files[i] for i in sorted(keep)]
    return files


def head_sums(files: list[Path]) -> tuple[np.ndarray, tuple[tuple[int, ...], int]] | None:
    """Mean per-head image-attention sums [L·H] over analysis files, and the model's (attention
    layers as model indices, H)."""
    sums, shape = [], None
    for path in files:
        try:
            result = load_analysis(path)
        except InputError:
            continue
        heads = result["heads"]
        file_shape = (tuple(sorted({h["layer"] for h in heads})), max(h["head"] for h in heads) + 1)
        if shape is None:
            shape = file_shape
        if file_shape != shape:
            continue
        sums.append([h["attn_sum"] for h in sorted(heads, key=lambda h: (h["layer"], h["head"]))])
    return (np.mean(np.asarray(sums), axis=0), shape) if sums else None


def frequency_table(selection: dict, shape: tuple[tuple[int, ...], int] | None) -> tuple[tuple[int, ...], np.ndarray]:
    """(attention layers as model indices, [L, H] selection frequency): one row per layer WITH attention.
    The layers: the selection's own (selected_heads.json lists them), else `shape` (from the analysis
    files), else 0..the largest voted layer (older selections of dense models)."""
    counts = selection.get("counts", [])
    if selection.get("layers"):
        shape = (tuple(selection["layers"]), int(selection["num_heads"]))
    elif shape is None:
        shape = (tuple(range(max(c["layer"] for c in counts) + 1)), max(c["head"] for c in counts) + 1)
    layer_list, heads = shape
    row = {layer: i for i, layer in enumerate(layer_list)}
    freq = np.zeros((len(layer_list), heads))
    for c in counts:
        if c["layer"] in row and c["head"] < heads:
            freq[row[c["layer"]], c["head"]] = c["frequency"]
    return tuple(layer_list), freq


def heads_figure(selection: dict, shape: tuple[tuple[int, ...], int] | None) -> bytes:
    """L × H heat map of how often each head was voted for, the selected heads outlined; rows are the
    layers with attention (frequency_table), labelled by model index when some layers have none."""
    layer_list, freq = frequency_table(selection, shape)
    row = {layer: i for i, layer in enumerate(layer_list)}
    layers, heads = freq.shape
    fig, ax = _axes((min(12, max(5.5, 2.5 + 0.28 * heads)), min(10, max(3.5, 1.8 + 0.24 * layers))))
    shown = ax.imshow(freq, cmap="magma", vmin=0, vmax=max(1e-9, freq.max()), aspect="auto", interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax)
    bar.set_label("selection frequency (votes / samples)")
    for layer, head in selection.get("heads", []):
        if layer in row:
            ax.add_patch(Rectangle((head - 0.5, row[layer] - 0.5), 1, 1, fill=False, ec="#00e5ff", lw=2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("head")
    if layer_list == tuple(range(layers)):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("layer")
    else:   # a hybrid model: only its attention layers have heads; ticks name their model index
        ax.set_yticks(range(layers), [str(i) for i in layer_list], fontsize=8 if layers > 24 else None)
        ax.set_ylabel("layer (model index; attention layers only)")
    ax.set_title(f"{len(selection.get('heads', []))} heads selected (outlined)\nvotes of {selection.get('n_samples', '?')} "
                 "samples", fontsize=10)
    return _png(fig)


def elbow_figure(mean_sums: np.ndarray, shape: tuple[tuple[int, ...], int], n_files: int, selection: dict | None,
                 chosen: list[tuple[int, int]]) -> bytes:
    """Sorted per-head attention sums with the chord, its elbow τ, and the selection's τ."""
    order = np.argsort(mean_sums, kind="stable")
    y = mean_sums[order]
    x = np.arange(y.size)
    tau = analyze.chord_elbow(mean_sums)
    fig, ax = _axes((7.5, 4.2))
    ax.plot(x, y, ".-", color="#444444", ms=3, lw=1, label="heads, sorted")
    ax.plot([0, y.size - 1], [y[0], y[-1]], ":", color="#888888", label="chord")
    ax.axhline(tau, color="#d62728", lw=1.2, label=f"elbow τ = {tau:.3f}")
    if selection and selection.get("tau") is not None:
        ax.axhline(float(selection["tau"]), color="#1f77b4", lw=1.2, ls="--",
                   label=f"selection τ = {float(selection['tau']):.3f} ({selection.get('tau_scope', '?')})")
    layer_list, heads_per_layer = shape
    rank = {int(flat): i for i, flat in enumerate(order)}
    for layer, head in chosen:
        try:
            flat = analyze.head_row(layer_list, heads_per_layer, layer, head)
        except ValueError:      # a head of another model's selection
            continue
        ax.plot(rank[flat], mean_sums[flat], "o", mfc="none", mec="#00a0c0", ms=9)
    if chosen:
        ax.plot([], [], "o", mfc="none", mec="#00a0c0", label="selected heads")
    ax.set_xlabel("heads ranked by image-attention sum")
    ax.set_ylabel("image-attention sum S" + (f" (mean of {n_files} samples)" if n_files > 1 else ""))
    ax.legend(loc="lower right", fontsize=8)   # a sorted ascending curve leaves that corner empty
    return _png(fig)


def thumbnail(row: Row, folder: Path, thumbs: Path) -> str | None:
    """report/thumbs/<id>-<hash>.png, made once: the hash covers what is drawn, so a changed box
    makes a new file and an unchanged one is never redrawn. None when the image cannot be read."""
    if row.image is None:
        return None
    heads = [(h["layer"], h["head"]) for h in row.summary.get("selected_heads", [])]
    smoothing = row.summary.get("settings", {}).get("logic", {}).get("smoothing", {})
    key = json.dumps([str(row.image), row.pred, row.gt, heads, smoothing, THUMB_PX])
    name = f"{row.id}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.png"
    if (thumbs / name).is_file():
        return name
    try:
        image = load_image(row.image)
    except InputError:
        return None
    heat = None
    attn_file = folder / f"{row.id}.pkl"
    if heads and attn_file.is_file():
        try:
            view = analysis_record(load_attention(attn_file))    # multi-map layouts: their canvas
            layout = Layout.from_meta(view["meta"])
            grid_map = combine_heads(view["attn"], layout.one_map.grid, heads, float(smoothing.get("sigma", 1.0)),
                                     mode=str(smoothing.get("mode", "reflect")),
                                     truncate=float(smoothing.get("truncate", 4.0)), layers=view["meta"].get("layers"))
            heat = grid_to_image(grid_map, layout)
        except (InputError, KeyError, IndexError, ValueError):
            heat = None
    atomic_write_bytes(thumbs / name, viz.thumbnail_png(image, heat, row.pred, row.gt, THUMB_PX))
    return name


# ---------------------------------------------------------------- gallery and page

def gallery_groups(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """(title, rows) groups. With ground truth: worst first, best, random sample; small runs
    (≤ 3 groups' worth) show every row, worst first. Without: a random sample, or every row."""
    has_gt = any(r.gt is not None for r in rows)
    if has_gt:
        ordered = sorted(rows, key=lambda r: (r.iou if r.iou is not None else -1.0, r.id))
    else:
        ordered = sorted(rows, key=lambda r: r.id)
    if len(rows) <= 3 * GALLERY:
        return [("Every row" + (", worst first" if has_gt else ""), ordered)]
    rng = np.random.default_rng(SEED)
    sample = [rows[i] for i in sorted(rng.choice(len(rows), size=GALLERY, replace=False))]
    if not has_gt:
        return [(f"Random sample of {GALLERY} (seed {SEED})", sample)]
    return [(f"Worst {GALLERY}", ordered[:GALLERY]), (f"Best {GALLERY}", ordered[::-1][:GALLERY]),
            (f"Random sample of {GALLERY} (seed {SEED})", sample)]


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _metrics_html(m: dict) -> str:
    rows = [("rows", m["rows"]), ("rows with a ground-truth box (n)", m["with_gt"]),
            ("failed, missing or stale", m["failed"]), ("no box predicted", m["no_box"])]
    if m["with_gt"]:
        low, high = m["acc@0.5_ci95"]
        rows += [("Acc@0.25", _fmt(m["acc@0.25"])),
                 ("Acc@0.5", f"{_fmt(m['acc@0.5'])} (95 % bootstrap interval {low:.3f} – {high:.3f})"),
                 ("Acc@0.75", _fmt(m["acc@0.75"])), ("mIoU", _fmt(m["miou"]))]
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    note = ("" if m["with_gt"] else "<p class=note>No ground-truth boxes: accuracy is not computed.</p>")
    return f"<table class=metrics id=metrics>{body}</table>{note}"


def _card(row: Row, thumb: str | None, figure: str | None = None) -> str:
    iou = f"IoU {row.iou:.2f}" if row.iou is not None else ("no ground truth" if row.gt is None else "")
    status = "" if row.status == "ok" else f" · {row.status}: {row.reason}"
    picture = (f'<img src="thumbs/{quote(thumb)}" alt="{html.escape(row.id)}">' if thumb
               else "<div class=noimg>image not available</div>")
    if figure:   # the row's own figure (<id>_top{K}.png), one folder up
        picture = f'<a href="../{quote(figure)}">{picture}</a>'

    return (f"<figure class=card>{picture}<figcaption><b>{html.escape(row.id)}</b> · {html.escape(iou)}"
            f"{html.escape(status)}<br>{html.escape(row.prompt or '')}</figcaption></figure>")


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table.metrics { border-collapse: collapse; } .metrics th, .metrics td { padding: 3px 14px 3px 0; text-align: left; }
.metrics th { font-weight: 600; } .note, .muted { color: #666; }
.figures img { max-width: 100%; margin-right: 12px; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 260px; margin: 0; } .card img { max-width: 256px; max-height: 256px; display: block; }
.card figcaption { font-size: 13px; overflow-wrap: anywhere; }
.noimg { width: 256px; height: 60px; background: #f2f2f2; color: #888; display: flex; align-items: center; justify-content: center; }
.key { display: inline-block; width: 22px; height: 0; vertical-align: middle; margin: 0 4px 0 12px; }
"""


def render_html(title: str, source: str, m: dict, figures: list[tuple[str, str, str]], notes: list[str],
                groups: list[tuple[str, list[tuple[Row, str | None, str | None]]]], n_rows: int,
                provenance: str = "") -> str:
    shown = sum(len(g) for _, g in groups)
    figs = "".join(f'<figure><img src="{quote(name)}" alt="{html.escape(alt)}"><figcaption class=muted>'
                   f"{html.escape(caption)}</figcaption></figure>" for name, alt, caption in figures)
    sections = "".join(f"<h3>{html.escape(t)}</h3><div class=gallery>{''.join(_card(*card) for card in g)}</div>"
                       for t, g in groups)
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>
<meta name=viewport content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class=muted id=made-by>{html.escape(provenance)}</p>
<p class=muted>Rows: {html.escape(source)}. Every row: <a href="rows.csv">rows.csv</a>.</p>
<h2>Metrics</h2>
{_metrics_html(m)}
<h2>Heads</h2>
<div class=figures>{figs}</div>
{''.join(f'<p class=note>{html.escape(n)}</p>' for n in notes)}
<h2>Gallery</h2>
<p class=muted>{shown} of {n_rows} rows shown{'' if shown >= n_rows else ' (a sample: see rows.csv for all)'}.
Thumbnails: image with the combined heat map,
<span class=key style="border-top: 3px solid #00e000"></span>predicted box,
<span class=key style="border-top: 3px dashed #ff2a2a"></span>ground-truth box.</p>
{sections}
</body></html>
"""


def _rows_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "status", "iou", "bbox_xyxy", "gt_bbox", "prompt", "reason"])
    for r in rows:
        writer.writerow([r.id, r.status, "" if r.iou is None else f"{r.iou:.6f}", json.dumps(r.pred),
                         json.dumps(r.gt), r.prompt or "", r.reason])
    return buf.getvalue()


def row_figure(folder: Path, row: Row) -> str | None:
    """The name of the row's figure (<id>_top{K}.png) in the run folder, when one was drawn."""
    found = sorted(folder.glob(f"{glob.escape(row.id)}_top*.png"))
    return found[0].name if found else None


def made_by(rows: list[Row], selection_file: Path | None) -> str:
    """What made the run's boxes, as its rows' _bbox.json files record it, and this page."""
    from localization_heads import __version__

    def recorded(get) -> str:
        values = sorted({str(v) for v in (get(r.summary) for r in rows if r.summary) if v is not None})
        return ", ".join(values) if values else "not recorded"

    model = recorded(lambda s: (s.get("collect_settings") or {}).get("model"))
    logic = recorded(lambda s: s.get("logic"))
    threshold = recorded(lambda s: ((s.get("settings") or {}).get("logic") or {}).get("mask", {}).get("threshold"))
    heads = recorded(lambda s: s.get("heads_source"))
    return (f"Model {model} · logic {logic} · mask threshold {threshold} · heads {heads}"
            + (f" · selection {selection_file}" if selection_file else "")
            + f" · localization-heads {__version__} · {datetime.date.today().isoformat()}")


def build_report(cfg) -> Path:
    """Write <folder>/report/index.html (+ figures, thumbnails, rows.csv); return its path. cfg: config.Settings."""
    folder = Path(str(cfg.data.pred_dir)) if cfg.data.pred_dir else model_dir(cfg)
    if not folder.is_dir():
        raise InputError(f"{folder}: run folder not found; run stage=batch first or set data.pred_dir")
    out = folder / "report"
    rows, source = collect_rows(folder, cfg.data.data_file)
    m = metrics(rows)

    figures, notes = [], []
    analyses = _analysis_sample(folder, rows)
    sums = head_sums(analyses)
    selection_file = find_selection(folder, cfg, rows)
    selection = json.loads(selection_file.read_text()) if selection_file else None
    if selection and selection.get("counts"):
        atomic_write_bytes(out / "heads.png", heads_figure(selection, sums[1] if sums else None))
        figures.append(("heads.png", "head selection frequency", f"Head-selection frequency from {selection_file}"))
    else:
        notes.append("No selected_heads.json (stage=select) for this run: no head-frequency map.")
    if sums is not None:
        mean_sums, shape = sums
        chosen = [tuple(h) for h in selection["heads"]] if selection else []
        atomic_write_bytes(out / "elbow.png", elbow_figure(mean_sums, shape, len(analyses), selection, chosen))
        figures.append(("elbow.png", "tau elbow curve",
                        f"Criterion 1: per-head image-attention sums over {len(analyses)} analysis file(s)"
                        + (f" (a seed-{SEED} sample of the folder's)" if len(analyses) == ELBOW_FILES else "")))
    else:
        notes.append("No analysis files (<id>_analysis.pkl) in the folder: no τ elbow curve.")

    thumbs = out / "thumbs"
    groups = [(title, [(r, thumbnail(r, folder, thumbs), row_figure(folder, r)) for r in members])
              for title, members in gallery_groups(rows)]
    atomic_write_text(out / "rows.csv", _rows_csv(rows))
    title = f"localization-heads report: {folder.name}"
    page = out / "index.html"
    atomic_write_text(page, render_html(title, source, m, figures, notes, groups, len(rows),
                                        made_by(rows, selection_file)))
    log.info("report: %d rows%s → %s", len(rows),
             f", Acc@0.5 {m['acc@0.5']:.3f} on {m['with_gt']}" if m["with_gt"] else "", page)
    return page
