"""Replay speed of two source trees, interleaved in one run (a before/after check for refactors).

Each tree gets its own worker process (``PYTHONPATH`` = the tree); the cells of
``benchmarks/sim_speed.py`` (policy x rate scale) run alternately in the two workers, ``--repeat``
times each, so both see the same machine load. The table gives the best (least) wall and CPU
seconds of each cell (the least disturbed run, as ``timeit`` reports), the after/before CPU
ratio, and whether the two trees made the same decisions (a hash of every request's times and
of the counters that are not 0, so that a counter one tree lacks and the other leaves at 0 does
not differ; "yes (log rows grouped differently)" where the iteration logs differ, as when
one tree splits runs of decode-only iterations into more rows). Then each tree's own
``sim_speed.py`` decision benchmark (512 running; ``--repeat`` runs, each decision's least CPU
time, where that tree's benchmark takes the least of several runs).

``--instructions N`` counts instead of timing: each cell replays the first N requests of the
trace once per tree under valgrind (``cachegrind --cache-sim=no``), and the table gives the
instructions the replay executed (less those of a run that stops just before it: interpreter
start, imports, reading the trace). Instruction counts do not depend on the machine's load, so
small differences show on a busy machine too; they weigh every instruction alike (a cache miss
costs more time than an add), so confirm large changes in time.

Usage: git worktree add --detach /tmp/before HEAD
       python benchmarks/sim_speed_ab.py --shared ../shared/data --before /tmp/before [--after .] [--rate-scales 0.3,1]
       [--policies vllm,ecoserve] [--repeat 3] [--no-decision] [--instructions 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rlpredict.cli_boundary import (
    ScriptParser,
    add_trace_input,
    arg_list,
    arg_number,
    arg_path,
    run_script,
)
from rlpredict.outputs import resolved

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFUSION = ROOT / "tests" / "ecoserve" / "fixtures" / "confusion_sharegpt.json"
POLICIES = ("vllm", "sarathi", "orca", "s3", "sjf", "ecoserve", "ecoserve-oracle")

WORKER = r"""
import argparse, contextlib, hashlib, io, json, sys, time
sys.path.insert(0, "benchmarks")
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.predictions import load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import read_trace
trace, cost, conf = read_trace(sys.argv[1]), load_profile(sys.argv[2]), load_confusion(sys.argv[3])
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "decision":
        import sim_speed
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sim_speed.decision_time(argparse.Namespace(backlog=cmd["backlog"], decision_repeat=cmd["repeat"]))
        print(json.dumps({"text": out.getvalue()}), flush=True)
        continue
    t0, c0 = time.perf_counter(), time.process_time()
    res = run(trace.scaled(cmd["scale"]), cmd["policy"], cost, slo=SLO(5.0, 0.2), predictions="confusion",
              confusion=conf)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [(r.first_token_s, r.finish_s, r.generated, r.preemptions) for r in res.requests]
    fp = hashlib.sha256(repr((rows, sorted((k, v) for k, v in res.counters.items() if v))).encode()).hexdigest()[:12]
    fp_log = hashlib.sha256(repr(res.log).encode()).hexdigest()[:12]
    print(json.dumps({"wall": wall, "cpu": cpu, "iterations": sum(r[2] for r in res.log),
                      "rows": len(res.log), "fp": fp,
                      "fp_log": fp_log}), flush=True)
"""


COUNTED = r"""
import hashlib, sys
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.predictions import load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import read_trace
trace, cost, conf = read_trace(sys.argv[1]), load_profile(sys.argv[2]), load_confusion(sys.argv[3])
policy, scale, n, replay = sys.argv[4], float(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
t = trace.scaled(scale).head(n)
if replay:
    res = run(t, policy, cost, slo=SLO(5.0, 0.2), predictions="confusion", confusion=conf)
    rows = [(r.first_token_s, r.finish_s, r.generated, r.preemptions) for r in res.requests]
    print(hashlib.sha256(repr((rows, sorted((k, v) for k, v in res.counters.items() if v))).encode()).hexdigest()[:12])
"""


def count_instructions(tree: Path, args: argparse.Namespace, policy: str, scale: float, replay: bool) -> tuple[int, str]:
    """Instructions of one run of ``COUNTED`` under valgrind, and the decisions' hash it printed."""
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable,
           "-c", COUNTED, str(args.trace), args.profile, str(args.confusion), policy, str(scale),
           str(args.instructions), "1" if replay else "0"]
    out = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode or not m:
        sys.exit(f"valgrind run failed in {tree} ({policy}, rate scale {scale}): {out.stderr.strip()[-300:]}")
    return int(m.group(1).replace(",", "")), out.stdout.strip()


def instructions_table(args: argparse.Namespace) -> None:
    trees = {"before": resolved(args.before), "after": resolved(args.after)}
    base = {n: count_instructions(t, args, args.policies[0], args.rate_scales[0], False)[0] for n, t in trees.items()}
    print(f"## Instructions per replay of the first {args.instructions:,} requests, before ({args.before}) "
          f"vs after ({args.after})\n")
    print("| policy | rate scale | M instructions before | M instructions after | after/before | same decisions |")
    print("|---|---|---|---|---|---|")
    for scale in args.rate_scales:
        for p in args.policies:
            got = {n: count_instructions(t, args, p, scale, True) for n, t in trees.items()}
            b, a = (got[n][0] - base[n] for n in ("before", "after"))
            same = "yes" if got["before"][1] == got["after"][1] else "NO"
            print(f"| {p} | {scale:g} | {b / 1e6:,.0f} | {a / 1e6:,.0f} | {a / b:.3f} | {same} |")


def _same(a: dict, b: dict) -> str:
    if a["fp"] != b["fp"]:
        return "NO"
    return "yes" if a["fp_log"] == b["fp_log"] else "yes (log rows grouped differently)"


class Worker:
    """A Python process importing ``ecoserve_sched`` from ``tree``, answering one command a line."""

    def __init__(self, tree: Path, args: argparse.Namespace) -> None:
        env, self.tree = {**os.environ, "PYTHONPATH": str(tree)}, tree
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.trace), args.profile,
                                      str(args.confusion)], cwd=tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **cmd: object) -> dict:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # (was: "Expecting value: line 1 column 1", naming neither; a reviewer's find)
            raise RuntimeError(f"the worker for the tree {self.tree} exited (rc {self.proc.wait()}); its "
                               "error is above")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=arg_path, required=True, help="source tree of the baseline (a git worktree)")
    ap.add_argument("--after", type=arg_path, default=ROOT, help="source tree to compare (default: this one)")
    trace_input = add_trace_input(ap)
    ap.add_argument("--profile", default="llama2-13b-a100-80gb", help="cost-model profile")
    ap.add_argument("--confusion", type=arg_path, default=DEFAULT_CONFUSION, help="confusion matrix for predictions")
    ap.add_argument("--rate-scales", default="0.3,1", type=arg_list(arg_number(float, 0, low_open=True)),
                    help="rate scales to replay at")
    ap.add_argument("--policies", default=",".join(POLICIES), type=arg_list(str),
                    help="policies to replay (comma-separated)")
    ap.add_argument("--decision", action=argparse.BooleanOptionalAction, default=True,
                    help="also run each tree's decision benchmark")
    ap.add_argument("--repeat", type=arg_number(int, 1), default=3, help="runs per cell and tree (the best is reported)")
    ap.add_argument("--backlog", type=arg_number(int, 0), default=2000, help="waiting requests in the decision benchmark")
    ap.add_argument("--instructions", type=arg_number(int, 0), default=0, metavar="N",
                    help="count instructions (valgrind) over the first N requests instead of timing")
    args = ap.parse_args()
    trace_input(args)
    args.trace, args.confusion = resolved(args.trace), resolved(args.confusion)
    for tree, option in ((args.before, "--before"), (args.after, "--after")):
        if not (tree / "ecoserve_sched" / "simulator.py").is_file():
            sys.exit(f"{tree}: {option} is not a source tree of this project (no ecoserve_sched/simulator.py)")
    for path in (args.trace, args.confusion):
        if not path.is_file():
            sys.exit(f"{path}: no such file")
    from ecoserve_sched.cost_model import (
        load_profile,  # this tree's rules, before any worker starts
    )
    from ecoserve_sched.policies import policy_names
    from ecoserve_sched.predictions import load_confusion
    from ecoserve_sched.trace import read_trace

    load_profile(args.profile)
    load_confusion(args.confusion)
    read_trace(args.trace)  # a bad row is one line here, not a traceback from each worker
    if unknown := [p for p in args.policies if p not in policy_names()]:
        ap.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(sorted(policy_names()))}")
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("--instructions needs valgrind on the PATH")
        instructions_table(args)
        return
    workers = {"before": Worker(resolved(args.before), args), "after": Worker(resolved(args.after), args)}
    print(f"## Replay speed, before ({args.before}) vs after ({args.after}), interleaved\n")
    print("| policy | rate scale | wall s before | wall s after | CPU s before | CPU s after | after/before CPU "
          "| iterations | log rows before / after | same decisions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = {"before": 0.0, "after": 0.0}
    for scale in args.rate_scales:
        for p in args.policies:
            got: dict[str, list[dict]] = {"before": [], "after": []}
            for k in range(args.repeat):
                for name in (("before", "after") if k % 2 == 0 else ("after", "before")):
                    got[name].append(workers[name].ask(cmd="replay", policy=p, scale=scale))
            best = {n: {m: min(g[m] for g in got[n]) for m in ("wall", "cpu")} for n in got}
            b, a = got["before"][0], got["after"][0]
            for n in total:
                total[n] += best[n]["cpu"]
            print(f"| {p} | {scale:g} | {best['before']['wall']:.2f} | {best['after']['wall']:.2f} | "
                  f"{best['before']['cpu']:.2f} | {best['after']['cpu']:.2f} | "
                  f"{best['after']['cpu'] / best['before']['cpu']:.3f} | {a['iterations']:,} | "
                  f"{b['rows']:,} / {a['rows']:,} | {_same(a, b)} |")
    print(f"\nTotal CPU s (best of {args.repeat}): before {total['before']:.2f}, after {total['after']:.2f} "
          f"({total['after'] / total['before']:.3f}x)\n")
    for name, w in workers.items():
        if args.decision:
            text = w.ask(cmd="decision", backlog=args.backlog, repeat=args.repeat)["text"]
            print(f"### Decision time, {name}\n{text}")
        w.close()


if __name__ == "__main__":
    run_script(main)
