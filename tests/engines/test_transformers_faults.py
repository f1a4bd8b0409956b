"""transformers continuous batching when the forward pass raises: the batch's requests end with
an error, their engine blocks and ledger blocks come back, and every other request completes
with exactly the tokens of a plain greedy ``generate``. The simulator's injected faults at the
same steps reproduce the run (step clock)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from cb_trace import KV_BLOCKS, TRACE, make_engine, physical_blocks, trace_requests  # noqa: E402

from ecoserve_sched.request import State  # noqa: E402
from ecoserve_sched.simulator import simulate  # noqa: E402


def _run_with_faults(model, monkeypatch, policy: str, fail_steps: set[int] | None):
    """Generate with the forward raising at the policy steps in ``fail_steps`` (None: always),
    checking the ledger and the engine's blocks after every iteration."""
    eng = make_engine(model, policy)
    forward = model.forward
    raised: list[int] = []

    def flaky_forward(*args, **kwargs):
        step = eng.policy.step
        if fail_steps is None or step in fail_steps:
            raised.append(step)
            raise RuntimeError(f"injected fault at step {step}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    problems: list[str] = []

    def check(_rec) -> None:
        sched = eng.scheduler
        kv = sched.policy.kv
        kv.check()
        for rid, st in sched.states.items():
            physical = physical_blocks(sched, st.request_id)
            r = sched.reqs[st.request_id]
            if r.state == State.ERRORED and (physical or kv.owned(rid) or rid in sched.held):
                problems.append(f"errored request {rid} holds {physical} blocks, {kv.owned(rid)} in the ledger")
            if physical > kv.owned(rid):
                problems.append(f"request {rid}: {physical} blocks > {kv.owned(rid)} owned")

    run = eng.generate(trace_requests(), on_iteration=check)
    monkeypatch.setattr(model, "forward", forward)
    assert not problems, problems
    return eng, run, raised


@pytest.mark.parametrize("policy,fail_steps", [("ecoserve", {40}), ("vllm", {12, 30})])
def test_failed_batches_end_as_errors_and_the_rest_complete(tiny_llama, tiny_llama_greedy, monkeypatch, policy,
                                                            fail_steps):
    eng, run, raised = _run_with_faults(tiny_llama, monkeypatch, policy, fail_steps)
    assert raised == sorted(fail_steps)
    errored = [r for r in run.results if r.error is not None]
    done = [r for r in run.results if r.error is None]
    assert errored and done
    assert all(r.error.startswith("RuntimeError: injected fault at step ") and len(r.tokens) < TRACE[r.rid][2]
               for r in errored)
    for res in done:  # the survivors' KV was untouched: same tokens as alone
        assert res.tokens == tiny_llama_greedy[res.rid], f"request {res.rid}"
    assert run.counters["errors"] == len(errored) and run.counters["failed_iterations"] == len(fail_steps)
    if policy == "ecoserve":  # faults hit a run that tops up reservations
        assert run.counters["topups"]
    kv = eng.policy.kv
    assert kv.free_blocks == KV_BLOCKS and not kv.allocs  # every ledger block came back
    sched = eng.scheduler
    assert not sched.held and not sched.active_requests and not sched.waiting_requests
    assert not any(any(a.block_table.values()) for a in sched.cache.cache_allocators.values())  # no engine block held
    assert not sched.states and not sched.reqs  # ended requests are forgotten (a server's scheduler stays small)

    # The simulator with faults at the same steps makes the same decisions at the same times.
    sim = simulate(eng.to_requests(trace_requests()), eng.make_policy(), check=True, faults=fail_steps)
    assert sim.counters == run.counters
    for r, res in zip(sorted(sim.requests, key=lambda r: r.rid), run.results, strict=True):
        assert (r.state == State.ERRORED) == (res.error is not None), f"request {r.rid}"
        if r.state == State.FINISHED:
            assert (res.ttft_s, res.jct_s, res.preemptions) == (
                r.first_token_s - r.arrival_s, r.finish_s - r.arrival_s, r.preemptions)


def test_every_forward_failing_ends_every_request_without_hanging(tiny_llama, monkeypatch):
    eng, run, raised = _run_with_faults(tiny_llama, monkeypatch, "ecoserve", None)
    assert raised and all(r.error and not r.tokens for r in run.results)
    assert run.counters["errors"] == len(TRACE)
    assert eng.policy.kv.free_blocks == KV_BLOCKS and not eng.policy.kv.allocs
    sim = simulate(eng.to_requests(trace_requests()), eng.make_policy(), check=True, faults=range(1000))
    assert all(r.state == State.ERRORED for r in sim.requests) and sim.counters == run.counters
