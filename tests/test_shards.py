"""Shard arithmetic: every row in exactly one shard, the same one whatever the slice, order or
run, and each shard's failure list in its own file."""
from __future__ import annotations

import random

import pytest

from localization_heads import shards
from localization_heads.dataio import InputError


def rows(ids) -> list[tuple[int, dict]]:
    return [(lineno, {"id": item_id}) for lineno, item_id in enumerate(ids, start=1)]


IDS = [f"refcoco_{i}" for i in range(1000)] + ["a", "b", "x.y", "ünïcode", "42"]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_are_disjoint_and_cover_every_row(num_shards):
    parts = [shards.rows_of_shard(rows(IDS), num_shards, i) for i in range(num_shards)]
    owned = [r[1]["id"] for part in parts for r in part]
    assert sorted(owned) == sorted(IDS)               # complete, and no row twice
    for part in parts:                                  # each keeps the file's order
        assert [r[0] for r in part] == sorted(r[0] for r in part)


def test_shards_are_roughly_balanced():
    sizes = [len(shards.rows_of_shard(rows(IDS), 8, i)) for i in range(8)]
    assert all(abs(s - len(IDS) / 8) < 4 * (len(IDS) / 8) ** 0.5 for s in sizes), sizes


def test_a_rows_shard_depends_on_its_id_only():
    """Resume, another start/end slice or a reordered or extended file never moves a row to
    another shard (and so never makes two shards write the same files)."""
    owner = {r[1]["id"]: i for i in range(4) for r in shards.rows_of_shard(rows(IDS), 4, i)}
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    for variant in (shuffled, IDS[100:300], IDS + [f"new_{i}" for i in range(50)]):
        for i in range(4):
            assert all(owner.get(r[1]["id"], i) == i for r in shards.rows_of_shard(rows(variant), 4, i))
    assert [shards.shard_of("refcoco_7", 4) for _ in range(3)] == [owner["refcoco_7"]] * 3


def test_one_shard_is_the_whole_file():
    assert shards.rows_of_shard(rows(IDS), 1, 0) == rows(IDS)


@pytest.mark.parametrize("num_shards, shard, message", [
    (2, 2, r"data.shard=2 must be in 0..1"),
    (2, -1, r"data.shard=-1 must be in 0..1"),
    (0, 0, r"data.num_shards=0 must be at least 1"),
    ("two", 0, r"must be integers"),
])
def test_bad_shard_settings_are_one_line_errors(num_shards, shard, message):
    with pytest.raises(InputError, match=message):
        shards.rows_of_shard(rows(IDS), num_shards, shard)


@pytest.mark.parametrize("device, shard, num_gpus, expected", [
    ("auto", 5, 4, "cuda:1"),      # four GPUs on one machine: shards spread over them
    ("auto", 5, 1, "cuda:0"),      # one visible GPU (SLURM gives each job its own)
    ("auto", 5, 0, "auto"),        # no GPU: the adapter falls back to CPU as usual
    ("cpu", 5, 4, "cpu"),          # an explicit device is kept
    ("cuda:2", 5, 4, "cuda:2"),
])
def test_device_per_shard(device, shard, num_gpus, expected):
    assert shards.shard_device(device, shard, num_gpus) == expected


def test_device_per_shard_reaches_the_model_loader(monkeypatch):
    """data.device_per_shard=true: the adapter is asked for cuda:(shard mod GPUs)."""
    from localization_heads import cli as pipeline
    from localization_heads import settings
    from localization_heads import families as adapters
    from localization_heads.config import Settings

    def compose(*overrides):
        return Settings.from_config(pipeline.compose(*overrides))

    asked = []
    monkeypatch.setattr(adapters, "load_adapter", lambda model_cfg, capture: asked.append(str(model_cfg.device)))
    monkeypatch.setattr(settings.torch.cuda, "device_count", lambda: 2)
    for shard in range(3):
        settings.load_adapter_from(compose("model=toy", "model.device=auto", "data.num_shards=3",
                                           f"data.shard={shard}", "data.device_per_shard=true"))
    settings.load_adapter_from(compose("model=toy", "model.device=auto", "data.num_shards=3", "data.shard=1"))
    assert asked == ["cuda:0", "cuda:1", "cuda:0", "auto"]
