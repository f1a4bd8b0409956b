"""The serving loop (``serving.py``) over a fake executor, and the cost-model executor's checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sim_helpers import FlatCost, make_req

from ecoserve_sched.policies import get_policy
from ecoserve_sched.policies.vllm import VLLMScheduler
from ecoserve_sched.request import Request
from ecoserve_sched.serving import Executor, LogRow, SimResult, serve
from ecoserve_sched.simulator import simulate


class FakeExecutor(Executor):
    """Runs every queued request to completion in one iteration of ``iter_s`` (or never)."""

    name = "fake"

    def __init__(self, kv_blocks: int = 4, block_size: int = 4, iter_s: float = 1.0, stuck: bool = False) -> None:
        self.kv_blocks, self.block_size, self.iter_s, self.stuck = kv_blocks, block_size, iter_s, stuck
        self.queue: list[Request] = []
        self.calls: list[tuple[str, float]] = []

    def add(self, r: Request, now: float) -> None:
        self.calls.append((f"add {r.rid}", now))
        self.queue.append(r)

    def has_work(self) -> bool:
        return bool(self.queue)

    def waiting(self) -> int:
        return len(self.queue)

    def run(self, now: float, until: float) -> LogRow | None:
        self.calls.append(("run", now))
        if self.stuck:
            return None
        end = now + self.iter_s
        for r in self.queue:
            r.first_token_s = r.finish_s = end
        self.queue.clear()
        return (end, self.iter_s, 1, 0, 0, 0)

    def wait(self, until: float) -> float:
        self.calls.append(("wait", until))
        return until


def _result(reqs: list[Request]) -> SimResult:
    return SimResult("fake", "", "", sorted(reqs, key=lambda r: (r.arrival_s, r.rid)), 16)


def test_loop_adds_arrivals_in_order_runs_and_jumps_to_the_next_arrival() -> None:
    reqs = [make_req(1, 0.5, 2, 2), make_req(0, 0.0, 2, 2), make_req(2, 0.5, 2, 2), make_req(3, 5.0, 2, 2)]
    ex = FakeExecutor()
    res = serve(ex, _result(reqs))
    assert ex.calls == [("add 0", 0.0), ("run", 0.0), ("add 1", 0.5), ("add 2", 0.5), ("run", 1.0),
                        ("wait", 5.0), ("add 3", 5.0), ("run", 5.0)]
    assert [row[0] for row in res.log] == [1.0, 2.0, 6.0]
    assert res.dropped == 0 and res.wall_s > 0


def test_loop_drops_what_can_never_fit_and_reports_a_stuck_executor() -> None:
    # 4 blocks of 4 tokens: prompt + output of 16 fits, 17 never does.
    reqs = [make_req(0, 0.0, 8, 8), make_req(1, 0.0, 9, 8)]
    ex = FakeExecutor()
    res = serve(ex, _result(reqs))
    assert res.dropped == 1 and ("add 1", 0.0) not in ex.calls
    with pytest.raises(RuntimeError, match="fake: stuck with 1 waiting"):
        serve(FakeExecutor(stuck=True), _result([make_req(0, 0.0, 2, 2)]))


def test_check_mode_catches_an_admission_predicate_that_drifts_from_admit(monkeypatch) -> None:
    """``check=True`` compares every blocked admission with a dry run of ``schedule``: a
    predicate that claims "blocked" while ``admit`` would start a request fails the run."""
    def reqs() -> list[Request]:
        return [make_req(0, 0.0, 8, 40), make_req(1, 0.05, 8, 40), make_req(2, 0.1, 8, 4)]

    def sched() -> VLLMScheduler:
        return get_policy("vllm", FlatCost(blocks=40), block_size=4, max_running=6, token_budget=64)

    simulate(reqs(), sched(), check=True)  # the real predicate agrees with admit
    monkeypatch.setattr(VLLMScheduler, "admission_blocked", lambda self: True)
    with pytest.raises(AssertionError, match="admission_blocked"):
        simulate(reqs(), sched(), check=True)


def test_schedule_dry_run_leaves_the_policy_untouched() -> None:
    s = get_policy("vllm", FlatCost(blocks=40), block_size=4, max_running=6, token_budget=64)
    r = make_req(0, 0.0, 8, 4)
    s.add(r, 0.0)
    batch = s.schedule_dry_run(0.0)
    assert len(batch.prefill) == 1 and batch.prefill[0][0] is not r
    assert s.waiting_count() == 1 and not s.prefilling and s.kv.free_blocks == 40


def test_no_import_cycle_between_simulator_and_engines() -> None:
    """The engines import the loop (``serving``), never ``simulator``; ``simulator`` imports no
    engine at import time (``run`` imports ``vllm_sim`` only for ``vllm-real``)."""
    for module, banned in (("ecoserve_sched.engines.vllm_sim", "ecoserve_sched.simulator"),
                           ("ecoserve_sched.simulator", "ecoserve_sched.engines")):
        code = (f"import sys, {module}; "
                f"assert not [m for m in sys.modules if m.startswith({banned!r})], {module!r}")
        subprocess.run([sys.executable, "-c", code], check=True)
