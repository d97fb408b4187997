"""Seed statistics for the comparison report: intervals, paired tests, and rankings that admit ties."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval (nan for fewer than two values)."""
    a = np.asarray(values, dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (mean, half-width) intervals overlap; an unknown width counts as overlapping."""
    if math.isnan(a[1]) or math.isnan(b[1]):
        return True
    return abs(a[0] - b[0]) <= a[1] + b[1]


@dataclass
class PairTest:
    a: str
    b: str
    diff: float  # mean of a - b over the seeds both have
    p_value: float  # nan when it cannot be tested (fewer than 2 paired seeds, or no variation)
    n: int
    significant: bool
    p_adjusted: float = float("nan")  # Holm-adjusted over the family of comparisons it was tested in


def paired_test(a: dict[int, float], b: dict[int, float], name_a: str, name_b: str, alpha: float) -> PairTest:
    """Paired t-test over the seeds both variants ran: a seed fixes the head's initialisation and the
    order of the fine-tuning data, so the same seed makes the two runs a pair."""
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    diff = float((x - y).mean()) if seeds else float("nan")
    if len(seeds) < 2 or np.allclose(x - y, (x - y)[0]):
        # Constant differences have no variance: a t-test is undefined; report it untested.
        return PairTest(name_a, name_b, diff, float("nan"), len(seeds), False)
    p = float(stats.ttest_rel(x, y).pvalue)
    return PairTest(name_a, name_b, diff, p, len(seeds), p < alpha, p)


def pairwise(scores: dict[str, dict[int, float]], alpha: float = 0.05) -> list[PairTest]:
    """Every pair of variants, Holm-corrected so that many comparisons do not manufacture a winner."""
    tests = [paired_test(scores[a], scores[b], a, b, alpha) for a, b in combinations(scores, 2)]
    testable = sorted((t for t in tests if not math.isnan(t.p_value)), key=lambda t: t.p_value)
    m, running = len(testable), 0.0
    for i, t in enumerate(testable):
        # Holm's step-down adjusted p-values are monotone: a hypothesis after one that is kept is kept too.
        running = max(running, min(1.0, t.p_value * (m - i)))
        t.p_adjusted = running
        t.significant = running < alpha
    return tests


def ranking(means: dict[str, tuple[float, float]], tests: list[PairTest]) -> list[dict]:
    """Variants by mean, best first, each with the variants it is not separable from.

    Two variants are separable only if the paired test says so and their intervals do not overlap
    (overlapping intervals are never ranked silently)."""
    separable = {frozenset((t.a, t.b)) for t in tests if t.significant}
    order = sorted(means, key=lambda k: -means[k][0] if not math.isnan(means[k][0]) else math.inf)
    out = []
    for rank, name in enumerate(order, 1):
        ties = [o for o in order if o != name and (frozenset((name, o)) not in separable
                                                   or intervals_overlap(means[name], means[o]))]
        out.append({"rank": rank, "variant": name, "mean": means[name][0], "ci95": means[name][1], "ties": ties})
    return out
