"""Discrete-event replay: requests arrive, the policy forms a batch, the cost model times it.

Events are arrivals (a sorted list), iterations (one at a time, timed by
``cost.iteration_time``) and finishes (a heap keyed by the decode step at which a request's
true length is reached; preemption bumps ``Request.epoch`` and so cancels a pending finish).
Optional injected faults (``faults.py``) make chosen iterations raise.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .faults import NEVER, Faults
from .policies import Scheduler, get_policy
from .predictions import Confusion, apply_predictions, default_source
from .request import SLO, Request
from .trace import Trace


@dataclass
class SimResult:
    policy: str
    profile: str
    predictions: str
    requests: list[Request]
    kv_capacity_tokens: int
    block_size: int = 16
    # One row per iteration, or per decode-only stretch of ``steps`` iterations: (end time,
    # mean step duration, steps, decoding requests, KV tokens held, blocks allocated); the KV
    # columns are taken at the end of each iteration, before finished requests free their blocks
    # (a stretch logs their mean over its steps). "Decoding requests" leaves out
    # ``Batch.late_decodes``: decodes whose token gap spans earlier iterations too (vllm-v0
    # after prefill-only iterations), whose gaps are in ``stall_gaps``.
    log: list[tuple[float, float, int, int, int, int]] = field(default_factory=list)
    stall_gaps: list[float] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    sched_s: float = 0.0
    wall_s: float = 0.0
    dropped: int = 0


def simulate(requests: list[Request], sched: Scheduler, *, check: bool = False,
             stepwise: bool = False, profile: str = "", predictions: str = "",
             faults: Faults | Iterable[int] | None = None, timing: Any = None) -> SimResult:
    """Replay ``requests`` (any order) through ``sched``; ``check`` verifies KV invariants each
    iteration (slow: for tests). ``stepwise`` calls ``sched.schedule`` every iteration instead
    of running decode-only stretches back to back: the same decisions and times, one log row
    per iteration (the reference the fast path is tested against).

    ``faults`` (a :class:`~ecoserve_sched.faults.Faults`, or iteration indices) makes those
    iterations raise: the iteration takes its time, then every request in its batch ends
    ERRORED via ``sched.fail_batch`` (KV released, counted as ``errors`` and
    ``failed_iterations``) and the run goes on. A failing iteration is always a full
    ``schedule`` decision, so stretches stop before it; without faults nothing changes.

    ``timing`` (a cost model) times the iterations instead of the policy's own ``cost``, which
    the policy still plans with: a replay of a real run whose planner used one profile, timed
    by another (swap times stay the policy's)."""
    t_wall = time.perf_counter()
    fault_cfg = Faults.of(faults) or Faults()
    plan = fault_cfg.plan()
    fault_step = next(plan, NEVER)  # the next failing iteration
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    cap = sched.kv.num_blocks * sched.kv.block_size
    res = SimResult(sched.name, profile, predictions, reqs, cap, sched.kv.block_size)
    it_time = (timing or sched.cost).iteration_time
    log = res.log.append
    finishes: list[tuple[int, int, int, Request]] = []
    n, i, now, sched_s = len(reqs), 0, 0.0, 0.0
    perf = time.perf_counter
    while True:
        while i < n and reqs[i].arrival_s <= now:
            r = reqs[i]
            if sched.kv.blocks_for(r.prompt_tokens + r.target_tokens) > sched.kv.num_blocks:
                res.dropped += 1  # could never finish on this GPU
            else:
                sched.add(r, r.arrival_s)
            i += 1
        if not sched.has_work():
            if i >= n:
                break
            now = reqs[i].arrival_s
            continue
        t0 = perf()
        if not stepwise and sched.step < fault_step and sched.decode_only_step():
            sched_s += perf() - t0
            # Decode-only stretch: every decoding request runs one step per iteration, until a
            # finish, an arrival, a fault or an alarm that needs a decision; one log row for all.
            next_arrival = reqs[i].arrival_s if i < n else float("inf")
            next_finish = finishes[0][0] if finishes else NEVER
            if fault_step < next_finish:
                next_finish = fault_step
            next_alarm = sched.next_alarm_step()
            d = len(sched.decoding)
            dctx = ctx0 = sched.kv_used_tokens()
            t_start, k, alloc = now, 0, 0
            while True:
                if check:
                    sched.kv.check(sched.used_blocks_after())
                alloc += sched.kv.allocated_blocks
                now += it_time(0, 0, d, dctx)
                dctx += d
                k += 1
                sched.step += 1
                if sched.step >= next_finish or now >= next_arrival:
                    break
                if sched.step >= next_alarm:
                    if not sched.decode_only_step():
                        break
                    next_alarm = sched.next_alarm_step()
            log((now, (now - t_start) / k, k, d, ctx0 + d * (k + 1) / 2, alloc / k))
            _finish_due(finishes, sched, now)
            continue
        batch = sched.schedule(now)
        sched_s += perf() - t0
        if batch.empty:
            if i >= n:
                raise RuntimeError(f"{sched.name}: stuck with {sched.waiting_count()} waiting requests")
            now = reqs[i].arrival_s  # blocked until something arrives
            continue
        if check:
            sched.kv.check(sched.used_blocks_after(batch))
        dt = it_time(batch.prefill_tokens, batch.prefill_ctx_tokens,
                     batch.decode_requests, batch.decode_ctx_tokens) + batch.extra_s
        now += dt
        if sched.step >= fault_step:  # this iteration raises: its requests end as errors
            sched.fail_batch(batch, fault_cfg.error)
            log((now, dt, 1, 0, sched.kv_used_tokens(), sched.kv.allocated_blocks))
            fault_step = next(plan, NEVER)
            _finish_due(finishes, sched, now)
            continue
        for r in sched.complete(batch, now):
            heapq.heappush(finishes, (r.dec_step0 + r.target_tokens - r.generated, r.rid, r.epoch, r))
        log((now, dt, 1, batch.decode_requests - batch.late_decodes, sched.kv_used_tokens(),
             sched.kv.allocated_blocks))
        _finish_due(finishes, sched, now)
    if check:
        sched.kv.check()
        assert sched.kv.free_blocks == sched.kv.num_blocks and not sched.kv.allocs, "blocks leaked"
    res.stall_gaps = sched.stall_gaps
    res.counters = {**sched.counters, "loans": sched.kv.loans}
    res.sched_s = sched_s
    res.wall_s = time.perf_counter() - t_wall
    return res


def _finish_due(finishes: list, sched: Scheduler, now: float) -> None:
    """Finish the requests whose last token came out by ``sched.step`` (skip stale epochs)."""
    while finishes and finishes[0][0] <= sched.step:
        _, _, epoch, r = heapq.heappop(finishes)
        if r.epoch == epoch:
            sched.finish(r, now)


def iteration_table(res: SimResult) -> np.ndarray:
    """``res.log`` as an (n, 6) float array; columns as in ``SimResult.log``."""
    return np.asarray(res.log, dtype=float).reshape(-1, 6)


def run(trace: Trace, policy: str, cost: Any, *, slo: SLO | None = None,
        predictions: str | None = None, confusion: Confusion | None = None,
        bundle: str | None = None, seed: int = 0, check: bool = False,
        faults: Faults | Iterable[int] | None = None, **policy_kw: Any) -> SimResult:
    """Build requests from ``trace``, attach predictions, build ``policy`` and simulate
    (``faults``: injected failing iterations, see ``simulate``)."""
    slo = slo or SLO()
    if policy.endswith("vllm-real"):  # vLLM's own scheduler class (engines/vllm_sim.py)
        from .engines.vllm_sim import run_real

        if faults is not None:
            raise ValueError(f"{policy}: fault injection needs an ecoserve_sched policy")
        return run_real(trace, policy, cost, slo=slo, predictions=predictions, confusion=confusion,
                        bundle=bundle, seed=seed, **policy_kw)
    sched = get_policy(policy, cost, slo=slo, **policy_kw)
    source = sched.prediction_override or predictions or default_source(trace)
    reqs = trace.requests(slo)
    desc = apply_predictions(reqs, trace, source, seed=seed, confusion=confusion, bundle=bundle)
    res = simulate(reqs, sched, check=check, profile=getattr(cost, "name", ""), predictions=desc,
                   faults=faults)
    res.policy = policy
    return res
