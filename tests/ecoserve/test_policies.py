"""Each policy on small hand-built traces, with the KV invariants checked every iteration."""

from __future__ import annotations

import pytest
from sim_helpers import FlatCost, make_req

from ecoserve_sched.policies import get_policy, policy_names
from ecoserve_sched.policies.ecoserve import EcoServeConfig
from ecoserve_sched.request import State
from ecoserve_sched.simulator import simulate


def sim(policy, reqs, blocks=64, **kw):
    sched = get_policy(policy, FlatCost(blocks=blocks), block_size=4, max_running=kw.pop("max_running", 8), **kw)
    res = simulate(reqs, sched, check=True)
    assert all(r.state == State.FINISHED for r in reqs)
    assert sched.kv.free_blocks == sched.kv.num_blocks
    return sched, res


def test_registry_has_all_policies():
    names = set(policy_names())
    assert {"vllm", "orca", "sarathi", "s3", "sjf", "ecoserve", "ecoserve-oracle",
            "ecoserve-nopipe", "ecoserve-noorder"} <= names


def test_vllm_preempts_latest_arrival_by_recompute():
    # 8 blocks of 4 tokens = 32 slots; two requests of prompt 8 growing to 8+16 each cannot both fit.
    a, b = make_req(0, 0.0, 8, 16), make_req(1, 0.001, 8, 16)
    sched, _ = sim("vllm", [a, b], blocks=8)
    assert b.preemptions >= 1 and a.preemptions == 0
    assert sched.counters["recomputes"] == sched.counters["preemptions"] >= 1
    assert a.finish_s < b.finish_s


@pytest.mark.parametrize("admits_after_preemption", [False, True])
def test_no_admission_in_an_iteration_that_preempted(admits_after_preemption):
    # 8 blocks of 4 tokens. A and B decode; C (predicted shortest) arrives while the pool is
    # full. In the iteration from 0.09 s, A's next block preempts B (SJF's victim: the longest
    # predicted remaining work), freeing 4 blocks. vLLM V1 admits nothing in a step whose
    # running pass preempted (``if not preempted_reqs``), so C starts an iteration later.
    a, b = make_req(0, 0.0, 8, 20, pred=20), make_req(1, 0.0, 8, 20, pred=30)
    c = make_req(2, 0.075, 4, 2, pred=1)
    sched = get_policy("sjf", FlatCost(blocks=8), block_size=4, max_running=8)
    sched.admits_after_preemption = admits_after_preemption
    simulate([a, b, c], sched, check=True)
    assert (a.preemptions, b.preemptions, c.preemptions) == (0, 1, 0)
    assert c.first_token_s == pytest.approx(0.10 if admits_after_preemption else 0.11, abs=1e-3)


def test_ecoserve_does_not_admit_without_reservation():
    # 10 blocks; the first request reserves 8 of them; the second (needs 5) must wait.
    a = make_req(0, 0.0, 8, 20, reserve=24)
    b = make_req(1, 0.001, 8, 4, reserve=12)
    sched = get_policy("ecoserve-nopipe", FlatCost(blocks=10), block_size=4, max_running=8)
    simulate([a, b], sched, check=True)
    assert b.first_token_s >= a.finish_s - 1e-9  # b started only after a released its reservation
    assert sched.counters["preemptions"] == 0


def test_ecoserve_nopipe_waits_for_the_sum_of_reservations():
    """The lender's reservation and the borrower's do not fit at once, but the borrower ends
    long before the lender reaches its tail: with pipelining (the projected peak) it starts
    right away, without it only once the lender has finished."""
    starts = {}
    for pipelining in (True, False):
        lender = make_req(0, 0.0, 4, 40, reserve=40, bucket=5)
        borrower = make_req(1, 0.05, 4, 3, reserve=4, bucket=1)
        cfg = EcoServeConfig(pipelining=pipelining, reserve_frac=0.0)
        sched = get_policy("ecoserve", FlatCost(blocks=12), block_size=4, max_running=8, config=cfg)
        simulate([lender, borrower], sched, check=True)
        starts[pipelining] = (borrower.first_token_s, lender.finish_s)
    assert starts[True][0] < starts[True][1]  # pipelined: the borrower runs beside the lender
    assert starts[False][0] >= starts[False][1]  # not pipelined: it waits for the lender's end


def test_ecoserve_tops_up_a_mispredicted_request():
    r = make_req(0, 0.0, 8, 100, pred=10, reserve=12)
    sched, _ = sim("ecoserve", [r], blocks=64)
    assert sched.counters["topups"] >= 1 and r.preemptions == 0 and r.generated == 100


def test_ecoserve_orders_by_slack_and_predicted_work():
    # A blocker holds most of the KV; a long request queues first, a short one arrives later.
    def trace():
        return [make_req(0, 0.0, 8, 200, reserve=200), make_req(1, 0.001, 8, 200, reserve=200, pred=200),
                make_req(2, 0.002, 8, 5, reserve=5, pred=5)]

    reqs = trace()
    simulate(reqs, get_policy("ecoserve-nopipe", FlatCost(blocks=60), block_size=4, max_running=8), check=True)
    assert reqs[2].first_token_s < reqs[1].first_token_s  # shorter predicted work goes first
    reqs = trace()
    cfg = EcoServeConfig(ordering=False, pipelining=False)
    simulate(reqs, get_policy("ecoserve", FlatCost(blocks=60), block_size=4, max_running=8, config=cfg), check=True)
    assert reqs[1].first_token_s <= reqs[2].first_token_s  # FCFS without ordering


def test_ecoserve_oracle_uses_true_lengths():
    sched = get_policy("ecoserve-oracle", FlatCost())
    assert sched.prediction_override == "oracle"


def test_orca_reserves_max_tokens_and_never_preempts():
    reqs = [make_req(i, 0.0, 8, 10, max_tokens=20) for i in range(3)]
    sched = get_policy("orca", FlatCost(blocks=16), block_size=4, max_running=8)
    sched.add(reqs[0], 0.0)
    sched.schedule(0.0)
    assert sched.kv.owned(0) == sched.kv.blocks_for(8 + 20) == 7
    # three requests grow to 6 blocks each on 16: on demand (vLLM) one is preempted; Orca's
    # reservations (7 blocks each) admit two and the third waits
    for policy, preempted in (("vllm", True), ("orca", False)):
        sched2, _ = sim(policy, [make_req(i, 0.0, 8, 16, max_tokens=20) for i in range(3)], blocks=16)
        assert (sched2.counters["preemptions"] > 0) is preempted, policy


def test_s3_restarts_on_overrun_with_a_bigger_reservation():
    r = make_req(0, 0.0, 8, 40, pred=8, reserve=8)
    sched, _ = sim("s3", [r], blocks=64)
    assert sched.counters["restarts"] >= 1 and r.reserved_extra >= 8 and r.generated == 40


def test_sjf_runs_shortest_predicted_first():
    blocker = make_req(0, 0.0, 8, 30)
    long_ = make_req(1, 0.001, 8, 200, pred=200)
    short = make_req(2, 0.002, 8, 5, pred=5)
    sim("sjf", [blocker, long_, short], max_running=1 + 1, token_budget=8)
    assert short.first_token_s < long_.first_token_s


def test_sarathi_limits_prefill_per_iteration():
    reqs = [make_req(0, 0.0, 1500, 3)]
    sched = get_policy("sarathi", FlatCost(blocks=1024), block_size=16, max_running=8)
    sched.add(reqs[0], 0.0)
    b = sched.schedule(0.0)
    assert b.prefill_tokens == 512


#: Policies whose ``admission_blocked`` is exact (no "unsure" answers): it must equal "``admit``
#: starts nothing". EcoServe's may say "not blocked" when unsure (a PT that may give way as time
#: passes, a KV projection not tried yet), never "blocked" when ``admit`` would start a request.
EXACT_ADMISSION = {"vllm", "sarathi", "sjf", "orca", "s3", "vllm-v0"}


def test_admission_blocked_equals_a_dry_run_admitting_nothing_on_random_states():
    """Wherever the engine asks ``admission_blocked`` (``decode_only_step``, fast path), compare
    it with ``schedule`` run on a copy: did ``admit`` start (or swap in) any request?"""
    import copy
    import random

    seen: dict[str, list[int]] = {}
    for name in policy_names():
        answers = seen.setdefault(name, [0, 0, 0, 0])  # blocked, admits, unsure, preempted first
        for seed in range(3):
            rng = random.Random(seed)
            reqs = []
            for i in range(40):
                out = rng.randint(1, 60)
                reqs.append(make_req(i, rng.uniform(0.0, 0.6), rng.randint(1, 40), out,
                                     pred=max(1, out + rng.randint(-20, 20)), bucket=rng.randint(0, 4),
                                     max_tokens=rng.choice([64, 128])))
            sched = get_policy(name, FlatCost(blocks=rng.choice([24, 40, 80])), block_size=4,
                               max_running=rng.choice([3, 8]), token_budget=rng.choice([16, 48, 256]))
            policy_blocked = sched.admission_blocked

            def checked(sched=sched, policy_blocked=policy_blocked, name=name, answers=answers) -> bool:
                blocked = policy_blocked()
                dry = copy.deepcopy(sched, {id(sched.cost): sched.cost})
                batch = dry.schedule(sched.now)
                if dry.counters["preemptions"] != sched.counters["preemptions"]:
                    # vllm-v0 asks before its decode pass, which may preempt them all and admit
                    # after (the engine runs no stretch then: ``decode_only_step`` checks the pool)
                    answers[3] += 1
                    return blocked
                admits = bool(batch.prefill or dry.resumed)
                assert not (blocked and admits), f"{name} step {sched.step}: blocked, but admit starts a request"
                if name in EXACT_ADMISSION:
                    assert blocked or admits, f"{name} step {sched.step}: not blocked, but admit starts nothing"
                answers[0 if blocked else 1 if admits else 2] += 1
                return blocked

            sched.admission_blocked = checked
            simulate(reqs, sched)
    for name, (blocked, admits, *_) in seen.items():
        assert blocked and admits, (name, seen[name])  # both answers came up: the check is not vacuous


# ---- writing a policy (docs/simulator.md): the page's example, run as written ------------------
@pytest.fixture
def registry_restored():
    """The registry as it was after the test (the tests register and replace policies)."""
    from ecoserve_sched.policies import POLICIES

    policy_names()  # every built-in registered before the copy (was: a test run alone restored none)
    saved = dict(POLICIES)
    yield
    POLICIES.clear()
    POLICIES.update(saved)


def _docs_policy_example() -> str:
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text(encoding="utf-8")
    section = page.split("## Writing a policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_policy_runs_checked_and_matches_vllm_where_uncontended(registry_restored):
    import numpy as np

    from ecoserve_sched.simulator import run
    from ecoserve_sched.trace import Trace

    exec(compile(_docs_policy_example(), "docs/simulator.md", "exec"), {"__name__": "docs_example"})
    assert "my-fcfs" in policy_names()
    rng = np.random.default_rng(0)
    n = 60
    tr = Trace("t", np.sort(rng.uniform(0, 20, n)), rng.integers(20, 400, n), rng.integers(1, 300, n),
               np.full(n, 2048))
    tight = run(tr, "my-fcfs", FlatCost(blocks=200), block_size=4, check=True)  # preempts: checked
    assert all(r.state == State.FINISHED for r in tight.requests) and tight.counters["preemptions"] > 0
    roomy = {p: [(r.first_token_s, r.finish_s) for r in run(tr, p, FlatCost(blocks=100_000), check=True).requests]
             for p in ("my-fcfs", "vllm")}
    assert roomy["my-fcfs"] == roomy["vllm"]


def test_a_policy_without_a_hook_is_named_and_a_taken_name_refused(registry_restored):
    from ecoserve_sched.policies import Scheduler, registry

    class Half(Scheduler):
        def enqueue(self, r, front=False):
            self.q = [*getattr(self, "q", []), r]

    with pytest.raises(NotImplementedError, match=r"policy Half does not implement waiting_count\(\)"):
        simulate([make_req(0, 0.0, 10, 5)], Half(FlatCost()))
    with pytest.raises(ValueError, match="policy 'vllm' is built in; pass replace=True"):
        registry.register("vllm", Half)
    registry.register("vllm", Half, replace=True)
    assert registry.POLICIES["vllm"] is Half
    registry.register("mine", Half)
    registry.register("mine", Scheduler)  # one's own, registered again (a notebook cell run twice)
    assert registry.POLICIES["mine"] is Scheduler


def test_a_policy_registered_before_the_built_ins_load_is_checked_and_kept() -> None:
    """In a fresh process, before any built-in policy was loaded: a taken name was accepted
    without a word and the built-in replaced it later, also after ``replace=True``."""
    import subprocess
    import sys

    code = """
from ecoserve_sched.policies import Scheduler, policy_names, register
from ecoserve_sched.policies.registry import POLICIES

class Mine(Scheduler):
    pass

try:
    register("vllm", Mine)
except ValueError as e:
    print("refused:", e)
register("sjf", Mine, replace=True)
policy_names()  # every policy loaded, entry points too
print("sjf is mine:", POLICIES["sjf"] is Mine)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: policy 'vllm' is built in; pass replace=True" in out.stdout
    assert "sjf is mine: True" in out.stdout


def test_a_built_in_policy_module_can_be_reloaded(registry_restored):
    """Reloading it (autoreload of an edited policy) was refused as replacing a built-in."""
    import importlib

    from ecoserve_sched.policies import POLICIES, sjf

    saved = dict(sjf.__dict__)
    try:
        importlib.reload(sjf)
        assert POLICIES["sjf"] is sjf.SJFScheduler
    finally:
        sjf.__dict__.update(saved)  # the other tests' classes


def test_policies_of_installed_packages_are_loaded_from_entry_points(registry_restored, monkeypatch, tmp_path):
    import importlib.metadata

    from ecoserve_sched import policies
    from ecoserve_sched.policies import registry

    (tmp_path / "third_party_policy.py").write_text(_docs_policy_example().replace("my-fcfs", "third-party-fcfs"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(policies, "_loaded", False)
    ep = importlib.metadata.EntryPoint("third-party-fcfs", "third_party_policy", registry.ENTRY_POINTS)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINTS else [])
    assert "third-party-fcfs" in policy_names()
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_here", registry.ENTRY_POINTS)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    monkeypatch.setattr(policies, "_loaded", False)
    monkeypatch.setattr(registry, "plugin_error", [])
    with pytest.warns(UserWarning, match=r"policy plug-in 'broken' \(no_such_module_here\) failed to load"):
        assert "vllm" in policy_names()  # the built-in policies still run
    with pytest.raises(ValueError, match=r"unknown policy 'its-policy'.*plug-in 'broken'"):
        get_policy("its-policy", FlatCost())
    monkeypatch.setattr(policies, "_loaded", True)


@pytest.mark.parametrize("policy", sorted(policy_names()))
def test_a_request_is_cancelled_wherever_it_is(policy):
    """``Scheduler.cancel`` ends a request queued (new, preempted, swapped, parked, its TTFT
    lost) or running, and the rest are served: the waiting count follows, the KV ledger stays
    consistent, cancels are counted apart from errors (was: only a running request could be
    ended, so transformers' manager served a cancelled waiting request in full)."""
    import math
    import random

    from ecoserve_sched.policies.base import Scheduler
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import CostModelExecutor

    probe = get_policy(policy, FlatCost())
    if not isinstance(probe, Scheduler):
        pytest.skip("not a Scheduler")
    budget = 12 if probe.chunked_prefill else 64  # (whole prompts: one iteration must hold one)
    states: set[State] = set()
    for seed in range(4):
        rng = random.Random(seed)
        sched = get_policy(policy, FlatCost(blocks=40, iter_s=0.02), block_size=4, max_running=6,
                           token_budget=budget, slo=SLO(0.3, 0.05))
        reqs = [make_req(i, 0.0, rng.randint(4, 60), rng.randint(1, 40), pred=rng.randint(1, 40), max_tokens=40,
                         slo=SLO(0.3, 0.05)) for i in range(40)]
        for r in reqs:
            sched.add(r, 0.0)
        ex, now, cancelled = CostModelExecutor(sched, check=True, stepwise=True), 0.0, []
        while sched.has_work():
            live = [r for r in reqs if r.state not in (State.FINISHED, State.ERRORED)]
            if rng.random() < 0.1:  # each state in turn, where a request is in it
                want = (State.PREFILL, State.WAITING, State.DECODE, State.SWAPPED)[len(cancelled) % 4]
                r = rng.choice([r for r in live if r.state == want] or live)
                states.add(r.state)
                sched.cancel(r)
                cancelled.append(r)
                assert (r.state, r.error) == (State.ERRORED, "cancelled")
                assert sched.waiting_count() == sum(q.state in (State.WAITING, State.SWAPPED) for q in reqs)
                sched.kv.check()
                continue
            row = ex.run(now, math.inf)
            assert row is not None, "a run with work left made an empty batch"
            now = row[0]
        assert all(r.state == State.FINISHED for r in reqs if r not in cancelled)
        assert sched.kv.free_blocks == sched.kv.num_blocks
        assert sched.counters["cancelled"] == len(cancelled) and sched.counters["errors"] == 0
    assert {State.WAITING, State.DECODE} | ({State.PREFILL} if probe.chunked_prefill else set()) <= states


def test_ecoserve_cancels_from_each_of_its_queues():
    """EcoServe keeps queued requests in four queues (preempted, PTs, PTs whose TTFT is lost,
    parked): ``dequeue`` finds a request in each, and refuses one not queued."""
    from ecoserve_sched.queues import discard_from_heap

    sched = get_policy("ecoserve", FlatCost(), block_size=4)
    reqs = [make_req(i, 0.0, 8, 8) for i in range(5)]
    for r in reqs[:3]:
        sched.add(r, 0.0)
    sched.lost.push(reqs[3])  # as ``_head`` moves one whose TTFT is lost
    sched.parked.append((1.0, 0, reqs[4]))
    reqs[2].generated, reqs[2].state, reqs[2].swapped_tokens = 1, State.SWAPPED, 9
    sched.pt.discard(reqs[2])
    sched.resume.append(reqs[2])  # as a request swapped out comes back
    sched._waiting = 5
    for r in (reqs[4], reqs[2], reqs[3], reqs[0]):
        sched.cancel(r)
    assert sched.waiting_count() == 1 and sched.pt.peek() is reqs[1] and not sched.parked
    assert not sched.resume and not len(sched.lost) and sched.counters["cancelled"] == 4
    assert all(r.state == State.ERRORED and r.error == "cancelled" for r in reqs if r is not reqs[1])
    assert reqs[2].swapped_tokens == 0
    assert sched.dequeue(reqs[0]) is False  # taken out already
    with pytest.raises(ValueError, match="request 9 is not queued"):
        sched.cancel(make_req(9, 0.0, 8, 8))  # never added
    assert not discard_from_heap([], reqs[0])


def test_a_cancel_is_not_an_error_and_calls_a_policys_own_abort_as_before():
    """A policy of one's own that overrides ``abort(r, error)`` (the signature before cancels)
    is still called by ``cancel`` (a first version passed it a new argument: a TypeError that
    failed every request under transformers' manager); ``summarize`` counts cancels apart from
    errors; an ended request cannot be cancelled, and says so."""
    from ecoserve_sched.metrics import summarize
    from ecoserve_sched.policies.vllm import VLLMScheduler
    from ecoserve_sched.request import SLO
    from ecoserve_sched.serving import SimResult

    seen = []

    class OwnAbort(VLLMScheduler):
        def abort(self, r, error="engine error"):
            seen.append(error)
            super().abort(r, error)

    sched = OwnAbort(FlatCost(), block_size=4)
    a, b = make_req(0, 0.0, 8, 4), make_req(1, 0.0, 8, 4)
    for r in (a, b):
        sched.add(r, 0.0)
    sched.complete(sched.schedule(0.0), 0.01)  # both prefilled: decoding
    sched.cancel(a)
    assert seen == ["cancelled"] and sched.counters["cancelled"] == 1 and sched.counters["errors"] == 0
    with pytest.raises(ValueError, match="request 0 has ended \\(ERRORED\\): nothing to cancel"):
        sched.cancel(a)
    sched.abort(b, "boom")
    res = SimResult(sched.name, "", "", [a, b], 256, 4)
    res.log.append((0.01, 0.01, 1, 0, 0, 0))
    s = summarize(res, SLO())
    assert (s["errors"], s["cancelled"], s["finished"]) == (1, 1, 0)
