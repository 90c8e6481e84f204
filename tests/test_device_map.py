"""model.device_map / max_memory / offload_folder: a model split by accelerate's big-model loading
(here on the CPU, with the layers past a small max_memory offloaded to disk) gives the attention of
a model on one device; data.gpus_per_shard gives each shard its own GPUs; placements that cannot
work are refused before the model loads."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from localization_heads import cli as pipeline
from localization_heads import settings, validate
from localization_heads.collector import collect
from localization_heads.config import Settings
from localization_heads.shards import shard_gpus
from tests.tiny_models import text_config

QUERIES = ["the red circle .", "a small blue square on the left ."]


def load(*overrides: str):
    return settings.load_adapter_from(Settings.from_config(pipeline.compose("model=toy", *overrides)))


def attention(adapter, images) -> list[torch.Tensor]:
    return [r["attn"] for r in collect(adapter, images, QUERIES)]


def test_toy_split_between_cpu_and_disk_by_max_memory_gives_one_device_attention(images, tmp_path):
    pictures = [Image.open(images[k]).convert("RGB") for k in ("wide", "tall")]
    whole = load()
    split = load("model.device_map=auto", "model.max_memory={cpu: 6MB}", f"model.offload_folder={tmp_path}")
    placed = split.model.hf_device_map
    layers = {v for k, v in placed.items() if ".layers." in k}
    assert layers == {"cpu", "disk"}, placed            # the language model really is split
    assert split.device == torch.device("cpu")           # inputs go where the embeddings run
    for a, b in zip(attention(split, pictures), attention(whole, pictures)):   # a batch of two, left-padded
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_original_llava_by_an_explicit_map_with_disk_layers_gives_one_device_attention(original_checkpoint, images,
                                                                                       tmp_path):
    layers = text_config().num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk",
                  **{f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}}
    as_override = "{" + ", ".join(f"{k}: {v}" for k, v in device_map.items()) + "}"
    base = [f"model.name={original_checkpoint}", "model.family=llava_original"]
    whole = load(*base)
    split = load(*base, f"model.device_map={as_override}", f"model.offload_folder={tmp_path}")
    assert split.model.hf_device_map == device_map
    pictures = [Image.open(images[k]).convert("RGB") for k in ("wide", "square")]
    for a, b in zip(attention(split, pictures), attention(whole, pictures)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shard, per_shard, visible, expected", [
    (0, 2, 4, [0, 1]), (1, 2, 4, [2, 3]), (2, 2, 4, [0, 1]),   # one machine, 4 GPUs, 2 a shard
    (5, 2, 2, [0, 1]),                                       # SLURM: the job sees only its own 2
    (3, 1, 4, [3]), (1, 4, 8, [4, 5, 6, 7]),
])
def test_shard_i_runs_on_gpus_i_g_to_i_plus_one_g(shard, per_shard, visible, expected):
    assert shard_gpus(shard, per_shard, visible) == expected


def test_a_shards_max_memory_names_its_own_gpus():
    assert settings.shard_max_memory({0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, [2, 3]) == \
        {2: "70GiB", 3: "70GiB", "cpu": "200GiB"}


@pytest.mark.parametrize("overrides, message", [
    (["model.device_map=everywhere"], "model.device_map='everywhere': use null, auto, balanced"),
    (["model.device_map={model.layers.0: 7}"], "model.device_map.model.layers.0=7: no GPU 7 here"),
    (["model.device_map=auto", "model.max_memory={cpu: lots}"], "model.max_memory.cpu='lots': give a size such as 70GiB"),
    (["model.device_map=auto", "model.max_memory=70GiB"], "model.max_memory='70GiB': give {device: size, ...}"),
    (["model.device_map=auto", "model.max_memory={9: 70GiB}"], "model.max_memory key 9: no GPU 9 here"),
    (["model.max_memory={cpu: 1GiB}"], "model.max_memory is read only with model.device_map"),
    ([f"data.gpus_per_shard={torch.cuda.device_count() + 1}"], "GPU(s) visible here"),
    (["data.gpus_per_shard=0"], "data.gpus_per_shard=0: must be an integer >= 1"),
])
def test_a_placement_that_cannot_work_is_refused_before_the_model_loads(overrides, message, tmp_path):
    cfg = pipeline.compose("stage=batch", "model=toy", "data.data_file=rows.jsonl", f"data.output_dir={tmp_path}",
                           *overrides)
    problems = validate.config_problems(cfg)
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)
