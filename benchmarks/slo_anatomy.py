"""Which SLO a policy misses in a scenario-grid cell, and a decode-free reference for the TTFT.

    python benchmarks/slo_anatomy.py --shared ../shared/data --cell code-synth-burst \\
        --loads 0.02,0.06,0.12,0.2 --policies vllm,ecoserve

For each policy and load (rate scale): SLO attainment, the share of requests finished (the
per-request columns are of those: vLLM V0 ignores prompts over its limit), the share of requests
that miss their TTFT and the share that miss their mean TBT, the share of the server's time spent in
iterations longer than the TBT SLO (from the replay's iteration log), the mean TTFT, the mean
decode time and how much of it the request spent stalled (preempted or parked), the parks, and the
iterations that carried prompt tokens with the share of the replay's time their fixed cost took
(the cost model's ``prefill_overhead_s`` each: what small chunks pay), and the mean JCT, as a
ratio to the first policy's at the same load (the baseline in the same run).
Beside them, a reference that ignores decodes altogether: one server prefilling whole prompts
at its full-budget rate (chunks of ``--budget`` tokens timed by the cell's cost model), the
shortest prompt first among those that can still meet their TTFT, the others set aside and
prefilled only when nothing else waits. It is not a bound (shortest-first is not optimal with arrivals, and a decode-aware
policy could hold some prompts back), but it says how much of a TTFT-bound cell's shortfall the
decodes and the order cost. Cells are those of ``benchmarks/scenario_grid.py``, named or
drawn (``--cell r2.10``: cell 10 of ``--cells random:N --cell-seed 2``).
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenario_grid as grid

from ecoserve_sched.cost_model import prefill_ctx_tokens
from ecoserve_sched.policies.interface import DEFAULT_TOKEN_BUDGET
from ecoserve_sched.simulator import iteration_table
from rlpredict.cli_boundary import (
    ScriptParser,
    arg_list,
    arg_number,
    arg_path,
    run_script,
    worker_pool,
)


def prefill_s(cost: object, prompt: int, budget: int) -> float:
    """Seconds to prefill ``prompt`` tokens alone in chunks of ``budget``."""
    t, done = 0.0, 0
    while done < prompt:
        chunk = min(budget, prompt - done)
        t += cost.iteration_time(chunk, prefill_ctx_tokens(chunk, done), 0, 0)
        done += chunk
    return t


def reference_ttft(arrival_s: np.ndarray, prefill: np.ndarray, ttft_s: float) -> float:
    """Share of requests whose TTFT the decode-free reference schedule meets (module docstring)."""
    n, i, now, met = len(arrival_s), 0, 0.0, 0
    live: list[tuple[float, int]] = []  # (prefill seconds, index), shortest first
    lost: list[float] = []
    while i < n or live or lost:
        if not live and not lost:
            now = max(now, arrival_s[i])
        while i < n and arrival_s[i] <= now:
            heapq.heappush(live, (prefill[i], i))
            i += 1
        while live:
            p, j = heapq.heappop(live)
            if now + p <= arrival_s[j] + ttft_s:
                now += p
                met += 1
                break
            heapq.heappush(lost, p)
        else:
            if lost and not (i < n and arrival_s[i] <= now):
                now += heapq.heappop(lost)
            elif i < n:
                now = max(now, arrival_s[i])
    return met / n


def anatomy(res: object, slo: object) -> dict[str, float]:
    """Of a replay's finished requests: the shares missing the TTFT and the mean TBT, the share of
    time in iterations longer than the TBT SLO, and the mean TTFT, decode time (first token to
    last) and stalled time (the gaps while a request was preempted or parked, a part of its
    decode time) in seconds."""
    done = [r for r in res.requests if r.finish_s >= 0]
    wait = np.array([r.first_token_s - r.arrival_s for r in done])
    decode = np.array([r.finish_s - r.first_token_s for r in done])
    tbt = np.array([r.generated > 1 and (r.finish_s - r.first_token_s) / (r.generated - 1) > slo.tbt_s
                    for r in done])
    log = iteration_table(res)
    busy = log[:, 1] * log[:, 2]  # mean iteration seconds x iterations per row
    return {"ttft_missed": float((wait > slo.ttft_s).mean()), "tbt_missed": float(tbt.mean()),
            "slow": float(busy[log[:, 1] > slo.tbt_s].sum() / max(busy.sum(), 1e-12)),
            "ttft_s": float(wait.mean()), "decode_s": float(decode.mean()),
            "stalled_s": float(sum(res.stall_gaps) / max(len(done), 1))}


def policy_row(cell_name: str, policy: str, shared: Path, requests: int, load: float) -> tuple[str, float]:
    """One table row, less its JCT ratio, and the mean JCT: ``policy`` replaying ``cell_name`` at
    ``load`` (in a worker process: ``grid._init_worker`` set the slice and seed)."""
    cell = grid.find_cell(cell_name)
    spec_p, run_as = grid.resolve(cell, policy, shared, requests)
    s, res = spec_p.run(run_as, load)
    a = anatomy(res, cell.slo)
    fixed = res.prefill_iterations * spec_p.cost.spec["efficiency"]["prefill_overhead_s"] / max(s["duration_s"], 1e-12)
    jct = a["ttft_s"] + a["decode_s"]
    return (f"| {load:g} | {policy} | {s['slo_attainment']:.3f} | {s['finished'] / s['requests']:.3f} "
            f"| {a['ttft_missed']:.3f} | {a['tbt_missed']:.3f} "
            f"| {a['slow']:.2f} | {a['ttft_s']:.2f} | {a['decode_s']:.2f} | {a['stalled_s']:.2f} "
            f"| {res.counters.get('parks', 0):,} | {res.prefill_iterations:,} | {fixed:.3f} | {jct:.2f} |"), jct


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=arg_path, required=True, help="the shared data folder (../shared/data)")
    ap.add_argument("--cell", required=True, help="a cell of benchmarks/scenario_grid.py, or a random draw's "
                    "cell by its rS.I prefix (cell I of --cells random:N --cell-seed S)")
    ap.add_argument("--loads", default="0.02,0.06,0.12,0.2", type=arg_list(arg_number(float, 0, low_open=True)))
    ap.add_argument("--policies", default="vllm,ecoserve", type=arg_list(str))
    ap.add_argument("--requests", type=arg_number(int, 2), default=6000, help="first N requests of the trace")
    ap.add_argument("--budget", type=arg_number(int, 1), default=DEFAULT_TOKEN_BUDGET, help="the reference's prefill chunk")
    ap.add_argument("--workers", type=arg_number(int, 1), default=2, help="parallel processes (the same table)")
    args = ap.parse_args()
    cell = grid.find_cell(args.cell)
    if cell is None:
        ap.error(f"--cell: unknown cell {args.cell!r}; known: {', '.join(c.name for c in grid.ALL_CELLS)}, rS.I")
    if bad := [m for p in args.policies if (m := grid.unknown_policy(p, tuned=False))]:
        ap.error(f"--policies: {bad[0]}")
    t0 = time.time()
    grid._init_worker(0, 0)
    spec, _ = grid.resolve(cell, "vllm", args.shared, args.requests)
    prefill = np.array([prefill_s(spec.cost, int(p), args.budget) for p in spec.trace.input_tokens])
    print(f"## {cell.name}: {len(prefill)} requests, profile {spec.cost.name}, SLO TTFT {cell.slo.ttft_s:g} s / "
          f"TBT {cell.slo.tbt_s:g} s\n")
    print("| load | policy | SLO attainment | finished | TTFT missed | mean TBT missed | time in iterations > TBT SLO "
          "| mean TTFT s | mean decode s | of it stalled s | parks | prefill iterations "
          f"| their fixed cost / replay time | mean JCT s | JCT x {args.policies[0]} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with worker_pool(args.workers, grid._init_worker, (0, 0)) as pool:
        for load in args.loads:
            n = len(args.policies)
            base = None  # the first policy's mean JCT at this load: the ratio's baseline
            for line, jct in pool.map(policy_row, [cell.name] * n, args.policies, [args.shared] * n,
                                      [args.requests] * n, [load] * n, chunksize=1):
                base = jct if base is None else base
                print(f"{line} {jct / base:.3f} |" if base > 0 else f"{line} - |", flush=True)
            ref = reference_ttft(spec.trace.arrival_s / load, prefill, cell.slo.ttft_s)
            print(f"| {load:g} | decode-free reference | {ref:.3f} (TTFT only) | | {1 - ref:.3f} |" + " |" * 10)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_script(main)
