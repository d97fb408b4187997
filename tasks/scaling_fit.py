"""Scaling-law fits on (N, D, C, loss) runs: numpy / scipy only, no Prefect, MLflow or torch.

N is the non-embedding parameter count (the models' own `Transformer.num_params(non_embedding=True)`
definition: token and learned position embeddings excluded, as in Kaplan et al. 2020), D the
training tokens, C the training FLOPs the trainer counted, loss the final held-out loss in nats.

- `isoflop_minima`: Hoffmann et al. 2022, approach 2. Per compute budget, a parabola in log N
  through the final losses (all of them, or those of the few sizes around the best run: a profile
  that is flat on one side and steep on the other is no parabola over its whole range); its vertex
  is that budget's compute-optimal N (and D, read off the budget's own runs, which tie D to N at
  fixed C).
- `fit_power_law`: N_opt = k C^a and D_opt = k' C^b, least squares in log-log.
- `fit_parametric`: approach 3, L(N, D) = E + A / N^alpha + B / D^beta, fitted in log space
  (log L_hat = LSE(a - alpha log N, b - beta log D, e)) by minimising a Huber loss (delta 1e-3) on
  the log residuals with L-BFGS-B from a grid of initialisations, the best optimum kept.
- `bootstrap_*`: percentile intervals from refits on runs resampled with replacement (fixed seed).
- `extrapolation_check`: fit without the largest run, predict its loss, relative error.
- `fit_study`: all of the above as plain data, a part the runs cannot support replaced by its reason.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

# The arrays here are a few dozen numbers: a second BLAS thread only waits, and on a machine whose
# cores are busy with training it waits for a long time (the fits ran 5x slower).
one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid was alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
# {0, 5, ..., 25}; this one is coarser (fewer starts, so that the bootstrap stays cheap) but spans
# the same region. Starting at exponent 0 is dropped: the gradient in a (or b) vanishes there.
INIT_GRID = {"alpha": (0.25, 0.75, 1.5), "beta": (0.25, 0.75, 1.5), "e": (-1.0, 0.0, 1.0),
             "a": (0.0, 5.0, 12.5, 25.0), "b": (0.0, 5.0, 12.5, 25.0)}
# Exponents outside this box mean the data cannot tell the terms apart, not a physical law.
BOUNDS = {"a": (-20.0, 60.0), "b": (-20.0, 60.0), "e": (-10.0, 5.0), "alpha": (0.0, 3.0), "beta": (0.0, 3.0)}
PARAM_ORDER = ("a", "b", "e", "alpha", "beta")


class FitError(ValueError):
    """Too few or degenerate runs for a fit; the message says what is missing."""


# ---------------------------------------------------------------- approach 2: iso-FLOP minima

@dataclass
class IsoflopMinimum:
    budget: float  # the nominal budget the runs were sized to
    n_opt: float
    d_opt: float
    loss_opt: float  # the parabola's value at its vertex
    curvature: float  # the x^2 coefficient of loss(log N); > 0 for a minimum
    n_runs: int
    interior: bool  # the vertex lies within the budget's sampled N (not extrapolated)


def around_best(n, loss, window: int) -> np.ndarray:
    """Indices of the runs of the `window` distinct sizes nearest (in order of N) the one with the lowest
    loss, shifted inwards at the ends; every run when `window` is 0 or covers them all."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    sizes = np.unique(n)
    if not window or window >= len(sizes):
        return np.arange(len(n))
    best = int(np.searchsorted(sizes, n[np.argmin(loss)]))
    start = min(max(0, best - window // 2), len(sizes) - window)
    return np.flatnonzero(np.isin(n, sizes[start:start + window]))


def isoflop_minimum(budget: float, n, d, loss, window: int = 0) -> IsoflopMinimum:
    """The vertex of loss = p0 + p1 log N + p2 (log N)^2 over one budget's runs; with `window`, over the
    runs of the `window` sizes around the best one only (`around_best`)."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    logd_all, x_all = np.log(d), np.log(n)
    near = around_best(n, loss, window)
    x, y = x_all[near], loss[near]
    if len(np.unique(x)) < 3:
        raise FitError(f"budget {budget:.3g}: {len(np.unique(x))} distinct model sizes; a parabola needs 3")
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        raise FitError(f"budget {budget:.3g}: loss against log N has no minimum (curvature {p2:.3g} <= 0); "
                       "add smaller or larger sizes around the optimum")
    x_opt = -p1 / (2 * p2)
    # At fixed C, D falls with N (D = C / FLOPs-per-token); log D is close to linear in log N.
    slope, intercept = np.polyfit(x_all, logd_all, 1)
    return IsoflopMinimum(budget=float(budget), n_opt=float(np.exp(x_opt)), d_opt=float(np.exp(intercept + slope * x_opt)),
                          loss_opt=float(p0 + p1 * x_opt + p2 * x_opt ** 2), curvature=float(p2), n_runs=len(x),
                          interior=bool(x.min() <= x_opt <= x.max()))


def isoflop_minima(budget, n, d, loss, require_interior: bool = True,
                   window: int = 0) -> tuple[list[IsoflopMinimum], dict[float, str]]:
    """One minimum per budget that has one; the budgets without, with the reason.

    With `require_interior` a vertex outside the budget's sampled sizes is left out: it is where a
    parabola through the edge of the curve extrapolates to, not an observed minimum.
    """
    budget, n, d, loss = (np.asarray(v, float) for v in (budget, n, d, loss))
    minima, skipped = [], {}
    for b in np.unique(budget):
        sel = budget == b
        try:
            m = isoflop_minimum(b, n[sel], d[sel], loss[sel], window)
        except FitError as exc:
            skipped[float(b)] = str(exc)
            continue
        if require_interior and not m.interior:
            skipped[float(b)] = (f"budget {b:.3g}: the parabola's vertex (N = {m.n_opt:.3g}) lies outside the sizes "
                                 f"trained ({n[sel].min():.3g} to {n[sel].max():.3g}); add sizes on that side")
            continue
        minima.append(m)
    return minima, skipped


@dataclass
class PowerLaw:
    k: float
    exponent: float

    def __call__(self, c):
        return self.k * np.asarray(c, float) ** self.exponent


def fit_power_law(c, y) -> PowerLaw:
    """y = k c^exponent by least squares on log y against log c."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    if len(np.unique(c)) < 2:
        raise FitError(f"a power law needs at least 2 distinct compute budgets, got {len(np.unique(c))}")
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(k=float(np.exp(intercept)), exponent=float(slope))


@dataclass
class Frontier:
    minima: list[IsoflopMinimum]
    skipped: dict[float, str]
    n_opt: PowerLaw  # N_opt = k C^a
    d_opt: PowerLaw  # D_opt = k' C^b

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent


@one_blas_thread
def fit_frontier(budget, n, d, loss, require_interior: bool = True, window: int = 0) -> Frontier:
    """Approach 2: iso-FLOP minima, then N_opt and D_opt as power laws of the budget."""
    minima, skipped = isoflop_minima(budget, n, d, loss, require_interior, window)
    if len(minima) < 2:
        reasons = "; ".join(skipped.values()) or "fewer than 2 budgets"
        raise FitError(f"the frontier needs iso-FLOP minima at 2 or more budgets, got {len(minima)} ({reasons})")
    c = [m.budget for m in minima]
    return Frontier(minima, skipped, fit_power_law(c, [m.n_opt for m in minima]), fit_power_law(c, [m.d_opt for m in minima]))


# ---------------------------------------------------------------- approach 3: L(N, D)

@dataclass
class Parametric:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the Huber loss at the optimum (summed over runs)
    n_runs: int = 0
    at_bound: list[str] = field(default_factory=list)  # parameters stuck at a bound: the data did not decide them

    def __call__(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """N_opt ~ C^a implied by the fit under C = 6ND: a = beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def as_dict(self) -> dict:
        return {**asdict(self), "a": self.a, "b": self.b}


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of each residual and its derivative."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return loss, grad


def _objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, delta: float):
    """The summed Huber loss of log L_hat - log L and its gradient in (a, b, e, alpha, beta).

    log L_hat is the log-sum-exp of the three terms, written out rather than through scipy.special:
    this runs some 10^5 times per study (starts x iterations x bootstrap replicates), and scipy's
    general version costs several times more on arrays this small.
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    loss, g = huber(top + np.log(total) - logl, delta)
    w *= g / total  # d log L_hat / d term (the softmax of the terms), times d huber / d log L_hat
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] @ logn), -(w[1] @ logd)])
    return float(loss.sum()), grad


def _starts(grid: dict) -> np.ndarray:
    return np.array(list(itertools.product(*(grid[k] for k in PARAM_ORDER))), float)


@one_blas_thread
def fit_parametric(n, d, loss, delta: float = HUBER_DELTA, grid: dict | None = None,
                   starts: np.ndarray | None = None, top_k: int | None = None) -> Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta by Huber-on-log-residuals, L-BFGS-B from each start.

    `starts` (rows of a, b, e, alpha, beta) replace the grid; `top_k` runs the optimiser only from
    the k starts with the lowest initial loss (the bootstrap's refits use that to stay cheap).
    """
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    if len(n) < 5:
        raise FitError(f"L(N, D) has 5 parameters; it needs at least 5 runs, got {len(n)}")
    if np.any(loss <= 0) or np.any(n <= 0) or np.any(d <= 0):
        raise FitError("N, D and the losses must all be positive")
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    x0s = starts if starts is not None else _starts(grid or INIT_GRID)
    if top_k is not None and top_k < len(x0s):
        first = np.array([_objective(x, logn, logd, logl, delta)[0] for x in x0s])
        x0s = x0s[np.argsort(first, kind="stable")[:top_k]]
    bounds = [BOUNDS[k] for k in PARAM_ORDER]
    best = None
    for x0 in x0s:
        res = minimize(_objective, x0, args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    at_bound = [k for k, v in zip(PARAM_ORDER, best.x) if k in ("alpha", "beta")
                and (abs(v - BOUNDS[k][0]) < 1e-6 or abs(v - BOUNDS[k][1]) < 1e-6)]
    return Parametric(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                      beta=float(beta), objective=float(best.fun), n_runs=len(n), at_bound=at_bound)


def theta(p: Parametric) -> np.ndarray:
    """A fit's parameters as an L-BFGS-B start (a, b, e, alpha, beta)."""
    return np.array([math.log(p.A), math.log(p.B), math.log(p.E), p.alpha, p.beta])


# ---------------------------------------------------------------- bootstrap

@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n_ok: int  # bootstrap replicates whose refit succeeded
    n_boot: int

    def as_dict(self) -> dict:
        return asdict(self)


def percentile_interval(estimate: float, samples, level: float = 0.95, n_boot: int | None = None) -> Interval:
    s = np.asarray([v for v in samples if np.isfinite(v)], float)
    if len(s) < 2:
        return Interval(float(estimate), math.nan, math.nan, len(s), n_boot or len(samples))
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(estimate), float(lo), float(hi), len(s), n_boot or len(samples))


def bootstrap_frontier(budget, n, d, loss, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                       require_interior: bool = True, window: int = 0) -> dict[str, Interval]:
    """Intervals of a and b: each budget's runs are resampled with replacement (so every iso-FLOP
    curve stays in every replicate) and the frontier refitted. Replicates whose resample leaves a
    budget with fewer than 3 distinct sizes or no minimum drop that budget, as the fit itself would."""
    budget, n, d, loss = (np.asarray(v, float) for v in (budget, n, d, loss))
    point = fit_frontier(budget, n, d, loss, require_interior, window)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(budget == b) for b in np.unique(budget)]
    a_s, b_s = [], []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        try:
            f = fit_frontier(budget[idx], n[idx], d[idx], loss[idx], require_interior, window)
        except FitError:
            a_s.append(math.nan)
            b_s.append(math.nan)
            continue
        a_s.append(f.a)
        b_s.append(f.b)
    return {"a": percentile_interval(point.a, a_s, level, n_boot), "b": percentile_interval(point.b, b_s, level, n_boot)}


PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b")


@one_blas_thread
def bootstrap_parametric(n, d, loss, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                         point: Parametric | None = None, top_k: int = 4) -> dict[str, Interval]:
    """Intervals of E, A, B, alpha, beta (and the implied a, b): runs resampled with replacement,
    each refit started from the full fit's optimum and the `top_k` best grid starts."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    point = point or fit_parametric(n, d, loss)
    rng = np.random.default_rng(seed)
    grid = _starts(INIT_GRID)
    samples: dict[str, list[float]] = {k: [] for k in PARAMETRIC_KEYS}
    for _ in range(n_boot):
        idx = rng.choice(len(n), size=len(n), replace=True)
        if len(np.unique(idx)) < 5:
            for k in samples:
                samples[k].append(math.nan)
            continue
        logn, logd, logl = np.log(n[idx]), np.log(d[idx]), np.log(loss[idx])
        first = np.array([_objective(x, logn, logd, logl, HUBER_DELTA)[0] for x in grid])
        starts = np.vstack([theta(point), grid[np.argsort(first, kind="stable")[:top_k]]])
        p = fit_parametric(n[idx], d[idx], loss[idx], starts=starts).as_dict()
        for k in samples:
            samples[k].append(p[k])
    full = point.as_dict()
    return {k: percentile_interval(full[k], samples[k], level, n_boot) for k in PARAMETRIC_KEYS}


# ---------------------------------------------------------------- extrapolation

@dataclass
class Extrapolation:
    index: int  # the held-out run (position in the inputs)
    n: float
    d: float
    budget: float
    actual: float
    predicted: float
    relative_error: float  # (predicted - actual) / actual
    fit: Parametric
    interval: Interval | None = None  # bootstrap interval of the prediction

    def as_dict(self) -> dict:
        out = asdict(self)
        out["fit"] = self.fit.as_dict()
        return out


def largest_run(n, budget) -> int:
    """The run with the most parameters at the largest budget: the one a study would most like to
    predict before paying for it. `budget` is each run's nominal budget: the FLOPs a run actually
    used differ from it by part of a step, and by those the largest need not be the largest model."""
    n, budget = np.asarray(n, float), np.asarray(budget, float)
    return int(np.lexsort((n, budget))[-1])


def extrapolation_check(n, d, budget, loss, n_boot: int = 0, seed: int = 0, level: float = 0.95,
                        top_k: int | None = None) -> Extrapolation:
    """Fit L(N, D) without the largest run, predict that run's loss, and give the relative error
    (with a bootstrap interval of the prediction when n_boot > 0)."""
    n, d, budget, loss = (np.asarray(v, float) for v in (n, d, budget, loss))
    i = largest_run(n, budget)
    keep = np.arange(len(n)) != i
    fit = fit_parametric(n[keep], d[keep], loss[keep], top_k=top_k)
    predicted = float(fit(n[i], d[i]))
    interval = None
    if n_boot:
        # Each replicate refits on the other runs resampled, started from the fit's optimum (one start:
        # the prediction's spread, not a fresh search, is what is measured), and predicts again.
        rng = np.random.default_rng(seed)
        preds, kept = [], np.flatnonzero(keep)
        for _ in range(n_boot):
            idx = rng.choice(kept, size=len(kept), replace=True)
            if len(np.unique(idx)) < 5:
                preds.append(math.nan)
                continue
            p = fit_parametric(n[idx], d[idx], loss[idx], starts=theta(fit)[None, :])
            preds.append(float(p(n[i], d[i])))
        interval = percentile_interval(predicted, preds, level, n_boot)
    return Extrapolation(index=i, n=float(n[i]), d=float(d[i]), budget=float(budget[i]), actual=float(loss[i]),
                         predicted=predicted, relative_error=(predicted - float(loss[i])) / float(loss[i]), fit=fit,
                         interval=interval)


# ---------------------------------------------------------------- a whole study

def fit_study(budget, n, d, loss, n_boot: int = 200, seed: int = 0, level: float = 0.95, top_k: int | None = None,
              require_interior: bool = True, window: int = 0) -> dict:
    """Every fit of a study as plain data (JSON): approach 2 with its intervals, approach 3 with its
    intervals, and the extrapolation check. A part the runs cannot support holds `error` instead, and
    the other parts are still made."""
    budget, n, d, loss = (np.asarray(v, float) for v in (budget, n, d, loss))
    out: dict = {"n_runs": int(len(n)), "n_boot": n_boot, "level": level, "seed": seed, "window": window}
    try:
        f = fit_frontier(budget, n, d, loss, require_interior, window)
        ci = bootstrap_frontier(budget, n, d, loss, n_boot, seed, level, require_interior, window) if n_boot else {}
        out["frontier"] = {"minima": [asdict(m) for m in f.minima],
                           "skipped": [{"budget": b, "reason": r} for b, r in f.skipped.items()],
                           "n_opt": asdict(f.n_opt), "d_opt": asdict(f.d_opt),
                           **{k: (ci[k].as_dict() if k in ci else Interval(v, math.nan, math.nan, 0, 0).as_dict())
                              for k, v in (("a", f.a), ("b", f.b))}}
    except FitError as exc:
        out["frontier"] = {"error": str(exc)}
    try:
        p = fit_parametric(n, d, loss, top_k=top_k)
        ci = bootstrap_parametric(n, d, loss, n_boot, seed, level, point=p) if n_boot else {}
        full = p.as_dict()
        out["parametric"] = {"fit": full, "intervals": {k: (ci[k] if k in ci else
                                                            Interval(full[k], math.nan, math.nan, 0, 0)).as_dict()
                                                        for k in PARAMETRIC_KEYS},
                             "predicted": [float(x) for x in p(n, d)]}
    except FitError as exc:
        out["parametric"] = {"error": str(exc)}
    try:
        if len(n) < 6:  # five runs are left to fit five parameters: the check would predict from an exact fit
            raise FitError(f"the extrapolation check holds one run out and fits the rest: it needs at least 6 runs, "
                           f"got {len(n)}")
        out["extrapolation"] = extrapolation_check(n, d, budget, loss, n_boot, seed, level, top_k).as_dict()
    except FitError as exc:
        out["extrapolation"] = {"error": str(exc)}
    return out
