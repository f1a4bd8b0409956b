"""The serving loop: one loop for every engine, with the engine behind a small executor.

The loop owns what every engine shares: arrivals in time order, the drop rule (a request whose
prompt plus true output can never fit the KV cache is dropped on arrival), the stuck check (work
left, nothing runnable, nothing more to arrive), the clock, and the log of iterations. An
:class:`Executor` owns its scheduler and runs iterations; three exist:

- ``simulator.CostModelExecutor``: an ``ecoserve_sched`` policy timed by the cost model
  (decode-only stretches on its fast path, injected faults);
- ``engines.vllm_sim.VllmExecutor``: vLLM's own V1 scheduler fed fake model outputs;
- ``engines.transformers_cb.TransformersExecutor``: transformers' continuous batching running a
  real model under a policy (wall clock, or one time unit per iteration).

One turn of the loop::

    now = ex.clock(now)               an engine with its own clock (``own_clock``) reads it here
    ex.add(r, r.arrival_s)            every request that arrived by ``now`` and can fit
    row = ex.run(now, next_arrival)   one iteration, or several decode-only ones ending before
                                      ``next_arrival``: its log row, or None if nothing could run
    now = ex.wait(next_arrival)       when idle or blocked: jump (or sleep) to the next arrival
    ex.close(result)                  at the end: counters, stall gaps, scheduler time
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .request import Request

#: One log row: (end time, mean iteration time, iterations, decoding requests, KV tokens held,
#: blocks allocated); see ``SimResult.log``.
LogRow = tuple[float, float, int, int, float, float]


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
    log: list[LogRow] = field(default_factory=list)
    stall_gaps: list[float] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    sched_s: float = 0.0
    wall_s: float = 0.0
    dropped: int = 0
    prefill_iterations: int = 0  # iterations that carried prompt tokens (both executors)


def never_fits(r: Request, kv_tokens: int) -> bool:
    """The drop rule: ``r``'s prompt plus its true output can never fit a KV cache of
    ``kv_tokens`` tokens (the serving loop drops it on arrival; so does the transformers
    scheduler under transformers' own manager)."""
    return r.prompt_tokens + r.target_tokens > kv_tokens


class Executor:
    """What the loop drives: one engine with its scheduler. The defaults are a simulated clock."""

    name: str = "executor"
    kv_blocks: int  # the KV cache the drop rule measures requests against
    block_size: int
    own_clock = False  # True: the loop asks ``clock`` for the time at the top of every turn

    def clock(self, now: float) -> float:
        """The time at the top of a turn (a wall-clock engine returns the real time)."""
        return now

    def add(self, r: Request, now: float) -> None:
        """``r`` arrived at ``now`` and can fit: hand it to the scheduler."""
        raise NotImplementedError

    def drop(self, r: Request) -> None:
        """``r`` can never fit the KV cache: the loop counts it as dropped."""

    def has_work(self) -> bool:
        """Anything running or waiting?"""
        raise NotImplementedError

    def waiting(self) -> int:
        """Requests not yet finished (for the stuck check's message)."""
        raise NotImplementedError

    def run(self, now: float, until: float) -> LogRow | None:
        """Run one iteration starting at ``now`` (or decode-only ones while they end before
        ``until``, the next arrival) and return its log row; None if nothing could run."""
        raise NotImplementedError

    def wait(self, until: float) -> float:
        """Nothing to run before ``until`` (the next arrival): return the time then."""
        return until

    def close(self, res: SimResult) -> None:
        """The run is over: put the engine's counters, stall gaps and scheduler time in ``res``."""


def serve(ex: Executor, res: SimResult) -> SimResult:
    """Serve ``res.requests`` (sorted by arrival time, then rid) through ``ex``; fill ``res``."""
    t_wall = time.perf_counter()
    reqs = res.requests
    cap = ex.kv_blocks * ex.block_size
    clock, add, has_work, run, wait, log = ex.clock, ex.add, ex.has_work, ex.run, ex.wait, res.log.append
    n, i, now, never, own_clock = len(reqs), 0, 0.0, float("inf"), ex.own_clock
    arrival = reqs[0].arrival_s if n else never  # the next one
    while True:
        if own_clock:
            now = clock(now)
        if arrival <= now:
            while i < n and reqs[i].arrival_s <= now:
                r = reqs[i]
                i += 1
                if never_fits(r, cap):  # could never finish on this GPU
                    res.dropped += 1
                    ex.drop(r)
                else:
                    add(r, r.arrival_s)
            arrival = reqs[i].arrival_s if i < n else never
        if has_work():
            row = run(now, arrival)
            if row is not None:
                now = row[0]
                log(row)
                continue
            if i >= n:
                raise RuntimeError(f"{ex.name}: stuck with {ex.waiting()} waiting requests")
        elif i >= n:
            break
        now = wait(arrival)  # idle, or blocked until something arrives
    ex.close(res)
    res.wall_s = time.perf_counter() - t_wall
    return res
