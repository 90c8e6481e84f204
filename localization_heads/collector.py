"""Collect the last text token's attention over the image tokens: [L, H, 1, V] per sample.

Forward mode (default): one prefill; the query is the last prompt token (the end of the expression).
Generate mode: `generate` with the configured decoding; the query is the FIRST GENERATED token,
falling back to the prompt's row when nothing was generated.
The query token's text is kept in the meta ("query_token"), with a warning when it is an unknown
word, a special token or blank: its attention then need not stand for the expression.

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
from localization_heads.layout import Layout, legacy_keys
from localization_heads.families.llava import compute_geometry

log = logging.getLogger(__name__)

FORMAT = "localization-heads/attention-v1"


def check_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"empty query {query!r}; pass a referring expression (data.query / prompt)")
    return query.strip()


def _rows_from_eager(attentions, num_layers: int, batch: int) -> torch.Tensor:
    """[L, B, H, N] last query rows out of `output_attentions`; never trust the flag (an empty
    tuple under SDPA in transformers 5, None in 4.x, log-sum-exp under flex)."""
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
    capture = AttentionCapture(max_steps=1)
    # logits_to_keep=1: the [B, N, vocab] logits are never used and would be the largest tensor
    # of the pass after eager's maps.
    out = adapter.model(**inputs, output_attentions=eager, attention_capture=None if eager else capture,
                        use_cache=False, logits_to_keep=1)
    rows = _rows_from_eager(out.attentions, adapter.num_layers, batch) if eager else capture.layers(0, adapter.num_layers)
    return _checked(rows, adapter, batch)


@torch.inference_mode()
def generate_then_capture(adapter: Adapter, prepared: Prepared, *, attn_capture: str = "sdpa",
                          gen_kwargs: dict | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Generate, then capture the FIRST GENERATED token's row by one forward pass over prompt +
    that token (the same softmax as decode step 1, any decoding strategy). The reference code read
    the prefill's row 0 (BOS, which sees no image) instead. Returns the rows, the generated texts
    and the [B] ids of the tokens whose rows were captured."""
    out = adapter.model.generate(**prepared.inputs, return_dict_in_generate=True,
                                 **adapter.generate_kwargs, **(gen_kwargs or {}))
    texts = adapter.decode_generated(out.sequences, prepared)
    prompt_len = prepared.inputs["input_ids"].shape[1] if "input_ids" in prepared.inputs else 0
    if out.sequences.shape[1] <= prompt_len:
        log.warning("generation produced no token; using the forward-mode row")
        return capture_rows(adapter, prepared, attn_capture=attn_capture), texts, adapter.query_token_ids(prepared)
    first = out.sequences[:, prompt_len]                                    # [B]
    return capture_rows(adapter, adapter.append_tokens(prepared, first), attn_capture=attn_capture), texts, first


def _checked(rows: torch.Tensor, adapter: Adapter, batch: int) -> torch.Tensor:
    if rows.shape[:3] != (adapter.num_layers, batch, adapter.num_heads) or rows.numel() == 0:
        raise RuntimeError(f"captured rows have shape {tuple(rows.shape)}, expected "
                           f"({adapter.num_layers}, {batch}, {adapter.num_heads}, N)")
    if not torch.isfinite(rows).all():
        raise RuntimeError("captured attention has non-finite values")
    return rows


def collect(adapter: Adapter, images: list[Image.Image], queries: list[str], *, attn_capture: str = "sdpa",
            use_generate: bool = False, gen_kwargs: dict | None = None) -> list[dict]:
    """Attention records for a batch: {"attn": [L, H, 1, V] float32 CPU, "meta": {...}} per sample."""
    prepared = adapter.prepare(images, [check_query(q) for q in queries])
    if use_generate:
        rows, texts, query_ids = generate_then_capture(adapter, prepared, attn_capture=attn_capture,
                                                       gen_kwargs=gen_kwargs)
    else:
        rows, texts = capture_rows(adapter, prepared, attn_capture=attn_capture), None
        query_ids = adapter.query_token_ids(prepared)
    # The template's own end (query_at=generation_prompt) is a special or blank token by design.
    expected_word = use_generate or adapter.query_at == "expression"
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
            "num_layers": adapter.num_layers,
            "num_heads": adapter.num_heads,
            "layout": layout.to_dict(),
            **legacy_keys(layout),
            "mode": "generate" if use_generate else "forward",
            "attn_capture": attn_capture,
            "model_dtype": str(adapter.dtype).removeprefix("torch."),
        }
        if texts is not None:
            meta["generated_text"] = texts[b]
        meta["query_token"], problem = query_token(adapter.tokenizer, int(query_ids[b]))
        if problem and expected_word:
            log.warning("query %r: the attention is read from %s (%r); its box may not stand for the expression: "
                        "rephrase it in words the model knows", query, problem, meta["query_token"])
        records.append({"attn": attn, "meta": meta})
    return records


def query_token(tokenizer, token_id: int) -> tuple[str, str | None]:
    """The query token as text, and what is wrong with it as the token whose attention is read
    (an unknown word, a special token, blank), or None."""
    text = tokenizer.decode([token_id])
    if tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id:
        return text, "the unknown token (a word the tokenizer does not know)"
    if token_id in tokenizer.all_special_ids:
        return text, "a special token"
    if not text.strip():
        return text, "a blank token"
    return text, None


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
    """{"attn": float32 [L, H, 1, V], "meta": dict with grid and geometry}; InputError otherwise."""
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
    attn, meta = obj["attn"], obj["meta"]
    if not isinstance(meta, dict):
        raise InputError(f"{path}: 'meta' is a {type(meta).__name__}, expected a dict; the file is damaged: collect it again")
    if not (torch.is_tensor(attn) or (isinstance(attn, np.ndarray) and attn.dtype.kind in "fiu")):
        raise InputError(f"{path}: 'attn' is a {type(attn).__name__}, expected a tensor [L, H, 1, V]; "
                         "the file is damaged: collect it again")
    attn = torch.as_tensor(attn).float()
    if attn.dim() == 3:  # [L, H, V] from tools that drop the query axis
        attn = attn.unsqueeze(2)
    if attn.dim() != 4 or attn.shape[2] != 1:
        raise InputError(f"{path}: 'attn' has shape {tuple(attn.shape)}, expected [L, H, 1, V]")
    if not torch.isfinite(attn).all():   # one NaN would drop τ to 0 and pass every head
        raise InputError(f"{path}: 'attn' holds {int((~torch.isfinite(attn)).sum())} NaN/inf values; "
                         "the file is damaged: collect it again")
    size = meta.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise InputError(f"{path}: meta 'image_size' is {size!r}, expected [width, height] in pixels; "
                         "the file is damaged: collect it again")
    return {"attn": attn, "meta": _complete_meta(dict(meta), attn, path)}


def check_image_size(meta: dict, image: Image.Image, attention_file: str | Path) -> None:
    """The image an attention file was collected from has the size the file records: boxes are
    placed on the image by that size, so another size would put them off (or outside) the image."""
    if list(meta["image_size"]) != list(image.size):
        raise InputError(f"{meta.get('image_file')}: {image.width}x{image.height} px, but {attention_file} was collected "
                         f"from a {meta['image_size'][0]}x{meta['image_size'][1]} px image (meta 'image_size'); "
                         "collect it again from this image, or point meta 'image_file' at the image it was made from")


def _complete_meta(meta: dict, attn: torch.Tensor, path: Path) -> dict:
    """Reference-code files carry no grid or geometry. LLaVA-1.5 (the only model that code runs)
    has a square CLIP grid and pads to square, so that is assumed — and logged."""
    num_vis = attn.shape[-1]
    if "layout" not in meta and "geometry" not in meta:
        if "image_size" not in meta:
            raise InputError(f"{path}: meta has no 'image_size'; cannot place the map on the image")
        side = math.isqrt(num_vis)
        if side * side != num_vis:
            raise InputError(f"{path}: meta has no 'grid' and V={num_vis} is not square; cannot place the map")
        grid = tuple(meta.get("grid") or (side, side))
        log.warning("%s: reference-format file; assuming grid %s over the image padded to square", path, grid)
        meta["geometry"] = compute_geometry(tuple(meta["image_size"]), grid, pad=True).to_dict()
        meta["grid"] = list(grid)
    try:
        layout = Layout.from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: meta has no valid layout ({e.__class__.__name__}: {e})") from None
    if layout.num_tokens != num_vis:
        raise InputError(f"{path}: layout {[m.grid for m in layout.maps]} does not match V={num_vis} visual tokens")
    meta["layout"] = layout.to_dict()
    meta.setdefault("num_layers", attn.shape[0])
    meta.setdefault("num_heads", attn.shape[1])
    return meta
