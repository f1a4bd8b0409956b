"""Evaluate a trained predictor against the baselines on the same held-out split.

Writes ``report.json``, ``report.md``, ``confusion.json`` (the scheduler simulator samples
predictions from it) and a confusion-matrix PNG per method.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from rlpredict.buckets import BucketScheme
from rlpredict.confusion_plot import plot_confusion
from rlpredict.data import Sample, attach_rl, load_samples
from rlpredict.inputs import InputSpec, build_text, lexical_text
from rlpredict.json_file import read_json
from rlpredict.outputs import output_dir, repeated_input, write_text_atomic
from rlpredict.records import no_generator_note
from rlpredict.splits import RECORDLESS_RULE, SPLIT_RULES, check_split_record, split_by_group
from rlpredict.train.baselines import BASELINES
from rlpredict.train.encoders import check_positions, token_ids
from rlpredict.train.metrics import confusion, decode, quantile_tag, rl_metrics
from rlpredict.train.model_meta import (
    ModelMeta,
    check_config,
    check_labels,
    load_trained,
    weights_sha256,
)

MODEL = "model"
#: The tool named in the report folder's owner record (``rlpredict.outputs``): ``eval`` replaces
#: only a folder of its own, never another tool's (a trained model, a simulator run).
EVAL_TOOL = "rlpredict eval"


def encoder_texts(samples: Iterable[Sample], spec: InputSpec) -> list[str]:
    return list(iter_encoder_texts(samples, spec))


def iter_encoder_texts(samples: Iterable[Sample], spec: InputSpec) -> Iterator[str]:
    """The encoder's input texts, made one at a time (a conversation's history-mode texts, each
    the whole conversation so far, are then never all held)."""
    return (build_text(s.messages, spec, s.generator) for s in samples)


def baseline_texts(samples: Iterable[Sample], spec: InputSpec) -> list[str]:
    return [lexical_text(t, spec) for t in iter_encoder_texts(samples, spec)]


def predict_proba_torch(model_dir: str | Path, texts: Iterable[str], spec: InputSpec, batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
    """Bucket probabilities from a Hugging Face model folder (torch; sorted by length, padded per
    batch); ``texts`` are tokenized as they come, cut before tokenizing (``token_ids``)."""
    import torch
    from rich.console import Console
    from rich.progress import track

    model, tok = load_trained(model_dir)
    model.eval()
    tok.truncation_side = spec.truncation_side  # tok.pad pads on its own side; truncation is token_ids'
    ids = list(token_ids(tok, texts, spec))
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float64)
    starts = range(0, len(ids), batch_size)
    with torch.inference_mode():
        console = Console(stderr=True)  # stdout holds the report
        for i in track(starts, description="predict", console=console,
                       disable=not progress or not console.is_terminal):  # was: drawn into a log file too
            idx = order[i:i + batch_size]
            b = tok.pad({"input_ids": [ids[j] for j in idx]}, return_tensors="pt")
            out[idx] = torch.softmax(model(**b).logits.float(), dim=-1).numpy()
    return out


def recorded_split(path: Path) -> dict:
    """The held-out split ``rlpredict train`` recorded in ``training_summary.json``
    (``{test_frac, seed, rule}``, and ``train_rows_sha256`` and ``pinned`` if recorded; {} without
    the file or the record; ``rule`` ``RECORDLESS_RULE`` if not recorded); ``ValueError`` naming
    the file if a value is of the wrong kind."""
    if not path.is_file():
        return {}
    summary = read_json(path)
    data = summary.get("data", {}) if isinstance(summary, dict) else None
    split = data.get("split", {}) if isinstance(data, dict) else None
    if not isinstance(split, dict):
        raise ValueError(f"{path}: expected an object whose 'data.split' is an object")
    try:
        check_split_record(split, "data.split")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    frac, seed = split.get("test_frac", 0.1), split.get("seed", 0)
    rule = split.get("rule", RECORDLESS_RULE)
    if rule not in SPLIT_RULES:
        raise ValueError(f"{path}: field 'data.split.rule' must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    rows = split.get("train_rows_sha256")  # the encoder's training rows (``splits.rows_sha256``)
    pinned = split.get("pinned")  # ids the join trained (``splits.split_with_pins``)
    return {"test_frac": frac, "seed": seed, "rule": rule,
            **({"train_rows_sha256": rows} if isinstance(rows, str) else {}),
            **({"pinned": pinned} if pinned else {})}


def recorded_data(path: Path) -> list[str]:
    """The data a model trained on, as ``rlpredict train`` recorded it in
    ``training_summary.json`` (``config.data``: paths as given; [] without the file or the
    record); ``ValueError`` naming the file if it is not a list of strings."""
    if not path.is_file():
        return []
    summary = read_json(path)
    config = summary.get("config", {}) if isinstance(summary, dict) else None
    data = config.get("data", []) if isinstance(config, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ValueError(f"{path}: expected an object whose 'config.data' is a list of paths")
    return data


def trained_on(data: Sequence[str | Path], recorded: Sequence[str]) -> list[str]:
    """The paths of ``data`` that are, hold or lie inside a path the model trained on
    (``recorded_data``; a relative one taken from the current folder): the same file (a hard
    link too) or folder, as ``outputs.repeated_input`` tells them."""
    return [str(d) for d in data if any(repeated_input([d, r]) for r in recorded)]


def _row_key(text: str, rl: int) -> bytes:
    """A row as a baseline fits it: its input text (``baseline_texts``) and its RL, as a digest."""
    return hashlib.sha256(f"{rl}\n{text}".encode("utf-8", "surrogatepass")).digest()


def baseline_overlap(test: Sequence[Sample], te_texts: Sequence[str], train: Sequence[Sample],
                     tr_texts: Sequence[str]) -> int:
    """How many rows of ``test`` are also rows of ``train`` as a baseline sees them (the same
    input text, ``baseline_texts``, and RL; was: the same context and response text, so a copy
    that gives token counts instead of responses went uncounted): rows a baseline fitted on
    ``train`` is scored on. A copy of the data cannot be told by its path."""
    seen = {_row_key(t, s.rl_tokens) for t, s in zip(tr_texts, train, strict=True)}
    return sum(_row_key(t, s.rl_tokens) in seen for t, s in zip(te_texts, test, strict=True))


def evaluate(model_dir: str | Path | None, data: Sequence[str | Path], *, split: str = "test",
             test_frac: float | None = None, split_seed: int | None = None, split_rule: str | None = None,
             baselines: Sequence[str] = tuple(BASELINES), baseline_data: Sequence[str | Path] = (),
             meta: ModelMeta | None = None, on_error: str = "fail", reserve_quantile: float = 0.9,
             progress: bool = False) -> tuple[dict, dict[str, np.ndarray], list[Sample]]:
    """Score the model (if given) and the baselines; returns (report, probs by method, test samples).

    ``split="test"``: apply the model's recorded group split to ``data`` and score its held-out
    side (baselines train on the other side). ``split="all"``: score every row of ``data``
    (baselines then train on ``baseline_data``). ``split_rule``: the model's recorded rule, else
    ``RECORDLESS_RULE``. With ``baseline_data``, a ``ValueError`` if every scored row is also a
    baseline training row (a copy of ``data``); some are counted (``baseline_train_overlap``).
    """
    model_data: list[str] = []
    pinned: list[str] = []  # ids the model's split trained though their hash holds them out
    if model_dir is not None:
        meta = ModelMeta.load(model_dir)
        check_positions(model_dir, meta.input.max_length, f"model {model_dir}")  # before the data
        check_config(model_dir)
        check_labels(model_dir, meta)
        recorded = recorded_split(Path(model_dir) / "training_summary.json")
        if split == "all":  # to say which --data the model trained on
            model_data = recorded_data(Path(model_dir) / "training_summary.json")
        test_frac = test_frac if test_frac is not None else recorded.get("test_frac", 0.1)
        split_seed = split_seed if split_seed is not None else recorded.get("seed", 0)
        split_rule = split_rule or recorded.get("rule")
        pinned = recorded.get("pinned", [])
    split_rule = split_rule or RECORDLESS_RULE
    if meta is None:
        raise ValueError("give a model folder, or a ModelMeta to score baselines alone")
    samples, load_report = load_samples(data, on_error=on_error)  # type: ignore[arg-type]
    attach_rl(samples, meta.rl_tokenizer)
    baseline_report = None
    if split == "test":
        train, test = split_by_group(samples, test_frac or 0.1, split_seed or 0, split_rule, pinned)
    elif split == "all":
        test = samples
        train = []
        if baseline_data:
            train, baseline_report = load_samples(baseline_data, on_error=on_error)  # type: ignore[arg-type]
            attach_rl(train, meta.rl_tokenizer)
    else:
        raise ValueError(f"split must be 'test' or 'all', got {split!r}")
    if not test:  # what was read, and skipped, says why (was: the held-out side alone)
        first = f"; first skipped: {load_report.examples[0]}" if load_report.examples else ""
        empty = "the held-out side is empty" if split == "test" else "no row to score"
        raise ValueError(f"{', '.join(map(str, data))}: nothing to evaluate: {empty} "
                         f"(read {load_report.summary()}{first})")
    scheme, spec = meta.buckets, meta.input
    tr_texts, te_texts = (baseline_texts(train, spec), baseline_texts(test, spec)) if train else ([], [])
    overlap = None
    if baseline_report is not None and train and baselines:
        overlap = baseline_overlap(test, te_texts, train, tr_texts)
        if overlap == len(test):  # a copy of --data: every baseline score would be in-sample
            raise ValueError(f"{', '.join(map(str, baseline_data))}: every one of the {len(test)} scored samples of "
                             "--data is also a --baseline-data sample (the same input and length as the baselines "
                             "see them; a copy of the data?): the baselines would be scored on rows they trained "
                             "on; give --baseline-data that leaves them out, or no --baseline-data")
    rl = np.array([s.rl_tokens for s in test], dtype=float)

    probs: dict[str, np.ndarray] = {}
    if model_dir is not None:
        probs[MODEL] = predict_proba_torch(model_dir, iter_encoder_texts(test, spec), spec, progress=progress)
    skipped_baselines = []
    if train:
        tr_rl = np.array([s.rl_tokens for s in train], dtype=float)
        for name in baselines:
            try:
                probs[name] = BASELINES[name]().fit(tr_texts, tr_rl, scheme).predict_proba(te_texts)
            except ValueError as e:  # too few rows or classes, empty vocabulary: say so, go on
                skipped_baselines.append(f"{name}: {' '.join(str(e).split())}")
    elif baselines:
        why = ("the training side of the split is empty: every row of --data is held out" if split == "test"
               else "no training side (--split all without --baseline-data)" if baseline_report is None
               else f"--baseline-data holds no sample (read {baseline_report.summary()})")  # (was: "without")
        skipped_baselines = [f"{name}: {why}" for name in baselines]

    sources = sorted({s.source for s in test})
    src = np.array([s.source for s in test])
    report = {
        "format": "rlpredict.eval/1",
        "model": str(model_dir) if model_dir is not None else None,
        "model_weights_sha256": weights_sha256(model_dir) if model_dir is not None else None,
        "rl_tokenizer": meta.rl_tokenizer,
        "input": spec.to_dict(),
        "bucket_edges": [None if math.isinf(e) else e for e in scheme.edges],
        "split": ({"mode": split, "test_frac": test_frac, "seed": split_seed, "rule": split_rule,
                   "train_samples": len(train), "test_samples": len(test)} if split == "test" else
                  {"mode": split, "scored": ALL_ROWS, "model_trained_on": trained_on(data, model_data),
                   "train_samples": len(train), "test_samples": len(test)}),
        "load": load_report.summary(),
        "skipped_examples": load_report.examples,
        **({"baseline_load": baseline_report.summary(), "baseline_skipped_examples": baseline_report.examples}
           if baseline_report is not None else {}),
        **({"baseline_train_overlap": overlap} if overlap is not None else {}),
        # scored rows a model that reads the generator saw as 'model: unknown' (was: not said)
        **({"no_generator": unknown} if model_dir is not None and spec.include_generator
           and (unknown := sum(s.generator is None for s in test)) else {}),
        "reserve_quantile_predictive": reserve_quantile,
        "baselines_skipped": skipped_baselines,
        "all": {m: scores(rl, p, scheme, reserve_quantile) for m, p in probs.items()},
        "sources": {s: {m: scores(rl[src == s], p[src == s], scheme, reserve_quantile)
                        for m, p in probs.items()} for s in sources} if len(sources) > 1 else {},
    }
    report["verdict"] = verdict(report["all"], paired_p(rl, probs, scheme, report["all"]), len(test))
    return report, probs, test


#: What ``--split all`` scores (said in the report: the model may have trained on some of it).
ALL_ROWS = "every row of --data, including any the model trained on"


def scores(rl: np.ndarray, probs: np.ndarray, scheme: BucketScheme, q: float) -> dict[str, float | None]:
    """``rl_metrics``, with Kendall's tau None (not defined) for fewer than 2 rows: its 0.0
    there would read as a model that ranks nothing."""
    m: dict[str, float | None] = dict(rl_metrics(rl, probs, scheme, q))
    if rl.size < 2:
        m["kendall_tau"] = None
    return m


def _best_tfidf(metrics: dict[str, dict]) -> str | None:
    tfidf = [m for m in ("tfidf_ridge", "tfidf_logreg") if m in metrics]
    return min(tfidf, key=lambda m: metrics[m]["mae"]) if tfidf else None


def paired_t_p(rl: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: BucketScheme) -> float | None:
    """Two-sided p of a paired t-test (``scipy.stats.ttest_rel``) on the rows' absolute errors of
    two models' point predictions (probabilities ``a`` and ``b``): whether the MAE difference is
    more than the rows' noise (a rank test, such as Wilcoxon's, asks which wins on most rows,
    another question). None for fewer than 2 rows; 1 when every row's errors tie."""
    if len(rl) < 2:
        return None
    from scipy.stats import ttest_rel

    d = np.abs(decode(a, scheme).pred_tokens - rl) - np.abs(decode(b, scheme).pred_tokens - rl)
    if not np.any(d != d[0]):  # no spread: every row says the same
        return 1.0 if d[0] == 0 else 0.0
    return float(ttest_rel(d, np.zeros_like(d)).pvalue)


def p_text(p: float) -> str:
    return "p < 1e-15" if p < 1e-15 else f"p = {p:.2g}"


def times(a: float, b: float) -> str:
    """``a`` as a multiple of ``b`` ("0.93x"; "inf x" past a ``b`` of 0, "1.00x" for two 0s: was
    a ZeroDivisionError when a baseline scored every held-out row exactly)."""
    return f"{a / b:.2f}x" if b > 0 else "1.00x" if a == 0 else "inf x"


def paired_p(rl: np.ndarray, probs: dict[str, np.ndarray], scheme: BucketScheme,
             metrics: dict[str, dict]) -> float | None:
    """``paired_t_p`` of the model against the better TF-IDF baseline (None: nothing to compare)."""
    best = _best_tfidf(metrics)
    if MODEL not in probs or best is None:
        return None
    return paired_t_p(rl, probs[MODEL], probs[best], scheme)


def verdict(metrics: dict[str, dict], p: float | None = None, n: int | None = None) -> str:
    """Whether the model's MAE beats the better TF-IDF baseline's; with ``n`` (the rows scored)
    and ``p`` (``paired_p``), a difference the rows cannot tell from noise (p >= 0.05, or a
    single row) is said to be one."""
    if MODEL not in metrics:
        return "no model scored"
    best = _best_tfidf(metrics)
    if best is None:
        return "no TF-IDF baseline scored"
    mae, base = metrics[MODEL]["mae"], metrics[best]["mae"]
    word = "beats" if mae < base else "does NOT beat"
    line = f"model MAE {mae:.1f} = {times(mae, base)} {best} ({base:.1f}): the model {word} TF-IDF"
    if n is not None and n < 2:
        return line + f", but {n} row cannot tell the two apart"
    if p is None:
        return line
    test = "paired t-test on the rows' absolute errors"
    if p >= 0.05:  # was: a firm verdict on 14 held-out rows
        return line + f", but the {n} rows cannot tell the two apart ({test}, {p_text(p)})"
    return line + f" ({test} over {n} rows, {p_text(p)})"


def confusion_dict(rl: np.ndarray, probs: np.ndarray, scheme: BucketScheme, source: str) -> dict:
    return {"format": "rlpredict.confusion/1",
            "bucket_edges": [None if math.isinf(e) else e for e in scheme.edges],
            "point_tokens": list(scheme.point_tokens), "reserve_tokens": list(scheme.reserve_tokens),
            "matrix": confusion(rl, probs, scheme).tolist(), "source": source}


COLUMNS = [("n", "n", "{:d}"), ("bucket_acc", "acc", "{:.3f}"), ("within1_acc", "±1", "{:.3f}"),
           ("mae", "MAE", "{:.1f}"), ("acc50", "Acc-50", "{:.3f}"), ("acc100", "Acc-100", "{:.3f}"),
           ("kendall_tau", "tau", "{:.3f}"), ("coverage", "cover", "{:.3f}"),
           ("reserve_ratio_total", "res/RL tot", "{:.2f}"), ("reserve_ratio_mean", "res/RL mean", "{:.2f}")]


def markdown_table(metrics: dict[str, dict], reserve_quantile: float = 0.9) -> str:
    """One row per method; the last two columns are ``rl_metrics``' at ``reserve_quantile``."""
    tag = quantile_tag(reserve_quantile)
    columns = [*COLUMNS, (f"coverage_{tag}", f"cover {tag}", "{:.3f}"),
               (f"reserve_ratio_total_{tag}", f"res/RL tot {tag}", "{:.2f}")]
    lines = ["| method | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for m, row in metrics.items():  # None: not defined (tau of fewer than 2 rows)
        lines.append(f"| {m} | " + " | ".join("n/a" if row[k] is None else f.format(row[k]) for k, _, f in columns)
                     + " |")
    return "\n".join(lines)


def _settings(d: dict) -> str:
    """``{'mode': 'history', 'max_length': 48}`` as ``mode history, max_length 48``."""
    return ", ".join(f"{k} {v}" for k, v in d.items())


def split_line(report: dict) -> str:
    """What was scored, and what the baselines trained on, in words."""
    sp = report["split"]
    if sp["mode"] == "test":
        text = (f"test: the held-out groups of the model's split ({_settings({k: sp[k] for k in ('test_frac', 'seed', 'rule')})})"
                f"; {sp['test_samples']} samples scored, the baselines trained on the {sp['train_samples']} others")
    else:
        fitted = any(m != MODEL for m in report["all"])  # (was: "the baselines trained on" with none asked for)
        text = f"all: {sp['test_samples']} samples scored, {sp['scored']}; " + (
            "no --baseline-data" if "baseline_load" not in report else
            f"the baselines trained on {sp['train_samples']} --baseline-data samples" if fitted else
            f"{sp['train_samples']} --baseline-data samples read, no baseline fitted")
        if sp.get("model_trained_on"):
            text += f"; **the model trained on {', '.join(sp['model_trained_on'])}**"
    if report.get("baseline_train_overlap"):
        text += (f"; **{report['baseline_train_overlap']} scored samples are also --baseline-data samples** (the "
                 "baselines trained on rows they are scored on)")
    if unknown := report.get("no_generator"):
        text += f"; **{no_generator_note(f'{unknown} scored sample(s)', GENERATOR_FIELDS, 'the model')}**"
    return text


#: Where a row's generator is read (``rlpredict.records``' log fields).
GENERATOR_FIELDS = "'generator' or 'model'"


def markdown_report(report: dict) -> str:
    q = report["reserve_quantile_predictive"]
    skipped = report["baselines_skipped"]
    out = ["# RL predictor evaluation\n",
           f"- model: `{report['model']}`", f"- RL tokens: `{report['rl_tokenizer']}`; input: {_settings(report['input'])}",
           f"- split: {split_line(report)}", f"- data: {report['load']}",
           *([f"- baseline data: {report['baseline_load']}"] if "baseline_load" in report else []),
           "- coverage / res/RL: the scheme's per-bucket reservation of the predicted bucket; "
           f"`{quantile_tag(q)}`: the quantile of the predicted length distribution",
           f"\n**{report['verdict']}**\n",
           *(["Baselines skipped:\n", *(f"- {line}" for line in skipped), ""] if skipped else []),
           "## All sources\n", markdown_table(report["all"], q)]
    for s, m in report["sources"].items():
        out += [f"\n## {s}\n", markdown_table(m, q)]
    return "\n".join(out) + "\n"


def write_report(report: dict, probs: dict[str, np.ndarray], test: Sequence[Sample], scheme: BucketScheme,
                 out_dir: str | Path, *, force: bool = False) -> None:
    """Write the report folder (JSON, Markdown, confusion plots) atomically; an existing one
    is replaced only with ``force``, and only if ``eval`` wrote it (``rlpredict.outputs``).

    Written as ``eval/`` in a trained model's folder (``rlpredict eval``'s default), it is part
    of that model (``outputs.PARTS``): ``train --force`` replaces it with the model (was:
    "another run's output (MODEL/eval)", and a second run of train, eval, train failed)."""
    with output_dir(out_dir, force=force, tool=EVAL_TOOL) as tmp:
        _write_report(report, probs, test, scheme, tmp)


def _write_report(report: dict, probs: dict[str, np.ndarray], test: Sequence[Sample], scheme: BucketScheme,
                  out: Path) -> None:
    rl = np.array([s.rl_tokens for s in test], dtype=float)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown_report(report))
    for name, p in probs.items():
        plot_confusion(confusion(rl, p, scheme), scheme.edges, f"{name} (n={len(rl)})", out / f"confusion_{name}.png")
    main = MODEL if MODEL in probs else next(iter(probs), None)
    if main is not None:
        src = f"{main} of {report['model']} on {', '.join(sorted({s.source for s in test}))} ({report['split']['mode']} split, n={len(rl)})"
        write_text_atomic(out / "confusion.json", json.dumps(confusion_dict(rl, probs[main], scheme, src)) + "\n")
