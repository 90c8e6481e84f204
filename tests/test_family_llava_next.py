"""LLaVA-NeXT and LLaVA-OneVision (adapters/llava_next.py) on tiny random checkpoints built here with
the families' real processor classes, saved and loaded back through adapters.load_adapter.

NeXT: CLIP tile 56 px, patch 8 (7×7 tokens per tile; the patch divides the tile, like 336 / 14).
OneVision: SigLIP tile 60 px, patch 8 (7×7 tokens over 56 px: like the real 384 / 14 = 27 tokens over
378 px, the tower skips every tile's last pixels) and anyres_max_4, so larger images are shrunk.
The geometry is also checked at the real checkpoints' tile, patch and pinpoints (no weights needed).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from localization_heads.families import load_adapter
from localization_heads.families.llava_next import LlavaOnevisionImageOnlyProcessor, anyres_tokens
from localization_heads.dataio import InputError
from localization_heads.layout import cell_boxes
from tests.family_checks import assert_capture_equals_eager, assert_cli_runs, coord_image, load_pair, model_cfg

WORDS = ["the", "a", "red", "blue", "circle", "square", "cat", "on", "left", ".", "bird", "small", "dog", "user",
         "assistant", "where", "is", "?"]
NEXT_TILE, NEXT_PATCH = 56, 8
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]       # the real ones / 6
OV_TILE, OV_PATCH, OV_MAX = 60, 8, 4
OV_PINPOINTS = [[60 * i, 60 * j] for i in range(1, 4) for j in range(1, 4)]     # real: 384·i × 384·j, i, j ≤ 6
# Shaped like the hub checkpoints' chat templates (Mistral's [INST] for NeXT, Qwen2's for OneVision).
NEXT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
                 "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
                 "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
                 "{{ ' [/INST]' }}{% else %}{{ message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}")
OV_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
               "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
               "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
               "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenizer(specials: list[str], **named) -> PreTrainedTokenizerFast:
    vocab = ["<pad>", "<unk>", "<s>", "</s>", *specials, *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens=named)
    out.add_tokens([s for s in specials if s not in named.values()], special_tokens=True)
    return out


def text_kwargs(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)


def write_next(out: Path) -> Path:
    torch.manual_seed(0)
    tok = tokenizer(["<image>", "[INST]", "[/INST]"], image_token="<image>")
    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=NEXT_PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**text_kwargs(tok), bos_token_id=tok.bos_token_id),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=NEXT_PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": NEXT_TILE}, image_grid_pinpoints=NEXT_PINPOINTS,
                                        crop_size={"height": NEXT_TILE, "width": NEXT_TILE})
    LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=NEXT_PATCH, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=NEXT_TEMPLATE).save_pretrained(out)
    return out


def write_onevision(out: Path) -> Path:
    """Saved as the hub holds it: processor_class LlavaOnevisionProcessor (whose stock class cannot
    be built here: it needs a video processor, which needs torchvision)."""
    torch.manual_seed(0)
    tok = tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], image_token="<image>", video_token="<video>")
    vision = SiglipVisionConfig(image_size=OV_TILE, patch_size=OV_PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text_kwargs(tok)),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=OV_PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio=f"anyres_max_{OV_MAX}")
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)
    images = LlavaOnevisionImageProcessorPil(size={"height": OV_TILE, "width": OV_TILE}, image_grid_pinpoints=OV_PINPOINTS)
    LlavaOnevisionImageOnlyProcessor(image_processor=images, tokenizer=tok, num_image_tokens=(OV_TILE // OV_PATCH) ** 2,
                                     vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{OV_MAX}",
                                     chat_template=OV_TEMPLATE).save_pretrained(out)
    saved = json.loads((out / "processor_config.json").read_text())
    (out / "processor_config.json").write_text(json.dumps(dict(saved, processor_class="LlavaOnevisionProcessor")))
    return out


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory) -> Path:
    return write_next(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next")


@pytest.fixture(scope="module")
def onevision_ckpt(tmp_path_factory) -> Path:
    return write_onevision(tmp_path_factory.mktemp("ckpt") / "tiny-llava-onevision")


# ---------------------------------------------------------------- geometry: decode what each token was fed

@dataclass(frozen=True)
class Anyres:
    """What the geometry check reads of a checkpoint: its image processor, the model config, and the
    model class whose own pack_image_features joins, unpads and shrinks (it reads only the config)."""

    image_processor: object
    config: object
    model_class: type

    @classmethod
    def of(cls, adapter) -> "Anyres":
        return cls(adapter.processor.image_processor, adapter.model.config, type(adapter.model.model))

    @property
    def max_tiles(self) -> int | None:
        aspect = getattr(self.config, "vision_aspect_ratio", None)
        return None if aspect is None else int(aspect.removeprefix("anyres_max_"))

    def tokens(self, size: tuple[int, int], max_tiles: int | None):
        vision = self.config.vision_config
        return anyres_tokens(size, vision.image_size, vision.patch_size, self.config.image_grid_pinpoints, max_tiles)

    def pack(self, features: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """[views, side², C] per-patch values → [V, C] in token order, without newlines."""
        model = SimpleNamespace(config=self.config)
        if self.max_tiles is None:
            packed, _ = self.model_class.pack_image_features(model, [features], image_sizes, "default", image_newline=None)
        else:
            packed, _ = self.model_class.pack_image_features(model, [features], image_sizes, image_newline=None,
                                                             vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed[0]


def decoded_cells(spec: Anyres, image) -> dict[str, np.ndarray]:
    """Per cell token of `image`, in the layout's order, what its pixels decode to (coord_image):
    cx, cy: mean original coordinates of its image pixels; frac: the share of image (not padding)
    pixels; rows, cols: how many pixel rows / columns hold image pixels; and the spread (max − min) of
    the decoded x and y. Statistics per vision patch are packed by the model's own
    pack_image_features (tiles joined, unpadded, shrunk), with no newline."""
    width, height = image.size
    batch = spec.image_processor([image], return_tensors="pt")
    mean = torch.tensor(spec.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_processor.image_std).view(1, 3, 1, 1)
    views = batch["pixel_values"][0].double() * std + mean                    # [views, 3, T, T] in [0, 1]
    p = spec.config.vision_config.patch_size
    side = spec.config.vision_config.image_size // p
    patches = views[:, :, :side * p, :side * p].reshape(len(views), 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5)
    x, y = patches[..., 0, :, :] * width, patches[..., 1, :, :] * height      # [views, side, side, p, p]
    inside = patches[..., 2, :, :] > 0.25                                      # B = 0.5 on the image, 0 on padding
    stats = torch.stack([(x * inside).sum((-1, -2)), (y * inside).sum((-1, -2)), inside.sum((-1, -2)).double(),
                         inside.any(-1).sum(-1).double(), inside.any(-2).sum(-1).double(),
                         torch.where(inside, x, -np.inf).amax((-1, -2)) - torch.where(inside, x, np.inf).amin((-1, -2)),
                         torch.where(inside, y, -np.inf).amax((-1, -2)) - torch.where(inside, y, np.inf).amin((-1, -2))],
                        dim=-1).reshape(len(views), side * side, -1)             # [views, side², 7]
    s = spec.pack(torch.nan_to_num(stats, posinf=0.0, neginf=0.0), batch["image_sizes"]).numpy()   # [V, 7]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"cx": s[:, 0] / s[:, 2], "cy": s[:, 1] / s[:, 2], "frac": s[:, 2] / p ** 2, "rows": s[:, 3],
                "cols": s[:, 4], "spread_x": s[:, 5], "spread_y": s[:, 6]}


def assert_cells_cover_what_was_fed(spec: Anyres, size: tuple[int, int], layout=None) -> dict[str, int]:
    """Every cell's box of `layout` (default: anyres_tokens'), clipped to the image, is centred on the
    image pixels its token was fed to within 1 px; unshrunk cells also span them (width and height)
    to within 1 px (plus the colour code's resolution), and a token fed only padding has its box
    outside the image. Shrunk cells (bilinear mixes) are checked where they mix image pixels only.
    Returns counts of the cells checked."""
    image = coord_image(*size)
    expected, grid = spec.tokens(size, spec.max_tiles)
    layout = layout or expected
    fed = decoded_cells(spec, image)
    boxes = np.concatenate([cell_boxes(m) for m in layout.maps])                # [V, 4]
    assert len(boxes) == len(fed["cx"]) == layout.num_tokens
    width, height = size
    clipped = np.clip(boxes, 0, [width, height, width, height])
    clip_w, clip_h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    shrunk = np.zeros(len(boxes), bool)
    shrunk[layout.maps[0].size:] = grid != spec.tokens(size, None)[1]
    has_image = fed["frac"] > 0
    centred = has_image & (~shrunk | (fed["frac"] > 0.999))
    np.testing.assert_allclose(fed["cx"][centred], (clipped[centred, 0] + clipped[centred, 2]) / 2, atol=1.0)
    np.testing.assert_allclose(fed["cy"][centred], (clipped[centred, 1] + clipped[centred, 3]) / 2, atol=1.0)
    exact = has_image & ~shrunk
    for spread, count, extent, side in (("spread_x", "cols", clip_w, width), ("spread_y", "rows", clip_h, height)):
        # n pixel columns decode to n centres (n − 1) pixels apart; the box spans n pixels. The
        # 8-bit colour code adds up to one step (side / 255) to a spread.
        many = exact & (fed[count] > 1)
        scale = fed[count][many] / (fed[count][many] - 1)
        assert np.all(np.abs(fed[spread][many] * scale - extent[many]) <= 1.0 + side / 255 * scale)
    padding_only = ~shrunk & ~has_image
    assert np.all(clip_w[padding_only] * clip_h[padding_only] < 1.0)
    return {"centred": int(centred.sum()), "spanned": int(exact.sum()), "partly_padded": int((exact & (fed["frac"] < 1)).sum()),
            "padding_only": int(padding_only.sum()), "shrunk": int(shrunk.sum())}


# ---------------------------------------------------------------- the tests

QUERIES = ["the red circle .", "a small dog on the left"]


def test_checkpoints_are_recognised_from_config(next_ckpt, onevision_ckpt):
    adapters = [load_adapter(model_cfg(next_ckpt)), load_adapter(model_cfg(onevision_ckpt))]
    assert [a.family for a in adapters] == ["llava_next", "llava_onevision"]
    assert [a.max_tiles for a in adapters] == [None, OV_MAX]


def test_next_capture_equals_eager(next_ckpt):
    fast, eager = load_pair(next_ckpt)
    assert_capture_equals_eager(fast, eager, [coord_image(150, 90), coord_image(70, 160)], QUERIES)


def test_onevision_capture_equals_eager(onevision_ckpt):
    """A shrunk high-res view (170×110) batched with an unshrunk one (70×160)."""
    fast, eager = load_pair(onevision_ckpt)
    assert_capture_equals_eager(fast, eager, [coord_image(170, 110), coord_image(70, 160)], QUERIES)


# (150, 90) wide, (70, 160) tall with partly padded rows kept by unpad, (200, 60) partly padded rows at
# both ends, (61, 150) unpad cuts image pixels, (100, 100) square, (180, 75) partly padded column.
@pytest.mark.parametrize("size", [(150, 90), (70, 160), (200, 60), (61, 150), (100, 100), (180, 75)])
def test_next_cells_cover_what_the_processor_fed(next_ckpt, size):
    adapter = load_adapter(model_cfg(next_ckpt))
    layout = adapter.prepare([coord_image(*size)], ["the cat"]).layouts[0]
    assert_cells_cover_what_was_fed(Anyres.of(adapter), size, layout)


# (150, 90), (170, 110), (160, 170) shrunk; (70, 160), (200, 60), (130, 40) partly padded rows;
# (110, 70) two tile columns; (50, 40) one tile.
@pytest.mark.parametrize("size", [(150, 90), (170, 110), (160, 170), (70, 160), (200, 60), (130, 40), (110, 70), (50, 40)])
def test_onevision_cells_cover_what_the_processor_fed(onevision_ckpt, size):
    adapter = load_adapter(model_cfg(onevision_ckpt))
    layout = adapter.prepare([coord_image(*size)], ["the cat"]).layouts[0]
    assert_cells_cover_what_was_fed(Anyres.of(adapter), size, layout)


REAL_NEXT = Anyres(LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                   LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14)), LlavaNextModel)
REAL_ONEVISION = Anyres(LlavaOnevisionImageProcessorPil(),
                        LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=384, patch_size=14)),
                        LlavaOnevisionModel)


# The real checkpoints' tiles, patches, pinpoints and anyres_max_9 (the classes' defaults; no weights
# needed: packing reads only the config). SigLIP's 27 tokens cover 378 of 384 px, so the OneVision
# high-res views are split at every tile seam; (1600, 1200) is shrunk. Images stay ≤ 1600 px: the
# 8-bit colour code's step (side / 255 px) must stay small for a 1 px check.
@pytest.mark.parametrize("spec, size", [(REAL_NEXT, (500, 200)), (REAL_NEXT, (240, 600)), (REAL_NEXT, (1000, 750)),
                                        (REAL_ONEVISION, (500, 200)), (REAL_ONEVISION, (240, 600)),
                                        (REAL_ONEVISION, (1000, 750)), (REAL_ONEVISION, (1600, 1200))],
                         ids=lambda v: v.model_class.__name__ if isinstance(v, Anyres) else f"{v[0]}x{v[1]}")
def test_real_configs_cells_cover_what_the_processor_fed(spec, size):
    assert_cells_cover_what_was_fed(spec, size)


def test_the_geometry_check_sees_partly_padded_and_shrunk_cells(next_ckpt, onevision_ckpt):
    """The sizes above exercise what they claim: cells part image, part padding, and shrunk cells."""
    next_adapter, ov_adapter = Anyres.of(load_adapter(model_cfg(next_ckpt))), Anyres.of(load_adapter(model_cfg(onevision_ckpt)))
    assert assert_cells_cover_what_was_fed(next_adapter, (70, 160))["partly_padded"] > 0
    assert assert_cells_cover_what_was_fed(ov_adapter, (200, 60))["partly_padded"] > 0
    assert assert_cells_cover_what_was_fed(ov_adapter, (170, 110))["shrunk"] > 0
    assert assert_cells_cover_what_was_fed(REAL_ONEVISION, (1600, 1200))["shrunk"] > 0
    assert len(REAL_ONEVISION.tokens((1000, 750), 9)[0].maps) > 2 and len(REAL_NEXT.tokens((1000, 750), None)[0].maps) == 2


def test_next_highres_is_one_map_and_the_newline_column_is_not_a_cell(next_ckpt):
    adapter = load_adapter(model_cfg(next_ckpt))
    prepared = adapter.prepare([coord_image(150, 90)], QUERIES[:1])
    layout = prepared.layouts[0]
    assert [(m.name, m.grid) for m in layout.maps] == [("base", (7, 7)), ("highres", (8, 14))]
    assert layout.maps[0].box == (0.0, 0.0, 150.0, 90.0)          # the whole image stretched to the tile
    image = torch.nonzero(prepared.inputs["input_ids"][0] == adapter.image_token_id)[:, 0]
    assert len(image) == 49 + 8 * 15                               # each high-res row ends with a newline
    newlines = image[49:].view(8, 15)[:, -1]
    kept = set(prepared.image_positions[0].tolist())
    assert len(kept) == layout.num_tokens and not kept & set(newlines.tolist())


def test_onevision_splits_the_highres_view_at_tile_seams():
    """SigLIP's patch does not divide the tile: the last tile_side − side·patch pixels of every tile
    are never seen, so the cells of one row jump at each seam — one map per row and tile."""
    layout, grid = anyres_tokens((110, 70), OV_TILE, OV_PATCH, OV_PINPOINTS, OV_MAX)
    assert grid == (8, 14)
    highres = layout.maps[1:]
    assert [m.grid for m in highres] == [(1, 7)] * 16
    assert layout.maps[0].box == pytest.approx((0, 0, 110 * 56 / 60, 70 * 56 / 60))
    left, right = highres[0], highres[1]                           # row 0, tile columns 0 and 1
    assert right.box[0] - left.box[2] == pytest.approx((OV_TILE - 7 * OV_PATCH) * 110 / 120)


def test_onevision_image_only_processor_matches_its_parts(onevision_ckpt):
    """The processor without a video processor gives what its image processor and tokenizer give
    alone: the same pixel_values and image_sizes, and the prompt with <image> repeated once per
    token of the model's layout (base + rows × (cols + newline))."""
    adapter = load_adapter(model_cfg(onevision_ckpt))
    images, prompts = [coord_image(170, 110), coord_image(70, 160)], ["<|im_start|>user <image>\nthe cat"] * 2
    batch = adapter.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    alone = adapter.processor.image_processor(images, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], alone["pixel_values"], atol=0, rtol=0)
    torch.testing.assert_close(batch["image_sizes"], alone["image_sizes"], atol=0, rtol=0)
    for row, image in zip(batch["input_ids"], images):
        layout, (rows, cols) = anyres_tokens(image.size, OV_TILE, OV_PATCH, OV_PINPOINTS, OV_MAX)
        expanded = prompts[0].replace("<image>", "<image>" * (layout.maps[0].size + rows * (cols + 1)))
        ids = adapter.tokenizer(expanded, return_tensors="pt")["input_ids"][0]
        assert torch.equal(row[-len(ids):], ids)


def test_prompts_use_the_chat_template(next_ckpt, onevision_ckpt):
    """Default: the query is the expression's last token; generation_prompt: the template's end."""
    assert load_adapter(model_cfg(next_ckpt)).prepare([coord_image(60, 40)], ["the cat"]).prompts == ["[INST] <image>\nthe cat"]
    ov = load_adapter(model_cfg(onevision_ckpt, query_at="generation_prompt"))
    assert ov.prepare([coord_image(60, 40)], ["the cat"]).prompts == \
        ["<|im_start|>user <image>\nthe cat<|im_end|>\n<|im_start|>assistant\n"]


def test_conv_mode_other_than_auto_is_refused(next_ckpt):
    with pytest.raises(InputError, match="conv_mode"):
        load_adapter(model_cfg(next_ckpt, conv_mode="plain"))


def test_a_processor_that_cuts_other_tiles_than_the_model_is_refused(next_ckpt, tmp_path):
    """Tiles of another size than the vision tower's input would misplace every cell."""
    ckpt = Path(shutil.copytree(next_ckpt, tmp_path / "tiles-48"))
    saved = json.loads((ckpt / "processor_config.json").read_text())
    saved["image_processor"]["crop_size"] = {"height": 48, "width": 48}
    (ckpt / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="does not match the model"):
        load_adapter(model_cfg(ckpt))


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_cli_pipeline_and_batch(family, next_ckpt, onevision_ckpt, images, tmp_path):
    assert_cli_runs(next_ckpt if family == "next" else onevision_ckpt, tmp_path,
                    {"wide": images["wide"], "tall": images["tall"]})
