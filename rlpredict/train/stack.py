"""``rlpredict stack``: add a TF-IDF head, stacked with the encoder, to a bundle.

The recipe (measured in docs/predictor.md, "Encoder + TF-IDF"):

1. The recipe's split (``TrainConfig``: the same group split and seeded subsample as training).
2. TF-IDF + logistic regression (``rlpredict.train.baselines.TfidfLogistic``) fitted on the whole
   training side.
3. A **stacking-fit set**: training-side rows the encoder did not train on, whole groups at a
   time (``stacking_rows``), with the encoder's probabilities (the bundle's own ONNX model, as
   served) and out-of-fold TF-IDF probabilities (``tfidf_oof``: each fold predicted by a model
   trained on the training side minus that fold's groups). Test rows are never used.
4. A multinomial logistic regression on ``[log p_enc, log p_tfidf]`` (``Stacker``), its ``C``
   chosen by grouped 5-fold cross-validated NLL; its standardisation folded into plain
   coefficients (``folded``).
5. The new bundle: the input bundle's files plus ``lexical.npz``; the manifest gets a
   ``lexical`` section (rules, fit record, the three models' metrics on the test split) and the
   stacked model's confusion matrix on the test split. A calibration of the input bundle no
   longer fits the new probabilities and is dropped: run ``rlpredict calibrate`` on the result.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlpredict.buckets import BucketScheme
from rlpredict.data import Sample, attach_rl, load_samples
from rlpredict.inputs import LEXICAL_TEXT_CAP, InputSpec
from rlpredict.outputs import check_new_dir, check_paths, output_dir
from rlpredict.rl_tokenizers import same_rl_tokenizer
from rlpredict.serve import lexical
from rlpredict.serve.bundle import copy_files, write_manifest
from rlpredict.splits import check_same_split, group_keys, recorded_split, rows_sha256
from rlpredict.train.baselines import TfidfLogistic, TfidfRidge
from rlpredict.train.config import TrainConfig
from rlpredict.train.evaluate import (
    baseline_texts,
    confusion_dict,
    encoder_texts,
    markdown_table,
    p_text,
    paired_t_p,
    times,
)
from rlpredict.train.metrics import rl_metrics

if TYPE_CHECKING:
    from rlpredict.serve.runtime import Predictor

#: The tool named in its output folder's owner record (``rlpredict.outputs``): it replaces
#: only a folder of its own, never another tool's, even with --force.
STACK_TOOL = "rlpredict stack"


EPS = lexical.EPS
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
CARD = "MODEL_CARD.md"
CARD_HEAD = "## Lexical head (TF-IDF stacked with the encoder)"


# ---- the split and the stacking-fit rows ---------------------------------------------------------
def check_recipe(pred: Predictor, cfg: TrainConfig, bundle: str | Path) -> None:
    """``ValueError`` if the recipe ``cfg`` is not the one bundle ``bundle``'s encoder was trained
    with, as far as the bundle recorded it: its split (test fraction, seed, rule) and its RL
    tokenizer. Asked before the data is read (``rlpredict stack``, ``training/compare_stacking.py``)."""
    check_same_split(recorded_split(pred.bundle.manifest),
                     {"test_frac": ("the recipe's test_frac", cfg.test_frac),
                      "seed": ("the recipe's split_seed", cfg.split_seed),
                      "rule": ("the recipe's split_rule", cfg.split_rule)},
                     "give the recipe the bundle's encoder was trained with")
    if not same_rl_tokenizer(cfg.rl_tokenizer, pred.bundle.rl_tokenizer):  # was: counted in the recipe's
        raise ValueError(f"the recipe's rl_tokenizer {cfg.rl_tokenizer!r} differs from bundle {bundle}'s "
                         f"{pred.bundle.rl_tokenizer!r}: give the recipe the bundle was trained with")


def check_encoder_rows(pred: Predictor, enc_train: Sequence[Sample], bundle: str | Path,
                       log: Callable[[str], None]) -> None:
    """``ValueError`` if the recipe's training subsample ``enc_train`` is not the one the bundle
    recorded for its encoder (a stacker fit, or a row called unseen, would be on rows it saw);
    a note where the bundle records none."""
    recorded = (pred.bundle.manifest.get("training_split") or {}).get("train_rows_sha256")
    if recorded is not None and recorded != rows_sha256(enc_train):  # was: a stacker fit on training rows
        raise ValueError(f"the recipe's training subsample ({len(enc_train)} rows) is not the one bundle {bundle}'s "
                         "encoder trained on: the stacker would be fit on rows the encoder has seen; give the "
                         "recipe it was trained with (the same data files, seed, max_rows and max_rows_per_source)")
    if recorded is None:
        log("note: the bundle does not record its encoder's training rows (an export before December 2026): "
            "the recipe is trusted to reproduce them (the same data files, seed, max_rows and max_rows_per_source)")


def check_stacking_rows(stack: Sequence[Sample], folds: int) -> None:
    """``ValueError`` before the fits if the stacking-fit rows cannot fit a stacker: none (the
    encoder trained on the whole training side), or fewer conversation groups than its grouped
    cross-validation takes."""
    if not stack:
        raise ValueError("no training-side rows the encoder did not train on: nothing to fit the stacker on "
                         "(train the encoder on a subsample, max_rows_per_source)")
    groups = len({(s.source, s.group) for s in stack})
    if groups < max(5, folds):  # was: scikit-learn's "Cannot have number of splits n_splits=5 ..." after the fits
        raise ValueError(f"the stacking-fit rows hold {groups} conversation group(s); the stacker's grouped "
                         f"cross-validation needs at least {max(5, folds)}: give more --stack-rows or more data")


def check_fold_buckets(train_side: Sequence[Sample], stack: Sequence[Sample], fold_of: np.ndarray,
                       scheme: BucketScheme) -> np.ndarray:
    """The stacking-fit rows' buckets, after a ``ValueError`` before the fits where a fit would
    see one bucket: all the rows, a TF-IDF fold's training side, or a part of the stacker's
    grouped cross-validation (was: scikit-learn's "needs samples of at least 2 classes" after
    minutes of fits, where every row outside one bucket sat in one conversation; a reviewer's find)."""
    from sklearn.model_selection import GroupKFold

    remedy = "give more --stack-rows or more data"
    y = scheme.bucket_of(np.array([s.rl_tokens for s in stack], dtype=float))
    if len(set(y.tolist())) < 2:
        raise ValueError(f"the stacking-fit rows' responses all fall in one bucket: a stacker cannot be fitted; {remedy}")
    side = scheme.bucket_of(np.array([s.rl_tokens for s in train_side], dtype=float))
    for f in range(int(fold_of.max()) + 1):
        held = {s.group for s, ff in zip(stack, fold_of, strict=True) if ff == f}
        if len({int(b) for s, b in zip(train_side, side, strict=True) if s.group not in held}) < 2:
            raise ValueError(f"TF-IDF fold {f}: the training side without that fold's conversations holds "
                             f"responses of one bucket only (the others sit in those conversations); {remedy}")
    groups = [f"{s.source}/{s.group}" for s in stack]
    for k, (tr, _) in enumerate(GroupKFold(5).split(y, y, groups)):
        if len(set(y[tr].tolist())) < 2:
            raise ValueError(f"the stacker's cross-validation part {k}: its training rows hold responses of "
                             f"one bucket only (the others sit in one conversation group); {remedy}")
    return y


def load_split(cfg: TrainConfig, log: Callable[[str], None] = lambda m: None,
               ) -> tuple[list[Sample], list[Sample], list[Sample], BucketScheme]:
    """(training side, the encoder's training subsample, test side, scheme) of a recipe, as
    ``rlpredict.train.trainer.prepare`` draws them; ``log`` gets what the read skipped."""
    from rlpredict.train.trainer import check_has_data, subsample

    check_has_data(cfg)
    samples, report = load_samples(cfg.data, on_error=cfg.on_error)
    attach_rl(samples, cfg.rl_tokenizer)
    try:
        prep, train_side = subsample(cfg, samples, report)
    finally:  # what the read skipped, and what the scheme counted (long responses)
        for line in report.lines():
            log(line)
    return train_side, prep.train, prep.test, prep.scheme


def stacking_rows(train_side: Sequence[Sample], enc_train: Sequence[Sample], per_source: int,
                  seed: int) -> tuple[list[Sample], dict[str, dict[str, int]]]:
    """Training-side rows the encoder did not train on, whole groups at a time, groups with the
    smallest share of encoder-seen rows first (ties in seeded random order), up to
    ``per_source`` rows per source (a group that would overshoot is skipped)."""
    seen = {id(s) for s in enc_train}
    rng = random.Random(seed)
    out: list[Sample] = []
    info: dict[str, dict[str, int]] = {}
    for src in sorted({s.source for s in train_side}):
        groups: dict[str, list[Sample]] = {}
        for s in train_side:
            if s.source == src:
                groups.setdefault(s.group, []).append(s)
        keys = sorted(groups)
        rng.shuffle(keys)
        share = {g: sum(id(s) in seen for s in groups[g]) / len(groups[g]) for g in keys}
        keys.sort(key=lambda g: share[g])  # stable: random order within equal shares
        taken: list[Sample] = []
        n_groups = clean = 0
        for g in keys:
            rows = [s for s in groups[g] if id(s) not in seen]
            if not rows or len(taken) + len(rows) > per_source:
                continue
            taken += rows
            n_groups += 1
            clean += share[g] == 0
            if len(taken) >= per_source:
                break
        out += taken
        info[src] = {"rows": len(taken), "groups": n_groups, "groups_never_seen_by_encoder": clean,
                     "training_side_rows": sum(len(v) for v in groups.values()),
                     "encoder_rows": sum(1 for s in enc_train if s.source == src)}
    return out, info


def group_folds(samples: Sequence[Sample], k: int, seed: int) -> np.ndarray:
    groups = sorted({s.group for s in samples})
    random.Random(seed).shuffle(groups)
    fold = {g: i % k for i, g in enumerate(groups)}
    return np.array([fold[s.group] for s in samples])


# ---- model outputs --------------------------------------------------------------------------------
def encoder_probs(pred: Any, samples: Sequence[Sample]) -> np.ndarray:
    """The bundle's encoder alone (never its lexical head): probabilities as served."""
    texts = encoder_texts(samples, pred.input_spec)
    return pred.from_logits(pred.logits_of_ids(pred.encode(texts))).probs.astype(np.float64)


def tfidf_oof(train_side: Sequence[Sample], stack: Sequence[Sample], folds: np.ndarray,
              scheme: BucketScheme, spec: InputSpec, ridge: bool = False,
              log: Callable[[str], None] = lambda m: None) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold TF-IDF + logreg probabilities (and, with ``ridge``, the TF-IDF ridge's
    log-RL) for the stacking-fit rows: fold f is predicted by models trained on the training
    side minus fold f's groups."""
    p = np.zeros((len(stack), scheme.n_buckets))
    mu = np.zeros(len(stack)) if ridge else None
    stack_texts = baseline_texts(stack, spec)
    for f in range(int(folds.max()) + 1):
        held = {s.group for s, ff in zip(stack, folds, strict=True) if ff == f}
        tr = [s for s in train_side if s.group not in held]
        idx = np.flatnonzero(folds == f)
        texts = baseline_texts(tr, spec)
        rl = np.array([s.rl_tokens for s in tr], dtype=float)
        t = time.perf_counter()
        m = TfidfLogistic().fit(texts, rl, scheme)
        p[idx] = m.predict_proba([stack_texts[i] for i in idx])
        if mu is not None:
            mu[idx] = ridge_model(texts, rl).predict([stack_texts[i] for i in idx])
        log(f"TF-IDF fold {f}: trained on {len(tr)} rows, predicted {len(idx)} ({time.perf_counter() - t:.0f}s)")
    return p, mu


def ridge_model(texts: Sequence[str], rl: np.ndarray) -> Any:
    """The TF-IDF ridge of ``rlpredict.train.baselines.TfidfRidge``: a regressor of log(1 + RL)."""
    return TfidfRidge()._model().fit(list(texts), np.log1p(rl))


# ---- the stacker -----------------------------------------------------------------------------------
def normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, None)
    return p / p.sum(axis=1, keepdims=True)


def nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(normalise(p)[np.arange(len(y)), y])))


def features(pe: np.ndarray, pt: np.ndarray, *extra: np.ndarray) -> np.ndarray:
    """``[log p_enc, log p_tfidf]`` (the runtime's ``LexicalHead.stack`` inputs), then ``extra``
    columns (research variants only: a bundle ships the first two)."""
    return np.hstack([np.log(normalise(pe)), np.log(normalise(pt)), *extra])


class Stacker:
    """Multinomial logistic regression over the buckets on stacked features (standardised)."""

    def __init__(self, k: int, c: float) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.k = k
        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    def fit(self, x: np.ndarray, y: np.ndarray) -> Stacker:
        self.model.fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.zeros((len(x), self.k))
        p[:, self.model.classes_] = self.model.predict_proba(x)
        return p

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, c)`` with ``softmax(x @ A.T + c) == predict_proba(x)``: the scaler folded into
        the coefficients; a bucket absent from the fit gets probability 0 (logit -1e4)."""
        scaler, lr = self.model[0], self.model[-1]
        coef, icpt = np.asarray(lr.coef_, dtype=np.float64), np.asarray(lr.intercept_, dtype=np.float64)
        if coef.shape[0] == 1:  # binary: softmax([0, z])
            coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
        scale = np.asarray(scaler.scale_, dtype=np.float64)
        a = np.zeros((self.k, coef.shape[1]))
        c = np.full(self.k, -1e4)
        a[lr.classes_] = coef / scale
        c[lr.classes_] = icpt - (coef / scale) @ np.asarray(scaler.mean_, dtype=np.float64)
        return a, c


def pick_c(x: np.ndarray, y: np.ndarray, groups: Sequence[str], k: int,
           log: Callable[[str], None] = lambda m: None) -> tuple[float, dict[str, float]]:
    """The C of ``C_GRID`` with the lowest grouped 5-fold cross-validated NLL."""
    from sklearn.model_selection import GroupKFold

    scores: dict[str, float] = {}
    for c in C_GRID:
        oof = np.zeros((len(y), k))
        for tr, te in GroupKFold(5).split(x, y, list(groups)):
            oof[te] = Stacker(k, c).fit(x[tr], y[tr]).predict_proba(x[te])
        scores[str(c)] = nll(oof, y)
        log(f"  C={c}: CV NLL {scores[str(c)]:.5f}")
    return min(C_GRID, key=lambda c: scores[str(c)]), scores


# ---- the recipe -----------------------------------------------------------------------------------
def stack_bundle(bundle: str | Path, cfg: TrainConfig, out: str | Path, *, stack_rows: int = 4000,
                 folds: int = 3, seed: int = 0, threads: int | None = None, force: bool = False,
                 recipe: str = "config", log: Callable[[str], None] = lambda m: None) -> dict:
    """Fit the lexical head and the stacker for ``bundle`` on ``cfg``'s data (module docstring)
    and write the stacked bundle to ``out`` (atomically; never over an input). Returns the
    report (also the manifest's ``lexical.fit`` and ``lexical.evaluation``)."""
    from threadpoolctl import threadpool_limits

    from rlpredict.serve.runtime import Predictor

    bundle, out = Path(bundle), Path(out)
    check_paths([bundle, *cfg.data], [("--out", out)], apart=[bundle, *cfg.data])  # was: read as data next time
    check_new_dir(out, force=force, option="--out", only=STACK_TOOL)  # never another tool's folder
    t0 = time.perf_counter()
    pred = Predictor.load(bundle, threads=threads)
    if pred.bundle.lexical is not None:
        raise ValueError(f"bundle {bundle}: already has a lexical head; stack the encoder-only bundle")
    spec, scheme, q = pred.input_spec, pred.scheme, cfg.reserve_quantile
    if "calibration" in pred.bundle.manifest:  # was: dropped without a word
        log("note: the input bundle's calibration is dropped (it fitted the encoder's probabilities): "
            "run `rlpredict calibrate` on the stacked bundle")
    check_recipe(pred, cfg, bundle)
    train_side, enc_train, test, cfg_scheme = load_split(cfg, log)
    if not test:  # checked before the fits: the stacked bundle is scored on this side
        raise ValueError(f"{', '.join(cfg.data)}: the held-out side of the split (test_frac {cfg.test_frac}, "
                         f"split_seed {cfg.split_seed}) is empty: nothing to score the stacked bundle on; "
                         "give more data (whole conversations go to one side)")
    if list(cfg_scheme.edges) != list(scheme.edges):
        raise ValueError(f"the recipe's bucket edges {cfg_scheme.edges} differ from the bundle's {scheme.edges}: "
                         "give the recipe the bundle was trained with")
    check_encoder_rows(pred, enc_train, bundle, log)
    # From here a group is the split rule's: the stacking folds must not hold one row's copies
    # (other ids, under ``copies``) on both sides, or the out-of-fold TF-IDF sees them.
    for s, key in zip(train_side, group_keys(train_side, cfg.split_rule), strict=True):
        s.group = key
    stack, stack_info = stacking_rows(train_side, enc_train, stack_rows, seed)
    check_stacking_rows(stack, folds)
    fold_of = group_folds(stack, folds, seed)
    y = check_fold_buckets(train_side, stack, fold_of, scheme)
    log(f"training side {len(train_side)}, encoder subsample {len(enc_train)}, test {len(test)}, "
        f"stacking-fit {len(stack)} rows")

    tr_texts = baseline_texts(train_side, spec)
    tfidf = TfidfLogistic().fit(tr_texts, np.array([s.rl_tokens for s in train_side], dtype=float), scheme)
    del tr_texts
    log(f"TF-IDF + logreg fitted on {len(train_side)} rows ({time.perf_counter() - t0:.0f}s)")
    pt_stack, _ = tfidf_oof(train_side, stack, fold_of, scheme, spec, log=log)
    pe_stack = encoder_probs(pred, stack)
    log(f"encoder probabilities of the stacking-fit rows ({time.perf_counter() - t0:.0f}s)")

    absent = sorted(set(range(scheme.n_buckets)) - set(y.tolist()))
    if absent:  # was: silent; the stacked model can never predict these buckets
        log(f"warning: the stacking-fit rows hold no response in bucket(s) {absent} (edges "
            f"{[None if math.isinf(e) else e for e in scheme.edges]}): the stacked model gives them "
            "probability 0; give more --stack-rows, or data with such responses")
    x = features(pe_stack, pt_stack)
    with threadpool_limits(1):  # small dense fits: one BLAS thread (more ran slower on 2 busy cores)
        c, cv = pick_c(x, y, [f"{s.source}/{s.group}" for s in stack], scheme.n_buckets, log=log)
        stacker = Stacker(scheme.n_buckets, c).fit(x, y)
    a, b = stacker.folded()
    vec, lr = tfidf.model[0], tfidf.model[-1]
    arrays = lexical.export_arrays(vec, lr, a, b, scheme.n_buckets)
    fit = {"recipe": recipe, "stacking_fit": stack_info, "buckets_without_fit_rows": absent, "folds": folds, "seed": seed,
           "stacker": {"C": c, "cv_nll_by_C": cv, "features": "[log p_enc, log p_tfidf]"},
           "tfidf_training_rows": len(train_side)}

    with output_dir(out, force=force, tool=STACK_TOOL) as tmp:
        names = copy_files(pred.bundle, tmp)
        np.savez(tmp / lexical.FILE, **arrays)
        manifest = {k: v for k, v in pred.bundle.manifest.items() if k not in ("files", "calibration")}
        manifest["lexical"] = {"format": lexical.FORMAT, "file": lexical.FILE,
                               "tfidf": lexical.tfidf_rules(vec), "text_cap": LEXICAL_TEXT_CAP, "fit": fit}
        manifest["files"] = [*names, lexical.FILE]
        write_manifest(tmp, manifest)
        stacked = Predictor.load(tmp, threads=threads)  # score the bundle as it will be served
        texts = encoder_texts(test, spec)  # what ``predict_arrays`` does, the encoder run once
        enc_logits = stacked.logits_of_ids(stacked.encode(texts))
        te_enc = stacked.from_logits(enc_logits).probs.astype(np.float64)
        te_stacked = stacked.from_logits(stacked.combine(enc_logits, texts)).probs
        te_tfidf = tfidf.predict_proba(baseline_texts(test, spec))
        rl = np.array([s.rl_tokens for s in test], dtype=float)
        src = np.array([s.source for s in test])
        probs = {"stacked": te_stacked, "encoder": te_enc, "tfidf_logreg": te_tfidf}
        evaluation = {"split": {"test_frac": cfg.test_frac, "seed": cfg.split_seed, "rule": cfg.split_rule,
                                "test_samples": len(test)},
                      "reserve_quantile": q,
                      "all": {m: rl_metrics(rl, p, scheme, q) for m, p in probs.items()},
                      "sources": {s: {m: rl_metrics(rl[src == s], p[src == s], scheme, q) for m, p in probs.items()}
                                  for s in sorted(set(src))}}
        evaluation["verdict"] = verdict(evaluation["all"], {m: paired_t_p(rl, te_stacked, probs[m], scheme)
                                                            for m in ("encoder", "tfidf_logreg")})
        manifest["lexical"]["evaluation"] = evaluation
        manifest["confusion"] = confusion_dict(
            rl, te_stacked, scheme, f"stacked model (encoder + TF-IDF) on {', '.join(sorted(set(src)))} "
                                    f"(test split, n={len(test)})")
        write_manifest(tmp, manifest)
        card = bundle / CARD
        text = card.read_text(encoding="utf-8") if card.is_file() else f"# {pred.bundle.name}\n"
        (tmp / CARD).write_text(_with_card_section(text, fit, evaluation), encoding="utf-8")
    report = {"fit": fit, "evaluation": evaluation, "seconds": round(time.perf_counter() - t0, 1)}
    log(f"stacked bundle written to {out} ({report['seconds']}s)")
    return report


def verdict(all_rows: dict[str, dict], p: dict[str, float | None] | None = None) -> str:
    """The stacked model's MAE against the encoder's and TF-IDF's alone, in one line: whether
    stacking paid on this data (it need not: the stacking fit is small); with ``p`` (each
    comparison's ``evaluate.paired_t_p``), the differences the test rows cannot tell from noise
    are said to be (was: a firm word on any number of rows)."""
    mae = {m: all_rows[m]["mae"] for m in ("stacked", "encoder", "tfidf_logreg")}
    worse = [m for m in ("encoder", "tfidf_logreg") if mae["stacked"] >= mae[m]]
    word = ("better than either alone" if not worse else "NOT better than either alone" if len(worse) == 2
            else f"NOT better than {'the encoder' if worse[0] == 'encoder' else 'TF-IDF'} alone")
    line = (f"stacked MAE {mae['stacked']:.1f} = {times(mae['stacked'], mae['encoder'])} the encoder's "
            f"({mae['encoder']:.1f}), {times(mae['stacked'], mae['tfidf_logreg'])} TF-IDF's ({mae['tfidf_logreg']:.1f}): "
            f"the stacked bundle is {word}")
    names = {"encoder": "the encoder", "tfidf_logreg": "TF-IDF"}
    tested = {m: v for m, v in (p or {}).items() if v is not None}
    if not tested:
        return line
    n = all_rows["stacked"]["n"]
    parts = ", ".join(f"{p_text(v)} against {names[m]}" for m, v in tested.items())
    if untold := [names[m] for m, v in tested.items() if v >= 0.05]:
        return line + f", but the {n} test rows cannot tell it from {' or '.join(untold)} (paired t-tests: {parts})"
    return line + f" (paired t-tests on the {n} test rows' absolute errors: {parts})"


def markdown(evaluation: dict) -> str:
    """One table per source (and all): the stacked model, the encoder alone, TF-IDF alone."""
    parts = []
    q = evaluation.get("reserve_quantile", 0.9)  # the recipe's (a bundle stacked before it was recorded: 0.9)
    for name, rows in [("all", evaluation["all"]), *evaluation["sources"].items()]:
        parts += [f"\n{name} (test split, n={rows['stacked']['n']}):\n", markdown_table(rows, q)]
    return "\n".join(parts)


def _with_card_section(card: str, fit: dict, evaluation: dict) -> str:
    kept = card.split(f"\n{CARD_HEAD}\n")[0].rstrip("\n")
    kept = kept.split("\n## Calibrated quantiles\n")[0].rstrip("\n")  # no longer fits: recalibrate
    rows = "; ".join(f"{src} {v['rows']} rows in {v['groups']} groups ({v['groups_never_seen_by_encoder']} "
                     "never seen by the encoder)" for src, v in fit["stacking_fit"].items())
    return (f"{kept}\n\n{CARD_HEAD}\n\n`rlpredict stack` added TF-IDF + logistic regression "
            f"({fit['tfidf_training_rows']} training-side rows), stacked with the encoder by a multinomial "
            f"logistic regression on `[log p_enc, log p_tfidf]` (C = {fit['stacker']['C']}, by grouped "
            f"5-fold CV) fitted on training-side rows the encoder did not train on, with out-of-fold TF-IDF "
            f"probabilities ({fit['folds']} group folds): {rows}. Metrics on the test split, computed by the "
            f"runtime on this bundle:\n{markdown(evaluation)}\n")
