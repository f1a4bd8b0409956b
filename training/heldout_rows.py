"""Write raw held-out rows (the eval split's test side) for export's parity/int8 check.

    python training/heldout_rows.py --out runs/heldout_parity.jsonl --per-source 600 \
        ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz:conversation_id \
        ../shared/data/alpaca_eval_outputs/alpaca_eval_outputs.jsonl.gz:prompt_id

Uses the same group split as training (test_frac 0.1, seed 0), so no row was trained on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random

from rlpredict.splits import in_test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="FILE.jsonl.gz:GROUP_FIELD")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-source", type=int, default=600)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        for spec in args.sources:
            path, field = spec.rsplit(":", 1)
            with gzip.open(path, "rt", encoding="utf-8") as f:
                rows = [line for line in f if in_test(json.loads(line)[field], args.test_frac, args.seed)]
            random.Random(0).shuffle(rows)
            out.writelines(rows[:args.per_source])
            print(f"{path}: {len(rows)} held-out rows, wrote {min(len(rows), args.per_source)}")


if __name__ == "__main__":
    main()
