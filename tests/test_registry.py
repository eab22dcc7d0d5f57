"""The champion policy, as a pure function: strictly better by at least min_improvement, or challenger."""

from __future__ import annotations

import pytest

from tasks.tracking.registry import Champion, Floor, decide_promotion


def decide(value: float, champion: Champion | None, metric: str = "test/acc", min_improvement: float = 0.0):
    return decide_promotion("quickstart", "3", metric, value, champion, min_improvement)


def test_the_first_version_becomes_champion():
    promotion = decide(0.9, None)
    assert promotion.aliases == {"champion": "3"}
    assert promotion.decision == "version 3 is the champion of quickstart (test/acc 0.9000; there was none)"


def test_a_champion_set_by_hand_without_the_metric_is_replaced():
    promotion = decide(0.5, Champion("1", None))
    assert promotion.aliases == {"champion": "3"} and "version 1 had no test/acc" in promotion.decision


def test_a_strictly_better_version_becomes_champion_and_the_old_one_previous_champion():
    promotion = decide(0.95, Champion("2", 0.9))
    assert promotion.aliases == {"previous-champion": "2", "champion": "3"}
    assert promotion.decision == ("version 3 is the new champion of quickstart: test/acc 0.9500 against champion "
                                  "version 2's 0.9000 (min_improvement 0.0)")


@pytest.mark.parametrize("value, min_improvement", [(0.9, 0.0), (0.85, 0.0), (0.905, 0.01)])
def test_an_equal_worse_or_not_enough_better_version_stays_challenger(value, min_improvement):
    promotion = decide(value, Champion("2", 0.9), min_improvement=min_improvement)
    assert promotion.aliases == {"challenger": "3"} and "stays challenger" in promotion.decision


def test_for_a_loss_lower_is_better():
    assert decide(0.2, Champion("2", 0.3), metric="test/loss").aliases["champion"] == "3"
    assert decide(0.4, Champion("2", 0.3), metric="test/loss").aliases == {"challenger": "3"}


@pytest.mark.parametrize("value, metric, floor", [(0.1, "test/acc", 0.1), (0.05, "test/acc", 0.1), (2.4, "test/loss", 2.3026)])
def test_a_version_no_better_than_chance_gets_no_alias_even_without_a_champion(value, metric, floor):
    promotion = decide_promotion("tiny", "1", metric, value, None, 0.0, Floor(floor, "chance"))
    assert promotion.aliases == {} and f"is not promoted: {metric} {value:.4f}" in promotion.decision
    assert f"no better than {floor:.4f} (chance)" in promotion.decision


def test_a_metric_that_is_not_finite_gets_no_alias():
    promotion = decide_promotion("tiny", "2", "test/loss", float("nan"), Champion("1", 0.3), 0.0)
    assert promotion.aliases == {} and "not finite" in promotion.decision


def test_above_the_floor_the_usual_rule_applies():
    assert decide(0.95, Champion("2", 0.9), min_improvement=0.0).aliases["champion"] == "3"
    assert decide_promotion("q", "3", "test/acc", 0.2, None, 0.0, Floor(0.1, "chance")).aliases == {"champion": "3"}
