"""Pieces shared by the chat-family tests (InternVL, Gemma 3): an offline word-level tokenizer with a
family's special tokens and chat template, and the geometry proof that traces which pixels feed each
image token through the model itself."""
from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from localization_heads.layout import Layout, cell_boxes

WORDS = ["the", "a", "red", "blue", "circle", "square", "cat", "on", "left", ".", "bird", "small", "dog",
         "user", "assistant", "model", "system", "where", "is", "?"]


def word_tokenizer(specials: list[str], *, pad: str, eos: str, bos: str | None = None, named: dict | None = None,
                   chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0.. = [pad, bos, eos, <unk>] + WORDS, then `named` and `specials` as added
    special tokens, so "<a><a><a>" splits into single tokens; `named` also sets the attributes a processor
    reads (e.g. {"image_token": "<image_soft_token>"})."""
    base = [t for t in (pad, bos, eos, "<unk>") if t is not None]
    vocab = base + [w for w in WORDS if w not in base]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"bos_token": bos} if bos is not None else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>",
                                  extra_special_tokens=named or {}, **kwargs)
    out.add_tokens([s for s in specials if s not in (named or {}).values()], special_tokens=True)
    out.chat_template = chat_template
    return out


def zero_attention_outputs(tower: torch.nn.Module, leaf: str) -> int:
    """Zero every attention output projection named `leaf` in a vision tower, so each patch's feature
    depends on that patch's pixels only; returns how many were zeroed."""
    count = 0
    with torch.no_grad():
        for name, module in tower.named_modules():
            if name.endswith(leaf) and isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                count += 1
    return count


def traced_cell_boxes(image_features, pixel_values: torch.Tensor, mean, std,
                      image_size: tuple[int, int]) -> np.ndarray:
    """[views, tokens, 4] original-image box of the pixels that feed each image token.

    image_features(pixel_values) → [views, tokens, D] must be the model's own path from pixels to the
    language model's image embeddings, with a local vision tower (zero_attention_outputs). A token's
    pixels are those with a non-zero gradient; a coordinate image (R = x, G = y, family_checks.coord_image)
    decodes them to original coordinates, and the box spans their centres plus half a pixel step."""
    width, height = image_size
    pixels = pixel_values.detach().float().requires_grad_(True)                 # [views, 3, h, w]
    features = image_features(pixels)                                           # [views, tokens, D]
    views, tokens, dim = features.shape
    probe = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    shape = (1, -1, 1, 1)
    decoded = pixels.detach() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)   # [0, 1]
    boxes = np.zeros((views, tokens, 4))
    for t in range(tokens):
        (grad,) = torch.autograd.grad((features[:, t] @ probe).sum(), pixels, retain_graph=True)
        support = grad.abs().sum(dim=1) > 0                                     # [views, h, w]
        for v in range(views):
            ys, xs = support[v].nonzero(as_tuple=True)
            if ys.numel() == 0:
                raise AssertionError(f"view {v} token {t} depends on no pixel of its view")
            cols, rows = xs.unique().numel(), ys.unique().numel()
            assert ys.numel() == rows * cols, f"view {v} token {t}: its pixels are not a rectangle"
            x = decoded[v, 0][ys, xs].numpy() * width                           # original x of each pixel centre
            y = decoded[v, 1][ys, xs].numpy() * height
            step_x = (x.max() - x.min()) / max(cols - 1, 1)
            step_y = (y.max() - y.min()) / max(rows - 1, 1)
            boxes[v, t] = [x.min() - step_x / 2, y.min() - step_y / 2, x.max() + step_x / 2, y.max() + step_y / 2]
    return boxes


def assert_layout_matches_trace(layout: Layout, traced: np.ndarray, tol: float = 1.0) -> float:
    """Every cell of every map covers the traced region of its token to within `tol` original pixels;
    returns the largest edge error."""
    assert len(layout.maps) == traced.shape[0], f"{len(layout.maps)} maps for {traced.shape[0]} views"
    worst = 0.0
    for v, token_map in enumerate(layout.maps):
        assert token_map.size == traced.shape[1], f"map {token_map.name}: {token_map.size} cells, {traced.shape[1]} tokens"
        error = np.abs(cell_boxes(token_map) - traced[v])
        worst = max(worst, float(error.max()))
        assert error.max() <= tol, (f"map {token_map.name}: cell boxes off by {error.max():.2f} px "
                                    f"(cell {int(error.max(axis=1).argmax())})")
    return worst
