"""analyze.py as a specification (method.md §3-4): the chord elbow, spatial entropy, the filters,
per-sample ranking on a non-square grid, and dataset-level head voting."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from localization_heads.config import LogicSettings
from localization_heads.analyze import (ENTROPY_TIE_TOL, HeadTable, analyze, bottom_row_focus, chord_elbow, fallback_heads,
                     measure_heads, rank_heads, select_heads, spatial_entropy)

CONF = Path(__file__).resolve().parents[1] / "localization_heads" / "conf" / "logic"


def logic(name: str, **overrides):
    """conf/logic/<name>.yaml with dotted-key overrides, e.g. logic("paper", **{"select.k": 2})."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return LogicSettings.from_config(cfg)


# --- criterion 1: chord elbow --------------------------------------------------------------------

def test_chord_elbow_hand_computed():
    """τ = the value of the sorted point farthest from the chord (0, y0)–(N−1, yN−1)."""
    # x = 0..5, y = [0,0,0,1,5,10]; chord y = 2x, i.e. 10x − 5y = 0, |10x − 5y| / √125:
    #   x=0: 0   x=1: 10/11.18=0.89   x=2: 20/11.18=1.79   x=3: |30−5|=25 → 2.24
    #   x=4: |40−25|=15 → 1.34   x=5: 0            → elbow at x=3, τ = y3 = 1
    assert chord_elbow([0, 0, 0, 1, 5, 10]) == 1.0


def test_chord_elbow_sorts_and_returns_a_value_not_an_index():
    """The input order does not matter and τ is one of the VALUES (issue #12 compared head indices:
    the elbow's position 3 must never come back as a threshold)."""
    for values in ([5, 0, 10, 1, 0, 0], [10, 5, 1, 0, 0, 0], [0, 1, 0, 10, 0, 5]):
        assert chord_elbow(values) == 1.0
    # large values: the elbow index (2) is not the answer, the value at it (0.03) is
    assert chord_elbow([0.9, 0.01, 0.85, 0.02, 0.8, 0.03]) == 0.03


def test_chord_elbow_uses_absolute_distance():
    """Points ABOVE the chord count too: the farthest one in absolute distance wins."""
    # y = [0, 7, 7.5, 8, 8.5, 10], chord y = 2x; y − chord = 0, 5, 3.5, 2, 0.5, 0 → x=1, τ = 7.
    # A signed "gap under the chord" would be ≤ 0 everywhere and return an end point (0 or 10).
    assert chord_elbow([0, 7, 7.5, 8, 8.5, 10]) == 7.0


def test_chord_elbow_degenerate_curves_give_the_minimum():
    """N ≤ 2 or a flat curve → τ = min (every head passes)."""
    assert chord_elbow([3.0]) == 3.0
    assert chord_elbow([4.0, 2.0]) == 2.0
    assert chord_elbow([0.5] * 7) == 0.5
    with pytest.raises(ValueError):
        chord_elbow([])


def test_rank_heads_compares_sums_with_tau_by_value():
    """Criterion 1 keeps the heads whose S ≥ τ, wherever they sit in head order."""
    sums = np.array([5.0, 0, 10, 1, 0, 0])        # τ = 1 → heads 0, 2, 3 (not heads 3, 4, 5)
    table = HeadTable(6, sums, np.zeros(6), np.ones(6, int), np.zeros(6, bool))
    ranked = rank_heads(table, logic("paper"))
    assert ranked == [2, 0, 3]                    # equal entropy: larger S first


# --- criterion 2: spatial entropy ----------------------------------------------------------------

def grid_map(rows, cols, cells, value=1.0):
    m = np.zeros((rows, cols))
    for r, c in cells:
        m[r, c] = value
    return m


def test_size_entropy_two_equal_blobs_is_ln2():
    """size: foreground A > mean, P_i = |C_i| / Σ|C_j|; two 2-cell blobs → P = ½, ½ → ln 2."""
    m = grid_map(4, 5, [(0, 0), (0, 1), (3, 3), (3, 4)])
    se, n = spatial_entropy(m[None], "size")
    assert se[0] == pytest.approx(math.log(2)) and n[0] == 2


def test_size_entropy_unequal_blobs_by_cell_count():
    """size: sizes 1 and 3 → −(¼ ln ¼ + ¾ ln ¾), whatever the cells' values."""
    m = grid_map(4, 5, [(0, 0)], 9.0) + grid_map(4, 5, [(3, 2), (3, 3), (3, 4)], 1.0)
    se, n = spatial_entropy(m[None], "size")
    # mean = 12/20 = 0.6, all four cells are above it
    assert se[0] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) and n[0] == 2


def test_size_entropy_single_blob_is_zero():
    """One component → P = 1 → entropy 0."""
    se, n = spatial_entropy(grid_map(6, 8, [(2, 3), (2, 4), (3, 3), (3, 4)])[None], "size")
    assert se[0] == 0.0 and n[0] == 1


def test_components_are_eight_connected():
    """Cells touching only at a corner form ONE component (8-connectivity)."""
    diagonal = grid_map(5, 5, [(0, 0), (1, 1), (2, 2), (3, 3)])
    se, n = spatial_entropy(diagonal[None], "size")
    assert n[0] == 1 and se[0] == 0.0
    se, n = spatial_entropy(diagonal[None], "mass")
    assert n[0] == 1 and se[0] == 0.0


def test_mass_entropy_hand_computed():
    """mass: B = ReLU(A − 2·mean), P_i = Σ_{C_i} B / Σ B."""
    # 16 cells, A = 8 at (0,0), 4 at (3,3): mean 0.75, 2·mean 1.5 → B = 6.5 and 2.5 (Σ 9)
    m = grid_map(4, 4, [(0, 0)], 8.0) + grid_map(4, 4, [(3, 3)], 4.0)
    se, n = spatial_entropy(m[None], "mass")
    p = np.array([6.5, 2.5]) / 9.0
    assert se[0] == pytest.approx(-(p * np.log(p)).sum()) and n[0] == 2


def test_mass_entropy_denominator_includes_below_threshold_mass():
    """mass: Σ B runs over ALL of B, so B below binarize_threshold still dilutes P."""
    # 16 cells: 12 at (0,0), 2.25 at (3,3), 1.75 at (3,0): Σ 16, 2·mean 2 → B = 10, 0.25, 0.
    # threshold 0.5: one component {(0,0)}, P = 10 / 10.25 → SE = −P ln P > 0 (not 0).
    m = grid_map(4, 4, [(0, 0)], 12.0) + grid_map(4, 4, [(3, 3)], 2.25) + grid_map(4, 4, [(3, 0)], 1.75)
    se, n = spatial_entropy(m[None], "mass", binarize_threshold=0.5)
    p = 10.0 / 10.25
    assert n[0] == 1 and se[0] == pytest.approx(-p * math.log(p))


def test_flat_map_has_infinite_entropy():
    """No foreground (a flat map) → SE = +inf: nothing localized."""
    flat = np.full((1, 6, 8), 1 / 48)
    for method in ("mass", "size"):
        se, n = spatial_entropy(flat, method)
        assert se[0] == math.inf and n[0] == 0


def test_unknown_entropy_method_is_refused():
    with pytest.raises(ValueError):
        spatial_entropy(np.ones((1, 2, 2)), "bogus")


def random_maps(seed=0, n=300, rows=6, cols=8):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, rows, cols)) ** 8           # peaky, several blobs, many tiny values
    return maps / maps.sum(axis=(1, 2), keepdims=True) * rng.uniform(0.05, 1.0, (n, 1, 1))


@pytest.mark.parametrize("method", ["size", "mass"])
def test_entropy_is_float64_and_never_negative_for_float16_input(method):
    """fp16 input is computed in float64: same values as the float64 copy, never negative."""
    maps16 = random_maps().astype(np.float16)
    se16, n16 = spatial_entropy(maps16, method)
    se64, n64 = spatial_entropy(maps16.astype(np.float64), method)
    assert se16.dtype == np.float64
    finite = np.isfinite(se64)
    assert (se16[finite] >= 0).all()
    np.testing.assert_array_equal(n16, n64)
    np.testing.assert_allclose(se16[finite], se64[finite], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["size", "mass"])
def test_vectorised_entropy_equals_one_head_at_a_time(method):
    """One call over N heads gives exactly what N single-head calls give (no cross-head labels)."""
    maps = random_maps(seed=1, n=120)
    se, n = spatial_entropy(maps, method)
    for i in range(maps.shape[0]):
        se_i, n_i = spatial_entropy(maps[i:i + 1], method)
        assert n[i] == n_i[0]
        assert se[i] == pytest.approx(se_i[0], abs=1e-12) or (math.isinf(se[i]) and math.isinf(se_i[0]))


def test_components_do_not_join_across_heads():
    """Head 0's last row and head 1's first row are not neighbours."""
    maps = np.stack([grid_map(3, 3, [(2, 1)]), grid_map(3, 3, [(0, 1)])])
    _, n = spatial_entropy(maps, "size")
    assert n.tolist() == [1, 1]


# --- filter: bottom-row focus --------------------------------------------------------------------

def test_bottom_row_focus():
    """Flag a head when any cell of the LAST grid row exceeds the threshold (raw attention)."""
    maps = np.zeros((4, 6, 8))
    maps[0, 5, 7] = 0.06          # last row, above 0.05 → flagged
    maps[1, 5, 0] = 0.05          # exactly at threshold → not flagged (strict >)
    maps[2, 4, 3] = 0.9           # second-to-last row → not flagged
    maps[3, 5, :] = 0.04          # many small cells → not flagged
    assert bottom_row_focus(maps).tolist() == [True, False, False, False]
    assert bottom_row_focus(maps, threshold=0.01).tolist() == [True, True, False, True]


# --- per-sample ranking on a non-square grid ----------------------------------------------------

GRID = (6, 8)                     # rows × cols, V = 48 — deliberately not square
L, H = 6, 4
PLANTED = {(3, 1): 0.90, (4, 2): 0.80, (2, 0): 0.70}            # compact 2×2 blobs, mid-image
SINKS = {(3, 3): 0.85, (5, 0): 0.75}                            # compact blobs on the last row
EARLY = {(0, 2): 0.95, (1, 1): 0.92}                            # compact, in layers 0 and 1
WEAK = {(5, 2): 0.04}                                           # compact, but little image attention


def blob(total, top, left, height=2, width=2, background=1e-4):
    m = np.full(GRID, background)
    m[top:top + height, left:left + width] += (total - background * m.size) / (height * width)
    return m


def diffuse(rng, total):
    noise = 1 + 0.2 * (2 * rng.random(GRID) - 1)      # ±20 %: no cell reaches 2·mean
    return noise / noise.sum() * total


def planted_attention(seed=0):
    """attn [L, H, 1, V] with the heads above planted; every other head diffuse (S in 0.1–0.3)."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((L, H) + GRID)
    for l in range(L):
        for h in range(H):
            maps[l, h] = diffuse(rng, rng.uniform(0.1, 0.3))
    for (l, h), s in PLANTED.items():
        maps[l, h] = blob(s, top=1 + h % 2, left=1 + 2 * h)
    for (l, h), s in SINKS.items():
        maps[l, h] = blob(s, top=GRID[0] - 1, left=2 * h, height=1)
    for (l, h), s in EARLY.items():
        maps[l, h] = blob(s, top=2, left=3)
    for (l, h), s in WEAK.items():
        maps[l, h] = blob(s, top=2, left=5)
    return torch.tensor(maps.reshape(L, H, 1, -1), dtype=torch.float32)


def ranked_heads(result):
    return [(r["layer"], r["head"]) for r in result["ranked"]]


def by_sum(*groups):
    heads = {k: v for g in groups for k, v in g.items()}
    return sorted(heads, key=lambda k: -heads[k])


def test_reference_logic_ranks_exactly_the_planted_heads():
    """selection_v1: sinks (bottom row) and layers 0–1 are dropped, diffuse heads have SE = inf,
    the weak head fails criterion 1; planted heads tie at SE 0 and are ordered by larger S."""
    result = analyze(planted_attention(), GRID, logic("selection_v1"))
    assert ranked_heads(result) == [(3, 1), (4, 2), (2, 0)]
    assert [r["rank"] for r in result["ranked"]] == [0, 1, 2]


def test_bottom_row_filter_off_keeps_sinks():
    """bottom_row=false: the sink heads come back, in attention-sum order among the planted ones."""
    result = analyze(planted_attention(), GRID, logic("selection_v1", **{"filters.bottom_row": False}))
    assert ranked_heads(result) == by_sum(PLANTED, SINKS)
    sinks = {(r["layer"], r["head"]) for r in result["heads"] if r["bottom_row_focus"]}
    assert sinks == set(SINKS)


def test_min_layer_drops_early_layers():
    """min_layer=2 drops layers 0 and 1; min_layer=0 keeps them (they are the most concentrated)."""
    kept = analyze(planted_attention(), GRID, logic("selection_v1", **{"filters.min_layer": 0}))
    assert ranked_heads(kept) == by_sum(EARLY, PLANTED)
    dropped = analyze(planted_attention(), GRID, logic("selection_v1"))
    assert all(layer >= 2 for layer, _ in ranked_heads(dropped))


def test_paper_logic_ranks_concentrated_first_and_diffuse_last():
    """paper (size entropy, no filters): every concentrated head with enough attention first (SE 0,
    by S); diffuse heads either fail criterion 1 or rank after all of them (a diffuse map whose
    above-mean half happens to be connected also has SE 0, but a smaller S); WEAK never passes."""
    result = analyze(planted_attention(), GRID, logic("paper"))
    ranked = ranked_heads(result)
    concentrated = by_sum(PLANTED, SINKS, EARLY)
    assert ranked[:len(concentrated)] == concentrated
    assert all(r["spatial_entropy"] == 0 for r in result["ranked"][:len(concentrated)])
    assert len(ranked) > len(concentrated)           # the largest diffuse sum is at the elbow
    assert (5, 2) not in ranked
    assert result["tau"] > WEAK[(5, 2)]


def test_ties_on_entropy_broken_by_larger_attention_sum():
    """Equal SE → the head with the larger S ranks first (regardless of head order)."""
    table = HeadTable(2, np.array([0.5, 0.7, 0.6, 0.9]), np.array([0.3, 0.3, 0.0, 0.3]),
                      np.ones(4, int), np.zeros(4, bool))
    assert rank_heads(table, logic("paper"), tau=0.0) == [2, 3, 1, 0]


def test_entropies_equal_up_to_float_noise_are_ties():
    """Entropies are compared rounded to multiples of ENTROPY_TIE_TOL (1e-9): 0, ±1e-16 and 3e-10
    are one tie (ordered by larger S, then (layer, head)); 2e-9 ranks after them; equal S and SE
    keep (layer, head) order."""
    assert ENTROPY_TIE_TOL == 1e-9
    entropy = np.array([1e-16, 0.0, -2e-17, 3e-10, 2e-9, 0.0])
    sums = np.array([0.5, 0.6, 0.9, 0.7, 1.0, 0.6])
    table = HeadTable(3, sums, entropy, np.ones(6, int), np.zeros(6, bool))
    assert rank_heads(table, logic("paper"), tau=0.0) == [2, 3, 1, 5, 0, 4]


def test_ranking_does_not_move_with_float_noise():
    """Noise of 1e-13 on every entropy (far more than float64 arithmetic makes) never changes the
    ranking of heads with many exact and near ties."""
    rng = np.random.default_rng(5)
    n = 200
    entropy = rng.choice([0.0, math.log(2), math.log(3), 0.25, math.inf], size=n)
    sums = rng.choice([0.25, 0.5, 0.75, 1.0], size=n)
    table = HeadTable(8, sums, entropy, np.ones(n, int), np.zeros(n, bool))
    expected = rank_heads(table, logic("paper"), tau=0.0)
    for _ in range(20):
        noisy = HeadTable(8, sums, entropy + rng.uniform(-1e-13, 1e-13, n), table.n_components, table.bottom_row)
        assert rank_heads(noisy, logic("paper"), tau=0.0) == expected


# --- no head passes: the reference code's min_keep fallback --------------------------------------

def fallback_table():
    """Six heads (L=3, H=2), flat index = 2·layer + head, none passing selection_v1 at τ = 0.6:
       0 (L0H0) S 0.9 SE 0     layer 0                 3 (L1H1) S 0.5 SE inf  below τ, bottom row
       1 (L0H1) S 0.4 SE 0     layer 0, below τ         4 (L2H0) S 0.8 SE 0    bottom row
       2 (L1H0) S 0.9 SE 0     layer 1                  5 (L2H1) S 0.7 SE inf  no foreground"""
    return HeadTable(2, np.array([0.9, 0.4, 0.9, 0.5, 0.8, 0.7]),
                     np.array([0.0, 0.0, 0.0, math.inf, 0.0, math.inf]), np.ones(6, int),
                     np.array([False, False, False, True, True, False]))


def test_fallback_takes_heads_by_attention_sum_without_layer_tau_or_entropy_conditions():
    """selection_v1 keeps nothing here; the fallback is the min_keep heads by S (stable: equal S in
    (layer, head) order), skipping bottom-row heads at or above τ only — the reference measures
    bottom-row focus for those alone, so head 3 (below τ) is taken despite its last row."""
    cfg = logic("selection_v1")
    table = fallback_table()
    assert rank_heads(table, cfg, tau=0.6) == []
    assert fallback_heads(table, cfg, tau=0.6) == [0]
    assert fallback_heads(table, logic("selection_v1", **{"threshold.min_keep": 5}), tau=0.6) == [0, 2, 5, 3, 1]
    assert fallback_heads(table, logic("selection_v1", **{"filters.bottom_row": False,
                                                          "threshold.min_keep": 4}), tau=0.6) == [0, 2, 4, 5]
    assert fallback_heads(table, logic("selection_v1", **{"threshold.min_keep": 0}), tau=0.6) == []


def test_analyze_answers_with_the_fallback_only_when_nothing_passes():
    """A sample with no eligible head is answered by the fallback ("fallback": true); one eligible
    head is the whole answer, however large min_keep is."""
    nothing = analyze(planted_attention(), GRID, logic("selection_v1", **{"filters.min_layer": L}))
    assert nothing["fallback"] is True
    top = max(nothing["heads"], key=lambda h: h["attn_sum"])
    assert ranked_heads(nothing) == [(top["layer"], top["head"])] == [(0, 2)]      # EARLY's 0.95
    one = analyze(planted_attention(), GRID, logic("selection_v1", **{"filters.min_layer": 4,
                                                                     "threshold.min_keep": 5}))
    assert one["fallback"] is False and ranked_heads(one) == [(4, 2)]
    assert analyze(planted_attention(), GRID, logic("selection_v1"))["fallback"] is False


def test_analyze_of_float16_attention_matches_float32():
    """A float16 attention file gives the same (non-negative) entropies as its float32 copy."""
    attn = planted_attention().half()
    a16 = analyze(attn, GRID, logic("selection_v1"))
    a32 = analyze(attn.float(), GRID, logic("selection_v1"))
    se16 = [h["spatial_entropy"] for h in a16["heads"]]
    assert se16 == [h["spatial_entropy"] for h in a32["heads"]]
    assert all(se >= 0 for se in se16 if se is not None)


def test_grid_must_hold_all_visual_tokens():
    """A grid that does not multiply to V is an error (never inferred from sqrt(V))."""
    with pytest.raises(ValueError):
        analyze(planted_attention(), (7, 7), logic("paper"))


def test_analyze_records_are_strict_json():
    """Records carry layer/head/attn_sum/spatial_entropy/...; an infinite SE is written as null."""
    result = analyze(planted_attention(), GRID, logic("selection_v1"))
    text = json.dumps(result, allow_nan=False)              # raises on inf / nan
    heads = json.loads(text)["heads"]
    assert len(heads) == L * H
    assert [(h["layer"], h["head"]) for h in heads] == [(l, h) for l in range(L) for h in range(H)]
    assert any(h["spatial_entropy"] is None for h in heads)  # diffuse heads under method=mass
    assert set(heads[0]) == {"layer", "head", "attn_sum", "spatial_entropy", "bottom_row_focus",
                             "n_components"}
    assert heads[3 * H + 1]["attn_sum"] == pytest.approx(0.90, abs=1e-6)


# --- dataset-level selection ---------------------------------------------------------------------

def sample_attentions(n=10, seed=3):
    """n samples; each planted head localizes (compact blob at a random place, high S) in all but
    one sample; a distractor (4,3) localizes in two samples; every other head is diffuse."""
    rng = np.random.default_rng(seed)
    samples = []
    for s in range(n):
        maps = np.zeros((L, H) + GRID)
        for l in range(L):
            for h in range(H):
                maps[l, h] = diffuse(rng, rng.uniform(0.1, 0.3))
        for i, (l, h) in enumerate(PLANTED):
            if s != i:                                    # planted head i misses sample i
                maps[l, h] = blob(rng.uniform(0.6, 0.9), top=rng.integers(0, 4), left=rng.integers(0, 6))
        if s in (5, 6):
            maps[4, 3] = blob(0.8, top=1, left=2)
        samples.append(torch.tensor(maps.reshape(L, H, 1, -1)))
    return samples


@pytest.mark.parametrize("name", ["selection_v1", "paper"])
def test_select_heads_finds_the_planted_heads(name):
    """The k=3 most-voted heads are the planted ones, each voted in 9 of the 10 samples."""
    cfg = logic(name)
    tables = [measure_heads(attn, GRID, cfg) for attn in sample_attentions()]
    result = select_heads(tables, cfg)
    assert result["k"] == 3 and result["n_samples"] == 10
    assert result["tau_scope"] == cfg.threshold.scope
    assert sorted(map(tuple, result["heads"])) == sorted(PLANTED)
    # selection_v1: a diffuse head has SE = inf under method=mass, so a planted head gets no vote
    # in the sample it misses; paper (size entropy, 10 votes) may still give it one there.
    planted_counts = [c["count"] for c in result["counts"][:3]]
    if name == "selection_v1":
        assert planted_counts == [9, 9, 9]
    assert min(planted_counts) >= 9
    assert all(c["count"] < min(planted_counts) for c in result["counts"][3:])
    assert [c["frequency"] for c in result["counts"]] == [c["count"] / 10 for c in result["counts"]]
    json.dumps(result, allow_nan=False)


# Three samples × four heads (L=2, H=2; flat index = 2·layer + head), grid 3×3, logic=paper
# (size entropy, τ from the averaged sums, min_keep 1, no filters). Each head's map is a few
# equal cells, so its sum S and its size entropy are read off directly:
#   one cell → SE 0;  two separate cells → ln 2;  three separate cells → ln 3.
ONE, TWO, THREE = [(1, 1)], [(0, 0), (2, 2)], [(0, 0), (0, 2), (2, 1)]
TINY = [  # per sample: (S, cells) for heads h0=(0,0), h1=(0,1), h2=(1,0), h3=(1,1)
    [(1.00, TWO), (0.75, ONE), (0.75, THREE), (0.25, ONE)],
    [(0.25, ONE), (1.00, TWO), (1.00, ONE), (0.25, ONE)],
    [(0.75, ONE), (1.00, ONE), (0.25, ONE), (0.50, ONE)],
]


def tiny_tables():
    tables = []
    for sample in TINY:
        maps = np.stack([grid_map(3, 3, cells, s / len(cells)) for s, cells in sample])
        attn = torch.tensor(maps.reshape(2, 2, 1, 9), dtype=torch.float64)
        tables.append(measure_heads(attn, (3, 3), logic("paper")))
    return tables


def test_select_heads_tiny_set_by_hand():
    """Votes, τ and frequencies of a 3-sample set, worked out by hand."""
    # Averaged S: h0 2/3, h1 11/12, h2 2/3, h3 1/3 → sorted [1/3, 2/3, 2/3, 11/12];
    # chord slope (11/12 − 1/3)/3 = 7/36: |y − chord| at x=1: 24/36 − 19/36 = 5/36,
    # at x=2: |24/36 − 26/36| = 2/36 → elbow x=1, τ = 2/3.
    # Passing (S ≥ 2/3): s0 {h0 ln2, h1 0, h2 ln3}; s1 {h1 ln2, h2 0}; s2 {h0 0, h1 0}
    # (h3 is concentrated everywhere but never reaches τ; nor do s1 h0, s2 h2).
    # per_sample=1: s0 → h1, s1 → h2, s2 → h1 (SE tie, S 1.0 > 0.75) ⇒ h1: 2, h2: 1.
    result = select_heads(tiny_tables(), logic("paper", **{"select.per_sample": 1, "select.k": 2}))
    assert result["tau"] == pytest.approx(2 / 3)
    assert result["heads"] == [[0, 1], [1, 0]]
    assert result["counts"] == [
        {"layer": 0, "head": 1, "count": 2, "frequency": pytest.approx(2 / 3)},
        {"layer": 1, "head": 0, "count": 1, "frequency": pytest.approx(1 / 3)},
    ]
    # per_sample=2: s0 → h1, h0 (ln2 < ln3); s1 → h2, h1; s2 → h1, h0 ⇒ h1 3, h0 2, h2 1.
    result = select_heads(tiny_tables(), logic("paper", **{"select.per_sample": 2, "select.k": 2}))
    assert [(c["layer"], c["head"], c["count"]) for c in result["counts"]] == [(0, 1, 3), (0, 0, 2), (1, 0, 1)]
    assert [c["frequency"] for c in result["counts"]] == pytest.approx([1, 2 / 3, 1 / 3])
    assert result["heads"] == [[0, 1], [0, 0]]


def test_select_heads_sample_scope_uses_each_samples_tau():
    """scope=sample: τ per sample (reference code), reported as None."""
    # Per-sample elbows (chord slope .25 in each):
    #   s0 sorted [.25,.75,.75,1]: |y − chord| = .25 at x=1, 0 at x=2 → τ .75 → h0, h1, h2 pass;
    #   s1 sorted [.25,.25,1,1]: .25 at x=1 and at x=2 (first wins) → τ .25 → all pass;
    #   s2 sorted [.25,.5,.75,1]: on the chord, all distances 0 → τ .25 → all pass.
    # per_sample=1: s0 → h1 (the only SE 0); s1 → SE 0 for h0, h2, h3, largest S h2 (1.0) — also
    # the winner had τ been 1; s2 → all SE 0, largest S h1 ⇒ h1: 2, h2: 1.
    result = select_heads(tiny_tables(), logic("paper", **{"threshold.scope": "sample",
                                                          "select.per_sample": 1, "select.k": 2}))
    assert result["tau"] is None and result["tau_scope"] == "sample"
    assert [(c["layer"], c["head"], c["count"]) for c in result["counts"]] == [(0, 1, 2), (1, 0, 1)]


def test_samples_where_no_head_passes_cast_no_votes():
    """The fallback answers one sample; it is not evidence of localization, so it gets no vote."""
    cfg = logic("selection_v1", **{"select.per_sample": 5})
    assert rank_heads(fallback_table(), cfg) == []
    result = select_heads([fallback_table(), fallback_table()], cfg)
    assert result["counts"] == [] and result["heads"] == []


def test_select_heads_refuses_empty_set_and_unknown_scope():
    with pytest.raises(ValueError):
        select_heads([], logic("paper"))
    with pytest.raises(ValueError):
        select_heads(tiny_tables(), logic("paper", **{"threshold.scope": "bogus"}))
