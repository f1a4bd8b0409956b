"""Calibrated response-length quantiles by split-conformal prediction.

The model's predicted length distribution gives a ``q``-quantile for every prompt
(``BucketScheme.predictive_quantile``), but nothing makes ``q`` of the responses actually fall
below it. Split-conformal prediction fixes that with data the model never saw (a calibration
split): for each calibration prompt, the score is ``log(actual / predicted q-quantile)``; the
calibrated quantile is the prediction times ``exp(c)``, with ``c`` the ``ceil((n + 1) q)``-th
smallest of the ``n`` scores.

**Guarantee.** If the calibration prompts and a new prompt are exchangeable (drawn from the same
distribution, in any order), the new response's length is at most its calibrated ``q``-quantile
with probability at least ``q`` (and below ``q + 1 / (n + 1)`` when scores have no ties). The
scores are grouped by predicted bucket (Mondrian conformal prediction), so the guarantee also
holds within each predicted bucket that has at least ``min_group`` calibration prompts. The
smaller buckets are pooled into one rest group with an offset of its own, so the guarantee holds
over that group too (was: they took the offset over all prompts, which guaranteed nothing for
them: a reviewer's scratch simulation, not re-run, had a small bucket with higher scores
covered 0.59 of it, and 0.83 overall, for q = 0.9). A rest group too small for an offset of its own takes the one over all
prompts, with no guarantee for its buckets.

That probability is an average over calibration sets: one calibration set's coverage scatters
around ``q``, and widely when prompts come in clusters (many turns of one conversation are
not independent). ``confidence=1 - delta`` asks for more: coverage >= ``q`` for all but a
``delta`` share of calibration sets (a training-conditional, "PAC" bound: the order statistic is
raised until ``P(Binomial(n, q) >= k) <= delta``), counting ``n`` as the number of distinct
groups (conversations) rather than prompts, so clustered logs are not over-trusted. That
count is a heuristic, not a bound, when conversations differ much in size and their turns'
scores are strongly alike: a reviewer's simulation with the held-out side's conversation sizes
(the largest 5% holding a third of the rows; 2,000 draws of 468 conversations, re-run once; the
script is not in the repository) met ``q`` in 0.97, 0.91 and 0.80 of calibration sets at
within-conversation score correlations 0.3, 0.5 and 0.8, for ``confidence`` 0.9. Nothing is
guaranteed on data that is not exchangeable with the calibration split (another source, a new
model version, new users): ``rlpredict drift`` measures that.

Pure numpy; stored in the bundle's manifest under ``calibration``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlpredict.buckets import BucketScheme, tokens_up

FORMAT = "rlpredict.conformal/1"
METHOD = "split conformal, score log(actual / predicted quantile), grouped by predicted bucket"
#: Buckets with fewer calibration prompts than this share one offset (the rest group's).
MIN_GROUP = 100
#: Below 1e-9, a rank's ``(n + 1) q`` is a float's error: (9 + 1) x 0.9 is 9.000000000000002.
_EPS = 1e-9
MAX_QUANTILES = 16


def check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    """Distinct quantile levels in (0, 1), sorted; ValueError naming the bad one."""
    out: list[float] = []
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q) or not 0.0 < q < 1.0:
            raise ValueError(f"quantile {q!r}: expected a number strictly between 0 and 1")
        if abs(round(q, 6) - q) > 1e-12 or not 0.0 < round(q, 6) < 1.0:  # was rounded without a word
            raise ValueError(f"quantile {q!r}: at most 6 decimals (levels are stored and named to 6 "
                             "decimals), strictly between 0 and 1")
        out.append(round(float(q), 6))
    if not out:
        raise ValueError("no quantiles given")
    if len(set(out)) != len(out):
        raise ValueError(f"quantiles {list(quantiles)}: each may be given once")
    if len(out) > MAX_QUANTILES:
        raise ValueError(f"at most {MAX_QUANTILES} quantiles, got {len(out)}")
    return tuple(sorted(out))


#: Every name ``column_name`` gives (an earlier run's quantile columns are found by it).
QUANTILE_COLUMN = re.compile(r"rl_q\d+_tokens")


def column_name(q: float) -> str:
    """``rl_q90_tokens`` for 0.9, ``rl_q975_tokens`` for 0.975."""
    return f"rl_q{quantile_digits(q)}_tokens"


def quantile_digits(q: float) -> str:
    """A quantile level in (0, 1] as a name: ``90`` for 0.9, ``975`` for 0.975, ``05`` for 0.05,
    ``100`` for 1 (to 6 decimals, as ``--quantiles`` takes them). The one rule of the
    ``rl_q*_tokens`` columns and of ``eval``'s ``coverage_q*`` metrics."""
    if q >= 1:
        return "100"
    return f"{q:.6f}".split(".")[1].rstrip("0").ljust(2, "0")


#: The largest log offset a calibration may hold: exp(20), a 5e8x correction, is not a calibration.
MAX_LOG_OFFSET = 20.0


def _raw(scheme: BucketScheme, probs: np.ndarray, q: float) -> np.ndarray:
    return np.maximum(scheme.predictive_quantile(probs, q), 1.0)


@dataclass(frozen=True)
class QuantileCalibration:
    """Conformal offsets (log ratios) per quantile level and predicted bucket."""

    quantiles: tuple[float, ...]
    log_offsets: np.ndarray  # (n_quantiles, n_buckets): the offset each bucket uses
    global_log_offsets: np.ndarray  # (n_quantiles,)
    group_n: tuple[int, ...]  # calibration prompts per predicted bucket
    min_group: int = MIN_GROUP
    source: str = ""
    confidence: float | None = None  # 1 - delta of the PAC bound; None: the marginal guarantee

    @property
    def n(self) -> int:
        return int(sum(self.group_n))

    @classmethod
    def fit(cls, scheme: BucketScheme, probs: np.ndarray, actual: Sequence[int] | np.ndarray,
            quantiles: Sequence[float], *, min_group: int = MIN_GROUP, source: str = "",
            confidence: float | None = None, clusters: Sequence[str] | None = None) -> QuantileCalibration:
        """Offsets from calibration prompts' predicted probabilities and actual lengths (tokens).

        ``clusters``: each prompt's group (conversation) id, for the PAC bound's ``n``."""
        qs = check_quantiles(quantiles)
        if confidence is not None and not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        cl = np.asarray(clusters if clusters is not None else np.arange(len(probs)))
        probs = np.asarray(probs, dtype=float)
        y = np.maximum(np.asarray(actual, dtype=float), 1.0)
        if probs.ndim != 2 or probs.shape[1] != scheme.n_buckets or len(probs) != len(y):
            raise ValueError(f"expected probs of shape (n, {scheme.n_buckets}) and n lengths, "
                             f"got {probs.shape} and {len(y)}")
        if min_group < 1:
            raise ValueError(f"min_group must be >= 1, got {min_group}")
        need = math.ceil(max(qs) / (1 - max(qs)) - _EPS)  # the least n with ceil((n + 1) q) <= n
        if len(y) < need:  # was 1 / (1 - q): 11 for q = 0.9, where 9 prompts have rank 9
            raise ValueError(f"{len(y)} calibration prompts are too few for quantile {max(qs)} "
                             f"(need at least {need})")
        group = probs.argmax(axis=1)
        group_n = np.bincount(group, minlength=scheme.n_buckets)
        offsets = np.zeros((len(qs), scheme.n_buckets))
        global_off = np.zeros(len(qs))
        delta = None if confidence is None else 1.0 - confidence
        scores = [np.log(y) - np.log(_raw(scheme, probs, q)) for q in qs]

        def offsets_of(m: np.ndarray) -> np.ndarray:  # every level's offset over the prompts m
            n_eff = len(np.unique(cl[m]))
            return np.array([_conformal_offset(sc[m], q, delta, n_eff) for sc, q in zip(scores, qs, strict=True)])

        everyone = np.ones(len(y), dtype=bool)
        global_off = offsets_of(everyone)
        if not np.isfinite(global_off).all():
            q = qs[int(np.argmin(np.isfinite(global_off)))]
            raise ValueError(f"{len(y)} calibration prompts are too few for quantile {q}"
                             + (f" at confidence {confidence}" if confidence else ""))
        offsets = np.repeat(global_off[:, None], scheme.n_buckets, axis=1)
        # a bucket has offsets of its own only if every level's is finite (mixing its own and
        # another group's across levels could make a lower level's quantile pass a higher one's)
        own = np.zeros(scheme.n_buckets, dtype=bool)
        for g in np.flatnonzero(group_n >= min_group):
            c = offsets_of(group == g)
            if np.isfinite(c).all():
                offsets[:, g], own[g] = c, True
        rest = ~own[group]  # prompts of the buckets without offsets of their own
        if rest.any() and own.any():  # (with none of their own, the rest is every prompt)
            c = offsets_of(rest)
            if np.isfinite(c).all():
                offsets[:, ~own] = c[:, None]
        worst = float(max(np.abs(offsets).max(), np.abs(global_off).max()))
        if worst > MAX_LOG_OFFSET:  # the loader refuses it (was: written, exit 0, unloadable)
            ratio = math.exp(worst)
            raise ValueError(f"the lengths are {ratio:.3g}x the model's quantiles (a log offset past "
                             f"{MAX_LOG_OFFSET:g}): not a calibration; check the token-count field of the logs")
        return cls(qs, offsets, global_off, tuple(int(v) for v in group_n), int(min_group), source, confidence)

    def offset_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """The offset each predicted bucket takes, as an index (a bucket's own, the rest group's,
        or the one over every prompt), and each offset's calibration prompts: the count its
        quantile's own scatter goes with (``drift``). Read from ``group_n`` as ``fit`` forms the
        groups (a bucket with ``min_group`` prompts has its own offset)."""
        n = np.asarray(self.group_n, dtype=np.int64)
        own = n >= self.min_group
        rest = int(n[~own].sum())
        last = rest if own.any() and rest else int(n.sum())  # the rest group's, else the global one
        return np.where(own, np.cumsum(own) - 1, int(own.sum())), np.append(n[own], last)

    def tokens(self, scheme: BucketScheme, probs: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
        """Calibrated quantiles (tokens, ints), shape (n, len(quantiles))."""
        probs = np.asarray(probs, dtype=float)
        out = np.zeros((len(probs), len(quantiles)), dtype=np.int64)
        if len(probs) == 0:
            return out
        group = probs.argmax(axis=1)
        levels = np.empty((len(probs), len(self.quantiles)), dtype=np.int64)
        for i, q in enumerate(self.quantiles):
            v = _raw(scheme, probs, q) * np.exp(self.log_offsets[i, group])
            levels[:, i] = tokens_up(v)
        # levels never cross: each at least the one below (separate order statistics can)
        levels = np.maximum.accumulate(np.maximum(levels, 1), axis=1)
        for j, q in enumerate(quantiles):
            out[:, j] = levels[:, self.index(q)]
        return out

    def index(self, q: float) -> int:
        key = round(float(q), 6)
        if key not in self.quantiles:
            raise ValueError(f"quantile {q} is not calibrated in this bundle (calibrated: "
                             f"{', '.join(str(v) for v in self.quantiles)}); run `rlpredict calibrate` "
                             "with it")
        return self.quantiles.index(key)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": METHOD, "quantiles": list(self.quantiles),
                "log_offsets": [[round(float(v), 6) for v in row] for row in self.log_offsets],
                "global_log_offsets": [round(float(v), 6) for v in self.global_log_offsets],
                "group_n": list(self.group_n), "min_group": self.min_group, "source": self.source,
                "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: object, n_buckets: int) -> QuantileCalibration:
        """Strict: every field checked, ValueError naming the field."""
        if not isinstance(d, dict):
            raise ValueError("calibration: expected an object")
        if d.get("format") != FORMAT:
            raise ValueError(f"calibration.format: expected {FORMAT!r}, got {d.get('format')!r}")
        try:
            qs = check_quantiles(d["quantiles"] if isinstance(d.get("quantiles"), list) else [None])
        except ValueError as e:
            raise ValueError(f"calibration.quantiles: {e}") from None
        if list(qs) != d["quantiles"]:  # the offset rows follow the stored order (were read sorted)
            raise ValueError(f"calibration.quantiles: expected increasing levels, got {d['quantiles']}")
        offsets = _finite_matrix(d.get("log_offsets"), (len(qs), n_buckets), "calibration.log_offsets")
        glob = _finite_matrix([d.get("global_log_offsets")], (1, len(qs)), "calibration.global_log_offsets")[0]
        group_n = d.get("group_n")
        if (not isinstance(group_n, list) or len(group_n) != n_buckets
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in group_n)):
            raise ValueError(f"calibration.group_n: expected {n_buckets} counts >= 0")
        min_group = d.get("min_group", MIN_GROUP)
        if isinstance(min_group, bool) or not isinstance(min_group, int) or min_group < 1:
            raise ValueError(f"calibration.min_group: expected an integer >= 1, got {min_group!r}")
        source = d.get("source", "")
        if not isinstance(source, str):
            raise ValueError("calibration.source: expected a string")
        conf = d.get("confidence")
        if conf is not None and (isinstance(conf, bool) or not isinstance(conf, int | float)
                                 or not 0.0 < conf < 1.0):
            raise ValueError(f"calibration.confidence: expected null or a number in (0, 1), got {conf!r}")
        return cls(qs, offsets, glob, tuple(group_n), min_group, source, conf)


def _conformal_offset(score: np.ndarray, q: float, delta: float | None = None, n_eff: int = 0) -> float:
    """The ``ceil((n + 1) q)``-th smallest score, or with ``delta`` the order statistic at the
    PAC level ``k / n_eff`` (``pac_rank``) for ``n_eff`` independent units; inf when out of range."""
    n = len(score)
    if n == 0:
        return math.inf
    if delta is None:
        k = math.ceil((n + 1) * q - _EPS)
    else:  # the rank itself is finite-sample (was: ceil((n + 1) k / n), one rank wider than it needs)
        k = math.ceil(n * pac_rank(max(n_eff, 1), q, delta) / max(n_eff, 1) - _EPS)
    if k > n:
        return math.inf
    return float(np.partition(score, k - 1)[k - 1])


def pac_rank(n: int, q: float, delta: float) -> int:
    """Smallest ``k`` with ``P(Binomial(n, q) >= k) <= delta``: the ``k``-th smallest of ``n``
    exchangeable scores covers ``q`` of new ones except with probability ``delta`` (its
    coverage is Beta(k, n + 1 - k)); ``n + 1`` if none."""
    k = np.arange(n + 1)
    logpmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
              + k * math.log(q) + (n - k) * math.log1p(-q))
    pmf = np.exp(logpmf - logpmf.max())
    tail = np.cumsum((pmf / pmf.sum())[::-1])[::-1]  # P(X >= k)
    ok = np.flatnonzero(tail <= delta)
    return int(ok[0]) if len(ok) else n + 1


def _finite_matrix(v: object, shape: tuple[int, int], name: str) -> np.ndarray:
    bad = ValueError(f"{name}: expected {shape[0]} x {shape[1]} finite numbers")
    if not isinstance(v, list) or len(v) != shape[0]:
        raise bad
    rows = []
    for row in v:
        if (not isinstance(row, list) or len(row) != shape[1]
                or any(isinstance(x, bool) or not isinstance(x, int | float) for x in row)):
            raise bad
        rows.append(row)
    a = np.asarray(rows, dtype=float)
    if not np.isfinite(a).all() or (np.abs(a) > MAX_LOG_OFFSET).any():
        raise ValueError(f"{name}: expected {shape[0]} x {shape[1]} finite numbers in "
                         f"[-{MAX_LOG_OFFSET:g}, {MAX_LOG_OFFSET:g}]")
    return a


def coverage_table(scheme: BucketScheme, cal: QuantileCalibration, probs: np.ndarray,
                   actual: Sequence[int] | np.ndarray) -> list[dict]:
    """Per quantile: target, achieved coverage, reserved/actual tokens (total) for the calibrated
    and the raw (uncalibrated) model quantile, on prompts the calibration never saw."""
    y = np.asarray(actual, dtype=float)
    rows = []
    cal_tokens = cal.tokens(scheme, probs, cal.quantiles)
    for j, q in enumerate(cal.quantiles):
        raw = tokens_up(_raw(scheme, np.asarray(probs, dtype=float), q))
        rows.append({"quantile": q, "n": int(len(y)),
                     "coverage": float(np.mean(y <= cal_tokens[:, j])) if len(y) else math.nan,
                     "reserved_over_actual": float(cal_tokens[:, j].sum() / max(y.sum(), 1.0)),
                     "raw_coverage": float(np.mean(y <= raw)) if len(y) else math.nan,
                     "raw_reserved_over_actual": float(raw.sum() / max(y.sum(), 1.0))})
    return rows
