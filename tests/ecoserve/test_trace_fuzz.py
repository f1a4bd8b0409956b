"""Fuzz ``read_trace`` with CSV / JSONL traces of valid rows mixed with garbled ones: it returns
every row, or raises ``TraceError`` naming the file and a row's line (never before the first
garbled row), and never any other exception."""

from __future__ import annotations

import gzip
import io
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoserve_sched.trace import TraceError, read_trace
from tests.garbled_rows import (
    FUZZ,
    WORDS,
    csv_file,
    csv_record_count,
    jsonl_bytes,
    jsonl_file,
    jsonl_rows,
)

FIELDS = ["arrival_time_s", "input_tokens", "output_tokens", "max_tokens", "prompt", "messages",
          "rl_bucket", "rl_pred_tokens", "rl_reserve_tokens"]


@st.composite
def trace_row(draw: st.DrawFn, with_rl: bool) -> dict:
    out = draw(st.integers(1, 4000))
    row = {"arrival_time_s": draw(st.floats(0, 1e6)), "input_tokens": draw(st.integers(1, 10**6)),
           "output_tokens": out}
    if draw(st.booleans()):
        row["max_tokens"] = draw(st.integers(out, 8192))
    if draw(st.booleans()):
        row["prompt"] = draw(WORDS)
    if with_rl:
        row.update(rl_bucket=draw(st.integers(0, 9)), rl_pred_tokens=draw(st.integers(0, 4000)),
                   rl_reserve_tokens=draw(st.integers(1, 8000)))
    return row


def _line_of(message: str, path: Path) -> int:
    m = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
    assert m, f"error does not name {path}:LINE: {message}"
    return int(m.group(1))


@settings(FUZZ, max_examples=150)
@given(data=st.data(), with_rl=st.booleans(), gz=st.booleans())
def test_jsonl_trace_fuzz(data, with_rl, gz):
    lines = data.draw(jsonl_file(trace_row(with_rl), FIELDS))
    rows = jsonl_rows(lines)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t.jsonl.gz" if gz else "t.jsonl")
        raw = jsonl_bytes(lines)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        try:
            trace = read_trace(path)
        except TraceError as e:
            line = _line_of(str(e), path) if rows else None
            if line is not None:
                assert line in rows, f"line {line} is not a row: {e}"
                first_garbled = next(i for i, x in enumerate(lines, 1) if not x.untouched and i in rows)
                assert line >= first_garbled, f"valid line {line} rejected: {e}"
            else:
                assert "no rows" in str(e)
        else:
            assert len(trace) == len(rows)
            assert (trace.output_tokens >= 1).all() and (trace.input_tokens >= 1).all()
            assert (trace.max_tokens >= 1).all() and (trace.arrival_s >= 0).all()
            assert list(trace.arrival_s) == sorted(trace.arrival_s)
        if rows and all(x.untouched for x in lines):
            trace = read_trace(path)
            assert len(trace) == len(rows) and trace.has_rl == with_rl
            assert (trace.max_tokens >= trace.output_tokens).all()


@settings(FUZZ, max_examples=100)
@given(data=st.data(), with_rl=st.booleans())
def test_csv_trace_fuzz(data, with_rl):
    header = FIELDS[:5] + (FIELDS[6:] if with_rl else [])
    raw, all_clean = data.draw(csv_file(trace_row(with_rl), header))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.csv"
        path.write_bytes(raw)
        records = csv_record_count(raw)
        try:
            trace = read_trace(path)
        except TraceError as e:
            assert not all_clean, f"a clean trace was rejected: {e}"
            if records:
                lines = io.StringIO(raw.decode("utf-8", "surrogateescape"), newline="").readlines()
                assert 1 <= _line_of(str(e), path) <= len(lines)  # "\r", "\n", "\r\n" end lines
            else:
                assert any(w in str(e) for w in ("no rows", "missing column", "empty CSV file (no header)"))
        else:
            assert len(trace) == records
            assert (trace.output_tokens >= 1).all() and (trace.input_tokens >= 1).all()
            if all_clean:
                assert trace.has_rl == with_rl and (trace.max_tokens >= trace.output_tokens).all()


# ---- regressions: inputs the fuzzing found crashing read_trace ------------------------------------
OK_ROW = b'{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1}\n'
REGRESSIONS = {  # file name -> (content, line named by the TraceError, or 0: reads fine)
    "bigint.jsonl": (OK_ROW + b'{"arrival_time_s": 0, "input_tokens": ' + b"9" * 400 + b', "output_tokens": 1}\n', 2),
    "huge.jsonl": (b'{"arrival_time_s": 0, "input_tokens": 1e20, "output_tokens": 1}\n', 1),  # int64 overflow
    "digits.jsonl": (b'{"arrival_time_s": 0, "input_tokens": ' + b"9" * 5000 + b', "output_tokens": 1}\n', 1),
    "arrival.jsonl": (b'{"arrival_time_s": ' + b"9" * 400 + b', "input_tokens": 1, "output_tokens": 1}\n', 1),
    "deep.jsonl": (OK_ROW + b'{"x": ' + b"[" * 3000 + b"]" * 3000 + b"}\n", 2),
    "bool.jsonl": (b'{"arrival_time_s": 0, "input_tokens": true, "output_tokens": 1}\n', 1),
    "bad_utf8.jsonl": (OK_ROW + b"\xff\n", 2),
    "bad_utf8.csv": (b"arrival_time_s,input_tokens,output_tokens\n0,1,1\n\xff,1,1\n", 3),
    "span.csv": (b"arrival_time_s,input_tokens,output_tokens\n100000000000000000000,1,1\n0,1,1\n", 2),  # > 2^36 s
    "cr.jsonl": (b'{"arrival_time_s": 0,\r "input_tokens": 1, "output_tokens": 1}\n', 0),
    "big_cell.csv": (b"arrival_time_s,input_tokens,output_tokens,prompt\n0,1,1," + b"a" * 200_000 + b"\n", 0),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_read_trace_regressions(tmp_path, name):
    data, line = REGRESSIONS[name]
    path = tmp_path / name
    path.write_bytes(data)
    if not line:
        assert len(read_trace(path)) == 1
        return
    with pytest.raises(TraceError) as e:
        read_trace(path)
    assert _line_of(str(e.value), path) == line and len(str(e.value)) < 300
