"""Benchmark of attention-row collection (issue #5): speed, memory and correctness of the capture.

A LLaVA-shaped model with RANDOM weights is built from configs (nothing is downloaded), saved with
its processor to a temp folder, and loaded back through the project's own `adapters.load_adapter`,
so the measured code is the code users run. Everything in the printed table comes from one run:

  time        plain SDPA forward vs capture (`collector.capture_rows(..., attn_capture="sdpa")`) vs
              eager `output_attentions` (`attn_capture="eager"`); warm-up, then the median of repeats
              taken in rotating order so drift hits every mode alike.       target capture/plain ≤ 1.10
  memory      extra peak memory of one call above the loaded model: on CPU the growth of peak RSS
              (VmHWM, reset through /proc/self/clear_refs) in a fresh subprocess per mode and N; on
              GPU torch.cuda.max_memory_allocated − baseline.         target capture ≤ eager/10 at N≈620
  correctness max |capture row − eager row| over every layer, head and key.
  batch       samples/s of `pipeline.run(cfg)` with stage=batch on a generated JSONL, batch size 8
              vs 1 (the model is loaded once, outside the timed region).  target ≥ 1.5× CPU, ≥ 3× GPU
  analysis    ms per sample of `analyze.analyze` on [32, 32, 1, 576] (24×24 grid), both logic
              configs (selection_v1, paper).                                        target ≤ 20 ms
  FLOP/s      (GPU) collect-forward FLOPs / time as a fraction of a measured bf16 matmul rate.

Sequence length N grows through a longer text prompt (the image stays 24×24 = 576 tokens).

Profiles:   cpu      scaled-down LLaVA-1.5 (text 512 wide, 8 layers, 8 heads; small CLIP tower;
                     336 px / patch 14 → 576 image tokens), float32, N = 620 / 1,240 / 2,480
            llava7b  full LLaVA-1.5-7B shape (Llama-7B text, CLIP ViT-L/14-336), float16, GPU only;
                     writes a 14 GB checkpoint to the temp folder and holds three fp16 copies on the GPU
            llava7b_cpu  the same 7B shape in bfloat16 on a CPU with ≥ 24 GB RAM: extra peak memory only,
                     at N = 620, one probe process at a time (30 min on 2 shared cores)
            qwen25vl7b_cpu  Qwen2.5-VL-7B shape (Qwen2.5 text, 32-block windowed ViT) with a 1,000 × 750
                     image (smart_resize → 27 × 36 = 972 image tokens), N = 1,000, bfloat16, memory
                     only like llava7b_cpu (vocabulary cut to ~1k: 14.4 GB of weights; needs ≥ 18 GB free RAM)
            qwen25vl_scaled_cpu  the same layers, heads, image and N with every width / 4 (~1 GB)
            qwen35_9b  Qwen3.5-9B's layers and heads (32 layers: 24 Gated-DeltaNet + 8 full attention,
                     16 heads over 4 KV; 27-block ViT) with every width / 4, a 1,000 × 750 image (smart_resize
                     → 23 × 31 = 713 image tokens), N = 1,000, bfloat16, memory only; plus where the plain
                     forward's own peak lies (one more probe: per vision block and per kind of text layer)
            gemma4_31b_scaled_cpu  Gemma 4 31B's layers, heads, attention kinds and image settings, text widths
                     / 16 (vision / 4.5), the same 1,000 × 750 image, N = 620; memory only, float32 (~0.3 GB)
            --quick  tiny shapes, a smoke test (about a minute); its numbers are not written anywhere

Usage: python benchmarks/bench_collect.py [--profile NAME] [--quick] [--no-write] [--threads T]
The cpu, llava7b, llava7b_cpu, qwen25vl*, qwen35_9b and gemma4* runs append a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from localization_heads.config import LogicSettings  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
MODES = ("plain", "capture", "eager")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]   # ids 0..4
IMAGE_TOKEN_ID = SPECIALS.index("<image>")


# ---------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    name: str
    text: dict                  # LlamaConfig keyword arguments (Qwen: the text_config's)
    vision: dict                # CLIPVisionConfig keyword arguments (Qwen: the vision_config's)
    device: str                 # "cpu" | "cuda"
    dtype: str                  # model.dtype of the adapter config
    seq_lens: tuple             # total tokens N of the timed prompts (BOS + image tokens + text)
    warmup: int                 # untimed calls per mode and N
    repeats: int                # timed calls per mode and N (median reported)
    batch_rows: int             # JSONL rows of the batch-stage measurement
    batch_repeats: int          # timed stage runs per batch size (median reported)
    batch_speedup_target: float
    analysis_samples: int       # distinct attention tensors timed per logic config
    memory_only: bool = False   # measure extra peak memory only (the 7B shape on a CPU)
    parallel_probes: int = 2    # CPU memory probes run side by side (each holds a model copy)
    peak_parts: bool = False    # also locate the plain forward's peak (Qwen3.5: vision blocks, text layer kinds)
    family: str = "llava"       # "llava", or the Qwen model_type built by tests/tiny_qwen.py
    image: tuple = (640, 480)   # (W, H) of the timed image (LLaVA pads it to one square size anyway)


def _text(hidden, layers, heads, inter, vocab):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _vision(hidden, layers, heads, inter, image, patch, projection):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                image_size=image, patch_size=patch, projection_dim=projection)


QWEN25VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN25VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])
# One memory measurement of a Qwen2.5-VL model with a 1,000 × 750 image at N = 1,000.
QWEN_MEMORY_RUN = dict(seq_lens=(1000,), warmup=0, repeats=0, batch_rows=0, batch_repeats=0, batch_speedup_target=0.0,
                       analysis_samples=0, family="qwen2_5_vl", image=(1000, 750))

# Gemma 4 31B (google/gemma-4-31B-it's config.json) with the text widths / 16 and the vision widths / 4.5 (its
# 2-D rope needs a head size divisible by 4: 72 / 4.5 = 16): the real 60 layers (50 sliding, window 1,024;
# 10 global), 32 heads (16 KV heads in sliding layers, 4 in global layers whose keys are also the values),
# image tokens bidirectional in sliding layers, and the real image settings (16 px patches, 3×3 pooling,
# ≤ 280 tokens) — so eager's [L, H, N, N] maps keep their real size while the weights shrink to ~0.3 GB.
# float32: this CPU's bfloat16 matmul is ~25× slower than its float32 one (no native bf16).
GEMMA4_31B_TEXT = dict(hidden_size=336, intermediate_size=1344, num_hidden_layers=60, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=16, global_head_dim=32, num_global_key_value_heads=4,
                       attention_k_eq_v=True, sliding_window=1024, layer_types=None,
                       use_bidirectional_attention="vision", hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                       final_logit_softcapping=30.0, max_position_embeddings=262144)
GEMMA4_31B_VISION = dict(hidden_size=256, intermediate_size=956, num_hidden_layers=27, num_attention_heads=16,
                         num_key_value_heads=16, head_dim=16, patch_size=16, pooling_kernel_size=3,
                         position_embedding_size=10240, standardize=True)
# One memory measurement with a 1,000 × 750 image (→ 912 × 672 px → 14 × 19 = 266 image tokens) at N = 620.
GEMMA4_MEMORY_RUN = QWEN_MEMORY_RUN | dict(family="gemma4", seq_lens=(620,))
# Qwen3.5-9B (Qwen/Qwen3.5-9B's config.json) with every width / 4: head_dim 64 (256), linear-attention
# heads 32 wide (128), vision head 72 as in 9B. Layer types are the config's default, 3 linear then 1 full.
QWEN35_9B_SCALED_TEXT = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=32, num_attention_heads=16,
                             num_key_value_heads=4, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32,
                             linear_num_key_heads=16, linear_num_value_heads=32, linear_conv_kernel_dim=4,
                             max_position_embeddings=262144, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                              "partial_rotary_factor": 0.25, "mrope_section": [3, 3, 2],
                                              "mrope_interleaved": True})
QWEN35_9B_SCALED_VISION = dict(depth=27, hidden_size=288, intermediate_size=1076, num_heads=4, out_hidden_size=1024,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)

PROFILES = {
    # Every width of LLaVA-1.5-7B's text model divided by 8 (vocab too, so the LM head keeps its
    # ~2 % share of the FLOPs); a 4-layer, 256-wide CLIP tower at the real 336 px / patch 14.
    "cpu": Profile("cpu", _text(512, 8, 8, 1376, 4008), _vision(256, 4, 4, 1024, 336, 14, 256), "cpu", "float32",
                   seq_lens=(620, 1240, 2480), warmup=1, repeats=7, batch_rows=16, batch_repeats=3,
                   batch_speedup_target=1.5, analysis_samples=30),
    # LLaVA-1.5-7B: Llama-2-7B text (vocab 32064 as llava-hf), CLIP ViT-L/14-336 tower.
    "llava7b": Profile("llava7b", _text(4096, 32, 32, 11008, 32064), _vision(1024, 24, 16, 4096, 336, 14, 768),
                       "cuda", "float16", seq_lens=(620, 1240, 2480), warmup=3, repeats=10, batch_rows=32,
                       batch_repeats=2, batch_speedup_target=3.0, analysis_samples=30),
    # The 7B shape on a CPU, memory only: bfloat16 (14 GB) fits a 24 GB machine, one probe at a time.
    # No timings: one forward takes about a minute there, and CPU times say nothing about a GPU.
    "llava7b_cpu": Profile("llava7b_cpu", _text(4096, 32, 32, 11008, 32064), _vision(1024, 24, 16, 4096, 336, 14, 768),
                           "cpu", "bfloat16", seq_lens=(620,), warmup=0, repeats=0, batch_rows=0, batch_repeats=0,
                           batch_speedup_target=0.0, analysis_samples=0, memory_only=True, parallel_probes=1),
    # Qwen2.5-VL-7B (Qwen/Qwen2.5-VL-7B-Instruct's config.json), memory only like llava7b_cpu. The
    # vocabulary is the benchmark tokenizer's (~1k words), not 152,064: that saves 2.2 GB of embedding
    # and LM-head weights (14.4 GB instead of 16.6 GB), and no activation depends on it except the one
    # logits row (logits_to_keep=1). N = 1,000: 972 image tokens, the chat template, a padded expression.
    "qwen25vl7b_cpu": Profile("qwen25vl7b_cpu", QWEN25VL_7B_TEXT, QWEN25VL_7B_VISION, "cpu", "bfloat16",
                              memory_only=True, parallel_probes=1, **QWEN_MEMORY_RUN),
    # The same layers, heads, image and N with every width / 4 (text head_dim 32, vision head_dim 80 as
    # in 7B): eager's [L, H, N, N] maps keep their real size, the weights shrink to ~1 GB. For machines
    # without ~18 GB of free memory.
    "qwen25vl_scaled_cpu": Profile(
        "qwen25vl_scaled_cpu",
        QWEN25VL_7B_TEXT | dict(hidden_size=896, intermediate_size=4736, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}),
        QWEN25VL_7B_VISION | dict(hidden_size=320, intermediate_size=855, num_heads=4, out_hidden_size=896),
        "cpu", "bfloat16", memory_only=True, **QWEN_MEMORY_RUN),
    "gemma4_31b_scaled_cpu": Profile("gemma4_31b_scaled_cpu", GEMMA4_31B_TEXT, GEMMA4_31B_VISION, "cpu", "float32",
                                     memory_only=True, parallel_probes=1, **GEMMA4_MEMORY_RUN),
    # Qwen3.5-9B's layers, heads, image and N with every width / 4 (~0.6 GB): eager's maps of the 8
    # full-attention layers keep their real size; the 24 linear-attention layers have none.
    "qwen35_9b": Profile("qwen35_9b", QWEN35_9B_SCALED_TEXT, QWEN35_9B_SCALED_VISION, "cpu", "bfloat16",
                         memory_only=True, peak_parts=True, **(QWEN_MEMORY_RUN | dict(family="qwen3_5"))),
    # Smoke test: 112 px / patch 14 → 8×8 = 64 image tokens.
    "quick": Profile("quick", _text(64, 4, 4, 172, 512), _vision(32, 2, 4, 64, 112, 14, 32), "cpu", "float32",
                     seq_lens=(96, 384), warmup=1, repeats=3, batch_rows=8, batch_repeats=1,
                     batch_speedup_target=1.5, analysis_samples=5),
}


# ---------------------------------------------------------------- checkpoint

def build_processor(profile: Profile):
    """The toy model's kind of processor (pad to square, word-level tokenizer) over the words
    "w0", "w1", ...; "<image>" expands to (image/patch)² tokens."""
    from lab.train_toy import word_level_processor

    words = SPECIALS + [f"w{i}" for i in range(min(1000, profile.text["vocab_size"]) - len(SPECIALS))]
    return word_level_processor(words, profile.vision["image_size"], profile.vision["patch_size"])


# Qwen's own smart_resize range (Qwen2.5-VL's preprocessor_config.json), not the tests' tiny one.
QWEN_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
# Qwen3-VL's and Qwen3.5's (16 px patches).
QWEN3_SIZE = {"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096}


def qwen_size(family: str) -> dict:
    from tests import tiny_qwen

    return QWEN3_SIZE if family in tiny_qwen.QWEN3_TYPES else QWEN_SIZE


def build_checkpoint(profile: Profile, out: Path) -> Path:
    """Random-weight model + processor saved to `out`: LlavaForConditionalGeneration (llava-hf layout),
    or the Qwen family's model with tests/tiny_qwen.py's tokenizer, chat template and processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if profile.family == "gemma4":
        return build_gemma4_checkpoint(profile, out)
    torch.manual_seed(0)
    if profile.family == "llava":
        grid = profile.vision["image_size"] // profile.vision["patch_size"]
        config = LlavaConfig(vision_config=CLIPVisionConfig(**profile.vision), text_config=LlamaConfig(**profile.text),
                             image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             image_seq_length=grid * grid)
        model_class = LlavaForConditionalGeneration
    else:
        from tests import tiny_qwen

        tokenizer = tiny_qwen.tokenizer(tiny_qwen.WORDS + [f"w{i}" for i in range(1000)])
        config = tiny_qwen.config(profile.family, tokenizer, text=profile.text, vision=profile.vision)
        model_class = tiny_qwen.model_class(profile.family)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[profile.dtype]
    init_device = "cuda" if profile.device == "cuda" else "cpu"   # 7B random init is minutes on CPU
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(init_device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="2GB")   # small shards: saving buffers one shard in memory
    del model
    if profile.family == "llava":
        build_processor(profile).save_pretrained(out)
    else:
        tiny_qwen.save_processor(out, profile.family, tokenizer, size=qwen_size(profile.family))
    return out


def build_gemma4_checkpoint(profile: Profile, out: Path) -> Path:
    """tests/tiny_gemma4.py's tokenizer (plus the words "w0", "w1", ...), config and processor at the
    profile's shape, with Gemma 4's real image settings; random weights in the profile's dtype."""
    from transformers import Gemma4ForConditionalGeneration

    from tests import tiny_gemma4

    torch.manual_seed(0)
    tokenizer = tiny_gemma4.tokenizer()
    tokenizer.add_tokens([f"w{i}" for i in range(1000)])
    config = tiny_gemma4.config(tokenizer, text=profile.text | {"vocab_size": len(tokenizer)}, vision=profile.vision)
    previous = torch.get_default_dtype()
    torch.set_default_dtype({"float32": torch.float32, "bfloat16": torch.bfloat16}[profile.dtype])
    try:
        model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="2GB")
    tiny_gemma4.save_processor(out, tokenizer, patch=profile.vision["patch_size"], max_soft_tokens=280)
    return out


def load_adapters(profile: Profile, ckpt: Path, modes=MODES) -> dict:
    """mode → adapter, each loaded by `load_adapter`. "plain" is loaded like "capture" and then
    switched to transformers' stock "sdpa" for the text model (no capture function at all)."""
    from localization_heads.families import load_adapter

    cfg = OmegaConf.create({"name": str(ckpt), "device": profile.device, "dtype": profile.dtype,
                            "conv_mode": "plain" if profile.family == "llava" else "auto", "cache_dir": None})
    adapters = {}
    for mode in modes:
        adapter = load_adapter(cfg, "eager" if mode == "eager" else "sdpa")
        if mode == "plain":
            adapter.model.set_attn_implementation({"text_config": "sdpa"})
            got = adapter.model.config.text_config._attn_implementation
            assert got == "sdpa", f"plain model runs {got!r} attention"
        adapters[mode] = adapter
    return adapters


# ---------------------------------------------------------------- inputs

def make_image(seed: int, size=(640, 480)) -> Image.Image:
    """A deterministic RGB image: smooth noise plus a few bright rectangles."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(img).copy()
    for _ in range(3):
        x, y = rng.integers(0, w - 64), rng.integers(0, h - 64)
        pixels[y:y + 64, x:x + 64] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def one_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer keeps whole, as one token after a space: the benchmark's "w<i>" words,
    or where it drops them, its own vocabulary's. A checkpoint whose config says qwen3_5 loads its
    tokenizer as Qwen3_5Tokenizer whatever class it was saved as: byte-level BPE over the saved word list
    without merges, which keeps only the one-character words ("a", ".")."""
    def kept(word: str) -> bool:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        return len(ids) == 1 and tokenizer.decode(ids).strip() == word

    vocab, special = tokenizer.get_vocab(), set(tokenizer.get_added_vocab())
    words = ([w for w in (f"w{i}" for i in range(900)) if kept(w)]
             or [w for w in sorted(vocab, key=vocab.get) if w not in special and kept(w)])
    if not words:
        raise ValueError(f"{type(tokenizer).__name__} keeps no word whole; cannot pad the prompt to N tokens")
    return words


def query_of_length(adapter, image: Image.Image, n_tokens: int) -> str:
    """A query of one-token words such that the whole prompt is exactly n_tokens long."""
    words = one_token_words(adapter.tokenizer)
    base = adapter.prepare([image], [words[0]]).inputs["input_ids"].shape[1]      # with a one-word query
    n_words = n_tokens - base + 1
    if n_words < 1:
        raise ValueError(f"N={n_tokens} is shorter than the image prompt ({base} tokens)")
    return " ".join(words[(7 * i) % len(words)] for i in range(n_words))


def prepare_n(adapter, n_tokens: int, image_size=(640, 480)):
    """Prepared batch of one sample with N = n_tokens: inputs [1, N] and the image's pixel_values."""
    image = make_image(0, image_size)
    prepared = adapter.prepare([image], [query_of_length(adapter, image, n_tokens)])
    got = prepared.inputs["input_ids"].shape[1]
    assert got == n_tokens, f"prompt has {got} tokens, wanted {n_tokens}"
    return prepared


# ---------------------------------------------------------------- the three calls

@torch.inference_mode()
def plain_forward(adapter, prepared) -> torch.Tensor:
    """The stock SDPA forward the capture must not slow down, doing the collector's work minus the
    capture (logits of the last position only, as collector.capture_rows asks): [B, 1, vocab]."""
    return adapter.model(**adapter.call_inputs(prepared), use_cache=False, logits_to_keep=1).logits


def mode_call(mode: str, adapter, prepared) -> Callable[[], torch.Tensor]:
    from localization_heads.collector import capture_rows

    if mode == "plain":
        return lambda: plain_forward(adapter, prepared)
    return lambda: capture_rows(adapter, prepared, attn_capture="sdpa" if mode == "capture" else "eager")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_modes(calls: dict, device: str, warmup: int, repeats: int) -> dict:
    """mode → median seconds. Repeat r runs the modes rotated by r, so drift is spread evenly."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    samples = {mode: [] for mode in calls}
    order = list(calls)
    for r in range(repeats):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            calls[mode]()
            synchronize(device)
            samples[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(s) for mode, s in samples.items()}


# ---------------------------------------------------------------- memory

def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def cpu_peak_growth_mb(call: Callable) -> float:
    """Peak RSS growth of one call: reset the high-water mark to the current RSS (clear_refs 5),
    run, read VmHWM again. Falls back to VmHWM before/after where clear_refs is not writable."""
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmHWM")
    call()
    # The kernel's RSS counters are kept per thread and synced lazily, so a call that allocates
    # nothing can read a few KB below zero; clamp that rounding.
    return max(0.0, (_status_kb("VmHWM") - before) / 1024)


def probe_memory(spec: dict) -> dict:
    """Subprocess body: load one mode's adapter, prepare N, one warm-up call (one-time library
    state such as oneDNN caches stays resident), then measure one call. The parent starts this
    process with MALLOC_MMAP_THRESHOLD_ set, so every freed tensor goes back to the OS and the
    warm-up leaves no cached pages for the measured call to hide its peak in. With spec["parts"]
    (mode plain) it measures where that call's peak lies instead (plain_peak_parts)."""
    profile = PROFILES[spec["profile"]]
    adapter = load_adapters(profile, Path(spec["ckpt"]), modes=(spec["mode"],))[spec["mode"]]
    prepared = prepare_n(adapter, spec["n"], profile.image)
    call = mode_call(spec["mode"], adapter, prepared)
    call()
    if spec.get("parts"):
        return plain_peak_parts(adapter, prepared)
    return {"peak_mb": cpu_peak_growth_mb(call)}


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def plain_peak_parts(adapter, prepared) -> dict:
    """Where the plain forward's extra peak lies, for a Qwen3.5 model (MB):
    - "vision_alone": extra peak of the vision encoder alone (get_image_features), a call of its own;
    - "vision_block", "full_attention", "linear_attention": the highest peak RSS reached inside one
      vision block / one text layer of that kind during one plain forward, above the RSS at the
      forward's start (the high-water mark is reset as each block starts, so each block's own peak
      is read; the whole call's peak is then the largest of them, up to what runs between blocks)."""
    model = adapter.model
    text = model.model.language_model
    parts = {"vision_block": list(model.model.visual.blocks)}
    for kind, layer in zip(text.config.layer_types, text.layers):
        parts.setdefault(kind, []).append(layer)
    start, peaks, handles = [0.0], {name: 0.0 for name in parts}, []

    def enter(module, args):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def leave(name):
        def hook(module, args, output):
            peaks[name] = max(peaks[name], _status_kb("VmHWM") / 1024 - start[0])
        return hook

    for name, modules in parts.items():
        for module in modules:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave(name))]
    try:
        gc.collect()
        start[0] = _rss_mb()
        plain_forward(adapter, prepared)
    finally:
        for handle in handles:
            handle.remove()
    inputs = adapter.call_inputs(prepared)
    vision = torch.inference_mode()(lambda: model.model.get_image_features(inputs["pixel_values"],
                                                                           inputs["image_grid_thw"]))
    vision()
    return peaks | {"vision_alone": cpu_peak_growth_mb(vision)}


PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_memory(profile: Profile, ckpt: Path, mode: str, n_tokens: int) -> float | dict:
    """Extra peak RSS (MB) of one call, measured in a fresh subprocess for this mode and N; for the
    mode "parts", plain_peak_parts's dict."""
    parts = mode == "parts"
    spec = json.dumps({"profile": profile.name, "ckpt": str(ckpt), "mode": "plain" if parts else mode, "n": n_tokens,
                       "parts": parts})
    command = [sys.executable, __file__, "--probe-memory", spec, "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env=os.environ | PROBE_ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {mode} N={n_tokens} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if parts:
        log(f"plain N={n_tokens}: peak parts {result}")
        return result
    log(f"{mode} N={n_tokens}: extra peak {result['peak_mb']:.0f} MB")   # each as it comes: a slow run's partial results
    return result["peak_mb"]


def cpu_memory_all(profile: Profile, ckpt: Path) -> dict:
    """N → mode → extra peak MB (and "parts" → plain_peak_parts's dict where the profile asks);
    profile.parallel_probes at a time (each is its own process, so running them side by side changes
    their timing, not their memory)."""
    from concurrent.futures import ThreadPoolExecutor

    modes = MODES + ("parts",) if profile.peak_parts else MODES
    jobs = [(n, mode) for n in profile.seq_lens for mode in modes]
    with ThreadPoolExecutor(max_workers=profile.parallel_probes) as pool:
        peaks = list(pool.map(lambda job: cpu_memory(profile, ckpt, job[1], job[0]), jobs))
    result = {n: {} for n in profile.seq_lens}
    for (n, mode), peak in zip(jobs, peaks):
        result[n][mode] = peak
    return result


def gpu_memory(call: Callable) -> float:
    """Peak CUDA allocation of one call above what was allocated before it, MB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------- FLOPs (GPU)

def forward_flops(model, n_tokens: int) -> float:
    """≈ FLOPs of one batch-1 forward: 2·params·tokens for every matmul weight (text decoder +
    LM head over N tokens, vision tower over V+1, projector over V) + attention 4·L·T²·D per tower
    (QKᵀ and PV over the full T×T square)."""
    llava = model.model
    tc, vc = model.config.text_config, model.config.vision_config
    v = (vc.image_size // vc.patch_size) ** 2
    text = sum(p.numel() for n, p in llava.language_model.named_parameters() if "embed_tokens" not in n)
    text += model.lm_head.weight.numel()
    vision = sum(p.numel() for p in llava.vision_tower.parameters())
    projector = sum(p.numel() for p in llava.multi_modal_projector.parameters())
    return (2 * text * n_tokens + 2 * vision * (v + 1) + 2 * projector * v
            + 4 * tc.num_hidden_layers * n_tokens**2 * tc.hidden_size
            + 4 * vc.num_hidden_layers * (v + 1)**2 * vc.hidden_size)


def matmul_rate(size: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s of the GPU."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


# ---------------------------------------------------------------- batch stage

def write_batch_data(folder: Path, rows: int) -> tuple[Path, list[int]]:
    """rows JPEGs of varied size and a JSONL (id, prompt, image_path) with 3–12-word prompts;
    returns the JSONL and the prompt word counts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    lines, n_words = [], []
    for i in range(rows):
        size = (int(rng.integers(320, 800)), int(rng.integers(240, 640)))
        make_image(100 + i, size).save(folder / f"img{i}.jpg", quality=90)
        n_words.append(int(rng.integers(3, 13)))
        prompt = " ".join(f"w{int(w)}" for w in rng.integers(0, 900, n_words[-1]))
        lines.append(json.dumps({"id": f"s{i}", "prompt": prompt, "image_path": f"img{i}.jpg"}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, n_words


def batch_config(profile: Profile, ckpt: Path, data_file: Path, out_dir: Path, batch_size: int):
    """The pipeline's own Hydra config, composed with overrides for stage=batch. logic=paper: with
    random weights the rows are near uniform, so selection_v1's mass entropy (ReLU(A − 2·mean))
    finds no foreground in any head and every row would fail; the cost per row is the same."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "localization_heads" / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            "stage=batch", "model=toy", "logic=paper", f"model.name={ckpt}", f"model.device={profile.device}",
            f"model.dtype={profile.dtype}", "model.conv_mode=plain", "model.attn_capture=sdpa",
            f"data.data_file={data_file}", "data.process_all=true", f"data.output_dir={out_dir}",
            "data.resume=false", "data.visualize_batch=false", f"data.batch_size={batch_size}"])


def batch_throughput(profile: Profile, ckpt: Path, adapter, work: Path) -> dict:
    """batch size → samples/s of pipeline.run(cfg) (stage=batch). The adapter is handed in, so
    loading the model is outside the timed region; everything else is the real stage."""
    from localization_heads import cli as pipeline
    from localization_heads import settings

    data_file, n_words = write_batch_data(work / "batch_data", profile.batch_rows)
    base = 1 + (profile.vision["image_size"] // profile.vision["patch_size"])**2     # BOS + image tokens
    sizes = (1, 8)
    cfgs = {bs: batch_config(profile, ckpt, data_file, work / f"batch_out_bs{bs}", bs) for bs in sizes}
    original = settings.load_adapter_from
    settings.load_adapter_from = lambda cfg: adapter
    try:
        for bs in sizes:                                   # warm-up: one full run per size
            check_batch_result(pipeline.run(cfgs[bs]), profile.batch_rows)
        samples = {bs: [] for bs in sizes}
        for r in range(profile.batch_repeats):
            for bs in (sizes if r % 2 == 0 else sizes[::-1]):
                synchronize(profile.device)
                t0 = time.perf_counter()
                check_batch_result(pipeline.run(cfgs[bs]), profile.batch_rows)
                synchronize(profile.device)
                samples[bs].append(profile.batch_rows / (time.perf_counter() - t0))
    finally:
        settings.load_adapter_from = original
    return {bs: statistics.median(s) for bs, s in samples.items()} | {
        "num_workers": int(cfgs[1].data.num_workers), "n_range": f"{base + min(n_words)}–{base + max(n_words)}"}


def check_batch_result(result: dict, rows: int) -> None:
    if result["written"] != rows or result["failed"]:
        raise RuntimeError(f"batch stage wrote {result['written']} of {rows} rows, {result['failed']} failed")


# ---------------------------------------------------------------- analysis

def synthetic_attention(rng: np.random.Generator, layers=32, heads=32, grid=(24, 24)) -> torch.Tensor:
    """[L, H, 1, V] rows shaped like real ones: per head a softmax over the grid of a Gaussian blob
    (random place, width, strength) plus noise, scaled by a random image share in [0.05, 0.9]."""
    rows, cols = grid
    yy, xx = np.mgrid[0:rows, 0:cols]
    n = layers * heads
    cy, cx = rng.uniform(0, rows, n), rng.uniform(0, cols, n)
    width = rng.uniform(1.0, 6.0, n)
    strength = rng.uniform(0.0, 6.0, n)
    logits = (strength[:, None, None] * np.exp(-((yy - cy[:, None, None])**2 + (xx - cx[:, None, None])**2)
                                                / (2 * width[:, None, None]**2))
              + rng.normal(0, 1.0, (n, rows, cols)))
    flat = logits.reshape(n, -1)
    probs = np.exp(flat - flat.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    probs *= rng.uniform(0.05, 0.9, (n, 1))
    return torch.from_numpy(probs.reshape(layers, heads, 1, rows * cols).astype(np.float32))


def analysis_ms(samples: int) -> dict:
    """logic name → median ms per `analyze.analyze` call on distinct [32, 32, 1, 576] tensors."""
    from localization_heads import analyze

    rng = np.random.default_rng(2)
    tensors = [synthetic_attention(rng) for _ in range(samples)]
    result = {}
    for name in ("selection_v1", "paper"):
        logic = LogicSettings.from_config(OmegaConf.load(REPO / "localization_heads" / "conf" / "logic" / f"{name}.yaml"))
        for attn in tensors[:2]:
            analyze.analyze(attn, (24, 24), logic)
        times = []
        for attn in tensors:
            t0 = time.perf_counter()
            analyze.analyze(attn, (24, 24), logic)
            times.append(time.perf_counter() - t0)
        result[name] = 1000 * statistics.median(times)
    return result


# ---------------------------------------------------------------- report

def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    return info


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**MISSED**")


def build_table(profile: Profile, m: dict) -> tuple[list[list[str]], list[str]]:
    """Rows [measurement, N, value, target, verdict] and one line per missed target."""
    rows, missed = [], []
    tol = 1e-4 if profile.dtype == "float32" else 1e-2
    n0 = profile.seq_lens[0]

    def add(name, n, value, target="", ok=None):
        rows.append([name, str(n), value, target, verdict(ok)])
        if ok is False:
            missed.append(f"{name}{f' (N={n})' if n != '—' else ''}: {value}, target {target}")

    for n in m["time"]:
        t = m["time"][n]
        add("max abs diff capture vs eager row", n, f"{m['diff'][n]:.2e}", f"≤ {tol:g}", m["diff"][n] <= tol)
        add("time plain / capture / eager (ms)", n,
            " / ".join(f"{1000 * t[k]:.1f}" for k in MODES))
        add("capture / plain SDPA time", n, f"{t['capture'] / t['plain']:.3f}", "≤ 1.10",
            t["capture"] / t["plain"] <= 1.10)
        add("capture / eager time", n, f"{t['capture'] / t['eager']:.3f}")
    for n in m["memory"]:
        mem = m["memory"][n]
        add("extra peak memory plain / capture / eager (MB)", n, " / ".join(f"{mem[k]:.0f}" for k in MODES))
        ratio = mem["capture"] / mem["eager"]
        add("capture / eager extra peak memory", n, f"{ratio:.3f}",
            "≤ 0.10" if n == n0 else "", (ratio <= 0.10) if n == n0 else None)
        # The same, counting only what each adds on top of the plain forward's own activations.
        add("(capture − plain) / (eager − plain) peak memory", n,
            f"{(mem['capture'] - mem['plain']) / (mem['eager'] - mem['plain']):.3f}")
        if "parts" in mem:   # where the plain forward's own peak (which every mode shares) lies
            parts = mem["parts"]
            add("plain forward's peak inside one vision block / full-attention layer / Gated-DeltaNet layer "
                "(MB above the forward's start, max over blocks)", n,
                " / ".join(f"{parts[k]:.0f}" for k in ("vision_block", "full_attention", "linear_attention")))
            add("vision encoder alone (get_image_features), extra peak memory (MB)", n, f"{parts['vision_alone']:.0f}")
    b = m.get("batch")
    if b is None:   # a memory-only profile
        return rows, missed
    add(f"batch stage samples/s, bs 1 / bs 8 ({profile.batch_rows} rows)", b["n_range"],
        f"{b[1]:.2f} / {b[8]:.2f}")
    add("batch stage speed-up bs 8 / bs 1", b["n_range"], f"{b[8] / b[1]:.2f}×",
        f"≥ {profile.batch_speedup_target:g}×", b[8] / b[1] >= profile.batch_speedup_target)
    for name, ms in m["analysis"].items():
        add(f"analysis ms/sample, 32×32 heads, 24×24 grid ({name})", "—", f"{ms:.1f}", "≤ 20", ms <= 20)
    if "flops" in m:
        add("bf16 matmul rate (TFLOP/s, 8192³)", "—", f"{m['flops']['peak'] / 1e12:.0f}")
        for n in profile.seq_lens:
            achieved = m["flops"][n] / m["time"][n]["capture"]
            add("collect forward TFLOP/s (fraction of matmul rate)", n,
                f"{achieved / 1e12:.0f} ({achieved / m['flops']['peak']:.0%})")
    return rows, missed


def markdown_table(rows: list[list[str]]) -> str:
    head = ["measurement", "N", "value", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def describe_shape(profile: Profile) -> str:
    t, v = profile.text, profile.vision
    if profile.family == "gemma4":
        return describe_gemma4(profile)
    if profile.family == "llava":
        return (f"text {t['hidden_size']} wide, {t['num_hidden_layers']} layers × {t['num_attention_heads']} heads, "
                f"MLP {t['intermediate_size']}, vocab {t['vocab_size']}; vision {v['hidden_size']} wide, "
                f"{v['num_hidden_layers']} layers × {v['num_attention_heads']} heads, {v['image_size']} px / patch "
                f"{v['patch_size']} → {(v['image_size'] // v['patch_size'])**2} image tokens; {profile.dtype} on "
                f"{profile.device}")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    width, height = profile.image
    factor = v["patch_size"] * v["spatial_merge_size"]
    size = qwen_size(profile.family)
    resized_h, resized_w = smart_resize(height, width, factor, size["shortest_edge"], size["longest_edge"])
    return (f"{profile.family} text {t['hidden_size']} wide, {t['num_hidden_layers']} layers × "
            f"{t['num_attention_heads']} heads ({t['num_key_value_heads']} KV), MLP {t['intermediate_size']}, vocab "
            f"{t.get('vocab_size', 'of the benchmark tokenizer (~1k)')}; vision {v['hidden_size']} wide, {v['depth']} blocks × {v['num_heads']} heads; a "
            f"{width} × {height} image → {resized_w} × {resized_h} px → {resized_h // factor} × {resized_w // factor} = "
            f"{(resized_h // factor) * (resized_w // factor)} image tokens; {profile.dtype} on {profile.device}")


def describe_gemma4(profile: Profile) -> str:
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    t, v = profile.text, profile.vision
    width, height = profile.image
    cell = v["patch_size"] * v["pooling_kernel_size"]
    resized_h, resized_w = get_aspect_ratio_preserving_size(height, width, v["patch_size"],
                                                            280 * v["pooling_kernel_size"]**2, v["pooling_kernel_size"])
    return (f"gemma4 text {t['hidden_size']} wide, {t['num_hidden_layers']} layers × {t['num_attention_heads']} heads "
            f"(sliding: {t['num_key_value_heads']} KV × {t['head_dim']}, window {t['sliding_window']}; global: "
            f"{t['num_global_key_value_heads']} KV × {t['global_head_dim']}, keys = values), MLP {t['intermediate_size']}, "
            f"vocab of the benchmark tokenizer (~1k); vision {v['hidden_size']} wide, {v['num_hidden_layers']} layers × "
            f"{v['num_attention_heads']} heads; a {width} × {height} image → {resized_w} × {resized_h} px → "
            f"{resized_h // cell} × {resized_w // cell} = {(resized_h // cell) * (resized_w // cell)} image tokens; "
            f"{profile.dtype} on {profile.device}")


def results_section(profile: Profile, info: dict, m: dict, table: str, missed: list[str], seconds: float) -> str:
    gpu_note = (f"GPU: {info['gpu']}." if info["gpu"] != "none" else
                "GPU: none in this session (the llava7b profile is for machines with a CUDA GPU).")
    memory = ("torch.cuda.max_memory_allocated − baseline, one call" if profile.device == "cuda" else
              "growth of peak RSS (VmHWM reset via /proc/self/clear_refs) over one call after a warm-up call, "
              "in a fresh subprocess per mode and N with MALLOC_MMAP_THRESHOLD_=65536")
    shape = describe_shape(profile)
    timing = ("Memory only (no timings, no batch stage). " if profile.memory_only else
              f"Timings: median of {profile.repeats} after {profile.warmup} warm-up, modes in rotating order; batch "
              f"stage: median of {profile.batch_repeats} runs over {profile.batch_rows} rows after a warm-up run "
              f"(data.num_workers={m['batch']['num_workers']}, logic=paper). ")
    lines = [f"## {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — profile `{profile.name}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores (torch threads: {info['torch_threads']}); "
             f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}. {gpu_note}", "",
             f"Model (random weights): {shape}. {timing}Extra peak memory: {memory}. Whole benchmark: "
             f"{seconds / 60:.1f} min; 1-min load average "
             f"{m['load_before']:.1f} at the start, {m['load_after']:.1f} at the end.", "",
             table, ""]
    lines += ["Missed targets:", ""] + [f"- {x}" for x in missed] if missed else ["All targets met."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def run_benchmark(profile: Profile) -> tuple[dict, float]:
    start = time.perf_counter()
    m = {"time": {}, "diff": {}, "memory": {}, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_collect_") as tmp:
        work = Path(tmp)
        log(f"building random {profile.name} checkpoint")
        if profile.memory_only:
            # Built in a child process: a 7B model freed here could leave its pages in this
            # process's heap while the probes load their own copy.
            ckpt = work / "ckpt"
            subprocess.run([sys.executable, __file__, "--build-checkpoint", json.dumps([profile.name, str(ckpt)])],
                           check=True)
            m["memory"] = cpu_memory_all(profile, ckpt)
            log(f"extra peak MB {m['memory']}")
            m["load_after"] = os.getloadavg()[0]
            return m, time.perf_counter() - start
        ckpt = build_checkpoint(profile, work / "ckpt")
        adapters = load_adapters(profile, ckpt)
        if profile.device == "cuda":
            m["flops"] = {"peak": matmul_rate()}
        for n in profile.seq_lens:
            prepared = prepare_n(adapters["capture"], n, profile.image)
            calls = {mode: mode_call(mode, adapters[mode], prepared) for mode in MODES}
            m["diff"][n] = (calls["capture"]() - calls["eager"]()).abs().max().item()
            m["time"][n] = time_modes(calls, profile.device, profile.warmup, profile.repeats)
            if profile.device == "cuda":
                m["memory"][n] = {mode: gpu_memory(calls[mode]) for mode in MODES}
                m["flops"][n] = forward_flops(adapters["capture"].model, n)
            log(f"N={n}: time {m['time'][n]}, diff {m['diff'][n]:.2e}")
        del calls, prepared
        if profile.device == "cpu":
            adapters = {"capture": adapters["capture"]}   # free the others before the probes
            gc.collect()
            m["memory"] = cpu_memory_all(profile, ckpt)
            log(f"extra peak MB {m['memory']}")
        m["batch"] = batch_throughput(profile, ckpt, adapters["capture"], work)
        log(f"batch samples/s {m['batch']}")
    m["analysis"] = analysis_ms(profile.analysis_samples)
    log(f"analysis ms {m['analysis']}")
    m["load_after"] = os.getloadavg()[0]
    return m, time.perf_counter() - start


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(set(PROFILES) - {"quick"}), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke test; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--build-checkpoint", help=argparse.SUPPRESS)   # internal: [profile, folder]
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)   # internal: one CPU memory measurement
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build_checkpoint:
        name, out = json.loads(args.build_checkpoint)
        build_checkpoint(PROFILES[name], Path(out))
        return
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return
    profile = PROFILES["quick" if args.quick else args.profile]
    if profile.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"profile {profile.name} needs a CUDA GPU; use --profile cpu here")
    measured, seconds = run_benchmark(profile)
    rows, missed = build_table(profile, measured)
    table = markdown_table(rows)
    print(table)
    if not (args.quick or args.no_write):
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + results_section(profile, machine(), measured, table, missed, seconds))
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
