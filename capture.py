"""Capture the last query row of every language-model attention layer during a normal SDPA pass.

`output_attentions=True` needs eager attention and materialises every layer's [B, H, N, N] map to
keep one row. Instead we register an attention function with transformers that runs the stock SDPA
kernel for the layer output and, beside it, computes softmax(q_last · Kᵀ · scaling + mask_last) in
float32 for the one row we need: [B, H, N] per layer. The row is the same softmax eager computes
(over ALL keys, never renormalised), so it matches eager to float rounding (tests/test_capture.py).

The buffer travels with the call (`model(..., attention_capture=buf)` → kwargs → every attention
layer), so there is no process-global state: two models or threads never share a buffer.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

CAPTURE_ATTN = "lh_capture"


class AttentionCapture:
    """Rows recorded during one model call (or one generate): steps[s][layer] = [B, H, N_s].

    Step 0 is the prefill (query = last prompt token); step 1 is the first decode step, whose query
    is the first generated token. Steps past `max_steps` are not recorded (no cost, no memory).
    """

    def __init__(self, max_steps: int = 1):
        self.max_steps = max_steps
        self.steps: list[dict[int, torch.Tensor]] = []
        self._recording = True

    def record(self, layer_idx: int, row: torch.Tensor) -> None:
        if layer_idx == 0:  # a new forward call starts at the first layer
            self._recording = len(self.steps) < self.max_steps
            if self._recording:
                self.steps.append({})
        if self._recording:
            self.steps[-1][layer_idx] = row

    def layers(self, step: int, num_layers: int) -> torch.Tensor:
        """[L, B, H, N] rows of one step; a missing layer is an error, never an empty result."""
        got = self.steps[step] if step < len(self.steps) else {}
        missing = [i for i in range(num_layers) if i not in got]
        if missing:
            raise RuntimeError(f"attention capture missed layers {missing[:5]} of step {step}: the language model "
                               f"does not run attn_implementation={CAPTURE_ATTN!r} through transformers' AttentionInterface")
        return torch.stack([got[i] for i in range(num_layers)])


def last_row_attention(query, key, attention_mask, scaling: float) -> torch.Tensor:
    """softmax over all keys of the last query position, float32: [B, H, N].

    query [B, H, Q, D], key [B, Hkv, N, D] (grouped-query keys are shared by H/Hkv heads),
    attention_mask: None, bool [B, 1, Q, N] (True = attend) or additive float [B, 1, Q, N].
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query[:, :, -1, :].float().view(batch, kv_heads, heads // kv_heads, dim)   # [B, Hkv, G, D]
    scores = torch.einsum("bkgd,bknd->bkgn", q, key.float()).reshape(batch, heads, -1) * scaling  # [B, H, N]
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
    output = sdpa_attention_forward(module, query, key, value, attention_mask,
                                    scaling=scaling, dropout=dropout, **kwargs)
    if capture is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        capture.record(module.layer_idx, last_row_attention(query, key, attention_mask, scale))
    return output


def register_capture() -> str:
    """Make CAPTURE_ATTN a valid attn_implementation; idempotent. The mask function must be
    registered too, or transformers silently builds no causal/padding mask for the name."""
    AttentionInterface.register(CAPTURE_ATTN, capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)
    return CAPTURE_ATTN
