"""Checks every model family must pass, given a tiny checkpoint folder built by its test.

A family test builds a tiny random checkpoint (its config, an offline-built tokenizer, the family's
real processor class), saves it, and calls these with the folder. What stays family-specific — the
builder and the geometry proof (decoding the processor's pixel_values) — lives in its own test file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from localization_heads.families import load_adapter
from localization_heads.collector import capture_rows, collect, load_attention
from localization_heads.layout import Layout

TOL = 1e-5


def coord_image(width: int, height: int) -> Image.Image:
    """R encodes x and G encodes y of each pixel centre ((i + 0.5) / size · 255), B = 128: decoding
    a patch of pixel_values says which part of the original image it came from."""
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    rgb = np.stack([np.broadcast_to(xs[None, :], (height, width)), np.broadcast_to(ys[:, None], (height, width)),
                    np.full((height, width), 0.5)], axis=-1)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")


def coord_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """{name: folder/<name>.png}: a coordinate image of each (width, height)."""
    paths = {}
    for name, size in sizes.items():
        paths[name] = folder / f"{name}.png"
        coord_image(*size).save(paths[name])
    return paths


def model_cfg(path: Path, **overrides):
    return OmegaConf.create({"name": str(path), "device": "cpu", "dtype": "float32", "conv_mode": "auto",
                             "family": "auto", **overrides})


def load_pair(path: Path, **overrides):
    """(capturing adapter, eager adapter) of one checkpoint."""
    return load_adapter(model_cfg(path, **overrides), "sdpa"), load_adapter(model_cfg(path, **overrides), "eager")


def assert_capture_equals_eager(fast, eager, images: list[Image.Image], queries: list[str]) -> None:
    """The captured last row equals eager's for every layer, head and key (≤ 1e-5), on one image and
    on a left-padded batch of images of different sizes; each batched record equals the same sample
    run alone, and every row's image tokens match its layout."""
    single = fast.prepare(images[:1], queries[:1])
    torch.testing.assert_close(capture_rows(fast, single), capture_rows(eager, single, attn_capture="eager"),
                               atol=TOL, rtol=0)
    batch = fast.prepare(images, queries)
    assert (batch.inputs["attention_mask"] == 0).any(), "the batch must be left-padded to test padding"
    torch.testing.assert_close(capture_rows(fast, batch), capture_rows(eager, batch, attn_capture="eager"),
                               atol=TOL, rtol=0)
    batched = collect(fast, images, queries)
    for i, (image, query) in enumerate(zip(images, queries)):
        alone = collect(fast, [image], [query])[0]
        layout = Layout.from_meta(batched[i]["meta"])
        assert batched[i]["attn"].shape[-1] == layout.num_tokens == alone["attn"].shape[-1]
        assert layout.image_size == image.size
        torch.testing.assert_close(batched[i]["attn"], alone["attn"], atol=TOL, rtol=0)


def assert_generate_equals_eager_step(fast, eager, image: Image.Image, query: str) -> dict:
    """With use_generate, the record is the attention of the model's first GENERATED token: equal
    (≤ 1e-5) to eager attention of the model's own first decoding step in `generate` (its KV cache
    and positions). Returns the record."""
    (record,) = collect(fast, [image], [query], use_generate=True, gen_kwargs={"max_new_tokens": 2})
    prepared = eager.prepare([image], [query])
    with torch.inference_mode():
        out = eager.model.generate(**prepared.inputs, max_new_tokens=2, do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True, **eager.generate_kwargs)
    step = torch.stack([a[0, :, -1].float() for a in out.attentions[1]])     # [L, H, N + 1], query = token 1
    torch.testing.assert_close(record["attn"], step[:, :, prepared.image_positions[0]].unsqueeze(2), atol=TOL, rtol=0)
    return record


def assert_generate_batch_equals_eager(fast, eager, images: list[Image.Image], queries: list[str]) -> None:
    """With use_generate on a left-padded batch, each row's first generated token and its attention
    are the same under the capture and eager (≤ 1e-5)."""
    gen = {"max_new_tokens": 2, "do_sample": False}
    ours = collect(fast, images, queries, use_generate=True, gen_kwargs=gen)
    theirs = collect(eager, images, queries, attn_capture="eager", use_generate=True, gen_kwargs=gen)
    for a, b in zip(ours, theirs):
        assert a["meta"]["mode"] == "generate" and a["meta"]["generated_text"] == b["meta"]["generated_text"]
        torch.testing.assert_close(a["attn"], b["attn"], atol=TOL, rtol=0)


def assert_token_k_is_made_of_the_kth_patch_group(model, prepared, group: int, every: int,
                                                  token_of: torch.Tensor | None = None) -> None:
    """Qwen-style towers (pixel_values [V·group, D], merged `group` patches a token): with the tower's
    attention outputs zeroed (the caller does it) every feature is local, so perturbing the k-th group
    of patch rows changes image token token_of[k] (default: k) and no other — for every `every`-th
    group and the last, in one batch."""
    pixels, grid_thw = prepared.inputs["pixel_values"], prepared.inputs["image_grid_thw"]   # [V·group, D], [1, 3]
    num_tokens = prepared.layouts[0].num_tokens
    tokens = list(range(0, num_tokens, every)) + [num_tokens - 1]
    copies = [pixels]                        # the image, then one copy per perturbed token
    for k in tokens:
        copy = pixels.clone()
        copy[k * group:(k + 1) * group] += 1.0
        copies.append(copy)
    with torch.inference_mode():
        features = model.model.get_image_features(torch.cat(copies), grid_thw.repeat(len(copies), 1)).pooler_output
    for k, perturbed in zip(tokens, features[1:]):                              # each [V, D]
        changed = (perturbed - features[0]).abs().amax(-1) > 1e-6
        assert changed.nonzero()[:, 0].tolist() == [k if token_of is None else int(token_of[k])]


def assert_cli_runs(checkpoint: Path, tmp_path: Path, images: dict[str, Path], overrides: tuple[str, ...] = (),
                    fixed_token_count: bool = False) -> None:
    """stage=pipeline writes the attention file with its layout, an analysis, a figure, a mask and a
    box inside the image; stage=batch runs images of different sizes in one batch. `overrides`: extra
    command-line overrides (e.g. a family's image settings); `fixed_token_count`: the family gives every
    image the same number of tokens (PaliGemma), so the batch cannot mix counts."""
    from localization_heads import cli as pipeline

    common = ["model=toy", f"model.name={checkpoint}", "model.conv_mode=auto", f"data.output_dir={tmp_path}",
              "data.num_workers=0", "logic=paper", *overrides]
    first = next(iter(images.values()))
    pipeline.run(pipeline.compose("stage=pipeline", *common, f"data.image_file={first}", "data.query=the red circle ."))
    folder = tmp_path / checkpoint.name
    record = load_attention(folder / "sample.pkl")
    layout = Layout.from_meta(record["meta"])
    assert record["attn"].shape[-1] == layout.num_tokens
    width, height = Image.open(first).size
    assert layout.image_size == (width, height)
    assert Image.open(folder / "sample_mask.png").size == (width, height)
    assert (folder / "sample_analysis.pkl").is_file() and list(folder.glob("sample_top*.png"))
    summary = json.loads((folder / "sample_bbox.json").read_text())
    if summary["bbox_xyxy"] is not None:
        x0, y0, x1, y1 = summary["bbox_xyxy"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": name, "prompt": "the red circle .", "image_path": str(path)}) + "\n"
                            for name, path in images.items()))
    result = pipeline.run(pipeline.compose("stage=batch", *common, f"data.data_file={data}", "data.process_all=true",
                                           f"data.batch_size={len(images)}"))
    assert result["written"] == len(images) and result["failed"] == 0, result
    sizes = {load_attention(folder / f"{name}.pkl")["attn"].shape[-1] for name in images}
    assert len(sizes) == 1 if fixed_token_count else len(sizes) > 1, f"token counts {sizes} of images of different sizes"
