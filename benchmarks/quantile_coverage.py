"""Coverage of calibrated quantiles (``rlpredict calibrate``) against the honest alternatives.

    python benchmarks/quantile_coverage.py --data ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz \\
        --data ../shared/data/alpaca_eval_outputs/alpaca_eval_outputs.jsonl.gz

Takes the held-out side of the bundle's recorded training split, predicts once with the bundle,
then, over ``--splits`` random divisions of the held-out *conversations* into a calibration half
and a check half, measures on the check half, for quantile ``--q``: coverage (share of responses
at or below the reservation: mean, 10th percentile and minimum over the divisions) and reserved
tokens / generated tokens (total), for

- ``constant``: the calibration half's q-quantile of response lengths for every prompt;
- ``raw``: the model's predictive q-quantile, uncalibrated;
- ``conformal``: split conformal, one offset;
- ``mondrian``: split conformal per predicted bucket (``rlpredict calibrate``'s default), the
  buckets with fewer than ``MIN_GROUP`` calibration prompts pooled into one rest group;
- ``mondrian-global-rest``: the same, those buckets taking the offset over all prompts (the rule
  before December 2026, which the shipped bundle's first calibration used; it was recalibrated
  with the rest group since);
- ``mondrian-pac``: ``mondrian`` with ``confidence`` 0.9 counted in conversations.

Coverage is also given over the check half's prompts predicted into the small buckets, where the
two rules differ.

Then across sources (calibrate on one, check on another: not exchangeable, so no guarantee).

Last, ``rlpredict drift``'s coverage verdict on halves that did not drift and on lengths scaled
by 1.1-1.3: its standard error counting conversations (now) against counting rows (before
December 2026), in the same run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from rlpredict.cli_boundary import ScriptParser, arg_number, arg_path, distinct_args, run_script
from rlpredict.data import attach_rl, load_samples
from rlpredict.serve.calibrate import held_out
from rlpredict.serve.conformal import MIN_GROUP, QuantileCalibration
from rlpredict.serve.runtime import Predictor
from rlpredict.splits import RECORDLESS_RULE, group_keys, recorded_split


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=arg_path, action="append", required=True, help="labelled chat logs (repeatable)")
    ap.add_argument("--model", type=arg_path, default=None, help="bundle (default: the shipped one)")
    ap.add_argument("--q", type=arg_number(float, 0, 0.999, low_open=True), default=0.9)
    ap.add_argument("--splits", type=arg_number(int, 1), default=30)
    ap.add_argument("--seed", type=arg_number(int, 0), default=0)
    args = ap.parse_args()
    distinct_args(ap, "--data", args.data)

    p = Predictor.load(args.model)
    samples, load = load_samples(args.data)
    pool, how = held_out(samples, p.bundle.manifest, "test", None, None)
    groups = np.array(group_keys(pool, recorded_split(p.bundle.manifest).get("rule", RECORDLESS_RULE)))
    if len(set(groups)) < 2:
        sys.exit(f"{', '.join(map(str, args.data))}: {len(pool)} held-out prompts; the splits need rows of at "
                 "least two held-out conversations")
    attach_rl(pool, p.bundle.rl_tokenizer)
    probs = p.predict_arrays([s.messages for s in pool], [s.generator for s in pool]).probs
    rl = np.array([s.rl_tokens for s in pool], dtype=float)
    src = np.array([s.source for s in pool])
    q, scheme = args.q, p.scheme
    print(f"## Calibrated q{q}: {p.bundle.name}, {len(pool)} held-out prompts in "
          f"{len(set(groups))} conversations ({how}; {load.summary()})\n")

    def reserve(method: str, fit: np.ndarray) -> np.ndarray:
        if method == "constant":
            return np.full(len(rl), np.quantile(rl[fit], q))
        if method == "raw":
            return scheme.quantile_tokens(probs, q)
        kw = {"min_group": 10**9} if method == "conformal" else {}
        if method == "mondrian-pac":
            kw = {"confidence": 0.9, "clusters": groups[fit]}
        cal = QuantileCalibration.fit(scheme, probs[fit], rl[fit], [q], **kw)
        if method == "mondrian-global-rest":
            small = np.asarray(cal.group_n) < cal.min_group
            offsets = cal.log_offsets.copy()
            offsets[:, small] = cal.global_log_offsets[:, None]
            cal = replace(cal, log_offsets=offsets)
        return cal.tokens(scheme, probs, [q])[:, 0]

    methods = ("constant", "raw", "conformal", "mondrian", "mondrian-global-rest", "mondrian-pac")
    bucket = probs.argmax(axis=1)
    rng = np.random.default_rng(args.seed)
    uniq = np.unique(groups)
    res: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    small_n = []
    for _ in range(args.splits):
        fit = np.isin(groups, uniq[rng.random(len(uniq)) < 0.5])
        chk = ~fit
        small = chk & (np.bincount(bucket[fit], minlength=scheme.n_buckets)[bucket] < MIN_GROUP)
        small_n.append(int(small.sum()))
        for m in methods:
            r = reserve(m, fit)
            res[m].append((float(np.mean(rl[chk] <= r[chk])), float(r[chk].sum() / rl[chk].sum()),
                           float(np.mean(rl[small] <= r[small])) if small.any() else np.nan))
    print(f"### Over {args.splits} random halvings of the held-out conversations (check half)\n")
    print(f"Small buckets: predicted buckets with fewer than {MIN_GROUP} calibration prompts; "
          f"{np.mean(small_n):.0f} check prompts fall in them on average.\n")
    print("| method | coverage mean | coverage p10 | coverage min | reserved/actual mean | "
          "coverage in small buckets, mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        a = np.array(res[m])
        print(f"| {m} | {a[:, 0].mean():.3f} | {np.quantile(a[:, 0], 0.1):.3f} | {a[:, 0].min():.3f} | "
              f"{a[:, 1].mean():.2f}x | {np.nanmean(a[:, 2]):.3f} |")

    names = sorted(set(src))
    if len(names) > 1:
        print("\n### Across sources (calibrate on one, check on the other: no guarantee)\n")
        print("| calibrated on | checked on | method | coverage | reserved/actual |")
        print("|---|---|---|---:|---:|")
        for a_name in names:
            for b_name in names:
                if a_name == b_name:
                    continue
                fit, chk = src == a_name, src == b_name
                for m in ("constant", "raw", "mondrian"):
                    r = reserve(m, fit)
                    print(f"| {a_name} | {b_name} | {m} | {np.mean(rl[chk] <= r[chk]):.3f} | "
                          f"{r[chk].sum() / rl[chk].sum():.2f}x |")

    drift_alarms(probs, rl, src, groups, scheme, args.seed)


def drift_alarms(probs: np.ndarray, rl: np.ndarray, src: np.ndarray, groups: np.ndarray, scheme, seed: int) -> None:
    """``rlpredict drift``'s coverage verdict on halves that did not drift (calibrate on a random
    half of the conversations, judge the other half, or the calibration half itself) and on
    lengths scaled up: the cluster-aware error against the row-counted one (before December
    2026), in the same run. Groups: all rows and each source, as ``drift`` forms them."""
    from rlpredict.serve.drift import DriftBounds, group_report

    qs, bounds = (0.5, 0.9), DriftBounds()
    uniq = np.unique(groups)
    print("\n### `rlpredict drift` on undrifted and drifted halves (coverage at q0.5, q0.9)\n")
    print("| judged | halvings | drift said: rows counted (before) | drift said: conversations counted (now) |")
    print("|---|---:|---:|---:|")
    for label, scale, n_split, insample in (("the other half", 1.0, 200, False), ("the calibration half itself", 1.0, 200, True),
                                            ("the other half, lengths x1.1", 1.1, 50, False),
                                            ("the other half, lengths x1.2", 1.2, 50, False),
                                            ("the other half, lengths x1.3", 1.3, 50, False)):
        rng = np.random.default_rng(seed)
        said = [0, 0]
        for _ in range(n_split):
            fit = np.isin(groups, uniq[rng.random(len(uniq)) < 0.5])
            chk = fit if insample else ~fit
            cal = QuantileCalibration.fit(scheme, probs[fit], rl[fit], qs, clusters=groups[fit])
            tokens = cal.tokens(scheme, probs[chk], qs)
            y = np.ceil(rl[chk] * scale)
            index, counts = cal.offset_groups()
            offset_of = index[probs[chk].argmax(axis=1)]  # each row's offset group, as drift_report forms it
            for k, (cl, n_cal) in enumerate(((None, 0), (groups[chk], (offset_of, counts)))):
                said[k] += any(group_report(name, probs[chk][m], y[m], tokens[m], qs, None, scheme, bounds,
                                            None if cl is None else cl[m],
                                            n_cal if k == 0 else (n_cal[0][m], n_cal[1]),
                                            coverage_decides=k == 0 or name == "all")["problems"]
                               for name, m in [("all", np.ones(len(y), bool)), *((x, src[chk] == x) for x in np.unique(src))]
                               if m.sum() >= bounds.min_rows)
        print(f"| {label} | {n_split} | {said[0]} | {said[1]} |")


if __name__ == "__main__":
    run_script(main)
