"""Trace reading (errors name file and line), arrivals, and the prediction sources."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ecoserve_sched import predictions as preds
from ecoserve_sched.predictions import apply_predictions, default_confusion_path, load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.trace import (
    Trace,
    TraceError,
    TraceFormat,
    describe,
    gamma_arrivals,
    poisson_arrivals,
    read_trace,
)

FIXTURE = Path(__file__).parent / "fixtures" / "confusion_sharegpt.json"


def write(tmp_path, name, text):
    p = tmp_path / name
    if name.endswith(".gz"):
        p.write_bytes(gzip.compress(text.encode()))
    else:
        p.write_text(text)
    return p


def test_csv_and_jsonl_gz_read_and_sort(tmp_path):
    p = write(tmp_path, "t.csv", "arrival_time_s,input_tokens,output_tokens\n2.0,10,5\n1.0,20,7\n")
    t = read_trace(p)
    assert t.arrival_s.tolist() == [1.0, 2.0] and t.input_tokens.tolist() == [20, 10]
    assert not t.has_rl and t.max_tokens.tolist() == [2048, 2048]
    rows = [{"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 3, "rl_bucket": 1,
             "rl_pred_tokens": 40, "rl_reserve_tokens": 60, "prompt": "hi"}]
    t = read_trace(write(tmp_path, "t.jsonl.gz", "\n".join(json.dumps(r) for r in rows) + "\n"))
    assert t.has_rl and t.prompts == ["hi"]
    r = t.requests(SLO())[0]
    assert (r.pred_bucket, r.pred_tokens, r.reserve_tokens) == (1, 40, 60)


@pytest.mark.parametrize("body,line,msg", [
    ("1.0,10,5\n-1,10,5\n", 3, "arrival_time_s"),
    ("1.0,10,5\n1.0,ten,5\n", 3, "input_tokens"),
    ("1.0,10,0\n", 2, "output_tokens"),
    ("1.0,10,5\n2.0,,5\n", 3, "missing input_tokens"),
    ("1.0,1_000,5\n", 2, "input_tokens"),  # ``float`` takes these: a plain number is ASCII digits
    ("1.0,10,\u0661\u0662\n", 2, "output_tokens"),
    ("1.0,10,5\n2.0,\"7,5\n", 3, "malformed CSV"),  # a quote left open to the end
    ("1.0,10,5\n\n2.0,\"7\n\n,5\n4,5\n", 4, r"malformed CSV \(unexpected end of data; the record runs to line 7\)"),
    ("1.0,10,5\n2.0,\"1\n0\",5\n", 3, "input_tokens must be an integer"),  # named where the record starts
])
def test_bad_csv_rows_name_the_line(tmp_path, body, line, msg):
    p = write(tmp_path, "bad.csv", "arrival_time_s,input_tokens,output_tokens\n" + body)
    with pytest.raises(TraceError, match=rf"bad\.csv:{line}: .*{msg}"):
        read_trace(p)


def test_bad_jsonl_rows_name_the_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1}\n{oops\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: not valid JSON"):
        read_trace(p)
    p = write(tmp_path, "mixed.jsonl", '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1, '
              '"rl_bucket": 0, "rl_pred_tokens": 1, "rl_reserve_tokens": 1}\n'
              '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1}\n')
    with pytest.raises(TraceError, match=r"mixed\.jsonl:2: has no rl_\* fields but the first row \(line 1\) has them"):
        read_trace(p)
    lines = p.read_text().splitlines()  # the other order: the message still says which row differs
    p.write_text(f"{lines[1]}\n{lines[0]}\n")
    with pytest.raises(TraceError, match=r"mixed\.jsonl:2: has rl_\* fields but the first row \(line 1\) has none"):
        read_trace(p)
    p = write(tmp_path, "part.jsonl", '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1, "rl_bucket": 0}\n')
    with pytest.raises(TraceError, match=r"part\.jsonl:1: missing rl_pred_tokens: .* all three or none"):
        read_trace(p)  # not read as a trace without predictions, silently
    with pytest.raises(TraceError, match="missing column"):
        read_trace(write(tmp_path, "nocol.csv", "arrival_time_s,input_tokens\n0,1\n"))
    for name, text in (("zero.csv", ""), ("blank.csv", "\n\n")):  # was: "missing column(s) ..."
        with pytest.raises(TraceError, match=rf"{name}: empty CSV file \(no header\)"):
            read_trace(write(tmp_path, name, text))


def test_a_trace_without_arrival_times_is_read_in_order_when_they_are_drawn(tmp_path):
    # conversation lengths (ShareGPT's) have no arrival times: docs/simulator.md sends them to
    # `simulate --arrivals poisson`, which refused them (was: "missing arrival_time_s")
    lens = write(tmp_path, "lens.jsonl", '{"input_tokens": 5, "output_tokens": 9}\n{"input_tokens": 3, "output_tokens": 1}\n')
    with pytest.raises(TraceError, match=r"lens\.jsonl:1: missing arrival_time_s \(a trace without arrival times "
                                         r"gets drawn ones from `ecoserve simulate --arrivals poisson --rate R`\)"):
        read_trace(lens)
    drawn = TraceFormat(drawn_arrivals=True)
    t = read_trace(lens, fmt=drawn)
    assert t.input_tokens.tolist() == [5, 3] and t.arrival_s.tolist() == [0.0, 0.0]  # the file's order
    csv = write(tmp_path, "lens.csv", "input_tokens,output_tokens\n5,9\n3,1\n")
    with pytest.raises(TraceError, match=r"missing column\(s\) arrival_time_s; .*--arrivals poisson"):
        read_trace(csv)
    assert read_trace(csv, fmt=drawn).input_tokens.tolist() == [5, 3]
    # with drawn times, a file's own are not read: every request in the file's order, whatever
    # its arrival column holds (null on every row, as pandas writes NaN, empty cells, times on
    # some rows only); without drawn times a row without one is a bad row, as before
    timed = write(tmp_path, "timed.jsonl", '{"arrival_time_s": 2, "input_tokens": 5, "output_tokens": 9}\n'
                                           '{"arrival_time_s": null, "input_tokens": 3, "output_tokens": 1}\n'
                                           '{"input_tokens": 4, "output_tokens": 4}\n')
    assert read_trace(timed, fmt=drawn).input_tokens.tolist() == [5, 3, 4]
    unsorted = write(tmp_path, "unsorted.jsonl", '{"arrival_time_s": 2, "input_tokens": 5, "output_tokens": 9}\n'
                                                 '{"arrival_time_s": "abc", "input_tokens": 3, "output_tokens": 1}\n'
                                                 '{"arrival_time_s": 1, "arrival_time_s": 0, "input_tokens": 4, '
                                                 '"output_tokens": 4}\n')
    assert read_trace(unsorted, fmt=drawn).input_tokens.tolist() == [5, 3, 4]  # the file's order, its times unread
    gap = write(tmp_path, "gap.csv", "arrival_time_s,input_tokens,output_tokens\n,5,9\n,3,1\n2,4,4\n")
    assert read_trace(gap, fmt=drawn).input_tokens.tolist() == [5, 3, 4]
    t = read_trace(gap, fmt=TraceFormat(skip_bad_rows=True))
    assert t.input_tokens.tolist() == [4] and "gap.csv:2: missing arrival_time_s" in t.first_skipped


def test_rate_scaling_and_synthetic_arrivals(tmp_path):
    t = read_trace(write(tmp_path, "t.csv", "arrival_time_s,input_tokens,output_tokens\n0,1,1\n4,1,1\n"))
    assert t.scaled(2.0).arrival_s.tolist() == [0.0, 2.0]
    a = poisson_arrivals(20000, rate=5.0, seed=1)
    assert abs(len(a) / a[-1] - 5.0) < 0.2 and np.array_equal(a, poisson_arrivals(20000, 5.0, seed=1))
    g = np.diff(gamma_arrivals(20000, rate=5.0, cv=3.0, seed=1))
    assert abs(g.std() / g.mean() - 3.0) < 0.3


def test_csv_header_problems_are_named(tmp_path):
    head = "arrival_time_s,input_tokens,output_tokens"
    t = read_trace(write(tmp_path, "bom.csv", "\ufeff" + head + "\n0,10,5\n"))  # a BOM is not a name
    assert t.input_tokens.tolist() == [10]
    with pytest.raises(TraceError, match=r"dup\.csv:1: column\(s\) input_tokens appear more than once"):
        read_trace(write(tmp_path, "dup.csv", head + ",input_tokens\n0,10,5,11\n"))
    with pytest.raises(TraceError, match=r"extra\.csv:3: has 5 fields, the header has 3"):
        read_trace(write(tmp_path, "extra.csv", head + "\n0,10,5\n1,10,5,7,8\n"))
    with pytest.raises(TraceError, match=r"short\.csv:3: has 2 fields, the header has 3"):
        read_trace(write(tmp_path, "short.csv", head + "\n0,10,5\n1,10\n"))


@pytest.mark.parametrize("field, value, msg", [
    ("messages", [1, 2], "message 0 is not an object"),
    ("messages", [{"role": 5, "content": None}], "unknown role 5"),
    ("messages", [], "'messages' is missing or empty"),
    ("messages", "[{oops", "not valid JSON"),
    ("prompt", 5, "field 'prompt': expected a string, got int"),
    ("prompt", "\ud800", "field 'prompt' is not valid Unicode"),  # was a TypeError in the tokenizer
    ("generator", 7, "field 'generator': expected a string, got int"),  # was ignored
    ("generator", "\udc80", "field 'generator' is not valid Unicode"),
    ("other", "x", "neither field 'prompt' nor 'messages' is present"),
])
def test_a_row_without_a_usable_prompt_is_named_for_the_bundle(tmp_path, field, value, msg):
    rows = [{"arrival_time_s": i, "input_tokens": 5, "output_tokens": 3, "prompt": "hi"} for i in range(3)]
    if field != "generator":
        del rows[1]["prompt"]
    rows[1][field] = value
    rows[2] = {**rows[2], "prompt": None, "messages": json.dumps([{"from": "human", "value": "hello"}])}  # CSV-style
    p = write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    t = read_trace(p)  # prompts are needed only by --predictions bundle
    assert t.prompts is None and t.prompt_problem.startswith(f"{p}:2: ")
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: .*{msg}.*--predictions bundle needs"):
        apply_predictions(t.requests(SLO()), t, "bundle", bundle="any")
    rows[1] = {**rows[1], field: None, "prompt": "fixed"}
    t = read_trace(write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert t.prompt_problem == "" and t.prompts[2] == [{"role": "user", "content": "hello"}]


def test_a_replay_without_a_predictor_keeps_no_prompt(tmp_path):
    rows = [{"arrival_time_s": 2 - i, "input_tokens": 5 + i, "output_tokens": 3, "prompt": "hi " * 1000,
             "generator": "m"} for i in range(3)]
    p = write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    full, lean = read_trace(p), read_trace(p, keep_prompts=False)  # `ecoserve simulate` without a bundle
    assert full.prompts is not None and full.generators == ["m"] * 3
    assert lean.prompts is None and lean.generators is None and lean.prompt_problem == ""
    for k in ("arrival_s", "input_tokens", "output_tokens", "max_tokens"):
        assert np.array_equal(getattr(full, k), getattr(lean, k))
    assert list(lean.input_tokens) == [7, 6, 5]  # sorted by arrival as before


def test_a_count_past_2_to_the_53_is_refused_exactly(tmp_path):
    row = {"arrival_time_s": 0, "input_tokens": 2**53 + 1, "output_tokens": 3}  # was: read as 2^53
    with pytest.raises(TraceError, match=r"input_tokens must be an integer in \[1, 2\^53\]"):
        read_trace(write(tmp_path, "p.jsonl", json.dumps(row) + "\n"))


def test_an_annotated_reservation_of_zero_tokens_is_refused(tmp_path):
    row = {"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 3, "rl_bucket": 0, "rl_pred_tokens": 0,
           "rl_reserve_tokens": 0}  # was: accepted
    with pytest.raises(TraceError, match=r"p\.jsonl:1: rl_reserve_tokens must be an integer in \[1, "):
        read_trace(write(tmp_path, "p.jsonl", json.dumps(row) + "\n"))


def test_a_trace_row_is_read_as_annotate_reads_it(tmp_path):
    """One rule (``records.request_of``): the messages win over the prompt, content parts
    without a type or of type input_text are text, a blank generator is none."""
    msgs = [{"role": "user", "content": [{"text": "Write"}, {"type": "input_text", "text": "an essay"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}]
    rows = [{"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 3, "prompt": "hi", "messages": msgs,
             "generator": "gpt-4"},
            {"arrival_time_s": 1, "input_tokens": 5, "output_tokens": 3, "prompt": "hi", "generator": ""}]
    t = read_trace(write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert t.prompts == [[{"role": "user", "content": "Write\nan essay"}], "hi"]
    assert t.generators == ["gpt-4", None]


def test_a_parquet_trace_reads_as_its_json_lines_twin(tmp_path):
    """What ``rlpredict annotate`` writes for a Parquet input replays (was: "unknown trace
    format"): the same trace as the JSON Lines of the same rows; a null is a missing field; a
    timestamp column reads with --time-unit iso; a bad row is named by its number."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"arrival_time_s": 2.0, "input_tokens": 5, "output_tokens": 3, "rl_bucket": 1, "rl_pred_tokens": 40,
             "rl_reserve_tokens": 60, "prompt": "hi", "generator": "gpt-4"},
            {"arrival_time_s": 0.5, "input_tokens": 9, "output_tokens": 30, "rl_bucket": 0, "rl_pred_tokens": 20,
             "rl_reserve_tokens": 30, "prompt": "hello there", "generator": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    twin = write(tmp_path, "t.jsonl", "".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                              for r in rows))
    got, want = read_trace(tmp_path / "t.parquet"), read_trace(twin)
    for field in ("arrival_s", "input_tokens", "output_tokens", "max_tokens", "rl"):
        assert getattr(got, field).tolist() == getattr(want, field).tolist(), field
    assert (got.prompts, got.generators) == (want.prompts, want.generators) == (["hello there", "hi"], [None, "gpt-4"])
    stamps = [datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone.utc), datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)]
    pq.write_table(pa.table({"t": stamps, "input_tokens": [5, 9], "output_tokens": [3, 30]}), tmp_path / "iso.parquet")
    t = read_trace(tmp_path / "iso.parquet", fmt=TraceFormat(columns={"arrival_time_s": "t"}, time_unit="iso"))
    assert t.arrival_s.tolist() == [0.0, 0.5] and t.output_tokens.tolist() == [30, 3]
    pq.write_table(pa.table({"arrival_time_s": [0.0, 1.0], "input_tokens": [5, -2], "output_tokens": [3, 3]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=r"bad\.parquet:2: .*input_tokens"):
        read_trace(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"arrival": [0.0], "input_tokens": [5], "output_tokens": [3]}), tmp_path / "cols.parquet")
    with pytest.raises(TraceError, match=r"cols\.parquet: missing column\(s\) arrival_time_s"):
        read_trace(tmp_path / "cols.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TraceError, match=r"junk\.parquet: not a readable Parquet file"):
        read_trace(tmp_path / "junk.parquet")


def test_an_empty_csv_cell_is_a_missing_value(tmp_path):
    """As ``rlpredict annotate`` reads it: an empty prompt cell is no prompt (was: the prompt "")."""
    t = read_trace(write(tmp_path, "e.csv", "arrival_time_s,input_tokens,output_tokens,prompt\n0,5,3,hi\n1,5,3,\n"))
    assert t.prompts is None and t.prompt_problem.startswith(f"{tmp_path / 'e.csv'}:3: neither field")


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.update(bucket_edges=[*d["bucket_edges"][:-1], 5000]), "bucket_edges"),  # was an IndexError
    (lambda d: d.update(bucket_edges=d["bucket_edges"][::-1]), "bucket_edges"),
    (lambda d: d["point_tokens"].__setitem__(0, 10.7), "point_tokens"),  # was truncated to 10
    (lambda d: d["reserve_tokens"].__setitem__(0, -100), "reserve_tokens"),  # was used as is
    (lambda d: d["matrix"][0].__setitem__(0, float("nan")), "matrix"),
    (lambda d: d["matrix"][2].pop(), "field 'matrix' must be 10x10"),  # was: numpy's "inhomogeneous shape"
    (lambda d: d.update(matrix=[1] * 10), "field 'matrix' must be 10x10"),
    (lambda d: d.update(matrix=[[0] * len(d["matrix"])] * len(d["matrix"])), "no counts"),
    (lambda d: d.update(matrix=[[1e308] * len(d["matrix"])] * len(d["matrix"])), "too large to add up"),
    (lambda d: d.update(bucket_edges=[True, *d["bucket_edges"][1:]]), "bucket_edges"),  # was: taken as 1
    (lambda d: d.update(bucket_edges=["64", *d["bucket_edges"][1:]]), "bucket_edges"),  # was: taken as 64
    (lambda d: d.update(bucket_edges=[], point_tokens=[], reserve_tokens=[], matrix=[]), "bucket_edges"),
])
def test_confusion_values_are_checked(tmp_path, edit, msg):
    d = json.loads(FIXTURE.read_text())
    edit(d)
    with pytest.raises(ValueError, match=rf"c\.json: .*{msg}"):
        load_confusion(write(tmp_path, "c.json", json.dumps(d)))


def test_the_confusion_matrix_eval_writes_for_an_empty_median_bucket_loads(tmp_path):
    """Bounds as rlpredict's BucketScheme has them: a point estimate of 0 tokens (a bucket whose
    median response is empty) loads, a reservation of 0 does not. Was: the confusion.json
    ``rlpredict eval`` writes for such a bucket was refused."""
    d = json.loads(FIXTURE.read_text())
    d["point_tokens"][0] = 0
    assert load_confusion(write(tmp_path, "c.json", json.dumps(d))).point_tokens[0] == 0
    d["reserve_tokens"][0] = 0
    with pytest.raises(ValueError, match="'reserve_tokens' must be whole token counts >= 1"):
        load_confusion(write(tmp_path, "c0.json", json.dumps(d)))


def test_confusion_loads_from_file_manifest_and_bundle_dir(tmp_path):
    c = load_confusion(FIXTURE)
    assert c.matrix.shape == (10, 10) and np.isinf(c.edges[-1])
    d = json.loads(FIXTURE.read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"name": "x", "confusion": d}))
    assert load_confusion(tmp_path / "b").matrix.sum() == c.matrix.sum()
    assert load_confusion(tmp_path / "b" / "manifest.json").source == c.source
    with pytest.raises(ValueError, match="not a confusion matrix"):
        load_confusion(write(tmp_path, "x.json", "{}"))
    twice = FIXTURE.read_text().replace('"matrix":', '"matrix": [[1]], "matrix":', 1)
    with pytest.raises(ValueError, match=r"twice\.json: key 'matrix' is given twice"):  # was: the last, silently
        load_confusion(write(tmp_path, "twice.json", twice))


def test_a_bundle_without_a_confusion_matrix_says_how_to_get_one(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rlpredict.bundle/1", "files": {}}))
    with pytest.raises(ValueError, match=r"manifest\.json: this bundle carries no confusion matrix: run `rlpredict eval"):
        load_confusion(tmp_path)


def test_default_confusion_path_searches_models_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--confusion"):
        default_confusion_path(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "manifest.json").write_text(json.dumps({"confusion": {}}))
    assert default_confusion_path(tmp_path).name == "manifest.json"


def test_default_confusion_path_is_the_default_bundles(tmp_path, monkeypatch):
    """Was: the checkout's models/ alone, so an installed wheel (whose default bundle is
    packaged in rlpredict/_default_model) had no default matrix."""
    (tmp_path / "manifest.json").write_text(json.dumps({"confusion": {}}))
    monkeypatch.setenv("RLPREDICT_MODEL", str(tmp_path))
    assert default_confusion_path() == tmp_path / "manifest.json"
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "no matrix"}))  # e.g. an encoder-only bundle
    assert default_confusion_path().parent.name in ("rl-minilm-l6-llama3", "_default_model")  # the shipped one


def _lengths_trace(tmp_path, outs):
    body = "".join(f"{i * 0.1},10,{o}\n" for i, o in enumerate(outs))
    return read_trace(write(tmp_path, "t.csv", "arrival_time_s,input_tokens,output_tokens\n" + body))


def test_confusion_sampling_follows_the_matrix_rows(tmp_path):
    c = load_confusion(FIXTURE)
    t = _lengths_trace(tmp_path, [100] * 4000)  # true bucket 2 (64 < 100 <= 128)
    reqs = t.requests(SLO())
    desc = apply_predictions(reqs, t, "confusion", confusion=c, seed=0)
    assert "confusion" in desc and "SYNTHETIC" in desc
    got = np.bincount([r.pred_bucket for r in reqs], minlength=10) / len(reqs)
    want = c.matrix[2] / c.matrix[2].sum()
    assert np.abs(got - want).max() < 0.03
    r = reqs[0]
    assert r.pred_tokens == c.point_tokens[r.pred_bucket] and r.reserve_tokens == c.reserve_tokens[r.pred_bucket]


def test_empty_confusion_row_predicts_the_true_bucket(tmp_path):
    d = json.loads(FIXTURE.read_text())
    d["matrix"][0] = [0] * 10
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    t = _lengths_trace(tmp_path, [5] * 20 + [100] * 10)
    reqs = t.requests(SLO())
    desc = apply_predictions(reqs, t, "confusion", confusion=load_confusion(p))
    assert {r.pred_bucket for r in reqs[:20]} == {0}
    # said, not hidden under the matrix's own accuracy (a reviewer's run read "accuracy 0.280"
    # where every request had kept its true bucket)
    assert "20 of 30 requests are in buckets the matrix has no row for" in desc
    full = apply_predictions(reqs, t, "confusion", confusion=load_confusion(FIXTURE))
    assert "no row" not in full


def test_oracle_annotated_and_errors(tmp_path):
    t = _lengths_trace(tmp_path, [5, 300])
    reqs = t.requests(SLO())
    apply_predictions(reqs, t, "oracle")
    assert [(r.pred_bucket, r.reserve_tokens) for r in reqs] == [(0, 5), (5, 300)]
    with pytest.raises(ValueError, match="rl_"):
        apply_predictions(reqs, t, "annotated")
    with pytest.raises(ValueError, match="unknown prediction source"):
        apply_predictions(reqs, t, "psychic")
    with pytest.raises(ValueError, match="prompt"):
        apply_predictions(reqs, t, "bundle", bundle="x")


def test_bundle_source_uses_the_predictor(tmp_path, monkeypatch):
    p = write(tmp_path, "t.jsonl", '{"arrival_time_s": 0, "input_tokens": 3, "output_tokens": 9, '
              '"messages": [{"role": "user", "content": "hello"}]}\n')
    t = read_trace(p)

    class Stub:
        def predict(self, texts):
            assert texts == [[{"role": "user", "content": "hello"}]]
            return [SimpleNamespace(bucket=2, pred_tokens=90, reserve_tokens=120, probs=np.ones(10) / 10)]

    import ecoserve_sched.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "load_predictor", lambda path: Stub())
    reqs = t.requests(SLO())
    assert preds.apply_predictions(reqs, t, "bundle", bundle="b").startswith("bundle")
    assert (reqs[0].pred_bucket, reqs[0].pred_tokens, reqs[0].reserve_tokens) == (2, 90, 120)


def test_bundle_source_passes_the_generator_column(tmp_path, monkeypatch):
    p = write(tmp_path, "t.jsonl", '{"arrival_time_s": 0, "input_tokens": 3, "output_tokens": 9, '
              '"prompt": "hi", "generator": "gpt-4"}\n{"arrival_time_s": 1, "input_tokens": 3, '
              '"output_tokens": 9, "prompt": "yo"}\n')
    t = read_trace(p)
    assert t.generators == ["gpt-4", None] and t.head(1).generators == ["gpt-4"]
    seen = {}

    class Stub:
        def predict(self, texts, generators=None):
            seen["g"] = generators
            return [SimpleNamespace(bucket=1, pred_tokens=50, reserve_tokens=60, probs=np.ones(10) / 10)] * len(texts)

    import ecoserve_sched.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "load_predictor", lambda path: Stub())
    assert preds.apply_predictions(t.requests(SLO()), t, "bundle", bundle="b") == "bundle (b)"
    assert seen["g"] == ["gpt-4", None]
    # a bundle that takes the generator: the rows without one are counted where the run says
    # its predictions (was: predicted as "model: unknown" without a word)
    Stub.input_spec = SimpleNamespace(include_generator=True)
    desc = preds.apply_predictions(t.requests(SLO()), t, "bundle", bundle="b")
    assert desc == "bundle (b; 1 of 2 rows have no generator: this bundle takes the served model's name, and predicted them as 'model: unknown')"


def test_bundle_source_counts_the_rows_with_no_text_where_the_bundle_reads_it(tmp_path, monkeypatch):
    """A system turn alone, or a blank prompt: predicted as an empty prompt, counted where the
    run says its predictions, as ``rlpredict annotate`` counts them (was: without a word)."""
    sys_only = '"messages": [{"role": "system", "content": "You are helpful."}]'
    p = write(tmp_path, "t.jsonl", f'{{"arrival_time_s": 0, "input_tokens": 3, "output_tokens": 9, {sys_only}}}\n'
              '{"arrival_time_s": 1, "input_tokens": 3, "output_tokens": 9, "prompt": " "}\n'
              '{"arrival_time_s": 2, "input_tokens": 3, "output_tokens": 9, "prompt": "hello"}\n')
    t = read_trace(p)

    class Stub:
        input_spec = SimpleNamespace(include_generator=False, mode="last_user")

        def predict(self, texts):
            return [SimpleNamespace(bucket=1, pred_tokens=50, reserve_tokens=60, probs=np.ones(10) / 10)] * len(texts)

    import ecoserve_sched.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "load_predictor", lambda path: Stub())
    assert preds.apply_predictions(t.requests(SLO()), t, "bundle", bundle="b") == (
        "bundle (b; 2 of 3 rows have no text where this bundle reads it: predicted as an empty prompt, which "
        "training never saw)")


def test_unix_timestamps_are_read_from_the_first_arrival(tmp_path):
    """Nanosecond timestamps gave every latency as 0 (a float at 1.7e18 steps by 256)."""
    from ecoserve_sched.compare import RunSpec
    from ecoserve_sched.cost_model import load_profile

    rows = "".join(f"{i * 0.75:.2f},{100 + 7 * i},{20 + 3 * i}\n" for i in range(20))
    plain = read_trace(write(tmp_path, "plain.csv", "arrival_time_s,input_tokens,output_tokens\n" + rows))
    stamped = "".join(f"{1.7e9 + i * 0.75:.2f},{100 + 7 * i},{20 + 3 * i}\n" for i in range(20))
    t = read_trace(write(tmp_path, "epoch.csv", "arrival_time_s,input_tokens,output_tokens\n" + stamped))
    assert t.arrival_offset_s == 1.7e9 and plain.arrival_offset_s == 0.0
    np.testing.assert_allclose(t.arrival_s, plain.arrival_s, atol=1e-6)
    late = read_trace(write(tmp_path, "late.csv", "arrival_time_s,input_tokens,output_tokens\n5,1,1\n6,1,1\n"))
    assert late.arrival_s.tolist() == [5.0, 6.0]  # times below 2^20 s are kept as written
    ns = "".join(f"{1.7e18 + i * 1e9:.0f},100,50\n" for i in range(10))
    t = read_trace(write(tmp_path, "ns.csv", "arrival_time_s,input_tokens,output_tokens\n" + ns))
    s, _ = RunSpec(t, load_profile("llama2-13b-a100-80gb"), SLO(5.0, 0.2)).run("vllm", 1.0)
    assert s["mean_ttft_s"] > 0 and s["p50_tbt_s"] > 0


AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n" \
        "2023-11-16 18:15:50.7527360,396,109\n2023-11-16 18:15:46.7527360,374,44\n"
AZURE_COLUMNS = {"arrival_time_s": "TIMESTAMP", "input_tokens": "ContextTokens", "output_tokens": "GeneratedTokens"}


def test_public_traces_are_read_through_a_column_map_and_a_time_unit(tmp_path):
    # Azure's trace: its own column names, ISO date-times without a zone (UTC)
    t = read_trace(write(tmp_path, "azure.csv", AZURE), fmt=TraceFormat(AZURE_COLUMNS, "iso"))
    assert t.arrival_s.tolist() == [0.0, 4.0] and t.input_tokens.tolist() == [374, 396]
    assert t.arrival_offset_s == datetime(2023, 11, 16, 18, 15, 46, 752736, tzinfo=timezone.utc).timestamp()
    # a zone is honoured: 18:15:50+01:00 is an hour before 18:15:50 UTC
    zoned = AZURE.replace("50.7527360", "50.7527360+01:00").replace("46.7527360", "46.7527360+01:00")
    z = read_trace(write(tmp_path, "zoned.csv", zoned), fmt=TraceFormat(AZURE_COLUMNS, "iso"))
    assert z.arrival_offset_s == t.arrival_offset_s - 3600
    # Mooncake's: milliseconds, JSON Lines; the time unit divides, the rebase follows
    rows = [{"timestamp": 1500, "input_length": 10, "output_length": 5, "hash_ids": [1]},
            {"timestamp": 0, "input_length": 20, "output_length": 7, "hash_ids": [2]}]
    m = read_trace(write(tmp_path, "m.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
                   fmt=TraceFormat({"arrival_time_s": "timestamp", "input_tokens": "input_length",
                                    "output_tokens": "output_length"}, "ms"))
    assert m.arrival_s.tolist() == [0.0, 1.5] and m.output_tokens.tolist() == [7, 5]
    # errors name the file's column; a date-time read as a number says which unit to give
    with pytest.raises(TraceError, match=r"azure\.csv:2: TIMESTAMP \(read as arrival_time_s\) must be a "
                                         r"number, .*pass --time-unit iso"):
        read_trace(tmp_path / "azure.csv", fmt=TraceFormat(AZURE_COLUMNS))
    with pytest.raises(TraceError, match=r"m\.jsonl:1: timestamp \(read as arrival_time_s\) must be an ISO"):
        read_trace(tmp_path / "m.jsonl", fmt=TraceFormat({"arrival_time_s": "timestamp", "input_tokens":
                                                          "input_length", "output_tokens": "output_length"}, "iso"))



def test_iso_times_read_the_same_on_every_supported_python(tmp_path):
    """Python 3.10's ``fromisoformat`` refused Azure's 7-digit fractions, a 2-digit one and a
    trailing Z (3.11 reads all three): the reader writes them as 3.11 reads them."""
    cases = {"2023-11-16 18:15:46.7527369": 752736, "2023-11-16T18:15:46.75Z": 750000,
             "2023-11-16 18:15:46.7+00:00": 700000, "2023-11-16 18:15:46z": 0}
    body = "".join(f"{ts},10,5\n" for ts in cases)
    t = read_trace(write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + body),
                   fmt=TraceFormat(AZURE_COLUMNS, "iso"))
    base = datetime(2023, 11, 16, 18, 15, 46, tzinfo=timezone.utc).timestamp()
    assert sorted(t.arrival_s + t.arrival_offset_s) == sorted(base + us / 1e6 for us in cases.values())

def test_a_column_map_is_checked_against_the_header(tmp_path):
    p = write(tmp_path, "azure.csv", AZURE)
    with pytest.raises(TraceError, match=r"azure\.csv:1: missing column\(s\) arrival_time_s, input_tokens, "
                                         r"output_tokens; the header has 'TIMESTAMP', 'ContextTokens'.*--columns"):
        read_trace(p)
    with pytest.raises(TraceError, match=r"azure\.csv:1: no column 'Context' \(mapped to input_tokens\)"):
        read_trace(p, fmt=TraceFormat({**AZURE_COLUMNS, "input_tokens": "Context"}, "iso"))
    both = write(tmp_path, "both.csv", "arrival_time_s,TIMESTAMP,input_tokens,output_tokens\n1,2,3,4\n")
    with pytest.raises(TraceError, match=r"both\.csv:1: column 'arrival_time_s' is in the file and 'TIMESTAMP' "
                                         "is mapped to it"):
        read_trace(both, fmt=TraceFormat({"arrival_time_s": "TIMESTAMP"}))
    for bad, msg in [({"arrival": "x"}, "not a trace field"), ({"input_tokens": " "}, "empty column name"),
                     ({"input_tokens": "x", "output_tokens": "x"}, "mapped to two fields")]:
        with pytest.raises(ValueError, match=msg):
            TraceFormat(bad)
    with pytest.raises(ValueError, match="time unit"):
        TraceFormat(time_unit="minutes")


def test_bad_rows_are_skipped_only_when_asked_and_always_counted(tmp_path):
    # BurstGPT logs a failed request with 0 response tokens
    body = ("Timestamp,Model,Request tokens,Response tokens\n5,ChatGPT,472,18\n6,ChatGPT,1087,0\n"
            "8,GPT-4,417,\"oops\n9,GPT-4,100,20\n")
    p = write(tmp_path, "burst.csv", body)
    fmt = {"arrival_time_s": "Timestamp", "input_tokens": "Request tokens", "output_tokens": "Response tokens"}
    with pytest.raises(TraceError, match=r"burst\.csv:3: Response tokens \(read as output_tokens\) must be an "
                                         r"integer in \[1, 2\^53\], got '0'"):
        read_trace(p, fmt=TraceFormat(fmt))
    t = read_trace(p, fmt=TraceFormat(fmt, skip_bad_rows=True))
    assert t.arrival_s.tolist() == [5.0] and t.skipped_rows == 2 and t.first_skipped.startswith(f"{p}:3: ")
    assert describe(t) == (f"{p}: 1 request over 0 s; skipped 2 bad rows (first: {p}:3: Response tokens "
                           "(read as output_tokens) must be an integer in [1, 2^53], got '0')")
    only_bad = write(tmp_path, "bad.csv", "arrival_time_s,input_tokens,output_tokens\n1,2,0\n")
    with pytest.raises(TraceError, match=r"trace has no rows left: all 1 were bad \(first: .*bad\.csv:2: "):
        read_trace(only_bad, fmt=TraceFormat(skip_bad_rows=True))
    # rows that disagree on the rl_* fields: the file's fault, not a row's, so never skipped
    # (was: the first good row decided, and every annotated row after it was "bad")
    mixed = write(tmp_path, "mixed.jsonl", '{"arrival_time_s": 0, "input_tokens": 0, "output_tokens": 1}\n'
                  '{"arrival_time_s": 1, "input_tokens": 1, "output_tokens": 1}\n'
                  '{"arrival_time_s": 2, "input_tokens": 1, "output_tokens": 1, "rl_bucket": 0, '
                  '"rl_pred_tokens": 1, "rl_reserve_tokens": 1}\n')
    with pytest.raises(TraceError, match=r"mixed\.jsonl:3: has rl_\* fields but the first row \(line 2\)"):
        read_trace(mixed, fmt=TraceFormat(skip_bad_rows=True))


def test_a_mapped_field_no_jsonl_row_has_is_refused(tmp_path):
    # JSONL has no header: a typo in --columns left max_tokens at its default on every row
    p = write(tmp_path, "t.jsonl", '{"ts": 0, "i": 5, "o": 3, "max_new": 9}\n{"ts": 1, "i": 5, "o": 3}\n')
    cols = {"arrival_time_s": "ts", "input_tokens": "i", "output_tokens": "o"}
    assert read_trace(p, fmt=TraceFormat({**cols, "max_tokens": "max_new"})).max_tokens.tolist() == [9, 2048]
    with pytest.raises(TraceError, match=r"t\.jsonl: no row has the field 'max_new_tokens' \(mapped to max_tokens"):
        read_trace(p, fmt=TraceFormat({**cols, "max_tokens": "max_new_tokens"}))
    both = write(tmp_path, "b.jsonl", '{"ts": 0, "input_tokens": 5, "o": 3}\n')
    with pytest.raises(TraceError, match=r"b\.jsonl:1: field 'input_tokens' is in the row, but --columns reads "
                                         r"input_tokens from 'i'"):
        read_trace(both, fmt=TraceFormat(cols))


def test_describe_shows_a_unit_mistake(tmp_path):
    ms = "".join(f"{1_700_000_000_000 + 250 * i},100,50\n" for i in range(5))
    t = read_trace(write(tmp_path, "ms.csv", "arrival_time_s,input_tokens,output_tokens\n" + ms))
    assert describe(t).endswith("5 requests over 1000 s (0.004 requests/s); times taken from the first "
                                "arrival (1.7e+12 s)")
    t = read_trace(tmp_path / "ms.csv", fmt=TraceFormat(time_unit="ms"))
    assert describe(t).endswith("5 requests over 1 s (4 requests/s); times taken from the first arrival "
                                "(1700000000 s)")


def test_pretty_printed_json_is_named_as_not_json_lines(tmp_path):
    p = write(tmp_path, "sharegpt.json", '[\n  {"arrival_time_s": 0}\n]\n')
    with pytest.raises(TraceError, match=r"sharegpt\.json:1: not valid JSON .*\(a trace is JSON Lines: one object "
                                         "per line\\)"):
        read_trace(p)


def test_a_key_given_twice_is_refused(tmp_path):
    # json keeps the last value silently: 7 input tokens where the row also said 10
    p = write(tmp_path, "dup.jsonl", '{"arrival_time_s": 0, "input_tokens": 10, "output_tokens": 3, "input_tokens": 7}\n')
    with pytest.raises(TraceError, match=r"dup\.jsonl:1: key 'input_tokens' is given twice in one JSON object"):
        read_trace(p)
    gen = write(tmp_path, "gen.jsonl", '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 3, '
                                       '"model": "a", "model": "b"}\n')
    with pytest.raises(TraceError, match="key 'model' is given twice"):  # the generator, as training reads it
        read_trace(gen)
    # a key no reader reads, or one inside a nested object, may repeat
    ok = write(tmp_path, "ok.jsonl", '{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 3, "x": 1, "x": 2, '
                                     '"meta": {"input_tokens": 1, "input_tokens": 2}}\n')
    assert read_trace(ok).input_tokens.tolist() == [1]


def test_head_keeps_a_prompt_problem_only_if_it_keeps_the_row(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [{"arrival_time_s": i, "input_tokens": 5, "output_tokens": 7, "prompt": f"p{i}"} for i in range(4)]
    del rows[2]["prompt"]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_trace(p)
    assert t.prompts is None and t.prompt_problem.startswith(f"{p}:3: ")
    first = t.head(2)  # --max-requests 2: the third row is not used (was: refused for it)
    assert first.prompts == ["p0", "p1"] and first.prompt_problem == "" and first.prompt_rows is None
    more = t.head(3)
    assert more.prompts is None and more.prompt_problem == t.prompt_problem
    assert read_trace(p, keep_prompts=False).prompt_rows is None


@pytest.mark.parametrize("seed", range(6))
def test_keeping_the_earliest_reads_what_head_takes(tmp_path: Path, seed: int) -> None:
    """``read_trace(keep=n)`` (``--max-requests``: only n requests in memory, whatever the
    file's size; was: every row held, 437 MB for 10 of 2,000,000) is ``read_trace().head(n)``:
    the earliest by arrival, ties in the file's order, a prompt problem only of a kept row, and
    the good rows left out counted; a bad row past them is still refused."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    rows = [{"arrival_time_s": int(rng.integers(0, 6)), "input_tokens": int(rng.integers(1, 50)),
             "output_tokens": int(rng.integers(1, 50)), "prompt": f"p{i}"} for i in range(n)]
    for i in rng.choice(n, size=min(n, 2), replace=False):
        del rows[int(i)]["prompt"]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = read_trace(p)
    for keep in sorted({1, 2, int(rng.integers(1, n + 1)), n, n + 3}):
        want, got = whole.head(keep), read_trace(p, keep=keep)
        for col in ("arrival_s", "input_tokens", "output_tokens", "max_tokens"):
            assert getattr(got, col).tolist() == getattr(want, col).tolist(), (keep, col)
        assert (got.prompts, got.prompt_problem, got.prompt_rows) == (want.prompts, want.prompt_problem, want.prompt_rows)
        assert got.unused_rows == want.unused_rows == max(n - keep, 0)
        drawn = TraceFormat(drawn_arrivals=True)  # drawn times: the file's first rows
        assert read_trace(p, keep=keep, fmt=drawn).input_tokens.tolist() == [r["input_tokens"] for r in rows[:keep]]
    with p.open("a") as f:
        f.write('{"arrival_time_s": 99, "input_tokens": 0, "output_tokens": 1}\n')
    with pytest.raises(TraceError, match=f"{p}:{n + 1}: input_tokens"):
        read_trace(p, keep=1)
    with pytest.raises(ValueError, match="keep must be"):
        read_trace(p, keep=0)


def test_a_trace_keeps_what_it_checked(tmp_path: Path) -> None:
    """A Trace copies its columns and makes them read-only (was: the caller's arrays kept, so a
    write after the checks reached the replay: a NaN arrival hung it, -5 prompt tokens
    "finished" with attainment 1.0); columns must be flat; ``head`` takes a whole n >= 0."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.simulator import run

    arr, inp = np.array([0.0, 1.0, 2.0]), np.array([10, 10, 10])
    t = Trace("x", arr, inp, np.array([5, 5, 5]), np.array([100, 100, 100]))
    arr[1], inp[1] = np.nan, -5
    assert t.arrival_s.tolist() == [0.0, 1.0, 2.0] and t.input_tokens.tolist() == [10, 10, 10]
    with pytest.raises(ValueError, match="read-only"):
        t.arrival_s[1] = np.nan
    assert len(run(t, "vllm", load_profile("llama3-8b-h100-80gb")).requests) == 3
    with pytest.raises(ValueError, match="arrival_s must be one-dimensional, got shape \\(2, 2\\)"):
        Trace("x", np.zeros((2, 2)), [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="input_tokens must be one-dimensional"):
        Trace("x", np.zeros(2), [[1], [1]], [1, 1], [1, 1])
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="head: n must be a whole number >= 0"):
            t.head(bad)
    assert len(t.head(np.int64(2))) == 2 and t.head(0).unused_rows == 3


def test_a_trace_is_read_under_every_suffix_annotate_writes(tmp_path):
    """``records.detect_format``'s rule. Was: ``annotate -o out.ndjson`` (or ``out.JSONL``)
    wrote a trace that ``ecoserve simulate`` called an unknown format."""
    text = "".join(json.dumps({"arrival_time_s": i, "input_tokens": 5, "output_tokens": 3}) + "\n" for i in range(3))
    for name in ("t.ndjson", "t.JSONL", "t.Jsonl.GZ", "t.json"):
        p = tmp_path / name
        p.write_bytes(gzip.compress(text.encode()) if name.lower().endswith(".gz") else text.encode())
        assert len(read_trace(p)) == 3, name
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(write(tmp_path, "t.tsv", "arrival_time_s\tinput_tokens\toutput_tokens\n0\t5\t3\n"))
