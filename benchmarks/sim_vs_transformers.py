"""Simulator vs real engine: replay one trace through transformers continuous batching and
through the simulator with a profile calibrated on this host; print TTFT/JCT sim vs real.

The trace has Azure-conversation-like shapes scaled down to a small model (log-normal prompt
and response lengths, prompt:response ~ 2:1), Poisson arrivals, and noisy RL predictions
(true length x log-normal noise). The protocol:

1. Calibrate: ``ecoserve_sched.calibrate.calibrate`` on this host, now (grid ``replay`` at the
   run's token budget), unless ``--profile`` names a profile JSON. A CPU host's speed drifts
   between sessions, so a profile measured in another session can be 20% off.
2. Real: each policy serves the trace ``--repeats`` times on the wall clock (requests arrive at
   their arrival times, every iteration is measured); the policy plans with the profile.
3. Sim: the simulator replays the same requests with the same policy settings, KV blocks,
   token budget and profile, knowing the true lengths (EOS is off, so each request generates
   exactly its length). A second replay times iterations with the profile refitted to the real
   runs' own iterations (in-sample; the policy still plans with the calibrated profile): it
   separates the iteration-time model's error from the replay's.

Per-request errors are |sim - real| / real, averaged over requests: against each real run
(then averaged over runs) and against the per-request mean of the runs. The real engine's own
run-to-run difference (same trace, same engine, |run i - run j| / run j) is the floor.

    python benchmarks/sim_vs_transformers.py                 # calibration (~80 s) + 4 engine runs
    python benchmarks/sim_vs_transformers.py --rate 2 --repeats 3
    python benchmarks/sim_vs_transformers.py --profile ecoserve_sched/profiles/calibrated/small-llama-transformers-cpu.json
    python benchmarks/sim_vs_transformers.py --device cuda --model CONFIG.json --rate 12 --requests 120
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecoserve_sched.calibrate import (  # noqa: E402
    CalibrationError,
    calibrate,
    chat_lengths,
    check_setup,
    load_model,
)
from ecoserve_sched.cost_model import CostModel, fit_profile, load_profile  # noqa: E402
from ecoserve_sched.engines.transformers_cb import EngineRun, GenRequest, TransformersEngine  # noqa: E402
from ecoserve_sched.request import SLO  # noqa: E402
from ecoserve_sched.simulator import simulate  # noqa: E402
from ecoserve_sched.trace import poisson_arrivals  # noqa: E402
from rlpredict.cli_boundary import ScriptParser, arg_list, arg_number, run_script  # noqa: E402

#: the requests' SLO, which the policies plan with too (was: the requests carried it, while the
#: policies planned their prefill budget with the default SLO, 5 s / 0.2 s; a reviewer's find)
TRACE_SLO = SLO(1.0, 0.1)


def make_trace(n: int, rate: float, seed: int, vocab: int) -> list[GenRequest]:
    rng = np.random.default_rng(seed)
    prompt, out = chat_lengths(rng, n)
    pred = np.maximum(1, (out * rng.lognormal(0.0, 0.35, n)).round().astype(int))
    arrivals = poisson_arrivals(n, rate, seed)
    return [GenRequest(rng.integers(3, vocab, p).tolist(), int(o), float(a), pred_tokens=int(pr),
                       reserve_tokens=int(np.ceil(1.2 * pr)), pred_bucket=int(pr // 16),
                       slo=TRACE_SLO)
            for p, o, pr, a in zip(prompt, out, pred, arrivals, strict=True)]


def pct_err(sim: np.ndarray, real: np.ndarray) -> float:
    """Mean over requests of |sim - real| / real, in percent."""
    return float(np.mean(100.0 * np.abs(sim - real) / real))


def latencies(run: EngineRun) -> tuple[np.ndarray, np.ndarray]:
    """Per-request TTFT and JCT (seconds) of a real run, in request order."""
    return (np.array([r.ttft_s for r in run.results]), np.array([r.jct_s for r in run.results]))


def compare(label: str, eng: TransformersEngine, trace: list[GenRequest], runs: list[EngineRun],
             timing: CostModel) -> tuple:
    """Simulate ``trace`` with ``eng``'s policy (planning with ``eng.cost``), iterations timed by
    ``timing``; aggregate metrics against the first real run, per-request errors against all."""
    sim = simulate(eng.to_requests(trace), eng.make_policy(), timing=timing)
    sreq = sorted(sim.requests, key=lambda r: r.rid)
    s_ttft = np.array([r.first_token_s - r.arrival_s for r in sreq])
    s_jct = np.array([r.finish_s - r.arrival_s for r in sreq])
    real = runs[0]
    lat = [latencies(r) for r in runs]
    r_ttft, r_jct = lat[0]
    shapes = np.asarray([s for run in runs for s in run.samples()], dtype=float)
    metrics = [
        ("iteration time, same shapes (ms)", 1e3 * shapes[:, 4].mean(), 1e3 * timing.predict(shapes[:, :4]).mean()),
        ("mean TTFT (s)", r_ttft.mean(), s_ttft.mean()),
        ("p90 TTFT (s)", np.quantile(r_ttft, 0.9), np.quantile(s_ttft, 0.9)),
        ("mean JCT (s)", r_jct.mean(), s_jct.mean()),
        ("p90 JCT (s)", np.quantile(r_jct, 0.9), np.quantile(s_jct, 0.9)),
        ("makespan (s)", max(r.token_times[-1] for r in real.results), max(r.finish_s for r in sreq)),
        ("iterations", len(real.iterations), sum(row[2] for row in sim.log)),
        ("preemptions", real.counters["preemptions"], sim.counters["preemptions"]),
    ]
    per_run = np.array([(pct_err(s_ttft, t), pct_err(s_jct, j)) for t, j in lat])
    mean_t, mean_j = np.mean(lat, axis=0)
    return label, metrics, (*per_run.mean(axis=0), pct_err(s_ttft, mean_t), pct_err(s_jct, mean_j))


def run_to_run(runs: list[EngineRun]) -> tuple[float, float]:
    """The real engine's own per-request difference between runs of the same trace, averaged
    over ordered pairs (TTFT %, JCT %); NaN with one run."""
    pairs = list(itertools.permutations(map(latencies, runs), 2))
    if not pairs:
        return float("nan"), float("nan")
    return (float(np.mean([pct_err(a[0], b[0]) for a, b in pairs])),
            float(np.mean([pct_err(a[1], b[1]) for a, b in pairs])))


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-llama", help="preset or config.json (random weights)")
    ap.add_argument("--profile", default=None,
                    help="profile JSON of that model on this host (default: calibrate now)")
    ap.add_argument("--grid", default="replay", help="calibration grid when calibrating now")
    ap.add_argument("--policies", type=arg_list(str), default="ecoserve,vllm")
    ap.add_argument("--requests", type=arg_number(int, 1), default=40)
    ap.add_argument("--rate", type=arg_number(float, 0, low_open=True), default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--repeats", type=arg_number(int, 1), default=2, help="real runs of the trace per policy")
    ap.add_argument("--kv-blocks", type=arg_number(int, 1), default=96, help="KV blocks of 16 tokens")
    ap.add_argument("--token-budget", type=arg_number(int, 1), default=512)
    ap.add_argument("--max-running", type=arg_number(int, 1), default=32)
    ap.add_argument("--threads", type=arg_number(int, 1), default=None,
                    help="torch CPU threads (default: 1 on CPU, torch's own with a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model runs in bfloat16 on a GPU)")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0)
    args = ap.parse_args()
    from ecoserve_sched.policies import policy_names

    if unknown := [p for p in args.policies if p not in policy_names()]:
        ap.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(sorted(policy_names()))}")

    try:
        check_setup(args.device)
    except CalibrationError as e:
        raise SystemExit(str(e)) from None
    import torch

    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.profile:
        cost = load_profile(args.profile)
    else:
        t = time.perf_counter()
        cal = calibrate(args.model, args.device, args.grid, token_budget=args.token_budget)
        cost = cal.profile
        print(f"calibrated on this host in {time.perf_counter() - t:.0f}s:\n{cal.report()}\n")
    model = load_model(args.model, args.device)
    trace = make_trace(args.requests, args.rate, args.seed, model.config.vocab_size)
    print(f"trace: {len(trace)} requests, Poisson {args.rate:g}/s, prompt mean "
          f"{np.mean([len(g.prompt_ids) for g in trace]):.0f}, output mean "
          f"{np.mean([g.max_new_tokens for g in trace]):.0f} tokens; profile {cost.name}; "
          f"KV {args.kv_blocks} x 16 tokens, budget {args.token_budget}, "
          f"{args.device}, {torch.get_num_threads()} CPU thread(s), "
          f"{args.repeats} real run(s) per policy\n")
    TransformersEngine(model, "vllm", kv_blocks=64, token_budget=256).generate(trace[:4])  # warm-up
    rows, floors = [], {}
    for policy in args.policies:
        eng = TransformersEngine(model, policy, cost, kv_blocks=args.kv_blocks, token_budget=args.token_budget,
                                 max_running=args.max_running, slo=TRACE_SLO)
        runs = [eng.generate(trace) for _ in range(args.repeats)]
        if any(r.dropped for run in runs for r in run.results):
            raise SystemExit("a request could never fit the KV cache: raise --kv-blocks")
        refit = fit_profile([s for run in runs for s in run.samples()], cost, f"{cost.name}-refit")
        rows.append(compare(policy, eng, trace, runs, cost))
        rows.append(compare(f"{policy} (refit on run)", eng, trace, runs, refit))
        floors[policy] = run_to_run(runs)
    print("| policy | metric | real (run 1) | sim | Diff% |")
    print("|---|---|---:|---:|---:|")
    for policy, metrics, _ in rows:
        for name, r, s in metrics:
            diff = f"{100 * (s - r) / r:+.1f}" if r else "-"
            fmt = (lambda v: f"{v:.3f}") if "(s)" in name else (
                (lambda v: f"{v:.1f}") if "(ms)" in name else (lambda v: f"{v:.0f}"))
            print(f"| {policy} | {name} | {fmt(r)} | {fmt(s)} | {diff} |")
    print("\nper-request |sim - real| / real, mean over requests:")
    print("| policy | TTFT vs each run | JCT vs each run | TTFT vs mean of runs | JCT vs mean of runs |")
    print("|---|---:|---:|---:|---:|")
    for policy, _, (t1, j1, tm, jm) in rows:
        print(f"| {policy} | {t1:.1f}% | {j1:.1f}% | {tm:.1f}% | {jm:.1f}% |")
    for policy, (t, j) in floors.items():
        print(f"| {policy}: real run vs real run (floor) | {t:.1f}% | {j:.1f}% | | |")


if __name__ == "__main__":
    run_script(main)
