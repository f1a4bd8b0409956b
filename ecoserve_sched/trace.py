"""Request traces: CSV / JSONL (optionally .gz) / Parquet with file:line errors, rate scaling, synthetic arrivals.

Columns: ``arrival_time_s``, ``input_tokens``, ``output_tokens`` (required); ``max_tokens``,
``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens`` (from ``rlpredict annotate``), and a
``prompt`` string or OpenAI ``messages`` list (for ``--predictions bundle``) are optional. A
:class:`TraceFormat` reads other spellings: public traces' own column names and time units.
"""

from __future__ import annotations

import gzip
import heapq
import io
import math
import numbers
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from rlpredict.records import MAX_TOKEN_COUNT as MAX_COUNT
from rlpredict.records import (
    TRACE_FIELDS,
    RecordError,
    bounded_lines,
    csv_records,
    decode_line,
    detect_format,
    generator_of,
    is_plain_number,
    open_parquet,
    parquet_batches,
    parse_json,
    request_of,
    whole_count,
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


#: Seconds per unit of the arrival column; ``iso``: ISO 8601 date-times (Azure's ``TIMESTAMP``).
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "iso": 0.0}
#: The fields a trace's own column names can be mapped to.
MAPPABLE = (*REQUIRED, "max_tokens", *RL_FIELDS, "prompt", "messages", "generator")


@dataclass(frozen=True)
class TraceFormat:
    """How a trace file spells the fields: ``columns`` maps a field to the file's column
    (``{"arrival_time_s": "TIMESTAMP"}``), ``time_unit`` is the arrival column's unit (a key
    of ``TIME_UNITS``; ``iso`` date-times without a zone are UTC), ``skip_bad_rows`` skips
    a bad row (counted, the first one named) instead of stopping at it, and ``drawn_arrivals``
    says the arrival times will be drawn (``--arrivals poisson|gamma|burst8``): the file's own,
    if any, are not read, and its requests keep the file's order (a conversation log's lengths
    have none)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    time_unit: str = "s"
    skip_bad_rows: bool = False
    drawn_arrivals: bool = False

    def __post_init__(self) -> None:
        if unknown := [k for k in self.columns if k not in MAPPABLE]:
            raise ValueError(f"{unknown[0]!r} is not a trace field (one of {', '.join(MAPPABLE)})")
        if empty := [k for k, v in self.columns.items() if not str(v).strip()]:
            raise ValueError(f"{empty[0]} is mapped to an empty column name")
        theirs = list(self.columns.values())
        if twice := sorted({c for c in theirs if theirs.count(c) > 1}):
            raise ValueError(f"column {twice[0]!r} is mapped to two fields")
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time unit must be one of {', '.join(TIME_UNITS)}, got {self.time_unit!r}")

    def label(self, key: str) -> str:
        """How a message names ``key``: with the file's column when it is mapped."""
        return f"{self.columns[key]} (read as {key})" if key in self.columns else key


#: The latest arrival a trace may have (about 2,000 years): a float clock there still steps by
#: 15 us, and the simulator's iteration times (milliseconds) are lost to rounding far past it
#: (a reviewer's run at 1e13 s: mean JCT 0.009 s for 3.5 s).
MAX_ARRIVAL_S = 2.0**36


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
    skipped_rows: int = 0  # bad rows skipped (``TraceFormat.skip_bad_rows``)
    first_skipped: str = ""  # ``file:line: why`` of the first of them
    unused_rows: int = 0  # good rows left out after the earliest ones (``read_trace``'s ``keep``, ``head``)
    # rows without a max_tokens field whose true length is above ``read_trace``'s ``max_tokens``:
    # their max_tokens is their true length
    raised_max_tokens: int = 0
    # every row's (prompt or None, ``file:line: why``) in arrival order, where some row has no
    # usable prompt: ``head`` keeps the problem only if a row it keeps has it
    prompt_rows: list[tuple[Any, str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Columns of one length, and arrival times finite and >= 0 (a NaN arrival made the
        simulator loop forever): what ``read_trace`` checks per row, for a trace built in code.
        The trace keeps read-only copies of what it checked (was: the caller's arrays, which a
        later write took past these checks: a NaN arrival hung the replay, -5 prompt tokens
        "finished")."""
        n = len(self.arrival_s)
        columns = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                   "max_tokens": self.max_tokens, "rl": self.rl, "prompts": self.prompts,
                   "generators": self.generators}
        if bad := [k for k, c in columns.items() if c is not None and len(c) != n]:
            raise ValueError(f"trace {self.path}: column {bad[0]} has {len(columns[bad[0]])} rows, "
                             f"arrival_s has {n}")
        arrivals = np.array(self.arrival_s, dtype=float)
        lengths = {name: np.array(getattr(self, name)) for name in ("input_tokens", "output_tokens", "max_tokens")}
        if flat := [(k, c.shape) for k, c in {"arrival_s": arrivals, **lengths}.items() if c.ndim != 1]:
            raise ValueError(f"trace {self.path}: {flat[0][0]} must be one-dimensional, got shape {flat[0][1]}")
        if n and not (np.isfinite(arrivals).all() and arrivals.min() >= 0):
            raise ValueError(f"trace {self.path}: arrival times must be finite and >= 0")
        if n and arrivals.max() > MAX_ARRIVAL_S:
            raise ValueError(f"trace {self.path}: arrival times must be at most 2^36 s (about 2,000 years), got "
                             f"{arrivals.max():g}: past that, the simulator's clock loses its iteration times")
        if n > 1 and (down := np.flatnonzero(np.diff(arrivals) < 0)).size:  # capacity searches
            # read the span from the ends (was: a wrong answer without a word)
            raise ValueError(f"trace {self.path}: not sorted by arrival (row {down[0] + 1} arrives "
                             "before the row above it): sort every column by arrival_s, e.g. "
                             "with np.argsort(arrival_s, kind='stable')")
        # the lengths as read_trace bounds them; predictions whole numbers (a bucket of -1 and
        # 0 tokens mean "none"). Was: -5 prompt tokens "finished" with negative KV use.
        counts = {name: (column, 1) for name, column in lengths.items()}
        rl = None if self.rl is None else np.array(self.rl)
        if rl is not None:
            if rl.shape != (n, 3):
                raise ValueError(f"trace {self.path}: rl has shape {rl.shape}, expected ({n}, 3)")
            counts.update({k: (rl[:, j], lo) for j, (k, lo) in enumerate(zip(RL_FIELDS, (-1, 0, 0), strict=True))})
        for name, (column, lo) in counts.items():
            if n and (bad := _not_whole(column, lo)) is not None:
                raise ValueError(f"trace {self.path}: row {bad}: {name} must be a whole number in "
                                 f"[{lo}, 2^53], got {np.asarray(column, dtype=object)[bad]!r}")
        # numpy columns of the types the simulator reads (was: whole floats, as pandas gives
        # them, and Python lists passed this check and failed in the simulator)
        kept = {"arrival_s": arrivals, **{name: c.astype(np.int64) for name, c in lengths.items()},
                **({"rl": rl.astype(np.int64)} if rl is not None else {})}
        for name, column in kept.items():
            column.flags.writeable = False
            object.__setattr__(self, name, column)

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
        if not (np.isfinite(arrivals).all() and (not len(arrivals) or arrivals.max() <= MAX_ARRIVAL_S)):
            raise ValueError(f"{self.path}: arrival times at rate scale {rate_scale:g} are past 2^36 s "
                             "(too small a rate scale or --rate): the simulator's clock would lose its "
                             "iteration times")
        return replace(self, arrival_s=arrivals)

    def with_arrivals(self, arrival_s: np.ndarray) -> Trace:
        """The same requests, in the same order, arriving at ``arrival_s`` (no longer taken from
        the file's first arrival)."""
        return replace(self, arrival_s=np.asarray(arrival_s, dtype=float), arrival_offset_s=0.0)

    def head(self, n: int) -> Trace:
        """The first ``n`` requests by arrival. A row without a usable prompt matters only if
        kept (was: ``--max-requests 2`` failed on the file's third row)."""
        if not (is_whole(n) and n >= 0):  # (was: -1 took all but the last, and counted them unused)
            raise ValueError(f"head: n must be a whole number >= 0, got {n!r}")
        n = int(n)
        prompts, problem, rows = self.prompts, self.prompt_problem, self.prompt_rows
        if rows is not None:
            rows = rows[:n]
            problem = next((why for prompt, why in rows if prompt is None), "")
            prompts = None if problem else [prompt for prompt, _ in rows]
            rows = rows if problem else None
        return replace(self, unused_rows=self.unused_rows + max(len(self) - n, 0),
                       arrival_s=self.arrival_s[:n], input_tokens=self.input_tokens[:n],
                       output_tokens=self.output_tokens[:n], max_tokens=self.max_tokens[:n],
                       rl=None if self.rl is None else self.rl[:n],
                       prompts=None if prompts is None else prompts[:n],
                       generators=None if self.generators is None else self.generators[:n],
                       prompt_problem=problem, prompt_rows=rows)

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
    return gzip.open(path, "rb") if detect_format(path)[1] else open(path, "rb")


def _rows(path: Path, fmt: TraceFormat) -> Iterator[tuple[int, dict | None, str]]:
    """``(line, record, problem)`` for each record, the fields renamed by ``fmt.columns``; a
    record that cannot be read has ``None`` and why (the reader goes on after it). A truncated
    or corrupt .gz names the file (not a line: decompression reads ahead of the parser)."""
    # the suffixes ``rlpredict annotate`` reads and writes (``records.detect_format``: any case,
    # .ndjson, .pq; was: .ndjson and .JSONL, which annotate writes, were an unknown format here);
    # a trace's .json is JSON Lines too
    kind, gz = detect_format(path)
    if kind == "csv":
        rows = _csv_rows(path, fmt)
    elif kind in ("jsonl", "json"):
        rows = _jsonl_rows(path, fmt)
    elif kind == "parquet" and not gz:
        rows = _parquet_rows(path, fmt)
    else:
        raise TraceError(f"{path}: unknown trace format (use .csv, or JSON Lines as .jsonl, .ndjson or "
                         ".json, optionally .gz, or .parquet)")
    try:
        yield from rows
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: compressed data is truncated or corrupt ({e})") from None


def _renamed_header(path: Path, names: list[str], fmt: TraceFormat, at: str = ":1") -> list[str]:
    """The CSV header with ``fmt.columns`` applied; a mapped column the file lacks, or a field
    given by two columns, is refused (one of them would be ignored)."""
    ours = {theirs: key for key, theirs in fmt.columns.items()}
    # a field's name with spaces around it (`a, max_tokens`): meant, but read as written, it
    # would be another column (was: told to map it with --columns, which strips the names it
    # is given; an optional field such as max_tokens ignored without a word)
    if spaced := [c for c in names if c != c.strip() and c.strip() in MAPPABLE and c.strip() not in names
                  and c not in fmt.columns.values()]:
        raise TraceError(f"{path}{at}: column {spaced[0]!r} is {spaced[0].strip()} with spaces around its "
                         "name: a header's names are read as written; write the header without them")
    if absent := [c for c in fmt.columns.values() if c not in names]:
        raise TraceError(f"{path}{at}: no column {absent[0]!r} (mapped to {ours[absent[0]]}); the "
                         f"header has {_header_text(names)}")
    if clash := [c for c in names if c in fmt.columns and c not in ours]:
        raise TraceError(f"{path}{at}: column {clash[0]!r} is in the file and {fmt.columns[clash[0]]!r} "
                         f"is mapped to it: give one of the two")
    renamed = [ours.get(c, c) for c in names]
    if missing := [c for c in _required(fmt) if c not in renamed]:
        raise TraceError(f"{path}{at}: missing column(s) {', '.join(missing)}; the header has "
                         f"{_header_text(names)} (map its names with --columns, e.g. "
                         f"--columns {missing[0]}=COLUMN{_NO_TIMES if missing == ['arrival_time_s'] else ''})")
    return renamed


#: What a trace without arrival times can do (said where one is missing).
_NO_TIMES = "; a trace without arrival times gets drawn ones from `ecoserve simulate --arrivals poisson --rate R`"


def _required(fmt: TraceFormat) -> tuple[str, ...]:
    """The fields a row (or header) must give: not the arrival time when times will be drawn."""
    return REQUIRED[1:] if fmt.drawn_arrivals else REQUIRED


def _header_text(names: list[str]) -> str:
    shown = ", ".join(_short(n) for n in names[:12])
    return shown + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def _csv_rows(path: Path, fmt: TraceFormat) -> Iterator[tuple[int, dict | None, str]]:
    """CSV records (``rlpredict.records.csv_records``: its rules for a record, its line
    numbers)."""
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        records = csv_records(f)
        try:
            _, names, _, _ = next(records, (1, [], None, None))
        except RecordError as e:
            raise TraceError(f"{path}:{e.location or 1}: {e.reason}") from None
        assert names is not None
        if not names:
            raise TraceError(f"{path}: empty CSV file (no header)")
        names = _renamed_header(path, names, fmt)
        try:
            for line, cells, problem, _ in records:
                if problem is not None or cells is None:
                    yield line, None, problem or "malformed CSV"
                else:  # an empty cell is a missing value, as ``rlpredict annotate`` reads it
                    yield line, {k: v for k, v in zip(names, cells, strict=True) if v != ""}, ""
        except RecordError as e:  # a record too large to read (a quote left open)
            raise TraceError(f"{path}: {e.reason}") from None


def _parquet_rows(path: Path, fmt: TraceFormat) -> Iterator[tuple[int, dict | None, str]]:
    """Parquet rows (what ``rlpredict annotate`` writes for a Parquet input), numbered from 1, in
    batches of 4,096: a missing value (null) is a missing field, as an empty CSV cell; a
    date-time is read as its ISO 8601 text (``--time-unit iso``)."""
    try:
        pf = open_parquet(path, whole_rows=True)
    except ImportError:
        raise TraceError(f"{path}: reading Parquet needs pyarrow (the [parquet] extra: "
                         "pip install 'rlpredict[parquet]')") from None
    except RecordError as e:
        raise TraceError(str(e)) from None
    names = _renamed_header(path, pf.schema_arrow.names, fmt, at="")  # (no header line)
    n = 0
    try:
        for batch in parquet_batches(pf, path, 4096):
            for row in batch.to_pylist():
                n += 1
                yield n, {k: v.isoformat() if isinstance(v, date) else v  # (a datetime is a date)
                          for k, v in zip(names, row.values(), strict=True) if v is not None}, ""
    except RecordError as e:
        raise TraceError(str(e)) from None


def _jsonl_rows(path: Path, fmt: TraceFormat) -> Iterator[tuple[int, dict | None, str]]:
    """JSON objects, one per line, read by ``rlpredict annotate``'s rules (``records``: lines
    split on b"\\n" only, at most ``MAX_ROW_BYTES`` each; was: a line of any size held whole)."""
    ours = {theirs: key for key, theirs in fmt.columns.items()}
    # given twice, which one is meant? (the fields read, ``model`` as the generator too)
    read = frozenset((*MAPPABLE, *TRACE_FIELDS.generator, *fmt.columns.values()))
    if fmt.drawn_arrivals:  # not read: may repeat
        read -= {"arrival_time_s", fmt.columns.get("arrival_time_s", "arrival_time_s")}
    unseen = set(fmt.columns.values())  # mapped columns no row has had yet
    with _open_binary(path) as f:
        for line_no, data in enumerate(bounded_lines(f), 1):
            line = ""
            try:
                line = decode_line(data, line_no)
                if not line.strip():
                    continue
                row = parse_json(line, read)
            except RecordError as e:
                why = e.reason
                if line_no == 1 and line.strip() in ("[", "{"):  # pretty-printed JSON
                    why += " (a trace is JSON Lines: one object per line)"
                yield line_no, None, why
                continue
            if not isinstance(row, dict):
                yield line_no, None, "expected a JSON object (a trace is JSON Lines: one object per line)"
            elif clash := [c for c in row if c in fmt.columns and c not in ours]:
                yield line_no, None, (f"field {clash[0]!r} is in the row, but --columns reads {clash[0]} from "
                                      f"{fmt.columns[clash[0]]!r}: one of the two would be ignored")
            else:
                if unseen:
                    unseen.difference_update(row)
                yield line_no, {ours.get(k, k): v for k, v in row.items()} if ours else row, ""
    if unseen:  # a typo in --columns would leave a field missing on every row, silently
        name = sorted(unseen)[0]
        raise TraceError(f"{path}: no row has the field {name!r} (mapped to {ours[name]} by --columns)")


def _int(row: dict, key: str, where: str, minimum: int, fmt: TraceFormat | None = None) -> int:
    """A count by ``records.whole_count``, the rule training's log reader uses too."""
    v = row.get(key)
    n = whole_count(v, minimum)
    if n is None:
        name = fmt.label(key) if fmt else key
        number = (isinstance(v, str) and is_plain_number(v)) or (isinstance(v, numbers.Number) and not isinstance(v, bool))
        what = f"an integer in [{minimum}, 2^53]" if number else "an integer"  # (a list is no integer out of range)
        raise TraceError(f"{where}: {name} must be {what}, got {_short(v)}")
    return n


_DATE = re.compile(r"\s*[0-9]{4}-[0-9]{2}-[0-9]{2}")
_FRACTION = re.compile(r"\.([0-9]+)")


def _iso_datetime(text: str) -> datetime:
    """``datetime.fromisoformat``, with what Python 3.10 refused and 3.11 reads in traces' times
    written as 3.11 reads them: the fraction of a second to microseconds (Azure writes 7 digits:
    cut to 6; ``.12``: ``.120000``) and a trailing ``Z`` as UTC. Other forms 3.11 added (a
    ``+0000`` offset, the compact ``20231116T181546``) stay 3.11's."""
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "00000")[:6], text.strip(), count=1)
    return datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)


def _arrival(row: dict, where: str, fmt: TraceFormat) -> float:
    """The row's arrival time in seconds, read in ``fmt.time_unit``."""
    v, name = row["arrival_time_s"], fmt.label("arrival_time_s")
    if fmt.time_unit == "iso":
        if not isinstance(v, str):
            raise TraceError(f"{where}: {name} must be an ISO 8601 date-time (--time-unit iso), got {_short(v)}")
        try:
            t = _iso_datetime(v)
        except ValueError:
            raise TraceError(f"{where}: {name} must be an ISO 8601 date-time (--time-unit iso), "
                             f"got {_short(v)}") from None
        a = (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    else:
        if isinstance(v, bool) or not is_plain_number(v):
            hint = " (a date-time: pass --time-unit iso)" if isinstance(v, str) and _DATE.match(v) else ""
            raise TraceError(f"{where}: {name} must be a number, got {_short(v)}{hint}")
        try:
            a = float(v) * TIME_UNITS[fmt.time_unit]
        except (TypeError, ValueError, OverflowError):
            raise TraceError(f"{where}: {name} must be a number, got {_short(v)}") from None
    if not (math.isfinite(a) and a >= 0):
        raise TraceError(f"{where}: {name} must be a finite time >= 0 (1970 or later), got {_short(v)}")
    return a


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


_NO_REQUEST = _why_no_request().split(" (")[0]  # (not the empty row's keys)


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


def check_trace_file(path: str | Path) -> Path:
    """``path`` if it is a file a trace can be read from, else :class:`TraceError` saying why
    (read_trace's first check; the CLI makes it before it checks its outputs)."""
    if isinstance(path, str) and not path.strip():  # (was: ".: is a folder, not a trace file")
        raise TraceError("empty trace path: give a trace file")
    p = Path(path)
    if not p.is_file():
        why = ("is a folder, not a trace file" if p.is_dir() else "not a regular file (a device or a pipe); "
               "give a trace file" if p.exists() else "no such trace file")
        raise TraceError(f"{p}: {why}")
    return p


def read_trace(path: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS, *, keep_prompts: bool = True,
               fmt: TraceFormat | None = None, keep: int | None = None) -> Trace:
    """Read and validate a trace; raises TraceError naming the file and line of a bad row
    (``fmt.skip_bad_rows``: skips it, counted in the trace's ``skipped_rows``).

    ``max_tokens`` applies to rows without a ``max_tokens`` field (never below their true length).
    ``keep_prompts=False`` keeps no prompt or generator (the trace's ``prompts`` is None): what a
    replay needs when no predictor reads them, in memory of the lengths alone. ``fmt`` says how
    the file spells the fields (default: as above, times in seconds). ``keep`` keeps only that
    many requests, the earliest (``Trace.head``'s, with drawn times the file's first), in memory
    of those alone whatever the file's size (every row is still checked; ``unused_rows`` counts
    the good ones left out).
    """
    if not (is_whole(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")  # was: -5 accepted
    if keep is not None and not (is_whole(keep) and keep >= 1):
        raise ValueError(f"keep must be a whole number >= 1, got {keep!r}")
    if fmt is not None and not isinstance(fmt, TraceFormat):  # (was: AttributeError on 'columns')
        raise TypeError(f"read_trace: fmt must be a TraceFormat, got {type(fmt).__name__}")
    fmt = fmt or TraceFormat()
    p = check_trace_file(path)
    arr, inp, out, mx, rl, prompts, gens, whys = [], [], [], [], [], [], [], []
    lines: list[int] = []  # each kept row's line, for an error between rows
    has_rl: bool | None = None  # the first good row's: every row must agree
    first_line = 0
    skipped, first_skipped = 0, ""
    # ``keep``: the earliest rows so far, by (arrival, row), as a heap whose top is the latest
    earliest: list[tuple[float, int, tuple]] = []
    good = 0
    for line_no, row, problem in _rows(p, fmt):
        where = f"{p}:{line_no}"
        try:
            if row is None:
                raise TraceError(f"{where}: {problem}")
            values = _lengths(row, where, fmt)
        except TraceError as e:
            if not fmt.skip_bad_rows:
                raise
            skipped += 1
            first_skipped = first_skipped or str(e)
            continue
        row_rl = values[4] is not None
        if has_rl is not None and has_rl != row_rl:  # the file's, not the row's: never skipped
            raise TraceError(f"{where}: {'has' if row_rl else 'has no'} rl_* fields but the first row "
                             f"(line {first_line}) {'has none' if row_rl else 'has them'}: they come on "
                             "every row or on none")
        if has_rl is None:
            has_rl, first_line = row_rl, line_no
        a, i, o, m, row_rl_values = values
        a = 0.0 if a is None else a  # drawn times: the file's order
        good += 1
        if keep is not None and len(earliest) == keep and (-a, -good) < earliest[0][:2]:
            continue  # later than every request kept: not parsed further
        prompt = g = None
        why = ""
        if keep_prompts:
            prompt, g, why = _prompt_input(row)
            why = f"{where}: {why}" if prompt is None else ""
        kept = (a, line_no, i, o, m, row_rl_values, prompt, g, why)
        if keep is None:
            _append_row(kept, arr, lines, inp, out, mx, rl, prompts, gens, whys, keep_prompts)
        elif len(earliest) < keep:
            heapq.heappush(earliest, (-a, -good, kept))
        else:
            heapq.heapreplace(earliest, (-a, -good, kept))
    for *_, kept in sorted(earliest, reverse=True):  # by arrival, then row
        _append_row(kept, arr, lines, inp, out, mx, rl, prompts, gens, whys, keep_prompts)
    prompt_problem = next((why for why in whys if why), "")
    # a row without its own max_tokens takes ``max_tokens``, never below its true length (the
    # request generated that many): counted, so that a caller can say so
    raised = sum(m is None and o > max_tokens for m, o in zip(mx, out, strict=True))
    mx = [max(max_tokens, o) if m is None else m for m, o in zip(mx, out, strict=True)]
    if not arr:
        raise TraceError(f"{p}: trace has no rows" + (f" left: all {skipped} were bad (first: {first_skipped})"
                                                      if skipped else ""))
    order = np.argsort(np.asarray(arr), kind="stable")
    arrivals = np.asarray(arr, dtype=float)[order]
    # Unix timestamps: times past REBASE_AFTER_S are taken from the first arrival, else a float
    # holds the gaps between them too coarsely (at 1.7e18, every latency came out 0)
    offset = float(arrivals[0]) if arrivals[0] > REBASE_AFTER_S else 0.0
    if arrivals[-1] - offset > MAX_ARRIVAL_S:  # a file's, not a row's: never skipped (was: a
        # ValueError from Trace naming no line)
        name = fmt.label("arrival_time_s")
        raise TraceError(f"{p}:{lines[order[-1]]}: {name} comes {arrivals[-1] - offset:g} s after the first "
                         f"arrival (line {lines[order[0]]}): a trace may span at most 2^36 s (about 2,000 "
                         "years); past that the simulator's clock loses its iteration times")
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
        prompt_rows=[(prompts[i], whys[i]) for i in order] if keep_prompts and prompt_problem else None,
        skipped_rows=skipped,
        first_skipped=first_skipped,
        unused_rows=good - len(arr),
        raised_max_tokens=raised,
    )


def _append_row(row: tuple, arr: list, lines: list, inp: list, out: list, mx: list, rl: list,
                prompts: list, gens: list, whys: list, keep_prompts: bool) -> None:
    """``read_trace``: one kept row into its columns."""
    a, line_no, i, o, m, row_rl_values, prompt, g, why = row
    arr.append(a)
    lines.append(line_no)
    inp.append(i)
    out.append(o)
    mx.append(m)
    if row_rl_values is not None:
        rl.append(row_rl_values)
    if keep_prompts:
        prompts.append(prompt)
        gens.append(g)
        whys.append(why)


def _lengths(row: dict, where: str, fmt: TraceFormat
             ) -> tuple[float | None, int, int, int | None, list[int] | None]:
    """A row's arrival (s; None: none, and the times will be drawn), input, output and max
    tokens (None: none), and its rl_* values (None: none)."""
    required = _required(fmt)
    for k in required:
        if row.get(k) in (None, ""):
            raise TraceError(f"{where}: missing {fmt.label(k)}" + (f" ({_NO_TIMES.removeprefix('; ')})"
                                                                  if k == "arrival_time_s" else ""))
    a = None if fmt.drawn_arrivals else _arrival(row, where, fmt)
    o = _int(row, "output_tokens", where, 1, fmt)
    i = _int(row, "input_tokens", where, 1, fmt)
    m = _int(row, "max_tokens", where, 1, fmt) if row.get("max_tokens") not in (None, "") else None
    missing = [k for k in RL_FIELDS if row.get(k) in (None, "")]
    if missing and len(missing) < len(RL_FIELDS):  # ignoring the rest would be silent
        raise TraceError(f"{where}: missing {missing[0]}: the rl_* fields ({', '.join(RL_FIELDS)}) "
                         "come all three or none")
    # a reservation holds at least one token (annotate never writes less)
    rl = None if missing else [_int(row, k, where, lo, fmt) for k, lo in zip(RL_FIELDS, (0, 0, 1), strict=True)]
    return a, i, o, m, rl


def describe(trace: Trace) -> str:
    """One line on what was read: rows, span and rate (a millisecond column read as seconds
    shows as a 1,000x longer span), the rebase and what was skipped."""
    n, a = len(trace), trace.arrival_s
    span = float(a[-1] - a[0]) if n else 0.0
    text = f"{trace.path}: {n} request{'' if n == 1 else 's'} over {span:.6g} s"
    if span > 0 and n > 1:
        text += f" ({(n - 1) / span:.4g} requests/s)"
    if trace.arrival_offset_s:
        text += f"; times taken from the first arrival ({trace.arrival_offset_s:.10g} s)"
    if trace.skipped_rows:
        text += f"; skipped {trace.skipped_rows} bad rows (first: {trace.first_skipped})"
    return text


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times of a Poisson process with ``rate`` requests/s, starting at 0."""
    return gamma_arrivals(n, rate, cv=1.0, seed=seed)


#: The drawn arrivals' rate (requests/s) and coefficient of variation: beyond these the gamma
#: draw under- or overflows (``--rate``, ``--cv``).
RATE_RANGE = (1e-6, 1e9)
#: A rate multiplier's largest value (was: none, and 1e308 failed after the runs, in a plot)
MAX_RATE_SCALE = 1e6
CV_RANGE = (1e-3, 100.0)


def _check_drawn(n: int, rate: float, cv: float) -> None:
    if not (is_whole(n) and n >= 0):  # (was: 0 raised IndexError)
        raise ValueError(f"n must be a whole number >= 0, got {n!r}")
    for name, v, (lo, hi) in (("rate", rate, RATE_RANGE), ("cv", cv, CV_RANGE)):
        if not (is_real(v) and lo <= v <= hi):  # (was: cv 1e-300 a ZeroDivisionError, rate inf all zeros)
            raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")


def gamma_arrivals(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Gamma-distributed inter-arrival gaps with mean 1/rate and coefficient of variation ``cv``."""
    _check_drawn(n, rate, cv)
    return _gamma_arrivals(n, rate, cv, seed)


def _gamma_arrivals(n: int, rate: float, cv: float, seed: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0)
    shape = 1.0 / (cv * cv)
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def burst_arrivals(n: int, rate: float, cv: float = 4.0, burst: int = 8, seed: int = 0) -> np.ndarray:
    """Bursty arrivals: groups of ``burst`` requests arriving at the same instant, the groups
    ``gamma_arrivals`` with mean rate ``rate / burst`` and coefficient of variation ``cv``
    (the mean request rate stays ``rate``). Production traffic comes in such bursts."""
    if not (is_whole(burst) and burst >= 1):
        raise ValueError(f"burst must be a whole number >= 1, got {burst!r}")
    _check_drawn(n, rate, cv)  # the rate asked for, not the groups' (was: --rate 1e-6 refused as 1.25e-07)
    groups = _gamma_arrivals(-(-n // burst), rate / burst, cv, seed)
    return np.repeat(groups, burst)[:n]
