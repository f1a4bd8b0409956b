"""Metrics against hand-computed values, and the group split."""

from __future__ import annotations

import numpy as np
import pytest

from rlpredict.buckets import BucketScheme
from rlpredict.splits import split_by_group
from rlpredict.train.metrics import confusion, quantile_tag, rl_metrics


@pytest.fixture
def scheme():
    # Three buckets (<=100, <=200, >200) whose RLs are exactly 50, 150 and 300.
    return BucketScheme.from_edges([100, 200, float("inf")]).fit([50] * 10 + [150] * 10 + [300] * 10)


def test_metrics_by_hand(scheme):
    rl = np.array([50, 150, 300, 120])
    probs = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    m = rl_metrics(rl, probs, scheme)
    # predictions 50, 150, 50, 300 -> errors 0, 0, 250, 180
    assert m["n"] == 4
    assert m["bucket_acc"] == pytest.approx(2 / 4)
    assert m["within1_acc"] == pytest.approx(3 / 4)  # 300 -> bucket 0 is 2 away; 120 -> bucket 2 is 1 away
    assert m["mae"] == pytest.approx((0 + 0 + 250 + 180) / 4)
    assert m["acc50"] == pytest.approx(2 / 4) and m["acc100"] == pytest.approx(2 / 4)
    # reservations per predicted bucket: 50, 150, 50, 300 -> covered: T, T, F, T
    assert m["coverage"] == pytest.approx(3 / 4)
    assert m["reserve_ratio_total"] == pytest.approx((50 + 150 + 50 + 300) / (50 + 150 + 300 + 120))
    assert m["reserve_ratio_mean"] == pytest.approx(np.mean([1, 1, 50 / 300, 300 / 120]))
    assert confusion(rl, probs, scheme).tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]


def test_kendall_tau_perfect_and_constant(scheme):
    rl = np.array([50, 150, 300])
    assert rl_metrics(rl, np.eye(3), scheme)["kendall_tau"] == pytest.approx(1.0)
    assert rl_metrics(rl, np.tile([0.2, 0.5, 0.3], (3, 1)), scheme)["kendall_tau"] == 0.0


def test_split_by_group_never_leaks():
    items = [(f"g{i % 50}", i) for i in range(1000)]
    train, test = split_by_group(items, 0.2, seed=3, key=lambda x: x[0])
    assert {g for g, _ in train}.isdisjoint({g for g, _ in test})
    assert len(train) + len(test) == 1000 and 0.05 < len(test) / 1000 < 0.4
    assert split_by_group(items, 0.2, seed=3, key=lambda x: x[0]) == (train, test)


def test_quantile_names_are_annotates():
    from rlpredict.serve.conformal import column_name

    names = {q: quantile_tag(q) for q in (0.05, 0.5, 0.9, 0.905, 0.975, 0.995, 1.0)}
    assert names == {0.05: "q05", 0.5: "q50", 0.9: "q90", 0.905: "q905", 0.975: "q975", 0.995: "q995", 1.0: "q100"}
    assert all(column_name(q) == f"rl_{t}_tokens" for q, t in names.items())  # 0.975 was q98 here, q975 there


def test_stack_report_at_the_recipes_quantile(scheme):
    from rlpredict.train.stack import markdown

    m = rl_metrics(np.array([50, 150, 300]), np.eye(3), scheme, 0.95)
    table = markdown({"reserve_quantile": 0.95, "all": {"stacked": m}, "sources": {}})  # was a KeyError
    assert "cover q95" in table  # ... at the end of `rlpredict stack`, which then wrote nothing
