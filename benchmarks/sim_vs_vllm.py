"""Cross-check: the simulator's re-implemented `vllm` policy vs vLLM's own scheduler class
(`vllm-real`), same trace, clock and cost model; also the simulator's `ecoserve` vs EcoServe
inside vLLM's real scheduler (`ecoserve-vllm-real`, engines/vllm_scheduler.py: the same rules
module, policies/ecoserve_rules.py). Prints a Diff% table (LLMServingSim style:
(sim - real) / real).

The plug-in gets the cost model (as ``ECOSERVE_PROFILE`` would give it), so it takes the same
numbers from it as the simulator policy: each step's prompt budget and time, a prompt's prefill
seconds and the time of a decode step that reads the whole KV cache.

Besides the table, each pair's row ``requests apart`` counts the requests whose first token,
finish, generated tokens or preemptions differ between the two replays (times beyond a relative
1e-9: ``differential.results_apart``, the fuzzer's test), and the lines after it name the first
few; the metrics can differ by a little where the requests do not (the simulator logs a run of
decode-only iterations as one row, and its TBT percentiles weigh the rows).

Usage (defaults: first 2,000 requests of the Azure 2023 conversation trace, Llama-2-13B on
A100-80GB, rate scales 0.2 and 0.3, SLO TTFT 5 s / TBT 0.2 s, both pairs):
  python benchmarks/sim_vs_vllm.py (--shared DIR | --trace PATH) [--max-requests N] [--rate-scales 0.2,0.3]
      [--pairs vllm,ecoserve] [--profile NAME] [--confusion FILE] [--kv-blocks N] [--json OUT]
      [--arrivals burst8 [--cv 2] [--seed 0]]
  python benchmarks/sim_vs_vllm.py --shared DIR --cell NAME [--max-requests N] (--rate-scales R | --ceiling-shares S)
      [--pairs ...] [--confusion FILE] [--json OUT]

``--cell`` takes a cell of ``benchmarks/scenario_grid.py`` (named, held-out, synthetic, or a
random draw's ``rS.I``): its trace, arrivals, cost-model profile, SLO and KV cache, and, unless
``--confusion`` is given, the grid's predictions (the shipped bundle's confusion matrix), so a
regime of the grid can be checked. ``--ceiling-shares`` gives the loads as shares of the
saturation ceiling of the replayed requests (``compare.ceiling``), which every cell has on its
own scale.

The ``vllm-async`` and ``ecoserve-async`` pairs replay vLLM's default, asynchronous engine loop
(``async-vllm-real``, ``ecoserve-async-vllm-real``: each step scheduled while the one before it
runs; ``engines/vllm_sim.py``) against the simulator, which decides each step after the one
before it ended: their rows say what that overlap changes, not a disagreement of rules.

``--arrivals burst8`` replaces the trace's arrival times with the scenario grid's bursts (groups
of 8 simultaneous requests, the groups gamma arrivals with coefficient of variation ``--cv``, at
the trace's mean rate), where EcoServe parks decodes (the ``parks`` row). The ``amortized`` row
counts EcoServe's amortized chunks (docs/scheduler.md): ``--profile llama3-8b-a100-80gb
--slo-tbt 0.1`` is a setting where they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ecoserve_sched.compare import RunSpec, Server, ceiling
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.engines.differential import results_apart
from ecoserve_sched.metrics import summarize
from ecoserve_sched.policies import Batch
from ecoserve_sched.predictions import load_confusion
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import burst_arrivals, read_trace
from rlpredict.cli_boundary import (
    ScriptParser,
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
         "ecoserve-recompute": ("ecoserve-recompute", "ecoserve-vllm-real"),
         # vLLM's asynchronous engine loop (its default), which the simulator does not model:
         # what deciding each step before the one ahead of it returns changes
         "vllm-async": ("vllm", "async-vllm-real"), "ecoserve-async": ("ecoserve-recompute", "ecoserve-async-vllm-real")}


def measure(tr, policy: str, spec: RunSpec) -> tuple[dict, Any]:
    """Summary plus mean scheduled tokens per iteration (prefill + decode tokens), and the
    result: ``policy`` replaying ``tr`` with ``spec``'s cost model, SLO, predictions and server."""
    prefill = [0]
    kw = dict(slo=spec.slo, confusion=spec.confusion, seed=spec.seed, **spec.server.policy_kw(spec.cost))
    if policy.endswith("vllm-real"):
        res = run(tr, policy, spec.cost, **kw)
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
            res = run(tr, policy, spec.cost, **kw)
        finally:
            base.Scheduler.schedule = orig
        decodes = sum(row[2] * row[3] for row in res.log)
        tokens = (prefill[0] + decodes) / sum(row[2] for row in res.log)
    s = summarize(res, spec.slo)
    s["tokens_per_iter"] = tokens
    s["parks"] = res.counters.get("parks", 0)
    s["amortized"] = res.counters.get("amortized", 0)  # iterations given an amortized chunk
    return s, res


#: The options a ``--cell`` sets (its trace, arrivals, profile, SLO and KV cache).
CELL_SETS = ("trace", "profile", "slo_ttft", "slo_tbt", "kv_blocks", "arrivals", "cv", "seed")


def cell_spec(ap: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[RunSpec, str]:
    """``--cell``'s RunSpec (as ``benchmarks/scenario_grid.py`` builds it) and its description."""
    if a.shared is None:
        ap.error("--cell needs --shared DIR (the shared data folder: the cell's trace is read from it)")
    given = [o for o in CELL_SETS if getattr(a, o) is not None]
    if given:
        ap.error(f"--cell sets the trace, profile, SLO, KV cache and arrivals; "
                 f"--{given[0].replace('_', '-')} is not taken with it")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scenario_grid as grid

    cell = grid.find_cell(a.cell)
    if cell is None:
        ap.error(f"--cell: unknown cell {a.cell!r}; known: {', '.join(c.name for c in grid.ALL_CELLS)}, rS.I")
    grid._init_worker(0, 0, a.confusion)
    spec = grid.spec_of(cell, a.shared, a.max_requests)
    conf = a.confusion.name if a.confusion else "the shipped bundle's"
    return spec, (f"cell {cell.name} (first {len(spec.trace)} requests, {cell.arrivals} arrivals), profile "
                  f"{spec.cost.name}, SLO {cell.slo.ttft_s:g} s / {cell.slo.tbt_s:g} s, "
                  f"{spec.server.describe(spec.cost)}, predictions: confusion {conf}")


def trace_spec(a: argparse.Namespace) -> tuple[RunSpec, str]:
    """The RunSpec of ``--trace`` (or ``--shared``'s Azure trace) and the options beside it."""
    a.profile, a.arrivals = a.profile or "llama2-13b-a100-80gb", a.arrivals or "trace"
    a.confusion = a.confusion or DEFAULT_CONFUSION
    tr = read_trace(a.trace).head(a.max_requests)
    if a.arrivals == "burst8":
        rate = (len(tr) - 1) / float(tr.arrival_s[-1] - tr.arrival_s[0])
        tr = tr.with_arrivals(burst_arrivals(len(tr), rate, cv=a.cv or 2.0, burst=8, seed=a.seed or 0))
    cost = load_profile(a.profile)
    slo = SLO(a.slo_ttft or 5.0, a.slo_tbt or 0.2)
    spec = RunSpec(tr, cost, slo, confusion=load_confusion(a.confusion),
                   server=Server(num_gpu_blocks_override=a.kv_blocks))
    return spec, (f"trace {Path(a.trace).name} (first {len(tr)} requests{', burst8 arrivals' if a.arrivals != 'trace' else ''}), "
                  f"profile {cost.name}, KV {a.kv_blocks or cost.kv_blocks(16)} blocks of 16 tokens, predictions: "
                  f"confusion {Path(a.confusion).name}")


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    trace_input = add_trace_input(ap)
    ap.add_argument("--cell", help="a cell of benchmarks/scenario_grid.py (or a random draw's rS.I): its trace, "
                    "arrivals, profile, SLO and KV cache, and the grid's predictions")
    ap.add_argument("--max-requests", type=arg_number(int, 2), default=2000, help="replay the first N requests")
    ap.add_argument("--rate-scales", type=arg_list(arg_number(float, 0, low_open=True)), help="comma-separated "
                    "arrival-rate scales (default 0.2,0.3)")
    ap.add_argument("--ceiling-shares", type=arg_list(arg_number(float, 0, low_open=True)),
                    help="the loads as shares of the saturation ceiling instead (e.g. 0.5,0.9)")
    ap.add_argument("--pairs", default="vllm,ecoserve",
                    help=f"comma-separated pairs to compare: {', '.join(PAIRS)}")
    ap.add_argument("--profile", help="cost-model profile (default llama2-13b-a100-80gb)")
    ap.add_argument("--confusion", type=arg_path, help="predictor confusion matrix the predictions are drawn from "
                    "(default: tests/ecoserve/fixtures/confusion_sharegpt.json; with --cell the grid's)")
    ap.add_argument("--slo-ttft", type=arg_number(float, 0, low_open=True), help="TTFT SLO, seconds (default 5)")
    ap.add_argument("--slo-tbt", type=arg_number(float, 0, low_open=True), help="TBT SLO, seconds (default 0.2)")
    ap.add_argument("--kv-blocks", type=arg_number(int, 1), default=None,
                    help="KV blocks of 16 tokens on both sides (default: what the profile's GPU holds)")
    ap.add_argument("--json", type=arg_file, help="also write the rows to this JSON file")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    ap.add_argument("--arrivals", choices=("trace", "burst8"),
                    help="trace (the default): the trace's arrival times; burst8: bursts at its mean rate")
    ap.add_argument("--cv", type=arg_number(float, 0, low_open=True), help="burst8: coefficient of variation of the groups' gaps (default 2)")
    ap.add_argument("--seed", type=arg_number(int, 0), help="burst8: seed of the arrivals (default 0)")
    a = ap.parse_args()
    if a.cell is not None and a.trace is not None:
        ap.error("--cell sets the trace; --trace is not taken with it")
    if a.cell is None:
        trace_input(a)
    elif a.shared is not None and not a.shared.is_dir():
        ap.error(f"--shared: {a.shared} is not a folder (the shared data folder)")
    if a.rate_scales and a.ceiling_shares:
        ap.error("give --rate-scales or --ceiling-shares, not both")
    unknown = set(a.pairs.split(",")) - set(PAIRS)
    if unknown:
        ap.error(f"unknown pair(s) {', '.join(sorted(unknown))}; choose from {', '.join(PAIRS)}")
    if a.json:
        check_file_output(a.json, force=a.force, option="--json", inputs=[p for p in (a.trace, a.confusion) if p],
                          apart=[a.shared])
    spec, what = cell_spec(ap, a) if a.cell is not None else trace_spec(a)
    scales = a.rate_scales or [0.2, 0.3]
    if a.ceiling_shares:
        top = ceiling(spec).get("ceiling_rate_scale")
        if top is None:
            raise SystemExit(f"{what}: no saturation ceiling (every request is longer than the KV cache)")
        scales = [share * top for share in a.ceiling_shares]
        what += f"; saturation ceiling at rate scale {top:.4g}"
    print(f"{what}; vLLM's scheduler classes, synchronous (the -async pairs: its asynchronous engine loop)\n")
    print("| rate | sim policy | vLLM-backed | metric | sim | vLLM | Diff% |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for scale in scales:
        t = spec.trace.scaled(scale)
        for sim_p, real_p in (PAIRS[k] for k in a.pairs.split(",")):
            t0 = time.perf_counter()
            (sim, sim_res), (real, real_res) = (measure(t, p, spec) for p in (sim_p, real_p))
            for m in METRICS:
                if m in ("parks", "amortized") and sim_p == "vllm":
                    continue
                diff = 100 * (sim[m] - real[m]) / real[m] if real[m] else float("nan")
                print(f"| {scale:.4g} | {sim_p} | {real_p} | {m} | {sim[m]:.4g} | {real[m]:.4g} | {diff:+.1f} |")
                rows.append({"rate_scale": scale, "sim": sim_p, "real": real_p, "metric": m,
                             "sim_value": sim[m], "real_value": real[m], "diff_pct": diff})
            apart = results_apart(sim_res, real_res, sim_p != "vllm")
            n_apart = len({line.split(":")[0] for line in apart if line.startswith("request ")})
            print(f"| {scale:.4g} | {sim_p} | {real_p} | requests apart (of {len(t):,}) | {n_apart} | | |")
            rows.append({"rate_scale": scale, "sim": sim_p, "real": real_p, "metric": "requests_apart",
                         "sim_value": n_apart, "real_value": len(t), "apart": apart[:20]})
            for line in [x for x in apart if x.startswith("request ")][:3] + [x for x in apart if not x.startswith("request ")]:
                print(f"<!-- {sim_p} vs {real_p} x{scale:.4g}: {line} -->")
            print(f"<!-- {sim_p} vs {real_p} x{scale:.4g}: {time.perf_counter() - t0:.0f} s wall -->")
    if a.json:
        write_text_atomic(a.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
