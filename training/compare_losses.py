"""Cross-entropy vs the ordinal loss (and full fine-tuning vs LoRA), same data, same budget.

    python training/compare_losses.py --data ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz \\
        --rows 3000 --eval-rows 2000

Trains each variant on the same subsample of the training side and scores it on the same
held-out rows (split by conversation). Expected time on 2 cores: ~5 min per variant at the
defaults. Prints a Markdown table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from rlpredict.cli_boundary import (
    ScriptParser,
    arg_file,
    arg_list,
    arg_number,
    arg_path,
    distinct_args,
    run_script,
)
from rlpredict.outputs import check_file_output, write_text_atomic
from rlpredict.train.config import TrainConfig
from rlpredict.train.evaluate import encoder_texts, predict_proba_torch
from rlpredict.train.metrics import rl_metrics
from rlpredict.train.trainer import prepare, train

VARIANTS = {
    "full+ce": {"loss": "ce"},
    "full+ordinal": {"loss": "ordinal"},
    "lora+ordinal": {"loss": "ordinal", "method": "lora", "lr": 5e-4},
}


#: The table's columns: metric -> (header, format), as docs/predictor.md quotes them.
COLUMNS = {"bucket_acc": ("acc", "{:.3f}"), "within1_acc": ("±1", "{:.3f}"), "mae": ("MAE", "{:.1f}"),
           "acc100": ("Acc-100", "{:.3f}"), "kendall_tau": ("tau", "{:.3f}"), "coverage": ("cover", "{:.3f}"),
           "reserve_ratio_total": ("reserved/actual", "{:.3f}"), "pred_buckets_used": ("buckets predicted", "{}"),
           "train_s": ("train s", "{:.0f}")}


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=arg_path, action="append", required=True, help="data file (repeatable)")
    ap.add_argument("--rows", type=arg_number(int, 1), default=3000, help="training samples per variant")
    ap.add_argument("--eval-rows", type=arg_number(int, 2), default=2000,  # (tau needs 2: was, "0" for 1)
                    help="held-out samples scored (at least 2)")
    ap.add_argument("--variants", type=arg_list(str), default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--json", type=arg_file, help="also write the results here")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = ap.parse_args()
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    distinct_args(ap, "--data", args.data)
    if args.json:
        check_file_output(args.json, force=args.force, option="--json", inputs=args.data)

    base = TrainConfig(data=[str(p) for p in args.data], max_rows=args.rows, lr=6e-5, include_generator=True,
                       eval_rows=0, save_checkpoints=False)  # scored below, on the same rows for every variant
    prep = prepare(base)
    if len(prep.train) < args.rows:  # said, and recorded as trained (was: --rows in the JSON, silently)
        print(f"note: {len(prep.train)} training-side samples, fewer than --rows {args.rows}: every variant "
              "trains on those", flush=True)
    if len(prep.test) < 2:  # was: trained every variant, then NaN scores and a JSON file with NaN in it
        raise SystemExit(f"the held-out side has {len(prep.test)} row(s) of {len(prep.train) + len(prep.test)}: "
                         "at least 2 are needed to score a variant; give more --data rows")
    test = random.Random(0).sample(prep.test, min(args.eval_rows, len(prep.test)))
    rl = np.array([s.rl_tokens for s in test], dtype=float)
    rows = {}
    for name in args.variants:
        cfg = dataclasses.replace(base, **VARIANTS[name])
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(cfg, Path(tmp) / "m", prepared=prep)
            probs = predict_proba_torch(Path(tmp) / "m", encoder_texts(test, cfg.input_spec), cfg.input_spec)
        rows[name] = {**rl_metrics(rl, probs, prep.scheme), "train_s": summary["train_seconds"],
                      "pred_buckets_used": int(np.unique(probs.argmax(1)).size)}
        print(name, json.dumps(rows[name]), flush=True)
    print("\n| variant | " + " | ".join(label for label, _ in COLUMNS.values()) + " |\n|---"
          + "|---" * len(COLUMNS) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(fmt.format(r[k]) for k, (_, fmt) in COLUMNS.items()) + " |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"rows": len(prep.train), "rows_asked": args.rows,
                                                "eval_rows": len(test), "results": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    run_script(main)
