"""logic=selection_v1 reproduces the authors' reference code (liu-hanyu-97/LocalizationHeads 9ffe219,
analyze.py / bbox.py run unchanged) on every sample of tests/fixtures/parity: 60 toy-model samples and
13 synthetic edge cases (fallbacks, bottom-row focus, exact ties, early-layer-only heads, equal-mass
components, flat heads). The fixture's README (../shared/parity/README.md) describes each field.

Compared with the reference run on float64 values ("analyze_fp64", what a float64 implementation
must match): τ and the per-head sums exactly (float16 values sum exactly in float64), the kept set,
the order up to ties, the fallback, each kept head's entropy, components and bottom-row flag; and the
box step's grid mask and grid box. Against the reference's own float16 arithmetic ("analyze_fp16"):
the kept set and τ.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from localization_heads import cli as pipeline
from localization_heads.analyze import analyze
from localization_heads.config import LogicSettings
from localization_heads.bbox import combine_heads

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "parity"
# The reference orders heads by entropy alone, so heads whose entropies differ by float noise
# (~1e-7 in its float64 run, whose component probabilities are float32) come in arbitrary order;
# its README treats |ΔSE| ≤ 1e-3 as a tie (two heads at log 2 are one).
TIE = 1e-3
# Our float64 entropy vs the reference's float32 probabilities and logarithms (3e-7 seen).
ENTROPY_ATOL = 1e-6

SAMPLES = json.loads((FIXTURE / "samples.json").read_text())
REFERENCE = json.loads((FIXTURE / "reference_outputs.json").read_text())
IDS = sorted(SAMPLES)


@pytest.fixture(scope="module")
def attention():
    with np.load(FIXTURE / "attention.npz", allow_pickle=False) as npz:
        return {sid: npz[sid] for sid in npz.files}


@pytest.fixture(scope="module")
def logic():
    return LogicSettings.from_config(pipeline.compose("logic=selection_v1").logic)


def pairs(records) -> list[tuple[int, int]]:
    return [(int(r["layer"]), int(r["head"])) for r in records]


def entropy(record) -> float:
    return math.inf if record["spatial_entropy"] is None else float(record["spatial_entropy"])


def test_fixture_covers_toy_and_every_synthetic_case(attention):
    assert set(attention) == set(SAMPLES) == set(REFERENCE["samples"])
    sources = [SAMPLES[sid]["source"] for sid in IDS]
    assert sources.count("toy") == 60 and len(sources) == 73
    assert sum(REFERENCE["samples"][sid]["analyze_fp64"]["fallback"] for sid in IDS) == 5


def test_selection_v1_holds_the_reference_configuration(logic):
    """The values of the reference's conf/logic/selection_v1.yaml, and scipy's smoothing defaults."""
    ref = REFERENCE["config"]
    assert int(logic.top_k) == ref["top_k"] == 5
    assert str(logic.threshold.method) == ref["threshold.method"]
    assert int(logic.threshold.min_keep) == ref["threshold.min_keep"] == 1
    assert float(logic.entropy.binarize_threshold) == ref["entropy.binarize_threshold"]
    assert float(logic.smoothing.sigma) == ref["smoothing.sigma"]
    assert str(logic.mask.method) == ref["mask.method"]
    assert (str(logic.smoothing.mode), float(logic.smoothing.truncate)) == ("reflect", 4.0)


@pytest.mark.parametrize("sid", IDS)
def test_kept_heads_match_the_reference(sid, attention, logic):
    """Same τ, same kept set, same order up to ties, same fallback, same per-head measurements."""
    ref = REFERENCE["samples"][sid]["analyze_fp64"]
    result = analyze(attention[sid], tuple(SAMPLES[sid]["grid"]), logic)
    assert result["tau"] == ref["tau"]
    assert [h["attn_sum"] for h in result["heads"]] == ref["head_sums"]
    assert result["fallback"] == ref["fallback"]
    ours, theirs = pairs(result["ranked"]), pairs(ref["kept"])
    assert set(ours) == set(theirs)
    ref_entropy = {p: entropy(r) for p, r in zip(theirs, ref["kept"])}
    for position, (mine, reference) in enumerate(zip(ours, theirs)):
        assert mine == reference or abs(ref_entropy[mine] - ref_entropy[reference]) <= TIE, \
            f"position {position}: L{mine[0]}H{mine[1]} where the reference has L{reference[0]}H{reference[1]}"
    if ref["fallback"]:
        return     # the reference's fallback heads carry no measurement below τ; the heads are what count
    by_head = {(h["layer"], h["head"]): h for h in result["heads"]}
    for (layer, head), r in zip(theirs, ref["kept"]):
        mine = by_head[(layer, head)]
        assert entropy(mine) == pytest.approx(entropy(r), abs=ENTROPY_ATOL)
        assert mine["n_components"] == r["num_components"]
        assert mine["bottom_row_focus"] == r["bottom_row_focus"]


@pytest.mark.parametrize("sid", IDS)
def test_kept_set_matches_the_reference_in_float16_arithmetic(sid, attention, logic):
    """On its own float16 sums and means the reference keeps the same heads, τ within 1e-3 relative."""
    ref = REFERENCE["samples"][sid]["analyze_fp16"]
    result = analyze(attention[sid], tuple(SAMPLES[sid]["grid"]), logic)
    assert set(pairs(result["ranked"])) == set(pairs(ref["kept"]))
    assert result["tau"] == pytest.approx(ref["tau"], rel=1e-3, abs=0)


def grid_mask_and_box(attn, grid, heads, logic):
    """The reference's box step on the grid: cells above the combined map's mean, inclusive cell box."""
    combined = combine_heads(attn, grid, heads, float(logic.smoothing.sigma), mode=str(logic.smoothing.mode),
                             truncate=float(logic.smoothing.truncate))
    mask = combined > combined.mean()
    rows, cols = np.nonzero(mask)
    box = [0, 0, 0, 0] if cols.size == 0 else [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    return mask, box


@pytest.mark.parametrize("sid", IDS)
def test_box_step_grid_mask_matches_the_reference(sid, attention, logic):
    """The reference's top-5 heads, smoothed and combined with the selection_v1 settings, threshold
    to the reference's grid mask and grid box (the tool then maps the map to image pixels instead
    of stretching the grid: a deliberate departure, README "logic")."""
    box = REFERENCE["samples"][sid]["box"]
    heads = [tuple(h) for h in box["heads"]]
    mask, grid_box = grid_mask_and_box(attention[sid], tuple(SAMPLES[sid]["grid"]), heads, logic)
    np.testing.assert_array_equal(mask, np.asarray(box["mask"], dtype=bool))
    assert grid_box == box["grid_box"]
    # the signature an external checker calls gives the same map
    np.testing.assert_array_equal(combine_heads(attention[sid], tuple(SAMPLES[sid]["grid"]), heads, 1.0),
                                  combine_heads(attention[sid], tuple(SAMPLES[sid]["grid"]), heads, 1.0,
                                                mode="reflect", truncate=4.0))


def test_the_boundary_mode_decides_masks(attention, logic):
    """Why smoothing.mode is part of parity: the old "nearest" boundary changed masks."""
    differing = 0
    for sid in IDS:
        heads = [tuple(h) for h in REFERENCE["samples"][sid]["box"]["heads"]]
        nearest = combine_heads(attention[sid], tuple(SAMPLES[sid]["grid"]), heads, 1.0, mode="nearest", truncate=3.0)
        differing += not np.array_equal(nearest > nearest.mean(), np.asarray(REFERENCE["samples"][sid]["box"]["mask"], bool))
    assert differing >= 10
