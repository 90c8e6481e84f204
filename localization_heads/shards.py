"""Which rows a shard owns and which GPU it runs on.

`data.num_shards=N data.shard=i` makes stage=batch process only shard i's rows. A row belongs to
shard `sha256(id) mod N`. By id, not by position, because the id is what names a row's files:
the owner of `<id>_*` stays the same whatever the row's line number, whichever `start_index` /
`end_index` slice or row order is used, and when rows are appended to the JSONL — so a rerun
(resume) of shard i finds exactly its own finished files, and two shards never write the same file.
sha256 rather than Python's `hash()`, which is salted per process. Shards are balanced only in
expectation (±√(n/N) rows), which does not matter for throughput at dataset scale.

Shards share one output folder. Per-id files cannot clash (disjoint ids); the failure list
`failures.jsonl` is shared: each run replaces only its own rows' entries under a lock (batch.py).
"""
from __future__ import annotations

import hashlib
from localization_heads.dataio import InputError



def shard_of(item_id: str, num_shards: int) -> int:
    """The shard (0 ≤ shard < num_shards) that owns row `item_id`."""
    digest = hashlib.sha256(str(item_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def check_shard(num_shards, shard) -> tuple[int, int]:
    """(num_shards, shard) as ints, or an InputError naming the keys."""
    try:
        n, i = int(num_shards), int(shard)
    except (TypeError, ValueError):
        raise InputError(f"data.num_shards={num_shards!r} / data.shard={shard!r} must be integers") from None
    if n < 1:
        raise InputError(f"data.num_shards={n} must be at least 1")
    if not 0 <= i < n:
        raise InputError(f"data.shard={i} must be in 0..{n - 1} for data.num_shards={n}")
    return n, i


def rows_of_shard(rows: list[tuple[int, dict]], num_shards, shard) -> list[tuple[int, dict]]:
    """The (line number, row) pairs shard `shard` of `num_shards` owns, in their original order."""
    n, i = check_shard(num_shards, shard)
    if n == 1:
        return list(rows)
    return [r for r in rows if shard_of(str(r[1]["id"]), n) == i]


def shard_device(device: str, shard: int, num_gpus: int) -> str:
    """model.device for shard `shard` with data.device_per_shard=true on one machine: `auto`
    becomes cuda:(shard mod num_gpus), so N shards launched side by side spread over the visible
    GPUs (with one visible GPU, as under SLURM's per-job allocation, cuda:0). An explicit device,
    or a machine without GPUs, keeps `device`."""
    if device != "auto" or num_gpus < 1:
        return device
    return f"cuda:{int(shard) % num_gpus}"


def shard_gpus(shard: int, gpus_per_shard: int, num_gpus: int) -> list[int]:
    """The GPUs of shard `shard` with data.gpus_per_shard=g: [i·g, (i+1)·g) of the visible ones,
    counted modulo num_gpus like device_per_shard, so under SLURM, where a job sees only the g GPUs
    it asked for, every shard takes GPUs 0..g-1. Needs g ≤ num_gpus (validate.py)."""
    start = int(shard) * gpus_per_shard % num_gpus
    return [(start + j) % num_gpus for j in range(gpus_per_shard)]
