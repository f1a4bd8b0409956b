"""Simulator vs real engine: replay one trace through transformers continuous batching and
through the simulator with the engine's calibrated profile; print TTFT/JCT sim vs real.

The trace has Azure-conversation-like shapes scaled down to a small model (log-normal prompt
and response lengths, prompt:response ~ 2:1), Poisson arrivals, and noisy RL predictions
(true length x log-normal noise). The engine runs on the wall clock (requests are served at
their arrival times, every iteration is measured); the simulator replays the same requests,
with the same policy, KV blocks, token budget and the profile, and knows the true lengths
(EOS is off in the engine, so each request generates exactly its length).

    python benchmarks/sim_vs_transformers.py            # ~1 min on 1 CPU thread
    python benchmarks/sim_vs_transformers.py --policies ecoserve --requests 60 --rate 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecoserve_sched.calibrate import chat_lengths, load_model  # noqa: E402
from ecoserve_sched.cost_model import fit_profile, load_profile  # noqa: E402
from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine  # noqa: E402
from ecoserve_sched.request import SLO  # noqa: E402
from ecoserve_sched.simulator import simulate  # noqa: E402
from ecoserve_sched.trace import poisson_arrivals  # noqa: E402

PROFILE = REPO / "ecoserve_sched" / "profiles" / "calibrated" / "small-llama-transformers-cpu.json"


def make_trace(n: int, rate: float, seed: int, vocab: int) -> list[GenRequest]:
    rng = np.random.default_rng(seed)
    prompt, out = chat_lengths(rng, n)
    pred = np.maximum(1, (out * rng.lognormal(0.0, 0.35, n)).round().astype(int))
    arrivals = poisson_arrivals(n, rate, seed)
    return [GenRequest(rng.integers(3, vocab, p).tolist(), int(o), float(a), pred_tokens=int(pr),
                       reserve_tokens=int(np.ceil(1.2 * pr)), pred_bucket=int(pr // 16),
                       slo=SLO(1.0, 0.1))
            for p, o, pr, a in zip(prompt, out, pred, arrivals, strict=True)]


def pct_err(sim: np.ndarray, real: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(sim - real) / real


def _compare(label: str, eng: TransformersEngine, trace: list[GenRequest], real, cost) -> tuple:
    """Simulate ``trace`` with ``eng``'s policy settings over ``cost``; metrics vs ``real``."""
    eng.cost = cost
    sim = simulate(eng.to_requests(trace), eng.make_policy())
    sreq = sorted(sim.requests, key=lambda r: r.rid)
    ok = [i for i, r in enumerate(real.results) if not r.dropped]
    r_ttft = np.array([real.results[i].ttft_s for i in ok])
    r_jct = np.array([real.results[i].jct_s for i in ok])
    s_ttft = np.array([sreq[i].first_token_s - sreq[i].arrival_s for i in ok])
    s_jct = np.array([sreq[i].finish_s - sreq[i].arrival_s for i in ok])
    r_end = max(r.token_times[-1] for r in real.results if r.token_times)
    s_end = max(r.finish_s for r in sreq)
    e_ttft, e_jct = pct_err(s_ttft, r_ttft), pct_err(s_jct, r_jct)
    shapes = np.asarray(real.samples(), dtype=float)
    return (label, [
        ("iteration time, same shapes (ms)", 1e3 * shapes[:, 4].mean(), 1e3 * cost.predict(shapes[:, :4]).mean()),
        ("mean TTFT (s)", r_ttft.mean(), s_ttft.mean()),
        ("p90 TTFT (s)", np.quantile(r_ttft, 0.9), np.quantile(s_ttft, 0.9)),
        ("mean JCT (s)", r_jct.mean(), s_jct.mean()),
        ("p90 JCT (s)", np.quantile(r_jct, 0.9), np.quantile(s_jct, 0.9)),
        ("makespan (s)", r_end, s_end),
        ("iterations", len(real.iterations), sum(row[2] for row in sim.log)),
        ("preemptions", real.counters["preemptions"], sim.counters["preemptions"]),
        ("loans", real.counters["loans"], sim.counters["loans"]),
    ], (np.mean(e_ttft), np.quantile(e_ttft, 0.9), np.mean(e_jct), np.quantile(e_jct, 0.9)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-llama", help="preset or config.json (random weights)")
    ap.add_argument("--profile", default=str(PROFILE), help="calibrated profile JSON of that model")
    ap.add_argument("--policies", default="ecoserve,vllm")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--kv-blocks", type=int, default=96, help="KV blocks of 16 tokens")
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cost = load_profile(args.profile)
    model = load_model(args.model, "cpu")
    trace = make_trace(args.requests, args.rate, args.seed, model.config.vocab_size)
    print(f"trace: {len(trace)} requests, Poisson {args.rate:g}/s, prompt mean "
          f"{np.mean([len(g.prompt_ids) for g in trace]):.0f}, output mean "
          f"{np.mean([g.max_new_tokens for g in trace]):.0f} tokens; profile {cost.name}; "
          f"KV {args.kv_blocks} x 16 tokens, budget {args.token_budget}, {args.threads} thread(s)\n")
    TransformersEngine(model, "vllm", kv_blocks=64, token_budget=256).generate(trace[:4])  # warm-up
    rows = []
    for policy in args.policies.split(","):
        eng = TransformersEngine(model, policy, cost, kv_blocks=args.kv_blocks,
                                 token_budget=args.token_budget, max_running=args.max_running)
        real = eng.generate(trace)
        # second simulation: the profile refitted to this run's own iterations (in-sample), which
        # separates the error of the iteration-time model from that of the replay itself
        refit = fit_profile(real.samples(), cost, f"{cost.name}-refit")
        for label, prof in ((policy, cost), (f"{policy} (refit on run)", refit)):
            rows.append(_compare(label, eng, trace, real, prof))
    print("| policy | metric | real | sim | Diff% |")
    print("|---|---|---:|---:|---:|")
    for policy, metrics, _ in rows:
        for name, r, s in metrics:
            diff = f"{100 * (s - r) / r:+.1f}" if r else "-"
            fmt = (lambda v: f"{v:.3f}") if "(s)" in name else (
                (lambda v: f"{v:.1f}") if "(ms)" in name else (lambda v: f"{v:.0f}"))
            print(f"| {policy} | {name} | {fmt(r)} | {fmt(s)} | {diff} |")
    print("\nper-request |sim - real| / real:")
    print("| policy | TTFT mean | TTFT p90 | JCT mean | JCT p90 |")
    print("|---|---:|---:|---:|---:|")
    for policy, _, (tm, tp, jm, jp) in rows:
        print(f"| {policy} | {tm:.1f}% | {tp:.1f}% | {jm:.1f}% | {jp:.1f}% |")


if __name__ == "__main__":
    main()
