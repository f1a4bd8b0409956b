"""Write held-out rows (the eval split's test side, as JSONL) for export's parity/int8 check.

    python training/heldout_rows.py --out runs/heldout_parity.jsonl --per-source 600 \\
        ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz:conversation_id \\
        ../shared/data/alpaca_eval_outputs/alpaca_eval_outputs.jsonl.gz:prompt_id

Uses the shipped recipe's split (test_frac 0.1, seed 0, split_rule "id"), so no row was trained on.
A recipe split by "copies" (the default) joins ids that share a row: some rows written here
may then be on its training side.
"""

from __future__ import annotations

import argparse
import json
import random

from rlpredict.cli_boundary import ScriptParser, arg_file, arg_number, run_script
from rlpredict.outputs import atomic_path, check_file_output, resolved
from rlpredict.records import rows_with
from rlpredict.splits import MAX_TEST_FRAC, in_test


def held_out(path: str, field: str, test_frac: float, seed: int) -> list[str]:
    """The rows of ``path`` (any format ``rlpredict`` reads) whose ``field`` puts them on the
    test side, as JSONL lines. The field must hold a string or an integer, as training reads a
    group (was: null and objects hashed as ``"None"``, ``"{'a': 1}"``); a null or empty one, which
    training would replace by another field or the row's content, is refused: pick a field every
    row fills."""
    def named(row: dict) -> tuple[str, str] | None:
        return (field, "empty: training would group the row by its content") if row[field] == "" else None

    return [json.dumps(row, ensure_ascii=False) + "\n" for row in rows_with(path, {field: (str, int)}, named)
            if in_test(str(row[field]), test_frac, seed)]


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="FILE:GROUP_FIELD (any format rlpredict reads)")
    ap.add_argument("--out", type=arg_file, required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    ap.add_argument("--per-source", type=arg_number(int, 1), default=600)
    ap.add_argument("--test-frac", type=arg_number(float, 0, MAX_TEST_FRAC, low_open=True), default=0.1,
                    help=f"the training split's test fraction, in (0, {MAX_TEST_FRAC}] as training takes it "
                    "(default 0.1)")  # (was: up to 1, every row held out)
    ap.add_argument("--seed", type=arg_number(int, 0), default=0)
    args = ap.parse_args()
    sources = []
    for spec in args.sources:
        path, sep, field = spec.rpartition(":")
        if not sep or not path or not field:
            ap.error(f"{spec!r}: expected FILE:GROUP_FIELD")
        if any(resolved(path) == resolved(p) for p, _ in sources):
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
