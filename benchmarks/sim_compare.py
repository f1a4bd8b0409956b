"""All policies on a real trace at several loads, plus capacity (max rate scale at >= 90% SLO
attainment) of each capacity policy, with the ratio to vLLM computed in the same run.

Usage (defaults: Azure 2023 conversation trace, Llama-2-13B on A100-80GB, TTFT 5 s, TBT 0.2 s):
  python benchmarks/sim_compare.py [--trace PATH] [--profile NAME] [--confusion FILE]
      [--rate-scales 0.1,0.2,0.3,0.4] [--slo-ttft 5] [--slo-tbt 0.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ecoserve_sched.compare import RunSpec, capacity, markdown_table, sweep, write_report
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.predictions import load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.trace import read_trace
from rlpredict.cli_boundary import run_script
from rlpredict.outputs import check_new_dir, check_paths, output_dir

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = ROOT / ".." / "shared" / "data" / "azure_llm_2023_conv" / "azure_llm_2023_conv.csv.gz"
DEFAULT_CONFUSION = ROOT / "tests" / "ecoserve" / "fixtures" / "confusion_sharegpt.json"
ALL = "vllm,sarathi,orca,s3,sjf,ecoserve,ecoserve-nopipe,ecoserve-noorder,ecoserve-nogroup,ecoserve-oracle"


def rel(p: str | Path) -> str:
    return os.path.relpath(Path(p).resolve(), Path.cwd())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--profile", default="llama2-13b-a100-80gb")
    ap.add_argument("--confusion", default=str(DEFAULT_CONFUSION), help="measured confusion.json (or bundle)")
    ap.add_argument("--predictions", default="confusion", help="annotated|confusion|oracle|bundle")
    ap.add_argument("--policies", default=ALL)
    ap.add_argument("--rate-scales", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--capacity-policies", default="vllm,sarathi,sjf,ecoserve,ecoserve-nopipe,ecoserve-oracle")
    ap.add_argument("--slo-ttft", type=float, default=5.0)
    ap.add_argument("--slo-tbt", type=float, default=0.2)
    ap.add_argument("--capacity-start", type=float, default=0.25, help="first rate scale probed")
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--out", default="out/sim_compare")
    args = ap.parse_args()
    check_paths([args.trace, args.confusion], [("--out", args.out)])
    check_new_dir(args.out, force=True, option="--out")  # new, or a folder this script wrote

    t0 = time.perf_counter()
    trace = read_trace(args.trace)
    if args.max_requests:
        trace = trace.head(args.max_requests)
    cost = load_profile(args.profile)
    spec = RunSpec(trace, cost, SLO(args.slo_ttft, args.slo_tbt), args.predictions,
                   load_confusion(args.confusion))
    print(f"trace {rel(args.trace)} ({len(trace)} requests), profile {cost.name} "
          f"(KV {cost.kv_blocks(16)} blocks of 16 tokens), SLO TTFT {args.slo_ttft:g} s, "
          f"mean TBT {args.slo_tbt:g} s")
    print(f"predictions: {args.predictions}, confusion matrix {rel(args.confusion)} "
          f"(source: {spec.confusion.source})\n")
    rows = sweep(spec, args.policies.split(","), [float(x) for x in args.rate_scales.split(",")])
    with output_dir(args.out, force=True, tool="benchmarks/sim_compare.py") as tmp:
        write_report(rows, tmp, header=f"trace {Path(args.trace).name}, profile {cost.name}")
    print(markdown_table(rows))
    print("\n| policy | max rate scale (>= 90% SLO) | x vLLM | probes |")
    print("|---|---|---|---|")
    caps = {}
    for p in args.capacity_policies.split(","):
        c = capacity(spec, p, hi=args.capacity_start)
        caps[p] = c["max_rate_scale"]
        ratio = caps[p] / caps["vllm"] if caps.get("vllm") else float("nan")
        print(f"| {p} | {caps[p]:.3f} | {ratio:.2f} | {len(c['probes'])} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; table, results.json and plots in {args.out}")


if __name__ == "__main__":
    run_script(main)
