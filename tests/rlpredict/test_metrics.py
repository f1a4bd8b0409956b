"""Metrics against hand-computed values, and the group split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpredict.buckets import BucketScheme
from rlpredict.splits import (
    SPLIT_RULES,
    check_split_record,
    recorded_split,
    split_by_group,
    split_with_pins,
)
from rlpredict.train.metrics import confusion, decode, quantile_tag, rl_metrics


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


def test_kendall_tau_breaks_a_tie_in_the_point_by_the_expected_bucket(scheme):
    """Both predict bucket 1 (150 tokens); the second leans longer, so it ranks second (without
    the tie-break tau-b is undefined here, reported 0)."""
    probs = np.array([[0.15, 0.7, 0.15], [0.05, 0.7, 0.25]])
    assert decode(probs, scheme, 0.9).pred_tokens.tolist() == [150, 150]
    assert rl_metrics(np.array([120, 180]), probs, scheme)["kendall_tau"] == pytest.approx(1.0)
    assert rl_metrics(np.array([180, 120]), probs, scheme)["kendall_tau"] == pytest.approx(-1.0)


def _row(group: str, prompt: str, response: str) -> SimpleNamespace:
    return SimpleNamespace(group=group, messages=[{"role": "user", "content": prompt}], response=response)


@pytest.mark.parametrize("rule", SPLIT_RULES)
def test_split_by_group_never_leaks(rule):
    items = [_row(f"g{i % 50}", f"q{i}", "a") for i in range(1000)]
    train, test = split_by_group(items, 0.2, seed=3, rule=rule)
    assert {s.group for s in train}.isdisjoint({s.group for s in test})
    assert len(train) + len(test) == 1000 and 0.05 < len(test) / 1000 < 0.4
    assert split_by_group(items, 0.2, seed=3, rule=rule) == (train, test)
    assert split_by_group(items[::-1], 0.2, seed=3, rule=rule) == (train[::-1], test[::-1])
    with pytest.raises(ValueError, match="split rule 'start': choose from id, copies"):
        split_by_group(items, 0.2, rule="start")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 6), st.integers(0, 1)), min_size=1, max_size=40),
       st.integers(0, 5))
def test_the_copies_rule_joins_ids_that_share_a_row_and_is_the_id_split_elsewhere(rows, seed):
    """A row (context and response) under two ids puts both ids on one side (held out only if
    both would be); where no row is under two ids, the split is the id split, row for row."""
    items = [_row(f"c{g}", f"q{p}", f"a{r}") for g, p, r in rows]
    train, test = split_by_group(items, 0.5, seed, "copies")
    held = {id(s) for s in test}
    side = {id(s): id(s) in held for s in items}
    content = lambda s: (s.messages[0]["content"], s.response)  # noqa: E731
    for a in items:
        for b in items:
            if a.group == b.group or content(a) == content(b):
                assert side[id(a)] == side[id(b)]
    ids_of: dict[tuple, set] = {}
    for s in items:
        ids_of.setdefault(content(s), set()).add(s.group)
    if all(len(v) == 1 for v in ids_of.values()):
        assert (train, test) == split_by_group(items, 0.5, seed, "id")
    # rows added (the whole log where the training read part of it) move rows to the training
    # side, never off it: a model's training rows are never scored as held out
    for cut in range(len(items)):
        part_train, _ = split_by_group(items[:cut], 0.5, seed, "copies")
        assert not {id(s) for s in part_train} & held


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 4), st.integers(0, 1)), min_size=1, max_size=30),
       st.integers(0, 5), st.sampled_from(SPLIT_RULES), st.data())
def test_a_split_given_the_trainings_pins_never_holds_out_a_trained_row_of_less_data(rows, seed, rule, data):
    """Rows removed (``eval`` or ``calibrate`` given part of the training's log) can split a
    joined group; the ids the training pinned keep its trained rows on the training side. Was:
    `a` and `b` share a row, `a` hashes to the held-out side, `b` trains both; given `a`'s rows
    alone, the split held them out."""
    items = [_row(f"c{g}", f"q{p}", f"a{r}") for g, p, r in rows]
    train, _, pins = split_with_pins(items, 0.5, seed, rule)
    assert (train, _) == split_by_group(items, 0.5, seed, rule)
    if rule == "id":
        assert pins == []
    trained = {id(s) for s in train}
    keep = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)))
    part = [s for s, k in zip(items, keep, strict=True) if k]
    _, part_test = split_by_group(part, 0.5, seed, rule, pins)
    assert not {id(s) for s in part_test} & trained
    # and a held-out row stays held out when nothing is removed
    assert split_by_group(items, 0.5, seed, rule, pins) == split_by_group(items, 0.5, seed, rule)
    check_split_record({"pinned": pins}, "data.split")


def test_pins_by_hand():
    a, b = next((f"a{i}", f"b{j}") for i in range(50) for j in range(50)
                if split_by_group([_row(f"a{i}", "q", "r")], 0.5, 0)[1]
                and not split_by_group([_row(f"b{j}", "q", "r")], 0.5, 0)[1])
    log = [_row(a, "q", "r"), _row(b, "q", "r"), _row(a, "q2", "r2")]
    _train, test, pins = split_with_pins(log, 0.5, 0, "copies")
    assert test == [] and len(pins) == 1
    part = log[::2]  # `a`'s rows alone
    assert split_by_group(part, 0.5, 0, "copies")[1] == part  # held out: both trained
    assert split_by_group(part, 0.5, 0, "copies", pins) == (part, [])
    with pytest.raises(ValueError, match=r"data\.split\.pinned: must be a list of ids as 16 lowercase hex digits, got 'x'"):
        check_split_record({"pinned": ["x"]}, "data.split")
    with pytest.raises(ValueError, match="got 'abc'"):
        check_split_record({"pinned": "abc"}, "training_split")
    with pytest.raises(ValueError, match="got None"):  # was: a null entry read as "none bad"
        check_split_record({"pinned": [None, "x"]}, "training_split")
    # a bundle's evaluation record gives the split; the training's pins still apply
    manifest = {"evaluation": {"split": {"test_frac": 0.5, "seed": 0, "rule": "copies"}},
                "training_split": {"test_frac": 0.5, "seed": 0, "rule": "copies", "pinned": pins}}
    assert recorded_split(manifest)["pinned"] == pins


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


def test_a_split_recorded_without_a_rule_is_an_id_split():
    assert recorded_split({"training_split": {"test_frac": 0.1, "seed": 0}})["rule"] == "id"
    assert recorded_split({"evaluation": {"split": {"test_frac": 0.1, "seed": 0, "rule": "copies"}}})["rule"] == "copies"
    assert recorded_split({}) == {} and recorded_split(None) == {}
    # an `eval --split all` record (it scored every row) gives way to the training split's
    both = {"evaluation": {"split": {"mode": "all", "test_frac": 0.1, "seed": 0}},
            "training_split": {"test_frac": 0.1, "seed": 0, "rule": "copies"}}
    assert recorded_split(both)["rule"] == "copies"
    with pytest.raises(ValueError, match="records split rule 'later'"):
        recorded_split({"training_split": {"test_frac": 0.1, "rule": "later"}})


def test_eval_rounds_a_reservation_as_serving_does():
    """``BucketScheme.quantile_tokens`` for both. Was: eval took ``ceil`` of the float quantile,
    serving rounded float noise first (769.0000000000001 tokens: 770 in eval, 769 served)."""
    from rlpredict.serve.runtime import Predictor

    predictor = Predictor.load(None, reserve_quantile=0.9, threads=1)
    scheme = predictor.scheme
    logits = (np.random.default_rng(0).normal(size=(50_000, scheme.n_buckets)) * 3).astype(np.float32)
    served = predictor.from_logits(logits)
    raw = scheme.predictive_quantile(served.probs, 0.9)
    assert (np.ceil(raw) != np.ceil(np.round(raw, 6))).any()  # the case is in this sample
    d = decode(served.probs, scheme, 0.9)
    assert np.array_equal(d.reserve_quantile, served.reserve_tokens)
    assert np.array_equal(d.pred_tokens, served.pred_tokens)


def test_a_quantile_reservation_holds_a_token():
    """A scheme fitted on logs full of empty responses put the 0.5-quantile at 0 tokens, and
    ``annotate --reserve-quantile 0.5`` wrote ``rl_reserve_tokens`` 0, which the trace reader
    refuses (a reviewer). A reservation is at least 1, as ``reserve_tokens`` are."""
    s = BucketScheme.default().fit([0] * 60 + list(range(1, 41)) + list(range(100, 400, 3)))
    probs = np.eye(s.n_buckets)[[0]]
    assert s.median_tokens(probs).tolist() == [0]  # a point estimate may be 0
    assert s.quantile_tokens(probs, 0.5).tolist() == [1]
