"""transformers continuous batching under ecoserve_sched policies, on CPU with a tiny random Llama.

The engine runs on the step clock (every iteration lasts 1), so its run is deterministic and
the simulator over ``StepCost`` must reproduce it exactly: same TTFT and JCT in iterations for
every request, same preemptions and top-ups. The trace makes EcoServe top up and preempt (by
recompute), and vLLM preempt, so that outputs, block bounds and agreement are checked across both.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from cb_trace import (  # noqa: E402
    KV_BLOCKS,
    MAX_RUNNING,
    TOKEN_BUDGET,
    make_engine,
    physical_blocks,
    trace_requests,
)

from ecoserve_sched.request import SLO, State  # noqa: E402
from ecoserve_sched.simulator import simulate  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama_ecoserve_run(tiny_llama):
    """One EcoServe run over TRACE, checking the engine's blocks against the ledger each iteration."""
    eng = make_engine(tiny_llama, "ecoserve")
    over: list[str] = []

    def check(_rec) -> None:
        sched = eng.scheduler
        kv = sched.policy.kv
        kv.check()
        for rid in sched.held:
            physical = physical_blocks(sched, sched.states[rid].request_id)
            if physical > kv.owned(rid):
                over.append(f"request {rid}: {physical} blocks > {kv.owned(rid)} owned")

    run = eng.generate(trace_requests(), on_iteration=check)
    assert not over, over
    return eng, run


@pytest.mark.parametrize("policy", ["ecoserve", "vllm"])
def test_outputs_match_greedy_generate(tiny_llama, tiny_llama_greedy, tiny_llama_ecoserve_run, policy):
    run = tiny_llama_ecoserve_run[1] if policy == "ecoserve" else make_engine(tiny_llama, policy).generate(trace_requests())
    # requests that outgrew their reservation, or were preempted and recomputed, must still match
    assert run.counters["preemptions"] > 0
    if policy == "ecoserve":
        assert run.counters["topups"] > 0
    for res, ref in zip(run.results, tiny_llama_greedy, strict=True):
        assert res.tokens == ref, f"request {res.rid}"


def test_requests_interleave(tiny_llama_ecoserve_run):
    _, run = tiny_llama_ecoserve_run
    res = run.results
    first = [r.token_times[0] for r in res]
    last = [r.token_times[-1] for r in res]
    # some request finishes while another that started before it keeps decoding
    assert any(last[i] < last[j] and first[j] < last[i] for i in range(len(res)) for j in range(len(res)))
    # requests arriving later join while others decode: mixed prefill + decode iterations
    assert any(it.prefill_tokens and it.decode_requests for it in run.iterations)
    late = [r for r in res if r.arrival_s > 0]
    assert all(r.token_times[0] < max(last) for r in late)
    # every iteration decodes every running request once: token gaps of 1 without preemption
    for r in res:
        if r.preemptions == 0:
            assert r.token_times == [r.token_times[0] + k for k in range(len(r.tokens))]
    # the ledger is empty at the end: every reserved and lent block came back
    eng = tiny_llama_ecoserve_run[0]
    assert eng.policy.kv.free_blocks == KV_BLOCKS and not eng.policy.kv.allocs


@pytest.mark.parametrize("policy", ["ecoserve", "ecoserve-nopipe", "vllm", "vllm-v0", "orca", "s3", "sjf"])
def test_engine_matches_simulator(tiny_llama, tiny_llama_ecoserve_run, policy):
    """Reservations, top-ups and preemptions happen at the steps the simulator predicts."""
    eng = tiny_llama_ecoserve_run[0] if policy == "ecoserve" else make_engine(tiny_llama, policy)
    run = tiny_llama_ecoserve_run[1] if policy == "ecoserve" else eng.generate(trace_requests())
    assert [res.error for res in run.results] == [None] * len(run.results)
    sim = simulate(eng.to_requests(trace_requests()), eng.make_policy(), check=True)
    assert sim.counters == run.counters
    # One serving loop: the engine's iteration log is the simulator's, row for row.
    stepwise = simulate(eng.to_requests(trace_requests()), eng.make_policy(), stepwise=True)
    assert run.result is not None and run.result.log == stepwise.log
    for r, res in zip(sorted(sim.requests, key=lambda r: r.rid), run.results, strict=True):
        assert r.state == State.FINISHED and len(res.tokens) == r.true_output_tokens
        assert (res.ttft_s, res.jct_s, res.preemptions) == (
            r.first_token_s - r.arrival_s, r.finish_s - r.arrival_s, r.preemptions), f"request {r.rid}"
    if policy in ("ecoserve", "vllm", "sjf", "s3"):  # the trace is built to make these preempt
        assert run.counters["preemptions"] > 0
    if policy == "ecoserve":  # reservations at the predicted median are outgrown and topped up
        assert run.counters["topups"] > 0
        assert {"admit", "finish"} <= {k for _, k, _ in run.events}


def test_policy_scheduler_plugs_into_generate_batch(tiny_llama, tiny_llama_greedy):
    """The same scheduler works under transformers' own manager (background thread, wall clock)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    eng = make_engine(tiny_llama, "ecoserve")
    prompts = [g.prompt_ids for g in trace_requests()[:4]]
    name = register_scheduler("ecoserve-test", eng.make_policy())  # no predictions: reserve max
    try:
        cb = ContinuousBatchingConfig(page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET,
                                      max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                      use_async_batching=False, scheduler_type=name)
        gen = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=-1)
        out = tiny_llama.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    finally:
        SCHEDULER_MAPPING.pop(name, None)
    assert [o.generated_tokens for o in out.values()] == [ref[:12] for ref in tiny_llama_greedy[:4]]


def test_under_transformers_manager_what_cannot_be_served_fails_alone(tiny_llama):
    """Under transformers' own manager: a request id still in use, a request longer than the
    whole KV cache and several return sequences fail that request alone (were: wrong tokens
    from a shared block table, a wait forever); cancelling a running request ends it, and only
    it (was: every request of the run failed), and so does cancelling one waiting in the policy's
    queue (was: it ran to the end)."""
    import time

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    eng = make_engine(tiny_llama, "ecoserve")
    policy = eng.make_policy()
    name = register_scheduler("ecoserve-manager-test", policy)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET,
                                  max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                  use_async_batching=False, scheduler_type=name)
    gen = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=-1)
    manager = tiny_llama.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    a, b = list(range(3, 13)), list(range(40, 52))
    try:
        manager.add_request(list(range(60, 200)), request_id="long", max_new_tokens=80)  # 14 blocks: it fits
        deadline = time.time() + 20
        while not any(r.state.name == "DECODE" for r in policy.decoding.values()) and time.time() < deadline:
            time.sleep(0.01)
        # "queued" cannot fit beside "long" (7 + 9 or more of 14 blocks): it waits in the policy's queue
        manager.add_request(list(range(100, 200)), request_id="queued", max_new_tokens=8)
        while not policy.waiting_count() and time.time() < deadline:
            time.sleep(0.01)
        queued = manager.batch_processor.scheduler.reqs["queued"]
        assert queued.state.name == "WAITING"
        manager.cancel_request("queued")
        while policy.counters["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert policy.waiting_count() == 0 and queued.error == "cancelled"
        manager.cancel_request("long")
        manager.add_request(a, request_id="dup", max_new_tokens=8)
        manager.add_request(b, request_id="dup", max_new_tokens=8)
        manager.add_request(list(range(5, 25)), request_id="huge", max_new_tokens=300)
        results: dict[str, list] = {}
        while time.time() < deadline and sum(map(len, results.values())) < 3:
            r = manager.get_result(timeout=0.5)
            if r is not None and r.is_finished():
                results.setdefault(r.request_id, []).append((r.status.name, r.generated_tokens, r.error))
    finally:
        manager.stop(block=True, timeout=10)
        SCHEDULER_MAPPING.pop(name, None)
    ref = tiny_llama.generate(torch.tensor([a]), max_new_tokens=8, do_sample=False)[0, len(a):].tolist()
    assert sorted(results["dup"], key=lambda x: x[0]) == [("FAILED", [], "request id 'dup' is already in use by "
                                                           "a request not yet finished"), ("FINISHED", ref, None)]
    [(status, _, error)] = results["huge"]
    assert status == "FAILED" and "20 prompt + 300 new tokens can never fit the KV cache (224 tokens)" in error
    assert policy.counters["cancelled"] == 2 and policy.counters["errors"] == 0  # was: a cancel counted as an error
    assert not policy.decoding and policy.kv.free_blocks == KV_BLOCKS


def test_a_refused_duplicate_id_fails_with_no_tokens_of_the_request_it_duplicates(tiny_llama):
    """transformers fills a refused request's failed output by its id (was: the tokens of the
    running request that holds the id)."""
    import time

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    policy = make_engine(tiny_llama, "ecoserve").make_policy()
    name = register_scheduler("ecoserve-dup-test", policy)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET,
                                  max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                  use_async_batching=False, scheduler_type=name)
    manager = tiny_llama.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=-1),
        continuous_batching_config=cb)
    manager.start()
    results: list = []
    try:
        manager.add_request(list(range(3, 13)), request_id="dup", max_new_tokens=60)
        deadline = time.time() + 30
        while not any(r.generated for r in policy.decoding.values()) and time.time() < deadline:
            time.sleep(0.005)
        assert any(r.generated for r in policy.decoding.values()), "the first request never decoded"
        manager.add_request(list(range(40, 52)), request_id="dup", max_new_tokens=8)
        while time.time() < deadline and len(results) < 2:
            r = manager.get_result(timeout=0.5)
            if r is not None and r.is_finished():
                results.append((r.status.name, len(r.generated_tokens)))
    finally:
        manager.stop(block=True, timeout=10)
        SCHEDULER_MAPPING.pop(name, None)
    assert sorted(results) == [("FAILED", 0), ("FINISHED", 60)]


def test_the_wall_clock_gives_one_time_per_token(tiny_llama):
    """On the wall clock a request's token times are the policy's (were: read again after
    transformers' output update, so ``GenResult.jct_s`` and the run record's JCT differed)."""
    from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine

    eng = TransformersEngine(tiny_llama, "ecoserve", kv_blocks=KV_BLOCKS, token_budget=TOKEN_BUDGET,
                             max_running=MAX_RUNNING, clock="wall")
    run = eng.generate([GenRequest([5, 6, 7], 4), GenRequest([8] * 20, 6, arrival_s=0.01)])
    for res, r in zip(run.results, sorted(run.result.requests, key=lambda r: r.rid), strict=True):
        assert res.token_times[0] == r.first_token_s and res.token_times[-1] == r.finish_s


def _generate_batch_under(tiny_llama, scheduler: str, prompts: list[list[int]], policy=None, requests=None,
                          **generation) -> dict:
    """``generate_batch`` under ``policy`` (an ``ecoserve`` one by default), with the policy sides
    ``requests``, registered as ``scheduler``, on a thread given 60 s (a wait forever fails the
    test instead of hanging it)."""
    import threading

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    name = register_scheduler(scheduler, policy or make_engine(tiny_llama, "ecoserve").make_policy(), requests)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET,
                                  max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                  use_async_batching=False, scheduler_type=name)
    gen = GenerationConfig(eos_token_id=-1, **generation)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(tiny_llama.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb)), daemon=True)
    try:
        t.start()
        t.join(60)
    finally:
        SCHEDULER_MAPPING.pop(name, None)
    assert not t.is_alive(), "generate_batch did not return"
    return out


def test_several_return_sequences_are_served_as_as_many_requests(tiny_llama):
    """``num_return_sequences`` under transformers' manager (was: the forks were never made and
    ``generate_batch`` waited forever)."""
    out = _generate_batch_under(tiny_llama, "ecoserve-forks-test", [[5] * 10, [6] * 12], do_sample=True,
                                num_return_sequences=2, max_new_tokens=5)
    assert sorted(out) == ["req_0", "req_0__child#0", "req_1", "req_1__child#0"]
    assert {(o.status.name, len(o.generated_tokens)) for o in out.values()} == {("FINISHED", 5)}


def test_return_sequences_are_planned_as_their_request(tiny_llama):
    """A request given a policy side (prediction, SLO) with ``num_return_sequences=3``: each
    sequence is planned with it (was: the forks got no prediction, a reservation of
    ``max_new_tokens`` and the engine's SLO; a reviewer's find)."""
    from ecoserve_sched.request import SLO, Request

    policy = make_engine(tiny_llama, "ecoserve").make_policy()
    seen: list[tuple] = []
    add = policy.add
    policy.add = lambda r, now: (seen.append((r.slo, r.pred_tokens, r.reserve_tokens)), add(r, now))[1]
    prompt = list(range(3, 13))
    given = {"req_0": Request(0, 0.0, len(prompt), 8, 8, pred_tokens=4, reserve_tokens=4, slo=SLO(0.3, 0.03))}
    out = _generate_batch_under(tiny_llama, "ecoserve-planned-forks-test", [prompt], policy, given, do_sample=True,
                                num_return_sequences=3, max_new_tokens=8)
    assert {(o.status.name, len(o.generated_tokens)) for o in out.values()} == {("FINISHED", 8)} and len(out) == 3
    assert seen == [(SLO(0.3, 0.03), 4, 4)] * 3


def test_a_refused_request_fails_all_its_return_sequences(tiny_llama):
    """A request longer than the whole KV cache with ``num_return_sequences=2`` (was: the first
    sequence's failure alone was delivered, and ``generate_batch`` waited until stopped)."""
    out = _generate_batch_under(tiny_llama, "ecoserve-refused-forks-test", [[5] * 10], do_sample=True,
                                num_return_sequences=2, max_new_tokens=16 * KV_BLOCKS)
    assert sorted(out) == ["req_0", "req_0__child#0"]
    assert {o.status.name for o in out.values()} == {"FAILED"}


def test_requests_the_engine_cannot_serve_are_refused(tiny_llama):
    """A NaN arrival was served forever, an empty prompt batched with others generated tokens,
    and ``generate([])`` failed inside (``max() arg is an empty sequence``)."""
    from ecoserve_sched.engines.transformers_cb import GenRequest

    for args, msg in ((([1, 2, 3], 3, float("nan")), "arrival_s must be a finite number >= 0"),
                      (([], 3), "prompt_ids is empty"), (([1, 2], 0), "max_new_tokens must be a whole number")):
        with pytest.raises(ValueError, match=msg):
            GenRequest(*args)
    with pytest.raises(ValueError, match="no requests"):
        make_engine(tiny_llama, "ecoserve").generate([])
    # predictions and ids: NaN or 2.5 failed inside the policy mid-run, -5 and 1.5 were taken,
    # text failed inside transformers ("too many dimensions 'str'")
    for kw, msg in (({"pred_tokens": float("nan")}, "pred_tokens must be a whole number >= 0, got nan"),
                    ({"pred_tokens": 2.5}, "pred_tokens must be a whole number >= 0, got 2.5"),
                    ({"reserve_tokens": -5}, "reserve_tokens must be a whole number >= 0, got -5"),
                    ({"pred_bucket": -2}, "pred_bucket must be a whole number >= -1, got -2")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            GenRequest([1, 2, 3], 3, **kw)
    with pytest.raises(ValueError, match=r"prompt_ids must be whole numbers >= 0, got 1\.5"):
        GenRequest([1.5, 2, 3], 3)
    with pytest.raises(ValueError, match=r"prompt_ids must be whole numbers >= 0, got -1"):
        GenRequest([1, -1], 3)
    with pytest.raises(TypeError, match="prompt_ids must be token ids"):
        GenRequest("hello", 3)
    with pytest.raises(ValueError, match=r"prompt_ids must be 1-D, got shape \(1, 3\)"):
        GenRequest(torch.tensor([[1, 2, 3]]), 3)
    assert GenRequest(torch.tensor([1, 2, 3]), 3).prompt_ids == GenRequest(np.array([1, 2, 3]), 3).prompt_ids == [1, 2, 3]
    # one id outside the vocabulary failed every request of its batch, the valid ones too
    vocab = tiny_llama.config.vocab_size
    with pytest.raises(ValueError, match=f"request 1: token id {vocab} is outside the model's vocabulary"):
        make_engine(tiny_llama, "ecoserve").generate([GenRequest([5, 6, 7], 3), GenRequest([1, 2, vocab], 3)])
    for eos in (vocab, -3, 2.5):  # was: taken, and the end never came (a reviewer's find)
        with pytest.raises(ValueError, match=r"eos_token_id .* is not a token id"):
            engine = make_engine(tiny_llama, "ecoserve")
            engine.eos_token_id = eos
            engine.generate([GenRequest([5, 6, 7], 3)])
    # so did one past a learned position embedding's length (an IndexError); a rotary model
    # (the tiny Llama) computes positions past its nominal length, and is not held to it
    from types import SimpleNamespace

    from transformers import OPTConfig

    opt = SimpleNamespace(config=OPTConfig(vocab_size=256, max_position_embeddings=32))
    with pytest.raises(ValueError, match=re.escape("request 1: 10 prompt + 23 new tokens (33) exceed the model's 32")):
        make_engine(opt, "ecoserve").generate([GenRequest([5, 6, 7], 3), GenRequest([5] * 10, 23)])
    # GPT-J's rotary positions (``rotary_dim``) were held to its n_positions
    from transformers import GPTJConfig

    gptj = SimpleNamespace(config=GPTJConfig(vocab_size=256, n_positions=32))
    with pytest.raises(AttributeError):  # past the positions check: the namespace is no model
        make_engine(gptj, "ecoserve").generate([GenRequest([5] * 10, 23)])
    # numpy's integers (a predictor's output) become int (were: a traceback mid-run)
    g = GenRequest([1, 2], np.int64(3), pred_tokens=np.int32(2), reserve_tokens=np.int64(4))
    assert all(type(v) is int for v in (g.max_new_tokens, g.pred_tokens, g.reserve_tokens))
    # what the engine sets itself (was: a TypeError that left the scheduler registered)
    from ecoserve_sched.engines.transformers_cb import TransformersEngine

    with pytest.raises(ValueError, match="cb_overrides: use_async_batching is set by the engine"):
        TransformersEngine(tiny_llama, "ecoserve", cb_overrides={"use_async_batching": True})
    with pytest.raises(ValueError, match="cb_overrides: block_size is set by the engine"):  # page_size's
        TransformersEngine(tiny_llama, "ecoserve", cb_overrides={"block_size": 32})  # old name (was: let through)
    with pytest.raises(ValueError, match="block_size must be a whole number >= 4, got 2"):  # transformers' least
        TransformersEngine(tiny_llama, "ecoserve", block_size=2)
    with pytest.raises(TypeError, match="slo must be an SLO"):
        TransformersEngine(tiny_llama, "ecoserve", slo=(1.0, 0.1))
    with pytest.raises(TypeError, match=r"GenRequest: slo must be an SLO\(ttft_s, tbt_s\), got tuple"):
        GenRequest([1, 2], 3, slo=(1.0, 0.1))  # was: accepted, then the whole run stopped when it arrived
    # no SLO of its own: the engine's, which its policy's rules read (was: SLO(), whatever the engine's)
    eng = TransformersEngine(None, "ecoserve", slo=SLO(1.0, 0.1), clock="step")
    assert eng.to_requests([GenRequest([5, 6, 7], 8)])[0].slo == SLO(1.0, 0.1) == eng.make_policy().slo
    assert eng.to_requests([GenRequest([5, 6, 7], 8, slo=SLO(2.0, 0.3))])[0].slo == SLO(2.0, 0.3)
    # a config transformers refuses leaves nothing registered (was: the scheduler, holding the
    # policy and every request of the run)
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    before = set(SCHEDULER_MAPPING)
    with pytest.raises(TypeError, match="bogus_field"):
        TransformersEngine(tiny_llama, "ecoserve", clock="step", kv_blocks=8,
                           cb_overrides={"bogus_field": 1}).generate([GenRequest([1, 2, 3], 2)])
    assert set(SCHEDULER_MAPPING) == before
    # a persistent manager of the model's own would have been used, and destroyed
    tiny_llama._cached_continuous_batching_manager = object()
    try:
        with pytest.raises(ValueError, match="holds a persistent continuous-batching manager"):
            make_engine(tiny_llama, "ecoserve").generate([GenRequest([5, 6, 7], 3)])
    finally:
        del tiny_llama._cached_continuous_batching_manager


@pytest.mark.parametrize("policy", ["vllm", "vllm-v0"])
def test_the_run_record_holds_the_stall_gaps(tiny_llama, policy):
    """The engine's run record (what ``summarize`` reads) has the token gaps across
    preemptions and vllm-v0's prefill-only iterations, as the simulator's: its p99 TBT was low."""
    eng = make_engine(tiny_llama, policy)
    run = eng.generate(trace_requests())
    sim = simulate(eng.to_requests(trace_requests()), eng.make_policy())
    assert run.result.stall_gaps == sim.stall_gaps and len(sim.stall_gaps) > 0
    assert run.result.prefill_iterations == sim.prefill_iterations > 0


def test_vllm_v0_in_the_engine_runs_what_it_runs_in_the_simulator(tiny_llama, tiny_llama_greedy):
    """A prompt vllm-v0 ignores ends with its reason while the rest are served (the engine
    stopped "stuck"), and a recompute longer than the budget runs alone (the engine stopped
    with "exceeds the engine's")."""
    from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine

    eng = TransformersEngine(tiny_llama, "vllm-v0", clock="step", kv_blocks=14, token_budget=32, max_running=8)
    run = eng.generate([GenRequest(list(range(3, 43)), 5, 0.0), GenRequest(list(range(5, 25)), 5, 0.0)])
    assert run.results[0].error.startswith("prompt of 40 tokens ignored") and not run.results[0].tokens
    assert run.results[1].error is None and len(run.results[1].tokens) == 5
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (40,), generator=g).tolist() for _ in range(2)]
    reqs = [GenRequest(p, 60, 0.1 * i) for i, p in enumerate(prompts)]
    eng = TransformersEngine(tiny_llama, "vllm-v0", clock="step", kv_blocks=9, token_budget=64, max_running=8)
    run = eng.generate(reqs)  # both preempted; a recompute of 40 + 25 tokens > 64
    assert run.counters["recomputes"] > 0 and all(len(r.tokens) == 60 for r in run.results)
    sim = simulate(eng.to_requests(reqs), eng.make_policy())
    assert [(r.first_token_s, r.finish_s) for r in sim.requests] == [
        (res.token_times[0], res.token_times[-1]) for res in run.results]


def test_a_request_larger_than_the_cache_is_dropped_with_an_event(tiny_llama):
    """The serving loop's drop (prompt and output over the whole cache) left no ``drop`` event;
    the drop made at admission does."""
    from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine

    eng = TransformersEngine(tiny_llama, "ecoserve", clock="step", kv_blocks=4, block_size=16, token_budget=32,
                             max_running=4)
    run = eng.generate([GenRequest(list(range(3, 19)), 100, 0.0), GenRequest(list(range(3, 11)), 3, 0.0)])
    assert run.results[0].dropped and not run.results[0].tokens and len(run.results[1].tokens) == 3
    assert (0.0, "drop", 0) in run.events and [e[1] for e in run.events].count("drop") == 1


def _generate_batch(model, prompts, cb, gen=None, timeout=60.0) -> dict:
    """``model.generate_batch`` in a thread: a hang fails the test instead of the suite."""
    import threading

    out: dict = {}
    t = threading.Thread(target=lambda: out.update(model.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "generate_batch did not return"
    return out


def test_under_the_manager_what_a_policy_cannot_plan_is_refused(tiny_llama):
    """A request with no token limit (transformers' default generation config) was planned as one
    token: it grew to the whole cache, was preempted and waited forever. A policy request given
    to ``register_scheduler`` that does not describe its request, or was served before, gave
    wrong tokens; two sharing an id lost one's output; and a policy left with requests by a run
    that ended in an error broke the next run (its ids were reused)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import PolicyScheduler, register_scheduler
    from ecoserve_sched.request import Request

    eng = make_engine(tiny_llama, "vllm")
    cb = lambda name: ContinuousBatchingConfig(  # noqa: E731
        page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET, max_requests_per_batch=MAX_RUNNING,
        allow_block_sharing=False, use_async_batching=False, scheduler_type=name)
    unlimited = GenerationConfig(do_sample=False, max_new_tokens=None, eos_token_id=-1)
    gen = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=-1)
    names = []
    try:
        names.append(register_scheduler("nolimit-test", eng.make_policy()))
        out = _generate_batch(tiny_llama, [[5, 6, 7]], cb(names[-1]), unlimited)
        [(status, error)] = [(o.status.name, o.error) for o in out.values()]
        assert status == "FAILED" and "max_new_tokens is not set" in error

        names.append(register_scheduler("empty-prompt-test", eng.make_policy()))  # (was: another's token
        out = _generate_batch(tiny_llama, [[], [5, 6, 7]], cb(names[-1]), gen)  # continued, or a dead loop)
        assert out["req_0"].status.name == "FAILED" and "the prompt is empty" in out["req_0"].error
        assert out["req_1"].status.name == "FINISHED" and len(out["req_1"].generated_tokens) == 6

        names.append(register_scheduler("nolimit-meta-test", eng.make_policy(), {"req_0": Request(0, 0.0, 3, 6, 6)}))
        out = _generate_batch(tiny_llama, [[5, 6, 7]], cb(names[-1]), unlimited)  # with a policy request too
        assert "max_new_tokens is not set" in out["req_0"].error

        # req_0's true length (an oracle's) is below the limit: fine; req_1's prompt has 4 tokens
        meta = {"req_0": Request(0, 0.0, 3, 6, 4), "req_1": Request(1, 0.0, 5, 6, 6)}
        names.append(register_scheduler("meta-test", eng.make_policy(), meta))
        out = _generate_batch(tiny_llama, [[5, 6, 7], [8, 9, 10, 11]], cb(names[-1]), gen)
        assert out["req_0"].status.name == "FINISHED" and len(out["req_0"].generated_tokens) == 6
        assert out["req_1"].status.name == "FAILED" and "has 5 prompt tokens" in out["req_1"].error
        out = _generate_batch(tiny_llama, [[5, 6, 7]], cb(names[-1]), gen)  # the same map again
        assert "already served" in out["req_0"].error
        # a short true length does not let a request that can outgrow the cache in (it hung)
        names.append(register_scheduler("short-true-test", eng.make_policy(), {"req_0": Request(0, 0.0, 3, 300, 4)}))
        out = _generate_batch(tiny_llama, [[5, 6, 7]], cb(names[-1]),
                              GenerationConfig(do_sample=False, max_new_tokens=300, eos_token_id=-1))
        assert "3 prompt + 300 new tokens can never fit the KV cache (224 tokens)" in out["req_0"].error
        with pytest.raises(ValueError, match="request id 0 is given twice"):
            register_scheduler("dup-test", eng.make_policy(), {"a": Request(0, 0.0, 3, 6, 6), "b": Request(0, 0.0, 3, 6, 6)})

        busy = eng.make_policy()
        busy.add(Request(7, 0.0, 3, 6, 6), 0.0)  # left by a run that ended in an error
        with pytest.raises(ValueError, match="the policy still holds 1 waiting and 0 running requests of an earlier run"):
            PolicyScheduler(None, None, MAX_RUNNING, policy=busy)  # refused before the cache is looked at
    finally:
        for name in names:
            SCHEDULER_MAPPING.pop(name, None)


def test_an_interrupted_run_keeps_the_tokens_generated_so_far(tiny_llama, tiny_llama_greedy):
    """Ctrl-C (or an error in ``on_iteration`` or the policy) ended ``generate`` with nothing:
    the exception now carries ``partial_run``, each request's tokens up to the interrupt."""
    eng = make_engine(tiny_llama, "ecoserve")
    seen = [0]

    def ctrl_c(_rec) -> None:
        seen[0] += 1
        if seen[0] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as e:
        eng.generate(trace_requests(), on_iteration=ctrl_c)
    run = e.value.partial_run
    assert len(run.iterations) == 6 and any(r.tokens for r in run.results)
    for res in run.results:  # a prefix of what the request generates alone
        assert res.tokens == tiny_llama_greedy[res.rid][:len(res.tokens)]


def _cb(name: str, blocks: int = KV_BLOCKS, budget: int = TOKEN_BUDGET):
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(page_size=16, num_blocks=blocks, max_batch_tokens=budget,
                                    max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                    use_async_batching=False, scheduler_type=name)


def test_a_prompt_vllm_v0_ignores_fails_alone_under_generate_batch(tiny_llama):
    """A prompt over vllm-v0's limit (its token budget, 128, below the engine's 256) is ignored,
    as vLLM V0 ignored it: its failure is delivered and the others are served (was: marked
    FAILED but never delivered, and generate_batch waited forever for it)."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    gen = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=-1)
    name = register_scheduler("v0-ignore-test", make_engine(tiny_llama, "vllm-v0").make_policy())
    try:
        out = _generate_batch(tiny_llama, [[5] * 10, [6] * 150, [7] * 12], _cb(name, blocks=30, budget=256), gen)
    finally:
        SCHEDULER_MAPPING.pop("v0-ignore-test", None)
    assert [o.status.name for o in out.values()] == ["FINISHED", "FAILED", "FINISHED"]
    assert "prompt of 150 tokens ignored (limit 128" in list(out.values())[1].error
    # with two return sequences each: both of the ignored prompt's fail (was: the second was
    # never added nor failed, and generate_batch waited for it; a reviewer's find)
    gen = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=-1, num_return_sequences=2)
    name = register_scheduler("v0-ignore-forks-test", make_engine(tiny_llama, "vllm-v0").make_policy())
    try:
        out = _generate_batch(tiny_llama, [[5] * 10, [6] * 150], _cb(name, blocks=30, budget=256), gen)
    finally:
        SCHEDULER_MAPPING.pop("v0-ignore-forks-test", None)
    assert {k: o.status.name for k, o in out.items()} == {
        "req_0": "FINISHED", "req_0__child#0": "FINISHED", "req_1": "FAILED", "req_1__child#0": "FAILED"}


def test_a_registered_policy_preempts_by_recompute(tiny_llama):
    """The engine cannot swap KV: any policy given to register_scheduler recomputes (was: only
    TransformersEngine's own; EcoServe with a real profile chose swap, the engine recomputed, the
    policy counted re-prefilled tokens as generated, and generate_batch never returned)."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.transformers_cb import register_scheduler
    from ecoserve_sched.policies import get_policy
    from ecoserve_sched.request import Request

    reqs, n = trace_requests(), 100
    cost = load_profile("ecoserve_sched/profiles/calibrated/small-llama-transformers-cpu.json")
    policy = get_policy("ecoserve", cost, kv_blocks=KV_BLOCKS, block_size=16, token_budget=TOKEN_BUDGET,
                        max_running=MAX_RUNNING)
    meta = {f"req_{i}": Request(i, 0.0, len(g.prompt_ids), n, n, pred_tokens=g.pred_tokens,
                                reserve_tokens=g.reserve_tokens, pred_bucket=g.pred_bucket) for i, g in enumerate(reqs)}
    name = register_scheduler("ecoserve-swap-test", policy, meta)
    prompts = [g.prompt_ids for g in reqs]
    try:
        out = _generate_batch(tiny_llama, prompts, _cb(name), GenerationConfig(do_sample=False, max_new_tokens=n,
                                                                              eos_token_id=-1))
    finally:
        SCHEDULER_MAPPING.pop(name, None)
    assert policy.counters["preemptions"] > 0 and policy.counters["swaps"] == 0
    # given without a clock, each arrives when the manager adds it, on the scheduler's clock
    # (was: at 0.0 as given, a clock the scheduler never read: TTFTs judged lost at once)
    assert all(r.arrival_s > 0.0 for r in meta.values())
    ref = [tiny_llama.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
           for p in prompts]
    assert [o.generated_tokens for o in out.values()] == ref


def test_a_failed_run_leaves_no_running_request_and_a_reused_manager_says_why(tiny_llama, caplog):
    """transformers fails every request of the run when a forward pass raises: the policy's
    prefilling ones leave its ledger too (were kept); its waiting ones cannot leave its queue, so
    the same manager reused refuses to start, saying so (was: a KeyError on a request id)."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    policy = make_engine(tiny_llama, "vllm").make_policy()
    name = register_scheduler("vllm-fault-test", policy)
    gen = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=-1)
    forward, calls = tiny_llama.forward, [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected fault")
        return forward(*a, **k)

    def run(prompts):
        out = {}
        import threading

        t = threading.Thread(target=lambda: out.update(tiny_llama.generate_batch(
            prompts, generation_config=gen, continuous_batching_config=_cb(name), persistent_manager=True)), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive()
        return out

    try:
        tiny_llama.forward = flaky
        first = run([[5 + i] * 40 for i in range(8)])
        tiny_llama.forward = forward
        assert {o.status.name for o in first.values()} == {"FAILED"}
        assert not policy.prefilling and not policy.decoding and policy.kv.free_blocks == KV_BLOCKS
        # the failed batch is not credited, and the running requests end as errors (were: 4
        # recorded as finished, errors 0)
        assert policy.counters["errors"] == 8 - policy.waiting_count()
        with caplog.at_level("ERROR"):
            second = run([[9] * 10, [10] * 10])
        # the manager's thread ends at its start, before or after taking the requests: failed
        # outputs, or none (transformers: "not found in results"), never a finished one
        assert all(o.status.name == "FAILED" and "a policy serves one run" in o.error for o in second.values())
        assert "a policy serves one run" in caplog.text and "KeyError" not in caplog.text
    finally:
        tiny_llama.forward = forward
        tiny_llama.destroy_cached_continuous_batching_manager()
        SCHEDULER_MAPPING.pop(name, None)


def test_budgets_the_engine_cannot_run_are_refused(tiny_llama):
    """An engine budget below the policy's failed every request at the first batch; a whole
    prompt over it, under a policy that does not split prompts (orca), failed every request of
    the run: now the setting is refused by name, and that one request fails alone."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    gen = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=-1)
    name = register_scheduler("orca-budget-test", make_engine(tiny_llama, "orca").make_policy())
    try:
        # 128 tokens: within the budget alone, not beside the running decodes (a first version
        # checked the prompt alone, and every request failed: "policy batch of 129 tokens")
        out = _generate_batch(tiny_llama, [[5] * 10, [6] * 128, [7] * 12], _cb(name, blocks=30), gen)
        assert [(o.status.name, bool(o.error)) for o in out.values()] == [("FINISHED", False), ("FAILED", True),
                                                                         ("FINISHED", False)]
        assert "a 128-token prompt, and policy 'orca' prefills whole prompts beside up to 7 decodes" in \
            list(out.values())[1].error
        # vllm-v0 runs prompts in iterations of their own, with no decode beside them (a second
        # version counted decodes beside it, and refused a prompt that fits), but recomputes a
        # preempted request's whole context in one prefill: prompt + max_new_tokens - 1 must fit
        # (was: a 128-token prompt accepted, whose recompute after its first token failed the run)
        name = register_scheduler("v0-budget-test", make_engine(tiny_llama, "vllm-v0").make_policy())
        out = _generate_batch(tiny_llama, [[5] * 10, [6] * 121, [7] * 12, [8] * 122], _cb(name, blocks=30), gen)
        assert [o.status.name for o in out.values()] == ["FINISHED"] * 3 + ["FAILED"]
        assert ("122 prompt + 8 new tokens, and policy 'vllm-v0' recomputes a preempted request's whole context "
                "in one prefill (up to 129 tokens): over the engine's max_batch_tokens (128)") in list(out.values())[3].error
    finally:
        SCHEDULER_MAPPING.pop("orca-budget-test", None)
        SCHEDULER_MAPPING.pop("v0-budget-test", None)
    from types import SimpleNamespace

    from ecoserve_sched.engines.transformers_cb import PolicyScheduler

    cache = SimpleNamespace(cache_allocators={"full": SimpleNamespace(tokens_per_page=16)}, use_prefix_sharing=False,
                            num_blocks=KV_BLOCKS, max_batch_tokens=64)
    with pytest.raises(ValueError, match="engine max_batch_tokens 64 < the policy's token_budget 128"):
        PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=make_engine(tiny_llama, "vllm").make_policy())
    # async batching (transformers' default on CUDA with CUDA graphs), refused when the manager
    # builds the scheduler: read from the manager's config (was: from ``cache.cb_config``, which
    # transformers' cache has not, so it never fired; and it needs a GPU to run at all)
    cache.max_batch_tokens = TOKEN_BUDGET

    class Manager:  # transformers' manager builds the scheduler in a method of its own
        def __init__(self, use: bool) -> None:
            self.continuous_batching_config = SimpleNamespace(use_async_batching=use)

        def build(self) -> PolicyScheduler:
            return PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=make_engine(tiny_llama, "vllm").make_policy())

    with pytest.raises(ValueError, match=r"async batching is not supported .*use_async_batching=False"):
        Manager(True).build()
    Manager(False).build()
    PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=make_engine(tiny_llama, "vllm").make_policy())  # no manager


def test_a_preempted_request_keeps_its_tokens_in_a_failed_output(tiny_llama):
    """transformers fails waiting requests with the tokens ``get_active_request_static_outputs``
    gives; one this scheduler preempted waits with its tokens kept (was: [], lost)."""
    from types import SimpleNamespace

    from transformers.generation.continuous_batching.requests import RequestState

    from ecoserve_sched.engines.transformers_cb import PolicyScheduler

    cache = SimpleNamespace(cache_allocators={"full": SimpleNamespace(tokens_per_page=16)}, use_prefix_sharing=False,
                            num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET)
    sched = PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=make_engine(tiny_llama, "vllm").make_policy())
    st = RequestState("w", list(range(3, 13)), max_new_tokens=4)
    sched.add_waiting_request(st)
    st.generated_tokens = [7, 8]  # preempted with two tokens: it waits to re-prefill them
    assert sched.get_active_request_static_outputs("w") == [7, 8]
    # transformers' fail_all_requests pops a waiting request before it asks (was: [] then)
    sched.waiting_requests.pop("w")
    assert sched.get_active_request_static_outputs("w") == [7, 8]
    assert sched.get_active_request_static_outputs("nobody") == []
    # max_new_tokens: numpy's whole number is served as an int; 2.5 is refused for itself alone
    # (was: under ecoserve, the manager's thread died and a block stayed held)
    import numpy as np

    sched2 = PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=make_engine(tiny_llama, "ecoserve").make_policy())
    for rid, n in (("n", np.int64(6)), ("g", 6.0)):  # 6.0: transformers' own schedulers serve it
        odd = RequestState(rid, list(range(3, 13)), max_new_tokens=n)
        sched2.add_waiting_request(odd)
        assert type(odd.max_new_tokens) is int and sched2.reqs[rid].max_tokens == 6
    with pytest.raises(ValueError, match=r"f: max_new_tokens must be a whole number >= 1, got 2.5"):
        sched2.add_waiting_request(RequestState("f", list(range(3, 13)), max_new_tokens=2.5))
    assert "f" not in sched2.reqs and "f" not in sched2.waiting_requests


def test_async_batching_is_refused_by_a_real_manager(tiny_llama, monkeypatch):
    """transformers' own manager with ``use_async_batching=True``: its thread ends with the
    refusal as it builds the scheduler, before any batch runs, and no request finishes (was:
    accepted)."""
    import threading

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    gen = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=-1)
    name = register_scheduler("async-test", make_engine(tiny_llama, "vllm").make_policy())
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET,
                                  max_requests_per_batch=MAX_RUNNING, allow_block_sharing=False,
                                  use_async_batching=True, scheduler_type=name)
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    try:
        out = _generate_batch(tiny_llama, [[5] * 10, [6] * 12], cb, gen)
    finally:
        SCHEDULER_MAPPING.pop("async-test", None)
        tiny_llama.destroy_cached_continuous_batching_manager()
    assert not any(o.status.name == "FINISHED" for o in out.values())
    assert any("async batching is not supported under an ecoserve policy" in str(e) for e in raised)


def test_a_hard_stop_is_not_a_failed_forward_pass(tiny_llama):
    """``manager.stop(hard_stop=True)`` fails the running requests after the last batch ran: that
    batch is completed in the policy and its requests aborted (a first version failed it, as if
    its forward pass had raised: failed_iterations 1)."""
    import time

    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    from ecoserve_sched.engines.transformers_cb import register_scheduler

    policy = make_engine(tiny_llama, "vllm").make_policy()
    name = register_scheduler("vllm-hard-stop-test", policy)
    gen = GenerationConfig(do_sample=False, max_new_tokens=60, eos_token_id=-1)
    manager = tiny_llama.init_continuous_batching(generation_config=gen, continuous_batching_config=_cb(name))
    try:
        manager.start()
        for i in range(3):
            manager.add_request([5 + i] * 10, request_id=f"r{i}", max_new_tokens=60)
        deadline = time.time() + 20
        while not policy.decoding and time.time() < deadline:
            time.sleep(0.01)
        manager.stop(block=True, hard_stop=True)
    finally:
        SCHEDULER_MAPPING.pop(name, None)
    assert policy.counters["failed_iterations"] == 0 and policy.counters["errors"] >= 1
    assert not policy.has_work() and policy.kv.free_blocks == policy.kv.num_blocks


def test_a_waiting_request_is_cancelled_and_a_policy_without_dequeue_keeps_it(tiny_llama, caplog):
    """``clear_cancelled_requests`` takes a request waiting in the policy's queue out of both
    queues, the policy's and transformers' (was: it ran to the end); under a policy of one's own
    without ``dequeue`` it warns and serves it, as before, instead of raising in the manager."""
    from types import SimpleNamespace

    from transformers.generation.continuous_batching import RequestState

    from ecoserve_sched.engines.transformers_cb import PolicyScheduler
    from ecoserve_sched.policies.base import Scheduler
    from ecoserve_sched.policies.vllm import VLLMScheduler

    class NoDequeue(VLLMScheduler):
        dequeue = Scheduler.dequeue

    freed: list[str] = []
    cache = SimpleNamespace(cache_allocators={"full": SimpleNamespace(tokens_per_page=16)}, use_prefix_sharing=False,
                            num_blocks=KV_BLOCKS, max_batch_tokens=TOKEN_BUDGET, free_blocks=freed.append)
    made = make_engine(tiny_llama, "vllm").make_policy()
    for policy, served in ((made, False), (NoDequeue(made.cost, kv_blocks=KV_BLOCKS, token_budget=TOKEN_BUDGET,
                                                     max_running=MAX_RUNNING), True)):
        sched = PolicyScheduler(cache, 0.0, MAX_RUNNING, policy=policy, clock=lambda: 0.0)
        for rid in ("a", "b"):
            sched.add_waiting_request(RequestState(rid, [5, 6, 7], max_new_tokens=4))
        sched.set_request_cancellation("a")
        with caplog.at_level("WARNING", logger="ecoserve_sched.engines.transformers_cb"):
            gone = sched.clear_cancelled_requests()
        if served:
            assert gone == [] and policy.waiting_count() == 2 and "a waits in the policy's queue" in caplog.text
            assert list(sched.waiting_requests_order) == ["a", "b"]
        else:
            assert [s.request_id for s in gone] == ["a"] and policy.counters["cancelled"] == 1
            assert policy.waiting_count() == 1 and list(sched.waiting_requests) == ["b"]
            assert list(sched.waiting_requests_order) == ["b"] and freed == ["a"]


def test_a_model_with_several_attention_groups_is_refused():
    """A sliding-window + full-attention model: transformers gives each group whole sectors, so
    a 7-block ledger met the engine's refusal at the 7th block, a RuntimeError mid-run (a
    reviewer's case); now refused at the start, as the vLLM plug-in refuses hybrid models."""
    import transformers

    from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=2, vocab_size=64, max_position_embeddings=1024,
                                    sliding_window=512, layer_types=["sliding_attention", "full_attention"])
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    eng = TransformersEngine(model, "ecoserve", clock="step", block_size=4, kv_blocks=7, token_budget=32, max_running=2)
    with pytest.raises(ValueError, match=r"KV cache has 2 attention groups \(sliding_attention, full_attention\)"):
        eng.generate([GenRequest(list(range(3, 23)), 8)])
