"""Loaders: every supported file type and row shape, and every kind of bad input."""

from __future__ import annotations

import gzip
import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpredict.data import DataError, attach_rl, load_samples
from rlpredict.records import RecordError
from rlpredict.samples import SAMPLE_FILES


def _jsonl(path, rows, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    (path.write_bytes(gzip.compress(data)) if gz else path.write_bytes(data))
    return path


def test_prompt_response_jsonl_gz(tmp_path):
    p = _jsonl(tmp_path / "logs.jsonl.gz", [{"prompt": "Hi there", "response": "Hello! How can I help?"}], gz=True)
    (s,), rep = load_samples([p])
    assert s.messages == [{"role": "user", "content": "Hi there"}]
    assert s.response == "Hello! How can I help?" and s.source == "logs" and rep.samples == 1


def test_openai_messages_last_assistant_and_separate_field(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q2"}]}], "completion": "A2"},
    ]
    a, b = load_samples([_jsonl(tmp_path / "chat.jsonl", rows)])[0]
    assert a.messages[-1] == {"role": "user", "content": "Q1"} and a.response == "A1" and len(a.messages) == 2
    assert b.messages == [{"role": "user", "content": "Q2"}] and b.response == "A2"


def test_sharegpt_one_sample_per_assistant_turn(tmp_path):
    conv = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    samples, _ = load_samples([_jsonl(tmp_path / "sg.jsonl", [{"id": "c1", "conversations": conv}])])
    assert [s.response for s in samples] == ["a1", "a2"]
    assert samples[1].messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                   {"role": "user", "content": "q2"}]
    assert {s.group for s in samples} == {"c1"}


def test_an_id_less_conversation_is_grouped_by_its_content(tmp_path):
    """Was: by its location (the path as typed, the line), so ``eval`` given the same file under
    another path, or with rows added above, split it otherwise and scored training rows."""
    conv = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]
    other = [{"from": "human", "value": "q0"}, {"from": "gpt", "value": "a0"}]
    (tmp_path / "d").mkdir()
    p = _jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    (a,), _ = load_samples([p])
    (_, b), _ = load_samples([_jsonl(tmp_path / "sg2.jsonl", [{"conversations": other}, {"conversations": conv}])])
    (c,), _ = load_samples([str(tmp_path / "d" / ".." / "sg.jsonl")])
    assert a.group == b.group == c.group


def test_sharegpt_turns_answering_nothing_are_counted(tmp_path):
    """A conversation cut into chunks starts with an assistant turn (or has two in a row): those
    turns are no samples, and the read says how many it left out."""
    conv = [{"from": "gpt", "value": "tail of a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
            {"from": "gpt", "value": "a2, continued"}]
    samples, rep = load_samples([_jsonl(tmp_path / "sg.jsonl", [{"id": 7, "conversations": conv}])])
    assert [s.response for s in samples] == ["a2"] and samples[0].group == "7" and rep.unanswered_turns == 2
    assert "1 rows -> 1 samples (2 assistant turns answering no user message left out)" in rep.summary()


def test_token_count_only_and_count_wins(tmp_path):
    rows = [{"prompt": "a", "usage": {"completion_tokens": 17}},
            {"prompt": "b", "output_tokens": "23"},
            {"prompt": "c", "response": "one two three", "output_tokens": 5}]
    samples, _ = load_samples([_jsonl(tmp_path / "req.jsonl", rows)])
    attach_rl(samples, "llama3")
    assert [s.rl_tokens for s in samples] == [17, 23, 5]
    # a key no reader reads may repeat, nested or not (a literal top-level "usage.completion_tokens"
    # is not read: the reader reads it as a path)
    ok = _jsonl(tmp_path / "ok.jsonl", ['{"prompt": "a", "usage": {"completion_tokens": 4, "x": 1, "x": 2}, "y": 1, "y": 2, '
                                        '"usage.completion_tokens": 1, "usage.completion_tokens": 2}'])
    assert load_samples([ok])[0][0].rl_tokens == 4


def test_fields_that_disagree_are_said(tmp_path):
    """Two fields holding the same thing (a count, or a response text) that disagree: the first
    listed is read, as before, and the read says so (was: without a word; a reviewer's drift
    run read 5 tokens where `completion_tokens` said 900)."""
    rows = [{"prompt": "a", "output_tokens": 5, "completion_tokens": 900},
            {"prompt": "b", "output_tokens": 5, "usage": {"completion_tokens": "5"}},  # agree: nothing said
            {"prompt": "c", "response": "short", "completion": "a much longer text"},
            {"prompt": "d", "response": "same", "output": [{"type": "text", "text": "same"}]},  # agree as text
            {"prompt": "e", "output_tokens": 7, "rl_tokens": None, "completion_tokens": 8}]
    samples, rep = load_samples([_jsonl(tmp_path / "d.jsonl", rows)])
    assert [s.rl_tokens for s in samples][:2] == [5, 5] and samples[2].response == "short"
    assert dict(rep.disagreeing) == {"output_tokens over completion_tokens": 2, "response over completion": 1}
    text = rep.summary()
    assert (f"2 rows hold both 'output_tokens' and 'completion_tokens', which disagree: 'output_tokens' was read "
            f"(first: {tmp_path / 'd.jsonl'}:1)") in text
    assert "1 row holds both 'response' and 'completion'" in text


def test_a_blank_generator_names_no_model(tmp_path):
    """As ``annotate`` reads it (``records.names_nothing``): blank space is no model's name, and
    the next generator field is read (was: "   " trained as a model's name)."""
    rows = [{"prompt": "a", "output_tokens": 3, "generator": "  "},
            {"prompt": "b", "output_tokens": 3, "generator": "\t", "model": "gpt-4"},
            {"prompt": "c", "output_tokens": 3, "model": " gpt-4 "}]
    samples, _ = load_samples([_jsonl(tmp_path / "g.jsonl", rows)])
    assert [s.generator for s in samples] == [None, "gpt-4", " gpt-4 "]


def test_load_samples_checks_its_arguments(tmp_path):
    """Was: a path given as a string read as its characters ("/" walked the whole disk), and
    max_rows -1 or 0 read nothing, 2.5 three rows, True one."""
    p = _jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "output_tokens": 3}, {"prompt": "b", "output_tokens": 4}])
    for one in (str(p), p):
        with pytest.raises(TypeError, match="paths must be a list of files or folders"):
            load_samples(one)
    for bad in (-1, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_rows must be a whole number >= 1"):
            load_samples([p], max_rows=bad)
    import numpy as np

    assert len(load_samples([p], max_rows=np.int64(1))[0]) == 1


def test_rl_counted_with_named_tokenizer(tmp_path):
    samples, _ = load_samples([_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "Hello world"}])])
    attach_rl(samples, "llama3")
    assert samples[0].rl_tokens == 2


def test_json_array_csv_parquet_and_datasets_folder(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "conversation_id": f"c{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "b.csv", index=False)
    df.to_parquet(tmp_path / "c.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d"))
    for name in ("a.json", "b.csv", "c.parquet", "d"):
        samples, _ = load_samples([tmp_path / name])
        assert [s.response for s in samples] == ["answer 0", "answer 1", "answer 2"], name
        assert [s.group for s in samples] == ["c0", "c1", "c2"], name


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
def test_a_json_array_is_read_row_by_row_and_strictly(tmp_path, monkeypatch, chunk):
    """A JSON array file is read in chunks (was: whole, 631 MiB for a 316 MB file), with the
    same rows and lines at any chunk size; what ``json.loads`` refuses is refused (was: the rows
    after the first ']' ignored, a file cut short or missing a comma read without a word)."""
    from rlpredict import records

    monkeypatch.setattr(records, "ARRAY_CHUNK", chunk)
    rows = [{"prompt": f"q{i}", "response": "r" * i, "n": 10 ** i} for i in range(6)]
    ok = tmp_path / "ok.json"
    ok.write_text("\n \n[" + ",\n".join(json.dumps(r) for r in rows) + "\n, 123456789]  \n")
    got = list(records.iter_rows(ok))
    assert [r for _, r in got] == [*rows, 123456789]
    assert [loc.rsplit(":", 1)[1] for loc, _ in got] == ["3", "4", "5", "6", "7", "8", "9"]
    twice = tmp_path / "twice.json"
    twice.write_text('[{"prompt": "a", "prompt": "b"}]')
    assert "given twice" in str(next(iter(records.iter_rows(twice)))[1])  # a bad row, as in JSON Lines
    for text, why in (('[{"prompt": "a"}]\n[{"prompt": "b"}]', r"two\.json:2: .*text after the array"),
                      ('[{"prompt": "a"},\n{"prompt": "b"},\n', r"two\.json:3: .*the file ends where a row"),
                      ('[{"prompt": "a"}\n{"prompt": "b"}]', r"two\.json:2: .*expected ',' or ']'"),
                      ('[{"prompt": "a"},]', r"a ',' before ']'"), ('[{"prompt": "a"', r"not valid JSON")):
        (tmp_path / "two.json").write_text(text)
        with pytest.raises(RecordError, match=why):
            list(records.iter_rows(tmp_path / "two.json"))
    assert list(records.iter_rows(_write(tmp_path / "e.json", " [ ] "))) == []
    with pytest.raises(RecordError, match="not valid JSON"):  # JSON's blank space, not Python's
        list(records.iter_rows(_write(tmp_path / "ff.json", '\x0c[{"prompt": "a"}]')))


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_a_data_object_is_read_row_by_row(tmp_path, monkeypatch, chunk):
    """``{"data": [rows]}`` is read in chunks too (was: the file read whole, then decoded whole:
    735 MiB for a 206 MB file), its rows named by their lines; ``data`` given twice is refused
    (was: the last read, as json.loads keeps it, the other's rows left out); the other members are read item by item, and a single value in them
    counts against the row limit, as a single object does; what json.loads refuses is refused at
    its line."""
    from rlpredict import records

    monkeypatch.setattr(records, "ARRAY_CHUNK", chunk)
    monkeypatch.setattr(records, "MAX_ROW_BYTES", 200)
    rows = [{"prompt": f"q{i}", "n": -2.5 * i} for i in range(4)]
    body = ",\n".join(json.dumps(r) for r in rows)
    ok = _write(tmp_path / "ok.json", f'\n{{"version": 1.5,\n "data": [\n{body}\n],\n "meta": {{"data": 2}}}}\n')
    got = list(records.iter_rows(ok))
    assert [r for _, r in got] == rows and [loc.rsplit(":", 1)[1] for loc, _ in got] == ["4", "5", "6", "7"]
    ids = _write(tmp_path / "ids.json", f'{{"ids": {list(range(300))}, "m": {{"a": [{"1, " * 150}2]}}, "data": [{body}]}}')
    assert [r for _, r in records.iter_rows(ids)] == rows  # the other members item by item too
    one = _write(tmp_path / "one.json", '\n{"prompt": "q",\n "data": "not a list"}')
    assert [(loc.rsplit(":", 1)[1], r) for loc, r in records.iter_rows(one)] == [("2", {"data": "not a list", "prompt": "q"})]
    for text, why in ((f'{{"data": [1],\n "data": [{body}]}}', r"big\.json:2: the key 'data' is given twice"),
                      ('{"data": "x", "data": [1]}', r"big\.json:1: the key 'data' is given twice"),
                      (f'{{"data": [{body}], "meta": 1', r"big\.json:4: .*the file ends where ',' or '}' should be"),
                      (f'{{"data": [{body}]}}\n]', r"big\.json:5: .*text after the value"),
                      (f'{{"data": [{body}], }}', r"a ',' before '}'"),
                      ("{" + ",\n".join(f'"k{i}": "{"x" * 150}"' for i in range(5)) + "}", r"big\.json:1: a row of over"),
                      (f'{{"meta": "{"x" * 500}", "data": [{body}]}}', r"big\.json:1: a value of over")):
        if "over" in why and chunk > records.MAX_ROW_BYTES:
            continue  # the first read is a whole chunk (ARRAY_CHUNK is below the limit)
        _write(tmp_path / "big.json", text)
        with pytest.raises(RecordError, match=why):
            list(records.iter_rows(tmp_path / "big.json"))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_folder_of_data_files_is_read_file_by_file(tmp_path):
    """Not a saved datasets folder: every data file below it, in name order, with its lines named
    and bad rows skippable (was: ``datasets.load_dataset``'s errors, no file or line, no skip)."""
    d = tmp_path / "logs"
    (d / "b").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"prompt": "q1", "response": "r1"}\n{"prompt": "q2", oops}\n')
    (d / "b" / "c.csv").write_text("prompt,response\nq3,r3\n")
    (d / "notes.txt").write_text("not data\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        load_samples([d])
    samples, rep = load_samples([d], on_error="skip")
    assert [s.response for s in samples] == ["r1", "r3"] and rep.n_skipped == 1
    (d / "z.jsonl.xz").write_bytes(b"\xfd7zXZ")  # was: left out without a word
    samples, rep = load_samples([d], on_error="skip")
    assert len(samples) == 2 and rep.n_skipped == 2 and "a data file compressed as .xz" in rep.summary()
    (d / "a.jsonl").write_text('{"prompt": "q1", "response": "r1"}\n')
    with pytest.raises(DataError, match=r"z\.jsonl\.xz: a data file compressed as \.xz, which is not read"):
        load_samples([d])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder with no data files"):
        load_samples([tmp_path / "empty"])


def test_csv_messages_cell_is_json(tmp_path):
    p = tmp_path / "m.csv"
    msgs = json.dumps([{"role": "user", "content": "hi, there"}, {"role": "assistant", "content": "yo"}])
    p.write_text('id,messages\nr1,"' + msgs.replace('"', '""') + '"\n')
    (s,), _ = load_samples([p])
    assert s.response == "yo" and s.messages == [{"role": "user", "content": "hi, there"}]
    # a prompt or a response that is JSON text is text, as annotate reads it (was: decoded: the
    # prompt refused as "expected a string, got dict", the response counted as its parts' text)
    q = tmp_path / "j.csv"
    q.write_text('prompt,response\n"{""a"": 1}","[{""type"": ""text"", ""text"": ""hi""}]"\n')
    (s,), _ = load_samples([q])
    assert s.messages == [{"role": "user", "content": '{"a": 1}'}] and s.response == '[{"type": "text", "text": "hi"}]'


def test_a_csv_record_with_more_or_fewer_cells_than_the_header_is_a_bad_row(tmp_path):
    """A cell past the header's columns has no field to go to: it is not dropped in silence."""
    p = tmp_path / "ragged.csv"
    p.write_text('prompt,response\nok,fine\n"a\nb",c,d\nhi\n')
    with pytest.raises(DataError, match=r"ragged\.csv:3: has 3 fields, the header has 2"):
        load_samples([p])
    samples, rep = load_samples([p], on_error="skip")
    assert [s.response for s in samples] == ["fine"] and rep.n_skipped == 2


def test_shared_format_rows(tmp_path):
    samples, rep = load_samples(list(SAMPLE_FILES.values()))
    assert rep.n_skipped == 0 and rep.rows == len(samples) == 580
    sg = [s for s in samples if s.source == "sharegpt_sample"]
    assert all(s.messages[-1]["role"] == "user" for s in sg)  # the response is not in the context
    assert all(s.response and s.response not in s.messages[-1]["content"] for s in sg[:20])


@pytest.mark.parametrize(("line", "expect"), [
    ('{"prompt": "x", "response": ', "not valid JSON"),
    ('{"response": "y"}', "no prompt"),
    ('{"prompt": 3, "response": "y"}', "field 'prompt': expected a string, got int"),
    ('{"prompt": "   ", "response": "y"}', "empty prompt"),
    ('{"prompt": "x"}', "no response"),
    ('{"prompt": "x", "output_tokens": -4}', "field 'output_tokens': expected an integer token count in [0, 2^53]"),
    # counts past 2^53 were read, rounded: a float holds no such integer exactly
    ('{"prompt": "x", "output_tokens": 1e30}', "field 'output_tokens': expected an integer token count in [0, 2^53]"),
    ('{"prompt": "x", "output_tokens": 9007199254740993}', "got 9007199254740993"),
    ('{"prompt": "x", "completion_tokens": "99999999999999999999"}', "field 'completion_tokens': expected an integer"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x", "response": "y", "generator": ["a", "b"]}', "field 'generator': expected a string, got ['a', 'b']"),
    ('{"prompt": "x", "response": "y", "generator": 7}', "field 'generator': expected a string, got 7"),
    ('{"prompt": "x", "response": "y", "model": "gpt\\ud800x"}', "field 'model': not valid Unicode (a lone surrogate)"),
    ('{"prompt": "x", "response": "y", "id": {"x": 1}}', "field 'id': expected a string or an integer"),
    ('{"prompt": "x", "response": "y", "conversation_id": 1.5}', "field 'conversation_id': expected a string or an integer"),
    # a field read from a nested object, given twice inside it (was: the last count kept, silently)
    ('{"prompt": "x", "usage": {"completion_tokens": 3, "completion_tokens": 300}}',
     "key 'usage.completion_tokens' is given twice in one JSON object"),
    ('{"prompt": "x", "usage": {"completion_tokens": 3}, "usage": {"completion_tokens": 300}}',
     "key 'usage' is given twice"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, expect):
    p = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(DataError) as e:
        load_samples([p])
    assert f"{p}:2" in str(e.value) and expect in str(e.value)


def test_token_counts_up_to_2_53_are_exact(tmp_path):
    p = _jsonl(tmp_path / "ok.jsonl", ['{"prompt": "x", "output_tokens": 9007199254740992}',
                                       '{"prompt": "y", "output_tokens": 7.0}'])
    samples, _ = load_samples([p])
    assert [s.rl_tokens for s in samples] == [2**53, 7]


def test_non_utf8_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not valid UTF-8"):
        load_samples([p])


def test_skip_mode_counts_every_bad_row(tmp_path):
    p = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"}, "{oops", {"prompt": ""},
                                          {"prompt": "c", "response": "d"}])
    samples, rep = load_samples([p], on_error="skip")
    assert len(samples) == 2 and rep.rows == 4 and rep.n_skipped == 2
    assert rep.rows == rep.samples + rep.n_skipped
    assert any("mixed.jsonl:2" in e for e in rep.examples) and "skipped 2 rows" in rep.summary()


def test_skipped_rows_are_counted_by_kind_not_by_value(tmp_path):
    """The tally was keyed on each row's reason, its value in it: 20,000 bad counts made 20,000
    keys and a 1.5 MB summary line. One key per kind now, with where it was first met."""
    from rlpredict.data import MAX_KINDS, OTHER_KINDS, LoadReport
    from rlpredict.records import RecordError

    broken = '{"prompt": "x", "response": "\x01'  # a control character in a string (a truncated line)
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"".join(json.dumps({"prompt": f"q{i}", "output_tokens": -(i + 1)}).encode() + b"\n" for i in range(300))
                  + broken.encode() + b"\n\xe9\n" + b'{"prompt": "ok", "response": "fine"}\n')
    samples, rep = load_samples([p], on_error="skip")
    assert len(samples) == 1 and rep.n_skipped == 302
    assert rep.skipped == {"output_tokens: expected an integer token count in [0, 2^53]": 300,
                           "not valid JSON (Invalid control character)": 1, "not valid UTF-8": 1}
    summary = rep.summary()
    assert len(summary) < 300 + 3 * len(str(p)) and f"300 x output_tokens: expected an integer token count in [0, 2^53] (first: {p}:1)" in summary
    assert f"not valid UTF-8 (first: {p}:302)" in summary
    assert len(rep.examples) == 5 and rep.examples[0].endswith("got -1")  # the values, in the first rows
    with pytest.raises(DataError, match="Invalid control character at column 30"):  # was "at, column 30"
        load_samples([_jsonl(tmp_path / "one.jsonl", [broken])])
    rep = LoadReport()  # kinds past MAX_KINDS are counted together: the tally stays bounded
    for i in range(MAX_KINDS + 10):
        rep.skip(RecordError(f"f:{i}", f"reason {i}"))
    assert len(rep.skipped) == MAX_KINDS + 1 and rep.skipped[OTHER_KINDS] == 10 and rep.first[OTHER_KINDS] == f"f:{MAX_KINDS}"


def test_a_row_that_is_no_object_is_named_in_json_words(tmp_path):
    p = _jsonl(tmp_path / "n.jsonl", [{"prompt": "ok", "response": "fine"}, "null"])
    with pytest.raises(DataError, match=r"n\.jsonl:2: expected a JSON object per row, got null"):  # was: NoneType
        load_samples([p])


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_samples([tmp_path / "nope.jsonl"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_samples([tmp_path / "x.txt"])


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["word", "1234567", "é", "你好", "😀", "  ", "\n", "\t", "x.y", "'s"]),
                      min_size=1, max_size=120),
       seps=st.lists(st.sampled_from([" ", "", "  ", "\n"]), min_size=120, max_size=120),
       size=st.integers(8, 120))
def test_long_responses_are_counted_in_pieces_to_the_same_count(words, seps, size):
    """A 30 MB response took 4.5 GB to count whole: texts over PIECE_CHARS are counted piece by
    piece, cut before a space between two other characters, which is exact for byte-level BPE."""
    from rlpredict.rl_tokenizers import _pieces, load_rl_tokenizer

    text = "".join(w + s for w, s in zip(words, seps, strict=False))
    pieces = _pieces(text, size)
    assert "".join(pieces) == text and all(len(p) <= size for p in pieces)
    clean = all(p[:1] == " " and p[1:2] and not p[1].isspace() and not q[-1].isspace()
                for q, p in itertools.pairwise(pieces))
    if clean:  # every cut before a space between two other characters (else a cut at `size`)
        tok = load_rl_tokenizer("llama3")
        count = sum(len(tok.encode(p, add_special_tokens=False).ids) for p in pieces)
        assert count == len(tok.encode(text, add_special_tokens=False).ids)


def test_count_tokens_pieces_and_batches_add_up(monkeypatch):
    from rlpredict import rl_tokenizers

    texts = [" ".join(["alpha", "beta", "42", "gamma."] * n) for n in (1, 30, 300)] + ["", "x"]
    want = rl_tokenizers.count_tokens(texts, "llama3")
    monkeypatch.setattr(rl_tokenizers, "PIECE_CHARS", 64)
    monkeypatch.setattr(rl_tokenizers, "BATCH_CHARS", 200)
    assert rl_tokenizers.count_tokens(texts, "llama3", batch_size=3) == want


def test_files_that_share_a_source_name_are_said(tmp_path):
    """``a/logs.jsonl`` and ``b/logs.jsonl`` are one source (the per-source cap and tables count
    them together): that was silent."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "logs.jsonl").write_text(json.dumps({"prompt": f"q{d}", "response": "r"}) + "\n")
    paths = [tmp_path / "a" / "logs.jsonl", tmp_path / "b" / "logs.jsonl"]
    samples, report = load_samples(paths)
    assert {s.source for s in samples} == {"logs"} and len(samples) == 2
    assert report.shared_sources == {"logs": [str(p) for p in paths]}
    assert "2 files are one source, 'logs' (sources are named by file name)" in report.summary()
    assert load_samples(paths[:1])[1].shared_sources == {}


def test_an_empty_response_is_rl_0_and_an_empty_csv_cell_is_missing(tmp_path):
    """docs/predictor.md: an empty response is not an error, its RL is 0 (as an empty final
    assistant message was); ``"response": ""`` was refused as "no response". A CSV cell cannot
    tell empty from missing: an empty one is a missing value, as everywhere else."""
    logs = tmp_path / "l.jsonl"
    logs.write_text(json.dumps({"prompt": "x", "response": ""}) + "\n" + json.dumps({"prompt": "y", "response": "yes"}) + "\n")
    samples, _ = load_samples([logs])
    attach_rl(samples, "llama3")
    assert [s.rl_tokens for s in samples] == [0, 1]
    # an empty field does not hide text elsewhere: the final assistant message wins over it
    both = tmp_path / "b.jsonl"
    both.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}],
                                "response": ""}) + "\n")
    assert [s.response for s in load_samples([both])[0]] == ["a b c"]
    table = tmp_path / "l.csv"
    table.write_text("prompt,response\nx,\ny,yes\n")
    with pytest.raises(DataError, match=r"l\.csv:2: no response"):
        load_samples([table])


def test_public_role_names_and_an_id_of_0(tmp_path):
    # OpenAI's "developer" is a system message, OpenAssistant's "prompter" a user (were: a bad
    # row in training, while annotate kept "developer" as given); an id of 0 is an id (was hashed)
    p = tmp_path / "logs.jsonl"
    p.write_text(json.dumps({"id": 0, "messages": [{"role": "developer", "content": "Be brief."},
                                                   {"role": "prompter", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}]}) + "\n")
    (s,), _ = load_samples([p])
    assert s.id == "0" and [m["role"] for m in s.messages] == ["system", "user"] and s.response == "Hello"


def test_a_long_bad_value_is_cut_in_its_message(tmp_path):
    """A 2 MB role made a 2 MB example in the report, on stderr and in a rejects file."""
    f = tmp_path / "big.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "r" * 2_000_000, "content": "hi"}], "response": "x"}) + "\n"
                 + json.dumps({"prompt": "q", "response": "a"}) + "\n")
    samples, report = load_samples([f], on_error="skip")
    assert len(samples) == 1 and report.n_skipped == 1
    assert len(report.examples[0]) < 300 and "rrr...rrr" in report.examples[0]


def test_a_csv_row_read_as_json_says_so():
    """A CSV named .jsonl was "not valid JSON (Expecting value at column 1)" and nothing more."""
    from rlpredict.records import RecordError, parse_json

    with pytest.raises(RecordError, match=r"not valid JSON \(.*\); it reads like a CSV row: name a CSV file \.csv"):
        parse_json("prompt,response")
    with pytest.raises(RecordError) as e:  # broken JSON, not a CSV row: no such hint
        parse_json('{"prompt": "a", }')
    assert "CSV" not in str(e.value)


def test_training_and_traces_read_a_count_cell_by_one_rule(tmp_path):
    """``records.whole_count`` for both. Was: training read ``1_000`` and other scripts' digits
    (``int()``) and refused ``50.0``; the trace reader the reverse."""
    from ecoserve_sched.trace import TraceError, read_trace

    cells = {"50": 50, " 7 ": 7, "50.0": 50, "5e1": 50, "1_000": None, "\u0665\u0660": None, "0x10": None,
             "nan": None, "-3": None, "2.5": None}
    for cell, want in cells.items():
        log = tmp_path / "log.csv"
        log.write_text(f"prompt,output_tokens\nhello,{cell}\n", encoding="utf-8")
        trace = tmp_path / "trace.csv"
        trace.write_text(f"arrival_time_s,input_tokens,output_tokens\n0,5,{cell}\n", encoding="utf-8")
        if want is None:
            with pytest.raises(DataError, match="output_tokens"):
                load_samples([log])
            with pytest.raises(TraceError, match="output_tokens must be an integer"):
                read_trace(trace)
        else:
            assert load_samples([log])[0][0].rl_tokens == want, cell
            assert read_trace(trace).output_tokens.tolist() == [want], cell


def test_a_count_is_a_number_or_a_plain_number_string(tmp_path):
    """Bytes (``float`` takes them) and numpy's bool are no count; a list is "no integer", not out
    of range (a reviewer of ``whole_count``)."""
    import decimal

    import numpy as np

    from ecoserve_sched.trace import TraceError, read_trace
    from rlpredict.records import whole_count

    assert [whole_count(v) for v in (b"1_000", b"5", np.True_, True, [3], None, "")] == [None] * 7
    assert [whole_count(v) for v in (np.int64(5), np.float32(2.0), decimal.Decimal("7"), "0")] == [5, 2, 7, 0]
    for cell, message in (("[12]", "input_tokens must be an integer, got [12]"),
                          ("0", "input_tokens must be an integer in [1, 2^53], got 0")):
        path = tmp_path / "t.jsonl"
        path.write_text('{"arrival_time_s": 0, "input_tokens": ' + cell + ', "output_tokens": 3}\n')
        with pytest.raises(TraceError, match=re.escape(message)):
            read_trace(path)


@pytest.mark.parametrize(("parts", "trace", "log"), [
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}], ["a"], None),
    ([{"text": "a"}], ["a"], ["a"]),  # no type, a text: text
    ([{"image_url": "u"}, {"text": "a"}], ["a"], None),  # vLLM's untyped media part
    ([{"text": None, "image_url": "u"}, {"text": "a"}], ["a"], None),  # the same from Parquet (null as absent)
    ([{"video_embeds": "A"}, {"uuid": "img-1", "image_url": None}, {"tool_reference": "f"}, {"text": "a"}], ["a"], None),
    (["a", {"type": "text", "text": "b"}], ["a", "b"], None),  # vLLM takes a string as a text part
    ([{"type": "text", "text": None}, {"type": "text", "text": "b"}], ["b"], None),  # vLLM skips a null text
    ([{}], None, None), ([{"content": "hi"}], None, None), ([{"type": None, "value": "hi"}], None, None),
    ([3], None, None), ([{"type": "text", "text": 5}], None, None),
    # vLLM's other text parts, each with its own key; empty texts are dropped on every path
    ([{"type": "refusal", "refusal": "no"}, {"type": "output_text", "text": "a"}], ["no", "a"], ["no", "a"]),
    ([{"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "a"}], ["hm", "a"], ["hm", "a"]),
    ([{"type": "refusal", "refusal": None}, {"type": "refusal", "text": "x"}], [], None),  # null, absent: skipped
    (["", {"type": "text", "text": ""}, {"type": "input_text", "text": "b"}], ["b"], None),
    ([{"type": "text", "text": ""}, {"type": "text", "text": "b"}], ["b"], ["b"]),
    ([{"type": ["text"], "text": "a"}, {"type": {"k": 1}}], [], None),  # a type that is no name: not text
])
def test_content_parts_are_read_as_vllm_reads_them(parts, trace, log):
    """Traces and the middleware (``all_text=False``) read parts as vLLM does; training logs
    (``all_text=True``) take text parts only. Was: an untyped media part was a text part without
    a text, and the request lost its prediction (reviewers of the middleware's shared rule); a
    ``refusal``, ``thinking`` or ``output_text`` part was skipped as media and an empty text was
    kept as an empty line, where vLLM reads the first three as text and drops the last."""
    from rlpredict.records import part_texts

    assert part_texts(parts, all_text=False) == trace
    assert part_texts(parts, all_text=True) == log


def test_a_number_cell_is_checked_in_bounded_time():
    """An ambiguous pattern backtracked quadratically: 16,000 digits and an ``x`` took 6.3 s, and
    training reads counts by the same rule now (a reviewer)."""
    import time

    from rlpredict.records import whole_count

    t0 = time.perf_counter()
    assert whole_count("1" * 200_000 + "x") is None and whole_count("\xa05") is None
    assert time.perf_counter() - t0 < 0.5


def test_a_csv_messages_cell_giving_a_key_twice_is_a_bad_row_as_in_json_lines(tmp_path):
    """Was: read with the last value in a CSV of training data, where a JSON Lines row is refused."""
    import csv

    from rlpredict.data import load_samples

    msgs = '[{"role": "user", "content": [{"type": "text", "text": "a", "text": "b"}]}, {"role": "assistant", "content": "ok"}]'
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["messages"], [msgs]])
    with pytest.raises(RecordError, match=r"l\.csv:2: key 'messages\[0\]\.content\[0\]\.text' is given twice"):
        load_samples([tmp_path / "l.csv"])
    samples, report = load_samples([tmp_path / "l.csv"], on_error="skip")
    assert samples == [] and report.summary().startswith("1 rows -> 0 samples; skipped 1 rows")


def test_a_csv_cell_is_checked_by_the_json_lines_rule_its_read_keys_only(tmp_path):
    """Were: a usage cell giving completion_tokens twice kept the last (900), where JSON Lines
    refuses it; a key twice in a column nothing reads refused the row, where JSON Lines reads it."""
    import csv

    from rlpredict.data import load_samples

    def load(header: list[str], row: list[str]):
        with open(tmp_path / "u.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header, row])
        return load_samples([tmp_path / "u.csv"])

    with pytest.raises(RecordError, match=r"u\.csv:2: key 'usage\.completion_tokens' is given twice"):
        load(["prompt", "response", "usage"], ["hi", "hello", '{"completion_tokens": 5, "completion_tokens": 900}'])
    samples, _ = load(["prompt", "response", "extra"], ["hi", "hello", '{"role": "a", "role": "b"}'])
    assert len(samples) == 1 and samples[0].messages == [{"role": "user", "content": "hi"}]
    # a message list in any column is checked: a reader given other field names may read it
    with pytest.raises(RecordError, match=r"key 'dialog\[0\]\.role' is given twice"):
        load(["dialog"], ['[{"role": "system", "role": "user", "content": "hi"}, {"role": "assistant", "content": "r"}]'])
    samples, _ = load(["prompt", "response", "usage"], ["hi", "hello", '{"completion_tokens": 7, "x": 1, "x": 2}'])
    assert samples[0].rl_tokens == 7  # a key twice that nothing reads: read as JSON Lines reads it


def test_a_prompt_blank_to_the_encoder_is_an_empty_prompt_in_training_too(tmp_path):
    """Was: ``str.strip`` alone, so zero-width spaces or U+FFFD trained as a prompt that
    ``predict`` and ``annotate`` call empty."""
    from rlpredict.data import load_samples

    for text in ("\u200b\u200b", "\ufffd", "\x00\x01", "\u00ad"):
        (tmp_path / "z.jsonl").write_text(json.dumps({"prompt": text, "response": "r"}) + "\n")
        with pytest.raises(DataError, match="empty prompt"):
            load_samples([tmp_path / "z.jsonl"])
        # a ShareGPT turn answering such a prompt answers nothing (was: trained; a reviewer's find)
        conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "a"},
                {"from": "human", "value": text}, {"from": "gpt", "value": "b"}]
        (tmp_path / "z.jsonl").write_text(json.dumps({"conversations": conv}) + "\n")
        samples, report = load_samples([tmp_path / "z.jsonl"])
        assert [s.response for s in samples] == ["a"] and report.unanswered_turns == 1


def test_a_parquet_struct_naming_a_field_twice_is_refused_naming_the_file(tmp_path):
    """Was: pyarrow's "duplicate field names are present" at the first row, naming no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlpredict.data import load_samples
    from rlpredict.records import open_parquet

    t = pa.struct([("role", pa.string()), ("content", pa.string()), ("content", pa.string())])
    table = pa.Table.from_arrays([pa.array([[("user", "a", "b")]], pa.list_(t))], names=["messages"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(RecordError, match=r"d\.parquet: a struct in column messages\[\] \(content\) names a field more than once"):
        open_parquet(tmp_path / "d.parquet", whole_rows=True)
    with pytest.raises(RecordError, match="names a field more than once"):
        load_samples([tmp_path / "d.parquet"])
    assert open_parquet(tmp_path / "d.parquet", whole_rows=False)  # annotate reads the columns it needs
    m = pa.map_(pa.struct([("k", pa.string()), ("k", pa.string())]), pa.int64())  # a map's key struct too
    pq.write_table(pa.Table.from_arrays([pa.array([[(("a", "b"), 1)]], m)], names=["meta"]), tmp_path / "k.parquet")
    with pytest.raises(RecordError, match=r"column meta\{key\} \(k\)"):
        open_parquet(tmp_path / "k.parquet", whole_rows=True)
