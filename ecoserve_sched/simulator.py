"""Discrete-event replay: the serving loop (``serving.py``) over the cost-model executor.

:class:`CostModelExecutor` runs an ``ecoserve_sched`` policy and times each iteration with
``cost.iteration_time``. Finishes are a heap keyed by the decode step at which a request's true
length is reached (preemption bumps ``Request.epoch`` and so cancels a pending finish). On its
fast path, iterations that need no decision (``Scheduler.decode_only_step``) run back to back
as one decode-only stretch up to the next finish, arrival, fault, alarm or the policy's
``recheck`` of a blocked admission; on-demand block growth runs lazily through it
(``KVCacheManager.grow``: no alarm until the free pool would run short), and the stretch's block
column sums it (``run_steps``). Optional injected faults (``faults.py``) make chosen iterations
raise.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heappop, heappush
from operator import attrgetter
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from .faults import NEVER, Faults
from .policies import Scheduler, get_policy
from .predictions import SOURCES, Confusion, apply_predictions, default_source
from .request import SLO, Request, check_servable
from .serving import Executor, LogRow, SimResult, serve
from .trace import Trace

__all__ = ["CostModelExecutor", "SimResult", "fixed_predictions", "iteration_table", "run", "simulate"]


class CostModelExecutor(Executor):
    """An ``ecoserve_sched`` policy whose iterations the cost model times (see ``simulate``)."""

    def __init__(self, sched: Scheduler, *, check: bool = False, stepwise: bool = False,
                 faults: Faults | Iterable[int] | None = None, timing: Any = None) -> None:
        self.sched = sched
        self.name = sched.name
        self.kv_blocks, self.block_size = sched.kv.num_blocks, sched.kv.block_size
        self.check, self.stepwise = check, stepwise
        self.faults = Faults.of(faults) or Faults()
        self._plan = self.faults.plan()
        self.fault_step = next(self._plan, NEVER)  # the next failing iteration
        self.fast_until = 0 if stepwise else self.fault_step  # stretches only before this step
        timer = timing or sched.cost
        self.it_time = timer.iteration_time
        self.decode_run = getattr(timer, "decode_run", None) or self._decode_run
        self.finishes: list[tuple[int, int, int, Request]] = []  # (step, rid, epoch, request)
        self.sched_s = 0.0
        self.prefill_iterations = 0  # each pays the cost model's prefill_overhead_s
        # The loop calls these for every arrival and turn: the policy's own, without a layer.
        self.add = sched.add  # type: ignore[method-assign]
        self.has_work = sched.has_work  # type: ignore[method-assign]

    def waiting(self) -> int:
        return self.sched.waiting_count()

    def run(self, now: float, until: float) -> LogRow | None:
        sched = self.sched
        t0 = perf_counter()
        if sched.step < self.fast_until and sched.decode_only_step(now=now):
            self.sched_s += perf_counter() - t0
            if self.check and sched.waiting_count():
                self._check_blocked(now)
            return self._stretch(now, until)
        batch = sched.schedule(now)
        self.sched_s += perf_counter() - t0
        if batch.empty:
            return None
        if self.check:
            sched.kv.check(sched.used_blocks_after(batch))
        dt = self.it_time(batch.prefill_tokens, batch.prefill_ctx_tokens,
                          batch.decode_requests, batch.decode_ctx_tokens) + batch.extra_s
        if batch.prefill_tokens:
            self.prefill_iterations += 1
        now += dt
        finishes = self.finishes
        if sched.step >= self.fault_step:  # this iteration raises: its requests end as errors
            sched.fail_batch(batch, self.faults.error)
            row = (now, dt, 1, 0, sched.kv_used_tokens(), sched.kv.allocated_blocks)
            self.fault_step = next(self._plan, NEVER)
            self.fast_until = 0 if self.stepwise else self.fault_step
        else:
            for r in sched.complete(batch, now):
                heappush(finishes, (r.dec_step0 + r.target_tokens - r.generated, r.rid, r.epoch, r))
            row = (now, dt, 1, batch.decode_requests - batch.late_decodes, sched.kv_used_tokens(),
                   sched.kv.allocated_blocks)
        if finishes and finishes[0][0] <= sched.step:
            self._finish_due(now)
        return row

    def _stretch(self, now: float, until: float) -> LogRow:
        """Decode-only iterations: every decoding request runs one step per iteration, until a
        finish, an arrival (``until``), a fault, an alarm that needs a decision or the policy's
        ``recheck`` of a blocked admission. Between
        alarms the steps run in one ``decode_run`` (the cost model's tight loop)."""
        sched, kv, decode_run, check = self.sched, self.sched.kv, self.decode_run, self.check
        next_finish = self.finishes[0][0] if self.finishes else NEVER
        if self.fault_step < next_finish:
            next_finish = self.fault_step
        recheck_step, recheck_s = sched.recheck  # a blocked admission to be asked again then
        if recheck_step < next_finish:
            next_finish = recheck_step
        if recheck_s < until:
            until = recheck_s
        next_alarm = sched.next_alarm_step()
        d = len(sched.decoding)
        dctx = ctx0 = sched.kv_used_tokens()
        t_start = now
        step = step0 = sched.step  # ``sched.step`` is set whenever the policy looks
        # Blocks change at alarms and by lazy growth (``kv.grown_step`` lags ``step`` here):
        # ``alloc`` sums the allocated blocks of each step run (``kv.run_steps``).
        alloc = 0
        while True:
            if check:  # one step at a time, each checked
                sched.step = step
                alloc += kv.run_steps(step)
                if not kv.advance(step):
                    raise AssertionError(f"{self.name}: lazy growth overran the free pool at step {step}")
                kv.check(sched.used_blocks_after())
                n = 1
            else:
                n = (next_finish if next_finish < next_alarm else next_alarm) - step
            now, k = decode_run(d, dctx, now, until, n if n > 1 else 1)
            dctx += d * k
            step += k
            if step >= next_finish or now >= until:
                break
            if step >= next_alarm:
                alloc += kv.run_steps(step)
                sched.step = step
                if not sched.decode_only_step(recheck_admission=False):
                    break
                next_alarm = sched.next_alarm_step()
        sched.step = step
        k = step - step0
        alloc += kv.run_steps(step)  # the alarms at ``step`` wait for the next turn
        self._finish_due(now)
        return (now, (now - t_start) / k, k, d, ctx0 + d * (k + 1) / 2, alloc / k)

    def _decode_run(self, d: int, ctx: int, now: float, until: float, steps: int) -> tuple[float, int]:
        """``CostModel.decode_run`` for a timing object without one: step by step."""
        it_time, k = self.it_time, 0
        while k < steps:
            now += it_time(0, 0, d, ctx)
            ctx += d
            k += 1
            if now >= until:
                break
        return now, k

    def _check_blocked(self, now: float) -> None:
        """``admission_blocked`` said True: ``schedule`` (hence ``admit``) must agree."""
        batch = self.sched.schedule_dry_run(now)
        if batch.prefill or batch.extra_s or batch.decode_requests != len(self.sched.decoding):
            raise AssertionError(f"{self.name}: admission_blocked() is True at step {self.sched.step}, "
                                 f"but schedule() would run {len(batch.prefill)} prefills")

    def _finish_due(self, now: float) -> None:
        """Finish the requests whose last token came out by ``sched.step`` (skip stale epochs)."""
        finishes, sched = self.finishes, self.sched
        while finishes and finishes[0][0] <= sched.step:
            _, _, epoch, r = heappop(finishes)
            if r.epoch == epoch:
                sched.finish(r, now)

    def close(self, res: SimResult) -> None:
        sched = self.sched
        if self.check:
            sched.kv.check()
            assert sched.kv.free_blocks == sched.kv.num_blocks and not sched.kv.allocs, "blocks leaked"
        res.stall_gaps = list(sched.stall_gaps)
        res.counters = dict(sched.counters)
        res.sched_s = self.sched_s
        res.prefill_iterations = self.prefill_iterations


def simulate(requests: list[Request], sched: Scheduler, *, check: bool = False,
             stepwise: bool = False, profile: str = "", predictions: str = "",
             faults: Faults | Iterable[int] | None = None, timing: Any = None,
             check_requests: bool = True) -> SimResult:
    """Replay ``requests`` (any order; fresh ones: ``request.check_servable``, skipped with
    ``check_requests=False``) through ``sched``;
    ``check`` verifies KV invariants each iteration, and every blocked admission against a dry
    run of ``schedule`` (slow: for tests).
    ``stepwise`` calls ``sched.schedule`` every iteration instead of running decode-only
    stretches back to back: the same decisions and times, one log row per iteration (the
    reference the fast path is tested against).

    ``faults`` (a :class:`~ecoserve_sched.faults.Faults`, or iteration indices) makes those
    iterations raise: the iteration takes its time, then every request in its batch ends
    ERRORED via ``sched.fail_batch`` (KV released, counted as ``errors`` and
    ``failed_iterations``) and the run goes on. A failing iteration is always a full
    ``schedule`` decision, so stretches stop before it; without faults nothing changes.

    ``timing`` (a cost model) times the iterations instead of the policy's own ``cost``, which
    the policy still plans with: a replay of a real run whose planner used one profile, timed
    by another (swap times stay the policy's)."""
    if not isinstance(sched, Scheduler):  # (was: AttributeError 'step' for a policy's name)
        raise TypeError(f"simulate: sched must be a scheduler (get_policy(name, cost)), got {type(sched).__name__}")
    if isinstance(requests, Trace):
        raise TypeError("simulate takes requests (trace.requests(slo)); run(trace, policy, cost) takes a Trace")
    requests = list(requests)
    if (bad := next((r for r in requests if not isinstance(r, Request)), None)) is not None:
        raise TypeError(f"simulate: requests must be Request objects, got {type(bad).__name__}")
    if sched.simulated or sched.step or sched.stall_gaps:  # its counters and log would run on (and
        # change the first run's result, which shares its stall gaps; was: not caught after a run of
        # prefill-only iterations, which advance no step, under vllm-v0: its counters ran on)
        raise ValueError(f"simulate: this {sched.name} scheduler has run before; build a new one "
                         "(get_policy) for each simulation")
    reqs = sorted(requests, key=attrgetter("arrival_s", "rid"))
    if check_requests:  # False only for requests ``run`` made from a checked Trace (about 1 us each)
        check_servable(reqs)
    res = SimResult(sched.name, profile, predictions, reqs, sched.kv.num_blocks * sched.kv.block_size,
                    sched.kv.block_size)
    ex = CostModelExecutor(sched, check=check, stepwise=stepwise, faults=faults, timing=timing)
    sched.simulated = True  # after the checks: a refused call leaves the scheduler as it was
    return serve(ex, res)


def iteration_table(res: SimResult) -> np.ndarray:
    """``res.log`` as an (n, 6) float array; columns as in ``SimResult.log``."""
    return np.asarray(res.log, dtype=float).reshape(-1, 6)


def fixed_predictions(policy: str, cost: Any, **policy_kw: Any) -> str | None:
    """The predictions ``policy`` runs on whatever source ``run`` is given: "none" for a policy
    that reads none (vLLM's, Sarathi's, Orca's: ``prediction_override``, and ``vllm-real``),
    "oracle" for ``ecoserve-oracle``, or None: the source given."""
    if policy.endswith("vllm-real"):
        from .engines.vllm_sim import PREDICTING_POLICIES

        return None if policy in PREDICTING_POLICIES else "none"
    return get_policy(policy, cost, **policy_kw).prediction_override


def run(trace: Trace, policy: str, cost: Any, *, slo: SLO | None = None,
        predictions: str | None = None, confusion: Confusion | None = None,
        bundle: str | None = None, seed: int = 0, check: bool = False,
        faults: Faults | Iterable[int] | None = None, **policy_kw: Any) -> SimResult:
    """Build requests from ``trace``, attach predictions, build ``policy`` and simulate
    (``faults``: injected failing iterations, see ``simulate``)."""
    if not isinstance(trace, Trace):
        raise TypeError(f"run: trace must be a Trace (read_trace(path)), got {type(trace).__name__}")
    if not isinstance(policy, str):
        raise TypeError(f"run: policy must be a policy name (`ecoserve policies`), got {type(policy).__name__}")
    if cost is None or isinstance(cost, str | Path):  # (None: was "load_profile('None')")
        how = f"load_profile({str(cost)!r})" if cost is not None else "load_profile(NAME); list_profiles() names them"
        raise TypeError(f"run: cost must be a cost model ({how}), got {type(cost).__name__}")
    if confusion is not None and not isinstance(confusion, Confusion):  # (was: AttributeError 'bucket_of')
        raise TypeError(f"run: confusion must be a Confusion (load_confusion(path)), got {type(confusion).__name__}")
    if slo is not None and not isinstance(slo, SLO):
        raise TypeError(f"run: slo must be an SLO(ttft_s, tbt_s), got {type(slo).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"run: seed must be a whole number >= 0, got {seed!r}")
    if predictions is not None and predictions not in SOURCES:  # was: ignored where the policy reads none
        raise ValueError(f"run: predictions must be one of {', '.join(SOURCES)}, got {predictions!r}")
    slo = slo or SLO()
    if policy.endswith("vllm-real"):  # vLLM's own scheduler class (engines/vllm_sim.py)
        from .engines.vllm_sim import run_real

        if faults is not None:
            raise ValueError(f"{policy}: fault injection needs an ecoserve_sched policy")
        if check:  # (was: taken, and nothing checked; a reviewer's find)
            raise ValueError(f"{policy}: check=True checks an ecoserve_sched policy's KV ledger; vLLM's own "
                             "scheduler keeps its own (its replay is checked against the simulator's)")
        return run_real(trace, policy, cost, slo=slo, predictions=predictions, confusion=confusion,
                        bundle=bundle, seed=seed, **policy_kw)
    sched = get_policy(policy, cost, slo=slo, **policy_kw)
    source = sched.prediction_override or predictions or default_source(trace)
    reqs = trace.requests(slo)
    desc = apply_predictions(reqs, trace, source, seed=seed, confusion=confusion, bundle=bundle)
    res = simulate(reqs, sched, check=check, profile=getattr(cost, "label", getattr(cost, "name", "")), predictions=desc,
                   faults=faults, check_requests=False)  # fresh, from a checked Trace
    res.policy = policy
    return res
