"""All policies on a real trace at several loads, plus capacity (max rate scale at >= 90% SLO
attainment) of each capacity policy, with the ratio to vLLM computed in the same run.

Usage (defaults: Azure 2023 conversation trace, Llama-2-13B on A100-80GB, TTFT 5 s, TBT 0.2 s):
  python benchmarks/sim_compare.py (--shared DIR | --trace PATH) [--profile NAME] [--confusion FILE]
      [--rate-scales 0.1,0.2,0.3,0.4] [--slo-ttft 5] [--slo-tbt 0.2] [--out DIR]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ecoserve_sched.compare import RunSpec, capacity, ceiling, markdown_table, sweep, write_report
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.policies import get_policy
from ecoserve_sched.predictions import SOURCES, load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.trace import read_trace
from rlpredict.cli_boundary import (
    ScriptParser,
    add_trace_input,
    arg_list,
    arg_number,
    arg_path,
    run_script,
)
from rlpredict.outputs import check_new_dir, check_paths, output_dir, resolved

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFUSION = ROOT / "tests" / "ecoserve" / "fixtures" / "confusion_sharegpt.json"
TOOL = "benchmarks/sim_compare.py"
ALL = "vllm,sarathi,orca,s3,sjf,ecoserve,ecoserve-nopipe,ecoserve-noorder,ecoserve-oracle"


def rel(p: str | Path) -> str:
    return os.path.relpath(resolved(p), Path.cwd())


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    trace_input = add_trace_input(ap)
    ap.add_argument("--profile", default="llama2-13b-a100-80gb")
    ap.add_argument("--confusion", type=arg_path, default=str(DEFAULT_CONFUSION), help="measured confusion.json (or bundle)")
    ap.add_argument("--predictions", default="confusion", choices=[s for s in SOURCES if s != "bundle"],
                    help="predictions drawn from --confusion, the trace's own (annotated) or the true lengths")
    ap.add_argument("--policies", type=arg_list(str), default=ALL)
    ap.add_argument("--rate-scales", type=arg_list(arg_number(float, 0, low_open=True)), default="0.1,0.2,0.3,0.4")
    ap.add_argument("--capacity-policies", type=arg_list(str),
                    default="vllm,sarathi,sjf,ecoserve,ecoserve-nopipe,ecoserve-oracle")
    ap.add_argument("--slo-ttft", type=arg_number(float, 0, low_open=True), default=5.0)
    ap.add_argument("--slo-tbt", type=arg_number(float, 0, low_open=True), default=0.2)
    ap.add_argument("--capacity-start", type=arg_number(float, 0, low_open=True), default=0.25,
                    help="first rate scale probed")
    ap.add_argument("--max-requests", type=arg_number(int, 1), default=None)
    ap.add_argument("--out", type=arg_path, default="out/sim_compare", help="folder for the report (an earlier run's is replaced)")
    ap.add_argument("--force", action="store_true", help="accepted for older command lines: this script's earlier --out is replaced "
                    "without it, another tool's folder never")
    args = ap.parse_args()
    trace_input(args)
    check_paths([args.trace, args.confusion], [("--out", args.out)])
    check_new_dir(args.out, force=args.force, option="--out", rerun=TOOL, only=TOOL)
    cost = load_profile(args.profile)
    for p in {*args.policies, *args.capacity_policies}:
        get_policy(p, cost)  # an unknown name: one line now, not after the sweep

    t0 = time.perf_counter()
    trace = read_trace(args.trace)
    if args.max_requests:
        trace = trace.head(args.max_requests)
    spec = RunSpec(trace, cost, SLO(args.slo_ttft, args.slo_tbt), args.predictions,
                   load_confusion(args.confusion))
    print(f"trace {rel(args.trace)} ({len(trace)} requests), profile {cost.name} "
          f"(KV {cost.kv_blocks(16)} blocks of 16 tokens), SLO TTFT {args.slo_ttft:g} s, "
          f"mean TBT {args.slo_tbt:g} s")
    print(f"predictions: {args.predictions}, confusion matrix {rel(args.confusion)} "
          f"(source: {spec.confusion.source})\n")
    rows = sweep(spec, args.policies, args.rate_scales)
    print(markdown_table(rows))
    top = ceiling(spec)  # how much room any policy has: the flooded server's throughput
    roof = top["ceiling_rate_scale"]
    lines = ["| policy | max rate scale (>= 90% SLO) | x vLLM | / saturation ceiling | probes |", "|---|---|---|---|---|"]
    caps = {}
    # vLLM's capacity is every ratio's baseline: measured first, and always (was: "n/a" for the
    # policies listed before it, and no ratio at all without it)
    for p in ["vllm", *(q for q in args.capacity_policies if q != "vllm")]:
        c = capacity(spec, p, hi=args.capacity_start)
        caps[p] = c["max_rate_scale"]  # None: no load probed held the SLO
        ratio = f"{caps[p] / caps['vllm']:.2f}" if caps[p] and caps.get("vllm") else "n/a"
        cap = "none" if caps[p] is None else f"{caps[p]:.3f}"
        share = f"{caps[p] / roof:.2f}" if caps[p] and roof else "n/a"
        lines.append(f"| {p} | {cap} | {ratio} | {share} | {len(c['probes'])} |")
    lines.append(f"\nsaturation ceiling: rate scale {roof:.4g}" if roof else f"\nsaturation ceiling: none ({top['note']})")
    if roof and not top.get("saturated", True):
        lines[-1] += f" ({top['note']})"
    print("\n" + "\n".join(lines))
    with output_dir(args.out, force=args.force, tool=TOOL, rerun=True) as tmp:
        write_report(rows, tmp, header=f"trace {Path(args.trace).name}, profile {cost.name}")
        (tmp / "capacity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; table, capacities, results.json and plots in {args.out}")


if __name__ == "__main__":
    run_script(main)
