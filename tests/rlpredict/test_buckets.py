"""Bucket scheme: edges, fitting, serialization round-trip, predictive quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpredict.buckets import DEFAULT_EDGES, MAX_TOKENS, BucketScheme


def test_default_edges_and_membership():
    s = BucketScheme.default()
    assert s.edges == DEFAULT_EDGES and s.n_buckets == 10
    assert s.bucket_of([0, 1, 32, 33, 64, 1024, 1025, 10**7]).tolist() == [0, 0, 0, 1, 1, 8, 9, 9]


def test_fit_sets_point_and_reservation_per_bucket():
    rl = np.array([10] * 50 + [20] * 50 + [100] * 100)
    s = BucketScheme.default().fit(rl, reserve_quantile=0.9)
    assert s.counts[0] == 100 and s.counts[2] == 100
    assert s.point_tokens[0] == 15 and s.reserve_tokens[0] == 20
    assert s.point_tokens[2] == 100 and s.reserve_tokens[2] == 100


def test_round_trip_json(tmp_path):
    rng = np.random.default_rng(0)
    s = BucketScheme.default().fit(rng.lognormal(5, 1, 2000).astype(int), reserve_quantile=0.8)
    s.save(tmp_path / "b.json")
    back = BucketScheme.load(tmp_path / "b.json")
    assert back == s and math.isinf(back.edges[-1])
    assert '"edges"' in (tmp_path / "b.json").read_text() and "Infinity" not in (tmp_path / "b.json").read_text()


def test_log_spaced_and_quantile_schemes():
    assert BucketScheme.log_spaced(5, 16, 2048).edges[-1] == math.inf
    rl = np.arange(1, 1001)
    q = BucketScheme.from_quantiles(rl, 4)
    assert q.edges[:-1] == (251.0, 501.0, 751.0)
    counts = np.bincount(q.bucket_of(rl))
    assert counts.min() >= 240


def test_quantile_edges_on_degenerate_lengths_name_the_data():
    with pytest.raises(ValueError, match=r"quantile:4 gives one bucket: .* 50 response lengths \(min 0, max 0\)"):
        BucketScheme.from_quantiles([0] * 50, 4)


@pytest.mark.parametrize("spec", ["default", "quantile", [1024.0, MAX_TOKENS, math.inf]])
def test_responses_over_the_most_a_scheme_names_count_as_that_most(spec):
    """A response over ``MAX_TOKENS`` (2^20) tokens stays in the last bucket and counts as
    ``MAX_TOKENS`` in edges, reservations and quantiles (was: training failed, naming no row)."""
    rl = [2**21] * 10 + [5] * 10 + [3 * 2**40]
    scheme = (BucketScheme.from_quantiles(rl, 4) if spec == "quantile" else BucketScheme.from_spec(spec)).fit(rl)
    assert scheme.edges[-2] <= MAX_TOKENS and scheme.bucket_of([2**21])[0] == scheme.n_buckets - 1
    assert scheme.reserve_tokens[-1] == scheme.point_tokens[-1] == MAX_TOKENS
    assert max(max(q) for q in scheme.quantiles) == MAX_TOKENS
    assert scheme.counts[-1] == 11
    if spec == "quantile":  # no edge at MAX_TOKENS: two buckets would mean one length
        assert scheme.edges == (5.0, math.inf)
        with pytest.raises(ValueError, match=r"quantile:4 gives one bucket: .* 30 response lengths \(min 1048577, "
                                             r"max 1048606\) all fall at 0 tokens or at 1048576 tokens or more"):
            BucketScheme.from_quantiles(range(2**20 + 1, 2**20 + 31), 4)


@pytest.mark.parametrize("bad", [[], [64, 32, math.inf], [0, 32], [32, math.inf, 64]])
def test_bad_edges_rejected(bad):
    with pytest.raises(ValueError):
        BucketScheme.from_edges(bad)


def test_bad_file_names_field(tmp_path):
    p = tmp_path / "b.json"
    p.write_text('{"format": "rlpredict.buckets/1", "edges": [32, null]}')
    with pytest.raises(ValueError, match="missing field 'point_tokens'"):
        BucketScheme.load(p)


def test_predictive_quantile_of_one_hot_follows_the_bucket():
    rl = np.concatenate([np.full(100, 20), np.full(100, 300)])
    s = BucketScheme.default().fit(rl)
    p = np.eye(10)[[0, 5]]  # 300 lies in (256, 384]
    assert s.predictive_quantile(p, 0.5).tolist() == [20.0, 300.0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=10, max_size=10).filter(lambda v: sum(v) > 1e-3),
       st.floats(0.01, 0.98), st.floats(0.01, 0.98))
def test_predictive_quantile_is_monotone_in_q(p, q1, q2):
    s = BucketScheme.default()
    lo, hi = sorted((q1, q2))
    probs = np.array([p])
    assert s.predictive_quantile(probs, lo)[0] <= s.predictive_quantile(probs, hi)[0] + 1e-9


def test_one_bucket_label_everywhere():
    """The CLI's, the confusion plots' and the notebooks' labels (were three styles: ``33-64``,
    ``≤64``, ``32-64``): both ends included, the open last bucket ``N+``."""
    from rlpredict.buckets import range_label

    assert BucketScheme.default().labels[:3] == ["0-32", "33-64", "65-128"]
    assert BucketScheme.default().labels[-1] == "1025+"
    assert range_label([32, 64, None], 2) == "65+" and range_label([32.5, 64.0, float("inf")], 1) == "33-64"


def test_the_api_names_a_wrong_argument():
    """A reviewer of the public API (December 6, 2026): a 1-D ``probs`` (one ``Prediction``'s, as
    docs/bundle.md writes ``predictive_quantile(probs, 0.5)``) was an AxisError, all zeros an
    IndexError, ``q=90`` the top of the grid, NaN lengths the bucket past the last."""
    s = BucketScheme.default().fit(list(range(1, 3000)))
    one = np.full(10, 0.1)
    assert s.predictive_quantile(one, 0.5) == s.predictive_quantile(one[None], 0.5)[0]
    assert s.median_tokens(one).shape == () and s.quantile_tokens(one, 0.9) >= s.median_tokens(one)
    for probs, q, msg in ((np.full((1, 10), 0.1), 90, r"q: must be a number in \[0, 1\], got 90"),
                          (np.full((1, 10), 0.1), float("nan"), "q: must be"),
                          (np.full((1, 5), 0.2), 0.9, r"probs: expected shape \(n, 10\) or \(10,\), got \(1, 5\)"),
                          (np.zeros((1, 10)), 0.5, "probs: each row must be finite, non-negative"),
                          (np.full((2, 10), np.nan), 0.5, "probs: each row"),
                          (-np.eye(10)[:1], 0.5, "probs: each row")):
        with pytest.raises(ValueError, match=msg):
            s.predictive_quantile(probs, q)
    with pytest.raises(ValueError, match="margin: must be a finite number >= 0, got -5"):
        s.quantile_tokens(one, 0.9, margin=-5)
    for tokens in (float("nan"), -5, [3, -1]):
        with pytest.raises(ValueError, match="tokens: response lengths are counts >= 0"):
            s.bucket_of(tokens)
    for call, msg in ((lambda: s.fit([1, 2, 3], reserve_quantile=2), r"reserve_quantile: must be in \(0, 1\], got 2"),
                      (lambda: s.fit([-5, 10, 20] * 5), "rls: response lengths are finite counts >= 0, got -5"),
                      (lambda: BucketScheme.log_spaced(4, low=0), "low: a token count > 0, got 0"),
                      (lambda: BucketScheme.log_spaced(2.5), "n: the number of buckets"),
                      (lambda: BucketScheme.log_spaced(10**9), r"n: the number of buckets, a whole number in \[2, 4096\]"),
                      (lambda: BucketScheme.log_spaced(4, low=100, high=10), r"low \(100\) must be below high \(10\)"),
                      (lambda: BucketScheme.from_spec("quantile:4"), r"needs the training lengths: BucketScheme.from_quantiles"),
                      (lambda: BucketScheme.from_spec("log:x"), "N in 'log:N' is a whole number"),
                      (lambda: BucketScheme.from_dict([]), "bucket scheme: expected an object, got list")):
        with pytest.raises(ValueError, match=msg):
            call()
