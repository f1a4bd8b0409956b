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
from pathlib import Path

from rlpredict.cli_boundary import arg_number, run_script
from rlpredict.outputs import atomic_path, check_file_output
from rlpredict.splits import in_test


def held_out(path: str, field: str, test_frac: float, seed: int) -> list[str]:
    """The raw lines of ``path`` (gzip JSONL) whose ``field`` puts them on the test side."""
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a JSON row ({e})") from None
                group = row.get(field) if isinstance(row, dict) else None
                if group is None:
                    raise ValueError(f"{path}:{n}: field {field!r}: missing")
                if in_test(group, test_frac, seed):
                    rows.append(line)
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable gzip JSONL file ({e})") from None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="FILE.jsonl.gz:GROUP_FIELD")
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    ap.add_argument("--per-source", type=arg_number(int, 1), default=600)
    ap.add_argument("--test-frac", type=arg_number(float, 0, 1, low_open=True), default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sources = []
    for spec in args.sources:
        path, sep, field = spec.rpartition(":")
        if not sep or not path or not field:
            ap.error(f"{spec!r}: expected FILE.jsonl.gz:GROUP_FIELD")
        if any(Path(path).resolve() == Path(p).resolve() for p, _ in sources):
            ap.error(f"{path} is given twice (its rows would count twice)")
        sources.append((path, field))
    check_file_output(args.out, force=args.force, option="--out", inputs=[p for p, _ in sources])
    with atomic_path(args.out) as tmp, tmp.open("w", encoding="utf-8") as out:
        for path, field in sources:
            rows = held_out(path, field, args.test_frac, args.seed)
            random.Random(0).shuffle(rows)
            out.writelines(rows[:args.per_source])
            print(f"{path}: {len(rows)} held-out rows, wrote {min(len(rows), args.per_source)}")


if __name__ == "__main__":
    run_script(main)
