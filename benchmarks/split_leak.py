"""Held-out rows that are copies of training rows, and what they do to a bundle's scores.

    python benchmarks/split_leak.py --data ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz

The group split keeps each conversation (``conversation_id``) on one side, but a chat log can
hold the same conversation under several ids. This takes the bundle's recorded split of
``--data``, counts the held-out rows whose context (every message before the response) and
response both appear on the training side, and scores the bundle (stacked, and its encoder and
TF-IDF head alone when it has one) on all held-out rows, on those copies and on the rest. Then
it counts the copies under each split rule (``rlpredict.splits.SPLIT_RULES``) at the same
``test_frac`` and seed: ``copies``, the default for new trainings, leaves none by construction.
"""

from __future__ import annotations

import json

import numpy as np

from rlpredict.cli_boundary import ScriptParser, arg_path, distinct_args, run_script
from rlpredict.data import attach_rl, load_samples
from rlpredict.serve.runtime import Predictor
from rlpredict.splits import SPLIT_RULES, recorded_split, split_by_group
from rlpredict.train.metrics import rl_metrics


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=arg_path, action="append", required=True, help="labelled chat logs (repeatable)")
    ap.add_argument("--model", type=arg_path, default=None, help="bundle (default: the shipped one)")
    args = ap.parse_args()
    distinct_args(ap, "--data", args.data)

    p = Predictor.load(args.model)
    split = recorded_split(p.bundle.manifest)
    if split.get("test_frac") is None:
        raise SystemExit(f"{p.bundle.path}: the bundle records no training split")
    samples, load = load_samples(args.data)
    frac, seed, rule = float(split["test_frac"]), int(split.get("seed", 0)), split["rule"]

    def context(s: object) -> str:
        return json.dumps(s.messages, sort_keys=True)  # type: ignore[attr-defined]

    def copies(rule: str) -> tuple[list, np.ndarray]:
        train, test = split_by_group(samples, frac, seed, rule)
        seen: dict[str, set[str]] = {}
        for s in train:
            seen.setdefault(context(s), set()).add(s.response)
        return test, np.array([s.response in seen.get(context(s), ()) for s in test], dtype=bool)

    test, copy = copies(rule)
    if not test:  # was: "nan%" and numpy's warnings, exit 0
        raise SystemExit(f"{', '.join(map(str, args.data))}: none of the {len(samples)} rows is on the held-out "
                         f"side of the bundle's split (test_frac {frac}): nothing to measure")
    groups = {s.group for s, c in zip(test, copy, strict=True) if c}
    print(f"{p.bundle.name} on {', '.join(map(str, args.data))} ({load.summary()}): split test_frac "
          f"{frac}, seed {seed}, rule {rule}; {len(test)} held-out rows, {int(copy.sum())} "
          f"({copy.mean():.1%}) are copies of a training-side row (context and response), from "
          f"{len(groups)} of {len({s.group for s in test})} held-out conversations\n")
    attach_rl(test, p.bundle.rl_tokenizer)
    texts = p.texts([s.messages for s in test], [s.generator for s in test])
    enc = p.logits_of_ids(p.encode(texts))
    probs = {"bundle": p.from_logits(p.combine(enc, texts)).probs.astype(np.float64)}
    if p.bundle.lexical is not None:
        probs["encoder alone"] = p.from_logits(enc).probs.astype(np.float64)
        probs["tfidf head alone"] = p.bundle.lexical.lexical_probs(texts)
    rl = np.array([s.rl_tokens for s in test], dtype=float)
    print("| model | rows | n | MAE | tau | bucket acc |")
    print("|---|---|---:|---:|---:|---:|")
    for name, pr in probs.items():
        for rows, m in (("all", np.ones_like(copy)), ("copies", copy), ("the rest", ~copy)):
            if m.sum() >= 2:
                r = rl_metrics(rl[m], pr[m], p.scheme)
                print(f"| {name} | {rows} | {int(m.sum())} | {r['mae']:.1f} | {r['kendall_tau']:.3f} | "
                      f"{r['bucket_acc']:.3f} |")
    print("\n| split rule | held-out rows | copies of a training row |")
    print("|---|---:|---:|")
    for other in SPLIT_RULES:
        held, c = (test, copy) if other == rule else copies(other)
        print(f"| {other}{' (the bundle' + chr(39) + 's)' if other == rule else ''} | {len(held)} | "
              f"{int(c.sum())} ({c.mean():.1%}) |")


if __name__ == "__main__":
    run_script(main)
