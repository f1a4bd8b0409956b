"""annotate: JSONL/JSONL.gz/CSV/Parquet, prompt and messages, error modes, atomic output."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from rlpredict.records import Fields
from rlpredict.serve.annotate import COLUMNS, AnnotateError, annotate_file
from rlpredict.serve.runtime import Predictor

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [
    {"id": 1, "prompt": "hi", "arrival_time_s": 0.5},
    {"id": 2, "prompt": "Write a long essay about the Roman empire.", "arrival_time_s": 1.25},
    {"id": 3, "prompt": "What is 2+2?", "arrival_time_s": 2.0},
    {"id": 4, "prompt": "Translate 'cat' into French, German and Italian.", "arrival_time_s": 3.5},
    {"id": 5, "prompt": "ok", "arrival_time_s": 4.0},
]
CONVS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "tell me a story about a dragon"}],
    [{"role": "user", "content": "list 5 fruits"}],
]


@pytest.fixture(scope="module")
def predictor(bundle_fp32) -> Predictor:
    return Predictor.load(bundle_fp32, threads=1, batch_size=4)


# ---- writing and reading each format ------------------------------------------------------------
def write(path: Path, rows: list[dict]) -> None:
    name = path.name
    if ".jsonl" in name:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    elif ".csv" in name:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "") for c in cols])
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def read(path: Path) -> list[dict]:
    name = path.name
    if ".jsonl" in name:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if ".csv" in name:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return pq.read_table(path).to_pylist()


def same(a, b) -> bool:
    """Equal, allowing CSV's strings for the original values."""
    return a == b or str(a) == str(b) or (isinstance(a, list) and json.loads(b) == a)


FORMATS = ["t.jsonl", "t.jsonl.gz", "t.csv", "t.parquet"]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_annotates_every_format(predictor, tmp_path, name, kind):
    if kind == "prompt":
        rows, requests = ROWS, [r["prompt"] for r in ROWS]
    else:
        rows = [{"id": i, "messages": m, "tenant": "a"} for i, m in enumerate(CONVS)]
        requests = CONVS
    src, dst = tmp_path / name, tmp_path / f"out.{name.split('.', 1)[1]}"
    write(src, rows)
    s = annotate_file(predictor, src, dst, chunk_rows=2)
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (len(rows), len(rows), 0)
    out = read(dst)
    want = predictor.predict(requests)
    assert len(out) == len(rows)
    for o, r, p in zip(out, rows, want, strict=True):
        assert list(o)[: len(r)] == list(r) and list(o)[len(r):] == list(COLUMNS)  # columns kept, in order
        assert all(same(r[k], o[k]) for k in r)
        assert [int(o[c]) for c in COLUMNS] == [p.bucket, p.pred_tokens, p.reserve_tokens]
    if name.endswith(".parquet"):
        schema = pq.read_schema(dst)
        assert all(schema.field(c).type == pa.int64() for c in COLUMNS)


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.csv.gz"])
def test_a_gzip_output_is_the_same_bytes_run_after_run(predictor, tmp_path, name, monkeypatch):
    """The gzip header records time 0 (as ``gzip -n``), so annotating the same input twice, at
    different times, gives the same file (was: each run's clock in the header's bytes 4-7)."""
    import time as time_module

    plain = tmp_path / name[:-3]
    write(plain, ROWS)
    src = tmp_path / name
    src.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = tmp_path / f"a.{name.split('.', 1)[1]}", tmp_path / f"b.{name.split('.', 1)[1]}"
    annotate_file(predictor, src, a)
    clock = time_module.time()
    monkeypatch.setattr(time_module, "time", lambda: clock + 86_400.0)  # a day later
    annotate_file(predictor, src, b)
    assert a.read_bytes()[4:8] == b"\0\0\0\0"
    # the same bytes but for the name the header records (each output's own)
    assert a.read_bytes().replace(b"a.", b"b.", 1) == b.read_bytes()


def test_jsonl_rows_keep_their_bytes(predictor, tmp_path):
    src = tmp_path / "t.jsonl"
    lines = ['{"prompt":"hi","x":1.50,"u":"caf\\u00e9"}', "", '{ "prompt" : "yo" }  ', "{}"]
    src.write_text("\n".join(lines) + "\n")
    s = annotate_file(predictor, src, tmp_path / "o.jsonl", on_error="skip")
    out = (tmp_path / "o.jsonl").read_text().splitlines()
    assert out[0].startswith('{"prompt":"hi","x":1.50,"u":"caf\\u00e9", "rl_bucket": ')
    assert out[1].startswith('{ "prompt" : "yo", "rl_bucket": ')
    assert out[1].endswith("}  ")  # the blanks after the brace too (were dropped, a reviewer's row)
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (3, 2, 1)  # blank line is no row; {} is bad
    src.write_bytes(b'{"prompt":"a"}  \t \n{"prompt":"b"} \r\n')
    annotate_file(predictor, src, tmp_path / "o.jsonl", force=True)
    assert re.fullmatch(rb'\{"prompt":"a", "rl_bucket": .*\}  \t \n\{"prompt":"b", .*\} \r\n',
                        (tmp_path / "o.jsonl").read_bytes())


def test_custom_fields_drop_final_assistant_and_existing_columns(predictor, tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long answer"}]
    src = tmp_path / "t.jsonl"
    write(src, [{"conversation": conv, "rl_bucket": -1}])
    fields = Fields.trace(messages="conversation", drop_final_assistant=True)
    annotate_file(predictor, src, tmp_path / "o.jsonl", fields=fields)
    (o,) = read(tmp_path / "o.jsonl")
    assert o["conversation"] == conv and o["rl_bucket"] == predictor.predict(conv[:1])[0].bucket


def test_fail_mode_names_the_line_and_writes_nothing(predictor, tmp_path):
    src, dst = tmp_path / "t.jsonl", tmp_path / "o.jsonl"
    rows = [*ROWS[:3], {"id": 9, "prompt": None}, *ROWS[3:]]
    write(src, rows)
    dst.write_text("previous output\n")
    with pytest.raises(AnnotateError, match=r"t\.jsonl: line 4: field 'prompt' is missing or null"):
        annotate_file(predictor, src, dst, chunk_rows=2, force=True)  # two chunks were written before the error
    assert dst.read_text() == "previous output\n"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "t.jsonl"]  # no temp files


@pytest.mark.parametrize("name", FORMATS)
def test_skip_mode_writes_rejects_and_counts(predictor, tmp_path, name):
    rows = [
        {"id": 1, "prompt": "fine", "messages": None},
        {"id": 2, "prompt": None, "messages": None},                        # nothing to predict on
        {"id": 3, "prompt": "x", "messages": [{"role": "user", "content": "ok"}]},
        {"id": 4, "prompt": None, "messages": [{"content": "no role"}]},    # malformed message
        {"id": 5, "prompt": "last", "messages": None},
    ]
    src, dst = tmp_path / name, tmp_path / f"out.{name.split('.', 1)[1]}"
    write(src, rows)
    s = annotate_file(predictor, src, dst, on_error="skip")
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (5, 3, 2)
    assert s.rows_in == s.rows_out + s.rows_rejected
    assert [int(r["id"]) for r in read(dst)] == [1, 3, 5]
    rejects = [json.loads(x) for x in Path(s.rejects).read_text().splitlines()]
    where = "row_number" if name.endswith(".parquet") else "line"
    first_line = 1 if where == "row_number" else (2 if name.endswith(".csv") else 1)
    assert [r[where] for r in rejects] == [first_line + 1, first_line + 3]
    assert "prompt" in rejects[0]["reason"] and "role" in rejects[1]["reason"]
    assert str(rejects[0]["row"]["id"]) == "2"


@pytest.mark.parametrize("failing", ["output", "rejects"])
def test_a_full_disk_names_the_file_whose_write_failed(predictor, tmp_path, monkeypatch, failing):
    """Was: "out.rejects.jsonl: No space left on device" when the output's write failed and no
    row had been rejected (the rejects file's context, entered last, named every error)."""
    import errno
    import os

    import rlpredict.serve.annotate as annotate_mod

    src, dst = tmp_path / "t.jsonl", tmp_path / "out.jsonl"
    write(src, [{"id": 1, "prompt": "fine"}, {"id": 2, "prompt": None}, {"id": 3, "prompt": "ok"}])
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "output":
        def lines(run, *_a, **_k):
            raise full
        monkeypatch.setattr(annotate_mod, "annotate_lines", lines)
    else:
        real = annotate_mod._dumps

        def dumps(obj):  # only rejects records go through it here: the disk fills at the first
            if "reason" in obj:
                raise full
            return real(obj)
        monkeypatch.setattr(annotate_mod, "_dumps", dumps)
    with pytest.raises(OSError, match="No space left on device") as e:
        annotate_file(predictor, src, dst, on_error="skip")
    want = dst if failing == "output" else tmp_path / "out.rejects.jsonl"
    assert e.value.filename == str(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # nothing half-written


def test_skip_mode_bad_json_and_cli_summary(bundle_fp32, tmp_path):
    from typer.testing import CliRunner

    from rlpredict.cli import app

    src, dst = tmp_path / "t.jsonl", tmp_path / "o.jsonl"
    src.write_text('{"prompt": "a"}\n{not json\n[1, 2]\n{"prompt": 3}\n{"prompt": "b"}\n')
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(dst), "--model", str(bundle_fp32),
                                   "--on-error", "skip", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (5, 2, 3)
    rejects = [json.loads(x) for x in (tmp_path / "o.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert "not valid JSON" in rejects[0]["reason"] and rejects[0]["row"] == "{not json"
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / "p.jsonl"),
                                   "--model", str(bundle_fp32), "--no-progress"])
    assert res.exit_code == 2 and "line 2" in res.output and not (tmp_path / "p.jsonl").exists()
    # A fail-mode run over the same output says the rejects beside it are an earlier run's (was:
    # nothing, so they seemed this output's); it leaves them as they are
    before = (tmp_path / "o.rejects.jsonl").read_bytes()
    src.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(dst), "--model", str(bundle_fp32),
                                   "--no-progress", "--force"])
    assert res.exit_code == 0, res.output
    assert "o.rejects.jsonl is an earlier run's rejects file, not this output's" in " ".join(res.output.split())
    assert (tmp_path / "o.rejects.jsonl").read_bytes() == before
    res = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / "q.jsonl"), "--model",
                                   str(bundle_fp32), "--json"])
    assert json.loads(res.stdout)["earlier_rejects"] is None


def test_interrupt_mid_way_leaves_no_partial_output(bundle_fp32, tmp_path, monkeypatch):
    p = Predictor.load(bundle_fp32)
    calls = {"n": 0}
    real = p.predict_arrays

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(p, "predict_arrays", flaky)
    for name in ("t.jsonl.gz", "t.parquet"):
        src = tmp_path / name
        write(src, ROWS * 4)
        dst = tmp_path / f"out.{name.split('.', 1)[1]}"
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            annotate_file(p, src, dst, chunk_rows=3, on_error="skip")
        assert not dst.exists() and not (tmp_path / "out.rejects.jsonl").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files


def test_bad_file_names(predictor, tmp_path):
    src = tmp_path / "t.jsonl"
    write(src, ROWS)
    with pytest.raises(AnnotateError, match="differs from the input"):
        annotate_file(predictor, src, tmp_path / "o.csv")
    with pytest.raises(AnnotateError, match="unsupported file type"):
        annotate_file(predictor, src, tmp_path / "o.txt")
    (tmp_path / "odir.jsonl").mkdir()
    with pytest.raises(AnnotateError, match=r"odir\.jsonl: is a folder; the output is a file"):
        annotate_file(predictor, src, tmp_path / "odir.jsonl")
    with pytest.raises(AnnotateError, match="no such file"):
        annotate_file(predictor, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")


def test_a_csv_cell_with_a_bare_carriage_return_is_quoted(predictor, tmp_path):
    """The csv module quotes only the line terminator's characters; a bare "\\r" left unquoted
    splits the row for any reader in universal-newline mode (text-mode csv, pandas)."""
    src, dst = tmp_path / "t.csv", tmp_path / "o.csv"
    src.write_bytes(b'id,prompt\r\n"x\ry",hello\r\nplain,bye\r\n')
    annotate_file(predictor, src, dst)
    assert dst.read_bytes().split(b"\n")[1].startswith(b'"x\ry","hello",')
    with open(dst, encoding="utf-8") as f:  # universal newlines: the row stays whole
        rows = list(csv.reader(f))
    assert [r[:2] for r in rows] == [["id", "prompt"], ["x\ny", "hello"], ["plain", "bye"]]


@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_a_csv_keeps_its_line_ends(predictor, tmp_path, end):
    """Was: a CRLF file annotated with LF line ends."""
    src, dst = tmp_path / "t.csv", tmp_path / "o.csv"
    src.write_bytes(b"id,prompt" + end + b"a,hello" + end + b'b,"two' + end + b'lines"' + end)
    annotate_file(predictor, src, dst)
    out = dst.read_bytes()
    assert out.count(end) == 4 and (end == b"\r\n" or b"\r" not in out)
    with open(dst, encoding="utf-8", newline="") as f:
        assert [r["prompt"] for r in csv.DictReader(f)] == ["hello", "two" + end.decode() + "lines"]


def test_a_csv_record_that_does_not_parse_is_kept_as_its_text(predictor, tmp_path):
    """Skip mode keeps a record the CSV reader cannot split into cells (a stray quote, a quote
    left open to the end) in the rejects file as the text it read, not as ``null``."""
    src, dst = tmp_path / "t.csv", tmp_path / "o.csv"
    bad = 'b,"x"y\n'                         # a character after a closing quote
    tail = '"never closed,\nstill\n'         # runs to the end of the file
    src.write_text("id,prompt\na,first\n" + bad + "c,third\n" + tail, encoding="utf-8")
    s = annotate_file(predictor, src, dst, on_error="skip")
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (4, 2, 2)
    rejects = [json.loads(x) for x in Path(s.rejects).read_text().splitlines()]
    assert [(r["line"], r["row"]) for r in rejects] == [(3, bad), (5, tail)]
    assert all(r["reason"].startswith("malformed CSV") for r in rejects)
    assert [r["id"] for r in read(dst)] == ["a", "c"]


def test_trace_messages_read_like_training_logs(predictor, tmp_path):
    """ShareGPT keys and role names, and content parts, give the model the text training gave
    it: the same predictions as the plain OpenAI form."""
    from rlpredict.data import samples_from_row

    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name\nthree rivers"}]
    forms = [plain,
             [{"from": "system", "value": "be brief"}, {"from": "human", "value": "name\nthree rivers"}],
             [{"role": "system", "content": "be brief"},
              {"role": "user", "content": [{"type": "text", "text": "name"}, {"type": "text", "text": "three rivers"}]}],
             # a part without a type is text (as training reads it), so is the Responses API's input_text
             [{"role": "system", "content": [{"text": "be brief"}]},
              {"role": "user", "content": [{"type": "input_text", "text": "name"}, {"text": "three rivers"},
                                           {"type": "image_url", "image_url": {"url": "x"}}]}]]
    src, dst = tmp_path / "t.jsonl", tmp_path / "o.jsonl"
    write(src, [{"id": i, "messages": m} for i, m in enumerate(forms)])
    annotate_file(predictor, src, dst)
    out = read(dst)
    assert len({tuple(o[c] for c in COLUMNS) for o in out}) == 1
    for system, user in (forms[2], forms[3]):
        text_parts = [p for p in user["content"] if p.get("type") != "image_url"]  # training refuses images
        row = {"messages": [system, {**user, "content": text_parts}, {"role": "assistant", "content": "ok"}]}
        assert samples_from_row(row, "x", "s")[-1].messages[:2] == plain  # training reads the same text
    # a part that is neither text nor media is refused, not read as nothing; a string is a text
    # part, as vLLM reads it
    write(src, [{"id": 0, "messages": [{"role": "user", "content": [5, "name three rivers"]}]},
                {"id": 1, "messages": [{"role": "user", "content": ["name", "three rivers"]}]}, {"id": 2, "prompt": "hi"}])
    summary = annotate_file(predictor, src, dst, force=True, on_error="skip")
    assert (summary.rows_rejected, summary.rows_out) == (1, 2)


def test_an_oversize_row_is_rejected_with_no_row_not_the_readers_marker(predictor, tmp_path):
    """The rejects record of a row over the 64 MiB limit held the reader's internal marker
    ("\\x00rlpredict: oversize row of N") as its row; the row was not kept, so it is null."""
    from rlpredict.records import MAX_ROW_BYTES

    src = tmp_path / "t.jsonl.gz"
    src.write_bytes(gzip.compress(b'{"prompt": "' + b"a" * MAX_ROW_BYTES + b'"}\n{"prompt": "hi"}\n', compresslevel=1))
    s = annotate_file(predictor, src, tmp_path / "o.jsonl.gz", on_error="skip")
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (2, 1, 1)
    [rec] = [json.loads(line) for line in (tmp_path / "o.rejects.jsonl").read_text().splitlines()]
    assert rec["line"] == 1 and rec["row"] is None and "over the 64 MiB limit" in rec["reason"]


def test_a_rejected_json_row_is_written_as_read_and_no_line_passes_for_the_oversize_marker(predictor, tmp_path):
    """A rejected row's JSON was parsed and written again (``1.50`` as ``1.5``, ``1e400`` as
    ``Infinity``, not JSON); a line that began as the reader's oversize marker was read as one
    (an int() error ended ``--on-error skip``; ``...of 12`` named a 30-byte line as over 64 MiB)."""
    row = '{"prompt":5,"x":1.50,"y":1e400,"z":12345678901234567890.5, "s": "\\ud800\u00e9"}'
    src = tmp_path / "t.jsonl"
    src.write_bytes(f'{row}\n  [1, 2.50]\n{{"prompt":"ok"}}\n'.encode()
                    + b"\x00rlpredict: oversize row of abc\n\x00rlpredict: oversize row of 12\n")
    s = annotate_file(predictor, src, tmp_path / "o.jsonl", on_error="skip")
    assert (s.rows_in, s.rows_out, s.rows_rejected) == (5, 1, 4)
    lines = (tmp_path / "o.rejects.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line) for line in lines]
    assert lines[0].endswith(f', "row": {row}}}') and lines[1].endswith(', "row": [1, 2.50]}')
    assert [r["line"] for r in recs] == [1, 2, 4, 5]
    assert recs[2]["row"] == "\x00rlpredict: oversize row of abc" and "not valid JSON" in recs[3]["reason"]
    # one record a line for every line reader, the same value (was: a row's own "\r" split it)
    src.write_text('{"noprompt":\r1}\n{"prompt": 5, "s": "a\u2028b\x85c"}\n{"prompt": "ok"}\n', encoding="utf-8")
    annotate_file(predictor, src, tmp_path / "o3.jsonl", on_error="skip")
    text = (tmp_path / "o3.rejects.jsonl").read_text(encoding="utf-8")
    recs = [json.loads(line) for line in text.splitlines()]
    assert [r["row"] for r in recs] == [{"noprompt": 1}, {"prompt": 5, "s": "a\u2028b\x85c"}]
    assert '"row": {"noprompt": 1}}' in text and "\r" not in text
    src.write_bytes(b'{"prompt":"ok"}\n\x00rlpredict: oversize row of 12\n')
    with pytest.raises(AnnotateError, match=r"t.jsonl: line 2: not valid JSON"):  # (was: "a row of 12 bytes")
        annotate_file(predictor, src, tmp_path / "o2.jsonl", on_error="fail")


def test_parquet_rows_read_as_their_json_does():
    """pyarrow gives every message (and content part) of a column every key any of them has,
    set to null where a row had none: null is read as absent. A ShareGPT message beside OpenAI
    ones was refused as `unknown role None`, and a text part without `type` was dropped."""
    from rlpredict.records import TRACE_FIELDS, request_of

    mixed = [{"messages": [{"role": "user", "content": "Write an essay"}]},
             {"messages": [{"from": "human", "value": "Write an essay"}]}]
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"text": "and more"}]}]}]
    for rows in (mixed, parts):
        via_parquet = pa.Table.from_pylist(rows).to_pylist()
        for row, stored in zip(rows, via_parquet, strict=True):
            assert stored != row  # the null keys pyarrow adds
            assert request_of(stored, TRACE_FIELDS) == request_of(row, TRACE_FIELDS)
    assert request_of(parts[0], TRACE_FIELDS)[0]["content"] == "hi\nand more"


@pytest.mark.parametrize("messages", [[], "[]"])  # JSON, and a CSV cell
def test_empty_messages_leave_the_prompt_beside_them(messages):
    from rlpredict.records import TRACE_FIELDS, RecordError, request_of

    assert request_of({"prompt": "hello there", "messages": messages}, TRACE_FIELDS) == "hello there"  # was refused
    with pytest.raises(RecordError, match="'messages' is missing or empty"):
        request_of({"messages": messages}, TRACE_FIELDS)


def test_rejected_rows_are_tallied_by_kind_not_by_value(predictor, tmp_path: Path) -> None:
    """Each row's bad value made its own tally key (200 distinct roles: 200 keys in ``reasons``)."""
    src = tmp_path / "t.jsonl"
    write(src, [{"messages": [{"role": i, "content": "hi"}]} for i in range(200)] + [{"prompt": "fine"}])
    s = annotate_file(predictor, src, tmp_path / "o.jsonl", on_error="skip")
    assert s.rows_rejected == 200 and s.reasons == {"messages: a message has an unknown role": 200}


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.csv", "t.csv.gz"])
def test_a_byte_order_mark_is_kept(predictor, tmp_path, name):
    """A UTF-8 byte-order mark at the start of the input starts the output too (was: dropped,
    the one byte of a JSONL row annotate did not keep; a spreadsheet reads a CSV without it as
    another encoding)."""
    text = '{"prompt": "héllo"}\n{"prompt": "b"}\n' if ".jsonl" in name else "prompt\nhéllo\nb\n"
    data = b"\xef\xbb\xbf" + text.encode()
    src, dst = tmp_path / name, tmp_path / name.replace("t.", "o.")
    src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    s = annotate_file(predictor, src, dst)
    assert (s.rows_in, s.rows_out) == (2, 2)
    out = dst.read_bytes()
    out = gzip.decompress(out) if name.endswith(".gz") else out
    assert out.startswith(b"\xef\xbb\xbf") and out.count(b"\xef\xbb\xbf") == 1
    lines = out.decode("utf-8-sig").splitlines()
    rows = [json.loads(x) for x in lines] if ".jsonl" in name else list(csv.DictReader(lines))
    assert [r["prompt"] for r in rows] == ["héllo", "b"]
    plain = tmp_path / name.replace("t.", "p.")
    plain.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    annotate_file(predictor, plain, tmp_path / name.replace("t.", "q."))
    got = (tmp_path / name.replace("t.", "q.")).read_bytes()
    assert b"\xef\xbb\xbf" not in (gzip.decompress(got) if name.endswith(".gz") else got)


def test_rejects_never_replace_an_output_folders_trace(predictor, tmp_path):
    """``--rejects`` over an annotated trace that an earlier run's output folder lists, with
    ``--force``, was taken (the owner exception lets ``--output`` annotate it again): the trace
    became rejects while the record still listed it (a reviewer's find). ``-o .`` in skip mode
    named no option (``PosixPath('.') has an empty name``)."""
    from rlpredict.outputs import OWNER_FILE, OutputError
    from rlpredict.serve.annotate import ANNOTATE_TOOL, default_rejects_path

    src = tmp_path / "in.jsonl"
    write(src, ROWS)
    folder = tmp_path / "o3"
    folder.mkdir()
    (folder / "a.jsonl").write_text("the annotated trace\n")
    (folder / OWNER_FILE).write_text(json.dumps({"tool": ANNOTATE_TOOL, "files": ["a.jsonl"]}))
    with pytest.raises(OutputError, match="--rejects is rlpredict annotate's output"):
        annotate_file(predictor, src, tmp_path / "e.jsonl", on_error="skip", rejects=folder / "a.jsonl",
                      force=True, owner=ANNOTATE_TOOL)
    assert (folder / "a.jsonl").read_text() == "the annotated trace\n"
    annotate_file(predictor, src, folder / "a.jsonl", force=True, owner=ANNOTATE_TOOL)  # as --output: again
    with pytest.raises(AnnotateError, match="--output names no file"):
        default_rejects_path(".")
    # the default rejects path of a rerun, over a trace such a folder lists under that name (a
    # reviewer's find in the fix that let a script's folder list its rejects)
    (folder / "a.rejects.jsonl").write_text("another annotated trace\n")
    (folder / OWNER_FILE).write_text(json.dumps({"tool": ANNOTATE_TOOL, "files": ["a.jsonl", "a.rejects.jsonl"]}))
    with pytest.raises(OutputError, match="--rejects is rlpredict annotate's output"):
        annotate_file(predictor, src, folder / "a.jsonl", on_error="skip", force=True, owner=ANNOTATE_TOOL)
    assert (folder / "a.rejects.jsonl").read_text() == "another annotated trace\n"
    summary = annotate_file(predictor, src, folder / "a.jsonl", force=True, owner=ANNOTATE_TOOL)
    assert summary.earlier_rejects is None  # a trace the folder lists (was: "an earlier run's rejects")
    script = tmp_path / "s"  # a script's folder, which lists each output's rejects: replaced on a rerun
    script.mkdir()
    (script / OWNER_FILE).write_text(json.dumps({"tool": "a script", "files": ["b.jsonl", "b.rejects.jsonl"]}))
    (script / "b.rejects.jsonl").write_text("old rejects\n")
    annotate_file(predictor, src, script / "b.jsonl", on_error="skip", force=True, owner="a script")
    assert (script / "b.rejects.jsonl").read_text() == ""


def test_a_dead_workers_bundle_copy_is_removed() -> None:
    """A Ray worker killed while it loads leaves its copy of the bundle (its ``finally`` never
    runs); the next worker removes the copies of dead pids (a reviewer's find)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from rlpredict.serve.annotate_ray import COPY_PREFIX, _remove_stale_copies

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{int(done.stdout)}-"))
    (dead / "model.onnx").write_bytes(b"x")
    live = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-"))
    try:
        _remove_stale_copies()
        assert not dead.exists() and live.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_csv_and_parquet_cells_keep_the_jsonl_rules(predictor, tmp_path) -> None:
    """A reviewer's finds: a messages cell giving a key twice was read with the last value (a
    JSONL row is refused); a Parquet reject's NaN was bare NaN in the rejects file (not JSON);
    a replaced ``rl_*`` column kept pandas' record of its old type (read back as strings)."""
    pd = pytest.importorskip("pandas")

    dk = tmp_path / "dk.csv"
    dk.write_text('messages\n"[{""role"": ""user"", ""content"": ""a"", ""content"": ""b""}]"\n')
    with pytest.raises(AnnotateError, match=r"key 'messages\[0\]\.content' is given twice"):
        annotate_file(predictor, dk, tmp_path / "dk.out.csv")
    # one rule in every format: a content part's text given twice is refused in JSON Lines too (was:
    # the last kept), and a key no reader takes may repeat in a CSV cell as in a JSONL row
    for text, refused in (('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "text": "b"}]}]}',
                           True),
                          ('{"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "a", '
                           '"refusal": "b"}]}]}', "refusal"),
                          ('{"messages": [{"role": "user", "content": "a", "name": "x", "name": "y"}]}', False)):
        (tmp_path / "p.jsonl").write_text(text + "\n")
        if refused:
            key = refused if isinstance(refused, str) else "text"
            with pytest.raises(AnnotateError, match=rf"key 'messages\[0\]\.content\[0\]\.{key}' is given twice"):
                annotate_file(predictor, tmp_path / "p.jsonl", tmp_path / "p.out.jsonl", force=True)
        else:
            annotate_file(predictor, tmp_path / "p.jsonl", tmp_path / "p.out.jsonl", force=True)
    (tmp_path / "n.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""a"", ""name"": ""x"", '
                                    '""name"": ""y""}]"\n')
    annotate_file(predictor, tmp_path / "n.csv", tmp_path / "n.out.csv")  # (was refused, a first fix)

    t = pa.table({"prompt": [None, "ok"], "f": [float("nan"), float("inf")], "d": [{"a": -float("inf")}] * 2})
    pq.write_table(t, tmp_path / "nan.parquet")
    annotate_file(predictor, tmp_path / "nan.parquet", tmp_path / "nan.out.parquet", on_error="skip")
    [line] = (tmp_path / "nan.out.rejects.jsonl").read_text().splitlines()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))["row"]
    assert row == {"prompt": None, "f": "NaN", "d": {"a": "-Infinity"}}

    pd.DataFrame({"prompt": ["a", "b"], "rl_bucket": ["0-32", "32-64"]}).to_parquet(tmp_path / "pm.parquet")
    annotate_file(predictor, tmp_path / "pm.parquet", tmp_path / "pm.out.parquet")
    back = pd.read_parquet(tmp_path / "pm.out.parquet")
    assert str(back["rl_bucket"].dtype) == "int64" and str(back["rl_pred_tokens"].dtype) == "int64"


def test_csv_lines_are_named_as_an_editor_counts_them(tmp_path) -> None:
    """Blank lines before the header are skipped (was: an empty header, the real one a bad row),
    and a bare CR in a quoted cell ends no line (was: every later line named one too far; a file
    of CR line ends still counts them)."""
    import io

    from rlpredict.records import csv_records

    def lines(text: str) -> list[tuple[int, list[str] | None]]:
        return [(n, cells) for n, cells, _, _ in csv_records(io.StringIO(text, newline=""))]

    assert lines("\n\nid,prompt\n1,hi\n") == [(3, ["id", "prompt"]), (4, ["1", "hi"])]
    assert lines('id,prompt\n1,"a\rb\rc"\n2,\n3,ok\n') == [(1, ["id", "prompt"]), (2, ["1", "a\rb\rc"]),
                                                           (3, ["2", ""]), (4, ["3", "ok"])]
    assert [n for n, _ in lines("id,prompt\r1,a\r2,b\r")] == [1, 2, 3]
    assert [n for n, _ in lines('id,prompt\r\n1,"x\r\ny"\r\n2,z\r\n')] == [1, 2, 4]
    from rlpredict.records import RecordError

    with pytest.raises(RecordError, match="appear more than once") as e:  # (was: named line 1)
        lines("\n\nprompt,prompt\nhi,ho\n")
    assert e.value.location == "3"
