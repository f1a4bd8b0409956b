"""Fuzz the chat-log loaders and ``annotate`` with files of valid rows mixed with garbled ones.

Fail mode: success, or the loader's own error naming the file and the first bad line (the
same line skip mode sets aside first), never another exception. Skip mode: nothing crashes and
no row is lost (loaders: rows = rows with samples + skipped; annotate: in = out + rejected, the
output holds the good rows unchanged and in order, written atomically).
The predictor is the shipped bundle, loaded once; files hold at most 20 rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpredict.data import DataError, load_samples
from rlpredict.serve.annotate import COLUMNS, AnnotateError, annotate_file
from rlpredict.serve.runtime import Predictor
from rlpredict.untrusted_text import holds_no_text
from tests.garbled_rows import (
    FUZZ,
    TEXT,
    WORDS,
    csv_file,
    csv_record_count,
    jsonl_bytes,
    jsonl_file,
    jsonl_rows,
)

#: a prompt with text to the encoder (``holds_no_text``: training's empty-prompt rule, as predict's)
PROMPT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda t: not holds_no_text(t))
RESPONSE = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
COUNT = st.integers(0, 5000)


def _one_sample_rows(prompt: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """Rows in every shape the loader reads, each holding exactly one sample."""
    return st.one_of(
        st.builds(lambda p, r: {"prompt": p, "response": r}, prompt, RESPONSE),
        st.builds(lambda p, n, i: {"id": i, "prompt": p, "output_tokens": n}, prompt, COUNT, st.integers(0, 9)),
        st.builds(lambda p, n: {"prompt": p, "usage": {"completion_tokens": n}}, prompt, COUNT),
        st.builds(lambda p, r: {"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": r}]}, prompt, TEXT),
        st.builds(lambda p, r, c: {"conversation_id": c, "conversations": [
            {"from": "human", "value": p}, {"from": "gpt", "value": r}]}, prompt, TEXT, st.integers(0, 3)),
    )


DATA_FIELDS = ["prompt", "response", "output_tokens", "usage", "messages", "conversations", "id",
               "conversation_id"]


def _first_line(message: str, path: Path) -> int:
    m = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
    assert m, f"error does not name {path}:LINE: {message}"
    return int(m.group(1))


def _check_loader(path: Path, rows: int, all_clean: bool) -> None:
    samples, report = load_samples([path], on_error="skip")
    assert report.rows == rows
    assert report.samples == len(samples)
    # Every row either gave samples (each carries its row's location) or was counted as skipped.
    assert len({s.location for s in samples}) + report.n_skipped == report.rows
    assert len(samples) == report.rows - report.n_skipped  # these shapes hold one sample per row
    for s in samples:  # what the loader accepts, tokenizers accept: valid Unicode text
        json.dumps([s.messages, s.response], ensure_ascii=False).encode("utf-8")
    if all_clean:
        assert report.n_skipped == 0
    try:
        strict, _ = load_samples([path])
    except DataError as e:
        assert report.n_skipped, f"fail mode raised where skip mode skipped nothing: {e}"
        assert _first_line(str(e), path) == _first_line(report.examples[0], path)
    else:
        assert report.n_skipped == 0 and len(strict) == len(samples)


@settings(FUZZ, max_examples=150)
@given(lines=jsonl_file(_one_sample_rows(PROMPT), DATA_FIELDS), gz=st.booleans(), newline=st.booleans())
def test_data_jsonl_fuzz(lines, gz, newline):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("logs.jsonl.gz" if gz else "logs.jsonl")
        data = jsonl_bytes(lines, newline)
        path.write_bytes(gzip.compress(data) if gz else data)
        _check_loader(path, len(jsonl_rows(lines)), all(line.untouched for line in lines))


NOT_JSON = PROMPT.filter(lambda s: s[:1] not in "[{")  # CSV cells starting so are decoded as JSON
CSV_ROWS = st.one_of(
    st.builds(lambda p, r: {"prompt": p, "response": r}, NOT_JSON, NOT_JSON),
    st.builds(lambda p, n, i: {"id": i, "prompt": p, "output_tokens": n}, NOT_JSON, COUNT, st.integers(0, 9)),
    st.builds(lambda p, r: {"messages": [{"role": "user", "content": p},
                                         {"role": "assistant", "content": r}]}, PROMPT, TEXT),
)


@settings(FUZZ, max_examples=100)
@given(file=csv_file(CSV_ROWS, ["prompt", "response", "output_tokens", "messages", "id"]))
def test_data_csv_fuzz(file):
    data, all_clean = file
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "logs.csv"
        path.write_bytes(data)
        _check_loader(path, csv_record_count(data), all_clean)


# ---- annotate -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> Predictor:
    return Predictor.load(threads=1)


ANNOTATE_ROWS = st.one_of(
    st.builds(lambda p, i: {"id": i, "prompt": p, "arrival_time_s": 0.5}, WORDS, st.integers(0, 99)),
    st.builds(lambda p: {"messages": [{"role": "user", "content": p}]}, WORDS),
    st.builds(lambda p: {"messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": p}]}],
                         "generator": "llama-3-8b"}, WORDS),
)
ANNOTATE_FIELDS = ["prompt", "messages", "generator", "id"]


ALL_REJECTED: list[int] = []  # skip mode rejected every row (nothing written): no line list


def _annotate_both_modes(p: Predictor, src: Path, rows: int):
    """Run skip mode (checked: counts, rejects, no stray temp files) and fail mode (checked:
    error at skip mode's first rejected line, output left as it was); returns (rejected lines,
    output path)."""
    d = src.parent
    out = d / f"out{''.join(src.suffixes)}"
    if rows == 0:  # no row (or no CSV header): an error in both modes, and nothing written
        for mode in ("skip", "fail"):
            with pytest.raises(AnnotateError, match=r"no rows to annotate|no header"):
                annotate_file(p, src, out, on_error=mode, chunk_rows=7)  # type: ignore[arg-type]
        assert sorted(x.name for x in d.iterdir()) == [src.name]
        return [], None
    try:
        s = annotate_file(p, src, out, on_error="skip", chunk_rows=7)
    except AnnotateError as e:  # every row rejected: an error, and nothing written
        assert re.match(rf"{re.escape(str(src))}: no row could be annotated: all {rows} were rejected", str(e)), str(e)
        assert sorted(x.name for x in d.iterdir()) == [src.name]
        with pytest.raises(AnnotateError, match=rf"{re.escape(str(src))}: line \d+: "):
            annotate_file(p, src, out, on_error="fail", chunk_rows=7)
        return ALL_REJECTED, None
    assert s.rows_in == rows == s.rows_out + s.rows_rejected
    rejects = [json.loads(x) for x in (d / "out.rejects.jsonl").read_bytes().split(b"\n")[:-1]]
    assert len(rejects) == s.rows_rejected and all(r["reason"] for r in rejects)
    rejected = [r["line"] for r in rejects]
    assert rejected == sorted(set(rejected))

    failed = d / f"failed{''.join(src.suffixes)}"
    failed.write_text("old content")
    try:
        annotate_file(p, src, failed, on_error="fail", chunk_rows=7, force=True)  # int8: same batches
    except AnnotateError as e:
        assert rejected, f"fail mode failed where skip mode rejected nothing: {e}"
        m = re.match(rf"{re.escape(str(src))}: line (\d+): ", str(e))
        assert m and int(m.group(1)) == rejected[0], str(e)
        assert failed.read_text() == "old content"  # atomic: the old file is untouched
    else:
        assert not rejected and failed.read_bytes() == out.read_bytes()
    assert not list(d.glob(".*.part")), "temporary files left behind"
    return rejected, out


@settings(FUZZ, max_examples=40)
@given(lines=jsonl_file(ANNOTATE_ROWS, ANNOTATE_FIELDS))
def test_annotate_jsonl_fuzz(shipped, lines):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "trace.jsonl"
        src.write_bytes(jsonl_bytes(lines))
        row_lines = jsonl_rows(lines)
        rejected, out = _annotate_both_modes(shipped, src, len(row_lines))
        if out is None:
            return
        kept = [lines[i - 1].data.decode("utf-8") for i in row_lines if i not in rejected]
        got = [json.loads(x) for x in out.read_bytes().split(b"\n")[:-1]]  # only b"\n" ends a line
        assert len(got) == len(kept)
        for text, row in zip(kept, got, strict=True):  # every column kept, three added
            assert all(isinstance(row[c], int) for c in COLUMNS)
            rest = {k: v for k, v in row.items() if k not in COLUMNS}
            assert json.dumps(rest, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)
        if all(line.untouched for line in lines):
            assert not rejected


def _csv_records(data: bytes) -> list[tuple[int, list[str]]]:
    """(first line, cells) of each CSV record after the header, as annotate numbers them: a line
    ends at a "\n", or at a bare "\r" in a file with no "\n" before it (not at one in a quoted
    cell of a "\n" file, which csv's ``line_num`` counts)."""
    ended, lf = 0, False

    def pieces(f: io.StringIO):
        nonlocal ended, lf
        for piece in f:
            lf = lf or piece.endswith("\n")
            ended += piece.endswith("\n") or (not lf and piece.endswith("\r"))
            yield piece

    reader = csv.reader(pieces(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))
    next(reader, None)
    out: list[tuple[int, list[str]]] = []
    while True:
        start = ended + 1
        try:
            cells = next(reader)
        except StopIteration:
            return out
        except csv.Error:
            continue
        if cells:
            out.append((start, cells))


@settings(FUZZ, max_examples=30)
@given(file=csv_file(ANNOTATE_ROWS, ["id", "prompt", "messages", "generator"]))
def test_annotate_csv_fuzz(shipped, file):
    data, all_clean = file
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "trace.csv"
        src.write_bytes(data)
        rejected, out = _annotate_both_modes(shipped, src, csv_record_count(data))
        header = next(csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")), [])
        kept = [] if rejected is ALL_REJECTED else [cells for line, cells in _csv_records(data) if line not in rejected]
        if out is None:  # no row: nothing was written
            assert not kept
            return
        got = list(csv.reader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))
        assert got[0][:len(header)] == header and set(COLUMNS) <= set(got[0])
        assert [r[:len(header)] for r in got[1:]] == kept
        assert all(r[got[0].index(c)].isdigit() for r in got[1:] for c in COLUMNS)
        if all_clean:
            assert not rejected


def test_annotate_cli_names_the_line_and_skips_bad_rows(tmp_path):
    """The command line: fail mode exits 2 naming file and line, writes nothing; skip mode
    reports in = out + rejected."""
    from typer.testing import CliRunner

    from rlpredict.cli import app

    src = tmp_path / "t.jsonl"
    src.write_bytes(b'{"prompt": "hello there"}\n{"prompt": "\\ud800"}\n\xff\xfe\n'
                    b'{"prompt": "a", "x": ' + b"9" * 5000 + b'}\n{"prompt": "bye"}\n')
    dst = tmp_path / "o.jsonl"
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(dst), "--no-progress", "--threads", "1"])
    assert res.exit_code == 2 and f"{src}: line 2:" in res.output.replace("\n", "")
    assert not dst.exists()
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(dst), "--on-error", "skip", "--json",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (5, 2, 3)
    assert set(s["reasons"]) == {"field 'prompt' is not valid Unicode", "not valid UTF-8", "not valid JSON"}


# ---- regressions: inputs the fuzzing found crashing the loaders ---------------------------------
REGRESSIONS = {  # file name -> (content, line of the first bad row)
    "bigint.jsonl": (b'{"prompt": "a", "output_tokens": ' + b"9" * 5000 + b"}\n", 1),  # ValueError
    "deep.jsonl": (b'{"prompt": "a", "response": "b"}\n{"x": ' + b"[" * 3000 + b"]" * 3000 + b"}\n", 2),
    "digits.jsonl": ('{"prompt": "a", "output_tokens": "²"}\n'.encode(), 1),  # str.isdigit, int() fails
    "dashes.jsonl": (b'{"prompt": "a", "output_tokens": "--5"}\n', 1),
    "parts.jsonl": (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}], '
                    b'"response": "b"}\n', 1),  # TypeError in str.join
    "surrogate.jsonl": (b'{"prompt": "a\\ud800", "response": "b"}\n', 1),  # crashed tokenizers later
    "bad_utf8.csv": (b"prompt,response\na,b\n\xff,b\nc,d\n", 3),  # was one error for the whole file
    "big_cell.csv": (b"prompt,response\n" + b"a" * 200_000 + b",b\nc,\n", 3),  # csv.Error field limit
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_loader_regressions(tmp_path, name):
    data, line = REGRESSIONS[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_samples([path])
    assert _first_line(str(e.value), path) == line
    samples, report = load_samples([path], on_error="skip")
    assert report.n_skipped >= 1 and len(samples) + report.n_skipped == report.rows


ANNOTATE_REGRESSIONS = {  # file name -> (content, rows in, rows rejected)
    "bad_utf8.jsonl": (b'{"prompt": "a"}\n\xff\xfe\n{"prompt": "b"}\n', 3, 1),  # UnicodeDecodeError
    "bad_utf8.csv": (b"prompt\na\n\xff\nb\n", 3, 1),
    "surrogates.jsonl": (b'{"prompt": "\\ud800"}\n{"messages": [{"role": "user", "content": "\\udc00"}]}\n'
                         b'{"prompt": "a", "generator": "\\udfff"}\n{"prompt": "ok", "x": "\\ud800"}\n'
                         b'{"prompt": "ok", "x": "\\ud800", "rl_bucket": 1}\n', 5, 3),  # TypeError
    "numbers.jsonl": (b'{"prompt": "a", "x": ' + b"9" * 5000 + b'}\n{"prompt": "a", "x": '
                      + b"[" * 3000 + b"]" * 3000 + b'}\n{"prompt": "ok"}\n', 3, 2),  # ValueError, RecursionError
    "parts.jsonl": (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}\n{"prompt": "ok"}\n',
                    2, 1),
    "cr.jsonl": (b'{"prompt": "a",\r "b": 1}\n', 1, 0),  # a bare CR made two bad rows of one
    "messages_cell.csv": (b"messages\n" + b"9" * 5000 + b'\n"[{""role"": ""user"", ""content"": ""hi""}]"\n', 2, 1),
}


@pytest.mark.parametrize("name", sorted(ANNOTATE_REGRESSIONS))
def test_annotate_regressions(shipped, tmp_path, name):
    data, rows_in, rejected = ANNOTATE_REGRESSIONS[name]
    src = tmp_path / name
    src.write_bytes(data)
    s = annotate_file(shipped, src, tmp_path / f"out{src.suffix}", on_error="skip")
    assert (s.rows_in, s.rows_rejected) == (rows_in, rejected)
    out = (tmp_path / f"out{src.suffix}").read_bytes()
    out.decode("utf-8")  # the output is valid UTF-8, lone surrogates stay escaped
    (tmp_path / "out.rejects.jsonl").read_bytes().decode("utf-8")
    if rejected:
        with pytest.raises(AnnotateError, match=rf"{re.escape(str(src))}: line \d+: "):
            annotate_file(shipped, src, tmp_path / f"fail{src.suffix}")
