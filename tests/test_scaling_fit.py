"""The scaling-law fits recover a known law: runs generated from L(N, D) = E + A / N^alpha + B / D^beta
(Hoffmann et al. 2022's fitted constants) at known compute budgets, with and without noise."""
import math

import numpy as np
import pytest

from tasks import scaling_fit as sf

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE, B_TRUE = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # N_opt ~ C^a, D_opt ~ C^b under C = 6ND
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def law(n, d):
    return E + A / np.asarray(n) ** ALPHA + B / np.asarray(d) ** BETA


def n_opt(c):
    """The true compute-optimal N at budget c (C = 6ND): the minimum of L(N, C / 6N)."""
    return (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (c / 6) ** A_TRUE


def runs(noise=0.0, seed=0, budgets=BUDGETS, spread=8.0, per_budget=7, centre=1.0):
    """An iso-FLOP grid: `per_budget` sizes from N_opt / spread to N_opt * spread at each budget
    (shifted by `centre`), D = C / 6N, losses times lognormal noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for n in n_opt(c) * centre * np.geomspace(1 / spread, spread, per_budget):
            d = c / (6 * n)
            rows.append((c, n, d, float(law(n, d)) * math.exp(rng.normal(0, noise))))
    return tuple(np.array(col) for col in zip(*rows))


def test_the_vertex_of_an_exact_parabola_is_found():
    x = np.log(np.geomspace(1e4, 1e6, 5))
    loss = 3.0 + 0.2 * (x - math.log(7e4)) ** 2
    m = sf.isoflop_minimum(1e15, np.exp(x), 1e15 / (6 * np.exp(x)), loss)
    assert m.n_opt == pytest.approx(7e4, rel=1e-9) and m.loss_opt == pytest.approx(3.0)
    assert m.curvature == pytest.approx(0.2) and m.interior
    # D at fixed C falls as N grows: the minimum's D is the budget's D at that N.
    assert m.d_opt == pytest.approx(1e15 / (6 * 7e4), rel=1e-6)


def test_the_frontier_recovers_the_exponents_of_a_known_law():
    c, n, d, loss = runs()
    f = sf.fit_frontier(c, n, d, loss)
    # A parabola is not the exact shape of L along an iso-FLOP line; the vertex is off by the same
    # factor at every budget, so the exponents stay close.
    assert f.a == pytest.approx(A_TRUE, abs=0.01) and f.b == pytest.approx(B_TRUE, abs=0.01)
    assert f.a + f.b == pytest.approx(1.0, abs=1e-6)  # C = 6ND exactly here
    for m in f.minima:
        assert m.n_opt == pytest.approx(n_opt(m.budget), rel=0.15)


def test_frontier_intervals_contain_the_truth_across_noisy_studies():
    covered, widths = 0, []
    for seed in range(12):
        c, n, d, loss = runs(noise=0.01, seed=seed)
        ci = sf.bootstrap_frontier(c, n, d, loss, n_boot=100, seed=seed)
        covered += ci["a"].low <= A_TRUE <= ci["a"].high and ci["b"].low <= B_TRUE <= ci["b"].high
        widths.append(ci["a"].high - ci["a"].low)
        assert ci["a"].n_ok >= 90
    assert covered >= 10, covered
    assert np.median(widths) < 0.2  # an interval, not the whole line


def test_a_budget_whose_minimum_lies_outside_its_sizes_is_left_out_and_said_so():
    c, n, d, loss = runs()
    last = c == BUDGETS[-1]
    shifted = runs(budgets=BUDGETS[-1:], centre=20.0)  # every size far above that budget's optimum
    c, n, d, loss = (np.concatenate([x[~last], y]) for x, y in zip((c, n, d, loss), shifted))
    f = sf.fit_frontier(c, n, d, loss)
    assert [m.budget for m in f.minima] == list(BUDGETS[:-1])
    assert "outside the sizes trained" in f.skipped[BUDGETS[-1]]
    everything = sf.fit_frontier(c, n, d, loss, require_interior=False)
    assert len(everything.minima) == len(BUDGETS) and not everything.minima[-1].interior


def test_too_few_sizes_or_no_minimum_is_a_clear_error():
    with pytest.raises(sf.FitError, match="2 distinct model sizes; a parabola needs 3"):
        sf.isoflop_minimum(1e15, [1e4, 1e4, 2e4], [1, 2, 3], [3.0, 2.9, 2.8])
    with pytest.raises(sf.FitError, match="has no minimum"):
        sf.isoflop_minimum(1e15, [1e4, 2e4, 4e4], [1, 2, 3], [3.0, 3.2, 3.0])
    c, n, d, loss = runs(budgets=BUDGETS[:1])
    with pytest.raises(sf.FitError, match="at 2 or more budgets, got 1"):
        sf.fit_frontier(c, n, d, loss)
    with pytest.raises(sf.FitError, match="at least 5 runs"):
        sf.fit_parametric(n[:4], d[:4], loss[:4])


def test_the_parametric_fit_recovers_a_known_law_without_noise():
    c, n, d, loss = runs(per_budget=5)
    p = sf.fit_parametric(n, d, loss, top_k=16)
    assert p.alpha == pytest.approx(ALPHA, abs=0.01) and p.beta == pytest.approx(BETA, abs=0.01)
    assert p.E == pytest.approx(E, rel=0.02) and not p.at_bound
    assert p.a == pytest.approx(A_TRUE, abs=0.01)
    assert np.max(np.abs(p(n, d) / loss - 1)) < 1e-3


def test_parametric_intervals_contain_the_truth_and_extrapolation_is_close_with_noise():
    c, n, d, loss = runs(noise=0.01, seed=3, per_budget=5)
    p = sf.fit_parametric(n, d, loss, top_k=8)
    ci = sf.bootstrap_parametric(n, d, loss, n_boot=40, seed=0, point=p, top_k=2)
    truth = {"alpha": ALPHA, "beta": BETA, "E": E, "a": A_TRUE, "b": B_TRUE}
    for k, v in truth.items():
        assert ci[k].low <= v <= ci[k].high, (k, ci[k])
        assert ci[k].low <= ci[k].estimate <= ci[k].high
    assert ci["alpha"].high - ci["alpha"].low < 0.2

    ex = sf.extrapolation_check(n, d, c, loss, n_boot=20, top_k=8)
    assert ex.index == int(np.argmax(np.where(c == c.max(), n, 0)))  # the largest N at the largest budget
    assert ex.fit.n_runs == len(n) - 1
    assert abs(ex.relative_error) < 0.03, ex.relative_error  # 1% noise on each loss
    assert ex.interval.low < ex.predicted < ex.interval.high
    # Without noise the law predicts the held-out run almost exactly.
    c0, n0, d0, loss0 = runs(per_budget=5)
    assert abs(sf.extrapolation_check(n0, d0, c0, loss0, top_k=8).relative_error) < 2e-3


def test_the_held_out_run_is_the_largest_model_at_the_largest_budget_not_the_most_flops():
    # Real runs stop at a whole step: the largest model can use slightly fewer FLOPs than a smaller one.
    n = np.array([1e4, 1e5, 1e6, 1e4, 1e5, 1e6])
    budget = np.array([1e12, 1e12, 1e12, 1e13, 1e13, 1e13])
    assert sf.largest_run(n, budget) == 5
    assert sf.largest_run(n[:5], budget[:5]) == 4  # the largest model failed at the largest budget


def test_fit_study_gives_every_part_or_its_reason():
    c, n, d, loss = runs(noise=0.005, seed=1, budgets=BUDGETS[:3], per_budget=5)
    out = sf.fit_study(c, n, d, loss, n_boot=10, top_k=4)
    assert out["frontier"]["a"]["low"] <= out["frontier"]["a"]["estimate"] <= out["frontier"]["a"]["high"]
    assert len(out["parametric"]["predicted"]) == len(n) and out["parametric"]["intervals"]["alpha"]["n_boot"] == 10
    assert abs(out["extrapolation"]["relative_error"]) < 0.05
    few = sf.fit_study(c[:4], n[:4], d[:4], loss[:4], n_boot=5)
    assert "3" in few["frontier"]["error"] or "budgets" in few["frontier"]["error"]
    assert "at least 5 runs" in few["parametric"]["error"] and "at least 6 runs" in few["extrapolation"]["error"]
    none = sf.fit_study(c, n, d, loss, n_boot=0, top_k=4)
    assert math.isnan(none["frontier"]["a"]["low"]) and none["frontier"]["a"]["estimate"] == out["frontier"]["a"]["estimate"]


def test_a_window_fits_the_parabola_around_the_best_run_only():
    # Flat on the small side, a cliff on the large one: a parabola through all of it puts the
    # vertex far from where the losses are lowest; through the 3 sizes around the best, it does not.
    n = np.array([1e3, 2e3, 4e3, 8e3, 16e3, 32e3])
    loss = np.array([4.84, 4.68, 4.60, 4.70, 5.56, 6.15])
    d = 1e12 / (6 * n)
    assert list(sf.around_best(n, loss, 3)) == [1, 2, 3] and list(sf.around_best(n, loss, 0)) == list(range(6))
    assert list(sf.around_best(n, [1.0, 2, 3, 4, 5, 6], 4)) == [0, 1, 2, 3]  # shifted inwards at the edge
    whole, near = sf.isoflop_minimum(1e12, n, d, loss), sf.isoflop_minimum(1e12, n, d, loss, window=3)
    assert 2e3 < near.n_opt < 8e3 and near.interior and near.n_runs == 3
    assert abs(np.log(whole.n_opt / 4e3)) > abs(np.log(near.n_opt / 4e3))
    # D still comes from every run of the budget: the window picks the parabola's points only.
    assert near.d_opt == pytest.approx(1e12 / (6 * near.n_opt), rel=1e-9)
    with pytest.raises(sf.FitError, match="a parabola needs 3"):
        sf.isoflop_minimum(1e12, n[:2], d[:2], loss[:2], window=3)
