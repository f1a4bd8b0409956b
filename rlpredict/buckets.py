"""Response-length buckets: edges, per-bucket point estimates and KV-cache reservation lengths.

A bucket ``k`` holds response lengths ``edges[k-1] < rl <= edges[k]`` (bucket 0 starts at 0).
Each bucket also keeps a small grid of quantiles of the training RLs that fell in it, so a
probability vector over buckets can be turned into any quantile of the predicted length
(``predictive_quantile``): its median is the MAE-optimal point estimate, and a high quantile is
a reservation that widens by itself when the predictor is unsure.

Pure numpy: the serving path (``rlpredict.serve.runtime``, ``ecoserve_sched``) imports this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

FORMAT = "rlpredict.buckets/1"
DEFAULT_EDGES: tuple[float, ...] = (32, 64, 128, 192, 256, 384, 512, 768, 1024, math.inf)
#: Largest response length a scheme may name (2^20 tokens; far above any served context).
MAX_TOKENS = 1 << 20
#: Quantile levels stored per bucket (0, 0.05, ..., 1).
QUANTILE_GRID: np.ndarray = np.linspace(0.0, 1.0, 21)


def _edge_to_json(e: float) -> float | None:
    return None if math.isinf(e) else float(e)


def _edge_from_json(e: float | None) -> float:
    return math.inf if e is None else _number(e, "edges")


def tokens_up(x: np.ndarray) -> np.ndarray:
    """Token figures rounded up to whole tokens (int64), float noise aside (``300.0000001`` is
    300, not 301): the one rounding of every reservation and calibrated quantile."""
    return np.ceil(np.round(x, 6)).astype(np.int64)


@dataclass(frozen=True)
class BucketScheme:
    """Upper bucket edges plus what the scheduler needs per bucket.

    ``point_tokens[k]``: the median training RL in bucket k (the prediction in tokens).
    ``reserve_tokens[k]``: the ``reserve_quantile`` of training RLs in bucket k (the KV-cache
    reservation for a request predicted in bucket k).
    """

    edges: tuple[float, ...]
    point_tokens: tuple[int, ...]
    reserve_tokens: tuple[int, ...]
    reserve_quantile: float = 0.9
    quantiles: tuple[tuple[float, ...], ...] = ()
    counts: tuple[int, ...] = ()
    _qarr: np.ndarray = field(init=False, repr=False, compare=False)
    _earr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.edges)
        e = _check_edges(self.edges)
        for name in ("point_tokens", "reserve_tokens"):
            values = getattr(self, name)
            if len(values) != k:
                raise ValueError(f"{name} has {len(values)} values for {k} buckets")
            low = 1 if name == "reserve_tokens" else 0  # a reservation holds at least one token
            if not all(isinstance(v, (int, np.integer)) and low <= v <= MAX_TOKENS for v in values):
                raise ValueError(f"{name} must be integers in [{low}, {MAX_TOKENS}], got {list(values)}")
        if self.counts and (len(self.counts) != k or min(self.counts) < 0):
            raise ValueError(f"counts must be {k} non-negative integers, got {list(self.counts)}")
        if not 0.0 < self.reserve_quantile <= 1.0:
            raise ValueError(f"reserve_quantile must be in (0, 1], got {self.reserve_quantile}")
        q = self.quantiles or tuple(_default_grid(lo, hi) for lo, hi in self.bounds)
        qarr = np.asarray(q, dtype=float)
        if qarr.shape != (k, len(QUANTILE_GRID)):
            raise ValueError(f"quantiles must have shape ({k}, {len(QUANTILE_GRID)}), got {qarr.shape}")
        if not (np.isfinite(qarr).all() and (qarr >= 0).all() and (qarr <= MAX_TOKENS).all()
                and (np.diff(qarr, axis=1) >= 0).all()):
            raise ValueError(f"quantiles must be finite, in [0, {MAX_TOKENS}] and non-decreasing in every bucket")
        # each bucket's figures are its own training lengths': one outside the bucket's range is an
        # edit (was: edges changed or point_tokens reversed in a manifest loaded and served)
        for j, (lo, hi) in enumerate(zip((0.0, *self.edges[:-1]), self.edges, strict=True)):
            low, high = math.floor(lo), math.ceil(hi) if math.isfinite(hi) else math.inf
            span = f"bucket {j}'s range ({lo:g}, {hi:g}]"
            for name in ("point_tokens", "reserve_tokens"):
                v = getattr(self, name)[j]
                if not low <= v <= max(high, 1):
                    raise ValueError(f"{name}[{j}]: {v} is outside {span}")
            if not (low <= qarr[j, 0] and qarr[j, -1] <= high):
                raise ValueError(f"quantiles[{j}]: {qarr[j, 0]:g}..{qarr[j, -1]:g} is outside {span}")
        object.__setattr__(self, "quantiles", tuple(tuple(map(float, r)) for r in qarr))
        object.__setattr__(self, "_qarr", qarr)
        object.__setattr__(self, "_earr", e)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_edges(cls, edges: Sequence[float] = DEFAULT_EDGES, reserve_quantile: float = 0.9) -> BucketScheme:
        """A scheme with placeholder statistics (bucket midpoints / upper edges); call ``fit``."""
        edges = tuple(float(e) for e in edges)
        _check_edges(edges)
        bounds = list(zip((0.0, *edges[:-1]), edges, strict=True))
        point = tuple(int(round(np.median(_default_grid(lo, hi)))) for lo, hi in bounds)
        reserve = tuple(int(round(_default_grid(lo, hi)[-1])) for lo, hi in bounds)
        return cls(edges, point, reserve, reserve_quantile)

    @classmethod
    def default(cls) -> BucketScheme:
        return cls.from_edges(DEFAULT_EDGES)

    @classmethod
    def log_spaced(cls, n: int, low: float = 16, high: float = 2048) -> BucketScheme:
        """``n`` buckets with log-spaced upper edges from ``low`` to ``high``, then inf."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 2 <= n <= 4096:
            raise ValueError(f"n: the number of buckets, a whole number in [2, 4096], got {n!r}")
        for name, v in (("low", low), ("high", high)):
            if not _real(v) or not 0 < v < math.inf:
                raise ValueError(f"{name}: a token count > 0, got {v!r}")
        if not low < high:
            raise ValueError(f"low ({low:g}) must be below high ({high:g})")
        inner = np.unique(np.round(np.geomspace(low, high, n - 1)))
        return cls.from_edges((*inner.tolist(), math.inf))

    @classmethod
    def from_quantiles(cls, rls: Sequence[int], n: int) -> BucketScheme:
        """Up to ``n`` buckets holding about equal shares of the given training RLs (quantiles
        that fall on the same length merge, so heavily repeated lengths give fewer); a length
        over ``MAX_TOKENS`` counts as ``MAX_TOKENS``, and edges lie below it (the last bucket,
        up to infinity, holds those lengths)."""
        raw = np.asarray(rls, dtype=float)
        if raw.size == 0:
            raise ValueError("no response lengths to derive bucket edges from")
        x = np.minimum(raw, MAX_TOKENS)
        inner = np.unique(np.ceil(np.quantile(x, np.linspace(0, 1, n + 1)[1:-1])))
        inner = inner[(inner > 0) & (inner < MAX_TOKENS)]  # (an edge at MAX_TOKENS: two buckets of one length)
        if not inner.size:  # said of the data, not of the scheme (was: "needs two buckets")
            where = "0 tokens" if x.max() < MAX_TOKENS else (
                f"0 tokens or at {MAX_TOKENS} tokens or more (the most a scheme names)")
            raise ValueError(f"quantile:{n} gives one bucket: the quantiles of these {raw.size} response "
                             f"lengths (min {int(raw.min())}, max {int(raw.max())}) all fall at {where}")
        return cls.from_edges((*inner.tolist(), math.inf))

    @classmethod
    def from_spec(cls, spec: str | Sequence[float]) -> BucketScheme:
        """``"default"``, ``"log:N"``, or a list of upper edges (whole numbers, ``inf`` last)."""
        if isinstance(spec, str):
            if spec == "default":
                return cls.default()
            if spec.startswith("log:"):
                if not spec[4:].isdigit():
                    raise ValueError(f"bucket spec {spec!r}: N in 'log:N' is a whole number of buckets")
                return cls.log_spaced(int(spec[4:]))
            if spec.startswith("quantile:"):  # the recipe's, which training turns into from_quantiles
                raise ValueError(f"bucket spec {spec!r} needs the training lengths: "
                                 "BucketScheme.from_quantiles(rls, N)")
            raise ValueError(f"unknown bucket spec {spec!r}: use 'default', 'log:N' or a list of edges "
                             "(a recipe also takes 'quantile:N')")
        edges = [float(e) for e in spec]
        # was: a finite last edge failed in training (a length above it has no bucket), 0.5 was
        # reported as a bad reservation
        if edges and not math.isinf(edges[-1]):
            raise ValueError(f"the last edge must be inf, so that every length has a bucket: {spec}")
        if bad := [e for e in edges[:-1] if not (math.isfinite(e) and e >= 1 and e.is_integer())]:
            raise ValueError(f"edges are token counts: whole numbers >= 1 (and inf last), got {bad[0]:g}")
        return cls.from_edges(edges)

    def fit(self, rls: Sequence[int], reserve_quantile: float | None = None) -> BucketScheme:
        """Fill point estimates, reservations and quantile grids from training RLs (a length
        over ``MAX_TOKENS`` counts as ``MAX_TOKENS`` in them, in its own bucket)."""
        q = self.reserve_quantile if reserve_quantile is None else reserve_quantile
        if not _real(q) or not 0 < q <= 1:
            raise ValueError(f"reserve_quantile: must be in (0, 1], got {q!r}")
        x = np.asarray(rls, dtype=float)
        if x.ndim != 1:
            raise ValueError(f"rls: expected a sequence of response lengths, got shape {x.shape}")
        if x.size and not (np.isfinite(x) & (x >= 0)).all():
            raise ValueError(f"rls: response lengths are finite counts >= 0, got {float(x[~(np.isfinite(x) & (x >= 0))][0]):g}")
        b = self.bucket_of(x)
        x = np.minimum(x, MAX_TOKENS)  # a reservation names at most MAX_TOKENS (was: a longer response failed training)
        point, reserve, grids, counts = [], [], [], []
        for k, (lo, hi) in enumerate(self.bounds):
            xs = x[b == k]
            counts.append(int(xs.size))
            if xs.size >= 5:
                grid = np.quantile(xs, QUANTILE_GRID)
                point.append(int(round(np.median(xs))))
                reserve.append(max(1, int(math.ceil(np.quantile(xs, q)))))
            else:  # too few examples: fall back to the bucket's range
                grid = _default_grid(lo, hi, xs)
                point.append(int(round(np.median(grid))))
                reserve.append(max(1, int(math.ceil(np.quantile(grid, q)))))
            grids.append(tuple(grid.tolist()))
        return replace(self, point_tokens=tuple(point), reserve_tokens=tuple(reserve),
                       reserve_quantile=q, quantiles=tuple(grids), counts=tuple(counts))

    # ---- queries ------------------------------------------------------------------------------
    @property
    def n_buckets(self) -> int:
        return len(self.edges)

    @property
    def labels(self) -> list[str]:
        """Each bucket's lengths, as ``range_label`` writes them (``0-32``, ``33-64``, ..., ``1025+``)."""
        return [range_label(self.edges, k) for k in range(len(self.edges))]

    @property
    def bounds(self) -> list[tuple[float, float]]:
        """(lower, upper] token range of every bucket."""
        return list(zip((0.0, *self.edges[:-1]), self.edges, strict=True))

    def bucket_of(self, tokens: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Bucket index of each response length (array in, array out; scalar in, 0-d array);
        ``ValueError`` for a length that is negative or not a number (was: NaN got bucket
        ``n_buckets``, one past the last)."""
        x = np.asarray(tokens, dtype=float)
        if x.size and not (x >= 0).all():  # NaN fails it too
            raise ValueError(f"tokens: response lengths are counts >= 0, got {float(x[~(x >= 0)].flat[0]):g}")
        return np.searchsorted(self._earr, x, side="left")

    def predictive_quantile(self, probs: np.ndarray, q: float) -> np.ndarray:
        """The ``q``-quantile, in tokens, of the length distribution that ``probs`` describes.

        ``probs`` is (n, n_buckets), or one prediction's (n_buckets,) (a 0-d result); within a
        bucket the training RLs' quantile grid is followed. ``q=0.5`` gives the MAE-optimal point
        prediction. ``ValueError`` naming ``probs`` or ``q`` for values that describe no
        distribution (was: a 1-D ``probs`` an AxisError, all zeros an IndexError, ``q=90`` the
        top of the grid).
        """
        p = np.asarray(probs, dtype=float)
        if p.ndim == 1:
            return self.predictive_quantile(p[None, :], q)[0]
        if p.ndim != 2 or p.shape[1] != self.n_buckets:
            raise ValueError(f"probs: expected shape (n, {self.n_buckets}) or ({self.n_buckets},), got {p.shape}")
        total = p.sum(axis=1, keepdims=True)
        if p.size and not ((p >= 0).all() and (total > 0).all() and np.isfinite(total).all()):
            raise ValueError("probs: each row must be finite, non-negative numbers with a sum above 0")
        if not _real(q) or not 0 <= q <= 1:
            raise ValueError(f"q: must be a number in [0, 1], got {q!r}")
        p = p / total
        cdf = np.cumsum(p, axis=1)
        k = np.minimum((cdf < q).sum(axis=1), self.n_buckets - 1)
        rows = np.arange(p.shape[0])
        below = np.where(k > 0, cdf[rows, np.maximum(k - 1, 0)], 0.0)
        inside = np.clip((q - below) / np.maximum(p[rows, k], 1e-12), 0.0, 1.0)
        pos = inside * (len(QUANTILE_GRID) - 1)
        i = np.minimum(np.floor(pos).astype(int), len(QUANTILE_GRID) - 2)
        frac = pos - i
        grid = self._qarr[k]
        return grid[rows, i] * (1 - frac) + grid[rows, i + 1] * frac

    def median_tokens(self, probs: np.ndarray) -> np.ndarray:
        """The point prediction in whole tokens: the predictive median, rounded (int64)."""
        return np.rint(self.predictive_quantile(probs, 0.5)).astype(np.int64)

    def quantile_tokens(self, probs: np.ndarray, q: float, margin: float = 0.0) -> np.ndarray:
        """The ``q``-quantile reservation in whole tokens (int64): ``predictive_quantile`` times
        ``1 + margin``, by ``tokens_up``, at least 1 (a reservation holds a token, as
        ``reserve_tokens`` do; was: 0 where the quantile fell among empty responses, which the
        trace reader refuses). Serving and ``rlpredict eval`` both use it."""
        if not _real(margin) or not 0 <= margin < math.inf:
            raise ValueError(f"margin: must be a finite number >= 0, got {margin!r}")
        return np.maximum(tokens_up(self.predictive_quantile(probs, q) * (1.0 + margin)), 1)

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "edges": [_edge_to_json(e) for e in self.edges],
            "point_tokens": list(self.point_tokens),
            "reserve_tokens": list(self.reserve_tokens),
            "reserve_quantile": self.reserve_quantile,
            "quantile_grid": QUANTILE_GRID.tolist(),
            "quantiles": [list(r) for r in self.quantiles],
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "bucket scheme") -> BucketScheme:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected an object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: unknown bucket scheme format {d.get('format')!r} (expected {FORMAT!r})")
        try:
            grid = d.get("quantile_grid")
            if grid is not None and (np.shape(grid) != QUANTILE_GRID.shape or not np.allclose(grid, QUANTILE_GRID)):
                raise ValueError("quantile_grid differs from this version's grid")  # (a shorter one: numpy's "could not be broadcast")
            return cls(
                edges=tuple(_edge_from_json(e) for e in d["edges"]),
                point_tokens=tuple(_integral(v, "point_tokens") for v in d["point_tokens"]),
                reserve_tokens=tuple(_integral(v, "reserve_tokens") for v in d["reserve_tokens"]),
                reserve_quantile=_number(d.get("reserve_quantile", 0.9), "reserve_quantile"),
                quantiles=tuple(tuple(_number(v, "quantiles") for v in r) for r in d.get("quantiles") or ()),
                counts=tuple(_integral(v, "counts") for v in d.get("counts") or ()),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        from rlpredict.outputs import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BucketScheme:
        from rlpredict.json_file import read_json

        return cls.from_dict(read_json(path), source=str(path))


def range_label(edges: Sequence[float | None], k: int) -> str:
    """Bucket ``k``'s response lengths, both ends included: ``33-64`` for (32, 64], ``1025+`` for
    the open last bucket (``None`` or inf); the one label the CLI, the plots and the notebooks
    use (were three: ``33-64``, ``≤64`` and ``32-64``, which read as if 32 were in it)."""
    lo = 0 if k == 0 else math.floor(edges[k - 1]) + 1
    hi = edges[k]
    return f"{lo}+" if hi is None or math.isinf(hi) else f"{lo}-{math.floor(hi)}"


def _check_edges(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges, dtype=float)
    if e.size < 2:
        raise ValueError("a bucket scheme needs at least two buckets")
    if not np.isfinite(e[:-1]).all() or not np.isposinf(e[-1]):
        # a finite last edge left longer responses in no bucket (an IndexError or a broadcast
        # error later, in drift and calibrate); from_spec refused it, a manifest did not
        raise ValueError(f"bucket edges must be numbers, the last one inf (null in JSON) so that every "
                         f"length has a bucket: {tuple(edges)}")
    if not (np.diff(e) > 0).all() or not e[0] > 0 or e[-2] > MAX_TOKENS:
        raise ValueError(f"bucket edges must be positive, at most {MAX_TOKENS} and strictly increasing: {tuple(edges)}")
    return e


def _real(v: object) -> bool:
    """A number given as an argument: Python's or numpy's, not a bool (NaN fails every range test)."""
    return not isinstance(v, bool | np.bool_) and isinstance(v, int | float | np.integer | np.floating)


def _integral(v: object, name: str) -> int:
    """An integer from JSON: ints, or floats with no fraction (never bools or strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{name}: expected an integer, got {v!r}")
    return int(v)


def _number(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _default_grid(lo: float, hi: float, seen: np.ndarray | None = None) -> np.ndarray:
    """A placeholder quantile grid spanning a bucket (the open last bucket spans lo..2*lo)."""
    top = hi if math.isfinite(hi) else min(MAX_TOKENS, max(2.0 * max(lo, 1.0),
                                                          float(seen.max()) if seen is not None and seen.size else 0.0))
    return np.linspace(min(lo + 1.0, top), top, len(QUANTILE_GRID))  # a bucket under a token wide: its top
