"""Error bars and paired verdicts for eval metrics: does the adapter do better than the base on the same items?

Pure (math + numpy), deterministic (fixed seeds): the same scores give the same report on every machine.
- a rate of right/wrong items (per-example 0/1): Wilson score interval, which stays inside [0, 1] and honest at
  small n or near 0 %/100 %;
- a mean of anything else (NEWS2 absolute error, the share of a chart's parameters right): percentile bootstrap;
- adapter vs base on the same items: exact McNemar (binomial on the discordant pairs) for right/wrong scores, a
  paired sign-flip permutation test on the differences otherwise.
The verdict is "better" / "worse" only at p < ALPHA. Whether a metric is a rate is the caller's word (`rate`), not
read off the values: absolute errors that happen to be all 0 or 1 are still errors (Wilson bounds on them would be
nonsense).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 %
ALPHA = 0.05
RESAMPLES = 4000
SEED = 20261205
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"


def paired_test(entry: dict | None, metric: str) -> dict:
    """The paired test eval.json keeps for one metric of a task's entry ({"stats": {metric: {"base", "adapter",
    "verdict", "p"}}}, `compare`'s output): its estimates are the figures to show, each with its interval and the n of
    the items both models were scored on. {} where there is none (perplexity, an older eval.json)."""
    return ((entry or {}).get("stats") or {}).get(metric) or {}


def task_entry(report: dict, split: str, task: str) -> dict:
    """eval.json's entry for one task on one test split ({} where there is none)."""
    return (((report.get("matrix") or {}).get(split) or {}).get("metrics") or {}).get(task) or {}


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 or n successes the bound is exactly 0 or 1 (the formula leaves a rounding residue there)
    return (0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half))


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(low), float(high))


def estimate(values: Sequence[float], rate: bool = True) -> dict[str, float]:
    """{"value", "low", "high", "n"}: the mean with its 95 % interval (Wilson for a rate of right/wrong items)."""
    n = len(values)
    value = sum(values) / n if n else math.nan
    low, high = wilson(sum(values), n) if rate and is_binary(values) else bootstrap_mean(values)
    return {"value": value, "low": low, "high": high, "n": n}


def mcnemar_p(base: Sequence[float], adapter: Sequence[float]) -> float:
    """Exact two-sided McNemar: among the items where exactly one model is right, is the split 50/50?"""
    b = sum(1 for x, y in zip(base, adapter) if x > y)  # base right, adapter wrong
    c = sum(1 for x, y in zip(base, adapter) if y > x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def permutation_p(base: Sequence[float], adapter: Sequence[float], resamples: int = RESAMPLES,
                  seed: int = SEED) -> float:
    """Paired sign-flip test on the mean difference (two-sided), with the observed assignment counted."""
    diff = np.asarray(adapter, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if diff.size == 0 or not diff.any():
        return 1.0
    observed = abs(diff.mean())
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(resamples, diff.size))
    extreme = int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (resamples + 1)


def compare(base: Sequence[float], adapter: Sequence[float], higher_is_better: bool, rate: bool = True) -> dict:
    """Adapter vs base on the same items (pairs in order): both estimates, the difference, p and the verdict.
    `rate`: the scores are shares of items right (not errors or other means)."""
    if len(base) != len(adapter):
        raise ValueError(f"paired scores differ in length: base {len(base)}, adapter {len(adapter)}")
    binary = rate and is_binary(base) and is_binary(adapter)
    p = mcnemar_p(base, adapter) if binary else permutation_p(base, adapter)
    diff = (sum(adapter) - sum(base)) / len(base) if base else 0.0
    verdict = SAME
    if p < ALPHA and diff:
        verdict = BETTER if (diff > 0) == higher_is_better else WORSE
    return {"base": estimate(base, rate), "adapter": estimate(adapter, rate), "diff": diff, "p": p,
            "test": "mcnemar" if binary else "permutation", "verdict": verdict}


def separated(comparison: dict) -> bool:
    """The stricter reading: the two 95 % intervals do not overlap."""
    a, b = comparison["adapter"], comparison["base"]
    return a["low"] > b["high"] or b["low"] > a["high"]


def beyond_noise(found: list[dict]) -> tuple[list[dict], int]:
    """Of figures where the adapter does worse (each with its comparison's "verdict", if it had a test), those that
    are more than noise — the test says WORSE, or there was no test (perplexity; an older eval.json) — and how
    many more the test finds within noise."""
    kept = [r for r in found if r.get("verdict") in (None, WORSE)]
    return kept, len(found) - len(kept)
