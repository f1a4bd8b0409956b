"""Annotate a request trace with predictions, streaming, in bounded memory.

Input: JSONL (``.jsonl``/``.ndjson``, optionally ``.gz``), CSV (optionally ``.gz``) or Parquet.
Each row carries a prompt string or an OpenAI-style message list (``[{role, content}, ...]``;
in CSV a JSON string). When a row has both, the messages win. The output, in the input's format,
is every input row unchanged plus ``rl_bucket``, ``rl_pred_tokens`` and ``rl_reserve_tokens``
(columns of those names already in the input are overwritten). JSONL rows keep their original
bytes, with the three fields spliced in before the closing brace.

A bad row (invalid JSON or UTF-8, no prompt/messages, wrong types) stops the run with its line
number (``on_error="fail"``) or goes to a rejects JSONL file with the reason
(``on_error="skip"``), one JSON object per bad row: ``line`` (text formats) or ``row_number``
(Parquet, from 1), ``reason`` and the raw ``row``; rows in = rows out + rows rejected.
The output and the rejects file are written to temporary files and renamed at the end: an error
or Ctrl-C leaves no partial file. Blank lines are not rows, and an input with no row is an
error; in CSV an empty cell is a missing value. Parquet needs pyarrow (imported only for Parquet files).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from rlpredict import records
from rlpredict.outputs import atomic_path, check_new_file, check_paths, listed_by, naming
from rlpredict.records import (
    COMPRESSION_ERRORS,
    NO_REQUEST_FIELD,
    TRACE_FIELDS,
    Fields,
    OnError,
    RecordError,
    bounded_lines,
    csv_records,
    decode_line,
    json_kind,
    line_bytes,
    open_parquet,
    parquet_batches,
    parse_json,
    text_stream,
)
from rlpredict.records import detect_format as _detect_format
from rlpredict.serve.conformal import QUANTILE_COLUMN, column_name
from rlpredict.serve.runtime import Predictor, Request, lacks_user_text
from rlpredict.untrusted_text import is_valid_unicode

COLUMNS = ("rl_bucket", "rl_pred_tokens", "rl_reserve_tokens")
#: A chunk is predicted and written once it holds ``chunk_rows`` rows or this many characters
#: of row text, whichever comes first: memory stays bounded however long the rows are.
CHUNK_CHARS = 16 << 20
Format = Literal["jsonl", "csv", "parquet"]


class AnnotateError(ValueError):
    """A bad input row (in fail mode), an unreadable input, or an unsupported file name."""


class BadRow(ValueError):
    """Why one row cannot be annotated; ``kind``: the reason without the row's value (the
    tally's key, ``RecordError.kind``)."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class AnnotateSummary:
    input: str
    output: str
    rejects: str | None
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rows_replaced: int = 0  # rows out that already had rl_* fields: their values were replaced
    rows_without_generator: int = 0  # rows out predicted as "model: unknown" by a bundle that takes one
    rows_without_user_text: int = 0  # rows out with no text where the bundle reads it: predicted as an empty prompt
    # rows out keeping each rl_q*_tokens field this run did not write (an earlier --quantiles run's)
    stale_fields: dict[str, int] = field(default_factory=dict)
    # fail mode: the default rejects file beside the output, left from an earlier skip run (not
    # this run's: it writes none, and never deletes one)
    earlier_rejects: str | None = None
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


def detect_format(path: str | Path) -> tuple[Format, bool]:
    """(format, gzipped) from a file name: .jsonl/.ndjson/.csv (each optionally .gz), .parquet/.pq."""
    fmt, gz = _detect_format(path)
    if fmt not in ("jsonl", "csv", "parquet") or (gz and fmt == "parquet"):
        raise AnnotateError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .csv, .csv.gz or .parquet")
    return fmt, gz


def corrupt_compressed(src: str | Path, e: BaseException) -> AnnotateError:
    return AnnotateError(f"{src}: truncated or corrupt compressed file ({e})")


def no_rows(src: str | Path, fmt: str) -> AnnotateError:
    """An input with no row: an error, as in every other command, not an empty output."""
    what = {"jsonl": "is empty or holds only blank lines", "parquet": "has 0 rows",
            "csv": "holds a header and no row, or only blank lines"}[fmt]
    return AnnotateError(f"{src}: no rows to annotate (the file {what})")


#: What a file that names its request otherwise is told.
FIELD_HINT = "name the request's field with --prompt-field or --messages-field"


def none_annotated(src: str | Path, summary: AnnotateSummary, reasons: Counter[str]) -> AnnotateError:
    """Every row rejected (``--on-error skip``): an error, not an output of no rows and exit 0;
    nothing is written (the input holds every row). Was: a header-only output, rc 0."""
    top = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(2))
    hint = f"; {FIELD_HINT}" if any(why.startswith(NO_REQUEST_FIELD) for why in reasons) else ""
    return AnnotateError(f"{src}: no row could be annotated: all {summary.rows_rejected} were rejected ({top}); "
                         f"nothing was written{hint}")


def default_rejects_path(output: str | Path) -> Path:
    """``out.parquet`` -> ``out.rejects.jsonl`` (beside the output; only the format's suffixes
    go: ``run.2024.01.05.csv.gz`` -> ``run.2024.01.05.rejects.jsonl``)."""
    out = Path(output)
    if not out.name:  # "." or "/" (was: "PosixPath('.') has an empty name")
        raise AnnotateError(f"{output}: --output names no file; give a file or a new folder's name")
    return out.with_name(f"{records.source_name(out)}.rejects.jsonl")


# ---- one row -> one request --------------------------------------------------------------------
def request_of(row: Mapping[str, Any], fields: Fields) -> Request:
    """The request in a row (``records.request_of``); raises ``BadRow`` saying what is wrong."""
    try:
        return records.request_of(row, fields)
    except RecordError as e:
        raise BadRow(str(e), e.tally_key) from None


#: What keeps a rejects record on one line for every line reader (``str.splitlines``, Python's
#: ``open``) with the same JSON value: a ``\r`` is whitespace between a row's tokens (JSON
#: strings hold none), and U+0085, U+2028 and U+2029 can stand only inside strings, as escapes
#: there (was: a row's own ``\r`` split its record in two).
ONE_LINE = str.maketrans({"\r": " ", "\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _dumps(obj: Any) -> str:
    """JSON for the UTF-8 output files: non-ASCII kept, escaped only if a string cannot be
    encoded (a lone surrogate from the input's escapes, or undecodable CSV bytes); strict, a
    NaN or an infinity (a Parquet float cell) as its text, "NaN", "Infinity" (was: bare NaN, which
    no strict JSON reader takes; a reviewer's find)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # a float JSON has no number for (the rare path)
        obj = _finite(obj)
        text = json.dumps(obj, ensure_ascii=False, default=str, allow_nan=False)
    return text if is_valid_unicode(text) else json.dumps(obj, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    """``obj`` with each NaN or infinity written as JSON's name for it, a string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if obj != obj else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def generator_of(row: Mapping[str, Any], fields: Fields, wanted: bool) -> str | None:
    """The row's generator if ``wanted`` (``records.generator_of``); raises ``BadRow``."""
    try:
        return records.generator_of(row, fields) if wanted else None
    except RecordError as e:
        raise BadRow(str(e), e.tally_key) from None


# ---- the driver ---------------------------------------------------------------------------------
def bad_row_message(path: str | Path, where: str, number: int, reason: str) -> str:
    """What fail mode reports for the first bad row (``where``: "line" or "row")."""
    if reason.startswith(NO_REQUEST_FIELD):  # a file that names its request otherwise: every row would fail
        return f"{path}: {where} {number}: {reason}; {FIELD_HINT}"
    return f"{path}: {where} {number}: {reason} (use --on-error skip to set bad rows aside)"


class _Run:
    """State shared by the format-specific loops: counts, rejects, progress, errors.

    ``file``: written into each rejects record (runs over a folder of inputs); ``rejects_path``:
    the rejects file's name, for its write errors (``outputs.naming``)."""

    def __init__(self, path: Path, predictor: Predictor, fields: Fields, on_error: OnError,
                 rejects: IO[str] | None, summary: AnnotateSummary, advance: Callable[[float], None],
                 file: str | None = None, quantiles: Sequence[float] = (), rejects_path: Path | None = None):
        self.path, self.predictor, self.fields, self.on_error = path, predictor, fields, on_error
        self.read_twice = frozenset(fields.request_columns())  # refused given twice (ecoserve refuses them too)
        self.rejects, self.summary, self.advance, self.file = rejects, summary, advance, file
        self.rejects_path = rejects_path
        self.reasons: Counter[str] = Counter()
        self.stale: Counter[str] = Counter()  # ``AnnotateSummary.stale_fields``, as counted
        self.wants_generator = predictor.input_spec.include_generator
        self.quantiles = tuple(quantiles)
        self.columns = COLUMNS + tuple(column_name(q) for q in self.quantiles)

    def parse(self, row: Mapping[str, Any]) -> tuple[Request, str | None]:
        return request_of(row, self.fields), generator_of(row, self.fields, self.wants_generator)

    def reject(self, where: str, number: int, reason: str, raw: Any, kind: str | None = None, *,
               json_text: str | None = None) -> None:
        """``kind``: the reason without the row's value, the tally's key (was: the reason, so
        rows with distinct bad values each made a key: a tally as long as the input).
        ``json_text``: the row's own JSON text, written as its ``row`` byte for byte (was: the
        parsed row written again: ``1.50`` as ``1.5``, ``1e400`` as ``Infinity``)."""
        if self.on_error == "fail":
            raise AnnotateError(bad_row_message(self.path, where, number, reason))
        self.summary.rows_rejected += 1
        self.reasons[(kind or reason).split(" (")[0]] += 1  # the details in brackets: in the rejects file
        assert self.rejects is not None
        key = "line" if where == "line" else "row_number"
        record = {"file": self.file} if self.file is not None else {}
        with naming(self.rejects_path) if self.rejects_path is not None else nullcontext():
            if json_text is None:
                line = _dumps({**record, key: number, "reason": reason, "row": raw})
            else:
                line = _dumps({**record, key: number, "reason": reason})[:-1] + f', "row": {json_text.strip()}}}'
            self.rejects.write(line.translate(ONE_LINE) + "\n")

    def stale_in(self, names: Iterable[str]) -> list[str]:
        """The fields of ``names`` that an earlier ``--quantiles`` run wrote and this one does not
        (kept as they are, and said: they are not this bundle's predictions)."""
        return [n for n in names if QUANTILE_COLUMN.fullmatch(n) and n not in self.columns]

    def predict(self, requests: list[Request], generators: list[str | None]) -> list[Any]:
        """One array per output column (``self.columns``), for the given requests."""
        if self.wants_generator:
            self.summary.rows_without_generator += sum(g is None for g in generators)
        spec = self.predictor.input_spec
        self.summary.rows_without_user_text += sum(lacks_user_text(r, spec) for r in requests)
        a = self.predictor.predict_arrays(requests, generators, quantiles=self.quantiles or None)
        quant = [] if a.quantile_tokens is None else list(a.quantile_tokens.T)
        return [a.bucket, a.pred_tokens, a.reserve_tokens, *quant]


def earlier_rejects(output: Path, on_error: OnError) -> str | None:
    """In fail mode, the default rejects file beside ``output`` if one is there: an earlier
    ``--on-error skip`` run's, which this run's output would otherwise seem to go with (both
    engines say so; was: left without a word when ``--force`` replaced the output)."""
    path = default_rejects_path(output)
    if on_error != "fail" or not (path.exists() or path.is_symlink()):
        return None  # (below: an annotated trace of that name, which its folder lists, is not
    return None if listed_by(path) == ANNOTATE_TOOL else str(path)  # one; a reviewer's find)


def rejects_owner(owner: str | None, rejects: str | Path | None) -> str | None:
    """The owner whose record may list the rejects file: a script's (``owner``) for the default
    rejects path, which it listed as the output's own rejects (was: none, so
    `benchmarks/annotate_scale.py`, whose folder lists each output's rejects before the run,
    failed every run; a reviewer's find). Never `rlpredict annotate`'s, whose folders list only
    annotated traces, one of which may be named like a rejects file (a reviewer of the fix), and
    never for a ``--rejects`` given: neither replaces a listed file."""
    return owner if rejects is None and owner != ANNOTATE_TOOL else None


def check_rejects_name(rej_path: Path | None) -> None:
    """The rejects file is JSONL, and its name says so (both engines)."""
    if rej_path is not None and not rej_path.name.lower().endswith(".jsonl"):
        raise AnnotateError(f"{rej_path}: the rejects file is JSONL; give it a .jsonl name")


#: The tool ``rlpredict annotate``'s output folders record (``annotate_ray``): its files may be
#: annotated again, one by one, by the command (``owner``).
ANNOTATE_TOOL = "rlpredict annotate"


def annotate_file(predictor: Predictor, input: str | Path, output: str | Path, *,
                  fields: Fields = TRACE_FIELDS, on_error: OnError = "fail",
                  rejects: str | Path | None = None, chunk_rows: int = 2048,
                  progress: bool = False, force: bool = False,
                  quantiles: Sequence[float] = (), owner: str | None = None) -> AnnotateSummary:
    """Annotate ``input`` into ``output`` (same format family); see the module docstring.
    ``quantiles``: also the bundle's calibrated quantiles, as ``rl_q50_tokens``-style columns.

    The output and the rejects file must differ from the input and from each other, and an
    existing one is replaced only with ``force`` (``rlpredict.outputs``); one a tool of ours
    listed as its output only for that tool (``owner``: a script annotating into its folder)."""
    src, dst = Path(input), Path(output)
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    predictor.check_quantiles(quantiles or None)
    if not src.is_file():
        raise AnnotateError(f"{src}: no such file" if not src.exists() else f"{src}: not a file")
    fmt, _ = detect_format(src)
    if dst.is_dir():
        raise AnnotateError(f"{dst}: is a folder; the output is a file (.jsonl, .jsonl.gz, .csv, .csv.gz or .parquet)")
    out_fmt, _ = detect_format(dst)
    if out_fmt != fmt:
        raise AnnotateError(f"{dst}: output format {out_fmt} differs from the input's ({fmt}); "
                            "annotate keeps the input's format")
    rej_path = Path(rejects) if rejects else default_rejects_path(dst) if on_error == "skip" else None
    check_rejects_name(rej_path)
    outputs = [("--output", dst)] + ([("--rejects", rej_path)] if rej_path else [])
    # never inside the bundle it reads (was: written there, as calibrate and export refuse)
    check_paths([src], outputs, apart=[predictor.bundle.path])
    for option, path in outputs:  # rejects never over a file an output folder lists (was: over its
        # annotated trace with --force, which the folder's record still listed; a reviewer's find)
        check_new_file(path, force=force, option=option,
                       owner=owner if option == "--output" else rejects_owner(owner, rejects))
    summary = AnnotateSummary(str(src), str(dst), str(rej_path) if rej_path else None,
                              earlier_rejects=earlier_rejects(dst, on_error))
    t0 = time.perf_counter()
    with ExitStack() as stack:
        bar = stack.enter_context(_progress(src, fmt, progress))
        tmp_out = stack.enter_context(atomic_path(dst))
        rej_file = None
        if rej_path is not None:
            tmp_rej = stack.enter_context(atomic_path(rej_path))
            rej_file = stack.enter_context(open(tmp_rej, "w", encoding="utf-8"))
        run = _Run(src, predictor, fields, on_error, rej_file, summary, bar, quantiles=quantiles,
                   rejects_path=rej_path)
        loop = {"jsonl": _annotate_jsonl, "csv": _annotate_csv, "parquet": _annotate_parquet}[fmt]
        try:
            # a full disk names the output here, before the rejects file's own context, which
            # commits first and so exits first (was: "out.rejects.jsonl: No space left on
            # device" with no row rejected); a rejects write names its file (``_Run.reject``)
            with naming(dst):
                loop(run, src, tmp_out, dst, chunk_rows)
        except COMPRESSION_ERRORS as e:
            raise corrupt_compressed(src, e) from None
        if summary.rows_in == 0:  # raised here, so the temporary output is removed
            raise no_rows(src, fmt)
        if summary.rows_out == 0:
            raise none_annotated(src, summary, run.reasons)
        summary.reasons = dict(run.reasons.most_common())
        summary.stale_fields = dict(sorted(run.stale.items()))
        if rej_file is not None:
            with naming(rej_path):  # its buffer's last write
                rej_file.close()
    summary.seconds = time.perf_counter() - t0
    assert summary.rows_in == summary.rows_out + summary.rows_rejected
    return summary


# ---- text formats -------------------------------------------------------------------------------
@contextmanager
def _open_output(tmp: Path, target: Path) -> Iterator[IO[str]]:
    """The temporary output file, open for text; the final name decides gzip compression (and
    is the name the gzip header records, not the temporary one). The header's time is 0, as
    ``gzip -n`` writes it: the same input gives the same bytes (was: each run's own time)."""
    if not target.name.lower().endswith(".gz"):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
        return
    with open(tmp, "wb") as raw, gzip.GzipFile(filename=target.name[:-3], mode="wb", fileobj=raw,
                                                compresslevel=6, mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as f:
        yield f


def _annotate_jsonl(run: _Run, src: Path, tmp: Path, dst: Path, chunk: int) -> None:
    # Lines are split on b"\n" only (a bare "\r" is JSON whitespace, not a line end) and decoded
    # one by one, so a line that is not UTF-8 is one bad row with its number.
    gz = detect_format(src)[1]
    with open(src, "rb") as raw, (gzip.GzipFile(fileobj=raw) if gz else nullcontext(raw)) as f, \
            _open_output(tmp, dst) as out:
        annotate_lines(run, enumerate(bounded_lines(f), 1), out, chunk, lambda: run.advance(raw.tell()))


def annotate_lines(run: _Run, lines: Iterable[tuple[int, bytes]], out: IO[str], chunk: int,
                   tick: Callable[[], None] = lambda: None) -> None:
    """The JSONL rule: ``(line number, raw line)`` pairs -> annotated lines on ``out`` (in
    order) and bad rows to ``run.reject``; ``tick`` after each chunk written. Used by the file
    loop above and by the Ray workers (``rlpredict.serve.annotate_ray``)."""
    batch: list[tuple[str, dict, Request, str | None, str]] = []
    held = 0  # characters of row text in the batch
    for lineno, data in lines:
        if lineno == 1 and data.startswith(codecs.BOM_UTF8):
            out.write("\ufeff")  # the file's, kept as every other byte is (was: dropped)
        try:
            line = decode_line(data, lineno)
        except RecordError as e:
            run.summary.rows_in += 1
            # kept recoverable, as CSV text is: each undecodable byte becomes "\udcXX" in the
            # rejects; an oversize row was not kept (null; was: the reader's internal marker)
            raw = None if (given := line_bytes(data)) is None else given.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            run.reject("line", lineno, e.reason, raw, e.kind)
            continue
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        run.summary.rows_in += 1
        try:
            row = parse_json(text, run.read_twice)  # a request field given twice: which is meant?
        except RecordError as e:
            run.reject("line", lineno, e.reason, text, e.kind)
            continue
        if not isinstance(row, dict):
            run.reject("line", lineno, f"expected a JSON object, got {json_kind(row)}", row, json_text=text)
            continue
        try:
            req, gen = run.parse(row)
        except BadRow as e:
            run.reject("line", lineno, str(e), row, e.kind, json_text=text)
            continue
        batch.append((text, row, req, gen, "\r\n" if line.endswith("\r\n") else "\n"))  # was: CRLF became LF
        held += len(text)
        if len(batch) >= chunk or held >= CHUNK_CHARS:
            _flush_jsonl(run, batch, out)
            held = 0
            tick()
    _flush_jsonl(run, batch, out)
    tick()


#: Stale fields counted by name, at most this many; the rest together under ``OTHER_STALE``
#: (was: one entry, and one line on stderr, per distinct name: 20,000 for rows that each had their own).
MAX_STALE_NAMES = 32
OTHER_STALE = "other rl_qN_tokens fields"


def tally_stale(counter: Counter[str], counts: Mapping[str, int]) -> None:
    """Add ``counts`` (field name -> rows) to ``counter``, bounded by ``MAX_STALE_NAMES`` names."""
    for name, n in counts.items():
        counter[name if name in counter or len(counter) < MAX_STALE_NAMES else OTHER_STALE] += n


def _flush_jsonl(run: _Run, batch: list, out: IO[str]) -> None:
    if not batch:
        return
    cols = run.predict([b[2] for b in batch], [b[3] for b in batch])
    for (text, row, _, _, end), *vals in zip(batch, *cols, strict=True):
        run.summary.rows_replaced += any(c in row for c in run.columns)
        tally_stale(run.stale, dict.fromkeys(run.stale_in(row), 1))
        out.write(_with_columns(text, row, [int(v) for v in vals], run.columns) + end)
    run.summary.rows_out += len(batch)
    batch.clear()


def _with_columns(text: str, row: dict, values: list[int], columns: Sequence[str] = COLUMNS) -> str:
    """The original JSON text with the rl_* fields: a field the row has gets its new value in
    place, the others are added before the closing brace; every other byte is kept (a rewrite
    through ``json.dumps`` turned ``1e-400`` into ``0.0`` and cut long decimals)."""
    new = dict(zip(columns, values, strict=True))
    if any(c in row for c in columns):
        parts, at = [], 0
        for key, start, end in _members(text):
            if key in new:  # every occurrence of a key given twice
                parts += [text[at:start], str(new[key])]
                at = end
        text = "".join(parts) + text[at:]
        new = {c: v for c, v in new.items() if c not in row}
        if not new:
            return text
    closed = text.rstrip()
    body = closed[:-1].rstrip()
    sep = "" if body.endswith("{") else ", "
    added = ", ".join(f'"{c}": {v}' for c, v in new.items())
    return f"{body}{sep}{added}}}{text[len(closed):]}"  # and the blanks after the brace (were dropped)


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _members(text: str) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of the value of each member of ``text``, a JSON object that parsed."""
    space = _SPACE.match
    i = space(text, text.index("{") + 1).end()
    out = []
    while text[i] == '"':
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = space(text, space(text, i).end() + 1).end()  # past the colon
        _, end = _DECODER.raw_decode(text, i)
        out.append((key, i, end))
        i = space(text, end).end()
        if text[i] == ",":
            i = space(text, i + 1).end()
    return out


def _annotate_csv(run: _Run, src: Path, tmp: Path, dst: Path, chunk: int) -> None:
    with open(src, "rb") as raw, text_stream(raw, detect_format(src)[1]) as f, \
            _open_output(tmp, dst) as out:
        records = csv_records(f)
        try:
            _, header, _, _ = next(records)
        except StopIteration:
            raise AnnotateError(f"{src}: empty CSV file (no header)") from None
        except RecordError as e:
            raise AnnotateError(f"{src}: line {e.location or 1}: {e.reason}") from None
        assert header is not None
        out_header = header + [c for c in run.columns if c not in header]
        slots = [out_header.index(c) for c in run.columns]
        replaces = any(c in header for c in run.columns)
        writer = _CsvWriter(out, _line_end(src))
        if _starts_with_bom(src):
            out.write("\ufeff")  # the file's (a spreadsheet's UTF-8 mark), kept (was: dropped)
        writer.writerow(out_header)
        batch: list[tuple[list[str], Request, str | None]] = []
        held = 0  # characters of row text in the batch
        for lineno, cells, problem, text in _named(records, src):
            run.summary.rows_in += 1
            if problem is not None or cells is None:  # an unparsable record is kept as its text
                run.reject("line", lineno, problem or "malformed CSV", cells if text is None else text)
                continue
            row = dict(zip(header, cells, strict=True))
            try:  # an empty CSV cell is a missing value (present, so the error says "missing or null")
                req, gen = run.parse({k: None if v == "" else v for k, v in row.items()})
            except BadRow as e:
                run.reject("line", lineno, str(e), row, e.kind)
                continue
            batch.append((cells + [""] * (len(out_header) - len(cells)), req, gen))
            held += sum(map(len, cells))
            if len(batch) >= chunk or held >= CHUNK_CHARS:
                _flush_csv(run, batch, writer, slots)
                held = 0
                run.advance(raw.tell())
        _flush_csv(run, batch, writer, slots)
        run.advance(raw.tell())
        if replaces:
            run.summary.rows_replaced = run.summary.rows_out
        tally_stale(run.stale, dict.fromkeys(run.stale_in(header), run.summary.rows_out))


def _starts_with_bom(src: Path) -> bool:
    with open(src, "rb") as raw, (gzip.GzipFile(fileobj=raw) if detect_format(src)[1] else nullcontext(raw)) as f:
        return f.read(3) == codecs.BOM_UTF8


def _named(records: Iterator[Any], src: Path) -> Iterator[Any]:
    """``records`` with a record too large to read reported at ``src`` (``csv_records``)."""
    try:
        yield from records
    except RecordError as e:
        raise AnnotateError(f"{src}: {e.reason}") from None


def _line_end(src: Path) -> str:
    """The input's record ending, ``\r\n`` or ``\n``, as its header line ends (kept: was,
    a CRLF file annotated with LF endings)."""
    with open(src, "rb") as raw, text_stream(raw, detect_format(src)[1]) as f:
        return "\r\n" if f.readline(1 << 16).endswith("\r\n") else "\n"


class _CsvWriter:
    """``csv.writer`` with the input's line ends (``_line_end``) that also quotes a row with a
    bare carriage return in a cell: the csv module quotes only the line terminator's
    characters, and readers in universal-newline mode (``open(..., "r")``, pandas) would split
    such a row in two."""

    def __init__(self, out: Any, line_end: str = "\n") -> None:
        self._plain = csv.writer(out, lineterminator=line_end)
        self._quoted = csv.writer(out, lineterminator=line_end, quoting=csv.QUOTE_ALL)

    def writerow(self, cells: list[str]) -> None:
        (self._quoted if any("\r" in c for c in cells) else self._plain).writerow(cells)


def _flush_csv(run: _Run, batch: list, writer: _CsvWriter, slots: list[int]) -> None:
    if not batch:
        return
    cols = run.predict([b[1] for b in batch], [b[2] for b in batch])
    for (cells, _, _), *vals in zip(batch, *cols, strict=True):
        for slot, v in zip(slots, vals, strict=True):
            cells[slot] = str(int(v))
        writer.writerow(cells)
    run.summary.rows_out += len(batch)
    batch.clear()


# ---- Parquet -----------------------------------------------------------------------------------
def _annotate_parquet(run: _Run, src: Path, tmp: Path, dst: Path, chunk: int) -> None:
    import pyarrow.parquet as pq

    pf = _open_parquet(src)
    out_schema = parquet_out_schema(pf.schema_arrow, run.columns)
    done = 0
    with pq.ParquetWriter(tmp, out_schema) as writer:
        for rb in _batches(pf, src, chunk):
            good = annotate_record_batch(run, rb, done, out_schema)
            if good is not None:
                writer.write_batch(good)
            done += rb.num_rows
            run.advance(done)


def parquet_out_schema(schema: Any, columns: Sequence[str] = COLUMNS) -> Any:
    """The output schema: the input's columns (minus any ``rl_*`` ones) then the ``rl_*`` int64s."""
    import pyarrow as pa

    keep = [schema.field(n) for n in schema.names if n not in columns]
    return pa.schema(keep + [pa.field(c, pa.int64()) for c in columns],
                     metadata=_pandas_ints(schema.metadata, [c for c in columns if c in schema.names]))


def _pandas_ints(metadata: dict[bytes, bytes] | None, replaced: list[str]) -> dict[bytes, bytes] | None:
    """The schema's metadata with pandas' record of each replaced ``rl_*`` column set to int64
    (was: kept, so pandas read the new int64 predictions back as the old column's strings; a
    reviewer's find). Metadata pandas did not write, or cannot be read, is kept as it is."""
    if not metadata or b"pandas" not in metadata or not replaced:
        return metadata
    try:
        record = json.loads(metadata[b"pandas"])
        for col in record.get("columns", []):
            if col.get("field_name", col.get("name")) in replaced:
                col.update(pandas_type="int64", numpy_type="int64", metadata=None)
    except (ValueError, AttributeError, TypeError):
        return metadata
    return {**metadata, b"pandas": json.dumps(record).encode()}


def annotate_record_batch(run: _Run, rb: Any, done: int, out_schema: Any) -> Any:
    """The Parquet rule: one record batch (rows ``done + 1``...) -> its good rows with the
    ``rl_*`` columns (``None`` if none), bad rows to ``run.reject``. Used by the file loop above
    and by the Ray workers (``rlpredict.serve.annotate_ray``)."""
    import pyarrow as pa

    n = rb.num_rows
    used = [name for name in run.fields.request_columns() if name in rb.schema.names]
    cols = {name: rb.column(name).to_pylist() for name in used}
    fields = run.fields
    # no request column at all: the row's own names in its error, as JSONL and CSV rows say
    # them (was: "the row is empty")
    names = {} if any(c in used for c in (fields.prompt, *fields.messages)) else dict.fromkeys(rb.schema.names[:9])
    ok, requests, gens = [], [], []
    for i in range(n):
        run.summary.rows_in += 1
        row = {**names, **{name: cols[name][i] for name in used}}
        try:
            req, gen = run.parse(row)
        except BadRow as e:
            run.reject("row", done + i + 1, str(e), rb.slice(i, 1).to_pylist()[0], e.kind)
            continue
        ok.append(i)
        requests.append(req)
        gens.append(gen)
    if not ok:
        return None
    cols = run.predict(requests, gens)
    good = rb if len(ok) == n else rb.take(pa.array(ok, type=pa.int64()))
    keep = out_schema.names[: -len(run.columns)]
    arrays = [good.column(name) for name in keep]
    arrays += [pa.array(v, type=pa.int64()) for v in cols]
    run.summary.rows_out += len(ok)
    if any(c in rb.schema.names for c in run.columns):
        run.summary.rows_replaced += len(ok)
    tally_stale(run.stale, dict.fromkeys(run.stale_in(rb.schema.names), len(ok)))
    return pa.RecordBatch.from_arrays(arrays, schema=out_schema)


def _open_parquet(src: Path) -> Any:
    try:
        return open_parquet(src)
    except RecordError as e:
        raise AnnotateError(str(e)) from None


def _batches(pf: Any, src: Path, chunk: int) -> Iterator[Any]:
    """``pf.iter_batches``; a corrupt page is one error naming the file."""
    try:
        yield from parquet_batches(pf, src, chunk)
    except RecordError as e:
        raise AnnotateError(str(e)) from None


# ---- progress -----------------------------------------------------------------------------------
class _progress:
    """A rich progress bar over input bytes (text formats) or rows (Parquet) on a terminal,
    erased when done; elsewhere (a log, a pipe) a line every 30 s, as the Ray engine's (was: a
    bar there too, frozen before a one-line error); a no-op when off."""

    def __init__(self, src: Path, fmt: Format, enabled: bool):
        self.src, self.fmt, self.enabled = src, fmt, enabled
        self._bar: Any = None

    def __enter__(self) -> Callable[[float], None]:
        if not self.enabled:
            return lambda _done: None
        if not sys.stderr.isatty():
            return self._lines()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self.fmt == "parquet":
            total = _open_parquet(self.src).metadata.num_rows
            amount = MofNCompleteColumn()
        else:
            total = self.src.stat().st_size
            amount = DownloadColumn()
        self._bar = Progress(TextColumn("annotating {task.description}", markup=False), BarColumn(), amount,
                             TimeElapsedColumn(), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.src.name, total=total)
        return lambda done: self._bar.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _lines(self) -> Callable[[float], None]:
        total = max(1, _open_parquet(self.src).metadata.num_rows if self.fmt == "parquet" else self.src.stat().st_size)
        t0 = last = time.perf_counter()

        def update(done: float) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= 30:
                last = now
                print(f"annotating {self.src.name}: {100 * done / total:.0f}% after {now - t0:.0f} s",
                      file=sys.stderr, flush=True)
        return update

