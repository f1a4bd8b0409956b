"""Summary metrics of a simulation (definitions in docs/simulator.md)."""

from __future__ import annotations

import numpy as np

from .request import CANCELLED, SLO, State
from .simulator import SimResult, iteration_table


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if values.size == 0 or weights.sum() <= 0:
        return float("nan")
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, q * cw[-1], side="left")])


def summarize(res: SimResult, slo: SLO) -> dict:
    """The report of one run: throughput, latency percentiles, SLO attainment, KV use. Every
    request is judged against ``slo``, not its own ``Request.slo`` (``run`` gives each request
    the run's; requests built for ``simulate`` with SLOs of their own are still judged
    against this one)."""
    if not isinstance(slo, SLO):  # was: an AttributeError on 'ttft_s' deep inside
        raise TypeError(f"summarize: slo must be an SLO(ttft_s, tbt_s), got {type(slo).__name__}")
    if not isinstance(res, SimResult):  # (was: an AttributeError on 'requests')
        raise TypeError(f"summarize: res must be a SimResult (what run or simulate returns), got {type(res).__name__}")
    reqs = res.requests
    done = [r for r in reqs if r.state == State.FINISHED and r.finish_s >= 0]
    n = len(reqs)
    arrival = np.array([r.arrival_s for r in done])
    finish = np.array([r.finish_s for r in done])
    first = np.array([r.first_token_s for r in done])
    gen = np.array([r.generated for r in done], dtype=float)
    ttft = first - arrival
    tbt_req = np.where(gen > 1, (finish - first) / np.maximum(gen - 1, 1), 0.0)
    ok = (ttft <= slo.ttft_s) & (tbt_req <= slo.tbt_s)
    if slo.deadline_s is not None:
        ok &= (finish - arrival) <= slo.deadline_s
    start = min((r.arrival_s for r in reqs), default=0.0)
    span = max(float(finish.max()) - start, 1e-9) if done else float("nan")
    log = iteration_table(res)
    durs, k, decodes, kv_used, kv_alloc = log[:, 1], log[:, 2], log[:, 3], log[:, 4], log[:, 5]
    gaps = np.concatenate([durs, np.asarray(res.stall_gaps, dtype=float)])
    w = np.concatenate([decodes * k, np.ones(len(res.stall_gaps))])
    iters = int(k.sum())
    time_w = durs * k
    return {
        "policy": res.policy,
        "profile": res.profile,
        "predictions": res.predictions,
        "requests": n,
        "finished": len(done),
        "dropped": res.dropped,
        "errors": sum(r.state == State.ERRORED and r.error != CANCELLED for r in reqs),
        "cancelled": sum(r.state == State.ERRORED and r.error == CANCELLED for r in reqs),
        "duration_s": span,
        "throughput_rps": len(done) / span,
        "throughput_tok_s": float(gen.sum()) / span,
        "mean_jct_s": float((finish - arrival).mean()) if done else float("nan"),
        # the vLLM and Orca papers' metric: end-to-end latency per output token, mean over requests
        "normalized_latency_s": float(((finish - arrival) / np.maximum(gen, 1)).mean()) if done else float("nan"),
        "mean_ttft_s": float(ttft.mean()) if done else float("nan"),
        # finished requests whose first token came later than the TTFT SLO
        "ttft_lost_share": float((ttft > slo.ttft_s).mean()) if done else float("nan"),
        "p50_ttft_s": q(ttft, 0.5),
        "p99_ttft_s": q(ttft, 0.99),
        "p50_tbt_s": weighted_quantile(gaps, w, 0.5),
        "p99_tbt_s": weighted_quantile(gaps, w, 0.99),
        "slo_ttft_s": slo.ttft_s,
        "slo_tbt_s": slo.tbt_s,
        "slo_deadline_s": slo.deadline_s,  # (None: no deadline)
        "slo_attainment": float(ok.sum()) / n if n else float("nan"),
        "goodput_rps": float(ok.sum()) / span,
        "preemptions": res.counters.get("preemptions", 0),
        "counters": res.counters,
        "kv_util_mean": _time_mean(kv_used, time_w) / res.kv_capacity_tokens,
        "kv_alloc_mean": _time_mean(kv_alloc, time_w) * res.block_size / res.kv_capacity_tokens,
        "iterations": iters,
        # per scheduling decision; NaN (null in JSON) without one, as the KV means without time
        "sched_us_per_iter": 1e6 * res.sched_s / len(durs) if len(durs) else float("nan"),
        "sim_wall_s": res.wall_s,
        "sim_requests_per_s": n / max(res.wall_s, 1e-9),
    }


def q(a: np.ndarray, p: float) -> float:
    return float(np.quantile(a, p)) if a.size else float("nan")


def _time_mean(x: np.ndarray, w: np.ndarray) -> float:
    """The ``w``-weighted mean of ``x``; NaN where no time passed (no iteration: not 0, a value
    that was never measured)."""
    return float(np.dot(x, w) / w.sum()) if len(x) and w.sum() > 0 else float("nan")
