"""The capturing attention function returns exactly eager attention's last row, cheaply."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from localization_heads.collector import capture_rows, collect
from localization_heads.families import load_adapter
from localization_heads.layout import Layout


def model_cfg(path, **overrides):
    return OmegaConf.create({"name": str(path), "device": "cpu", "dtype": "float32", "conv_mode": "plain", **overrides})


@pytest.fixture(scope="module", params=["hf", "original"])
def adapters(request, hf_checkpoint, original_checkpoint):
    """(capturing adapter, eager adapter) for each checkpoint format."""
    path = hf_checkpoint if request.param == "hf" else original_checkpoint
    return load_adapter(model_cfg(path), "sdpa"), load_adapter(model_cfg(path), "eager")


def load_all(images):
    return [Image.open(images[k]).convert("RGB") for k in ("wide", "tall")]


def test_capture_equals_eager_single_sample(adapters, images):
    """Every layer and head of the captured row equals eager output_attentions to 1e-5 (float32)."""
    fast, eager = adapters
    prepared = fast.prepare(load_all(images)[:1], ["the red circle ."])
    rows = capture_rows(fast, prepared, attn_capture="sdpa")                 # [L, B, H, N]
    reference = capture_rows(eager, prepared, attn_capture="eager")
    assert rows.shape == reference.shape == (fast.num_layers, 1, fast.num_heads, prepared.inputs["attention_mask"].shape[1])
    torch.testing.assert_close(rows, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-5, rtol=0)


def test_capture_equals_eager_on_left_padded_batch(adapters, images):
    """A batch of two with different prompt lengths (left padding) matches eager row by row,
    and each row equals the same sample run alone (batch size 1)."""
    fast, eager = adapters
    queries = ["the red circle on the left .", "a cat"]
    prepared = fast.prepare(load_all(images), queries)
    assert (prepared.inputs["attention_mask"][1] == 0).any(), "the shorter prompt must be padded"
    torch.testing.assert_close(capture_rows(fast, prepared), capture_rows(eager, prepared, attn_capture="eager"),
                               atol=1e-5, rtol=0)
    batched = collect(fast, load_all(images), queries)
    for i, query in enumerate(queries):
        alone = collect(fast, load_all(images)[i:i + 1], [query])[0]
        torch.testing.assert_close(batched[i]["attn"], alone["attn"], atol=1e-5, rtol=0)


def test_record_shape_and_meta(adapters, images):
    """collect() gives attn [L, H, 1, V] over exactly the image tokens, with their layout."""
    fast, _ = adapters
    record = collect(fast, load_all(images)[:1], ["the red circle ."])[0]
    rows, cols = fast.grid
    assert record["attn"].shape == (fast.num_layers, fast.num_heads, 1, rows * cols)
    meta = record["meta"]
    layout = Layout.from_meta(meta)
    assert layout.one_map.grid == (rows, cols) and meta["vis_len"] == rows * cols
    assert meta["image_size"] == [96, 64]
    assert layout.method == "pad"
    # The image tokens hold a share of the softmax over all keys; never renormalised to 1.
    assert 0 < float(record["attn"].sum(-1).max()) <= 1 + 1e-5


def test_generate_mode_reads_first_generated_token(adapters, images):
    """Generate mode records the text and the row of the first generated token, which is not
    the prompt's last row (the reference code read the prefill instead)."""
    fast, eager = adapters
    imgs = load_all(images)[:1]
    gen = {"max_new_tokens": 3, "do_sample": False, "num_beams": 1}
    generated = collect(fast, imgs, ["the red circle ."], use_generate=True, gen_kwargs=gen)[0]
    forward = collect(fast, imgs, ["the red circle ."])[0]
    assert isinstance(generated["meta"]["generated_text"], str)
    assert generated["meta"]["mode"] == "generate"
    assert not torch.allclose(generated["attn"], forward["attn"])
    reference = collect(eager, imgs, ["the red circle ."], attn_capture="eager", use_generate=True, gen_kwargs=gen)[0]
    torch.testing.assert_close(generated["attn"], reference["attn"], atol=1e-5, rtol=0)


def test_missing_capture_is_an_error(adapters, images):
    """A model whose attention never reaches the capture fails loudly, never returns empty rows."""
    fast, _ = adapters
    prepared = fast.prepare(load_all(images)[:1], ["the red circle ."])
    fast.model.set_attn_implementation("sdpa")   # bypasses the capturing function
    try:
        with pytest.raises(RuntimeError, match="AttentionInterface"):
            capture_rows(fast, prepared)
    finally:
        fast.model.set_attn_implementation({"text_config": "lh_capture"} if hasattr(fast.model.config, "text_config") else "lh_capture")
