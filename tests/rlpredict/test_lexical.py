"""The bundle's lexical head: the runtime's TF-IDF + stacker equal scikit-learn's, and
``rlpredict stack`` writes a bundle that loads, predicts deterministically and is checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlpredict.buckets import BucketScheme
from rlpredict.inputs import InputSpec
from rlpredict.serve import lexical
from rlpredict.serve.bundle import BundleError, load_bundle, write_manifest
from rlpredict.serve.lexical import LexicalHead

pytest.importorskip("sklearn")

WORDS = ["write", "explain", "list", "code", "python", "story", "poem", "essay", "short", "long", "detailed",
         "summary", "translate", "héllo", "naïve", "数据", "the", "a", "of", "and", "to", "in", "step", "by",
         "why", "how"]


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 40))
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)]
        out.append(" ".join(words).capitalize() + rng.choice(["?", "!", ".", " 42", "\n\tok"]))
    return out


def _head(tmp_path: Path, arrays: dict, k: int, spec: InputSpec, cap: int = 4000) -> LexicalHead:
    np.savez(tmp_path / lexical.FILE, **arrays)
    section = {"format": lexical.FORMAT, "file": lexical.FILE, "text_cap": cap,
               "tfidf": {"token_pattern": lexical.TOKEN_PATTERN, "lowercase": True, "sublinear_tf": True,
                         "norm": "l2", "ngram_range": [1, 2]}}
    return LexicalHead.load(tmp_path, section, k, spec)


@pytest.fixture(scope="module")
def fitted():
    """The project's TF-IDF + logreg baseline fitted on synthetic texts whose length depends on words."""
    from rlpredict.train.baselines import TfidfLogistic

    texts = _texts(400, 0)
    rl = np.array([20 + 60 * t.lower().count("detailed") + 40 * t.lower().count("essay") + 3 * len(t.split())
                   for t in texts], dtype=float)
    scheme = BucketScheme.default()
    return TfidfLogistic().fit(texts, rl, scheme), scheme


def test_runtime_tfidf_equals_scikit_learn(fitted, tmp_path):
    model, scheme = fitted
    k = scheme.n_buckets
    vec, lr = model.model[0], model.model[-1]
    arrays = lexical.export_arrays(vec, lr, np.zeros((k, 2 * k)), np.zeros(k), k)
    head = _head(tmp_path, arrays, k, InputSpec())
    texts = [*_texts(200, 1), "", "!!! ??", "x"]  # unseen mixes, no known term at all
    got = head.lexical_probs(texts)
    want = model.predict_proba(texts)
    assert np.abs(got - want).max() < 1e-5  # float32 weights in the file
    assert np.allclose(got.sum(axis=1), 1.0)


def test_long_texts_are_cut_on_the_kept_side(fitted, tmp_path):
    model, scheme = fitted
    k = scheme.n_buckets
    arrays = lexical.export_arrays(model.model[0], model.model[-1], np.zeros((k, 2 * k)), np.zeros(k), k)
    text = "short poem " * 30 + "detailed essay " * 30
    for mode, kept in (("last_user", text[:100]), ("history", text[-100:])):
        head = _head(tmp_path, arrays, k, InputSpec(mode=mode), cap=100)
        assert np.array_equal(head.lexical_probs([text]), head.lexical_probs([kept]))
        assert np.abs(head.lexical_probs([text]) - model.predict_proba([kept])).max() < 1e-5


def test_folded_stacker_equals_the_pipeline():
    from rlpredict.train.stack import Stacker

    rng = np.random.default_rng(0)
    k = 6
    x = rng.normal(size=(300, 2 * k)) * rng.uniform(0.1, 5, 2 * k) + rng.normal(size=2 * k)
    y = rng.choice([0, 1, 2, 4], size=300)  # buckets 3 and 5 never seen
    st = Stacker(k, 1.0).fit(x, y)
    a, c = st.folded()
    z = x @ a.T + c
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert np.abs(p - st.predict_proba(x)).max() < 1e-9
    assert p[:, [3, 5]].max() < 1e-12


def test_unsupported_vectorizer_is_refused(fitted):
    from sklearn.feature_extraction.text import TfidfVectorizer

    model, scheme = fitted
    k = scheme.n_buckets
    vec = TfidfVectorizer(ngram_range=(1, 3)).fit(_texts(50, 2))
    with pytest.raises(ValueError, match="ngram_range"):
        lexical.export_arrays(vec, model.model[-1], np.zeros((k, 2 * k)), np.zeros(k), k)
    vec = TfidfVectorizer(sublinear_tf=False).fit(_texts(50, 2))
    with pytest.raises(ValueError, match="sublinear_tf"):
        lexical.export_arrays(vec, model.model[-1], np.zeros((k, 2 * k)), np.zeros(k), k)


# ---- rlpredict stack on the tiny bundle ------------------------------------------------------------
@pytest.fixture(scope="module")
def stacked(bundle_fp32, tmp_path_factory) -> Path:
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import stack_bundle

    cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], test_frac=0.25, max_rows_per_source=150,
                      input_mode="history", max_length=48)
    out = tmp_path_factory.mktemp("stacked") / "bundle"
    report = stack_bundle(bundle_fp32, cfg, out, stack_rows=200, folds=2, threads=1)
    assert set(report["evaluation"]["all"]) == {"stacked", "encoder", "tfidf_logreg"}
    all_rows = report["evaluation"]["all"]
    assert report["evaluation"]["verdict"].startswith(f"stacked MAE {all_rows['stacked']['mae']:.1f} = ")
    assert ("the stacked bundle is better than either alone" in report["evaluation"]["verdict"]) == (
        all_rows["stacked"]["mae"] < min(all_rows["encoder"]["mae"], all_rows["tfidf_logreg"]["mae"]))
    assert "paired t-tests" in report["evaluation"]["verdict"]
    return out


def test_the_stack_verdict_says_what_the_test_rows_cannot_tell():
    from rlpredict.train.stack import verdict

    rows = {"stacked": {"mae": 100.0, "n": 40}, "encoder": {"mae": 110.0}, "tfidf_logreg": {"mae": 120.0}}
    assert verdict(rows).endswith("the stacked bundle is better than either alone")
    firm = verdict(rows, {"encoder": 0.001, "tfidf_logreg": 1e-20})
    assert firm.endswith("better than either alone (paired t-tests on the 40 test rows' absolute errors: "
                         "p = 0.001 against the encoder, p < 1e-15 against TF-IDF)")
    loose = verdict(rows, {"encoder": 0.3, "tfidf_logreg": 0.01})
    assert "but the 40 test rows cannot tell it from the encoder (paired t-tests: p = 0.3" in loose


def test_a_verdict_against_an_mae_of_0_is_said_not_divided_by():
    """A baseline that scores every test row exactly (tiny, separable data) has an MAE of 0 (was:
    ZeroDivisionError, exit 1, no report, in ``rlpredict eval`` and ``stack``)."""
    from rlpredict.train.evaluate import MODEL
    from rlpredict.train.evaluate import verdict as eval_verdict
    from rlpredict.train.stack import verdict

    rows = {"stacked": {"mae": 3.0, "n": 5}, "encoder": {"mae": 0.0}, "tfidf_logreg": {"mae": 0.0}}
    assert verdict(rows).startswith("stacked MAE 3.0 = inf x the encoder's (0.0), inf x TF-IDF's (0.0)")
    assert eval_verdict({MODEL: {"mae": 0.0}, "tfidf_logreg": {"mae": 0.0}}) == (
        "model MAE 0.0 = 1.00x tfidf_logreg (0.0): the model does NOT beat TF-IDF")
    assert "= inf x tfidf_logreg (0.0): the model does NOT beat" in eval_verdict(
        {MODEL: {"mae": 2.0}, "tfidf_logreg": {"mae": 0.0}})


def test_stacked_bundle_loads_and_predicts_per_prompt(stacked):
    from rlpredict.serve.runtime import Predictor

    b = load_bundle(stacked)
    assert b.lexical is not None and "calibration" not in b.manifest
    m = b.manifest
    assert m["lexical"]["fit"]["stacker"]["C"] > 0 and m["confusion"]["source"].startswith("stacked model")
    assert "lexical.npz" in m["files"]
    p = Predictor.load(stacked, threads=2)
    prompts = _texts(40, 3)
    bulk = p.predict_arrays(prompts)
    lone = [p.predict_one(t) for t in prompts]
    assert [x.bucket for x in lone] == bulk.bucket.tolist()
    assert np.array_equal(np.stack([x.probs for x in lone]), bulk.probs)
    enc = p.logits_of_ids(p.encode(p.texts(prompts)))
    assert np.allclose(p.logits(prompts), b.lexical.stack(enc, p.texts(prompts)))


def test_stacking_a_stacked_bundle_is_refused(stacked, tmp_path):
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import stack_bundle

    cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], input_mode="history", max_length=48)
    with pytest.raises(ValueError, match="already has a lexical head"):
        stack_bundle(stacked, cfg, tmp_path / "again")


def test_stack_refuses_a_recipe_split_other_than_the_bundles(bundle_fp32, tmp_path):
    """The stacking-fit rows come from the recipe's training side: another split would let rows
    the encoder trained on be scored as held out (``calibrate`` refuses the same)."""
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import stack_bundle

    recorded = _rewrite(bundle_fp32, tmp_path / "b", lambda m, _: m.update(training_split={"test_frac": 0.25, "seed": 0}))
    for field, value in (("test_frac", 0.3), ("split_seed", 5), ("split_rule", "copies")):  # no rule recorded: id
        split = {"test_frac": 0.25, "split_seed": 0, "split_rule": "id", field: value}
        cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], max_rows_per_source=150,
                          input_mode="history", max_length=48, **split)
        with pytest.raises(ValueError, match=f"the recipe's {field} {value} differs from the split the bundle"):
            stack_bundle(recorded, cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], max_rows_per_source=150, input_mode="history",
                      max_length=48, test_frac=0.25, split_rule="id", rl_tokenizer="qwen3")  # was: counted in qwen3
    with pytest.raises(ValueError, match="the recipe's rl_tokenizer 'qwen3' differs from bundle"):
        stack_bundle(recorded, cfg, tmp_path / "s")
    with pytest.raises(ValueError, match="no training data: give --data"):  # was: ": no training samples"
        stack_bundle(bundle_fp32, TrainConfig(input_mode="history", max_length=48), tmp_path / "s")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m, dst)
    m["files"] = list(m["files"])
    write_manifest(dst, m)
    return dst


def test_a_bad_lexical_head_is_refused_naming_the_problem(stacked, tmp_path):
    def rule(m, _):
        m["lexical"]["tfidf"]["sublinear_tf"] = False

    with pytest.raises(BundleError, match=r"lexical\.tfidf\.sublinear_tf"):
        load_bundle(_rewrite(stacked, tmp_path / "rule", rule))

    def shape(m, d):
        with np.load(d / "lexical.npz") as z:
            a = {k: z[k] for k in z.files}
        a["idf"] = a["idf"][:-1]
        np.savez(d / "lexical.npz", **a)

    with pytest.raises(BundleError, match="idf has shape"):
        load_bundle(_rewrite(stacked, tmp_path / "shape", shape))

    def retyped(name, value):  # (were: "internal error" for a string idf; numpy's or the codec's
        def rule(m, d):  # words, naming no file, for the others)
            with np.load(d / "lexical.npz") as z:
                a = {k: z[k] for k in z.files}
            a[name] = value(a[name])
            np.savez(d / "lexical.npz", **a)
        return rule

    for name, value, why in (("idf", lambda x: np.array(["x"] * len(x)), "idf holds <U1 values, expected numbers"),
                             ("classes", lambda x: x.astype(str), r"classes holds <U\d+ values, expected integers"),
                             ("vocab_utf8", lambda x: np.concatenate([x, np.array([255], np.uint8)]),
                              r"vocab_utf8 is not UTF-8 \(byte \d+\)"),
                             ("coef", lambda x: np.array([None], dtype=object), r"coef: Object arrays cannot")):
        with pytest.raises(BundleError, match=rf"lexical\.npz: {why}"):
            load_bundle(_rewrite(stacked, tmp_path / name, retyped(name, value)))

    def unlisted(m, _):
        m["files"] = {k: v for k, v in m["files"].items() if k != "lexical.npz"}

    with pytest.raises(BundleError, match=r"lexical head file 'lexical\.npz' has no entry"):
        load_bundle(_rewrite(stacked, tmp_path / "unlisted", unlisted))


def test_a_tampered_lexical_file_is_refused(stacked, tmp_path):
    d = shutil.copytree(stacked, tmp_path / "b")
    with (d / "lexical.npz").open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(BundleError, match=r"lexical\.npz does not match the sha256"):
        load_bundle(d)


def test_annotate_with_a_stacked_bundle_gives_the_stacked_predictions(stacked, tmp_path):
    """``rlpredict annotate`` goes through the same stacked logits as ``predict`` (and a
    calibrated stacked bundle adds its quantile columns the same way)."""
    from rlpredict.serve.annotate import annotate_file
    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(stacked, threads=2)
    prompts = _texts(30, 4)
    src = tmp_path / "trace.jsonl"
    src.write_text("".join(json.dumps({"prompt": t, "arrival_time_s": i}) + "\n" for i, t in enumerate(prompts)))
    annotate_file(p, src, tmp_path / "out.jsonl", chunk_rows=7)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = p.predict_arrays(prompts)
    assert [r["rl_bucket"] for r in rows] == want.bucket.tolist()
    assert [r["rl_pred_tokens"] for r in rows] == want.pred_tokens.tolist()


def test_stack_refuses_a_recipe_whose_subsample_is_not_the_encoders(bundle_fp32, tmp_path):
    """Another seed, max_rows_per_source or data order draws another training subsample: the
    stacker was then fit, without a word, on rows the encoder trained on. The bundle now records
    its encoder's training rows (``splits.rows_sha256``, from ``training_summary.json``)."""
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.splits import rows_sha256
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import load_split, stack_bundle

    files = [str(p) for p in SAMPLE_FILES.values()]
    recipe = {"test_frac": 0.25, "max_rows_per_source": 150, "input_mode": "history", "max_length": 48}
    enc_train = load_split(TrainConfig(data=files, **recipe), lambda _: None)[1]
    split = {"test_frac": 0.25, "seed": 0, "rule": "copies", "train_rows_sha256": rows_sha256(enc_train)}
    recorded = _rewrite(bundle_fp32, tmp_path / "b", lambda m, _: m.update(training_split=split))
    for change in ({"seed": 1}, {"max_rows_per_source": 120}, {"data": files[::-1]}):
        cfg = TrainConfig(**{"data": files, **recipe, **change})
        with pytest.raises(ValueError, match=r"is not the one bundle .* encoder trained on"):
            stack_bundle(recorded, cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    report = stack_bundle(recorded, TrainConfig(data=files, **recipe), tmp_path / "s", stack_rows=60, folds=2, threads=1)
    assert report["evaluation"]["all"]


def test_too_few_stacking_rows_are_refused_before_the_fits(bundle_fp32, tmp_path):
    """Was: scikit-learn's "Cannot have number of splits n_splits=5 greater than the number of
    groups" after every fit; now one line naming the option."""
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import stack_bundle

    cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], test_frac=0.25, max_rows_per_source=150,
                      input_mode="history", max_length=48)
    with pytest.raises(ValueError, match=r"conversation group\(s\); the stacker's grouped cross-validation needs "
                                         r"at least 5: give more --stack-rows"):
        stack_bundle(bundle_fp32, cfg, tmp_path / "s", stack_rows=3, folds=2, threads=1)
    assert not (tmp_path / "s").exists()


def test_a_fold_that_would_see_one_bucket_is_refused_before_the_fits():
    """Every row outside bucket 0 in one conversation: a TF-IDF fold, or a part of the stacker's
    cross-validation, held responses of one bucket, and scikit-learn's error came after minutes
    of fits (a reviewer's find)."""
    from rlpredict.data import Sample
    from rlpredict.train.stack import check_fold_buckets, group_folds

    def row(i: int, group: str, rl: int) -> Sample:
        return Sample(f"r{i}", group, [{"role": "user", "content": "hi"}], "x", rl, "src", None, f"f:{i}")

    scheme = BucketScheme.default()
    short = [row(i, f"g{i}", 5) for i in range(40)]
    stack = short + [row(100 + i, "long", 2000) for i in range(10)]
    fold_of = group_folds(stack, 3, 0)
    with pytest.raises(ValueError, match=r"TF-IDF fold \d: the training side without that fold's conversations "
                                         r"holds responses of one bucket only"):
        check_fold_buckets(stack, stack, fold_of, scheme)
    side = stack + [row(200 + i, f"h{i}", 2000) for i in range(3)]  # long answers outside the stack
    with pytest.raises(ValueError, match=r"the stacker's cross-validation part \d: its training rows hold "
                                         r"responses of one bucket only"):
        check_fold_buckets(side, stack, fold_of, scheme)
    mixed = short + [row(100 + i, f"l{i}", 2000) for i in range(10)]
    y = check_fold_buckets(mixed, mixed, group_folds(mixed, 3, 0), scheme)
    assert sorted(set(y.tolist())) == [0, scheme.n_buckets - 1]


def test_compare_stacking_refuses_a_recipe_other_than_the_bundles(bundle_fp32, tmp_path):
    """``training/compare_stacking.py`` asks what ``rlpredict stack`` asks (was: a full report
    on "held-out" rows the encoder had trained on; a reviewer's case)."""
    import subprocess
    import sys

    from rlpredict.samples import SAMPLE_FILES

    recorded = _rewrite(bundle_fp32, tmp_path / "b", lambda m, _: m.update(training_split={"test_frac": 0.25, "seed": 0}))
    files = ", ".join(json.dumps(str(p)) for p in SAMPLE_FILES.values())
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[train]\ndata = [{files}]\ntest_frac = 0.3\nmax_rows_per_source = 150\n'
                      'input_mode = "history"\nmax_length = 48\n')
    script = Path(__file__).resolve().parents[2] / "training" / "compare_stacking.py"
    p = subprocess.run([sys.executable, str(script), "--config", str(recipe), "--bundle", str(recorded),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "the recipe's test_frac 0.3 differs from the split the bundle recorded" in p.stderr
    assert not (tmp_path / "out").exists()
