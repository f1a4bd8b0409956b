"""Scheduler runs under injected engine faults (every policy): a failing iteration ends its
batch's requests as errors, every KV block comes back, and the run goes on for the others."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sim_helpers import FlatCost, make_req

from ecoserve_sched.faults import Faults
from ecoserve_sched.metrics import summarize
from ecoserve_sched.policies import get_policy, policy_names
from ecoserve_sched.request import SLO, State
from ecoserve_sched.simulator import simulate

REQ = st.tuples(st.floats(0, 2.0), st.integers(1, 60), st.integers(1, 80),
                st.integers(1, 120), st.integers(0, 4))
FAULTS = st.one_of(
    st.builds(Faults, steps=st.frozensets(st.integers(0, 150), max_size=8)),
    st.builds(Faults, rate=st.floats(0.001, 0.3), seed=st.integers(0, 2**16)),
    st.builds(Faults, steps=st.frozensets(st.integers(0, 40), max_size=3), rate=st.floats(0.0, 0.05),
              seed=st.integers(0, 9)),
)
BS = 4


def _requests(rows):
    return [make_req(i, a, p, o, reserve=r, pred=r, bucket=b, max_tokens=max(o, 64))
            for i, (a, p, o, r, b) in enumerate(rows)]


def _watch_failures(sched) -> list[str]:
    """Check, right after every failed iteration, that its requests hold no block and that the
    KV books balance."""
    problems: list[str] = []
    fail_batch = sched.fail_batch

    def checked(batch, error="engine error"):
        failed = fail_batch(batch, error)
        sched.kv.check(sched.used_blocks_after())
        for r in failed:
            if r.state != State.ERRORED or r.rid in sched.kv.allocs or r.error != error:
                problems.append(f"request {r.rid}: {r.state.name}, alloc {sched.kv.allocs.get(r.rid)}")
            if r.rid in sched.decoding or r.rid in sched.prefilling:
                problems.append(f"request {r.rid} still running")
        return failed

    sched.fail_batch = checked
    return problems


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(REQ, min_size=1, max_size=25), blocks=st.integers(12, 80),
       policy=st.sampled_from(sorted(policy_names())), swap=st.booleans(), faults=FAULTS)
@example(rows=[(0.0, 1, 1, 1, 0)], blocks=12, policy="vllm-v0", swap=False,  # a failed first (prefill) iteration
         faults=Faults(steps=frozenset([0]), rate=0.03125, seed=0))
def test_random_faults_end_every_request_and_return_every_block(rows, blocks, policy, swap, faults):
    reqs = _requests(rows)
    cost = FlatCost(blocks=blocks)
    if swap:
        cost.swap_time = lambda t: 1e-9 * t  # make swapping cheaper than recompute
    sched = get_policy(policy, cost, block_size=BS, max_running=6, token_budget=64)
    problems = _watch_failures(sched)
    res = simulate(reqs, sched, check=True, faults=faults)  # KV invariants every iteration
    assert not problems, problems
    errored = 0
    for r in reqs:
        if r.prompt_tokens + r.target_tokens > blocks * BS:
            continue  # dropped: can never fit
        assert r.state in (State.FINISHED, State.ERRORED), f"request {r.rid} lost in {r.state.name}"
        if r.state == State.FINISHED:
            assert r.generated == r.target_tokens and r.arrival_s <= r.first_token_s <= r.finish_s
        else:
            errored += 1
            assert r.error == faults.error and r.generated < r.target_tokens and r.finish_s < 0
    assert sched.kv.free_blocks == blocks and not sched.kv.allocs
    assert not sched.decoding and not sched.prefilling and not sched.waiting_count()
    s = summarize(res, SLO())
    assert s["errors"] == errored == res.counters["errors"]
    assert s["finished"] + s["errors"] + s["dropped"] == s["requests"] == len(reqs)
    iterations = sum(row[2] for row in res.log)  # (sched.step counts decode steps: a failed
    # prefill-only iteration at the start left it 0, found by hypothesis on a vllm-v0 case)
    assert res.counters["failed_iterations"] <= (len(faults.steps) if not faults.rate else iterations)
    event(f'errored>0: {errored > 0}; finished>0: {s["finished"] > 0}')
    if errored:
        assert res.counters["failed_iterations"] >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(REQ, min_size=1, max_size=25), blocks=st.integers(12, 80),
       policy=st.sampled_from(sorted(policy_names())), faults=FAULTS)
def test_faults_hit_the_same_iterations_on_the_fast_path(rows, blocks, policy, faults):
    """Decode-only stretches stop before a failing iteration: the fast path and the policy asked
    every iteration fail the same requests at the same step and time."""
    runs = []
    for stepwise in (False, True):
        reqs = _requests(rows)
        cost = FlatCost(blocks=blocks)
        cost.iteration_time = lambda p, pc, d, dc: 0.01 + 1e-6 * p + 1e-7 * dc
        sched = get_policy(policy, cost, block_size=BS, max_running=6, token_budget=64)
        res = simulate(reqs, sched, stepwise=stepwise, faults=faults)
        runs.append(([(r.state, r.first_token_s, r.finish_s, r.generated, r.preemptions) for r in reqs],
                     res.counters, res.stall_gaps, sum(row[2] for row in res.log)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("policy", sorted(policy_names()))
def test_no_faults_change_nothing(policy):
    """``faults=None``, an empty plan and faults after the end give the plain run, bit for bit."""
    rng = np.random.default_rng(5)
    rows = [(float(a), int(p), int(o), int(r), int(b)) for a, p, o, r, b in zip(
        rng.uniform(0, 2, 40), rng.integers(1, 60, 40), rng.integers(1, 80, 40),
        rng.integers(1, 120, 40), rng.integers(0, 5, 40), strict=True)]
    out = []
    for faults in (None, Faults(), [10**9]):
        reqs = _requests(rows)
        sched = get_policy(policy, FlatCost(blocks=40), block_size=BS, max_running=6, token_budget=64)
        res = simulate(reqs, sched, faults=faults)
        out.append(([(r.state, r.first_token_s, r.finish_s, r.preemptions) for r in reqs], res.log,
                    res.counters, res.stall_gaps))
    assert out[0] == out[1] == out[2]
    assert out[0][2]["errors"] == out[0][2]["failed_iterations"] == 0


def test_a_fault_ends_its_batch_and_later_requests_run():
    """Two requests decode when iteration 3 raises: both end as errors; a later one finishes.
    Errors count as SLO misses and stay out of the latency metrics."""
    reqs = [make_req(0, 0.0, 8, 10), make_req(1, 0.0, 8, 10), make_req(2, 1.0, 8, 5)]
    sched = get_policy("ecoserve", FlatCost(blocks=40, iter_s=0.01), block_size=BS, max_running=6)
    res = simulate(reqs, sched, check=True, faults=Faults(steps={3}, error="GPU fell off the bus"))
    assert [r.state for r in reqs] == [State.ERRORED, State.ERRORED, State.FINISHED]
    assert reqs[0].error == "GPU fell off the bus" and reqs[0].generated == 3  # 1 prefill + 2 decodes
    assert res.counters["failed_iterations"] == 1 and res.counters["errors"] == 2
    s = summarize(res, SLO())
    assert (s["finished"], s["errors"], s["slo_attainment"]) == (1, 2, pytest.approx(1 / 3))
    assert s["mean_jct_s"] == pytest.approx(reqs[2].finish_s - reqs[2].arrival_s)
    assert sched.kv.free_blocks == 40


def test_fault_plan_and_validation():
    assert list(Faults(steps={5, 1, 3}).plan()) == [1, 3, 5]
    plan = list(itertools.islice(Faults(steps={0, 2}, rate=0.3, seed=1).plan(), 200))
    assert plan[:1] == [0] and 2 in plan and plan == sorted(set(plan))
    gaps = np.diff(list(itertools.islice(Faults(rate=0.1, seed=2).plan(), 5000)))
    assert 9 < gaps.mean() < 11  # Bernoulli(0.1) per iteration: mean gap 10
    assert Faults.of([4, 2]) == Faults(steps=frozenset({2, 4})) and Faults.of(None) is None
    # was: 2.5 read as step 2, True as 1, "12" as steps 1 and 2; a NaN rate or a bad seed
    # failed only when the plan was drawn
    for bad, why in (({"rate": 1.0}, "rate"), ({"rate": -0.1}, "rate"), ({"rate": float("nan")}, "rate"),
                     ({"steps": {-1}}, "steps"), ({"steps": {2.5}}, "got 2.5"), ({"steps": {True}}, "got True"),
                     ({"steps": {float("nan")}}, "got nan"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")):
        with pytest.raises(ValueError, match=why):
            Faults(**bad)
    with pytest.raises(TypeError, match="got text '12'"):
        Faults(steps="12")
    # a reviewer's: "cancelled" counted the faults as cancellations, None left them no reason
    for error in ("cancelled", None, " ", 5):
        with pytest.raises(ValueError, match="fault error must be a reason"):
            Faults(steps={1}, error=error)
    with pytest.raises(TypeError, match="got int"):
        Faults.of(5)
    assert Faults(steps={np.int64(3)}).steps == {3} and type(next(iter(Faults(steps={np.int64(3)}).steps))) is int


def test_abort_is_for_running_requests_only():
    sched = get_policy("vllm", FlatCost(blocks=40), block_size=BS)
    r = make_req(0, 0.0, 8, 4)
    sched.add(r, 0.0)
    with pytest.raises(ValueError, match="only running requests"):
        sched.abort(r)
