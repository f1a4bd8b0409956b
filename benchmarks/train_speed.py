"""Training speed: a revision's training loop against the ``transformers.Trainer`` loop of this tree.

    python benchmarks/train_speed.py --rev REV --steps 12 --rounds 2
    python benchmarks/train_speed.py --rev REV --steps 30 --rounds 3 --json runs/train_speed.json

Written for the move from the hand-written loop to the Trainer (commit ebec005, run in that
change's working tree with ``--rev HEAD``: the loop of the commit before it). Every later commit
holds the Trainer too, so against any of them there is nothing to compare: the script says so
and exits 2 when ``REV``'s file is this tree's.

The old ``rlpredict/train/trainer.py`` is read with ``git show REV:rlpredict/train/trainer.py`` into a temporary
module, so both loops run in this one process on the same prepared data (the bundled ShareGPT
and AlpacaEval samples), the same encoder (all-MiniLM-L6-v2), the same settings (length 128,
batch 32, full fine-tuning, ordinal loss) and the same threads. Runs alternate (old, Trainer,
old, Trainer, ...) so that load from other jobs hits both alike. The Trainer runs without
evaluation and checkpoints, as the old loop did. Examples/s counts training steps only (model
loading and saving excluded, as each loop's own summary reports it). Prints a Markdown table;
the ratio is Trainer / old (>= 1: the Trainer is not slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from rlpredict.cli_boundary import ScriptParser, arg_file, arg_number, run_script
from rlpredict.outputs import check_file_output, write_text_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def old_loop(rev: str, folder: Path) -> ModuleType:
    """``rlpredict/train/trainer.py`` as of ``rev``, imported as the module ``rlpredict_train_old``."""
    src = subprocess.run(["git", "show", f"{rev}:rlpredict/train/trainer.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    if src == (ROOT / "rlpredict" / "train" / "trainer.py").read_text(encoding="utf-8"):
        print(f"error: --rev {rev}: its rlpredict/train/trainer.py is this tree's (the Trainer): nothing to "
              "compare (the hand-written loop is gone since commit ebec005)", file=sys.stderr)
        sys.exit(2)
    path = folder / "rlpredict_train_old.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("rlpredict_train_old", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision of the other loop (default HEAD)")
    ap.add_argument("--steps", type=arg_number(int, 1), default=16, help="optimizer steps per run")
    ap.add_argument("--rounds", type=arg_number(int, 1), default=2, help="runs of each loop (alternating)")
    ap.add_argument("--batch-size", type=arg_number(int, 1), default=32)
    ap.add_argument("--max-length", type=arg_number(int, 8), default=128)
    ap.add_argument("--threads", type=arg_number(int, 1), default=2, help="torch threads (the project's CPU budget: 2 cores)")
    ap.add_argument("--json", type=arg_file, help="also write the results here")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = ap.parse_args()
    if args.json:
        check_file_output(args.json, force=args.force, option="--json")
    if subprocess.run(["git", "cat-file", "-e", f"{args.rev}:rlpredict/train/trainer.py"], cwd=ROOT,
                      capture_output=True).returncode:
        sys.exit(f"--rev {args.rev}: no rlpredict/train/trainer.py at that git revision")

    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train import trainer as new
    from rlpredict.train.config import TrainConfig

    cfg = TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], max_steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, include_generator=True, threads=args.threads, seed=0,
                      eval_rows=0, save_checkpoints=False)
    prep = new.prepare(cfg)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = old_loop(args.rev, Path(tmp))
        loops = {"old": lambda out: old.train(cfg, out, prepared=prep, progress=False),
                 "trainer": lambda out: new.train(dataclasses.replace(cfg), out, prepared=prep, progress=False)}
        for r in range(args.rounds):
            for name, run in loops.items():
                t = time.perf_counter()
                s = run(Path(tmp) / f"{name}-{r}")
                rows.append({"round": r + 1, "loop": name, "steps": s["steps"], "examples": s["examples_seen"],
                             "examples_per_second": s["examples_per_second"], "wall_s": round(time.perf_counter() - t, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    med = {n: statistics.median(r["examples_per_second"] for r in rows if r["loop"] == n) for n in ("old", "trainer")}
    print(f"\n{args.steps} steps x batch {args.batch_size}, length {args.max_length}, {args.threads} threads, "
          f"old loop = {args.rev}\n")
    print("| round | old loop ex/s | Trainer ex/s | Trainer / old |\n|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        o, t = (next(x["examples_per_second"] for x in rows if x["round"] == r and x["loop"] == n)
                for n in ("old", "trainer"))
        print(f"| {r} | {o:.2f} | {t:.2f} | {t / o:.2f} |")
    print(f"| median | {med['old']:.2f} | {med['trainer']:.2f} | {med['trainer'] / med['old']:.2f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": rows,
                                                 "median": med}, indent=2) + "\n")


if __name__ == "__main__":
    run_script(main)
