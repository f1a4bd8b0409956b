"""Which chat replays should calibration run? Fit one profile per replay set in one process,
serve the same trace through the real engine, and score each profile's simulated TTFT/JCT.

All profiles share the grid's batch shapes and differ only in the chat replays added to them
(``(requests, arrivals per iteration)``, see ``ecoserve_sched.calibrate.REPLAYS``). Everything
runs in one process, back to back, so host-speed drift between sessions does not favour one
set. The engine plans with the first set's profile; each profile only times the simulation
(``simulate(..., timing=...)``).

    python benchmarks/calibration_replays.py --rates 4         # ~3.5 min on 1 CPU thread
    python benchmarks/calibration_replays.py                   # rates 2 and 4
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sim_vs_transformers import compare, make_trace  # noqa: E402

from ecoserve_sched.calibrate import GRIDS, base_profile, load_model, measure  # noqa: E402
from ecoserve_sched.cost_model import fit_profile  # noqa: E402
from ecoserve_sched.engines.transformers_cb import TransformersEngine  # noqa: E402
from rlpredict.cli_boundary import ScriptParser, arg_list, arg_number, run_script  # noqa: E402

SETS = {"heavy: 0.25, 0.5 per iteration": [(32, 0.25), (32, 0.5)],
        "light: 0.05, 0.1 per iteration": [(32, 0.05), (32, 0.1)]}


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=arg_list(arg_number(float, 0, low_open=True)), default="2,4", help="Poisson arrival rates of the served traces")
    ap.add_argument("--repeats", type=arg_number(int, 1), default=2, help="real runs per trace and policy")
    ap.add_argument("--token-budget", type=arg_number(int, 34), default=512)  # the replays' 32 requests, +2
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    model = load_model("small-llama", "cpu")
    base = base_profile(model, "cpu", "small-llama-transformers-cpu")
    grid = measure(model, GRIDS["small"], args.token_budget)[0]
    profiles = {name: fit_profile(grid + measure(model, [], args.token_budget, replays=reps)[0], base, name)
                for name, reps in SETS.items()}
    print("| trace | policy | calibration replays | TTFT error | JCT error | iteration time | mean TTFT | mean JCT |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for rate in args.rates:
        trace = make_trace(40, rate, 0, model.config.vocab_size)
        for policy in ("ecoserve", "vllm"):
            eng = TransformersEngine(model, policy, next(iter(profiles.values())), kv_blocks=96,
                                     token_budget=args.token_budget, max_running=32)
            runs = [eng.generate(trace) for _ in range(args.repeats)]
            for name, prof in profiles.items():
                _, metrics, (ttft, jct, _, _) = compare(name, eng, trace, runs, prof)
                diff = {m: f"{100 * (s - r) / r:+.1f}%" for m, r, s in metrics if r}
                print(f"| {rate:g}/s | {policy} | {name} | {ttft:.1f}% | {jct:.1f}% | "
                      f"{diff['iteration time, same shapes (ms)']} | {diff['mean TTFT (s)']} | "
                      f"{diff['mean JCT (s)']} |", flush=True)


if __name__ == "__main__":
    run_script(main)
