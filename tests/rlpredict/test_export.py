"""Export: parity with torch is checked and recorded, int8 is measured, failures write nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("torch")
import onnxruntime as ort

from rlpredict.outputs import OutputError
from rlpredict.serve.bundle import FORMAT, load_bundle
from rlpredict.train import export as export_mod
from rlpredict.train.export import ExportError, export_bundle


def test_parity_recorded_and_passed(bundle_fp32):
    m = load_bundle(bundle_fp32).manifest
    assert m["format"] == FORMAT
    par = m["parity"]
    assert par["passed"] and par["prompts"] == 48
    assert par["max_abs_logit_diff"] <= 1e-4
    assert par["argmax_agreement"] == 1.0
    assert par["tokenization_mismatches"] == 0
    assert m["model"]["precision"] == "fp32" and m["quantization"] is None
    assert "evaluation" not in m and "confusion" not in m  # the model folder has no eval/
    assert m["input"]["max_length"] == 48 and m["input"]["truncation_side"] == "left"
    assert m["rl_tokenizer"] == "llama3" and len(m["buckets"]["edges"]) == 10


def test_onnx_has_dynamic_batch_and_sequence_and_no_token_type_ids(bundle_fp32):
    sess = ort.InferenceSession(str(bundle_fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for shape in inputs.values():
        assert all(isinstance(d, str) for d in shape), shape  # symbolic = dynamic
    assert [o.name for o in sess.get_outputs()] == ["logits"]


def test_int8_measured_and_recorded(bundle_fp32, bundle_int8):
    m = load_bundle(bundle_int8).manifest
    q = m["quantization"]
    assert m["model"]["precision"] == "int8"
    assert q["per_channel"] is True and q["weight_type"] == "QInt8"
    assert 0.0 <= q["argmax_agreement_vs_fp32"] <= 1.0
    assert 0.0 <= q["max_abs_prob_diff_vs_fp32"] < 0.2
    assert q["int8_bytes"] < q["fp32_bytes"]
    assert (bundle_int8 / "model.onnx").stat().st_size < (bundle_fp32 / "model.onnx").stat().st_size
    if q["accuracy"] is not None:  # the parity prompts have responses counted in Llama-3 tokens
        acc = q["accuracy"]
        assert acc["labelled"] == 48
        assert acc["delta_points"] == pytest.approx(100 * (acc["int8"] - acc["fp32"]), abs=1e-2)


def test_failed_parity_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "PARITY_ATOL", -1.0)  # nothing can pass
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"parity failed"):
        export_bundle(tiny_model_dir, out, parity_n=8)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_bad_parity_rows_are_counted_and_said(tiny_model_dir, tmp_path):
    """--parity-data's bad rows are set aside and the log says how many and why (was: dropped
    without a word)."""
    src = tmp_path / "parity.jsonl"
    src.write_bytes(b'{"prompt": "good one", "response": "fine"}\n\xff\xfe\n{"prompt": 5, "response": "x"}\n'
                    b'{"prompt": "good two", "response": "fine"}\n')
    lines: list[str] = []
    export_bundle(tiny_model_dir, tmp_path / "b", parity_data=[src], parity_n=8, log=lines.append)
    said = next(line for line in lines if line.startswith("parity prompts:"))
    assert said.startswith("parity prompts: 2 from") and "skipped 2 rows" in said


def test_parity_data_is_checked_as_every_data_option_is(tiny_model_dir, tmp_path):
    """--parity-data given twice counted its rows twice, a blank one read the current folder, and
    an --out inside it became parity data of the next export."""
    from typer.testing import CliRunner

    from rlpredict.cli import app

    src = tmp_path / "pd"
    src.mkdir()
    (src / "rows.jsonl").write_text('{"prompt": "good one", "response": "fine"}\n')
    base = ["export", "--model", str(tiny_model_dir), "--parity-n", "8"]
    for extra, says in ((["--parity-data", str(src), "--parity-data", str(src), "--out", str(tmp_path / "b")], "given twice"),
                        (["--parity-data", "", "--out", str(tmp_path / "b")], "empty"),
                        (["--parity-data", str(src), "--out", str(src / "b")], "lies inside the input")):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and says in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pd"] and [p.name for p in src.iterdir()] == ["rows.jsonl"]


def test_a_model_meta_names_its_rl_tokenizer_by_a_string(tiny_model_dir):
    from rlpredict.train.model_meta import ModelMeta

    d = {**json.loads((tiny_model_dir / "rlpredict.json").read_text()), "rl_tokenizer": 5}
    with pytest.raises(ValueError, match=r"rlpredict.json: field 'rl_tokenizer' must be a tokenizer's name, got 5"):
        ModelMeta.from_dict(d)  # was: "5", refused later by calibrate and drift


def test_eval_copied_refuses_existing_and_force_replaces(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rlpredict.cli import app

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    report = {"sources": {"sharegpt": {"accuracy": 0.41, "mae": 150.0}}}
    confusion = {"format": "rlpredict.confusion/1", "bucket_edges": [64, None], "point_tokens": [30, 200],
                 "reserve_tokens": [60, 400], "matrix": [[1, 0], [0, 1]], "source": "test"}
    (model / "eval").mkdir()
    (model / "eval" / "report.json").write_text(json.dumps(report))
    (model / "eval" / "confusion.json").write_text(json.dumps(confusion))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"confusion.json: bucket edges \[64, None\], for a model with .*: "
                                          r"another model's"):
        export_bundle(model, out, parity_n=8)  # another model's (was: a bundle drift could not use)
    n = json.loads((model / "rlpredict.json").read_text())["buckets"]["edges"].__len__()
    confusion["matrix"] = [[int(i == j) for j in range(n)] for i in range(n)]
    confusion["bucket_edges"] = json.loads((model / "rlpredict.json").read_text())["buckets"]["edges"]
    confusion["bucket_edges"] = [None if e in (None, "inf", float("inf")) else e for e in confusion["bucket_edges"]]
    zeros = {**confusion, "matrix": [[0] * n for _ in range(n)]}
    (model / "eval" / "confusion.json").write_text(json.dumps(zeros))
    with pytest.raises(ExportError, match=r"confusion.json: matrix: all 0"):  # was: refused after the ONNX export
        export_bundle(model, out, parity_n=8)
    (model / "eval" / "confusion.json").write_text(json.dumps(confusion))
    export_bundle(model, out, parity_n=8)  # a bundle of ours: --force may replace it
    with pytest.raises(OutputError, match=r"--force"):
        export_bundle(model, out, parity_n=8)
    res = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(out),
                                   "--parity-n", "8", "--force", "--json"])
    assert res.exit_code == 0, res.output
    m = load_bundle(out).manifest
    assert m["evaluation"] == report and m["confusion"] == confusion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "model"]
    # a file the user put there: --force refuses, and nothing is deleted
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(out),
                                   "--parity-n", "8", "--force"])
    assert res.exit_code == 2 and "no tool of ours wrote" in res.output and "notes.txt" in res.output
    assert (out / "notes.txt").read_text() == "mine" and load_bundle(out).manifest == m


def test_missing_model_meta_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rlpredict.json"):
        export_bundle(tmp_path, tmp_path / "out")


def test_export_refuses_the_evaluation_of_another_model(tiny_model_dir, tmp_path):
    """Was: ``MODEL/eval`` was embedded whatever model it scored, and the simulator's confusion
    matrix and ``drift``'s reference then described another model."""
    import torch
    import transformers

    from rlpredict.train.evaluate import evaluate, write_report
    from rlpredict.train.model_meta import ModelMeta

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(other)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(other)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a " * (i + 1)}) + "\n" for i in range(30)))
    mine = tmp_path / "mine"
    shutil.copytree(tiny_model_dir, mine)
    report, probs, test = evaluate(other, [data], split="all", baselines=())
    scheme = ModelMeta.load(mine).buckets
    write_report(report, probs, test, scheme, mine / "eval")  # the other model's scores, in this one's folder
    with pytest.raises(ExportError, match=r"the evaluation of another model"):
        export_bundle(mine, tmp_path / "b", parity_n=8)
    assert not (tmp_path / "b").exists()
    report, probs, test = evaluate(mine, [data], split="all", baselines=())
    write_report(report, probs, test, scheme, mine / "eval", force=True)
    export_bundle(mine, tmp_path / "b", parity_n=8)
    assert load_bundle(tmp_path / "b").manifest["evaluation"]["model_weights_sha256"] == report["model_weights_sha256"]


def test_parity_prompts_are_drawn_holding_at_most_n(tmp_path, monkeypatch):
    """The parity prompts are the ones a draw over every row in memory picked, but at most n + 1
    are held (was: the whole file, 1.96 GB for 8 prompts of a 220k-row file; a reviewer's find)."""
    import random

    from rlpredict.data import load_samples
    from rlpredict.samples import SAMPLE_FILES

    files = [str(p) for p in SAMPLE_FILES.values()]
    every, _ = load_samples(files, on_error="skip")
    for n in (8, 100, len(every), len(every) + 5):
        got, report = export_mod._parity_samples(files, n, None)
        want = random.Random(0).sample(every, n) if len(every) > n else every
        assert [s.id for s in got] == [s.id for s in want] and report.summary().startswith(f"{len(every)} rows")
    empty = tmp_path / "prompts.jsonl"
    empty.write_text('{"prompt": "hello there"}\n')
    with pytest.raises(ExportError, match="needs rows with a response"):
        export_mod._parity_samples([empty], 8, None)


def test_parity_draw_holds_a_bounded_amount_whatever_the_file_size(tmp_path):
    """The draw's peak memory does not grow with the file (a reviewer showed the test above passes
    for a draw that holds every row)."""
    import tracemalloc

    def peak(rows: int) -> int:
        path = tmp_path / f"log{rows}.jsonl"
        with path.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"prompt": f"{i} " + "word " * 200, "response": "fine " * 20}) + "\n")
        tracemalloc.start()
        try:
            export_mod._parity_samples([path], 4, None)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, big = peak(500), peak(5000)  # 10x the rows: about 5 MB more, were they all held
    assert big < small + 1_000_000, (small, big)


def test_parity_data_that_changes_between_the_reads_or_is_a_pipe_is_refused(tmp_path, monkeypatch):
    """A file that shrank between the two reads gave an internal error, and a named pipe hung at
    the second read (a reviewer's finds): both are one clear error now."""
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(10)))
    from rlpredict import data  # export imports iter_samples where it reads

    reads = []
    original = data.iter_samples

    def shrinking(files, report, **kw):
        reads.append(1)
        for k, s in enumerate(original(files, report, **kw)):
            if len(reads) == 1 or k < 4:
                yield s

    monkeypatch.setattr(data, "iter_samples", shrinking)
    with pytest.raises(ExportError, match=r"changed while the parity draw read it \(10 samples, then 4\)"):
        export_mod._parity_samples([path], 5, None)
    monkeypatch.setattr(data, "iter_samples", original)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ExportError, match="not a regular file"):
        export_mod._parity_samples([fifo], 5, None)


def test_a_bundle_whose_recorded_size_is_wrong_is_refused(bundle_fp32, tmp_path):
    from rlpredict.serve.bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(bundle_fp32, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["bytes"] = 5  # was: loaded and served (a reviewer's find)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.onnx does not match the sha256 and size"):
        load_bundle(copy)


def test_accuracy_not_recorded_is_said(tmp_path):
    """An RL tokenizer that cannot count the responses left the accuracy out without a word (a
    reviewer's find); the export's log says why."""
    from types import SimpleNamespace

    from rlpredict.samples import SAMPLE_FILES

    samples, _ = export_mod._parity_samples([str(p) for p in SAMPLE_FILES.values()], 4, None)
    lines: list[str] = []
    meta = SimpleNamespace(rl_tokenizer=str(tmp_path / "none" / "tokenizer.json"), buckets=None)
    assert export_mod._labels(samples, meta, lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("note: accuracy not recorded: the RL tokenizer")
