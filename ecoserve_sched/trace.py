"""Request traces: CSV / JSONL (optionally .gz) with file:line errors, rate scaling, synthetic arrivals.

Columns: ``arrival_time_s``, ``input_tokens``, ``output_tokens`` (required); ``max_tokens``,
``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens`` (from ``rlpredict annotate``), and a
``prompt`` string or OpenAI ``messages`` list (for ``--predictions bundle``) are optional.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import numpy as np

from rlpredict.records import MAX_TOKEN_COUNT as MAX_COUNT
from rlpredict.records import (
    TRACE_FIELDS,
    RecordError,
    bounded_lines,
    csv_records,
    decode_line,
    generator_of,
    parse_json,
    request_of,
)

from .request import SLO, Request, is_real, is_whole

REQUIRED = ("arrival_time_s", "input_tokens", "output_tokens")
#: A trace whose first arrival is later than this (2^20 s, 12 days: a Unix timestamp, say) is read
#: relative to it; earlier times are kept as written.
REBASE_AFTER_S = float(2**20)
RL_FIELDS = ("rl_bucket", "rl_pred_tokens", "rl_reserve_tokens")
DEFAULT_MAX_TOKENS = 2048


class TraceError(ValueError):
    """A trace row is malformed; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Trace:
    """Columns of a trace, sorted by arrival. ``rl`` is (n, 3) or None; ``prompts`` may be None."""

    path: str
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    max_tokens: np.ndarray
    rl: np.ndarray | None = None
    prompts: list[str | list] | None = None  # prompt strings or OpenAI message lists
    generators: list[str | None] | None = None  # the ``generator`` (served model) column, if any
    prompt_problem: str = ""  # ``file:line: why`` of the first row without a usable prompt ("" if none)
    arrival_offset_s: float = 0.0  # subtracted from the file's arrival times (``read_trace``)

    def __post_init__(self) -> None:
        """Columns of one length, and arrival times finite and >= 0 (a NaN arrival made the
        simulator loop forever): what ``read_trace`` checks per row, for a trace built in code."""
        n = len(self.arrival_s)
        columns = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                   "max_tokens": self.max_tokens, "rl": self.rl, "prompts": self.prompts,
                   "generators": self.generators}
        if bad := [k for k, c in columns.items() if c is not None and len(c) != n]:
            raise ValueError(f"trace {self.path}: column {bad[0]} has {len(columns[bad[0]])} rows, "
                             f"arrival_s has {n}")
        arrivals = np.asarray(self.arrival_s, dtype=float)
        if n and not (np.isfinite(arrivals).all() and arrivals.min() >= 0):
            raise ValueError(f"trace {self.path}: arrival times must be finite and >= 0")
        # the lengths as read_trace bounds them; predictions whole numbers (a bucket of -1 and
        # 0 tokens mean "none"). Was: -5 prompt tokens "finished" with negative KV use.
        counts = {"input_tokens": (self.input_tokens, 1), "output_tokens": (self.output_tokens, 1),
                  "max_tokens": (self.max_tokens, 1)}
        if self.rl is not None:
            rl = np.asarray(self.rl)
            if rl.shape != (n, 3):
                raise ValueError(f"trace {self.path}: rl has shape {rl.shape}, expected ({n}, 3)")
            counts.update({k: (rl[:, j], lo) for j, (k, lo) in enumerate(zip(RL_FIELDS, (-1, 0, 0), strict=True))})
        for name, (column, lo) in counts.items():
            if n and (bad := _not_whole(column, lo)) is not None:
                raise ValueError(f"trace {self.path}: row {bad}: {name} must be a whole number in "
                                 f"[{lo}, 2^53], got {np.asarray(column, dtype=object)[bad]!r}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def has_rl(self) -> bool:
        return self.rl is not None

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests arriving ``rate_scale`` times faster (inter-arrival gaps divided)."""
        if not (is_real(rate_scale) and rate_scale > 0):
            raise ValueError(f"rate scale must be a number > 0, got {rate_scale!r}")
        with np.errstate(over="ignore"):
            arrivals = self.arrival_s / rate_scale
        if not np.isfinite(arrivals).all():
            raise ValueError(f"{self.path}: arrival times at rate scale {rate_scale:g} are not finite numbers "
                             "(too small a rate scale or --rate)")
        return replace(self, arrival_s=arrivals)

    def with_arrivals(self, arrival_s: np.ndarray) -> Trace:
        return replace(self, arrival_s=np.asarray(arrival_s, dtype=float))

    def head(self, n: int) -> Trace:
        return replace(self, arrival_s=self.arrival_s[:n], input_tokens=self.input_tokens[:n],
                       output_tokens=self.output_tokens[:n], max_tokens=self.max_tokens[:n],
                       rl=None if self.rl is None else self.rl[:n],
                       prompts=None if self.prompts is None else self.prompts[:n],
                       generators=None if self.generators is None else self.generators[:n])

    def requests(self, slo: SLO) -> list[Request]:
        """Fresh Request objects (a simulation mutates them), with annotated RL if present."""
        out = []
        rl = self.rl
        for i, (a, p, o, m) in enumerate(zip(self.arrival_s.tolist(), self.input_tokens.tolist(),
                                             self.output_tokens.tolist(), self.max_tokens.tolist(),
                                             strict=True)):
            r = Request(i, a, p, m, o, slo=slo)
            if rl is not None:
                r.pred_bucket, r.pred_tokens, r.reserve_tokens = (int(v) for v in rl[i])
            out.append(r)
        return out


def _not_whole(column: np.ndarray | list, lo: int) -> int | None:
    """The index of the first value of ``column`` that is no whole number in [lo, 2^53], or None."""
    a = np.asarray(column)
    if a.dtype.kind in "iu":
        ok = (a >= lo) & (a <= MAX_COUNT)
    elif a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(a) & (a == np.floor(a)) & (a >= lo) & (a <= MAX_COUNT)
    else:  # bools, strings, objects (Python ints past int64, None): each value checked
        return next((i for i, v in enumerate(a.tolist()) if not (is_whole(v) and lo <= v <= MAX_COUNT)), None)
    return None if ok.all() else int(np.argmin(ok))


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Records with their line numbers; a truncated or corrupt .gz names the file (not a line:
    decompression reads ahead of the parser)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        rows = _csv_rows(path)
    elif name.endswith((".jsonl", ".json")):
        rows = _jsonl_rows(path)
    else:
        raise TraceError(f"{path}: unknown trace format (use .csv, .jsonl, optionally .gz)")
    try:
        yield from rows
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: compressed data is truncated or corrupt ({e})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """CSV records (``rlpredict.records.csv_records``: its rules for a record, its line
    numbers); a bad record raises at the line where it starts."""
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        records = csv_records(f)
        try:
            _, names, _, _ = next(records, (1, [], None, None))
        except RecordError as e:
            raise TraceError(f"{path}:1: {e.reason}") from None
        assert names is not None
        if not names:
            raise TraceError(f"{path}: empty CSV file (no header)")
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}")
        try:
            for line, cells, problem, _ in records:
                if problem is not None or cells is None:
                    raise TraceError(f"{path}:{line}: {problem or 'malformed CSV'}")
                # an empty cell is a missing value, as ``rlpredict annotate`` reads it
                yield line, {k: v for k, v in zip(names, cells, strict=True) if v != ""}
        except RecordError as e:  # a record too large to read (a quote left open)
            raise TraceError(f"{path}: {e.reason}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """JSON objects, one per line, read by ``rlpredict annotate``'s rules (``records``: lines
    split on b"\\n" only, at most ``MAX_ROW_BYTES`` each; was: a line of any size held whole)."""
    with _open_binary(path) as f:
        for line_no, data in enumerate(bounded_lines(f), 1):
            try:
                line = decode_line(data, line_no)
                if not line.strip():
                    continue
                row = parse_json(line)
            except RecordError as e:
                raise TraceError(f"{path}:{line_no}: {e.reason}") from None
            if not isinstance(row, dict):
                raise TraceError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, row


#: A number as a CSV cell may spell it: ASCII digits, optional sign, fraction and exponent
#: (``float`` would also take ``1_000``, other scripts' digits, ``inf`` and ``nan``).
_PLAIN_NUMBER = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def is_plain_number(v: object) -> bool:
    """Not a string, or a number written in plain ASCII digits (``float`` also takes ``1_000``
    and other scripts' digits)."""
    return not isinstance(v, str) or _PLAIN_NUMBER.fullmatch(v) is not None


def _int(row: dict, key: str, where: str, minimum: int) -> int:
    v = row.get(key)
    if isinstance(v, bool) or not is_plain_number(v):
        raise TraceError(f"{where}: {key} must be an integer, got {_short(v)}")
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{where}: {key} must be an integer, got {_short(v)}") from None
    if isinstance(v, int) and not minimum <= v <= MAX_COUNT:  # exact: 2^53 + 1 is no float
        x = math.inf
    if not math.isfinite(x) or x != int(x) or not minimum <= x <= MAX_COUNT:
        raise TraceError(f"{where}: {key} must be an integer in [{minimum}, 2^53], got {_short(v)}")
    return int(x)


def _short(v: object) -> str:
    """``repr(v)``, cut to 60 characters (a garbled cell can be huge)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


#: The fields a request can come from; a row with none of them (a length-only trace) skips
#: ``request_of`` and the exception it would raise on every row.
_REQUEST_FIELDS = frozenset((TRACE_FIELDS.prompt, *TRACE_FIELDS.messages))


def _why_no_request() -> str:
    """``request_of``'s own words for a row with none of ``_REQUEST_FIELDS``."""
    try:
        request_of({}, TRACE_FIELDS)
    except RecordError as e:
        return str(e)
    raise AssertionError("request_of took an empty row")


_NO_REQUEST = _why_no_request()


def _prompt_input(row: dict) -> tuple[str | list | None, str | None, str]:
    """What a predictor sees, as ``rlpredict annotate`` reads it (``records.request_of`` and
    ``generator_of``: the messages win over the prompt): the request, its generator, and why
    the row has none ("" if it has one). Only ``--predictions bundle`` needs prompts, so a row
    without one is no error here."""
    if _REQUEST_FIELDS.isdisjoint(row):
        return None, None, _NO_REQUEST
    try:
        return request_of(row, TRACE_FIELDS), generator_of(row, TRACE_FIELDS), ""
    except RecordError as e:
        return None, None, str(e)


def read_trace(path: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS, *, keep_prompts: bool = True) -> Trace:
    """Read and validate a trace; raises TraceError naming the file and line of a bad row.

    ``max_tokens`` applies to rows without a ``max_tokens`` field (never below their true length).
    ``keep_prompts=False`` keeps no prompt or generator (the trace's ``prompts`` is None): what a
    replay needs when no predictor reads them, in memory of the lengths alone.
    """
    if not (is_whole(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")  # was: -5 accepted
    p = Path(path)
    if not p.is_file():
        why = ("is a folder, not a trace file" if p.is_dir() else "not a regular file (a device or a pipe); "
               "give a trace file" if p.exists() else "no such trace file")
        raise TraceError(f"{p}: {why}")
    arr, inp, out, mx, rl, prompts, gens = [], [], [], [], [], [], []
    has_rl: bool | None = None  # the first row's: every row must agree
    first_line = 0
    prompt_problem = ""
    for line_no, row in _rows(p):
        where = f"{p}:{line_no}"
        for k in REQUIRED:
            if row.get(k) in (None, ""):
                raise TraceError(f"{where}: missing {k}")
        if isinstance(row["arrival_time_s"], bool) or not is_plain_number(row["arrival_time_s"]):
            raise TraceError(f"{where}: arrival_time_s must be a number, got {_short(row['arrival_time_s'])}")
        try:
            a = float(row["arrival_time_s"])
        except (TypeError, ValueError, OverflowError):
            raise TraceError(f"{where}: arrival_time_s must be a number, got {_short(row['arrival_time_s'])}") from None
        if not (math.isfinite(a) and a >= 0):
            raise TraceError(f"{where}: arrival_time_s must be a finite number >= 0, got {a}")
        o = _int(row, "output_tokens", where, 1)
        arr.append(a)
        inp.append(_int(row, "input_tokens", where, 1))
        out.append(o)
        mx.append(_int(row, "max_tokens", where, 1) if row.get("max_tokens") not in (None, "") else max(max_tokens, o))
        missing = [k for k in RL_FIELDS if row.get(k) in (None, "")]
        row_rl = not missing
        if missing and len(missing) < len(RL_FIELDS):  # ignoring the rest would be silent
            raise TraceError(f"{where}: missing {missing[0]}: the rl_* fields ({', '.join(RL_FIELDS)}) "
                             "come all three or none")
        if has_rl is None:
            has_rl, first_line = row_rl, line_no
        elif has_rl != row_rl:
            raise TraceError(f"{where}: {'has' if row_rl else 'has no'} rl_* fields but the first row "
                             f"(line {first_line}) {'has none' if row_rl else 'has them'}: they come on "
                             "every row or on none")
        if row_rl:
            # a reservation holds at least one token (annotate never writes less)
            rl.append([_int(row, k, where, lo) for k, lo in zip(RL_FIELDS, (0, 0, 1), strict=True)])
        if not keep_prompts:
            continue
        prompt, g, problem = _prompt_input(row)
        prompts.append(prompt)
        gens.append(g)
        if problem and not prompt_problem:
            prompt_problem = f"{where}: {problem}"
    if not arr:
        raise TraceError(f"{p}: trace has no rows")
    order = np.argsort(np.asarray(arr), kind="stable")
    arrivals = np.asarray(arr, dtype=float)[order]
    # Unix timestamps: times past REBASE_AFTER_S are taken from the first arrival, else a float
    # holds the gaps between them too coarsely (at 1.7e18, every latency came out 0)
    offset = float(arrivals[0]) if arrivals[0] > REBASE_AFTER_S else 0.0
    return Trace(
        path=str(p),
        arrival_s=arrivals - offset if offset else arrivals,
        arrival_offset_s=offset,
        input_tokens=np.asarray(inp, dtype=np.int64)[order],
        output_tokens=np.asarray(out, dtype=np.int64)[order],
        max_tokens=np.asarray(mx, dtype=np.int64)[order],
        rl=np.asarray(rl, dtype=np.int64)[order] if has_rl else None,
        prompts=[prompts[i] for i in order] if keep_prompts and all(t is not None for t in prompts) else None,
        generators=[gens[i] for i in order] if any(g is not None for g in gens) else None,
        prompt_problem=prompt_problem,
    )


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times of a Poisson process with ``rate`` requests/s, starting at 0."""
    return gamma_arrivals(n, rate, cv=1.0, seed=seed)


def gamma_arrivals(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Gamma-distributed inter-arrival gaps with mean 1/rate and coefficient of variation ``cv``."""
    if not (rate > 0 and cv > 0):
        raise ValueError(f"rate and cv must be positive, got {rate}, {cv}")
    shape = 1.0 / (cv * cv)
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def burst_arrivals(n: int, rate: float, cv: float = 4.0, burst: int = 8, seed: int = 0) -> np.ndarray:
    """Bursty arrivals: groups of ``burst`` requests arriving at the same instant, the groups
    ``gamma_arrivals`` with mean rate ``rate / burst`` and coefficient of variation ``cv``
    (the mean request rate stays ``rate``). Production traffic comes in such bursts."""
    if burst < 1 or burst != int(burst):
        raise ValueError(f"burst must be a positive integer, got {burst}")
    groups = gamma_arrivals(-(-n // burst), rate / burst, cv, seed)
    return np.repeat(groups, burst)[:n]
