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

from rlpredict.cli_boundary import run_script
from rlpredict.outputs import atomic_path, check_file_output
from rlpredict.splits import in_test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="FILE.jsonl.gz:GROUP_FIELD")
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    ap.add_argument("--per-source", type=int, default=600)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sources = []
    for spec in args.sources:
        path, sep, field = spec.rpartition(":")
        if not sep or not path or not field:
            ap.error(f"{spec!r}: expected FILE.jsonl.gz:GROUP_FIELD")
        sources.append((path, field))
    check_file_output(args.out, force=args.force, option="--out", inputs=[p for p, _ in sources])
    with atomic_path(args.out) as tmp, tmp.open("w", encoding="utf-8") as out:
        for path, field in sources:
            rows = []
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    group = json.loads(line).get(field) if line.strip() else None
                    if group is None:
                        raise ValueError(f"{path}:{n}: field {field!r}: missing")
                    if in_test(group, args.test_frac, args.seed):
                        rows.append(line)
            random.Random(0).shuffle(rows)
            out.writelines(rows[:args.per_source])
            print(f"{path}: {len(rows)} held-out rows, wrote {min(len(rows), args.per_source)}")


if __name__ == "__main__":
    run_script(main)
