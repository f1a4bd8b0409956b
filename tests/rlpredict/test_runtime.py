"""The torch-free runtime: no torch import, request shapes, reservations, batching invariance."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlpredict.inputs import build_text
from rlpredict.serve.runtime import Prediction, Predictor

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "hi",
    "Write a detailed essay on the causes of the French Revolution, with sources.",
    "Translate 'good morning' to German.",
    "List ten prime numbers and explain why each is prime. " * 8,
    "",
    "What is 2+2?",
    "Summarise the plot of Hamlet in three sentences.",
]


@pytest.fixture(scope="module")
def predictor(bundle_fp32) -> Predictor:
    return Predictor.load(bundle_fp32, threads=1, batch_size=4)


def _run_isolated(code: str, block_torch: bool) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, optionally with torch/transformers made unimportable."""
    prelude = ""
    if block_torch:
        prelude = textwrap.dedent("""
            import importlib.abc, sys
            class _NoTorch(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in ("torch", "transformers"):
                        raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
                    return None
            sys.meta_path.insert(0, _NoTorch())
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("block_torch", [False, True], ids=["torch-installed", "torch-missing"])
def test_serving_path_never_imports_torch(bundle_fp32, tmp_path, block_torch):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code = f"""
        import sys
        import rlpredict
        from rlpredict import Predictor, Prediction
        from rlpredict.serve.runtime import Predictor as P2
        assert Predictor is P2
        p = Predictor.load({str(bundle_fp32)!r})
        assert len(p.predict(["hello", [{{"role": "user", "content": "hi"}}]])) == 2
        p.predict_one("hello")
        from rlpredict.cli import app
        app(["predict", "--model", {str(bundle_fp32)!r}, "hello"], standalone_mode=False)
        app(["annotate", {str(trace)!r}, "-o", {str(tmp_path / "o.jsonl")!r}, "--model",
             {str(bundle_fp32)!r}, "--no-progress"], standalone_mode=False)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                       or m.split(".")[:2] == ["rlpredict", "train"])  # nor the training path
        assert not heavy, heavy
        print("OK")
    """
    res = _run_isolated(code, block_torch)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_import_rlpredict_is_light():
    res = _run_isolated("""
        import sys, rlpredict
        assert "onnxruntime" not in sys.modules and "rlpredict.serve.runtime" not in sys.modules
        print("OK")
    """, block_torch=False)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_blank_generator_names_no_model_as_the_readers_take_it():
    """Was: the Python API fed "model:    " to the model where the CLI, annotate and training
    read a blank name as no generator ("model: unknown")."""
    from rlpredict.inputs import InputSpec

    msgs = [{"role": "user", "content": "hi"}]
    for mode in ("last_user", "history"):
        spec = InputSpec(mode=mode, include_generator=True)
        unknown = build_text(msgs, spec, None)
        assert "model: unknown" in unknown
        assert build_text(msgs, spec, "   ") == build_text(msgs, spec, "\t") == build_text(msgs, spec, "") == unknown
        assert "model: gpt-4" in build_text(msgs, spec, "gpt-4")


def test_text_and_messages_build_the_training_text(predictor):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "tell me a story"}]
    spec = predictor.input_spec
    assert predictor.texts("hi") == [build_text([{"role": "user", "content": "hi"}], spec)]
    assert predictor.texts(msgs) == [build_text(msgs, spec)]  # one conversation
    assert predictor.texts([msgs, "hi"]) == [build_text(msgs, spec), predictor.texts("hi")[0]]
    a, b = predictor.predict("hi")[0], predictor.predict([{"role": "user", "content": "hi"}])[0]
    assert a.bucket == b.bucket and np.allclose(a.probs, b.probs, atol=1e-6)


def test_request_shapes(predictor):
    assert predictor.predict([]) == []
    assert len(predictor.predict("one")) == 1
    assert len(predictor.predict(["one", "two", "three"])) == 3
    with pytest.raises(TypeError, match="request 1"):
        predictor.predict(["ok", 42])
    with pytest.raises(ValueError, match="generators"):
        predictor.predict(["a", "b"], generators=["g"])


def test_prediction_fields_and_default_reservation(predictor):
    preds = predictor.predict(PROMPTS)
    scheme = predictor.scheme
    probs = np.stack([p.probs for p in preds])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    median = scheme.predictive_quantile(probs, 0.5)
    for p, m in zip(preds, median, strict=True):
        assert isinstance(p, Prediction)
        assert p.bucket == int(np.argmax(p.probs))
        assert p.pred_tokens == round(m)
        assert p.reserve_tokens == scheme.reserve_tokens[p.bucket]
        assert type(p.bucket) is int and type(p.pred_tokens) is int and type(p.reserve_tokens) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        preds[0].bucket = 3


def test_reserve_quantile_and_margin(bundle_fp32, predictor):
    base = predictor.predict(PROMPTS)
    probs = np.stack([p.probs for p in base])
    q90 = Predictor.load(bundle_fp32, reserve_quantile=0.9).predict(PROMPTS)
    q99 = Predictor.load(bundle_fp32, reserve_quantile=0.99).predict(PROMPTS)
    want = predictor.scheme.predictive_quantile(probs, 0.9)
    for p, w in zip(q90, want, strict=True):
        assert p.reserve_tokens == math.ceil(round(w, 6))
    assert all(b.reserve_tokens >= a.reserve_tokens for a, b in zip(q90, q99, strict=True))
    padded = Predictor.load(bundle_fp32, margin=0.25).predict(PROMPTS)
    for a, b in zip(base, padded, strict=True):
        assert b.reserve_tokens == math.ceil(a.reserve_tokens * 1.25 - 1e-9)
        assert b.pred_tokens == a.pred_tokens and b.bucket == a.bucket
    with pytest.raises(ValueError, match="reserve_quantile"):
        Predictor.load(bundle_fp32, reserve_quantile=1.5)
    with pytest.raises(ValueError, match="margin"):
        Predictor.load(bundle_fp32, margin=-0.1)
    for bad in (float("nan"), float("inf"), 1e300, "0.1"):  # NaN, inf, 1e300 made reservations INT64_MIN
        with pytest.raises(ValueError, match=r"margin must be a number in \[0, 100"):
            Predictor.load(bundle_fp32, margin=bad)
    from rlpredict import cli_bundle
    from rlpredict.serve.runtime import MAX_MARGIN

    assert cli_bundle.MAX_MARGIN == MAX_MARGIN  # the CLI's bound, written out, is the API's
    top = Predictor.load(bundle_fp32, margin=MAX_MARGIN).predict(PROMPTS)
    assert all(0 < b.reserve_tokens == math.ceil(a.reserve_tokens * 101 - 1e-9) for a, b in zip(base, top, strict=True))
    for kw in ({"threads": "2"}, {"threads": 1.5}, {"threads": True}, {"reserve_quantile": "0.9"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Predictor.load(bundle_fp32, **kw)


def test_what_is_no_request_is_refused_by_name(predictor):
    """A single message dict was predicted as its keys ("role", "content"); a number, None or
    bytes failed inside; generators that are not strings were written into the model's text."""
    with pytest.raises(TypeError, match="one message is not a request"):
        predictor.predict({"role": "user", "content": "x"})
    with pytest.raises(TypeError, match="one message is not a request"):  # was: predicted
        predictor.predict_one({"role": "user", "content": "x"})
    for bad in (None, 123, b"hi"):
        with pytest.raises(TypeError, match="requests: expected a prompt string"):
            predictor.predict(bad)
    with pytest.raises(TypeError, match="generators: each must be a string or None, got 1"):
        predictor.predict(["a"], generators=[1])
    with pytest.raises(TypeError, match="generators: expected a string or a list"):
        predictor.predict(["a"], generators=5)
    with pytest.raises(TypeError, match="generators: expected a string or a list of strings, got bytes"):
        predictor.predict("a", b"x")  # was: "each must be a string or None, got 120"
    with pytest.raises(TypeError, match="generators: each must be a string"):
        predictor.predict_one("a", generator=["x"])
    with pytest.raises(TypeError, match="quantiles: expected a list of numbers"):
        predictor.predict(["a"], quantiles="0.5")
    # a generator with a lone surrogate failed with a TypeError inside the tokenizer
    with pytest.raises(ValueError, match=r"generator 0: not valid Unicode"):
        predictor.predict(["a", "b"], generators="m\ud800")
    with pytest.raises(ValueError, match=r"generator 1: not valid Unicode"):
        predictor.predict(["a", "b"], generators=["m", "m\ud800"])


def test_bulk_tokenizing_in_chunks_gives_the_ids_of_one_call(predictor, monkeypatch):
    """A bulk call tokenizes ``ENCODE_CHUNK`` texts at a time (each Encoding keeps the tokens
    truncation cut off: 1.8 GiB for 100k prompts at once): the same ids, in order."""
    from rlpredict.serve import runtime

    texts = [f"prompt number {i} " * (1 + i % 7) for i in range(11)] + ["word " * 3000]
    enc = predictor.encoder
    whole = enc.encode_batch(texts)
    monkeypatch.setattr(runtime, "ENCODE_CHUNK", 3)
    assert enc.encode_batch(texts) == whole == [enc.encode(t) for t in texts]


def test_batch_single_and_order_give_the_same_result(bundle_fp32, predictor):
    batched = predictor.predict(PROMPTS)
    single = [predictor.predict_one(t) for t in PROMPTS]
    reversed_ = predictor.predict(PROMPTS[::-1])[::-1]
    big = Predictor.load(bundle_fp32, batch_size=64).predict(PROMPTS)
    for other in (single, reversed_, big):
        for a, b in zip(batched, other, strict=True):
            assert a.bucket == b.bucket and a.pred_tokens == b.pred_tokens
            assert a.reserve_tokens == b.reserve_tokens
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_a_prediction_is_a_value(predictor):
    """Equal predictions compare equal and hash alike; probs cannot be written (was: ``==``
    raised numpy's ambiguous-truth-value error and ``hash`` failed on the array)."""
    a, b = predictor.predict_one(PROMPTS[0]), predictor.predict_one(PROMPTS[0])
    c = predictor.predict(PROMPTS[:2])
    assert a == b == c[0] and hash(a) == hash(b) == hash(c[0]) and len({a, b, c[0]}) == 1
    assert a != c[1] and a != "not a prediction"
    for p in (a, *c, pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert p == a or p in c
        with pytest.raises(ValueError):
            p.probs[0] = 1.0
    # a reviewer's cases: another dtype or shape is another value; -0.0 is 0.0
    from rlpredict.serve.runtime import Prediction

    z = np.zeros(2, np.float32)
    assert Prediction(0, z, 1, 1) != Prediction(0, z.astype(np.float64), 1, 1) != Prediction(0, z[:1], 1, 1)
    assert Prediction(0, -z, 1, 1) == Prediction(0, z, 1, 1) and hash(Prediction(0, -z, 1, 1)) == hash(Prediction(0, z, 1, 1))
    held = Prediction(0, z, 1, 1)
    z[0] = 0.5  # the caller's array stays the caller's: the prediction holds its own copy
    assert held.probs[0] == 0.0 and z.flags.writeable
    with pytest.raises(ValueError):  # read-only for good (was: the flag could be set back)
        held.probs.flags.writeable = True
    q = Prediction(0, z, 1, 1, [4, 5])  # a list of quantiles is held as a tuple (was: a list, mutable)
    assert q.quantile_tokens == (4, 5) and q == Prediction(0, z, 1, 1, (4, 5))


def test_int8_is_close_to_fp32(bundle_int8, predictor):
    q = Predictor.load(bundle_int8).predict(PROMPTS)
    f = predictor.predict(PROMPTS)
    diff = max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(q, f, strict=True))
    assert diff < 0.05


def test_truncation_follows_the_input_spec(predictor):
    long = " ".join(f"w{i}" for i in range(400)) + " FINALWORD"
    ids = predictor.encode(predictor.texts(long))[0]
    assert len(ids) == predictor.input_spec.max_length
    # history mode keeps the most recent text: the end survives, the start is cut
    tail = predictor._tokenizer.decode(ids)
    assert "finalword" in tail and "w0 " not in tail


def test_predict_cli_args_stdin_and_json(bundle_fp32, monkeypatch):
    import json

    from typer.testing import CliRunner

    from rlpredict.cli import app

    monkeypatch.setenv("RLPREDICT_MODEL", str(bundle_fp32))  # the default bundle
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "hello", "Write an essay"])
    assert res.exit_code == 0, res.output
    assert "bucket" in res.stdout and "Write an essay" in res.stdout
    res = runner.invoke(app, ["predict", "--json", "--margin", "0.5"], input="one\n\ntwo\n")
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)["predictions"]
    assert [p["input"] for p in preds] == ["one", "two"]
    direct = Predictor.load(bundle_fp32, margin=0.5).predict(["one", "two"])
    assert [p["rl_reserve_tokens"] for p in preds] == [d.reserve_tokens for d in direct]
    res = runner.invoke(app, ["predict", "--jsonl", "--json"], input='{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert res.exit_code == 0 and json.loads(res.stdout)["predictions"][0]["rl_bucket"] >= 0
    res = runner.invoke(app, ["predict", "--jsonl"], input='{"prompt": 5}\n')
    assert res.exit_code == 2 and "stdin: line 1" in res.output
    # a request field given twice (was: the last kept, silently; ecoserve refuses such a row)
    res = runner.invoke(app, ["predict", "--jsonl"], input='{"prompt": "a long essay", "prompt": "hi"}\n')
    assert res.exit_code == 2 and "key 'prompt' is given twice" in res.output
    # no user text: predicted as an empty prompt, and said (was: silently)
    res = runner.invoke(app, ["predict", "--jsonl", "--json"],
                        input='{"messages": [{"role": "user", "content": " "}]}\n{"prompt": "hi"}\n')
    assert res.exit_code == 0 and "1 request(s) with no text where this bundle reads it" in res.stderr
    # --single reads at most the row limit (was: any size, held whole)
    monkeypatch.setattr("rlpredict.records.MAX_ROW_BYTES", 10)
    res = runner.invoke(app, ["predict", "--single"], input="x" * 11)
    assert res.exit_code == 2 and "a prompt over the 0 MiB limit" in res.output


def test_which_requests_lack_user_text():
    from rlpredict.inputs import InputSpec
    from rlpredict.serve.runtime import lacks_user_text

    last, history = InputSpec(mode="last_user"), InputSpec(mode="history")
    system_only = [{"role": "system", "content": "Write an essay"}]
    blank_last = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": " "}]
    for r in ("", "  ", system_only, [{"role": "wizard", "content": "x"}], blank_last,
              [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]):
        assert lacks_user_text(r, last), r
    for r in ("hi", [{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "x"}]}]):
        assert not lacks_user_text(r, last), r
    # a history-mode bundle reads every turn (was: counted as predicted from an empty prompt)
    assert not lacks_user_text(system_only, history) and not lacks_user_text(blank_last, history)
    assert lacks_user_text([{"role": "user", "content": " "}], history)
    # what the encoder's tokenizer deletes is no text either (was: predicted from an empty prompt,
    # without the note): zero-width space, soft hyphen, a BOM, control characters
    for invisible in ("\u200b", "\u00ad\ufeff", "\x01 \u200b\n", "\ufffd\ufffd", "\ue000", "\u0301"):
        assert lacks_user_text(invisible, last) and lacks_user_text([{"role": "user", "content": invisible}], history)
    assert not lacks_user_text("\u200bhi", last) and not lacks_user_text("\u00e9", last)
    assert not lacks_user_text("\U0001fa77", last)  # an emoji newer than Python's tables: [UNK], not nothing


def test_a_closed_stdout_is_an_error(bundle_fp32, tmp_path):
    """``rlpredict predict hi >&-`` printed nothing and exited 0."""
    res = subprocess.run([sys.executable, "-m", "rlpredict.cli", "predict", "--model", str(bundle_fp32), "hi"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 2 and "standard output is closed" in res.stderr
    # a command that writes nothing there runs (annotate writes its file; its summary is on stderr)
    src = tmp_path / "closed-stdout.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    out = src.with_name("closed-stdout.out.jsonl")
    res = subprocess.run([sys.executable, "-m", "rlpredict.cli", "annotate", str(src), "-o", str(out), "--model",
                          str(bundle_fp32), "--no-progress", "--force"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert res.returncode == 0 and out.read_text().count("rl_bucket") == 1, res.stderr


def test_predict_cli_says_when_a_generator_bundle_gets_none(monkeypatch):
    """The shipped bundle takes the served model's name: a prompt without one is predicted as
    'model: unknown', and predict says so (as annotate does), on stderr."""
    from typer.testing import CliRunner

    from rlpredict.cli import app

    monkeypatch.delenv("RLPREDICT_MODEL", raising=False)
    assert Predictor.load().input_spec.include_generator
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--json", "Write a haiku about the sea"])
    assert res.exit_code == 0, res.output
    assert "1 prompt(s) have no generator" in res.stderr and "no generator" not in res.stdout
    res = runner.invoke(app, ["predict", "--json", "--generator", "llama-3-8b", "Write a haiku"])
    assert res.exit_code == 0 and "no generator" not in res.output
    # blank space names no model, as "" does (was: "   " predicted as a model's name, unsaid)
    unknown = json.loads(runner.invoke(app, ["predict", "--json", "Write a haiku"]).stdout)
    res = runner.invoke(app, ["predict", "--json", "--generator", "   ", "Write a haiku"])
    assert res.exit_code == 0 and "1 prompt(s) have no generator" in res.stderr
    assert json.loads(res.stdout) == unknown
    res = runner.invoke(app, ["predict", "a\\[b c"])  # the table shows it as typed (was: "a[b c")
    assert res.exit_code == 0 and "a\\[b c" in res.stdout
