"""Hypothesis strategies for the fuzz tests: files of valid rows mixed with garbled ones.

A JSONL file is a list of ``Line`` (its bytes, without the newline, and whether it is a valid
row left untouched); a CSV file is the bytes of a header plus records written by ``csv.writer``,
whose cells were garbled. Garbling: missing fields, wrong types, empty strings, junk nested
values, huge and negative numbers, numbers over Python's 4300-digit limit, deep nesting,
escaped lone surrogates,
truncated lines, invalid UTF-8 bytes, stray bytes (``\\r``, NUL, quotes), JSON that is not an
object, blank lines, records with too many or too few cells.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Settings of every fuzz test (files are small but generating them can be slow).
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Text the loaders must accept: any Unicode except lone surrogates, short.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
WORDS = st.text(st.sampled_from("abcdefgh ijklm"), min_size=1, max_size=24).filter(str.strip)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6)
NUMBERS = st.sampled_from([0, -1, -(10**25), 10**20, 2**63, 10**400, 1e308, -1e308, 1.5, 0.0])
#: Raw JSON tokens json.dumps never writes: over the int-digit limit, overflowing floats,
#: NaN/Infinity, nesting past the recursion limit.
RAW_TOKENS = st.sampled_from([b"9" * 5000, b"1e99999", b"-1e99999", b"NaN", b"-Infinity",
                              b"[" * 3000 + b"]" * 3000, b"{}", b"[]", b'""', b"null",
                              b'"\\ud800"', b'"a\\udc80b"',  # escapes of lone surrogates
                              b'[{"role": "user", "content": "\\udfff"}]',
                              b'[{"role": "user", "content": [{"type": "text", "text": 5}]}]',
                              b'[{"from": "human", "value": "x"}, {"from": "gpt", "value": ["y"]}]'])
BAD_BYTES = st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                             b"\xfe\xff", b"\xc3\x28"])
STRAY = st.sampled_from([b"\r", b"\x00", b"{", b"}", b'"', b",", b"\\", b"\x1b", b" "])
OTHER_JSON = st.sampled_from([b"[]", b"42", b'"a string"', b"null", b"true", b"[{}]", b"1e400"])
BLANK = st.sampled_from([b"", b" ", b"\t", b"  \t "])
_HOLE = "\ue000"  # a placeholder, replaced by raw bytes after encoding


@dataclass(frozen=True)
class Line:
    data: bytes
    untouched: bool  # a valid row, not garbled

    @property
    def blank(self) -> bool:
        try:
            return not self.data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False


def _dump(row: Any, ascii_only: bool) -> bytes:
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")


@st.composite
def jsonl_line(draw: st.DrawFn, valid: st.SearchStrategy[dict], fields: Sequence[str]) -> Line:
    """One line: a valid row, or a valid row garbled, or junk (``fields``: names to garble)."""
    row = dict(draw(valid))
    kind = draw(st.sampled_from(["valid", "valid", "field", "raw", "bytes", "other", "blank"]))
    ascii_only = draw(st.booleans())
    if kind == "valid":
        return Line(_dump(row, ascii_only), True)
    if kind == "blank":
        return Line(draw(BLANK), False)
    if kind == "other":
        return Line(draw(OTHER_JSON), False)
    name = draw(st.sampled_from(list(fields)))
    if kind == "field":
        how = draw(st.sampled_from(["drop", "empty", "null", "number", "junk", "text"]))
        if how == "drop":
            row.pop(name, None)
        else:
            row[name] = {"empty": "", "null": None, "number": draw(NUMBERS), "junk": draw(JUNK),
                         "text": draw(TEXT)}[how]
        return Line(_dump(row, ascii_only), False)
    if kind == "raw":
        row[name] = _HOLE
        data = _dump(row, False).replace(json.dumps(_HOLE, ensure_ascii=False).encode(), draw(RAW_TOKENS))
        return Line(data, False)
    data = _dump(row, ascii_only)  # byte-level damage: truncation, bad UTF-8, stray bytes
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["truncate", "utf8", "stray"]))
    if how == "truncate":
        return Line(data[:at], False)
    return Line(data[:at] + draw(BAD_BYTES if how == "utf8" else STRAY) + data[at:], False)


def jsonl_file(valid: st.SearchStrategy[dict], fields: Sequence[str], max_rows: int = 20
               ) -> st.SearchStrategy[list[Line]]:
    return st.lists(jsonl_line(valid, fields), min_size=1, max_size=max_rows)


def jsonl_bytes(lines: Sequence[Line], final_newline: bool = True) -> bytes:
    return b"\n".join(line.data for line in lines) + (b"\n" if final_newline else b"")


def jsonl_rows(lines: Sequence[Line]) -> list[int]:
    """Line numbers (from 1) of the lines that are rows: all but the blank ones."""
    return [i for i, line in enumerate(lines, 1) if not line.blank]


# ---- CSV ----------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return ""
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


@st.composite
def csv_file(draw: st.DrawFn, valid: st.SearchStrategy[dict], header: Sequence[str],
             max_rows: int = 20) -> tuple[bytes, bool]:
    """A CSV file (bytes), and whether all its records are valid rows left untouched."""
    records: list[list[str]] = []
    untouched: list[bool] = []
    holes: list[bytes] = []
    for _ in range(draw(st.integers(1, max_rows))):
        row = draw(valid)
        cells = [_cell(row.get(h)) for h in header]
        kind = draw(st.sampled_from(["valid", "valid", "cell", "cells", "utf8"]))
        if kind == "cell":
            i = draw(st.integers(0, len(cells) - 1))
            cells[i] = draw(st.one_of(st.just(""), TEXT, NUMBERS.map(str), JUNK.map(_cell),
                                      st.sampled_from(["9" * 5000, "1e999", "-5", "nan", "inf", "[1,",
                                                       '{"a":', "[" * 3000, "true"])))
        elif kind == "cells":  # too many or too few cells
            cells = cells + draw(st.lists(TEXT, min_size=1, max_size=2)) if draw(st.booleans()) \
                else cells[:draw(st.integers(0, len(cells) - 1))]
        elif kind == "utf8":
            i = draw(st.integers(0, len(cells) - 1))
            cells[i] = cells[i][:1] + _HOLE + cells[i][1:]
            holes.append(draw(BAD_BYTES))
        records.append(cells)
        untouched.append(kind == "valid")
    buf = io.StringIO()
    # csv.writer quotes a cell holding "\r" only if "\r" is in its line terminator
    bare_cr = any("\r" in c for rec in records for c in rec)
    w = csv.writer(buf, lineterminator="\r\n" if bare_cr else draw(st.sampled_from(["\n", "\r\n"])))
    w.writerow(header)
    w.writerows(records)
    data = buf.getvalue().encode("utf-8")
    for bad in holes:
        data = data.replace(_HOLE.encode(), bad, 1)
    if draw(st.booleans()):  # the last record cut short, without a newline
        data = data.rstrip(b"\r\n")
        data = data[:len(data) - draw(st.integers(0, min(len(data), 8)))]
        untouched.append(False)
    return data, all(untouched)


def csv_record_count(data: bytes) -> int:
    """Records after the header as Python's csv module parses them (a record it rejects counts
    too); empty records (blank lines) are not rows. The oracle for the loaders' row counts."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    n = 0
    try:
        next(reader)
    except (StopIteration, csv.Error):
        return 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return n
        except csv.Error:
            n += 1
            continue
        n += bool(cells)
