"""Rebuild the main job's request sample, ``ecoserve_sched/samples/azure_conv_sharegpt.jsonl.gz``.

    python training/make_demo_trace.py --shared ../shared/data --force    # replaces the bundled one

The Azure conversation trace has real arrival times and token counts but no text; ShareGPT has
real prompts and responses but no arrival times. Each of the first ``--requests`` Azure requests
keeps its arrival time and prompt length (``input_tokens``: the KV the request really needed)
and is given the prompt of a **held-out** ShareGPT turn (never trained on by the shipped
predictor: same conversation split, test_frac 0.1, seed 0) whose real response length in
Llama-3 tokens is the closest to the Azure request's ``output_tokens``. ``output_tokens`` is
that ShareGPT response's length, so every prompt keeps its own real response length, while the
length distribution follows Azure's (``azure_output_tokens`` keeps the original). Prompts are cut
at 2,000 characters (the predictor reads the first 128 tokens). Deterministic; gzip mtime 0.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import io
import json
import random
from pathlib import Path

from ecoserve_sched.trace import read_trace
from rlpredict.cli_boundary import (
    SHARED_AZURE_CONV,
    ScriptParser,
    arg_file,
    arg_number,
    arg_path,
    run_script,
)
from rlpredict.outputs import check_file_output, write_bytes_atomic
from rlpredict.records import rows_with
from rlpredict.rl_tokenizers import count_tokens
from rlpredict.splits import in_test

OUT = Path(__file__).resolve().parents[1] / "ecoserve_sched" / "samples" / "azure_conv_sharegpt.jsonl.gz"


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=arg_path, required=True, help="the shared data folder, holding azure_llm_2023_conv/ and sharegpt_v3/")
    ap.add_argument("--requests", type=arg_number(int, 1), default=1500)
    ap.add_argument("--out", type=arg_file, default=OUT)
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = ap.parse_args()
    if not str(args.out).endswith(".jsonl.gz"):  # it writes gzipped JSONL (was: under any name, a .jsonl too)
        ap.error(f"--out: the trace is gzipped JSONL: give a name ending in .jsonl.gz, got {str(args.out)!r:.200}")
    shared = Path(args.shared)
    azure_path = shared / SHARED_AZURE_CONV
    sharegpt_path = shared / "sharegpt_v3" / "sharegpt_v3.jsonl.gz"
    check_file_output(args.out, force=args.force, option="--out", inputs=[azure_path, sharegpt_path], apart=[shared])

    trace = read_trace(azure_path).head(args.requests)  # checked row by row, named by file and line
    azure = [{"arrival_time_s": a, "input_tokens": i, "output_tokens": o} for a, i, o in
             zip(trace.arrival_s, trace.input_tokens.tolist(), trace.output_tokens.tolist(), strict=True)]

    turns = []
    for r in rows_with(sharegpt_path, {"conversation_id": str, "prompt": str, "response": str, "generator": str,
                                       "turn": int}):
        if in_test(r["conversation_id"], 0.1, 0) and r["prompt"].strip():
            turns.append(r)
    rl = count_tokens([t["response"] for t in turns], "llama3")
    pool = sorted(zip(rl, range(len(turns)), strict=True))  # (response tokens, turn index), unused ones
    print(f"{len(turns)} held-out ShareGPT turns, {len(azure)} Azure requests")

    if len(turns) < len(azure):  # each request takes a turn of its own (was: "min() arg is an empty sequence")
        raise SystemExit(f"--requests {args.requests}: more than the {len(turns)} held-out ShareGPT turns to draw from")
    order = list(range(len(azure)))
    random.Random(0).shuffle(order)  # no request is favoured by its position when pool runs thin
    chosen: dict[int, tuple[int, int]] = {}
    for i in order:
        want = int(azure[i]["output_tokens"])
        j = bisect.bisect_left(pool, (want, -1))
        cands = [k for k in (j - 1, j) if 0 <= k < len(pool)]
        k = min(cands, key=lambda c: abs(pool[c][0] - want))
        chosen[i] = pool.pop(k)

    buf = io.BytesIO()
    gaps = []
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        for i, a in enumerate(azure):
            tokens, t = chosen[i]
            turn = turns[t]
            gaps.append(abs(tokens - int(a["output_tokens"])))
            row = {"arrival_time_s": round(float(a["arrival_time_s"]), 6),
                   "input_tokens": int(a["input_tokens"]), "output_tokens": tokens,
                   "azure_output_tokens": int(a["output_tokens"]),
                   "prompt": turn["prompt"][:2000], "generator": turn["generator"],
                   "conversation_id": turn["conversation_id"], "turn": turn["turn"]}
            g.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    write_bytes_atomic(args.out, buf.getvalue())
    gaps.sort()
    print(f"{args.out.name}: {len(azure)} rows, {len(buf.getvalue()) / 1024:.0f} KiB; "
          f"|ShareGPT RL - Azure RL| median {gaps[len(gaps) // 2]}, p90 {gaps[int(0.9 * len(gaps))]}, "
          f"max {gaps[-1]} tokens")


if __name__ == "__main__":
    run_script(main)
