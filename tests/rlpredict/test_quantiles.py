"""Calibrated quantiles (``conformal.py``, ``rlpredict calibrate``) and ``rlpredict drift``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import rlpredict.samples
from rlpredict.buckets import BucketScheme
from rlpredict.cli import app
from rlpredict.outputs import OWNER_FILE
from rlpredict.serve.bundle import BundleError, load_bundle
from rlpredict.serve.conformal import QuantileCalibration, _conformal_offset, column_name, pac_rank

SAMPLES = Path(rlpredict.samples.__file__).parent
DATA = [SAMPLES / "sharegpt_sample.jsonl.gz", SAMPLES / "alpaca_sample.jsonl.gz"]


def _synthetic(n: int, seed: int) -> tuple[BucketScheme, np.ndarray, np.ndarray]:
    """A scheme, model probabilities and lengths drawn from them (so the model is calibrated up
    to its bucket resolution), plus a systematic 1.3x under-prediction to correct."""
    rng = np.random.default_rng(seed)
    scheme = BucketScheme.default().fit(rng.lognormal(5.0, 1.0, 4000).astype(int) + 1)
    probs = rng.dirichlet(np.full(scheme.n_buckets, 0.3), size=n)
    q = rng.random(n)
    rl = np.array([scheme.predictive_quantile(probs[i:i + 1], q[i])[0] for i in range(n)]) * 1.3
    return scheme, probs, np.maximum(rl, 1).astype(int)


def test_offset_is_the_conformal_order_statistic() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert _conformal_offset(scores, 0.9) == 0.9  # ceil(10 x 0.9) = 9th smallest
    assert _conformal_offset(scores, 0.5) == 0.5  # ceil(10 x 0.5) = 5th
    assert math.isinf(_conformal_offset(scores, 0.95))  # ceil(10 x 0.95) = 10 > 9
    assert math.isinf(_conformal_offset(np.array([]), 0.5))


def test_pac_rank_against_the_binomial_tail() -> None:
    # Binomial(10, 0.5): P(X >= 9) = 11/1024 = 0.0107, P(X >= 8) = 56/1024 = 0.0547
    assert pac_rank(10, 0.5, 0.05) == 9
    assert pac_rank(10, 0.5, 0.06) == 8
    assert pac_rank(5, 0.99, 0.01) == 6  # impossible: n + 1


def test_the_pac_offset_takes_the_rank_the_bound_needs() -> None:
    """With independent scores the ``pac_rank``-th smallest bounds coverage (Beta(k, n + 1 - k)).
    Was: one rank more, and 22 prompts, enough for q 0.9 at confidence 0.9, were refused."""
    for n, q, delta in ((22, 0.9, 0.1), (45, 0.95, 0.1), (300, 0.9, 0.1), (300, 0.5, 0.05)):
        scores = np.arange(1.0, n + 1)
        k = pac_rank(n, q, delta)
        assert k <= n and _conformal_offset(scores, q, delta, n) == k
    assert math.isinf(_conformal_offset(np.arange(1.0, 22), 0.9, 0.1, 21))  # 21 are too few


def test_column_names() -> None:
    assert [column_name(q) for q in (0.5, 0.9, 0.975, 0.05)] == [
        "rl_q50_tokens", "rl_q90_tokens", "rl_q975_tokens", "rl_q05_tokens"]


def test_coverage_holds_on_exchangeable_data() -> None:
    scheme, probs, rl = _synthetic(6000, 0)
    covered = {0.5: [], 0.9: []}
    for seed in range(10):
        m = np.random.default_rng(seed).random(len(rl)) < 0.5
        cal = QuantileCalibration.fit(scheme, probs[m], rl[m], [0.5, 0.9], min_group=50)
        tok = cal.tokens(scheme, probs[~m], [0.5, 0.9])
        assert (tok[:, 1] >= tok[:, 0]).mean() > 0.95
        for j, q in enumerate((0.5, 0.9)):
            covered[q].append(np.mean(rl[~m] <= tok[:, j]))
        fit_tok = cal.tokens(scheme, probs[m], [0.9])[:, 0]
        assert np.mean(rl[m] <= fit_tok) >= 0.9  # on the calibration set itself: by construction
    for q, c in covered.items():
        assert np.mean(c) >= q - 0.01, (q, np.mean(c))  # the guarantee is in expectation
        assert np.mean(c) <= q + 0.03, (q, np.mean(c))  # and not wastefully above it
    pac = QuantileCalibration.fit(scheme, probs, rl, [0.9], confidence=0.9)
    plain = QuantileCalibration.fit(scheme, probs, rl, [0.9])
    assert (pac.log_offsets >= plain.log_offsets).all()


def test_small_buckets_share_an_offset_of_their_own() -> None:
    """Buckets under ``min_group`` are one rest group with its own conformal offset (was: the
    all-prompts offset, which left a small bucket whose lengths run longer under-covered)."""
    scheme, probs, rl = _synthetic(6000, 3)
    group = probs.argmax(axis=1)
    small = np.isin(group, [0, 1])  # make two buckets small and their responses 4.5x longer
    keep = ~small | (np.random.default_rng(3).random(len(rl)) < 0.08)
    probs, rl, group, small = probs[keep], rl[keep], group[keep], small[keep]
    rl = np.where(small, rl * 4.5, rl).astype(int)
    covered = []
    for seed in range(20):
        m = np.random.default_rng(seed).random(len(rl)) < 0.5
        cal = QuantileCalibration.fit(scheme, probs[m], rl[m], [0.9], min_group=100)
        assert all(cal.group_n[g] < 100 for g in (0, 1)) and cal.log_offsets[0, 0] == cal.log_offsets[0, 1]
        assert cal.log_offsets[0, 0] > cal.global_log_offsets[0]  # the rest's own, not the global one
        tok = cal.tokens(scheme, probs[~m], [0.9])[:, 0]
        covered.append(np.mean(rl[~m][small[~m]] <= tok[small[~m]]))
    assert np.mean(covered) >= 0.88, np.mean(covered)  # the guarantee, now over the rest group


def test_calibrated_levels_never_cross() -> None:
    """A rest group of one prompt has a q0.5 offset but no q0.9 one: it takes the all-prompts
    offsets for both (was: its own for q0.5, the global for q0.9, and q0.5 came out above q0.9
    for its buckets); and a higher level is never below a lower one's tokens."""
    scheme = BucketScheme.default()
    k = scheme.n_buckets
    rng = np.random.default_rng(0)
    group = np.r_[np.zeros(100, int), np.ones(100, int), [5]]
    probs = np.full((len(group), k), 0.01)
    probs[np.arange(len(group)), group] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    raw = scheme.predictive_quantile(probs, 0.9)
    rl = np.maximum(1, raw * np.exp(rng.normal(0, 0.5, len(group)))).astype(int)
    rl[-1] = 10**6  # the rest group's one prompt ran very long
    cal = QuantileCalibration.fit(scheme, probs, rl, [0.5, 0.9], min_group=100)
    np.testing.assert_array_equal(cal.log_offsets[:, 5], cal.global_log_offsets)
    test = rng.dirichlet(np.full(k, 0.3), size=500)
    tok = cal.tokens(scheme, test, [0.5, 0.9])
    assert (tok[:, 1] >= tok[:, 0]).all()


def test_the_fewest_calibration_prompts_a_quantile_takes() -> None:
    # rank ceil((n + 1) q) <= n from n = q / (1 - q): 9 prompts for q = 0.9 (was 11: 1 / (1 - q)
    # in floats is 10.000000000000002)
    scheme, probs, rl = _synthetic(20, 2)
    cal = QuantileCalibration.fit(scheme, probs[:9], rl[:9], [0.9])
    assert cal.n == 9 and math.isfinite(cal.global_log_offsets[0])
    with pytest.raises(ValueError, match="8 calibration prompts are too few for quantile 0.9 "
                                         r"\(need at least 9\)"):
        QuantileCalibration.fit(scheme, probs[:8], rl[:8], [0.9])
    scores = np.arange(99.0)
    assert _conformal_offset(scores, 0.55) == 54.0  # rank ceil(100 x 0.55) = 55, not 56


def test_calibration_round_trips_and_is_checked() -> None:
    scheme, probs, rl = _synthetic(800, 1)
    cal = QuantileCalibration.fit(scheme, probs, rl, [0.9, 0.5], source="x", confidence=0.8)
    d = json.loads(json.dumps(cal.to_dict()))
    back = QuantileCalibration.from_dict(d, scheme.n_buckets)
    assert back.quantiles == (0.5, 0.9) and back.confidence == 0.8
    np.testing.assert_allclose(back.tokens(scheme, probs, [0.9]), cal.tokens(scheme, probs, [0.9]), atol=1)
    bad = [("format", "other"), ("quantiles", [0.5, 1.5]), ("quantiles", [0.5, 0.5]),
           ("log_offsets", [[0.0]]), ("log_offsets", [[float("nan")] * scheme.n_buckets] * 2),
           ("global_log_offsets", [1e9, 0.0]), ("group_n", [-1] * scheme.n_buckets),
           ("min_group", 0), ("confidence", 1.0), ("source", 3)]
    for key, value in bad:
        with pytest.raises(ValueError, match=key.split("_")[0] if key != "format" else "format"):
            QuantileCalibration.from_dict({**d, key: value}, scheme.n_buckets)
    with pytest.raises(ValueError, match="not calibrated"):
        cal.tokens(scheme, probs, [0.75])
    with pytest.raises(ValueError, match="too few"):
        QuantileCalibration.fit(scheme, probs[:5], rl[:5], [0.9])


@pytest.fixture(scope="module")
def calibrated(bundle_fp32: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "calibrated"
    r = CliRunner().invoke(app, ["calibrate", "--model", str(bundle_fp32), "--data", str(DATA[0]),
                                 "--data", str(DATA[1]), "--split", "all", "--out", str(out),
                                 "--min-group", "20", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["calibration_samples"] + report["check_samples"] == 580
    assert {row["quantile"] for row in report["check"]["all"]} == {0.5, 0.9}
    # under 200 conversations or prompts in either, the figures are said to be loose (was: 5
    # check samples, silently; then counted in rows, so 800 turns of two conversations were many)
    few = min(report["calibration_groups"], report["check_groups"]) < 200
    assert ("note: few samples" in " ".join(r.stderr.split())) == few, r.stderr
    return out


def test_calibrate_writes_a_new_bundle(bundle_fp32: Path, calibrated: Path) -> None:
    b = load_bundle(calibrated)
    assert b.calibration is not None and b.calibration.quantiles == (0.5, 0.9)
    assert (calibrated / OWNER_FILE).is_file() and "Calibrated quantiles" in (calibrated / "MODEL_CARD.md").read_text()
    assert load_bundle(bundle_fp32).calibration is None  # the input bundle is untouched

    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(calibrated, threads=1)
    prompts = ["Write a poem about the sea", "What is 2+2?", "Explain TCP in detail"]
    preds = p.predict(prompts, quantiles=[0.9, 0.5])
    assert all(len(x.quantile_tokens) == 2 and x.quantile_tokens[0] >= x.quantile_tokens[1] >= 1 for x in preds)
    assert p.predict_one(prompts[0], quantiles=[0.9, 0.5]).quantile_tokens == preds[0].quantile_tokens
    assert p.predict(prompts)[0].quantile_tokens == ()
    with pytest.raises(ValueError, match="not calibrated"):
        p.predict(prompts, quantiles=[0.8])
    with pytest.raises(ValueError, match="no calibrated quantiles"):
        Predictor.load(bundle_fp32, threads=1).predict(prompts, quantiles=[0.9])


def test_calibrate_reads_the_logs_twice_keeping_no_text(bundle_fp32: Path, calibrated: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The split is made on text-free rows; the selected rows' text is read again, a chunk at a
    time (was: every sample's text held at once: 889 MB for a 580 MB log, 331 MB now). The same
    bundle with chunks of 7, and a log that changes between the reads is refused."""
    import dataclasses

    import rlpredict.serve.calibrate as cal
    from rlpredict.data import iter_samples

    base = ["calibrate", "--model", str(bundle_fp32), "--data", str(DATA[0]), "--data", str(DATA[1]),
            "--split", "all", "--min-group", "20"]
    monkeypatch.setattr(cal, "CHUNK", 7)
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c7")])
    assert r.exit_code == 0, r.output
    assert (json.loads((tmp_path / "c7" / "manifest.json").read_text())["calibration"]
            == json.loads((calibrated / "manifest.json").read_text())["calibration"])
    assert not hasattr(cal.Row, "messages") and not hasattr(cal.Row, "response")

    reads: list[int] = []
    # shorter, longer, reordered, and one row edited in place (its id kept: was not caught)
    changes = [lambda xs: xs[:-1], lambda xs: xs + xs[:1], lambda xs: xs[::-1],
               lambda xs: [dataclasses.replace(xs[0], response=f"{xs[0].response} and more"), *xs[1:]]]

    def rewritten(*args, **kwargs):  # the second read of each run finds the logs changed
        samples = list(iter_samples(*args, **kwargs))
        reads.append(len(samples))
        return iter(samples if len(reads) % 2 else changes[len(reads) // 2 - 1](samples))

    monkeypatch.setattr(cal, "iter_samples", rewritten)
    for k in range(len(changes)):
        r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / f"changed{k}")])
        assert r.exit_code == 2 and "changed while calibrate read it" in " ".join(r.output.split()), r.output
        assert not (tmp_path / f"changed{k}").exists()
    assert len(reads) == 2 * len(changes)
    if hasattr(os, "mkfifo"):  # a pipe cannot be read twice (was: the second read hung)
        fifo = tmp_path / "logs.jsonl"
        os.mkfifo(fifo)
        r = CliRunner().invoke(app, [*base[:3], "--data", str(fifo), "--split", "all", "--out", str(tmp_path / "f")])
        assert r.exit_code == 2 and "not a regular file (a pipe or a device)" in r.output, r.output


def test_calibrate_refuses_bad_options_and_collisions(bundle_fp32: Path, calibrated: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke
    base = ["calibrate", "--model", str(bundle_fp32), "--data", str(DATA[1]), "--split", "all"]
    for extra in (["--quantiles", "0.5,abc"], ["--quantiles", "0.9,1.2"], ["--check-frac", "0"],
                  # were rounded to 6 decimals after the check: 1.0 (refused late, unnamed), 0.955556
                  ["--quantiles", "0.9999996"], ["--quantiles", "0.95555555"], ["--quantiles", "1e-300"]):
        r = run(app, [*base, "--out", str(tmp_path / "x"), *extra])
        assert r.exit_code == 2 and extra[0] in r.output, r.output
    r = run(app, [*base, "--out", str(bundle_fp32)])  # the output would be the input bundle
    assert r.exit_code == 2 and "input" in r.output
    r = run(app, [*base, "--out", str(calibrated)])  # exists, no --force
    assert r.exit_code == 2 and "--force" in r.output
    r = run(app, ["calibrate", "--model", str(bundle_fp32), "--data", str(DATA[1]), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "split" in r.output  # the tiny bundle records no training split
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_corrupt_calibration_is_refused_at_load(calibrated: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(calibrated, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["calibration"]["log_offsets"][0][0] = "big"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"calibration\.log_offsets"):
        load_bundle(copy)


def test_drift_verdict_and_exit_code(calibrated: Path) -> None:
    run = CliRunner().invoke
    r = run(app, ["drift", "--model", str(calibrated), "--data", str(DATA[0]), "--data", str(DATA[1]), "--json"])
    assert r.exit_code in (0, 3), r.output
    report = json.loads(r.stdout)
    assert (r.exit_code == 3) == (report["verdict"] == "drift")
    names = [g["group"] for g in report["groups"]]
    assert names[0] == "all" and any(n.startswith("source=") for n in names)
    assert set(report["groups"][0]["coverage"]) == {"0.5", "0.9"}
    loose = run(app, ["drift", "--model", str(calibrated), "--data", str(DATA[1]),
                      "--max-tv", "1", "--tolerance", "0.4", "--min-rows", "100"])
    assert loose.exit_code == 0, loose.output
    # bounds no log could break judge nothing: not "ok" (was: exit 0)
    none = run(app, ["drift", "--model", str(calibrated), "--data", str(DATA[1]),
                     "--max-tv", "1", "--tolerance", "1", "--min-rows", "100"])
    assert none.exit_code == 4 and "no bound could break at --max-tv 1, --tolerance 1" in none.output
    # 180 rows, fewer than --min-rows: nothing decides, and that is not "ok" (was: exit 0
    # whatever the logs held); the bounds the small groups broke are listed
    few = run(app, ["drift", "--model", str(calibrated), "--data", str(DATA[1]), "--max-tv", "0.0001", "--json"])
    assert few.exit_code == 4, few.output
    report = json.loads(few.stdout)
    assert report["verdict"] == "too few rows" and not any(g["decides"] for g in report["groups"])
    assert report["reasons"][0] == "180 rows, fewer than --min-rows 200: no group decides"
    assert any(x.startswith("generator=alpaca-7b (small): predicted distribution off by TV") for x in report["reasons"])
    strict = run(app, ["drift", "--model", str(calibrated), "--data", str(DATA[1]),
                       "--max-tv", "0.0001", "--min-rows", "1"])
    assert strict.exit_code == 3 and "drift" in strict.output
    bad = run(app, ["drift", "--model", str(calibrated), "--data", str(calibrated / "nope.jsonl")])
    assert bad.exit_code == 2


def test_drift_on_logs_no_bound_could_judge_is_too_few_rows(calibrated: Path, tmp_path: Path) -> None:
    """300 turns of one conversation, every response far past every quantile: one independent
    draw, so no TV nor coverage bound of all rows could break; that is not "ok" (was: "ok",
    exit 0; a reviewer's find). A --tolerance at q is named as the reason its coverage is not
    judged (was: "too few conversations")."""
    log = tmp_path / "one_conversation.jsonl"
    log.write_text("".join(json.dumps({"conversation_id": "c", "prompt": f"question {i}",
                                       "response": "word " * (3000 + i)}) + "\n" for i in range(300)))
    r = CliRunner().invoke(app, ["drift", "--model", str(calibrated), "--data", str(log), "--json"])
    assert r.exit_code == 4, r.output
    report = json.loads(r.stdout)
    assert report["verdict"] == "too few rows" and report["groups"][0]["decides"]
    assert report["reasons"][0] == ("300 rows are 1 independent draw(s) by their conversations and prompts: no bound "
                                    "could break at --max-tv 0.15, --tolerance 0.02")
    r = CliRunner().invoke(app, ["drift", "--model", str(calibrated), "--data", str(DATA[0]), "--min-rows", "100",
                                 "--tolerance", "0.6", "--json"])
    notes = " ".join(json.loads(r.stdout)["notes"])
    assert "q0.5: --tolerance 0.6 is not below q: its coverage is not judged" in notes and "q0.9: --tolerance" not in notes


def test_sampling_noise_takes_float32_probability_sums() -> None:
    """A model's float32 probabilities summed per bucket, the last bucket empty (as a stacked
    bundle gives them): summed in float32 they normalise to past 1, which numpy's multinomial
    refuses."""
    from rlpredict.serve.drift import sampling_tv

    ref = np.array([38.90222, 31.288351, 30.31988, 33.30666, 62.010757, 61.550026, 26.705444,
                    14.763485, 1.1531863, 0.0], dtype=np.float32)
    assert 0 < sampling_tv(ref, 300) < 0.2


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_annotate_adds_calibrated_quantile_columns(calibrated: Path, tmp_path: Path, suffix: str) -> None:
    from rlpredict.serve.annotate import annotate_file
    from rlpredict.serve.runtime import Predictor

    prompts = ["Write a poem about the sea", "What is 2+2?", "Explain TCP in detail"]
    src = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps({"prompt": t, "k": i}) + "\n" for i, t in enumerate(prompts)))
    elif suffix == ".csv":
        src.write_text("prompt,k\n" + "".join(f"{t},{i}\n" for i, t in enumerate(prompts)))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": prompts, "k": list(range(3))}), src)
    p = Predictor.load(calibrated, threads=1)
    out = tmp_path / f"out{suffix}"
    annotate_file(p, src, out, quantiles=[0.5, 0.9])
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    elif suffix == ".csv":
        import csv

        rows = [{k: int(v) if k.startswith("rl_") else v for k, v in r.items()} for r in csv.DictReader(out.open())]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    want = p.predict(prompts, quantiles=[0.5, 0.9])
    assert [(r["rl_q50_tokens"], r["rl_q90_tokens"]) for r in rows] == [w.quantile_tokens for w in want]
    assert [r["rl_bucket"] for r in rows] == [w.bucket for w in want]
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / f"o2{suffix}"),
                                 "--model", str(calibrated), "--quantiles", "0.75"])
    assert r.exit_code == 2 and "not calibrated" in r.output and not (tmp_path / f"o2{suffix}").exists()
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / f"o3{suffix}"),
                                 "--quantiles", "0.5", "--engine", "ray"])
    assert r.exit_code == 2


def test_label_shift_alone_is_a_note_not_drift() -> None:
    """One model's logs differ from a bundle's mix of many by design (a shipped bundle's own
    held-out rows of two generators were called drift): only predictions that no longer fit
    the responses, or a quantile that no longer covers, decide."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.serve.drift import DriftBounds, group_report

    scheme = BucketScheme.from_edges([100, 200, float("inf")])
    rl = np.array([50.0] * 300 + [150.0] * 100)  # mostly short
    probs = np.array([[0.75, 0.25, 0.0]] * 400)  # ... and predicted so
    ref = np.array([10.0, 10.0, 80.0])  # the bundle's data: mostly long
    row = group_report("generator=m", probs, rl, None, [], ref, scheme, DriftBounds())
    assert not row["problems"] and row["notes"][0].startswith("response lengths shifted by TV 0.800")
    row = group_report("generator=m", np.array([[0.1, 0.1, 0.8]] * 400), rl, None, [], ref, scheme, DriftBounds())
    assert row["problems"][0].startswith("predicted distribution off by TV")  # this one is drift


def test_coverage_noise_counts_conversations_and_the_calibration_not_rows() -> None:
    """One prompt answered by 40 generators is not 40 independent coverage draws. Was: the floor
    counted rows alone, and ``drift`` said "drift" on the shipped bundle's own check rows (and on
    42% of exchangeable halvings of its held-out rows, a reviewer's simulation)."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.serve import drift
    from rlpredict.serve.drift import DriftBounds, coverage_se, group_report

    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(31), 40)  # 31 prompts x 40 generators
    covered = np.repeat(rng.random(31) < 0.45, 40).astype(float)  # each prompt's answers alike
    se_rows, se_prompts = coverage_se(covered, None, 0.5, 0), coverage_se(covered, prompts, 0.5, 0)
    assert se_rows == pytest.approx(math.sqrt(0.25 / len(covered)))
    assert 0.8 * math.sqrt(0.25 / 31) < se_prompts < 1.2 * math.sqrt(0.25 / 31)
    alone = coverage_se(covered, np.arange(len(covered)), 0.5, 0)  # every row its own conversation
    assert alone == pytest.approx(se_rows, rel=0.05)
    assert coverage_se(covered, None, 0.5, 400) == pytest.approx(math.sqrt(0.25 / len(covered) + 0.25 / 400))

    scheme = BucketScheme.from_edges([100, 200, float("inf")])
    rl = np.where(covered > 0, 50.0, 150.0)
    pred_q = np.full((len(rl), 1), 100)  # covers the short ones
    probs = np.array([[0.45, 0.55, 0.0]] * len(rl))
    share = covered.mean()
    assert 0.5 - 0.02 - 3 * se_rows > share > 0.5 - 0.02 - 3 * se_prompts  # the case at hand
    as_rows = group_report("all", probs, rl, pred_q, [0.5], None, scheme, DriftBounds())
    by_prompt = group_report("all", probs, rl, pred_q, [0.5], None, scheme, DriftBounds(), prompts, 0)
    assert as_rows["problems"] and not by_prompt["problems"]
    shifted = group_report("all", probs, rl * 3, pred_q, [0.5], None, scheme, DriftBounds(), prompts, 0)
    assert "q0.5 covers 0.000" in shifted["problems"][-1]  # a real shift still is drift
    # one conversation (a 300-turn agent session) says nothing of the next: not judged, said
    one = group_report("all", probs[:300], rl[:300], pred_q[:300], [0.5], None, scheme, DriftBounds(),
                       np.zeros(300), 0)
    assert not one["problems"] and one["coverage"]["0.5"]["floor"] is None and "too few to judge" in one["notes"][0]
    # few conversations: Student's t quantile at the normal's tail (scipy's figures)
    assert drift.few_clusters_z(3.0, None) == 3.0
    for groups, t in ((2, 235.8015), (3, 19.2067), (5, 6.6202), (31, 3.2703), (101, 3.0768)):
        assert drift.few_clusters_z(3.0, np.arange(groups)) == pytest.approx(t, abs=1e-4)
    two = group_report("all", probs[:80], rl[:80], pred_q[:80], [0.5], None, scheme, DriftBounds(),
                       np.repeat([0, 1], 40), 0)  # two conversations: no share could break it, said
    assert two["coverage"]["0.5"]["floor"] is None and "2 conversation(s)" in two["notes"][0]


def test_tv_noise_counts_conversations_not_rows() -> None:
    """The TV bounds count a group's rows in independent draws (``effective_rows``), as the
    coverage's error does: two conversations of 150 turns each, every turn of one in the same
    bucket, are two draws, not 300 (was: "drift", exit 3, on such a log while its coverage was
    not judged). A shift common to every row is still drift."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.serve.drift import DriftBounds, effective_rows, group_report

    scheme = BucketScheme.from_edges([100, 200, float("inf")])
    probs = np.array([[0.45, 0.45, 0.1]] * 300)
    rl = np.array([50.0] * 150 + [150.0] * 150)  # each conversation in one bucket
    conv = np.repeat([0, 1], 150)
    b = scheme.bucket_of(rl)
    assert effective_rows(b, probs, None) == 300 and effective_rows(b, probs, np.zeros(300)) == 1
    assert effective_rows(b, probs, conv) < 3
    rows = group_report("all", probs, rl, None, [], None, scheme, DriftBounds(max_tv=0.0))
    convs = group_report("all", probs, rl, None, [], None, scheme, DriftBounds(max_tv=0.0), conv, 0)
    assert rows["problems"] and rows["tv_draws"] == 300
    assert not convs["problems"] and convs["tv_draws"] <= 2
    # independent rows, however grouped, stay about as many draws
    rng = np.random.default_rng(1)
    draws = rng.choice(3, 2000, p=[0.45, 0.45, 0.1])
    flat = np.array([[0.45, 0.45, 0.1]] * 2000)
    assert effective_rows(draws, flat, np.repeat(np.arange(500), 4)) > 1700
    assert effective_rows(draws, flat, np.arange(2000)) == 2000  # each its own conversation: every row
    # two conversations that both happen to sit mostly in one bucket (90% of their turns; a
    # reviewer's case): still about two draws (was: 119 with the residuals centred, and drift)
    for own in ([0, 0], [0, 1], [1, 1]):
        b = np.concatenate([np.where(rng.random(150) < 0.9, k, rng.choice(3, 150, p=[0.45, 0.45, 0.1])) for k in own])
        row = group_report("all", probs, np.array([50.0, 150.0, 250.0])[b], None, [], None, scheme, DriftBounds(),
                           conv, 0)
        assert row["tv_draws"] <= 3 and not row["problems"], own
    # a shift common to every row of 500 conversations: drift, at no fewer draws than conversations
    shifted = group_report("all", np.array([[0.1, 0.1, 0.8]] * 2000), np.array([50.0, 150.0, 250.0])[draws], None, [],
                           None, scheme, DriftBounds(), np.repeat(np.arange(500), 4), 0)
    assert shifted["problems"] and shifted["tv_draws"] >= 500
    # one conversation: no distance could break the bound, said
    one = group_report("all", probs[:150], rl[:150], None, [], None, scheme, DriftBounds(), np.zeros(150), 0)
    assert not one["problems"] and one["tv_draws"] == 1 and "too few for any distance" in one["notes"][0]
    loose = group_report("all", probs[:150], rl[:150], None, [], None, scheme, DriftBounds(max_tv=1.0), np.zeros(150), 0)
    assert not loose["notes"]  # no distance breaks a bound of 1 however the rows are counted: nothing to say


def test_calibrate_splits_fit_and_check_by_the_bundles_rule(bundle_fp32: Path, tmp_path: Path, monkeypatch) -> None:
    """A bundle split by ``copies`` is calibrated on its ``copies`` held-out side, and that side
    is cut into fit and check parts by the same rule: cut by id, copies of one row landed on
    both and flattered the check (215 of 4,220 ShareGPT check rows)."""
    import rlpredict.serve.calibrate as cal
    from rlpredict.serve.bundle import write_manifest

    b = tmp_path / "b"
    shutil.copytree(bundle_fp32, b)
    m = json.loads((b / "manifest.json").read_text())
    m["training_split"] = {"test_frac": 0.5, "seed": 0, "rule": "copies"}
    m["evaluation"] = {"split": {"mode": "all", "test_frac": 0.5, "seed": 0}}  # eval --split all: no rule
    m["files"] = list(m["files"])
    write_manifest(b, m)
    rules: list[str] = []
    split = cal.split_by_group

    def spy(items, frac, seed, rule="id", pinned=()):
        rules.append(rule)
        return split(items, frac, seed, rule, pinned)

    monkeypatch.setattr(cal, "split_by_group", spy)
    for mode in ("test", "all"):
        r = CliRunner().invoke(app, ["calibrate", "--model", str(b), "--data", str(DATA[0]), "--data", str(DATA[1]),
                                     "--split", mode, "--out", str(tmp_path / mode), "--min-group", "20"])
        assert r.exit_code == 0, r.output
    assert rules == ["copies"] * 3  # held-out side (test), fit/check (test), fit/check (all)


def test_drift_reads_in_chunks_and_says_what_small_groups_break(calibrated: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from rlpredict.serve import drift
    from rlpredict.serve.drift import DriftBounds, drift_report

    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"prompt": f"Say hi to {i}", "response": "word " * 1500,
                                       "generator": "new-model"}) + "\n" for i in range(30)))
    bounds = DriftBounds(min_rows=100)
    whole = drift_report(calibrated, [DATA[1], new], bounds=bounds)
    monkeypatch.setattr(drift, "CHUNK", 7)  # 30 + 180 rows in 31 chunks: the same report
    assert drift_report(calibrated, [DATA[1], new], bounds=bounds) == whole
    small = [n for n in whole["notes"] if n.startswith("generator=new-model (30 rows, fewer than --min-rows")]
    assert len(small) == 1 and "q0.9 covers 0.000" in small[0]  # (was: not said when the total decided)
    uncalibrated = tmp_path / "u"
    shutil.copytree(calibrated, uncalibrated)
    m = json.loads((uncalibrated / "manifest.json").read_text())
    del m["calibration"]
    (uncalibrated / "manifest.json").write_text(json.dumps(m))
    report = drift_report(uncalibrated, [DATA[1]], bounds=bounds)
    assert report["calibrated_quantiles"] == [] and any("coverage is not checked" in n for n in report["notes"])


def test_calibrate_refuses_an_out_inside_its_data_and_empty_levels(bundle_fp32: Path, tmp_path: Path) -> None:
    """A calibrated bundle written inside a --data folder became data of the next run (its
    manifest read as a bad row), an empty level in --quantiles was dropped, and --confidence
    said "(0, 1]" for 0 but "(0, 1)" for 1."""
    data = tmp_path / "logs"
    data.mkdir()
    shutil.copy(DATA[0], data)
    base = ["calibrate", "--model", str(bundle_fp32), "--data", str(data), "--split", "all"]
    for extra, says in ((["--out", str(data / "cal")], "lies inside the input"),
                        (["--out", str(tmp_path / "c"), "--quantiles", "0.5,,0.9"], "an empty level"),
                        (["--out", str(tmp_path / "c"), "--confidence", "0"], "must be in (0, 1), got 0")):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    assert [p.name for p in data.iterdir()] == [DATA[0].name] and not (tmp_path / "c").exists()


def test_the_check_division_is_salted_from_the_training_seed() -> None:
    """Was: salted from ``--seed`` alone (0 when left out, as the docs advise), so a bundle
    trained with split seed 7919 (= the salt) put every held-out group on the check side."""
    from types import SimpleNamespace

    from rlpredict.serve.calibrate import divide, held_out

    samples = [SimpleNamespace(group=f"g{i}", id=f"g{i}") for i in range(4000)]
    for seed in (0, 7919):
        manifest = {"training_split": {"test_frac": 0.2, "seed": seed, "rule": "id"}}
        pool, _ = held_out(samples, manifest, "test", None, None)
        fit, check = divide(pool, manifest, "test", None, 0.5)
        assert 0.4 < len(fit) / len(pool) < 0.6, seed
        assert (fit, check) == divide(pool, manifest, "test", seed, 0.5)  # --seed given or not: one division
    with pytest.raises(ValueError, match=r"in 1 conversations or prompts: each part needs whole ones"):
        divide([SimpleNamespace(group="g", id=f"r{i}") for i in range(9)], {}, "all", None, 0.5, ["x.jsonl"])


def test_calibrate_keeps_the_trainings_pinned_ids_off_its_held_out_side() -> None:
    """A bundle's ``training_split.pinned`` (ids the training's join trained, though their hash
    holds them out) keeps them out of the calibration pool, as out of ``eval``'s test side."""
    from types import SimpleNamespace

    from rlpredict.serve.calibrate import held_out
    from rlpredict.splits import in_test, pin_key

    samples = [SimpleNamespace(group=f"g{i}", id=f"g{i}") for i in range(400)]
    held = [s.group for s in samples if in_test(s.group, 0.2, 0)]
    split = {"test_frac": 0.2, "seed": 0, "rule": "id"}
    pool, _ = held_out(samples, {"training_split": split}, "test", None, None)
    assert [s.group for s in pool] == held
    pinned = sorted(pin_key(g) for g in held[:3])
    pool, _ = held_out(samples, {"training_split": {**split, "pinned": pinned}}, "test", None, None)
    assert [s.group for s in pool] == held[3:]


def test_a_calibration_the_loader_would_refuse_is_not_written() -> None:
    """Token counts ~2^52 gave log offsets past 20: ``calibrate`` wrote the bundle, exit 0, and
    every later load refused it. ``fit`` refuses now, naming the count field."""
    scheme, probs, rl = _synthetic(400, 0)
    with pytest.raises(ValueError, match=r"x the model's quantiles .*check the token-count field"):
        QuantileCalibration.fit(scheme, probs, np.full(len(rl), 2**52), [0.5, 0.9])


def test_drift_judges_coverage_by_the_offset_each_row_took() -> None:
    """The calibration's own scatter counts the prompts of the offset each row's quantile took,
    times the logs' design effect (an audit: a log predicted into one bucket with an offset of
    its own from ~130 prompts was judged as if by all 4,100, drift on 13% of undrifted
    5,000-row logs); a source's or a generator's coverage is a note (calibration holds q over
    its whole mix), and a drift every row shares no longer hides in the TV's design effect."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.serve.conformal import QuantileCalibration
    from rlpredict.serve.drift import DriftBounds, coverage_se, effective_rows, group_report

    cal = QuantileCalibration((0.5,), np.zeros((1, 10)), np.zeros(1), (254, 46, 699, 245, 93, 2110, 158, 494, 0, 1), 100)
    index, counts = cal.offset_groups()
    assert index.tolist() == [0, 6, 1, 2, 6, 3, 4, 5, 6, 6] and counts.tolist() == [254, 699, 245, 2110, 158, 494, 140]
    small = QuantileCalibration((0.5,), np.zeros((1, 3)), np.zeros(1), (50, 40, 0), 100)
    assert small.offset_groups()[1].tolist() == [90]  # no bucket of its own: the global offset
    covered = (np.arange(5000) % 2).astype(float)
    alone = coverage_se(covered, None, 0.5, (np.zeros(5000, dtype=int), counts[[0]]))
    assert alone == pytest.approx(math.sqrt(0.25 / 5000 + 0.25 / 254))  # that offset's 254, not 4,100
    half = coverage_se(covered, None, 0.5, (np.repeat([0, 3], 2500), counts))
    assert half == pytest.approx(math.sqrt(0.25 / 5000 + 0.25 * (0.25 / 254 + 0.25 / 2110)))
    pairs = np.repeat(np.arange(2500), 2)  # each conversation's two turns alike: design effect 2
    assert coverage_se(covered[pairs], pairs, 0.5, 4100) == pytest.approx(math.sqrt(2 * (0.25 / 5000 + 0.25 / 4100)),
                                                                         rel=0.01)

    scheme = BucketScheme.from_edges([100, 200, float("inf")])
    rng = np.random.default_rng(3)
    b = rng.choice(3, 400, p=[0.4, 0.4, 0.2])
    rl, probs = np.array([50.0, 150.0, 250.0])[b], np.array([[0.4, 0.4, 0.2]] * 400)
    pred_q = np.full((400, 1), 10)  # covers nothing
    row = group_report("generator=g", probs, rl, pred_q, [0.5], None, scheme, DriftBounds(), coverage_decides=False)
    assert not row["problems"] and row["shortfalls"] == [row["notes"][-1]] and "whole mix" in row["notes"][-1]
    assert group_report("all", probs, rl, pred_q, [0.5], None, scheme, DriftBounds())["problems"]
    # a drift every row shares: 60 conversations of 16 turns, each turn drawn alone (no
    # correlation but the drift's), are about as many draws as rows (were: a fifth of them)
    conv = np.repeat(np.arange(60), 16)
    drawn = rng.choice(3, 960, p=[0.7, 0.2, 0.1])
    flat = np.array([[0.4, 0.4, 0.2]] * 960)
    assert effective_rows(drawn, flat, conv) > 600
    assert group_report("all", flat, np.array([50.0, 150.0, 250.0])[drawn], None, [], None, scheme, DriftBounds(),
                        conv)["problems"]
