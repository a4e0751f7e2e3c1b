"""Eval error bars and verdicts (stages/stats.py) against textbook values and the cases a report relies on."""
from __future__ import annotations

import random

import pytest

from stages import stats


@pytest.mark.parametrize("k, n, low, high", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                                             (81, 263, 0.2553, 0.3662)])
def test_wilson_interval_matches_the_published_values(k, n, low, high):
    assert stats.wilson(k, n) == pytest.approx((low, high), abs=1e-4)


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    base, adapter = [1] * 20 + [0] * 10, [1] * 20 + [1] * 10      # 10 items only the adapter gets right
    assert stats.mcnemar_p(base, adapter) == pytest.approx(2 / 2 ** 10)
    base, adapter = [1, 0] * 10, [0, 1] * 10                         # 10 each way: no evidence
    assert stats.mcnemar_p(base, adapter) == 1.0
    assert stats.mcnemar_p([1, 1], [1, 1]) == 1.0


def test_a_clear_gain_is_better_and_its_intervals_separate():
    rng = random.Random(1)
    base = [float(rng.random() < 0.2) for _ in range(300)]
    adapter = [float(rng.random() < 0.7) for _ in range(300)]
    c = stats.compare(base, adapter, higher_is_better=True)
    assert c["verdict"] == stats.BETTER and c["test"] == "mcnemar" and c["p"] < 1e-6 and stats.separated(c)
    assert c["adapter"]["n"] == 300 and c["adapter"]["low"] < c["adapter"]["value"] < c["adapter"]["high"]


def test_twelve_examples_cannot_tell_20_from_13_percent():
    """The default run's old eval: 20 % -> 13 % on a dozen items is no evidence either way."""
    base = [1.0] * 3 + [0.0] * 12
    adapter = [1.0] * 2 + [0.0] * 13
    c = stats.compare(base, adapter, higher_is_better=True)
    assert c["verdict"] == stats.SAME and not stats.separated(c)


def test_lower_is_better_errors_use_a_paired_permutation_test_and_bootstrap_bars():
    rng = random.Random(2)
    base = [float(rng.randint(0, 8)) for _ in range(250)]            # NEWS2 absolute errors
    adapter = [max(0.0, b - rng.randint(0, 3)) for b in base]
    c = stats.compare(base, adapter, higher_is_better=False)
    assert c["test"] == "permutation" and c["verdict"] == stats.BETTER and c["diff"] < 0
    assert c["base"]["low"] < c["base"]["value"] < c["base"]["high"]
    worse = stats.compare(adapter, base, higher_is_better=False)
    assert worse["verdict"] == stats.WORSE
    assert stats.compare(base, base, higher_is_better=False)["verdict"] == stats.SAME


def test_the_same_scores_give_the_same_report():
    rng = random.Random(3)
    base = [rng.random() * 5 for _ in range(200)]
    adapter = [b + rng.gauss(0, 1) for b in base]
    assert stats.compare(base, adapter, False) == stats.compare(list(base), list(adapter), False)


def test_unpaired_lists_are_refused():
    with pytest.raises(ValueError, match="paired"):
        stats.compare([1.0, 0.0], [1.0], higher_is_better=True)


def test_errors_that_happen_to_be_0_or_1_are_still_errors():
    """The default run: one chart where both models stated a score, the adapter off by 1: an absolute error of 1
    is not "one item right", so no Wilson bounds (which once read 0.21–1 around it) and no McNemar."""
    c = stats.compare([2.0], [1.0], higher_is_better=False, rate=False)
    assert c["test"] == "permutation"
    assert (c["adapter"]["value"], c["adapter"]["low"], c["adapter"]["high"]) == (1.0, 1.0, 1.0)
    errors = stats.compare([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], higher_is_better=False, rate=False)
    assert errors["test"] == "permutation" and errors["adapter"]["low"] <= 0.25 <= errors["adapter"]["high"]
    as_error, as_rate = stats.estimate([1.0, 0.0, 0.0, 0.0], rate=False), stats.estimate([1.0, 0.0, 0.0, 0.0])
    assert (as_error["low"], as_error["high"]) == stats.bootstrap_mean([1.0, 0.0, 0.0, 0.0])
    assert (as_rate["low"], as_rate["high"]) == stats.wilson(1, 4) != stats.bootstrap_mean([1.0, 0.0, 0.0, 0.0])


def test_eval_calls_only_its_rates_rates():
    from stages import evaluate

    mae = evaluate.paired_stats([{"aggregate_mae": 2.0}], [{"aggregate_mae": 1.0}])["aggregate_mae"]
    assert mae["test"] == "permutation" and mae["adapter"]["low"] == mae["adapter"]["high"] == 1.0
    band = evaluate.paired_stats([{"band_accuracy": 0.0}] * 5, [{"band_accuracy": 1.0}] * 5)["band_accuracy"]
    assert band["test"] == "mcnemar" and band["adapter"]["low"] > 0.5


def test_only_drops_beyond_noise_are_regressions():
    ppl = {"task": "all", "metric": "ppl"}  # no paired test: it stands
    noise, worse = {"verdict": stats.SAME}, {"verdict": stats.WORSE}
    assert stats.beyond_noise([ppl, noise, worse, noise]) == ([ppl, worse], 2)
    assert stats.beyond_noise([]) == ([], 0)
