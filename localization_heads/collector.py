"""Collect the last text token's attention over the image tokens: [L, H, 1, V] per sample.

L counts the language model's layers WITH softmax attention: every layer of a dense model, only the
attention layers of a hybrid one (Qwen3.5's linear-attention and LFM2's convolution layers have no
attention weights). meta["layers"] lists the model index of each row of L; files without it read as
0..L−1. Heads are named by (model layer, head) everywhere downstream.

Forward mode (default): one prefill; the query is the last prompt token (the end of the expression).
Generate mode: `generate` with the configured decoding; the query is the FIRST GENERATED token,
falling back to the prompt's row when nothing was generated.

Capture: `attn_capture="sdpa"` (capture.py, one row per layer beside the SDPA kernel) or "eager"
(`output_attentions=True`, every full map materialised — kept for comparison). Either way the
result is checked: a missing, empty or non-finite capture raises, it never passes as a result.

Attention files: `save_attention` writes {"attn", "meta"} with torch.save (zip) atomically;
`load_attention` reads those with weights-only loading and the reference code's plain pickles
through a restricted unpickler, and refuses anything that would execute code.
"""
from __future__ import annotations

import io
import logging
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from localization_heads.capture import AttentionCapture
from localization_heads.dataio import InputError, atomic_write_bytes
from localization_heads.families.base import Adapter, Prepared
from localization_heads.layout import Layout
from localization_heads.families.llava import compute_geometry

log = logging.getLogger(__name__)

FORMAT = "localization-heads/attention-v1"


def check_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"empty query {query!r}; pass a referring expression (data.query / prompt)")
    return query.strip()


def _rows_from_eager(attentions, num_layers: int, batch: int) -> torch.Tensor:
    """[L, B, H, N] last query rows out of `output_attentions` (one map per attention layer: hybrid
    models return none for their other layers); never trust the flag (an empty tuple under SDPA in
    transformers 5, None in 4.x, log-sum-exp under flex)."""
    if not attentions or len(attentions) != num_layers or any(a is None or a.dim() != 4 for a in attentions):
        raise RuntimeError("output_attentions returned no attention maps; the text model must run eager "
                           "attention (model.attn_capture=eager loads it so)")
    rows = torch.stack([a[:, :, -1, :].float() for a in attentions])
    if rows.shape[1] != batch:
        raise RuntimeError(f"eager attentions have batch {rows.shape[1]}, expected {batch}")
    return rows


@torch.inference_mode()
def capture_rows(adapter: Adapter, prepared: Prepared, *, attn_capture: str = "sdpa") -> torch.Tensor:
    """One forward pass over a prepared batch; the last position's rows [L, B, H, N]."""
    inputs = adapter.call_inputs(prepared)
    batch = inputs["attention_mask"].shape[0]
    eager = attn_capture == "eager"
    layers = adapter.attention_layers
    capture = AttentionCapture(layers, max_steps=1)
    # logits_to_keep=1: the [B, N, vocab] logits are never used and would be the largest tensor
    # of the pass after eager's maps.
    out = adapter.model(**inputs, output_attentions=eager, attention_capture=None if eager else capture,
                        use_cache=False, logits_to_keep=1)
    rows = _rows_from_eager(out.attentions, len(layers), batch) if eager else capture.layers(0)
    return _checked(rows, adapter, batch)


@torch.inference_mode()
def generate_then_capture(adapter: Adapter, prepared: Prepared, *, attn_capture: str = "sdpa",
                          gen_kwargs: dict | None = None) -> tuple[torch.Tensor, list[str]]:
    """Generate, then capture the FIRST GENERATED token's row by one forward pass over prompt +
    that token (the same softmax as decode step 1, any decoding strategy). The reference code read
    the prefill's row 0 (BOS, which sees no image) instead."""
    out = adapter.model.generate(**prepared.inputs, return_dict_in_generate=True,
                                 **adapter.generate_kwargs, **(gen_kwargs or {}))
    texts = adapter.decode_generated(out.sequences, prepared)
    prompt_len = prepared.inputs["input_ids"].shape[1] if "input_ids" in prepared.inputs else 0
    if out.sequences.shape[1] <= prompt_len:
        log.warning("generation produced no token; using the forward-mode row")
        return capture_rows(adapter, prepared, attn_capture=attn_capture), texts
    first = out.sequences[:, prompt_len]                                    # [B]
    return capture_rows(adapter, adapter.append_tokens(prepared, first), attn_capture=attn_capture), texts


def _checked(rows: torch.Tensor, adapter: Adapter, batch: int) -> torch.Tensor:
    expected = (len(adapter.attention_layers), batch, adapter.num_heads)
    if rows.shape[:3] != expected or rows.numel() == 0:
        raise RuntimeError(f"captured rows have shape {tuple(rows.shape)}, expected ({', '.join(map(str, expected))}, N)")
    if not torch.isfinite(rows).all():
        raise RuntimeError("captured attention has non-finite values")
    return rows


def collect(adapter: Adapter, images: list[Image.Image], queries: list[str], *, attn_capture: str = "sdpa",
            use_generate: bool = False, gen_kwargs: dict | None = None) -> list[dict]:
    """Attention records for a batch: {"attn": [L, H, 1, V] float32 CPU, "meta": {...}} per sample."""
    prepared = adapter.prepare(images, [check_query(q) for q in queries])
    if use_generate:
        rows, texts = generate_then_capture(adapter, prepared, attn_capture=attn_capture, gen_kwargs=gen_kwargs)
    else:
        rows, texts = capture_rows(adapter, prepared, attn_capture=attn_capture), None
    records = []
    for b, (query, layout) in enumerate(zip(queries, prepared.layouts)):
        positions = prepared.image_positions[b].to(rows.device)              # [V_b]
        if positions.numel() != layout.num_tokens:
            raise RuntimeError(f"row {b}: {positions.numel()} image tokens, its layout has {layout.num_tokens}")
        attn = rows[:, b][:, :, positions].unsqueeze(2).cpu()                 # [L, H, 1, V_b]
        meta = {
            "format": FORMAT,
            "query": query,
            "prompt": prepared.prompts[b],
            "model_name": adapter.model_name,
            "family": getattr(adapter, "family", None),
            "image_size": list(layout.image_size),
            "vis_len": int(positions.numel()),
            "num_layers": len(adapter.attention_layers),     # the L axis
            "layers": list(adapter.attention_layers),         # model index of each row of L
            "num_heads": adapter.num_heads,
            "layout": layout.to_dict(),
            "mode": "generate" if use_generate else "forward",
            "attn_capture": attn_capture,
            "model_dtype": str(adapter.dtype).removeprefix("torch."),
        }
        if texts is not None:
            meta["generated_text"] = texts[b]
        records.append({"attn": attn, "meta": meta})
    return records


# ---------------------------------------------------------------- attention files

def save_attention(path: str | Path, record: dict, dtype: torch.dtype = torch.float16) -> None:
    """Atomically write {"attn": [L, H, 1, V] in `dtype`, "meta": dict}."""
    buf = io.BytesIO()
    meta = dict(record["meta"], attn_dtype=str(dtype).removeprefix("torch."))
    torch.save({"attn": record["attn"].to(dtype).contiguous(), "meta": meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


class _SafeUnpickler(pickle.Unpickler):
    """Only what a reference-code attention pickle holds: tensors, numpy arrays and builtins."""

    _allowed = {
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            # torch's own hook would call torch.load(weights_only=False) on the embedded bytes.
            return lambda data: torch.load(io.BytesIO(data), weights_only=True)
        if (module, name) in self._allowed or (module == "numpy" and name.endswith("DType")) \
                or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_attention(path: str | Path) -> dict:
    """{"attn": float32 [L, H, 1, V], "meta": dict with its "layout"}; InputError otherwise. Files of
    every earlier format load: a `geometry` meta (one grid, before layouts) and the reference code's
    pickles (no geometry at all) get the layout they imply."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: attention file not found; check data.attention_file")
    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with path.open("rb") as f:
                obj = _SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: not a safe attention file ({e}); only tensors, arrays and plain data load") from None
    except Exception as e:
        raise InputError(f"{path}: not an attention file ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict) or "attn" not in obj or "meta" not in obj:
        raise InputError(f"{path}: not an attention file (expected a dict with 'attn' and 'meta')")
    attn = torch.as_tensor(np.asarray(obj["attn"]) if not torch.is_tensor(obj["attn"]) else obj["attn"]).float()
    if attn.dim() == 3:  # [L, H, V] from tools that drop the query axis
        attn = attn.unsqueeze(2)
    if attn.dim() != 4 or attn.shape[2] != 1:
        raise InputError(f"{path}: 'attn' has shape {tuple(attn.shape)}, expected [L, H, 1, V]")
    if not torch.isfinite(attn).all():   # one NaN would drop τ to 0 and pass every head
        raise InputError(f"{path}: 'attn' holds {int((~torch.isfinite(attn)).sum())} NaN/inf values; "
                         "the file is damaged: collect it again")
    meta = _complete_meta(dict(obj["meta"]), attn, path)
    return {"attn": attn, "meta": meta}


def _complete_meta(meta: dict, attn: torch.Tensor, path: Path) -> dict:
    """meta with its "layout" (Layout.from_meta reads the older `geometry` form). Reference-code
    files carry no grid or geometry: LLaVA-1.5 (the only model that code runs) has a square CLIP
    grid and pads to square, so that is assumed — and logged."""
    num_vis = attn.shape[-1]
    if "layout" not in meta and "geometry" not in meta:
        if "image_size" not in meta:
            raise InputError(f"{path}: meta has no 'image_size'; cannot place the map on the image")
        side = math.isqrt(num_vis)
        if side * side != num_vis:
            raise InputError(f"{path}: meta has no 'grid' and V={num_vis} is not square; cannot place the map")
        grid = tuple(meta.get("grid") or (side, side))
        log.warning("%s: reference-format file; assuming grid %s over the image padded to square", path, grid)
        meta["layout"] = compute_geometry(tuple(meta["image_size"]), grid, pad=True).to_dict()
    try:
        layout = Layout.from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: meta has no valid layout ({e.__class__.__name__}: {e})") from None
    if layout.num_tokens != num_vis:
        raise InputError(f"{path}: layout {[m.grid for m in layout.maps]} does not match V={num_vis} visual tokens")
    meta["layout"] = layout.to_dict()
    meta.setdefault("num_layers", attn.shape[0])
    layers = meta.setdefault("layers", list(range(attn.shape[0])))   # files before hybrid models: every layer
    if not (isinstance(layers, (list, tuple)) and len(layers) == attn.shape[0]
            and all(isinstance(i, int) and i >= 0 for i in layers) and list(layers) == sorted(set(layers))):
        raise InputError(f"{path}: meta['layers'] = {layers!r} must list {attn.shape[0]} ascending model layer "
                         "indices, one per row of 'attn'; the file is damaged: collect it again")
    meta["layers"] = list(layers)
    meta.setdefault("num_heads", attn.shape[1])
    return meta
