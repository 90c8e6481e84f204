"""Capture the last query row of every language-model attention layer during a normal SDPA pass.

`output_attentions=True` needs eager attention and materialises every layer's [B, H, N, N] map to
keep one row. Instead we register an attention function with transformers that runs the stock SDPA
kernel for the layer output and, beside it, computes softmax(q_last · Kᵀ · scaling + mask_last) in
float32 for the one row we need: [B, H, N] per layer. The row is the same softmax eager computes
(over ALL keys, never renormalised), so it matches eager to float rounding (tests/test_capture.py).
Layers with attention-logit soft-capping (Gemma 2 text: PaliGemma 2), which SDPA cannot run, compute
their output with Gemma 2's eager formula instead, and the row applies the same soft-capping.

The buffer travels with the call (`model(..., attention_capture=buf)` → kwargs → every attention
layer), so there is no process-global state: two models or threads never share a buffer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

CAPTURE_ATTN = "lh_capture"


class AttentionCapture:
    """Rows recorded during one model call (or one generate): steps[s][layer] = [B, H, N_s].

    `layers`: the model indices of the layers with softmax attention, ascending (hybrid models skip
    their linear-attention or convolution layers; a dense model has 0..L−1). A forward call starts
    at the first of them. Step 0 is the prefill (query = last prompt token); step 1 is the first
    decode step, whose query is the first generated token. Steps past `max_steps` are not recorded
    (no cost, no memory).
    """

    def __init__(self, layers: Sequence[int], max_steps: int = 1):
        self.expected = [int(i) for i in layers]
        if not self.expected:
            raise ValueError("AttentionCapture needs at least one attention layer")
        self.max_steps = max_steps
        self.steps: list[dict[int, torch.Tensor]] = []
        self._recording = True

    def record(self, layer_idx: int, row: torch.Tensor) -> None:
        if layer_idx == self.expected[0]:  # a new forward call starts at the first attention layer
            self._recording = len(self.steps) < self.max_steps
            if self._recording:
                self.steps.append({})
        if self._recording and self.steps:
            self.steps[-1][layer_idx] = row

    def layers(self, step: int) -> torch.Tensor:
        """[L, B, H, N] rows of one step, L = len(layers) in their order; a missing or an unexpected
        layer is an error, never a silently shifted result."""
        got = self.steps[step] if step < len(self.steps) else {}
        missing = [i for i in self.expected if i not in got]
        if missing:
            raise RuntimeError(f"attention capture missed layers {missing[:5]} of step {step}: the language model "
                               f"does not run attn_implementation={CAPTURE_ATTN!r} through transformers' AttentionInterface")
        extra = sorted(set(got) - set(self.expected))
        if extra:
            raise RuntimeError(f"attention capture saw layers {extra[:5]} that the adapter does not list as attention "
                               f"layers {self.expected[:8]}...: its layer list is wrong for this model")
        return torch.stack([got[i] for i in self.expected])


def last_row_attention(query, key, attention_mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """softmax over all keys of the last query position, float32: [B, H, N].

    query [B, H, Q, D], key [B, Hkv, N, D] (grouped-query keys are shared by H/Hkv heads),
    attention_mask: None, bool [B, 1, Q, N] (True = attend) or additive float [B, 1, Q, N];
    softcap: Gemma 2's logit soft-capping, tanh(s / c) · c before the mask, as its eager attention does.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query[:, :, -1, :].float().view(batch, kv_heads, heads // kv_heads, dim)   # [B, Hkv, G, D]
    scores = torch.einsum("bkgd,bknd->bkgn", q, key.float()).reshape(batch, heads, -1) * scaling  # [B, H, N]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, :]                                             # [B, 1, N]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    # mask None: SDPA's causal fast path; the last query of a causal step sees every key.
    return scores.softmax(dim=-1)


def capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Drop-in for transformers' sdpa attention that also records the last query row."""
    capture: AttentionCapture | None = kwargs.get("attention_capture")
    softcap = kwargs.pop("softcap", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        output = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)
    else:
        output = softcapped_attention(module, query, key, value, attention_mask, scale, softcap, dropout)
    if capture is not None:
        capture.record(module.layer_idx, last_row_attention(query, key, attention_mask, scale, softcap))
    return output


def softcapped_attention(module, query, key, value, attention_mask, scaling: float, softcap: float, dropout: float):
    """A layer with logit soft-capping (Gemma 2 text, e.g. PaliGemma 2), which SDPA cannot run: its output
    comes from Gemma 2's own eager attention (its [B, H, Q, N] weights are freed with the layer)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1:      # SDPA's causal fast path: the mask was left out
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = causal[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:    # eager adds its mask
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    output, _ = eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, softcap=softcap)
    return output, None


def register_capture() -> str:
    """Make CAPTURE_ATTN a valid attn_implementation; idempotent. The mask function must be
    registered too, or transformers silently builds no causal/padding mask for the name."""
    AttentionInterface.register(CAPTURE_ATTN, capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)
    return CAPTURE_ATTN
