"""Convert RefCOCO / RefCOCO+ / RefCOCOg into the tool's JSONL, and draw calibration subsets.

Three subcommands:
  refer    refs(unc).p / refs(umd).p + instances.json from the REFER API layout -> one row per (ref, sentence)
  parquet  lmms-lab style parquet copies (one row per object, `answer` = list of expressions) -> one row per expression
  calib    a seeded random subset of a JSONL, train split only unless --allow-non-train

Output rows: id, prompt, image_path, bbox (xyxy, original-image pixels, float), width, height, split, source,
plus provenance keys (ref_id/ann_id/... or question_id/expr_index). Relative image paths are written relative
to the output JSONL's folder, which is how dataio.resolve_path reads them back.

`segmentation`: the referent's mask as compressed COCO RLE {"size": [H, W], "counts": "<string>"}, the
ground truth of referring segmentation (stage=evaluate's cIoU). From instances.json it is exact (COCO
polygons rasterized as pycocotools does, or the annotation's own RLE); the lmms-lab parquet copies
keep one flat polygon per object. Objects without one get no key and stay valid for box evaluation.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from localization_heads import cocomask
from localization_heads.dataio import (InputError, PlainUnpickler, atomic_write_bytes, atomic_write_text, read_jsonl, resolve_path,
                    safe_output_path)

REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
PARQUET_KEYS = ("question_id", "answer", "bbox", "file_name")
# Hub shard names: val-00000-of-00002.parquet, older ones with a -<hash> suffix
HF_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9]+)-\d+-of-\d+(-[0-9a-f]+)?\.parquet$")


# --- shared helpers ---

def safe_name(text: str) -> str:
    """A file-name-safe token: ids become prediction file names, so no '/', spaces or other surprises."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "x"


def rebase_path(path: str | Path, out_dir: Path) -> str:
    """Absolute paths stay absolute; relative ones (to the working directory) become relative to out_dir."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    return os.path.relpath(Path.cwd() / p, out_dir.resolve())


def xywh_to_xyxy(box: Any, where: str) -> list[float]:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1] floats; InputError naming `where` for anything else."""
    ok = (isinstance(box, (list, tuple)) and len(box) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
          and box[2] >= 0 and box[3] >= 0)
    if not ok:
        raise InputError(f"{where}: bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def segmentation_rle(seg: Any, width: int, height: int, where: str) -> dict | None:
    """COCO segmentation (a list of polygons, one flat polygon, or RLE with list or string counts) →
    compressed RLE of a width × height image; None when there is none."""
    if seg is None or (isinstance(seg, (list, tuple)) and len(seg) == 0):
        return None
    try:
        return cocomask.encode(cocomask.to_mask(seg, int(height), int(width)))
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{where}: segmentation is not COCO polygons or RLE of a {width}x{height} image "
                         f"({e.__class__.__name__}: {e})") from None


def check_unique_ids(rows: Sequence[dict], source: str) -> None:
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise InputError(f"{source}: two rows would get id {row['id']!r}; pass a distinct --dataset or dedupe the input")
        seen.add(row["id"])


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --- REFER API format ---

def _py2_strings(obj: Any) -> Any:
    # REFER pickles were written by Python 2: its str arrives as bytes (UTF-8 text in practice)
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, list):
        return [_py2_strings(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_py2_strings(v) for v in obj)
    if isinstance(obj, dict):
        return {_py2_strings(k): _py2_strings(v) for k, v in obj.items()}
    return obj


def load_refs(path: str | Path) -> list[dict]:
    """The refs pickle as a list of dicts, loaded without ever importing or calling anything."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: refs file not found; expected refs(unc).p or refs(umd).p from the REFER data")
    try:
        with path.open("rb") as f:
            refs = PlainUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: not a plain refs pickle ({e}); refs files contain only lists, dicts, "
                         "strings and numbers, so this file was not loaded") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise InputError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None
    refs = _py2_strings(refs)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise InputError(f"{path}: expected a pickled list of dicts (REFER refs), got {type(refs).__name__}")
    return refs


def load_instances(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) from a COCO-style instances.json."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: instances.json not found; it sits beside the refs file in the REFER data")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a COCO-style object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{path}: missing key {key!r} (a COCO-style list)")
    images, anns = {}, {}
    for i, img in enumerate(data["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            raise InputError(f"{path}: images[{i}] missing key {missing[0]!r}")
        images[img["id"]] = img
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("id", "image_id", "bbox") if k not in ann]
        if missing:
            raise InputError(f"{path}: annotations[{i}] missing key {missing[0]!r}")
        anns[ann["id"]] = ann
    return images, anns


def refer_rows(refs: list[dict], images: dict[int, dict], anns: dict[int, dict], *, images_dir: str | Path,
               split: str, dataset: str, source: str, out_dir: Path, refs_name: str = "refs",
               instances_name: str = "instances.json") -> list[dict]:
    """One row per (ref, sentence) of the wanted split ('all' keeps every split)."""
    rows = []
    for i, ref in enumerate(refs):
        where = f"{refs_name}: entry {i} (ref_id {ref.get('ref_id', '?')})"
        missing = [k for k in REF_KEYS if k not in ref]
        if missing:
            raise InputError(f"{where}: missing key {missing[0]!r}")
        if split != "all" and ref["split"] != split:
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise InputError(f"{where}: ann_id {ref['ann_id']} not found in {instances_name}; "
                             "use the instances.json from the same dataset folder")
        if ann["image_id"] != ref["image_id"]:
            raise InputError(f"{where}: image_id {ref['image_id']} but ann_id {ref['ann_id']} belongs to "
                             f"image {ann['image_id']} in {instances_name}")
        img = images.get(ref["image_id"])
        if img is None:
            raise InputError(f"{where}: image_id {ref['image_id']} not found in {instances_name} images")
        bbox = xywh_to_xyxy(ann["bbox"], f"{instances_name}: annotation {ann['id']}")
        segmentation = segmentation_rle(ann.get("segmentation"), img["width"], img["height"],
                                        f"{instances_name}: annotation {ann['id']}")
        image_path = rebase_path(Path(images_dir) / img["file_name"], out_dir)
        for j, sent in enumerate(ref["sentences"]):
            if not isinstance(sent, dict) or "sent" not in sent or "sent_id" not in sent:
                raise InputError(f"{where}: sentences[{j}] needs keys 'sent' and 'sent_id'")
            rows.append({
                "id": safe_name(f"{dataset}_{ref['split']}_{ref['ref_id']}_{sent['sent_id']}"),
                "prompt": sent["sent"],
                "image_path": image_path,
                "bbox": bbox,
                "width": img["width"],
                "height": img["height"],
                "split": ref["split"],
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": ref["image_id"],
                "sent_id": sent["sent_id"],
                "category_id": ref.get("category_id"),
                "source": source,
                **({"segmentation": segmentation} if segmentation else {}),
            })
    return rows


def convert_refer(refs_path: str | Path, instances_path: str | Path, images_dir: str | Path, split: str,
                  out_path: str | Path, dataset: str | None = None) -> list[dict]:
    """refs pickle + instances.json -> out_path JSONL; dataset defaults to the refs file's folder name."""
    refs_path, out_path = Path(refs_path), Path(out_path)
    dataset = safe_name(dataset or refs_path.resolve().parent.name)
    refs = load_refs(refs_path)
    images, anns = load_instances(instances_path)
    rows = refer_rows(refs, images, anns, images_dir=images_dir, split=split, dataset=dataset,
                      source=f"refer:{refs_path.name}", out_dir=out_path.parent,
                      refs_name=refs_path.name, instances_name=Path(instances_path).name)
    if not rows:
        splits = sorted({str(r.get("split")) for r in refs})
        raise InputError(f"{refs_path}: no refs with split {split!r}; splits present: {', '.join(splits)} (or 'all')")
    check_unique_ids(rows, str(refs_path))
    write_jsonl(out_path, rows)
    return rows


# --- lmms-lab parquet copies ---

def parquet_files(path: str | Path, split: str) -> list[Path]:
    """The parquet files for `split`: a file as given, or a folder's shards named <split>-NNNNN-of-NNNNN.parquet
    (folders without that naming are taken whole, labelled with --split)."""
    path = Path(path)
    if path.is_file():
        m = HF_SHARD.match(path.name)
        if m and split != "all" and m["split"] != split:
            raise InputError(f"{path}: file name says split {m['split']!r} but --split is {split!r}")
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: parquet file or folder not found")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise InputError(f"{path}: no .parquet files in this folder")
    named = {f: HF_SHARD.match(f.name) for f in files}
    if split == "all" or not all(named.values()):
        return files
    chosen = [f for f, m in named.items() if m["split"] == split]
    if not chosen:
        found = sorted({m["split"] for m in named.values()})
        raise InputError(f"{path}: no shards for split {split!r}; splits present: {', '.join(found)}")
    return chosen


def image_size(source: bytes | Path | None, where: str) -> tuple[int, int] | tuple[None, None]:
    """(width, height) from encoded bytes or a file; (None, None) when there is neither."""
    if not source or (isinstance(source, Path) and not source.is_file()):
        return None, None
    from PIL import Image, UnidentifiedImageError  # Image.open reads the header only, not the pixels

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{where}: image is not a readable picture ({e})") from None


def iter_parquet_objects(path: Path, required: Sequence[str],
                         optional: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(row index, row) streamed a batch at a time: shards carry every image inline and can be large."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a non-parquet file
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(f"{path}: missing column {missing[0]!r} (has: {', '.join(names)})")
    columns = list(required) + [c for c in optional if c in names]
    index = 0
    for batch in pf.iter_batches(batch_size=256, columns=columns):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def expressions(answer: Any, where: str) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, list) and all(isinstance(a, str) for a in answer):
        return answer
    raise InputError(f"{where}: answer must be a list of referring expressions, got {answer!r:.80}")


def parquet_rows(path: Path, *, images_dir: str | Path | None, split: str, dataset: str, out_dir: Path,
                 written: set[str]) -> tuple[list[dict], int, int]:
    """Rows for one parquet file, the number of objects skipped for having no expression, and the number
    whose segmentation was dropped because the image (so its size) was not found.
    `written` is the set of image file names already saved under out_dir/images across files."""
    required = list(PARQUET_KEYS) + ["image"] * (images_dir is None)
    rows, skipped, unsized = [], 0, 0
    for index, obj in iter_parquet_objects(path, required, optional=["image", "segmentation"]):
        where = f"{path.name}: row {index} (question_id {obj['question_id']})"
        bbox = xywh_to_xyxy(obj["bbox"], where)
        exprs = expressions(obj["answer"], where)
        if not exprs:
            skipped += 1
            continue
        file_name = str(obj["file_name"])
        image = obj.get("image")
        # the datasets Image feature is a struct {bytes, path}; some exports store the bytes bare
        data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
        if images_dir is not None:
            image_path = rebase_path(Path(images_dir) / file_name, out_dir)
            width, height = image_size(data or Path(images_dir) / file_name, where)
        else:
            if not data:
                raise InputError(f"{where}: no embedded image bytes; pass --images DIR with the COCO images")
            target = safe_output_path(out_dir / "images", file_name, "")
            if file_name not in written:
                atomic_write_bytes(target, data)
                written.add(file_name)
            image_path = f"images/{file_name}"
            width, height = image_size(data, where)
        segmentation = None
        if width is not None:
            segmentation = segmentation_rle(obj.get("segmentation"), width, height, where)
        elif obj.get("segmentation"):
            unsized += 1
        for k, expr in enumerate(exprs):
            rows.append({
                "id": safe_name(f"{dataset}_{split}_{obj['question_id']}_{k}"),
                "prompt": expr,
                "image_path": image_path,
                "bbox": bbox,
                "width": width,
                "height": height,
                "split": split,
                "question_id": obj["question_id"],
                "expr_index": k,
                "n_expr": len(exprs),
                "source": f"parquet:{path.name}",
                "exploded_from": "answer",
                **({"segmentation": segmentation} if segmentation else {}),
            })
    return rows, skipped, unsized


def default_parquet_dataset(path: Path) -> str:
    # lmms-lab layouts look like .../RefCOCOg/data/val-00000-of-00001.parquet
    for part in reversed(path.resolve().parts):
        if "ref" in part.lower():
            return part.lower()
    return path.stem


def convert_parquet(parquet: str | Path, images_dir: str | Path | None, split: str, out_path: str | Path,
                    dataset: str | None = None) -> list[dict]:
    """lmms-lab parquet (file or folder) -> out_path JSONL, one row per expression of each object."""
    if split == "all":
        raise InputError("parquet rows carry no split; pass the split the files hold (e.g. --split val)")
    parquet, out_path = Path(parquet), Path(out_path)
    dataset = safe_name(dataset or default_parquet_dataset(parquet))
    rows, skipped, unsized, written = [], 0, 0, set()
    for f in parquet_files(parquet, split):
        file_rows, file_skipped, file_unsized = parquet_rows(f, images_dir=images_dir, split=split, dataset=dataset,
                                                             out_dir=out_path.parent, written=written)
        rows += file_rows
        skipped += file_skipped
        unsized += file_unsized
    if not rows:
        raise InputError(f"{parquet}: no objects with a referring expression")
    check_unique_ids(rows, str(parquet))
    write_jsonl(out_path, rows)
    if skipped:
        print(f"note: skipped {skipped} objects with an empty 'answer' list", file=sys.stderr)
    if unsized:
        print(f"note: dropped the segmentation of {unsized} objects whose image was not found under --images "
              "(its size is needed to rasterize the polygon); their boxes are kept", file=sys.stderr)
    return rows


# --- calibration subsets ---

def draw_calib(in_path: str | Path, n: int, seed: int, out_path: str | Path,
               allow_non_train: bool = False) -> list[dict]:
    """n rows drawn by a seeded RNG (same file, n and seed -> same rows, in file order).
    Heads are selected on train only: a drawn val/test row is an error unless allow_non_train."""
    in_path, out_path = Path(in_path), Path(out_path)
    rows = list(read_jsonl(in_path, required=("id",)))
    if n <= 0 or n > len(rows):
        raise InputError(f"{in_path}: asked for --n {n} rows but the file has {len(rows)}")
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    out = []
    for i in picked:
        lineno, row = rows[i]
        if row.get("split") != "train" and not allow_non_train:
            raise InputError(f"{in_path}:{lineno}: row {row['id']!r} has split {row.get('split')!r}; heads must be "
                             "selected on train only (val/test would leak); pass --allow-non-train to override")
        if isinstance(row.get("image_path"), str) and not Path(row["image_path"]).is_absolute():
            # keep relative image paths pointing at the same files from the new JSONL's folder
            target = resolve_path(row["image_path"], in_path.parent).resolve()
            row = {**row, "image_path": os.path.relpath(target, out_path.parent.resolve())}
        out.append(row)
    write_jsonl(out_path, out)
    return out


# --- CLI ---

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.refcoco", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refer", help="REFER refs(unc).p / refs(umd).p + instances.json")
    r.add_argument("--refs", required=True)
    r.add_argument("--instances", required=True)
    r.add_argument("--images", required=True, help="COCO image folder (e.g. train2014)")
    r.add_argument("--split", required=True, help="train, val, testA, testB, test or all")
    r.add_argument("--dataset", help="id prefix; default: the refs file's folder name")
    r.add_argument("--out", required=True)
    q = sub.add_parser("parquet", help="lmms-lab style parquet file or folder")
    q.add_argument("--parquet", required=True)
    q.add_argument("--images", help="COCO image folder; omit to save the embedded images beside --out")
    q.add_argument("--split", required=True)
    q.add_argument("--dataset", help="id prefix; default: the nearest folder name containing 'ref'")
    q.add_argument("--out", required=True)
    c = sub.add_parser("calib", help="seeded random subset for head selection (train only)")
    c.add_argument("--in", dest="in_path", required=True)
    c.add_argument("--n", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.add_argument("--allow-non-train", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "refer":
            rows = convert_refer(args.refs, args.instances, args.images, args.split, args.out, args.dataset)
        elif args.cmd == "parquet":
            images = None if args.images in (None, "", "none", "None") else args.images
            rows = convert_parquet(args.parquet, images, args.split, args.out, args.dataset)
        else:
            rows = draw_calib(args.in_path, args.n, args.seed, args.out, args.allow_non_train)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
