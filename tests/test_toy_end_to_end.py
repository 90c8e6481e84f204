"""The paper's protocol end to end on the bundled toy model, whose localization heads are known:
calibrate on one generated set (batch → select), test on another with the heads fixed (batch →
evaluate), and compare with the baselines and with what the model card reports."""
from __future__ import annotations

import json
import math

import pytest

from lab import toy_report

CARD = toy_report.MODEL_DIR / "results.json"
pytestmark = pytest.mark.skipif(not CARD.is_file(), reason="the toy model's results.json is not committed yet")


@pytest.fixture(scope="module")
def toy():
    return toy_report.Toy()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="module")
def report(toy, out):
    return toy_report.measure(calib_scenes=120, test_scenes=60, out=out, toy=toy, thresholds=("half_max",), answer=False)


def card() -> dict:
    return json.loads(CARD.read_text())


def test_paper_selection_finds_the_designated_heads(report):
    """Voting over the calibration set (logic=paper) returns exactly the heads the model was trained to have."""
    assert sorted(map(tuple, report["logics"]["paper"]["selected_heads"])) == sorted(map(tuple, report["designated_heads"]))


def test_reference_rules_find_them_too(report):
    """The reference code's rules (selection_v1: bottom-row and early-layer filters, per-sample tau,
    mass-weighted entropy, top-5 votes) vote for the same three heads."""
    assert sorted(map(tuple, report["logics"]["selection_v1"]["selected_heads"])) == sorted(map(tuple, report["designated_heads"]))


def test_accuracy_matches_the_model_card_and_beats_every_baseline(report):
    n = report["test"]["expressions"]
    measured = report["logics"]["paper"]["half_max"]["acc@0.5"]
    reported = card()["logics"]["paper"]["half_max"]["acc@0.5"]
    noise = 3 * math.sqrt(reported * (1 - reported) / n)    # three binomial standard errors
    assert measured >= reported - noise, f"Acc@0.5 {measured:.3f} on {n}, card says {reported:.3f}"
    baselines = report["baselines"]["half_max"]
    for name, result in baselines.items():
        if name.startswith("oracle") or name == "single heads":
            continue
        assert measured > result["acc@0.5"], f"{name}: {result['acc@0.5']:.3f} ≥ {measured:.3f}"
    assert report["logics"]["paper"]["half_max"]["missing"] == 0


def test_attribute_and_relational_expressions_each_match_the_model_card(report):
    """The card splits Acc@0.5 by expression kind; a fresh set agrees within sampling noise in each."""
    reported = card()["logics"]["paper"]["half_max"]["by_expression"]
    for kind, measured in report["logics"]["paper"]["half_max"]["by_expression"].items():
        p, n = reported[kind]["acc@0.5"], measured["n"]
        noise = 3 * math.sqrt(max(p * (1 - p), 1 / reported[kind]["n"]) / n)  # a card at 1.000 is not proof of 1.0
        assert measured["acc@0.5"] >= p - noise, f"{kind}: {measured['acc@0.5']:.3f} on {n}, card says {p:.3f}"
