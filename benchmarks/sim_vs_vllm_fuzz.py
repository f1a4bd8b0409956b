"""Differential fuzzing: the simulator against vLLM's own scheduler, on small random cases.

    python benchmarks/sim_vs_vllm_fuzz.py --cases 2000 --seed 3000000 --out runs/fuzz.jsonl
    python benchmarks/sim_vs_vllm_fuzz.py --replay tests/engines/fixtures/sim_vs_vllm_cases.jsonl
    python benchmarks/sim_vs_vllm_fuzz.py --shrink runs/fuzz.jsonl:1 --out runs/case.json

Each case is drawn from its seed (``ecoserve_sched.engines.differential.random_case``: a few
requests to a few hundred, caches of one block to thousands, budgets down to one token a
sequence, bursts, predictions exact, short, long or missing, EcoServe's settings on and off;
KV blocks of 16 tokens, vLLM's default, or of the sizes ``--block-sizes`` lists) and
replayed twice, by the simulator and by vLLM's own scheduler class, with the same clock and cost
model (``differential.differences``): every request's first-token and finish times, generated
tokens and preemptions, and the preemption, park and amortized-chunk counts must agree. Two
pairs: ``vllm``, the simulator's vLLM policy against vLLM's ``Scheduler`` (the baseline: the
simulator's model of vLLM itself), and ``ecoserve``, the simulator's EcoServe without swapping
against EcoServe inside vLLM's scheduler (the plug-in). Cases run in parallel processes
(``--workers``), each within ``--timeout`` seconds (a case of thousands of blocks and hundreds of
requests takes up to a minute on a busy core: one over the limit is reported, not judged).

The table gives each pair's cases, how many agree, differ and ran over the limit; then every
case that did not agree, its seed and its first differences. ``--out`` keeps them, one JSON
object a line (seed, pair, differences, case), rewritten as each one comes in, so an
interrupted run keeps what it found; ``--replay`` checks such files (or the kept cases of the
tests) again, ``--shrink FILE:LINE`` reduces one case that differs to fewer requests and
plainer numbers. Exit 1 if any case differs or ran over the limit (or, with ``--against
engine-core``, if every case was skipped), else 0. vLLM's own log
lines below errors are not shown (a line or two a case otherwise).

``--against engine-core`` checks the engine replays' own loop instead: each case is replayed by
its pair's engine policy (vLLM's scheduler class in the serving loop: ``vllm-real`` or
``ecoserve-vllm-real``), once with vLLM's synchronous engine loop and once with its asynchronous
one (``async-vllm-real``, ``ecoserve-async-vllm-real``), and served by vLLM's own ``EngineCore``
with the same scheduler class under the same simulated clock (``engines/engine_core.py``).
A case keeps only the requests such an engine can take on its cache (``differential.engine_core_case``;
how many were left out is printed), one with none left is counted as skipped; besides what the
simulator's check compares, the steps must agree (how many, each one's end and tokens). The
step timing, the sampled tokens and the predictions are shared by both sides (``vllm_sim``'s),
so what is checked independently is the engine loop: when steps are scheduled, run and read,
and when arriving requests join. ``--shrink`` is for the simulator's check only.

Usage: python benchmarks/sim_vs_vllm_fuzz.py [--cases N] [--seed S] [--pairs vllm,ecoserve] [--max-requests N]
           [--block-sizes 16] [--against simulator|engine-core] [--workers N] [--timeout S] [--out FILE [--force]]
       python benchmarks/sim_vs_vllm_fuzz.py --replay FILE [FILE ...] [--against ...] [--workers N] [--timeout S]
           [--out FILE]
       python benchmarks/sim_vs_vllm_fuzz.py --shrink FILE:LINE --out FILE [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from ecoserve_sched.engines.differential import (
    PAIRS,
    Case,
    differences,
    engine_core_case,
    engine_core_differences,
    random_case,
    shrink,
)
from rlpredict.cli_boundary import (
    ScriptParser,
    arg_file,
    arg_list,
    arg_number,
    arg_path,
    run_script,
    worker_pool,
)
from rlpredict.outputs import check_file_output, write_text_atomic

_SETUP: dict[str, Any] = {}


class _OverTime(BaseException):  # (not an Exception: ``differential.replay`` reports those as results)
    pass


def _alarm(*_: Any) -> None:
    raise _OverTime


def _quiet_vllm() -> None:
    logging.getLogger("vllm").setLevel(logging.ERROR)


#: ``--against engine-core``: the engine policies, by pair and loop (the table's rows)
ENGINE_POLICIES = {("vllm", False): "vllm-real", ("vllm", True): "async-vllm-real",
                   ("ecoserve", False): "ecoserve-vllm-real", ("ecoserve", True): "ecoserve-async-vllm-real"}


def _init(pairs: list[str], max_requests: int, block_sizes: list[int], timeout: int, against: str) -> None:
    _quiet_vllm()
    _SETUP.update(pairs=pairs, max_requests=max_requests, block_sizes=tuple(block_sizes), timeout=timeout,
                  against=against)
    signal.signal(signal.SIGALRM, _alarm)


def _check(job: tuple[int | None, str, dict | None]) -> list[dict[str, Any]]:
    """One case (drawn from its seed, or given), replayed by both sides within the time limit
    (``--against engine-core``: in each engine loop, each a result)."""
    seed, where, given = job
    if given is not None:
        case = Case.from_json(given)
    else:
        pairs = _SETUP["pairs"]
        case = random_case(random.Random(seed), pairs[0] if len(pairs) == 1 else None, _SETUP["max_requests"],
                           _SETUP["block_sizes"])
    if _SETUP["against"] == "simulator":
        checks: list[tuple[str, Case, Any]] = [(case.pair, case, differences)]
    elif (served := engine_core_case(case)) is None:
        return [{"seed": seed, "where": where, "pair": case.pair, "status": "skipped", "differences": [],
                 "requests": 0, "left_out": len(case), "cpu_s": 0.0, "case": case.to_json()}]
    else:
        checks = [(ENGINE_POLICIES[case.pair, a], served, lambda c, a=a: engine_core_differences(c, a))
                  for a in (False, True)]
    out: list[dict[str, Any]] = []
    for row, c, check in checks:
        t0 = time.process_time()
        signal.alarm(_SETUP["timeout"])
        try:
            diffs = check(c)
            status = "differ" if diffs else "agree"
        except _OverTime:
            diffs, status = [f"over the {_SETUP['timeout']} s limit"], "limit"
        finally:
            signal.alarm(0)
        out.append({"seed": seed, "where": where, "pair": row, "status": status, "differences": diffs,
                    "requests": len(c), "left_out": 0 if out else len(case) - len(c),
                    "cpu_s": time.process_time() - t0, "case": c.to_json()})
    return out


def _read_cases(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, case object) of each line of a JSONL file of cases (bare, or under a
    ``case`` key, as ``--out`` writes them); a bad line: one line naming it, exit 2."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e.reason})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: not JSON ({e.msg})") from None
        obj = obj.get("case", obj) if isinstance(obj, dict) else obj
        try:
            Case.from_json(obj)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{where}: {e}") from None
        out.append((where, obj))
    if not out:
        raise SystemExit(f"{path}: no case in it")
    return out


def _shrink(args: argparse.Namespace) -> int:
    path, _, line = args.shrink.rpartition(":")
    if not path.strip() or not line.isdigit() or int(line) < 1:
        raise SystemExit(f"--shrink: FILE:LINE expected (a line number from 1), got {args.shrink!r}")
    if args.out is None:
        raise SystemExit("--shrink: give --out FILE for the reduced case")
    try:
        source = arg_path(path)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--shrink: {e}") from None
    check_file_output(args.out, force=args.force, option="--out", inputs=[source])
    cases = dict(_read_cases(source))
    line = str(int(line))
    where = f"{source}:{line}"
    if where not in cases:
        raise SystemExit(f"--shrink: {path} has no case on line {line}")
    case = Case.from_json(cases[where])
    if not differences(case):
        raise SystemExit(f"{where}: the simulator and vLLM agree on this case; nothing to shrink")
    t0 = time.perf_counter()
    small = shrink(case, lambda c: bool(differences(c)))
    diffs = differences(small)
    write_text_atomic(args.out, json.dumps({"differences": diffs, "case": small.to_json()}) + "\n")
    print(f"{where}: {len(case)} requests -> {len(small)}, {case.kv_blocks} KV blocks -> {small.kv_blocks} "
          f"({time.perf_counter() - t0:.0f} s); written to {args.out}")
    for d in diffs[:8]:
        print(f"  {d}")
    return 1


def _write(out: Path | None, found: list[dict]) -> None:
    if out is not None:
        write_text_atomic(out, "".join(json.dumps({k: r[k] for k in ("seed", "where", "pair", "differences", "case")})
                                       + "\n" for r in found))


def main() -> int:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=arg_number(int, 1), default=200, help="random cases to draw (default 200)")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="the first case's seed; the others follow")
    ap.add_argument("--pairs", type=arg_list(str), default="vllm,ecoserve",
                    help=f"pairs the cases are drawn for ({', '.join(PAIRS)})")
    ap.add_argument("--max-requests", type=arg_number(int, 1), default=200,
                    help="at most this many requests a case (default 200)")
    ap.add_argument("--block-sizes", type=arg_list(arg_number(int, 1, 1024)), default="16",
                    help="KV block sizes the cases are drawn with (e.g. 8,16,32,64; default 16)")
    ap.add_argument("--workers", type=arg_number(int, 1), default=os.cpu_count() or 1,
                    help="parallel processes (default: one per CPU)")
    ap.add_argument("--timeout", type=arg_number(int, 1, 86400), default=600,
                    help="seconds a case may take (default 600)")
    ap.add_argument("--against", choices=("simulator", "engine-core"), default="simulator",
                    help="what vLLM's scheduler is checked against: the simulator's policies (default), or "
                         "the engine replays against vLLM's own EngineCore loop")
    ap.add_argument("--replay", type=arg_path, nargs="+", help="check the cases of these JSONL files instead")
    ap.add_argument("--shrink", metavar="FILE:LINE", help="reduce the case on this line of a JSONL file")
    ap.add_argument("--out", type=arg_file, help="write the cases that did not agree (JSONL; --shrink: the case)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = ap.parse_args()
    if unknown := [p for p in args.pairs if p not in PAIRS]:
        ap.error(f"--pairs: unknown pair {unknown[0]!r}; choose from {', '.join(PAIRS)}")
    drawn = [o for o, v, d in (("--cases", args.cases, 200), ("--seed", args.seed, 0),
                                ("--max-requests", args.max_requests, 200), ("--block-sizes", args.block_sizes, [16]),
                                ("--pairs", args.pairs, ["vllm", "ecoserve"])) if v != d]
    if args.shrink and args.replay:
        ap.error("--shrink and --replay: give one")
    if args.shrink and args.against != "simulator":
        ap.error("--shrink reduces a case of the simulator's check (--against simulator)")
    if (args.shrink or args.replay) and drawn:
        ap.error(f"{drawn[0]} draws random cases; it does not apply to --{'shrink' if args.shrink else 'replay'}")
    _quiet_vllm()
    if args.shrink:
        return _shrink(args)
    if args.out is not None:
        check_file_output(args.out, force=args.force, option="--out", inputs=args.replay or [])
    if args.replay:
        jobs = [(None, where, obj) for path in args.replay for where, obj in _read_cases(path)]
        what = f"{len(jobs)} cases from {', '.join(str(p) for p in args.replay)}"
    else:
        jobs = [(s, "", None) for s in range(args.seed, args.seed + args.cases)]
        what = f"{args.cases} random cases, seeds {args.seed} to {args.seed + args.cases - 1}"
    title = ("The simulator against vLLM's own scheduler" if args.against == "simulator"
             else "The engine replays against vLLM's own EngineCore")
    print(f"## {title}: {what}\n")
    t0 = time.perf_counter()
    results, found = [], []
    with worker_pool(min(args.workers, len(jobs)), _init,
                     (args.pairs, args.max_requests, args.block_sizes, args.timeout, args.against)) as pool:
        for rs in pool.map(_check, jobs, chunksize=1):
            results += rs
            if bad := [r for r in rs if r["status"] in ("differ", "limit")]:
                found += bad
                _write(args.out, found)
    wall = time.perf_counter() - t0
    print(f"| {'pair' if args.against == 'simulator' else 'engine policy'} | cases | agree | differ | "
          "over the time limit | requests | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = ((("vllm", "vllm (baseline: the simulator's vLLM policy)"), ("ecoserve", "ecoserve (the plug-in)"))
              if args.against == "simulator" else [(p, p) for p in ENGINE_POLICIES.values()])
    for pair, label in labels:
        rows = [r for r in results if r["pair"] == pair]
        if rows:
            count = {s: sum(r["status"] == s for r in rows) for s in ("agree", "differ", "limit")}
            print(f"| {label} | {len(rows):,} | {count['agree']:,} | {count['differ']:,} | {count['limit']:,} | "
                  f"{sum(r['requests'] for r in rows):,} | {sum(r['cpu_s'] for r in rows):,.0f} |")
    procs = min(args.workers, len(jobs))
    skipped, left_out = sum(r["status"] == "skipped" for r in results), sum(r.get("left_out", 0) for r in results)
    print(f"\n{len(jobs):,} cases in {wall:,.0f} s on {procs} process{'es' if procs > 1 else ''}"
          + (f"; {skipped:,} skipped: no request of theirs fits an engine on their cache" if skipped else ""))
    if left_out:
        print(f"{left_out:,} requests left out of the cases: longer than an engine on their cache can take")
    if skipped == len(jobs):
        print("nothing was checked: every case was skipped")
        return 1
    for r in found:
        name = r["where"] or f"seed {r['seed']}"
        print(f"\n{name} ({r['pair']}, {r['requests']} requests, {r['case']['kv_blocks']} KV blocks):")
        for d in r["differences"][:5]:
            print(f"  {d}")
        if len(r["differences"]) > 5:
            print(f"  ... {len(r['differences']) - 5} more")
    if args.out is not None:
        _write(args.out, found)
        print(f"\n{args.out}: the {len(found)} cases that did not agree")
    return 1 if found else 0


if __name__ == "__main__":
    run_script(main)
