"""Cross-check: the simulator's re-implemented `vllm` policy vs vLLM's own scheduler class
(`vllm-real`), same trace, clock and cost model; also the simulator's `ecoserve` vs EcoServe
inside vLLM's real scheduler (`ecoserve-vllm-real`, engines/vllm_scheduler.py: the same rules
module, policies/ecoserve_rules.py). Prints a Diff% table (LLMServingSim style:
(sim - real) / real).

The plug-in gets the cost model (as ``ECOSERVE_PROFILE`` would give it), so it takes the same
numbers from it as the simulator policy: each step's prompt budget and time, a prompt's prefill
seconds and the time of a decode step that reads the whole KV cache.

Usage (defaults: first 2,000 requests of the Azure 2023 conversation trace, Llama-2-13B on
A100-80GB, rate scales 0.2 and 0.3, SLO TTFT 5 s / TBT 0.2 s, both pairs):
  python benchmarks/sim_vs_vllm.py (--shared DIR | --trace PATH) [--max-requests N] [--rate-scales 0.2,0.3]
      [--pairs vllm,ecoserve] [--profile NAME] [--confusion FILE] [--kv-blocks N] [--json OUT]
      [--arrivals burst8 [--cv 2] [--seed 0]]

``--arrivals burst8`` replaces the trace's arrival times with the scenario grid's bursts (groups
of 8 simultaneous requests, the groups gamma arrivals with coefficient of variation ``--cv``, at
the trace's mean rate), where EcoServe parks decodes (the ``parks`` row). The ``amortized`` row
counts EcoServe's amortized chunks (docs/scheduler.md): ``--profile llama3-8b-a100-80gb
--slo-tbt 0.1`` is a setting where they run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.metrics import summarize
from ecoserve_sched.policies import Batch
from ecoserve_sched.predictions import load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import burst_arrivals, read_trace
from rlpredict.cli_boundary import (
    add_trace_input,
    arg_file,
    arg_list,
    arg_number,
    arg_path,
    run_script,
)
from rlpredict.outputs import check_file_output, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFUSION = ROOT / "tests" / "ecoserve" / "fixtures" / "confusion_sharegpt.json"
METRICS = ("tokens_per_iter", "iterations", "preemptions", "parks", "amortized", "p50_ttft_s", "p99_ttft_s",
           "p50_tbt_s", "p99_tbt_s", "mean_jct_s", "slo_attainment")
#: Each pair: the simulator's policy and the one inside vLLM's scheduler. vLLM V1 preempts by
#: recompute only; the simulator's ``ecoserve`` may swap a victim out where the cost model says
#: it is cheaper, ``ecoserve-recompute`` does not (what the plug-in can do).
PAIRS = {"vllm": ("vllm", "vllm-real"), "ecoserve": ("ecoserve", "ecoserve-vllm-real"),
         "ecoserve-recompute": ("ecoserve-recompute", "ecoserve-vllm-real")}


def measure(tr, policy: str, cost, slo: SLO, conf, kv_blocks: int | None = None) -> dict:
    """Summary plus mean scheduled tokens per iteration (prefill + decode tokens)."""
    prefill = [0]
    if policy.endswith("vllm-real"):
        res = run(tr, policy, cost, slo=slo, confusion=conf, kv_blocks=kv_blocks)
        tokens = float(np.mean(res.iter_tokens))
    else:
        from ecoserve_sched.policies import base

        orig = base.Scheduler.schedule

        def counting(self, now: float) -> Batch:
            b = orig(self, now)
            prefill[0] += b.prefill_tokens
            return b

        base.Scheduler.schedule = counting
        try:
            res = run(tr, policy, cost, slo=slo, confusion=conf, kv_blocks=kv_blocks)
        finally:
            base.Scheduler.schedule = orig
        decodes = sum(row[2] * row[3] for row in res.log)
        tokens = (prefill[0] + decodes) / sum(row[2] for row in res.log)
    s = summarize(res, slo)
    s["tokens_per_iter"] = tokens
    s["parks"] = res.counters.get("parks", 0)
    s["amortized"] = res.counters.get("amortized", 0)  # iterations given an amortized chunk
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trace_input = add_trace_input(ap)
    ap.add_argument("--max-requests", type=arg_number(int, 2), default=2000, help="replay the first N requests")
    ap.add_argument("--rate-scales", type=arg_list(arg_number(float, 0, low_open=True)), default="0.2,0.3", help="comma-separated arrival-rate scales")
    ap.add_argument("--pairs", default="vllm,ecoserve",
                    help=f"comma-separated pairs to compare: {', '.join(PAIRS)}")
    ap.add_argument("--profile", default="llama2-13b-a100-80gb", help="cost-model profile")
    ap.add_argument("--confusion", type=arg_path, default=str(DEFAULT_CONFUSION),
                    help="predictor confusion matrix the predictions are drawn from")
    ap.add_argument("--slo-ttft", type=arg_number(float, 0, low_open=True), default=5.0, help="TTFT SLO, seconds")
    ap.add_argument("--slo-tbt", type=arg_number(float, 0, low_open=True), default=0.2, help="TBT SLO, seconds")
    ap.add_argument("--kv-blocks", type=arg_number(int, 1), default=None,
                    help="KV blocks of 16 tokens on both sides (default: what the profile's GPU holds)")
    ap.add_argument("--json", type=arg_file, help="also write the rows to this JSON file")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    ap.add_argument("--arrivals", choices=("trace", "burst8"), default="trace",
                    help="trace: the trace's arrival times; burst8: bursts at its mean rate")
    ap.add_argument("--cv", type=arg_number(float, 0, low_open=True), default=2.0, help="burst8: coefficient of variation of the groups' gaps")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="burst8: seed of the arrivals")
    a = ap.parse_args()
    trace_input(a)
    unknown = set(a.pairs.split(",")) - set(PAIRS)
    if unknown:
        ap.error(f"unknown pair(s) {', '.join(sorted(unknown))}; choose from {', '.join(PAIRS)}")
    if a.json:
        check_file_output(a.json, force=a.force, option="--json", inputs=[a.trace, a.confusion], apart=[a.shared])
    tr = read_trace(a.trace).head(a.max_requests)
    if a.arrivals == "burst8":
        rate = (len(tr) - 1) / float(tr.arrival_s[-1] - tr.arrival_s[0])
        tr = tr.with_arrivals(burst_arrivals(len(tr), rate, cv=a.cv, burst=8, seed=a.seed))
    cost, conf, slo = load_profile(a.profile), load_confusion(a.confusion), SLO(a.slo_ttft, a.slo_tbt)
    print(f"trace {Path(a.trace).name} (first {len(tr)} requests{', burst8 arrivals' if a.arrivals != 'trace' else ''}), "
          f"profile {cost.name}, KV {a.kv_blocks or cost.kv_blocks(16)} blocks of 16 tokens, predictions: confusion "
          f"{Path(a.confusion).name}; vLLM's synchronous scheduler classes\n")
    print("| rate | sim policy | vLLM-backed | metric | sim | vLLM | Diff% |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for scale in a.rate_scales:
        t = tr.scaled(scale)
        for sim_p, real_p in (PAIRS[k] for k in a.pairs.split(",")):
            t0 = time.perf_counter()
            sim, real = (measure(t, p, cost, slo, conf, a.kv_blocks) for p in (sim_p, real_p))
            for m in METRICS:
                if m in ("parks", "amortized") and sim_p == "vllm":
                    continue
                diff = 100 * (sim[m] - real[m]) / real[m] if real[m] else float("nan")
                print(f"| {scale:g} | {sim_p} | {real_p} | {m} | {sim[m]:.4g} | {real[m]:.4g} | {diff:+.1f} |")
                rows.append({"rate_scale": scale, "sim": sim_p, "real": real_p, "metric": m,
                             "sim_value": sim[m], "real_value": real[m], "diff_pct": diff})
            print(f"<!-- {sim_p} vs {real_p} x{scale:g}: {time.perf_counter() - t0:.0f} s wall -->")
    if a.json:
        write_text_atomic(a.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
