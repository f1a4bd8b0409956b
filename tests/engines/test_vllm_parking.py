"""Parking on vLLM's real ``Scheduler`` and ``AsyncScheduler`` (CPU, no model, fake model
outputs): the waiting head is tested as vLLM's waiting loop tests it (its prefix-cache hit,
the requests vLLM skips, vLLM's admission limit), and no victim's last token is in flight. The
burst itself (a decode parked for a request that can still meet its TTFT) is
``test_vllm_scheduler.py``'s ``_burst``.

vLLM is required (conftest.py turns a missing vLLM into a failure unless ECOSERVE_VLLM_OPTIONAL=1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from test_vllm_defaults import build, cached_req
from test_vllm_scheduler import (
    ECO_CLASSES,
    _burst,
    burst_start,
    check_done,
    clear_eco_env,
    make,
    req,
)
from vllm.config import SchedulerConfig
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from ecoserve_sched.engines.vllm_scheduler import EcoServeVllmScheduler, EcoServeVllmSyncScheduler
from ecoserve_sched.engines.vllm_sim import fake_model_output
from ecoserve_sched.policies import ecoserve_rules as rules


@pytest.fixture(autouse=True)
def eco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_eco_env(monkeypatch)
    monkeypatch.setenv("ECOSERVE_TRUST_CLIENT_HINTS", "1")  # predictions come as hints here


def _run(s: Scheduler, arrivals: list[tuple[float, Request, int]], steps: int = 3000,
         before: Callable[[Scheduler], None] | None = None,
         after: Callable[[Scheduler], None] | None = None) -> dict[str, object]:
    """Steps of 10 ms under ``s.clock`` (async: one step in flight) until nothing is left
    unfinished; ``arrivals``: ``(time, request, true length)``; ``before``, ``after``: called
    before and after each ``schedule``. Returns the parks, the requests preempted and, per request, the step it was
    first scheduled at and what that step preempted."""
    now = [0.0]
    s.clock = lambda: now[0]
    depth = 2 if s.scheduler_config.async_scheduling else 1
    target = {r.request_id: n for _, r, n in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    inflight: list = []
    seen: dict[str, tuple[int, set[str]]] = {}
    preempted: set[str] = set()
    for step in range(steps):
        now[0] += 0.01
        while pending and pending[0][0] <= now[0] + 1e-9:
            s.add_request(pending.pop(0)[1])
        if not pending and not s.get_num_unfinished_requests() and not inflight:
            break
        if s.get_num_unfinished_requests():
            if before is not None:
                before(s)
            out = s.schedule()
            if after is not None:
                after(s)
            gone = set(out.preempted_req_ids or ())
            preempted |= gone
            for rid in out.num_scheduled_tokens:
                seen.setdefault(rid, (step, gone))
            inflight.append(out)
        if inflight and (len(inflight) >= depth or not s.get_num_unfinished_requests()):
            o = inflight.pop(0)
            s.update_from_output(o, fake_model_output(o, s, target))
    else:
        raise AssertionError("did not finish")
    return {"parks": s.eco_counters["parks"], "preempted": preempted, "first_step": seen}


PREFIX = list(range(3, 131))  # 128 tokens: 8 full blocks


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_the_head_is_tested_with_its_prefix_cache_hit(cls: type) -> None:
    """``max_num_seqs=2``: "a" (holding a cached 128-token prefix) and "c" decode; "b" (that
    prefix + 300 tokens) waits for a slot, and "c" ends inside b's parking window. Then b's
    blocks exceed the free pool without its hit and fit with it: vLLM admits b at once. Parking
    tested b without the hit and parked "a" first (then re-admitted it in the same step)."""
    hit_decides: list[bool] = []

    def premise(s: Scheduler) -> None:  # b waits with a slot free: is the hit what makes it fit?
        b = s.requests.get("b")
        if b is not None and b.status == RequestStatus.WAITING and len(s.running) < 2:
            hit = s.kv_cache_manager.get_computed_blocks(b)[0]
            whole, free = -(-b.num_tokens // 16), s.kv_cache_manager.block_pool.get_num_free_blocks()
            held = sum(blk.ref_cnt > 0 for blk in hit.blocks[0])
            hit_decides.append(whole > free >= whole - held)

    runs = {}
    for park in (False, True):
        s = build(cls, num_blocks=40, prefix_caching=True, max_num_seqs=2)
        s.eco_cfg = dataclasses.replace(s.eco_cfg, slo_ttft=1.0, park=park)
        runs[park] = _run(s, [(0.0, cached_req("a", PREFIX + [900] * 16, 300, rl_pred_tokens=300), 300),
                              (0.0, cached_req("c", list(range(2000, 2160)), 95, rl_pred_tokens=95), 95),
                              (0.3, cached_req("b", PREFIX + list(range(5000, 5300)), 20, arrival=0.3,
                                               rl_pred_tokens=20), 20)], before=premise if park else None)
        check_done(s)
    assert any(hit_decides)
    off, on = runs[False], runs[True]
    assert off["first_step"]["b"][1] == set() and not off["preempted"]
    assert on["first_step"]["b"] == off["first_step"]["b"]  # the same step, nothing preempted
    assert on["parks"] == 0 and not on["preempted"]  # was: "a" parked, then re-admitted with b


def _grammar_req(rid: str, prompt: int, max_tokens: int, arrival: float, **extra: int) -> Request:
    """A structured-output request; its grammar never compiles here (no backend is run)."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra or None,
                        structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    r = Request(request_id=rid, prompt_token_ids=[1] * prompt, sampling_params=sp, pooling_params=None,
                arrival_time=arrival)
    assert r.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    return r


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_no_parking_for_a_head_that_vllm_skips(cls: type) -> None:
    """The burst's "b" with its grammar still compiling: vLLM skips it (``deferred_waiting``).
    A decode was parked for it every other step (13 times in 1.3 s), re-admitted at once, its
    context recomputed (async: its in-flight token dropped each time)."""
    s = make(cls, num_blocks=24)
    now = burst_start(s, park=True)
    target = {"a": 300, "b": 150}
    depth = 2 if s.scheduler_config.async_scheduling else 1
    inflight: list = []
    for step in range(130):  # to 1.3 s: past b's parking window (0.3 s + 0.75-1 s)
        now[0] += 0.01
        if step == 29:
            s.add_request(_grammar_req("b", 160, 150, arrival=0.3, rl_pred_tokens=150))
        out = s.schedule()
        assert "b" not in out.num_scheduled_tokens and not out.preempted_req_ids
        inflight.append(out)
        if len(inflight) >= depth:
            o = inflight.pop(0)
            s.update_from_output(o, fake_model_output(o, s, target))
    assert s.eco_counters["parks"] == 0
    assert s.requests["b"].status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    # its grammar compiled (vLLM promotes the status at its next peek): taken; failed: skipped
    g = _grammar_req("g", 16, 8, arrival=0.0)
    assert not s._vllm_takes(g)
    g.structured_output_request.grammar = object()  # a compiled grammar (vLLM's test: not None)
    assert s._vllm_takes(g)
    g.structured_output_request.grammar = RuntimeError("bad regex")
    assert not s._vllm_takes(g)
    # the other skips of vLLM's waiting loop that do not depend on the step's budgets
    b = req("x", 16, 8)
    assert s._vllm_takes(b)
    b.num_stale_output_tokens, b.drop_stale_output = 1, False  # a preemption's output to deliver
    assert not s._vllm_takes(b)
    b.drop_stale_output = True
    assert s._vllm_takes(b)
    b.num_stale_output_tokens = 0
    s.lora_config = SimpleNamespace(max_loras=1)
    s.requests["a"].lora_request = SimpleNamespace(lora_int_id=1)
    b.lora_request = SimpleNamespace(lora_int_id=2)  # a second adapter, one allowed
    assert not s._vllm_takes(b)
    b.lora_request = SimpleNamespace(lora_int_id=1)
    assert s._vllm_takes(b)


@pytest.mark.skipif("max_num_active_seqs" not in SchedulerConfig.__dataclass_fields__,
                    reason="this vLLM has no --max-num-active-seqs")
@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_no_parking_when_vllms_admission_limit_is_reached(cls: type) -> None:
    """``--max-num-active-seqs 1`` (vLLM's admission limit, below ``max_num_seqs``): with "a"
    running no request can be admitted, so none is parked (the burst's rule with
    ``max_num_seqs=1``). It parked: the test read ``max_num_seqs``. The order key's slots are
    that limit too."""
    s = build(cls, num_blocks=24, max_num_active_seqs=1)
    s, first, preempted = _burst(cls, park=True, s=s)
    assert s.eco_counters["parks"] == 0 and not preempted and first["b"] - 0.3 > 1.0
    assert s._active_limit == 1 < s.max_num_running_reqs
    # the order key's decode share: one slot of vLLM's limit, not one of max_num_seqs
    r = req("k", 160, 150, arrival=0.3, rl_pred_tokens=150)
    s.rl["k"] = s.predict(r)

    def key(slots: int) -> float:
        return rules.priority_key(r.arrival_time, rules.service_s(
            s._prefill_s(160), 160, 150, s._cache_step_s, s._kv_tokens, slots), s.eco_cfg.aging)

    assert s._order_key(r) == key(1) != key(s.max_num_running_reqs)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_no_parking_while_streaming_sessions_hold_the_free_slots(cls: type) -> None:
    """The burst with two of vLLM's slots and one held by a streaming session between chunks
    (``num_waiting_for_streaming_input``, which vLLM's admission limit counts): no slot for "b"
    while "a" runs, so none is parked. The control, the slot free, parks."""
    for sessions, parks in ((1, 0), (0, 1)):
        s = make(cls, num_blocks=24)
        s.max_num_running_reqs = s.max_num_active_reqs = 2
        s.num_waiting_for_streaming_input = sessions
        # a stand-in count, with no session in the queues: vLLM subtracts it from the waiting
        # requests it reports unfinished (a session in the queue is not unfinished work)
        unfinished = s.get_num_unfinished_requests
        s.get_num_unfinished_requests = lambda u=unfinished, n=sessions: u() + n
        s, _, preempted = _burst(cls, park=True, s=s)
        assert s.eco_counters["parks"] == parks and len(preempted) == parks


def test_an_idle_streaming_session_does_not_turn_parking_off() -> None:
    """A streaming session between chunks waits in vLLM's queue of KV-holding requests, which
    vLLM drains first but skips it in: the burst's "b" still gets a decode parked for it and its
    first token within its 1 s TTFT (was: no park while the session idled, b's first token at
    2.71 s)."""
    s = make(EcoServeVllmSyncScheduler, num_blocks=26)
    s.clock = lambda: 0.0
    sp = SamplingParams(max_tokens=2, ignore_eos=True, extra_args={"rl_pred_tokens": 2})
    s.add_request(Request(request_id="session", prompt_token_ids=[1] * 8, sampling_params=sp,
                          pooling_params=None, arrival_time=0.0, resumable=True))
    for _ in range(4):
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, {"session": 2}))
    assert s.requests["session"].status == RequestStatus.WAITING_FOR_STREAMING_REQ and len(s.kv_holding_waiting) == 1
    now, target, first = burst_start(s, park=True), {"a": 300}, None
    for _ in range(5000):
        if set(s.requests) <= {"session"}:
            break
        now[0] += 0.01
        if now[0] >= 0.3 and "b" not in target:
            target["b"] = 150
            s.add_request(req("b", 160, 150, arrival=0.3, rl_pred_tokens=150))
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, target))
        b = s.requests.get("b")
        if first is None and b is not None and b.num_output_tokens > 0:
            first = now[0]
    assert s.eco_counters["parks"] == 1 and first is not None and first - 0.3 <= 1.0


def test_no_victim_whose_last_token_is_in_flight() -> None:
    """Async scheduling: "a" (200 + 88 tokens) has its 88th and last token in flight when the
    burst's "b" reaches its parking window: vLLM schedules no further step for it. It was
    parked: that token dropped, and its 287 tokens recomputed later to give the same token. One
    token longer, it is still parked (the control)."""
    s, first, preempted = _burst(EcoServeVllmScheduler, park=True, a_prompt=200, a_tokens=88)
    assert s.eco_counters["parks"] == 0 and not preempted and first["b"] - 0.3 <= 1.0
    s, _, preempted = _burst(EcoServeVllmScheduler, park=True, a_prompt=200, a_tokens=89)
    assert s.eco_counters["parks"] == 1 and preempted == {"a"}


def test_no_victim_whose_last_token_at_the_models_length_is_in_flight() -> None:
    """The same with "a" asking for 10^6 tokens: its 88th is its last because the model's
    length (310) ends it, and vLLM's running loop schedules no further step for it either (its
    budget cut to 0). It was parked (a reviewer's case); one position longer, it is parked."""
    from ecoserve_sched.engines.vllm_sim import build_vllm_scheduler

    def burst(length: int) -> tuple:
        s = build_vllm_scheduler(EcoServeVllmScheduler, num_blocks=24, block_size=16, max_num_seqs=16,
                                 max_num_batched_tokens=512, max_model_len=length, async_scheduling=True)
        s, _, preempted = _burst(EcoServeVllmScheduler, park=True, s=s, a_prompt=222, a_tokens=88, a_max=10**6)
        return s.eco_counters["parks"], preempted

    assert burst(310) == (0, set()) and burst(311) == (1, {"a"})


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_one_prefix_cache_look_up_per_step_and_no_events_of_ours(cls: type) -> None:
    """``test_the_head_is_tested_with_its_prefix_cache_hit``'s "b" (a cached 128-token prefix)
    waits while "a" decodes, with KV-cache events on and b in "full" report mode (its hit
    blocks' BlockStored events sent at each look-up). The plug-in looked b up 2-4 times a step
    (give-way, parking, the estimate inside vLLM's peek), and each look-up sent b's hit events
    again: 4 a step where vLLM sends 1. Now: one look-up of ours a step, sending nothing."""
    s = build(cls, num_blocks=30, prefix_caching=True, max_num_seqs=4, kv_events=True)
    s.eco_cfg = dataclasses.replace(s.eco_cfg, slo_ttft=1.0, park=True)
    mgr = s.kv_cache_manager
    assert mgr.enable_kv_cache_events
    ours: list[int] = []  # the step of each look-up made with events off (the plug-in's)
    lookup = mgr.get_computed_blocks

    def counted(request: Request, *args: object, **kw: object) -> object:
        if request.request_id == "b" and not mgr.enable_kv_cache_events:
            ours.append(s._step)
        return lookup(request, *args, **kw)

    mgr.get_computed_blocks = counted
    events: list[int] = []  # b's hit events (its first block's tokens) each step b waited

    def before(s: Scheduler) -> None:
        mgr.take_events()

    def after(s: Scheduler) -> None:
        if s.requests.get("b") is not None and s.requests["b"].status == RequestStatus.WAITING:
            events.append(sum(type(e).__name__ == "BlockStored" and list(e.token_ids[:16]) == PREFIX[:16]
                              for e in mgr.take_events()))

    b = cached_req("b", PREFIX + list(range(5000, 5300)), 20, arrival=0.3, rl_pred_tokens=20)
    b.kv_cache_report_mode = "full"
    _run(s, [(0.0, cached_req("a", PREFIX + [900] * 16, 300, rl_pred_tokens=300), 300), (0.3, b, 20)],
         before=before, after=after)
    check_done(s)
    assert len(events) > 40 and max(events) == 1 == min(events)  # vLLM's own look-up only (was: 4)
    per_step = [ours.count(step) for step in set(ours)]
    assert len(per_step) > 40 and max(per_step) == 1  # was: 2-4


def test_a_park_updates_the_shared_block_count() -> None:
    """"A" and "V" share a 16-block prefix; parking V makes the count of shared blocks
    (``_held_offset``: what the admission cap adds back) 0 at once. It stayed 16 for the rest
    of the step: the park loop and the admissions after it tested against a cap 16 blocks too
    large (and a head sharing that prefix counted it twice)."""
    s = build(EcoServeVllmSyncScheduler, num_blocks=200, prefix_caching=True, max_num_seqs=8)
    s.clock = lambda: 0.0
    prefix = list(range(3, 259))  # 256 tokens: 16 full blocks
    target = {"A": 400, "V": 400}
    s.add_request(cached_req("A", prefix + [7] * 16, 400, rl_pred_tokens=400))
    for i in range(12):
        if i == 3:
            s.add_request(cached_req("V", prefix + [8] * 16, 400, rl_pred_tokens=400))
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, target))
    s._held_offset = s._count_held_offset()
    assert s._held_offset == 16 and {r.request_id for r in s.running} == {"A", "V"}
    assert s._park_one(s.requests["V"], due=1.0) == 0  # freed at once (no connector)
    assert s._held_offset == s._count_held_offset() == 0  # was: 16 until the next step
    s.finish_requests(["A", "V"], RequestStatus.FINISHED_ABORTED)
    check_done(s)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_no_parking_when_the_running_requests_take_the_whole_budget(cls: type, monkeypatch) -> None:
    """The simulator parks only when admission gets prompt budget after the partial prefills;
    the plug-in parked while a running prompt took the whole step, so the head got no token and
    often lost its TTFT anyway (23 parks against 20, 42 against 35, in docs/engines.md's bursts).
    ``_left_for_waiting`` counts the tokens vLLM's running loop takes."""
    s = make(cls, num_blocks=24)
    saved = s.running

    def left(*todo: int, cap: int = 0, adaptive: bool = False, budget: int = 512) -> int:
        s.running = [SimpleNamespace(num_tokens_with_spec=100 + n, num_output_placeholders=0, num_computed_tokens=100,
                                     request_id=f"r{i}") for i, n in enumerate(todo)]
        s.scheduler_config.long_prefill_token_threshold = cap
        s.adaptive_long_prefill_threshold = adaptive
        return s._left_for_waiting(budget)

    monkeypatch.setattr(s, "get_request_counts", lambda: (2, 0))
    try:
        assert left(1, 1, 1) == 509  # three decodes
        assert left(1, 600) == 0 and left(1, 511) == 0  # a prompt takes the rest
        assert left(1, 600, cap=100) == 411  # cut as vLLM cuts it (--long-prefill-token-threshold)
        assert left(1, 600, cap=100, adaptive=True) == 255  # at least a fair share: 512 // 2
    finally:
        s.running, s.scheduler_config.long_prefill_token_threshold = saved, 0
    # the gate: with nothing left for the waiting queue, the burst's decode is not parked
    monkeypatch.setattr(cls, "_left_for_waiting", lambda self, budget: 0)
    s, first, preempted = _burst(cls, park=True)
    assert s.eco_counters["parks"] == 0 and not preempted and first["b"] - 0.3 > 1.0


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_the_head_is_tested_with_vllms_watermark(cls: type) -> None:
    """With ``--watermark 0.5`` vLLM keeps 12 of the 25 blocks free while another request is
    scheduled: "b" (160 tokens, 10 blocks) fits the projection beside "a" (predicted short) and
    the free pool, but not the pool less the watermark, so vLLM refuses it while "a" decodes.
    Parking tests the head as vLLM does: "a" is parked inside b's window and b starts before
    its TTFT deadline (was: nothing parked, b waited for a's end, step 300). Without a
    watermark b fits at once and nothing parks."""
    first = {}
    for wm in (0.0, 0.5):
        s = build(cls, num_blocks=24, watermark=wm)
        assert s.kv_cache_manager.watermark_blocks == (12 if wm else 0)
        s.eco_cfg = dataclasses.replace(s.eco_cfg, slo_ttft=1.0)
        run = _run(s, [(0.0, req("a", 16, 300, rl_pred_tokens=40), 300),
                       (0.3, req("b", 160, 20, arrival=0.3, rl_pred_tokens=20), 20)])
        check_done(s)
        first[wm] = run["first_step"]["b"][0]
        assert (run["parks"], run["preempted"]) == ((1, {"a"}) if wm else (0, set()))
    assert first[0.0] == 29  # b's arrival step
    assert first[0.0] < first[0.5] < 130  # before b's TTFT deadline (1.3 s, 10 ms a step)
