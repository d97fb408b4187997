"""Seed statistics and classification metrics against known values and scikit-learn / SciPy."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

from tasks.evaluation import classification_metrics
from tasks.statistics import intervals_overlap, mean_ci, paired_test, pairwise, ranking


def test_mean_ci_known_case():
    # [1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3) = 2.484138
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.484138, abs=1e-6)
    # the interval agrees with SciPy's own t-interval
    lo, hi = stats.t.interval(0.95, 2, loc=2.0, scale=stats.sem([1.0, 2.0, 3.0]))
    assert (mean - half, mean + half) == pytest.approx((lo, hi))
    assert mean_ci([0.7])[0] == 0.7 and math.isnan(mean_ci([0.7])[1])
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)


def test_paired_test_matches_scipy_and_handles_degenerate_cases():
    a = {0: 0.81, 1: 0.84, 2: 0.80, 3: 0.83}
    b = {0: 0.70, 1: 0.76, 2: 0.71, 3: 0.72}
    t = paired_test(a, b, "a", "b", 0.05)
    assert t.p_value == pytest.approx(stats.ttest_rel([0.81, 0.84, 0.80, 0.83], [0.70, 0.76, 0.71, 0.72]).pvalue)
    assert t.diff == pytest.approx(0.0975) and t.significant and t.n == 4
    # only the seeds both ran are paired
    assert paired_test(a, {0: 0.7, 9: 0.1}, "a", "c", 0.05).n == 1
    one = paired_test({0: 0.9}, {0: 0.1}, "a", "b", 0.05)
    assert math.isnan(one.p_value) and not one.significant  # untestable is never "significant"
    constant = paired_test({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}, "a", "b", 0.05)
    assert math.isnan(constant.p_value) and not constant.significant


def test_holm_correction_keeps_a_borderline_pair_from_counting():
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.02, 5)
    scores = {"a": dict(enumerate(base + 0.10)), "b": dict(enumerate(base + rng.normal(0, 0.01, 5))),
              "c": dict(enumerate(base + rng.normal(0, 0.01, 5)))}
    tests = {(t.a, t.b): t for t in pairwise(scores, 0.05)}
    assert tests[("a", "b")].significant and tests[("a", "c")].significant
    assert not tests[("b", "c")].significant
    # Holm by hand: the k-th smallest p-value (from 0) is compared with alpha / (m - k), stopping at the first miss
    ordered = sorted(tests.values(), key=lambda t: t.p_value)
    expected, going = [], True
    for k, t in enumerate(ordered):
        going = going and t.p_value * (3 - k) < 0.05
        expected.append(going)
    assert [t.significant for t in ordered] == expected
    adjusted = [max(min(1.0, u.p_value * (3 - j)) for j, u in enumerate(ordered[: k + 1])) for k in range(3)]
    assert [t.p_adjusted for t in ordered] == pytest.approx(adjusted)
    # a p-value under alpha that Holm does not accept
    p_close = {"a": {0: 0.720, 1: 0.728, 2: 0.715}, "b": {0: 0.70, 1: 0.70, 2: 0.70}}
    raw = paired_test(p_close["a"], p_close["b"], "a", "b", 0.05)
    corrected = pairwise({**p_close, "c": {0: 0.1, 1: 0.5, 2: 0.9}, "d": {0: 0.9, 1: 0.2, 2: 0.4}}, 0.05)
    assert 0.01 < raw.p_value < 0.05 and raw.significant
    assert not next(t for t in corrected if (t.a, t.b) == ("a", "b")).significant


def test_ranking_names_every_variant_it_cannot_separate():
    means = {"a": (0.80, 0.02), "b": (0.79, 0.03), "c": (0.60, 0.02)}
    scores = {"a": {0: 0.80, 1: 0.82, 2: 0.78}, "b": {0: 0.79, 1: 0.81, 2: 0.77}, "c": {0: 0.60, 1: 0.59, 2: 0.61}}
    ranked = ranking(means, pairwise(scores, 0.05))
    assert [r["variant"] for r in ranked] == ["a", "b", "c"]
    by = {r["variant"]: r for r in ranked}
    assert "b" in by["a"]["ties"] and "a" in by["b"]["ties"]  # overlapping intervals: said, not ranked silently
    assert "c" not in by["a"]["ties"] and by["c"]["ties"] == []
    assert intervals_overlap((0.5, float("nan")), (0.9, 0.01))  # unknown width: cannot be separated


def test_classification_metrics_match_scikit_learn_and_a_hand_computed_case():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y, p)
    # by hand: accuracy 4/6; per-class F1: class 0 P=1/2 R=1/2 -> 0.5, class 1 P=2/3 R=1 -> 0.8, class 2 P=1 R=1/2 -> 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    m = classification_metrics(y, p)
    assert m == {"accuracy": accuracy_score(y, p), "macro_f1": f1_score(y, p, average="macro"),
                 "mcc": matthews_corrcoef(y, p)}
    assert confusion_matrix(y, p).trace() / 300 == pytest.approx(m["accuracy"])


def test_evaluation_only_modules_do_not_key_pretraining(tmp_path, monkeypatch):
    """Editing the fine-tuning code re-runs fine-tuning, not pretraining (cache keys hash the code)."""
    import shutil

    import tasks.workspace as workspace
    from tasks.caching import EVALUATION_ONLY

    root = tmp_path / "src"
    shutil.copytree(workspace.PACKAGE_ROOT / "model", root / "model")
    monkeypatch.setattr(workspace, "PACKAGE_ROOT", root)
    workspace.code_version.cache_clear()  # memoised per process
    before = (workspace.code_version("model", skip=EVALUATION_ONLY), workspace.code_version("model"))
    with open(root / "model" / "finetune.py", "a") as f:
        f.write("\n# edited\n")
    workspace.code_version.cache_clear()
    assert workspace.code_version("model", skip=EVALUATION_ONLY) == before[0]  # pretraining's key holds
    assert workspace.code_version("model") != before[1]  # fine-tuning's key moves
    with open(root / "model" / "train.py", "a") as f:
        f.write("\n# edited\n")
    workspace.code_version.cache_clear()
    assert workspace.code_version("model", skip=EVALUATION_ONLY) != before[0]
    workspace.code_version.cache_clear()
