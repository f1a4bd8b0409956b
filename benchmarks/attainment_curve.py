"""SLO attainment over a grid of loads: a finer comparison of policies than the capacity bisection.

    python benchmarks/attainment_curve.py --shared ../shared/data --cell mooncake --loads 0.56:0.64 \\
        --policies ecoserve,ecoserve-median

Capacity (the largest rate scale with SLO attainment >= 0.9) is found by bisection to 2%, and
attainment is not monotone in the load on a finite trace, so two policies whose curves cross
0.9 at nearly the same load can differ by a bisection step either way. This replays one
scenario-grid cell (``benchmarks/scenario_grid.py``: same requests, predictions and server) at
``--points`` evenly spaced loads and prints each policy's attainment at every load and its mean
over them: the area under the curve near capacity, which a one-step difference does not move.
vLLM V1 (``vllm``) is always run first, as the in-run baseline: each policy's mean is also given
as a multiple of vLLM's; and the cell's saturation ceiling is printed with the loads as shares
of it, so a reader sees where on the curve the loads lie.
The replays run in ``--workers`` processes (the table is the same for any number).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenario_grid as grid

from rlpredict.cli_boundary import (
    ScriptParser,
    arg_list,
    arg_number,
    arg_path,
    run_script,
    worker_pool,
)


def attainment(cell_name: str, policy: str, shared: Path, requests: int, load: float) -> float:
    """One replay of ``cell_name`` under ``policy`` at ``load`` (in a worker: ``grid._init_worker``
    set the slice and seed)."""
    spec, run_as = grid.resolve(grid.find_cell(cell_name), policy, shared, requests)  # vllm@B: V1 at budget B
    return spec.run(run_as, load)[0]["slo_attainment"]


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=arg_path, required=True, help="the shared data folder (../shared/data)")
    ap.add_argument("--cell", required=True, help="scenario-grid cell, or a random draw's cell by its rS.I prefix "
                    "(cell I of --cells random:N --cell-seed S)")
    ap.add_argument("--loads", required=True, help="LO:HI, rate scales")
    ap.add_argument("--points", type=arg_number(int, 1, 1000), default=9, help="loads from LO to HI (at most 1,000)")
    ap.add_argument("--policies", type=arg_list(str), required=True, help="comma-separated policy names")
    ap.add_argument("--requests", type=arg_number(int, 2), default=6000, help="first N requests of the trace")
    ap.add_argument("--skip", type=arg_number(int, 0), default=0, help="skip the first N requests")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="seed of the predictions and synthetic arrivals")
    ap.add_argument("--workers", type=arg_number(int, 1), default=2, help="parallel processes")
    args = ap.parse_args()
    try:
        lo, hi = (float(x) for x in args.loads.split(":"))
    except ValueError:
        ap.error(f"--loads: expected LO:HI, got {args.loads!r}")
    if not 0 < lo <= hi < math.inf:
        ap.error("--loads needs 0 < LO <= HI, both finite")
    if bad := [m for p in args.policies if (m := grid.unknown_policy(p, tuned=False))]:
        ap.error(f"--policies: {bad[0]}")
    cell = grid.find_cell(args.cell)
    if cell is None:
        ap.error(f"--cell: unknown cell {args.cell!r}; known: {', '.join(c.name for c in grid.ALL_CELLS)}, rS.I")
    grid._init_worker(args.skip, args.seed)  # the grid's slice and seed, as in its worker processes
    n = len(grid.spec_of(cell, args.shared, args.requests).trace)  # read (and checked) before the work
    loads = np.linspace(lo, hi, args.points)
    policies = ["vllm", *(p for p in args.policies if p != "vllm")]  # the baseline, first (was: not run)
    print(f"{cell.name}: requests {args.skip + 1}-{args.skip + n}, seed {args.seed}")  # (was: + --requests,
    # past a shorter trace's end; a reviewer's find)
    with worker_pool(args.workers, grid._init_worker, (args.skip, args.seed)) as pool:
        roof = grid.task_ceiling(cell, args.shared, args.requests)[1]["ceiling_rate_scale"]
        share = f": the loads are {lo / roof:.3f}-{hi / roof:.3f} of it" if roof else ""
        print(f"saturation ceiling: rate scale {roof:.4g}{share}\n" if roof else "saturation ceiling: none\n")
        print("| policy | mean attainment | x vllm | " + " | ".join(f"{x:.3f}" for x in loads) + " |")
        print("|---|---:|---:|" + "---:|" * len(loads))
        base = None
        for p in policies:
            n = len(loads)
            att = list(pool.map(attainment, [cell.name] * n, [p] * n, [args.shared] * n, [args.requests] * n,
                                [float(x) for x in loads], chunksize=1))
            mean = float(np.mean(att))
            base = mean if base is None else base
            ratio = f"{mean / base:.3f}" if base > 0 else "n/a"
            print(f"| {p} | {mean:.4f} | {ratio} | " + " | ".join(f"{a:.3f}" for a in att) + " |", flush=True)


if __name__ == "__main__":
    run_script(main)
