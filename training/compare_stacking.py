"""Does combining the shipped encoder with TF-IDF beat both, on every source? (issue 15, item 2)

    python training/compare_stacking.py --config training/rl-minilm-l6-llama3.toml \\
        --bundle models/rl-minilm-l6-llama3 --out runs/stacking

Scores, on exactly the held-out rows of docs/predictor.md's results tables (the recipe's group
split, ``rlpredict.splits``; ShareGPT 6,434 rows, AlpacaEval 2,520), per source and pooled, with
``rlpredict.train.metrics.rl_metrics``:

1. the shipped bundle alone (int8 ONNX through ``rlpredict.serve.runtime.Predictor``; the docs' row is
   the torch fp32 model's, so small differences are expected);
2. TF-IDF + logistic regression alone (``rlpredict.train.baselines.TfidfLogistic`` trained on the whole
   training side, as ``rlpredict eval`` does);
3. probability mixes of the two: linear ``w*p_enc + (1-w)*p_tfidf`` and geometric
   ``p_enc^w * p_tfidf^(1-w)`` (renormalised), ``w`` on a grid of 0.05;
4. stackers: multinomial logistic regression on ``[log p_enc, log p_tfidf]`` (and with a source
   indicator), ``C`` picked by grouped 5-fold cross-validation;
5. (``--ridge``) stacker 4 plus the TF-IDF ridge's log-RL prediction as a feature.

``w`` and ``C`` are fitted on a **stacking-fit set**, never on test rows: training-side rows the
encoder was not trained on (the complement of ``rlpredict.train.trainer.prepare``'s seeded subsample of
``max_rows_per_source`` rows per source), whole groups (conversations / prompts) at a time,
groups the encoder saw least first (up to ``--stack-rows`` rows per source). ShareGPT groups the
encoder never saw exist; every AlpacaEval prompt has some of its 40 generators' rows in the
encoder's subsample, so there the stacking-fit rows are unseen (prompt, generator) pairs of
prompts the encoder saw with other generators (the report gives the counts, and both models'
metrics on the stacking-fit set). TF-IDF probabilities for the stacking-fit rows are out-of-fold:
the groups are split into ``--folds`` folds, and each fold is predicted by a ``TfidfLogistic``
trained on the whole training side minus that fold's groups (``cross_val_predict`` itself needs
the predicted rows to partition the training rows, which they do not here).

Fixed rules, decided before looking at any test number and applied once for all sources: ``w``
minimises the mean negative log-likelihood of the true bucket on the pooled stacking-fit set
(the "w by MAE" rows minimise its MAE instead, reported as separate variants); ``C`` minimises
the grouped cross-validated NLL. Also measured: the TF-IDF model's vocabulary and coefficient
sizes (what a bundle would ship) and the latency of one prompt's TF-IDF transform +
``predict_proba`` (median over ``--timing-prompts`` prompts, one at a time).

Writes ``report.md``, ``results.json`` and ``cache.pkl`` (the probabilities and the fitted TF-IDF
model; ``--reuse`` skips their recomputation when the rows match) to ``--out`` (``runs/`` is
git-ignored) and prints the report.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlpredict.cli_boundary import ScriptParser, arg_number, arg_path, run_script
from rlpredict.outputs import check_paths, resolved, work_folder, write_owned
from rlpredict.serve.runtime import Predictor, usable_cores
from rlpredict.train.baselines import TfidfLogistic
from rlpredict.train.config import TrainConfig
from rlpredict.train.evaluate import baseline_texts, encoder_texts, markdown_table
from rlpredict.train.metrics import rl_metrics
from rlpredict.train.stack import (
    Stacker,
    check_encoder_rows,
    check_recipe,
    check_stacking_rows,
    encoder_probs,
    features,
    group_folds,
    load_split,
    nll,
    normalise,
    pick_c,
    ridge_model,
    stacking_rows,
    tfidf_oof,
)

W_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
T0 = time.perf_counter()
TOOL = "training/compare_stacking.py"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- mixes (the stacker and its helpers live in rlpredict.train.stack) ----------------------------
def linear_mix(pe: np.ndarray, pt: np.ndarray, w: float) -> np.ndarray:
    return normalise(w * pe + (1 - w) * pt)


def geometric_mix(pe: np.ndarray, pt: np.ndarray, w: float) -> np.ndarray:
    z = w * np.log(normalise(pe)) + (1 - w) * np.log(normalise(pt))
    z -= z.max(axis=1, keepdims=True)
    return normalise(np.exp(z))


def stack_features(pe: np.ndarray, pt: np.ndarray, src: np.ndarray, sources: Sequence[str],
                   indicator: bool, mu: np.ndarray | None) -> np.ndarray:
    """``rlpredict.train.stack.features`` plus the research variants' columns (source one-hot,
    the TF-IDF ridge's log-RL)."""
    extra = []
    if indicator:
        extra.append(np.stack([(src == s).astype(float) for s in sources[1:]], axis=1))
    if mu is not None:
        extra.append(mu[:, None])
    return features(pe, pt, *extra)


# ---- timing and size -----------------------------------------------------------------------------
def per_prompt_ms(model: TfidfLogistic, texts: Sequence[str], pred: Predictor,
                  enc_texts: Sequence[str]) -> dict[str, float]:
    """Median (and p90) milliseconds for one prompt at a time: TF-IDF transform, logreg
    predict_proba, both (the pipeline), and the encoder's lone-prompt path for comparison."""
    vec, lr = model.model[0], model.model[-1]
    tr_ms, pp_ms, both_ms, enc_ms = [], [], [], []
    for t, et in zip(texts, enc_texts, strict=True):
        a = time.perf_counter()
        x = vec.transform([t])
        b = time.perf_counter()
        lr.predict_proba(x)
        c = time.perf_counter()
        model.predict_proba([t])
        d = time.perf_counter()
        pred.from_logits(pred._run(pred._lone, pred.encoder.encode(et))[None])
        e = time.perf_counter()
        tr_ms.append((b - a) * 1e3)
        pp_ms.append((c - b) * 1e3)
        both_ms.append((d - c) * 1e3)
        enc_ms.append((e - d) * 1e3)

    def q(v: list[float], p: float) -> float:
        return float(np.quantile(v, p))

    return {"n": len(texts), "transform_p50": statistics.median(tr_ms), "predict_proba_p50": statistics.median(pp_ms),
            "tfidf_logreg_p50": statistics.median(both_ms), "tfidf_logreg_p90": q(both_ms, 0.9),
            "encoder_p50": statistics.median(enc_ms), "encoder_p90": q(enc_ms, 0.9)}


def model_size(model: TfidfLogistic) -> dict[str, Any]:
    vec, lr = model.model[0], model.model[-1]
    vocab_chars = sum(len(t) for t in vec.vocabulary_)
    return {"vocabulary": len(vec.vocabulary_), "vocabulary_chars": vocab_chars,
            "idf_shape": list(vec.idf_.shape), "coef_shape": list(lr.coef_.shape),
            "intercept_shape": list(lr.intercept_.shape),
            "coef_nonzero": int(np.count_nonzero(lr.coef_)),
            "float32_bytes_coef_idf": int(4 * (lr.coef_.size + vec.idf_.size))}


# ---- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=arg_path, required=True, help="the predictor's recipe (TOML)")
    ap.add_argument("--bundle", type=arg_path, required=True, help="the shipped bundle folder")
    ap.add_argument("--out", type=arg_path, required=True, help="output folder (report.md, results.json)")
    ap.add_argument("--stack-rows", type=arg_number(int, 10), default=4000, help="stacking-fit rows per source, at most")
    ap.add_argument("--folds", type=arg_number(int, 2), default=3, help="group folds for the TF-IDF out-of-fold probabilities")
    ap.add_argument("--ridge", action="store_true", help="also the stacker with the TF-IDF ridge prediction")
    ap.add_argument("--timing-prompts", type=arg_number(int, 1), default=200)
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="stacking-fit groups' order and folds")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse OUT/cache.pkl (probabilities, fitted TF-IDF) when its rows match")
    ap.add_argument("--threads", type=arg_number(int, 1, usable_cores()), default=None,
                    help="encoder threads, at most the usable cores (default: all of them)")
    args = ap.parse_args(argv)
    check_paths([args.config, args.bundle], [("--out", args.out)], apart=[args.bundle])
    out = work_folder(args.out, tool=TOOL, option="--out")  # a new folder or this script's (its cache.pkl)

    cfg = TrainConfig.load(args.config)
    pred = Predictor.load(args.bundle, threads=args.threads)
    spec = pred.input_spec
    check_recipe(pred, cfg, args.bundle)  # the split and RL tokenizer the bundle recorded, as `rlpredict stack`
    train_side, enc_train, test, scheme = load_split(cfg)
    check_encoder_rows(pred, enc_train, args.bundle, log)  # (was: unchecked; "unseen" rows it had trained on)
    log(f"loaded {len(train_side) + len(test)} samples")
    enc_name = f"MiniLM (bundle, {'int8' if pred.bundle.manifest.get('quantization') else 'fp32'})"  # (was: int8 always)
    if list(scheme.edges) != list(pred.scheme.edges) or list(scheme.reserve_tokens) != list(pred.scheme.reserve_tokens):
        raise ValueError(f"{args.config}: the recipe's bucket scheme differs from the bundle's ({args.bundle})")
    scheme = pred.scheme  # what the bundle decodes with (and rlpredict eval scores with)
    q = cfg.reserve_quantile
    stack, stack_info = stacking_rows(train_side, enc_train, args.stack_rows, args.seed)
    check_stacking_rows(stack, args.folds)  # before the fits, as `rlpredict stack` (was: numpy's error after them)
    sources = sorted({s.source for s in test})
    log(f"training side {len(train_side)}, encoder subsample {len(enc_train)}, test {len(test)} "
        f"({', '.join(f'{s} {sum(t.source == s for t in test)}' for s in sources)}), stacking-fit {stack_info}")

    cache = out / "cache.pkl"  # the expensive outputs, reused by a rerun with the same rows
    key = {"test": [s.id for s in test], "stack": [s.id for s in stack], "folds": args.folds,
           "ridge": args.ridge, "bundle": str(resolved(args.bundle))}
    saved = pickle.loads(cache.read_bytes()) if args.reuse and cache.is_file() else None
    te_texts = baseline_texts(test, spec)
    if saved is not None and saved["key"] == key:
        log(f"reusing {cache}")
        pe_test, pe_stack, pt_test, pt_stack, mu_test, mu_stack, tfidf, enc_s, full_fit_s = saved["values"]
    else:
        t = time.perf_counter()
        pe_test, pe_stack = encoder_probs(pred, test), encoder_probs(pred, stack)
        enc_s = time.perf_counter() - t
        log(f"encoder probabilities for {len(test) + len(stack)} prompts: {enc_s:.0f}s")

        t = time.perf_counter()
        tr_rl = np.array([s.rl_tokens for s in train_side], dtype=float)
        tr_texts = baseline_texts(train_side, spec)
        tfidf = TfidfLogistic().fit(tr_texts, tr_rl, scheme)
        pt_test = tfidf.predict_proba(te_texts)
        full_fit_s = time.perf_counter() - t
        log(f"TF-IDF + logreg on the whole training side ({len(train_side)} rows): {full_fit_s:.0f}s")
        mu_test = ridge_model(tr_texts, tr_rl).predict(te_texts) if args.ridge else None
        del tr_texts

        folds = group_folds(stack, args.folds, args.seed)
        pt_stack, mu_stack = tfidf_oof(train_side, stack, folds, scheme, spec, args.ridge, log=log)
        write_owned(out, cache.name, pickle.dumps({"key": key, "values": (
            pe_test, pe_stack, pt_test, pt_stack, mu_test, mu_stack, tfidf, enc_s, full_fit_s)}), tool=TOOL)

    y_stack = scheme.bucket_of(np.array([s.rl_tokens for s in stack], dtype=float))
    rl_stack = np.array([s.rl_tokens for s in stack], dtype=float)
    src_stack = np.array([s.source for s in stack])
    src_test = np.array([s.source for s in test])
    rl_test = np.array([s.rl_tokens for s in test], dtype=float)

    # ---- w for the mixes: fixed rules on the pooled stacking-fit set ----
    w_table = []
    for w in W_GRID:
        lin, geo = linear_mix(pe_stack, pt_stack, w), geometric_mix(pe_stack, pt_stack, w)
        w_table.append({"w": float(w), "lin_nll": nll(lin, y_stack), "geo_nll": nll(geo, y_stack),
                        "lin_mae": rl_metrics(rl_stack, lin, scheme, q)["mae"],
                        "geo_mae": rl_metrics(rl_stack, geo, scheme, q)["mae"]})
    chosen_w = {key: min(w_table, key=lambda r, k=key: r[k])["w"]
                for key in ("lin_nll", "geo_nll", "lin_mae", "geo_mae")}
    log(f"chosen w: {chosen_w}")

    # ---- stackers: small dense fits, one BLAS thread (2 threads on 2 busy cores ran 12x slower) ----
    from threadpoolctl import threadpool_limits

    blas = threadpool_limits(1)
    stack_groups = [f"{s.source}/{s.group}" for s in stack]
    stackers: dict[str, dict[str, Any]] = {}
    variants = [("stacker [log p_enc, log p_tfidf]", False, False)]
    if len(sources) > 1:  # a source indicator needs two sources (was: numpy's "need at least one array")
        variants.append(("stacker + source", True, False))
    else:
        log(f"one source ({sources[0]}): no 'stacker + source' variant")
    if args.ridge:
        variants.append(("stacker + source + ridge" if len(sources) > 1 else "stacker + ridge", len(sources) > 1, True))
    probs: dict[str, np.ndarray] = {
        enc_name: pe_test,
        "TF-IDF + logreg": pt_test,
        f"linear mix, w={chosen_w['lin_nll']} (NLL rule)": linear_mix(pe_test, pt_test, chosen_w["lin_nll"]),
        f"geometric mix, w={chosen_w['geo_nll']} (NLL rule)": geometric_mix(pe_test, pt_test, chosen_w["geo_nll"]),
        f"linear mix, w={chosen_w['lin_mae']} (MAE rule)": linear_mix(pe_test, pt_test, chosen_w["lin_mae"]),
        f"geometric mix, w={chosen_w['geo_mae']} (MAE rule)": geometric_mix(pe_test, pt_test, chosen_w["geo_mae"]),
    }
    for name, ind, use_mu in variants:
        xs = stack_features(pe_stack, pt_stack, src_stack, sources, ind, mu_stack if use_mu else None)
        xt = stack_features(pe_test, pt_test, src_test, sources, ind, mu_test if use_mu else None)
        c, scores = pick_c(xs, y_stack, stack_groups, scheme.n_buckets, log=log)
        st = Stacker(scheme.n_buckets, c).fit(xs, y_stack)
        label = f"{name}, C={c}"
        probs[label] = st.predict_proba(xt)
        stackers[label] = {"C": c, "cv_nll_by_C": scores, "features": xs.shape[1],
                           "stack_fit_nll": nll(st.predict_proba(xs), y_stack)}
        log(f"{label}: cv NLL {scores}")

    # ---- metrics ----
    results: dict[str, dict[str, dict]] = {"all": {m: rl_metrics(rl_test, p, scheme, q) for m, p in probs.items()}}
    for s in sources:
        results[s] = {m: rl_metrics(rl_test[src_test == s], p[src_test == s], scheme, q) for m, p in probs.items()}
    stack_metrics = {s: {m: rl_metrics(rl_stack[src_stack == s], p[src_stack == s], scheme, q)
                         for m, p in ((enc_name, pe_stack), ("TF-IDF + logreg (out-of-fold)", pt_stack))}
                     for s in sources}

    blas.restore_original_limits()

    # ---- size and latency of the TF-IDF model ----
    size = model_size(tfidf)
    rng = random.Random(args.seed)
    idx = rng.sample(range(len(test)), min(args.timing_prompts, len(test)))
    timing = per_prompt_ms(tfidf, [te_texts[i] for i in idx], pred, encoder_texts([test[i] for i in idx], spec))
    log(f"size {size}, timing {timing}")

    # ---- report ----
    beats = {}
    base = (enc_name, "TF-IDF + logreg")
    for m in probs:
        if m in base:
            continue
        beats[m] = {s: all(results[s][m]["mae"] < results[s][b]["mae"] and
                           results[s][m]["kendall_tau"] > results[s][b]["kendall_tau"] for b in base)
                    for s in sources}
    lines = ["# Encoder + TF-IDF combinations (issue 15, item 2)\n",
             f"- command: `python training/compare_stacking.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- split: test_frac {cfg.test_frac}, seed {cfg.split_seed}; training side {len(train_side)}, "
             f"encoder subsample {len(enc_train)}, test {len(test)}",
             f"- stacking-fit set (never test rows; encoder never trained on them; TF-IDF out-of-fold over "
             f"{args.folds} group folds): {json.dumps(stack_info)}",
             f"- w rule: min mean NLL on the pooled stacking-fit set -> linear {chosen_w['lin_nll']}, geometric "
             f"{chosen_w['geo_nll']}; MAE rule -> linear {chosen_w['lin_mae']}, geometric {chosen_w['geo_mae']}",
             f"- stackers (C by grouped 5-fold CV NLL on the stacking-fit set): {json.dumps(stackers)}",
             f"- TF-IDF + logreg size: {json.dumps(size)}",
             f"- one prompt at a time, ms ({timing['n']} test prompts): {json.dumps({k: round(v, 3) for k, v in timing.items()})}",
             f"- wall: encoder {enc_s:.0f}s, TF-IDF full fit+predict {full_fit_s:.0f}s, total {time.perf_counter() - T0:.0f}s",
             "\n## beats both baselines in MAE and tau (per source)\n",
             "| method | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join("yes" if b[s] else "no" for s in sources) + " |" for m, b in beats.items()]
    for s in [*sources, "all"]:
        lines += [f"\n## {s} (test, n={results[s][base[0]]['n']})\n", markdown_table(results[s]),
                  "\nMAE / tau to full precision: " + "; ".join(
                      f"{m}: {r['mae']:.3f} / {r['kendall_tau']:.4f}" for m, r in results[s].items())]
    lines += ["\n## stacking-fit set: the two inputs' own metrics (leak check)\n"]
    for s in sources:
        lines += [f"\n### {s}\n", markdown_table(stack_metrics[s])]
    lines += ["\n## w grid on the pooled stacking-fit set\n", "| w | lin NLL | geo NLL | lin MAE | geo MAE |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['w']:.2f} | {r['lin_nll']:.4f} | {r['geo_nll']:.4f} | {r['lin_mae']:.2f} | {r['geo_mae']:.2f} |"
              for r in w_table]
    text = "\n".join(lines) + "\n"
    write_owned(out, "report.md", text, tool=TOOL)
    write_owned(out, "results.json", json.dumps(
        {"results": results, "stack_fit": stack_info, "stack_fit_metrics": stack_metrics, "w_grid": w_table,
         "chosen_w": chosen_w, "stackers": stackers, "size": size, "timing_ms": timing, "beats_both": beats,
         "wall_s": time.perf_counter() - T0}, indent=2) + "\n", tool=TOOL)
    print(text)


if __name__ == "__main__":
    run_script(main)
