"""A few-step training run on the bundled sample lowers the loss; eval writes a full report."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from rlpredict.cli import app
from rlpredict.samples import SAMPLE_FILES
from rlpredict.train.config import TrainConfig
from rlpredict.train.evaluate import evaluate, write_report
from rlpredict.train.model_meta import ModelMeta
from rlpredict.train.trainer import (
    class_weights,
    length_grouped_batches,
    prepare,
    soft_targets,
    train,
)

DATA = [str(p) for p in SAMPLE_FILES.values()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    # Over-fit 32 examples for 24 steps: the loss must fall. (Evaluation while training and
    # checkpoints are tested on a tiny encoder in test_trainer.py.)
    cfg = TrainConfig(data=DATA, max_rows=32, max_steps=24, batch_size=8, max_length=48, lr=3e-4,
                      head_lr=3e-3, test_frac=0.25, seed=1, warmup_ratio=0.0, eval_rows=0, save_checkpoints=False)
    summary = train(cfg, out, progress=False)
    return out, summary


def test_training_lowers_the_loss_and_saves_a_model_folder(trained):
    out, summary = trained
    assert summary["steps"] == 24 and summary["loss_last"] < summary["loss_first"]
    assert summary["trainer"]["processes"] == 1 and summary["trainer"]["checkpoint_dir"] is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no checkpoint or temporary folder
    for f in ("config.json", "model.safetensors", "tokenizer.json", "rlpredict.json", "training_summary.json"):
        assert (out / f).is_file(), f
    meta = ModelMeta.load(out)
    assert meta.rl_tokenizer == "llama3" and meta.buckets.n_buckets == 10 and meta.input.mode == "last_user"


def test_split_is_by_group_and_deterministic():
    cfg = TrainConfig(data=DATA, test_frac=0.25)
    a, b = prepare(cfg), prepare(cfg)
    assert [s.id for s in a.test] == [s.id for s in b.test]
    assert {s.group for s in a.train}.isdisjoint({s.group for s in a.test})
    assert a.scheme == b.scheme and sum(a.scheme.counts) == len(a.train)


def test_eval_report_has_every_metric_and_baseline(trained, tmp_path):
    out, _ = trained
    report, probs, test = evaluate(out, DATA)
    assert set(probs) == {"model", "constant", "prompt_length", "tfidf_ridge", "tfidf_logreg"}
    assert set(report["sources"]) == {"sharegpt_sample", "alpaca_sample"}
    for row in report["all"].values():
        assert {"n", "bucket_acc", "within1_acc", "mae", "acc50", "acc100", "kendall_tau", "coverage",
                "reserve_ratio_total", "reserve_ratio_mean"} <= set(row)
        assert row["n"] == len(test)
    assert "TF-IDF" in report["verdict"]
    write_report(report, probs, test, ModelMeta.load(out).buckets, tmp_path / "ev")
    conf = json.loads((tmp_path / "ev" / "confusion.json").read_text())
    assert conf["format"] == "rlpredict.confusion/1" and np.sum(conf["matrix"]) == len(test)
    for f in ("report.md", "report.json", "confusion_model.png", "confusion_tfidf_logreg.png"):
        assert (tmp_path / "ev" / f).stat().st_size > 0


def test_cli_eval_json(trained, tmp_path):
    out, _ = trained
    res = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", DATA[0], "--baselines", "constant",
                                   "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["all"]) == {"model", "constant"}


def test_cli_train_bad_data_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 5}\n')
    res = CliRunner().invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "m"), "--max-steps", "1"])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output


def test_loss_helpers():
    t = soft_targets(5, 0.75)
    assert np.allclose(t.sum(1), 1) and t[2].argmax() == 2 and t[2, 1] == pytest.approx(t[2, 3])
    w = class_weights(np.array([0] * 90 + [1] * 10), 3, "balanced")
    assert w[1] > w[0] and (w[0] * 90 + w[1] * 10) == pytest.approx(100)
    batches = length_grouped_batches(list(range(100)), 8, __import__("random").Random(0), chunk=2)
    assert sorted(i for b in batches for i in b) == list(range(100))


def test_lora_run_saves_a_merged_plain_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = TrainConfig(data=DATA[:1], max_rows=16, max_steps=3, batch_size=8, max_length=32, method="lora",
                      lr=5e-4, loss="ce", class_weight="none", eval_rows=0, save_checkpoints=False)
    summary = train(cfg, tmp_path / "lora", progress=False)
    assert summary["config"]["method"] == "lora"
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora")
    assert model.config.num_labels == 10


def test_demo_trains_evaluates_and_names_the_final_model_folder(tmp_path) -> None:
    """`rlpredict demo` (`make demo-train`), in two steps: the model and the report land in
    ``--out``, and the report names the model where it is (was: the temporary folder, deleted)."""
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "2"])
    assert r.exit_code == 0, r.output
    ev = out / "model" / "eval"  # where export reads it (was: out/report, and the bundle had no matrix)
    report = json.loads((ev / "report.json").read_text())
    assert report["model"] == str(out / "model") and (out / "model").is_dir()
    assert f"- model: `{out / 'model'}`" in (ev / "report.md").read_text()
    assert ".part" not in (ev / "confusion.json").read_text()
    assert (ev / "confusion_model.png").stat().st_size > 0
    assert f"rlpredict export --model {out / 'model'}" in r.output.replace("\n", " ")
    # run again: refused without --force, replaced with it (was: "another run's output
    # (model/eval)" both times, and `make demo-train` failed the second time)
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1"])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1", "--force"])
    assert again.exit_code == 0, again.output
    assert (out / "model" / "eval" / "report.json").is_file() and not list(tmp_path.glob("*.old"))


def test_the_verdict_says_when_the_held_out_rows_cannot_tell_the_two_apart():
    """A firm "does NOT beat TF-IDF" on 14 held-out rows (a new user's run) is now qualified by a
    paired t-test on the rows' absolute errors: the question the MAE asks (a rank test backed the
    other side where a model loses a little on most rows and wins big on a few)."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.train.evaluate import MODEL, paired_p, scores, verdict

    scheme = BucketScheme.from_edges([100, 200, float("inf")]).fit([50] * 10 + [150] * 10 + [300] * 10)
    rng = np.random.default_rng(0)
    for n, model_good, says in ((14, 0.5, "cannot tell the two apart"), (400, 0.9, "over 400 rows, p < 1e-15")):
        rl = rng.choice([50.0, 150.0, 300.0], n)
        truth = np.eye(3)[scheme.bucket_of(rl)]
        noise = np.eye(3)[rng.integers(0, 3, n)]
        probs = {MODEL: np.where(rng.random((n, 1)) < model_good, truth, noise), "tfidf_logreg": noise}
        metrics = {m: scores(rl, p, scheme, 0.9) for m, p in probs.items()}
        line = verdict(metrics, paired_p(rl, probs, scheme, metrics), n)
        assert "the model beats TF-IDF" in line and says in line, line
    assert paired_p(rl, {MODEL: noise, "tfidf_logreg": noise}, scheme, metrics) == 1.0  # every row ties
    one = {m: scores(rl[:1], p[:1], scheme, 0.9) for m, p in probs.items()}
    assert verdict(one, None, 1).endswith("but 1 row cannot tell the two apart")
    # worse by 100 tokens on 60 rows, better by 4,850 on 5: the lower MAE; Wilcoxon's rank test
    # called TF-IDF's side significant (p 4e-8), the t-test on what the MAE compares does not
    wide = BucketScheme.from_edges([100, 200, 1000, float("inf")]).fit([50] * 9 + [150] * 9 + [500] * 9 + [5000] * 9)
    rl = np.full(65, 50.0)
    model = np.eye(4)[[1] * 60 + [0] * 5]
    tfidf = np.eye(4)[[0] * 60 + [3] * 5]
    probs = {MODEL: model, "tfidf_logreg": tfidf}
    metrics = {m: scores(rl, p, wide, 0.9) for m, p in probs.items()}
    p = paired_p(rl, probs, wide, metrics)
    assert metrics[MODEL]["mae"] < metrics["tfidf_logreg"]["mae"] and p >= 0.05
    assert "the model beats TF-IDF, but the 65 rows cannot tell the two apart" in verdict(metrics, p, 65)


def test_a_misspelt_recipe_key_gets_the_nearest_name():
    with pytest.raises(ValueError, match=r"r\.toml: unknown setting\(s\) max_step \(did you mean max_steps\?\); known:"):
        TrainConfig.from_dict({"max_step": 3}, source="r.toml")


def test_eval_keeps_the_trainings_pinned_ids_on_its_training_side(trained, tmp_path):
    """`a` and `b` hold one row; `a` hashes to the held-out side, `b` to the training side, so
    training joined them and trained both. `eval` given a log without `b` held `a` out: it scored
    rows the model trained on. The training records `a` (``pinned``) and eval keeps it apart."""
    import shutil

    from rlpredict.data import load_samples
    from rlpredict.splits import in_test, pin_key

    def rows(pid: str, n: int) -> list[dict]:
        return [{"prompt_id": pid, "prompt": f"{pid} question {i}", "response": "word " * (5 + 40 * i)}
                for i in range(n)]

    def write(path, rs):
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
        return str(path)

    log = [r for k in range(40) for r in rows(f"p{k}", 3)]
    probe = write(tmp_path / "probe.jsonl", log)
    group = {s.group: s for s in load_samples([probe])[0]}
    held = [g for g in group if in_test(g, 0.25, 0)]
    kept = [g for g in group if not in_test(g, 0.25, 0)]
    a, b = held[0], kept[0]
    shared = {"prompt": "the same question", "response": "the same answer " * 30}
    pid = {s.group: r["prompt_id"] for s, r in zip(load_samples([probe])[0], log, strict=True)}
    whole = write(tmp_path / "whole.jsonl", [*log, {"prompt_id": pid[a], **shared}, {"prompt_id": pid[b], **shared}])
    part = write(tmp_path / "part.jsonl", [r for r in log if r["prompt_id"] != pid[b]] + [{"prompt_id": pid[a], **shared}])
    prep = prepare(TrainConfig(data=[whole], test_frac=0.25, split_seed=0, split_rule="copies"))
    assert pin_key(a) in prep.pinned and a not in {s.group for s in prep.test}

    out, _ = trained
    model = tmp_path / "model"
    shutil.copytree(out, model)
    summary = json.loads((model / "training_summary.json").read_text())
    summary["data"]["split"] = {"rule": "copies", "test_frac": 0.25, "seed": 0, "pinned": prep.pinned}
    (model / "training_summary.json").write_text(json.dumps(summary))
    _, _, test = evaluate(model, [part], baselines=["constant"])
    assert a not in {s.group for s in test} and test
    del summary["data"]["split"]["pinned"]  # a model trained before pins were recorded
    (model / "training_summary.json").write_text(json.dumps(summary))
    assert a in {s.group for s in evaluate(model, [part], baselines=["constant"])[2]}


@pytest.mark.parametrize("where", ["buckets", "num_labels", "weights", "config"])
def test_eval_and_export_refuse_a_model_whose_labels_are_not_its_buckets_before_reading_data(trained, tmp_path,
                                                                                             where):
    """Was: ``eval`` predicted every row, then failed naming no file (or printed transformers'
    load report); now both refuse before the data is read (a bad row would be named first)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out, _ = trained
    model = tmp_path / "model"
    shutil.copytree(out, model)
    k = ModelMeta.load(out).buckets.n_buckets
    if where == "buckets":  # rlpredict.json says 2 buckets
        meta = json.loads((model / "rlpredict.json").read_text())
        meta["buckets"] = ModelMeta.load(out).buckets.from_spec([64, float("inf")]).fit([1] * 10 + [100] * 10).to_dict()
        (model / "rlpredict.json").write_text(json.dumps(meta))
        want = f"{model}: the model has {k} labels but rlpredict.json has 2 buckets"
    elif where == "num_labels":  # config.json says 2 labels by num_labels, not id2label
        cfg = json.loads((model / "config.json").read_text())
        for key in ("id2label", "label2id"):
            cfg.pop(key, None)
        (model / "config.json").write_text(json.dumps({**cfg, "num_labels": 2}))
        want = f"{model}: the model has 2 labels but rlpredict.json has {k} buckets"
    elif where == "config":  # no config.json (was: transformers' "Should have a model_type key")
        (model / "config.json").unlink()
        want = f"{model}: no config.json (the encoder's transformers config)"
    else:  # the weights' head has 2 rows
        weights = load_file(model / "model.safetensors")
        weights["classifier.weight"] = weights["classifier.weight"][:2]
        weights["classifier.bias"] = weights["classifier.bias"][:2]
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        want = f"{model}: the model's classifier (classifier.weight) has 2 labels but rlpredict.json has {k} buckets"
    unread = tmp_path / "unread.jsonl"
    unread.write_text("not json\n")
    for cmd in (["eval", "--model", str(model), "--data", str(unread), "--out", str(tmp_path / "r")],
                ["export", "--model", str(model), "--parity-data", str(unread), "--out", str(tmp_path / "b")]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2 and want in res.output and res.output.count("\n") == 1, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "unread.jsonl"]


def test_a_models_own_evaluation_is_replaced_with_it_by_train_force(trained, tmp_path):
    """``rlpredict eval``'s default report folder, MODEL/eval, is part of the model: ``train
    --force`` replaces both (was: "another run's output (MODEL/eval)", so train, eval, train
    failed; a reviewer's run of notebooks/train_on_your_logs.ipynb twice). A report elsewhere in
    the folder stays another run's output."""
    import shutil

    from rlpredict.outputs import OutputError, check_new_dir
    from rlpredict.train.model_meta import TRAIN_TOOL

    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    report, probs, test = evaluate(model, [DATA[0]], split="all", baselines=())
    scheme = ModelMeta.load(model).buckets
    write_report(report, probs, test, scheme, model / "eval")
    check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)  # may be replaced
    write_report(report, probs, test, scheme, model / "scores")
    with pytest.raises(OutputError, match="another run's output"):
        check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)
    shutil.rmtree(model / "scores")
    (model / "eval" / "mine.txt").write_text("a user's file")  # never replaced
    with pytest.raises(OutputError, match=r"mine\.txt"):
        check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)
    # a reviewer's: a folder a user makes there after the report, or a link, is the user's
    shutil.rmtree(model / "eval")
    (model / "eval").mkdir()
    (model / "eval" / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="eval"):
        check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)
    from rlpredict.outputs import mark_owned

    mark_owned(model, TRAIN_TOOL, ["eval"])  # as an earlier version recorded it: still the user's folder
    with pytest.raises(OutputError, match="eval"):
        check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)
    shutil.rmtree(model / "eval")
    elsewhere = tmp_path / "elsewhere"
    (model / "eval").symlink_to(elsewhere, target_is_directory=True)
    elsewhere.mkdir()
    write_report(report, probs, test, scheme, model / "eval")  # through the link, into the user's folder
    with pytest.raises(OutputError, match="eval"):
        check_new_dir(model, force=True, option="--out", only=TRAIN_TOOL)
    from rlpredict.outputs import PARTS
    from rlpredict.train.evaluate import EVAL_TOOL

    assert PARTS == {TRAIN_TOOL: {"eval": EVAL_TOOL}}  # the tools' names, in one place each


def test_eval_counts_the_rows_a_generator_model_saw_without_one(tiny_model_dir, tmp_path):
    """A model trained with the generator in its input, scored on rows that name none: counted
    on stderr and in the report (was: all predicted as 'model: unknown' without a word); an
    empty --baseline-data is named as such (was: "--split all without --baseline-data")."""
    import dataclasses
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    meta = ModelMeta.load(model)
    dataclasses.replace(meta, input=dataclasses.replace(meta.input, include_generator=True)).save(model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "rl_tokens": 10 + 40 * i,
                                        **({"model": "gpt"} if i % 2 else {})}) + "\n" for i in range(4)))
    (tmp_path / "empty.jsonl").write_text("")
    res = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(data), "--split", "all",
                                   "--baselines", "constant", "--baseline-data", str(tmp_path / "empty.jsonl"),
                                   "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["no_generator"] == 2
    err = " ".join(res.stderr.split())
    assert ("2 of the 4 scored samples have no generator ('generator' or 'model'): the model takes the served "
            "model's name, and predicted them as 'model: unknown'") in err
    assert "constant: --baseline-data holds no sample (read 0 rows" in err, err
    assert "have no generator" in (tmp_path / "r" / "report.md").read_text()
