"""EcoServe on vLLM's real V1 scheduler (CPU, no model): projected admission, top-ups, groups,
order, victims.

vLLM is required (conftest.py turns a missing vLLM into a failure unless ECOSERVE_VLLM_OPTIONAL=1).
The helpers here (``make``, ``req``, ``drive``, ``check_done``) are shared with test_vllm_hints.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch
from vllm.config import SchedulerConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from ecoserve_sched.engines.chat_prompt import TurnMarkers
from ecoserve_sched.engines.vllm_scheduler import (
    EcoServeRequestQueue,
    EcoServeVllmConfig,
    EcoServeVllmScheduler,
    EcoServeVllmSyncScheduler,
)
from ecoserve_sched.engines.vllm_sim import build_vllm_scheduler, fake_model_output
from ecoserve_sched.policies import ecoserve_rules as rules

BS = 16
ECO_CLASSES = [EcoServeVllmSyncScheduler, EcoServeVllmScheduler]


@pytest.fixture(autouse=True)
def eco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ECOSERVE_* setting leaks in from the shell; these tests feed predictions as client
    hints, so hints are trusted (test_vllm_hints.py checks the default, off)."""
    clear_eco_env(monkeypatch)
    monkeypatch.setenv("ECOSERVE_TRUST_CLIENT_HINTS", "1")


def clear_eco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("ECOSERVE_"):
            monkeypatch.delenv(k)


def make(cls: type, num_blocks: int = 64, **kw: object) -> Scheduler:
    return build_vllm_scheduler(cls, num_blocks=num_blocks, block_size=BS, max_num_seqs=16,
                                max_num_batched_tokens=512, max_model_len=2048,
                                async_scheduling=issubclass(cls, EcoServeVllmScheduler), **kw)


def req(rid: str, prompt: int, max_tokens: int, arrival: float = 0.0, **extra: int) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra or None)
    return Request(request_id=rid, prompt_token_ids=[1] * prompt, sampling_params=sp,
                   pooling_params=None, arrival_time=arrival)


def drive(s: Scheduler, first: list | None = None, max_steps: int = 2000) -> list:
    """Run ``s`` until no request is left (``first``: outputs already scheduled, not yet
    run); async schedulers keep one step in flight, as vLLM's engine does."""
    depth = 2 if s.scheduler_config.async_scheduling else 1
    target = {rid: r.max_tokens for rid, r in s.requests.items()}
    inflight, outs = list(first or []), list(first or [])
    for _ in range(max_steps):
        if len(inflight) < depth and s.get_num_unfinished_requests():
            inflight.append(s.schedule())
            outs.append(inflight[-1])
        if not inflight:
            return outs
        if len(inflight) >= depth or not s.get_num_unfinished_requests():
            out = inflight.pop(0)
            s.update_from_output(out, fake_model_output(out, s, target))
    raise AssertionError("did not finish")


def check_done(s: Scheduler) -> None:
    assert not s.requests and not s.running and not s.waiting
    assert s.kv_cache_manager.usage == 0.0
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == s.kv_cache_config.num_blocks - 1


def held_blocks(s: Scheduler, rid: str) -> int:
    return len(s.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(rid, ()))


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_blocks_as_written_projection_and_groups(cls: type) -> None:
    """Reservations are projected, not allocated: a request holds the blocks of its tokens."""
    s = make(cls)
    specs = {"a": (40, 30, 0), "b": (40, 60, 1), "c": (70, 20, 0), "d": (20, 100, 2)}
    for rid, (prompt, pred, bucket) in specs.items():
        s.add_request(req(rid, prompt, 200, rl_pred_tokens=pred, rl_bucket=bucket))
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == set(specs)
    for rid, (prompt, _, _) in specs.items():
        assert held_blocks(s, rid) == math.ceil(prompt / BS), rid
        assert rid in s.proj
    assert s.group_sizes() == {0: 2, 1: 1, 2: 1}
    drive(s, [out])
    check_done(s)
    assert s.group_sizes() == {} and not len(s.proj)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_every_request_finishes_with_topups(cls: type) -> None:
    s = make(cls)
    for i in range(6):  # under-predicted: every reservation is doubled (top-up) several times
        s.add_request(req(str(i), 30 + 7 * i, 90 + 20 * i, arrival=0.01 * i,
                          rl_pred_tokens=16, rl_bucket=i % 3))
    drive(s)
    check_done(s)
    assert s.eco_counters["topups"] == sum(
        rules.topups(16, 89 + 20 * i, 90 + 20 * i) for i in range(6)) > 0  # at the last token less one
    assert s.eco_counters["admissions"] >= 6


def test_admission_waits_for_the_projected_peak() -> None:
    """vLLM admits on the prompt; EcoServe only when the projected peak fits (and keeps order):
    14 blocks = 224 tokens; "long" (32 + 120) and "next" (32 + 150) would peak at 302."""
    plain, eco = make(Scheduler, num_blocks=14), make(EcoServeVllmSyncScheduler, num_blocks=14)
    for s in (plain, eco):
        s.add_request(req("long", 32, 150, arrival=0.0, rl_pred_tokens=120))
        s.add_request(req("next", 32, 180, arrival=10.0, rl_pred_tokens=150))
    assert set(plain.schedule().num_scheduled_tokens) == {"long", "next"}
    out = eco.schedule()
    assert set(out.num_scheduled_tokens) == {"long"}
    assert [r.request_id for r in eco.waiting] == ["next"] and eco.eco_counters["admission_waits"] >= 1
    drive(eco, [out])
    check_done(eco)


def test_ordering_shorter_predicted_work_first_and_preempted_first() -> None:
    s = make(EcoServeVllmSyncScheduler)
    s.add_request(req("long", 32, 100, arrival=0.0, rl_pred_tokens=1000))
    s.add_request(req("short", 32, 100, arrival=0.1, rl_pred_tokens=10))
    s.add_request(req("late", 32, 100, arrival=60.0, rl_pred_tokens=1))
    assert [r.request_id for r in s.waiting] == ["short", "long", "late"]
    q = EcoServeRequestQueue(lambda r: r.arrival_time)
    a, b, c = (req(x, 8, 8, arrival=t) for x, t in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    for r in (a, b, c):
        q.add_request(r)
    q.prepend_request(c)  # put back before its first token: by its key, as a new request
    q.remove_request(b)
    assert [r.request_id for r in q] == ["a", "c", "c"]
    assert q.pop_request() is a and q.pop_request() is c and q.pop_request() is c and not q
    # Put back with their first token: first whatever their key, in the order they were put back
    # (the simulator's resume FIFO); one skipped within a step keeps its place.
    d, e, f = (req(x, 8, 8, arrival=t) for x, t in (("d", 1.0), ("e", 3.0), ("f", 2.0)))
    for r in (d, e):
        r.append_output_token_ids([7])
    q.add_request(f)
    q.prepend_request(e)
    q.prepend_request(d)  # preempted after e
    assert [r.request_id for r in q] == ["e", "d", "f"]
    assert q.pop_request() is e
    q.prepend_requests([e])  # skipped: back before d
    assert [r.request_id for r in q] == ["e", "d", "f"]
    q.forget("e")


def test_ties_in_the_queue_go_in_arrival_order_after_a_put_back_or_giving_way() -> None:
    """Equal keys go in arrival order, as the simulator's heaps go by request id: "a", preempted
    before its first token, or given way, stays ahead of "b" that arrived after it. It went
    behind (a tie broken by the order pushed), so two prompts of one key swapped first tokens
    in a differential fuzzer's case (1.016 and 1.079 s)."""
    lost = {"on": False}
    q = EcoServeRequestQueue(lambda r: 0.0, lost=lambda r: lost["on"])
    a, b = req("a", 8, 8, arrival=0.0), req("b", 8, 8, arrival=0.0)
    q.add_request(a)
    q.add_request(b)
    assert q.pop_request() is a
    q.prepend_request(a)  # preempted before its first token: among the new ones, by its key
    assert [r.request_id for r in q] == ["a", "b"]  # was: ["b", "a"]
    lost["on"] = True  # both give way (the head first, then the next)
    assert q.pop_request() is a
    q.prepend_request(a)
    assert [r.request_id for r in q] == ["a", "b"]
    q.forget("a")
    assert q.pop_request() is a and q.pop_request() is b and not q
    q.forget("b")
    assert not q._arrived  # nothing kept for requests that left


def test_a_request_preempted_with_its_first_token_in_flight_goes_first() -> None:
    """Async scheduling: vLLM preempts "x" (out of blocks) while the step that samples its
    first token is in flight, and then delivers that token (stale output). x was put back as a
    new prompt: behind "y", predicted shorter, and subject to give-way, though its client had
    its first token; and that token's time was taken only when x resumed. It goes first now,
    as one preempted after its first token (the simulator's resume FIFO)."""
    s = make(EcoServeVllmScheduler, num_blocks=6)
    now = [1.0]
    s.clock = lambda: now[0]
    s.add_request(req("w", 48, 40, arrival=0.0, rl_pred_tokens=1))
    o0 = s.schedule()
    s.add_request(req("x", 32, 60, arrival=0.0, rl_pred_tokens=50))
    o1 = s.schedule()  # x's whole prompt: its first token is sampled in this step
    x = s.requests["x"]
    assert x.num_output_placeholders == 1 and x.num_output_tokens == 0
    s.update_from_output(o0, fake_model_output(o0, s, {"w": 40}))
    s.add_request(req("y", 16, 20, arrival=0.0, rl_pred_tokens=1))  # a smaller key than x's
    o2 = s.schedule()
    assert o2.preempted_req_ids == {"x"} and x.num_output_tokens == 0
    assert [r.request_id for r in s.waiting] == ["x", "y"]  # was: ["y", "x"]
    # the worker returns the token it sampled for x: vLLM delivers it
    ids = list(o1.num_scheduled_tokens)
    s.update_from_output(o1, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                               sampled_token_ids=[[7] for _ in ids]))
    assert x.num_output_tokens == 1 and [r.request_id for r in s.waiting] == ["x", "y"]
    now[0] = 1.5
    o3 = s.schedule()
    assert s._first_token["x"] == 1.5  # seen at the first step after it came (was: after x resumed)
    drive(s, [o2, o3])
    check_done(s)


def test_skipped_again_before_its_in_flight_first_token_comes_it_keeps_first_place() -> None:
    """The queue alone: "x", preempted with its first token in flight (rank 0), is skipped in
    the next step (e.g. its preemption's output not yet delivered) before that token comes. It
    keeps the place it was put back at, before "e" put back after it with its first token, and
    before the new "n"; ranked by the token count alone it fell among the new requests."""
    q = EcoServeRequestQueue(lambda r: r.arrival_time)
    x, e, n = req("x", 8, 8, arrival=5.0), req("e", 8, 8, arrival=3.0), req("n", 8, 8, arrival=1.0)
    e.append_output_token_ids([7])
    q.add_request(n)
    q.first_in_flight = x
    q.prepend_request(x)  # preempted, its first token in flight
    q.first_in_flight = None
    q.prepend_request(e)
    assert [r.request_id for r in q] == ["x", "e", "n"]
    assert q.pop_request() is x and x.num_output_tokens == 0
    q.prepend_requests([x])  # skipped before its token came
    assert [r.request_id for r in q] == ["x", "e", "n"] and q.skipped == {"x"}
    q.forget("x")
    q.forget("e")


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_pop_after_peek_returns_the_request_peeked_whatever_the_clock_did(cls: type) -> None:
    """vLLM allocates KV for the request ``peek_request`` gives, then runs the one
    ``pop_request`` gives: the clock moving in between (here "A" loses its TTFT SLO while vLLM
    allocates) must not swap them. It did: "B" ran holding no KV, and ``schedule`` raised."""
    s = make(cls)
    now = [4.80]
    s.clock = lambda: now[0]
    s.add_request(req("A", 32, 20, arrival=0.0, rl_pred_tokens=10))  # lost once now + 0.16 > 5
    s.add_request(req("B", 100, 20, arrival=0.1, rl_pred_tokens=10))
    allocate = s._allocate

    def slow_allocate(request: Request, *args: object, **kwargs: object) -> object:
        blocks = allocate(request, *args, **kwargs)
        now[0] += 0.05  # vLLM's own work between the peek and the pop
        return blocks

    s._allocate = slow_allocate
    out = s.schedule()
    assert [r.req_id for r in out.scheduled_new_reqs] == ["A", "B"]
    s._allocate = allocate
    drive(s, [out])
    check_done(s)
    # the queue alone: a parked request falling due between the peek and the pop
    t = [0.0]
    q = EcoServeRequestQueue(lambda r: r.arrival_time, clock=lambda: t[0])
    n, parked = req("N", 8, 8, arrival=1.0), req("P", 8, 8)
    parked.append_output_token_ids([7])
    q.add_request(n)
    q.parking = (parked, 0.010)
    q.prepend_request(parked)
    q.parking = None
    assert q.peek_request() is n
    t[0] = 0.011
    assert q.pop_request() is n and q.pop_request() is parked  # due by now: next
    # without a peek just before, the pop settles the queue at the clock's time
    q.add_request(n)
    q.parking = (parked, 0.020)
    q.prepend_request(parked)
    q.parking = None
    t[0] = 0.021
    assert q.pop_request() is parked


def test_a_streaming_session_between_chunks_holds_its_kv_but_does_not_grow() -> None:
    """vLLM's streaming-input sessions (``resumable``): between two chunks the session holds its
    KV and waits. It stayed in the projection, growing a token per step while it waited: after
    ~1,000 idle steps the 64-block cache admitted nothing, 61 blocks free."""
    s = make(EcoServeVllmSyncScheduler)
    s.clock = lambda: 0.0
    if not hasattr(Scheduler, "_handle_stopped_request"):
        pytest.skip("this vLLM has no streaming-input sessions")

    def session(prompt: int) -> Request:
        sp = SamplingParams(max_tokens=4, ignore_eos=True, extra_args={"rl_pred_tokens": 4})
        return Request(request_id="session", prompt_token_ids=[1] * prompt, sampling_params=sp,
                       pooling_params=None, arrival_time=0.0, resumable=True)

    s.add_request(session(32))
    for _ in range(8):
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, {"session": 4}))
    assert s.requests["session"].status == RequestStatus.WAITING_FOR_STREAMING_REQ
    assert "session" not in s.proj and s._idle_sessions == {"session"}
    held = len(s._req_blocks["session"])
    assert held >= 2
    # its blocks count as held: the largest prompt admitted next to a running request is
    # smaller by them than if they were free ...
    s.add_request(req("a", 16, 300, rl_pred_tokens=8))
    s.update_from_output(out := s.schedule(), fake_model_output(out, s, {"a": 300}))

    def largest_prompt() -> int:
        return max(n for n in range(BS, BS * s._usable_blocks, BS)
                   if s._fits(req("x", n, 9, rl_pred_tokens=9), None))

    counted = largest_prompt()
    s._idle_sessions.clear()
    assert largest_prompt() - counted == held * BS
    s._idle_sessions.add("session")
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    # ... and requests that fit are admitted however long the session waits
    for i in range(1200):
        if i % 50 == 0:
            s.add_request(req(f"r{i}", 16, 8, rl_pred_tokens=8))
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, {rid: 8 for rid in s.requests}))
    assert [rid for rid in s.requests if rid != "session"] == []
    # the next chunk is admitted (entering the projection again), then the session ends
    s.add_request(session(8))
    out = s.schedule()
    assert "session" in out.num_scheduled_tokens and "session" in s.proj and not s._idle_sessions
    for _ in range(8):
        s.update_from_output(out, fake_model_output(out, s, {"session": 4}))
        out = s.schedule()
    s.add_request(req("session", 1, 1))  # not resumable: the session's end
    assert "session" not in s.requests and not s._idle_sessions and not len(s.proj)
    # a chunk that comes while the one before runs is queued: the session is projected again
    # when it runs (it was not: it ran and grew outside the projection)
    s.add_request(session(32))
    s.update_from_output(out := s.schedule(), fake_model_output(out, s, {"session": 4}))
    s.add_request(session(8))
    for _ in range(4):  # three tokens of the first chunk, then the second's prefill
        s.update_from_output(out := s.schedule(), fake_model_output(out, s, {"session": 10**6}))
    assert s.requests["session"].status == RequestStatus.RUNNING and out.num_scheduled_tokens["session"] == 8
    assert "session" in s.proj and not s._idle_sessions


def _victim_setup(cls: type) -> Scheduler:
    """Three under-predicted requests in a KV cache that runs out while they decode."""
    s = make(cls, num_blocks=11)
    if hasattr(s, "clock"):
        s.clock = lambda: 0.0  # no TTFT SLO is lost
    # "wide" arrives first (both schedulers admit it first) and is predicted the longest: when
    # KV runs out it has the most predicted work left, so the rules pick it, not the latest "z".
    s.add_request(req("wide", 32, 100, arrival=0.0, rl_bucket=2, rl_pred_tokens=60))
    s.add_request(req("x", 32, 100, arrival=5.0, rl_bucket=0, rl_pred_tokens=10))
    s.add_request(req("z", 32, 100, arrival=10.0, rl_bucket=1, rl_pred_tokens=12))
    return s


def test_victim_is_the_rules_victim_not_the_latest_admission() -> None:
    eco = _victim_setup(EcoServeVllmSyncScheduler)
    target = {rid: r.max_tokens for rid, r in eco.requests.items()}
    first = None
    for _ in range(2000):
        if not eco.get_num_unfinished_requests():
            break
        want = max(eco.running, key=lambda r: eco._victim_key(r, 0.0)).request_id if eco.running else None
        out = eco.schedule()
        if out.preempted_req_ids and first is None:
            first = (set(out.preempted_req_ids), want)
        eco.update_from_output(out, fake_model_output(out, eco, target))
    assert first is not None and first[1] in first[0]
    assert first[1] != "z"  # not vLLM's choice: the latest admitted
    check_done(eco)
    assert eco.eco_counters["preemptions"] >= 1 and eco.eco_counters["victim_sorts"] >= 1
    plain = _victim_setup(Scheduler)
    outs = drive(plain)
    assert next(o.preempted_req_ids for o in outs if o.preempted_req_ids) == {"z"}  # vLLM: the last admitted
    check_done(plain)


def burst_start(s: Scheduler, park: bool, a_prompt: int = 16, a_tokens: int = 300,
                a_max: int | None = None) -> list[float]:
    """``_burst``'s start: a 1 s TTFT SLO, parking on or off, a clock the test moves (the list's
    one value), and "a" decoding alone (``a_max``: its ``max_tokens``, if not ``a_tokens``)."""
    s.eco_cfg = dataclasses.replace(s.eco_cfg, slo_ttft=1.0, park=park)
    now = [0.0]
    s.clock = lambda: now[0]
    s.add_request(req("a", a_prompt, a_max or a_tokens, arrival=0.0, rl_pred_tokens=a_tokens))
    return now


def _burst(cls: type, park: bool, slots: int = 16, s: Scheduler | None = None,
           a_prompt: int = 16, a_tokens: int = 300, a_max: int | None = None
           ) -> tuple[Scheduler, dict[str, float], set[str]]:
    """The simulator's parking test on vLLM's scheduler: "a" (``a_prompt`` + ``a_tokens``, 16 +
    300) decodes alone;
    "b" (160 + 150 tokens) arrives at 0.3 s and does not fit the projection until "a" ends
    (~3 s), past its 1 s TTFT; "a" has slack on its mean TBT. 10 ms a step; async: one step in
    flight. ``slots``: vLLM's ``max_num_seqs`` (and so its admission limit); ``s``: a scheduler
    of 24 blocks built for the test instead."""
    if s is None:
        s = make(cls, num_blocks=24)
        s.max_num_running_reqs = s.max_num_active_reqs = slots  # as vLLM sets both from max_num_seqs
    now = burst_start(s, park, a_prompt, a_tokens, a_max)
    target = {"a": a_tokens}
    depth = 2 if s.scheduler_config.async_scheduling else 1
    first: dict[str, float] = {}
    preempted: set[str] = set()
    inflight: list = []
    for _ in range(5000):
        if not s.get_num_unfinished_requests() and not inflight:
            break
        now[0] += 0.01
        if now[0] >= 0.3 and "b" not in target:
            target["b"] = 150
            s.add_request(req("b", 160, 150, arrival=0.3, rl_pred_tokens=150))
        if s.get_num_unfinished_requests():
            out = s.schedule()
            preempted |= set(out.preempted_req_ids or ())
            inflight.append(out)
        if len(inflight) >= depth or not s.get_num_unfinished_requests():
            o = inflight.pop(0)
            s.update_from_output(o, fake_model_output(o, s, target))
            for rid in ("a", "b"):
                r = s.requests.get(rid)
                if rid not in first and r is not None and r.num_output_tokens > 0:
                    first[rid] = now[0]
    check_done(s)
    return s, first, preempted


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_a_decode_with_tbt_slack_is_parked_for_a_request_that_can_still_meet_its_ttft(cls: type) -> None:
    s, first, preempted = _burst(cls, park=False)
    assert first["b"] - 0.3 > 1.0 and not preempted  # b's TTFT is lost waiting for a
    s, first, preempted = _burst(cls, park=True)
    assert s.eco_counters["parks"] == 1 and preempted == {"a"}
    assert first["b"] - 0.3 <= 1.0  # parked at the last quarter TTFT: b starts in time
    assert first["b"] - 0.3 > 1.0 - 0.25 - 0.16 - 0.05
    # every slot taken: no parking (the simulator's rule: parking makes room in the cache)
    s, first, preempted = _burst(cls, park=True, slots=1)
    assert s.eco_counters["parks"] == 0 and not preempted and first["b"] - 0.3 > 1.0


def test_no_parking_while_vllm_is_paused() -> None:
    """vLLM's pause_generation(mode="wait") lets the in-flight requests finish: a request parked
    then sat in the waiting queue, no unfinished work for the pause, which ended with it half
    done (after a weight update it would resume on the new weights)."""
    from vllm.v1.core.sched.interface import PauseState

    s = make(EcoServeVllmSyncScheduler, num_blocks=24)
    now = burst_start(s, park=True)
    target = {"a": 300, "b": 150}
    for _ in range(1000):
        now[0] += 0.01
        if now[0] >= 0.3 and "b" not in s.requests and s.pause_state == PauseState.UNPAUSED:
            s.add_request(req("b", 160, 150, arrival=0.3, rl_pred_tokens=150))
            s.set_pause_state(PauseState.PAUSED_NEW)
        if s.pause_state == PauseState.PAUSED_NEW and s.get_num_unfinished_requests() == 0:
            break
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, target))
    assert s.eco_counters["parks"] == 0 and "a" not in s.requests  # "a" finished before the pause ended


class _Predictor:
    def __init__(self) -> None:
        self.calls = 0

    def predict(self, texts: list[str], generators: str | None = None) -> list[SimpleNamespace]:
        self.calls += len(texts)
        return [SimpleNamespace(bucket=3, pred_tokens=40, reserve_tokens=48) for _ in texts]


def test_predictions_at_add_request_extra_args_win_and_defaults() -> None:
    s = make(EcoServeVllmSyncScheduler)
    s.add_request(req("nopred", 20, 300))
    assert (s.rl["nopred"].source, s.rl["nopred"].reserve_tokens) == ("default", 300)  # capped
    s.predictor = _Predictor()
    s.tokenizer = SimpleNamespace(decode=lambda ids, **_: "hello")
    s.add_request(req("model", 20, 300))
    s.add_request(req("client", 20, 300, rl_bucket=1, rl_pred_tokens=7, rl_reserve_tokens=9))
    assert (s.rl["model"].bucket, s.rl["model"].reserve_tokens, s.rl["model"].source) == (3, 48, "predictor")
    assert (s.rl["client"].bucket, s.rl["client"].reserve_tokens, s.rl["client"].source) == (1, 9, "extra_args")
    assert s.predictor.calls == 1
    drive(s)
    assert s.predictor.calls == 1  # never called while scheduling
    check_done(s)
    c = s.eco_counters
    assert (c["predictions"], c["hints_used"], c["default_reservations"]) == (1, 1, 1)


def test_the_samples_of_one_request_share_its_prediction() -> None:
    """vLLM splits a request of n samples into n requests of one prompt; the predictor ran n
    times on the engine thread (a reviewer's find): the next ones take the last prediction."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    s = make(EcoServeVllmSyncScheduler)
    s.predictor, s.tokenizer = _Predictor(), SimpleNamespace(decode=lambda ids, **_: "hello")
    sp = SamplingParams(n=4, max_tokens=200)
    parent = ParentRequest(SimpleNamespace(request_id="q", external_req_id="q", params=sp, sampling_params=sp))
    for i in range(4):
        rid, child = parent.get_child_info(i)
        s.add_request(Request(request_id=rid, prompt_token_ids=[5] * 30, sampling_params=child,
                              pooling_params=None, arrival_time=0.0))
    s.add_request(req("other", 31, 200))  # another prompt: predicted
    assert s.predictor.calls == 2 and {p.reserve_tokens for p in s.rl.values()} == {48}
    assert (s.eco_counters["predictions"], s.eco_counters["predictions_shared"]) == (5, 3)
    # a streaming session's next chunk extends its prompt's list in place: the memo holds a copy
    # (was: the list itself, so a new prompt equal to the extended one took the stale prediction)
    s.requests["other"].prompt_token_ids.extend([2] * 50)
    s.add_request(Request(request_id="same", prompt_token_ids=[1] * 31 + [2] * 50,
                          sampling_params=SamplingParams(max_tokens=200), pooling_params=None, arrival_time=0.0))
    assert s.predictor.calls == 3 and s.eco_counters["predictions_shared"] == 3
    drive(s)
    check_done(s)


def test_a_last_user_bundle_is_given_the_last_user_turn() -> None:
    """The decoded template is cut to the last user turn (``engines/chat_prompt.py``) when the
    chat template has markers; without a user turn, the whole prompt, counted."""
    seen: list[str] = []

    class Recorder(_Predictor):
        def predict(self, texts: list[str], generators: str | None = None) -> list[SimpleNamespace]:
            seen.extend(texts)
            return super().predict(texts, generators)

    rendered = {"a": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nold<|im_end|>\n"
                     "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nnew question<|im_end|>\n"
                     "<|im_start|>assistant\n",
                "b": "<|im_start|>system\nno user here<|im_end|>\n<|im_start|>assistant\n"}

    def decode(ids: list[int], skip_special_tokens: bool) -> str:
        text = rendered["a" if len(ids) == 20 else "b"]
        return text.replace("<|im_start|>", "").replace("<|im_end|>", "") if skip_special_tokens else text

    s = make(EcoServeVllmSyncScheduler)
    s.predictor, s.tokenizer = Recorder(), SimpleNamespace(decode=decode)
    s.turns = TurnMarkers("<|im_start|>user\n", "<|im_end|>")
    s.add_request(req("a", 20, 100))
    s.add_request(req("b", 30, 100))
    assert seen == ["new question", "system\nno user here\nassistant\n"]
    assert (s.eco_counters["predictions"], s.eco_counters["whole_prompts"]) == (2, 1)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_scaled_predictions_learn_from_requests_that_ran_to_the_end(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """ECOSERVE_SCALE_PREDICTIONS: the simulator's ``rules.PredictionScale``, fed the
    predictor's own values of the requests that stopped or hit their cap (not aborted ones)."""
    monkeypatch.setenv("ECOSERVE_SCALE_PREDICTIONS", "1")
    s = make(cls)
    assert s.eco_cfg.scale_predictions and s.pscale is not None
    s.pscale = rules.PredictionScale(min_samples=4, refresh=1)
    for i in range(4):  # predicted 50, generate 100 (their cap): twice as long as predicted
        s.add_request(req(str(i), 20, 100, arrival=0.01 * i, rl_pred_tokens=50, rl_bucket=1))
    cut = [f"cut{i}" for i in range(4)]  # as many aborted as finished: fed in, the median would be 0
    for i, rid in enumerate(cut):
        s.add_request(req(rid, 20, 100, arrival=0.05 + 0.01 * i, rl_pred_tokens=5, rl_bucket=0))
    s.finish_requests(cut, RequestStatus.FINISHED_ABORTED)
    for i in range(6):  # no prediction (the default reservation): neither counted nor scaled (were
        # counted: a reviewer's 24 such requests took the scale to 0.1 for every predicted one)
        s.add_request(req(f"d{i}", 20, 10, arrival=0.1 + 0.01 * i))
    assert s.rl["d0"].source == "default" and s.rl["d0"].predicted == 0
    drive(s)
    check_done(s)
    assert s.pscale.scale == 2.0  # an aborted request's 5 -> 0 tokens is not a length
    s.add_request(req("late", 20, 300, rl_pred_tokens=60, rl_bucket=1))
    assert (s.rl["late"].predicted, s.rl["late"].pred_tokens) == (60, 120)
    s.add_request(req("capped", 20, 100, rl_pred_tokens=60, rl_bucket=1))
    assert s.rl["capped"].pred_tokens == 100  # never beyond max_tokens
    drive(s)
    monkeypatch.delenv("ECOSERVE_SCALE_PREDICTIONS")
    assert make(cls).pscale is None  # off by default


def test_config_from_env_and_scheduler_cls_resolves() -> None:
    cfg = EcoServeVllmConfig.from_env({"ECOSERVE_DEFAULT_RESERVE": "256", "ECOSERVE_SLO_TBT": "0.1",
                                       "ECOSERVE_PREDICTOR": "bundle/dir"})
    assert (cfg.default_reserve, cfg.slo_tbt, cfg.predictor) == (256, 0.1, "bundle/dir")
    name = "ecoserve_sched.engines.vllm_scheduler.EcoServeVllmScheduler"
    sc = SchedulerConfig(scheduler_cls=name, max_model_len=2048, is_encoder_decoder=False)
    assert sc.get_scheduler_cls() is EcoServeVllmScheduler



def test_profile_sizes_each_steps_prefill_budget_by_the_tbt_slo(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ECOSERVE_PROFILE, a step with decodes admits only the prompt tokens that keep it
    within iter_time_frac x ECOSERVE_SLO_TBT by the cost model: the simulator's rule
    (``rules.PrefillBudget``) on the same decodes; without it, vLLM's whole token budget.
    (Amortized chunks off: ``test_amortized_chunk_takes_the_whole_budget_then_repays``.)"""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.policies import ecoserve_rules as rules
    from ecoserve_sched.policies.ecoserve import EcoServeConfig

    cost, frac = load_profile("llama3-8b-h100-80gb"), EcoServeConfig().iter_time_frac
    tbt = cost.iteration_time(64, 64 * 32, 4, 4 * 40) / frac  # a 64-token prefill fits, more does not
    monkeypatch.setenv("ECOSERVE_SLO_TBT", repr(tbt))
    monkeypatch.setenv("ECOSERVE_AMORTIZE", "0")
    scheduled = {}
    for profile in ("", cost.name):
        monkeypatch.setenv("ECOSERVE_PROFILE", profile)
        s = make(EcoServeVllmSyncScheduler, num_blocks=200)
        assert (s.cost_model is not None) == bool(profile)
        for i in range(4):
            s.add_request(req(f"d{i}", 32, 60, arrival=0.0, rl_pred_tokens=60))
        first = [s.schedule()]
        s.update_from_output(first[0], fake_model_output(first[0], s, {f"d{i}": 60 for i in range(4)}))
        decoding = [r for r in s.running if r.num_computed_tokens >= r.num_prompt_tokens]
        dctx = sum(r.num_computed_tokens + 1 for r in decoding)  # each attends to the token it feeds too
        s.add_request(req("long", 1000, 8, arrival=1.0, rl_pred_tokens=8))
        out = s.schedule()
        scheduled[profile] = out.num_scheduled_tokens["long"]
        if profile:
            want, _ = rules.PrefillBudget(cost.iteration_time, frac * tbt, min(cost.token_budget, 512))(
                512 - len(decoding), len(decoding), dctx)
            assert scheduled[profile] == want < 512 - len(decoding)
            assert s.max_num_scheduled_tokens == 512  # restored after the step
        target = {r: 60 for r in ("d0", "d1", "d2", "d3")} | {"long": 8}
        s.update_from_output(out, fake_model_output(out, s, target))
        if profile:  # the next chunk attends to the prompt tokens computed so far: a smaller budget
            dctx = sum(r.num_computed_tokens + 1 for r in decoding)
            late, _ = rules.PrefillBudget(cost.iteration_time, frac * tbt, min(cost.token_budget, 512))(
                512 - len(decoding), len(decoding), dctx, offset=want)
            out = s.schedule()
            assert out.num_scheduled_tokens["long"] == late
            s.update_from_output(out, fake_model_output(out, s, target))
        drive(s)
        check_done(s)
    assert scheduled[""] == 512 - 4 > scheduled[cost.name]


def test_paced_decodes_are_not_starved_by_a_prefill_ahead_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM hands a step's tokens out in ``running``'s order: under the TBT-aware budget (the
    decodes plus the paced prompt tokens) a prefill ahead of a decode took the decode's share
    (was: a decode got no token for 6 steps behind a 6,000-token prompt chunked by
    --long-prefill-token-threshold). Decodes go first, as in the simulator: every running
    decode gets its token in every step."""
    monkeypatch.setenv("ECOSERVE_PROFILE", "llama2-13b-a100-80gb")
    monkeypatch.setenv("ECOSERVE_PARK", "0")
    s = build_vllm_scheduler(EcoServeVllmSyncScheduler, num_blocks=1024, block_size=BS, max_num_seqs=2,
                             max_num_batched_tokens=2048, max_model_len=8192)
    s.scheduler_config.long_prefill_token_threshold = 1024
    s.add_request(req("P", 6000, 20, 0.0, rl_pred_tokens=5))
    s.add_request(req("D", 16, 100, 0.5, rl_pred_tokens=50))
    for i in range(3):
        s.add_request(req(f"W{i}", 600, 20, 1.0 + i, rl_pred_tokens=5))
    target = {rid: r.max_tokens for rid, r in s.requests.items()}
    behind = 0
    for _ in range(30):
        decoding = {r.request_id for r in s.running if r.num_computed_tokens >= r.num_tokens - 1}
        prefilling = [r.request_id for r in s.running if r.request_id not in decoding]
        behind += bool(prefilling and decoding and s.running.index(s.requests[prefilling[0]]) == 0)
        out = s.schedule()
        assert all(out.num_scheduled_tokens.get(rid, 0) >= 1 for rid in decoding), out.num_scheduled_tokens
        s.update_from_output(out, fake_model_output(out, s, target))
    assert behind and s.eco_counters["decodes_first"] >= 1  # the case arose, and was handled
    drive(s)
    check_done(s)


@pytest.mark.parametrize("seed", [2, 7])
def test_decodes_first_leaves_the_victim_order_alone(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """A step whose KV demand exceeds the free pool sorts ``running`` for victims (vLLM preempts
    from its end): decodes are not moved ahead there, so the rules' victim is preempted (a first
    version moved them, and vLLM preempted a prefill instead, 2 of 40 preempting steps here)."""
    import numpy as np

    monkeypatch.setenv("ECOSERVE_PROFILE", "llama2-13b-a100-80gb")
    monkeypatch.setenv("ECOSERVE_PARK", "0")
    rng = np.random.default_rng(seed)
    s = build_vllm_scheduler(EcoServeVllmSyncScheduler, num_blocks=int(rng.integers(50, 90)), block_size=BS,
                             max_num_seqs=12, max_num_batched_tokens=2048, max_model_len=8192)
    s.scheduler_config.long_prefill_token_threshold = 256
    s.clock = lambda: 0.0
    reqs = [req(f"q{i}", int(rng.choice([16, 64, 400, 900])), int(rng.integers(20, 300)), 0.001 * i,
                rl_pred_tokens=int(rng.integers(2, 20))) for i in range(40)]
    target = {r.request_id: r.max_tokens for r in reqs}
    preempting = 0
    for step in range(6000):
        for r in reqs[2 * step:2 * step + 2]:
            s.add_request(r)
        if not s.get_num_unfinished_requests():
            if 2 * step >= len(reqs):
                break
            continue
        keys = {r.request_id: s._victim_key(r, 0.0) for r in s.running}
        out = s.schedule()
        if out.preempted_req_ids and keys:
            preempting += 1
            assert max(keys, key=keys.get) in out.preempted_req_ids
        s.update_from_output(out, fake_model_output(out, s, target))
    assert preempting >= 10 and s.eco_counters["decodes_first"] >= 1
    check_done(s)


def test_amortized_chunk_takes_the_whole_budget_then_repays(monkeypatch: pytest.MonkeyPatch) -> None:
    """ECOSERVE_AMORTIZE (the default): while a prompt waits beyond the paced budget, a step takes
    the whole budget where ``rules.amortized_chunk_pays``, and the next ``rules.repay_steps``
    steps schedule only decodes (the simulator's rule, ``test_ecoserve_policy.py``)."""
    from ecoserve_sched.cost_model import load_profile, prefill_ctx_tokens
    from ecoserve_sched.policies import ecoserve_rules as rules
    from ecoserve_sched.policies.ecoserve import EcoServeConfig

    cost, frac = load_profile("llama3-8b-h100-80gb"), EcoServeConfig().iter_time_frac
    tbt = cost.iteration_time(64, 64 * 32, 4, 4 * 40) / frac
    monkeypatch.setenv("ECOSERVE_SLO_TBT", repr(tbt))
    monkeypatch.setenv("ECOSERVE_PROFILE", cost.name)
    s = make(EcoServeVllmSyncScheduler, num_blocks=200)
    s.clock = lambda: 0.0  # every first token at 0: 20 tokens bank 20 TBT SLOs of slack
    assert s.eco_cfg.amortize
    for i in range(4):
        s.add_request(req(f"d{i}", 32, 60, arrival=0.0, rl_pred_tokens=60))
    target = {f"d{i}": 60 for i in range(4)} | {"long": 8}
    for _ in range(20):
        out = s.schedule()
        s.update_from_output(out, fake_model_output(out, s, target))
    s.add_request(req("long", 1000, 8, arrival=0.0, rl_pred_tokens=8))
    dctx = sum(s.requests[f"d{i}"].num_computed_tokens + 1 for i in range(4))
    paced, t0 = rules.PrefillBudget(cost.iteration_time, frac * tbt, min(cost.token_budget, 512))(512 - 4, 4, dctx)
    t0 = t0 if t0 >= 0 else cost.iteration_time(paced, prefill_ctx_tokens(paced), 4, dctx)
    big, decode_s = 512 - 4, cost.iteration_time(0, 0, 4, dctx)
    t_big = cost.iteration_time(big, prefill_ctx_tokens(big), 4, dctx)
    assert rules.amortized_chunk_pays(big, t_big, paced, t0, decode_s)  # this setting: it pays
    out = s.schedule()
    assert out.num_scheduled_tokens["long"] == big and s.eco_counters["amortized"] == 1
    s.update_from_output(out, fake_model_output(out, s, target))
    repay = rules.repay_steps(t_big, t0, decode_s)
    assert repay >= 1
    for _ in range(repay):  # decodes only
        out = s.schedule()
        assert "long" not in out.num_scheduled_tokens and out.total_num_scheduled_tokens == 4
        s.update_from_output(out, fake_model_output(out, s, target))
    out = s.schedule()  # the rest of the prompt: within the whole budget, so the paced rule decides
    assert out.num_scheduled_tokens["long"] > 0
    s.update_from_output(out, fake_model_output(out, s, target))
    drive(s)
    check_done(s)


def test_each_chunk_is_timed_after_the_prompt_tokens_already_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A late chunk of a long prompt attends to its computed prefix: every step's prompt budget is
    ``rules.PrefillBudget`` at the first running prefill's computed tokens (the simulator's rule),
    smaller than a fresh prompt's."""
    from ecoserve_sched.policies import ecoserve_rules as rules

    class AttentionCost:  # 10 ms + 0.1 ms per prompt token + 0.1 us per token of attention context
        token_budget = 16

        def iteration_time(self, p: int, pc: int, d: int, dc: int) -> float:
            return 0.01 + 1e-4 * p + 1e-7 * pc

        def recompute_time(self, tokens: int) -> float:
            return 1e-4 * tokens + 1e-7 * tokens * tokens

    monkeypatch.setenv("ECOSERVE_SLO_TBT", "0.125")  # 0.8 x 0.125 s = 0.1 s per step
    s = make(EcoServeVllmSyncScheduler, num_blocks=200)
    s.cost_model = cost = AttentionCost()
    target = {"d0": 200, "d1": 200, "long": 4}
    for rid in ("d0", "d1"):
        s.add_request(req(rid, 32, 200, arrival=0.0, rl_pred_tokens=200))
    out = s.schedule()
    s.update_from_output(out, fake_model_output(out, s, target))
    s.add_request(req("long", 1900, 4, arrival=1.0, rl_pred_tokens=4))
    long = s.requests["long"]
    budgets = []
    while long.num_computed_tokens < 1900:
        offset = long.num_computed_tokens
        dctx = sum(s.requests[r].num_computed_tokens + 1 for r in ("d0", "d1"))
        want, _ = rules.PrefillBudget(cost.iteration_time, 0.1, 16)(512 - 2, 2, dctx, offset=offset)
        fresh, _ = rules.PrefillBudget(cost.iteration_time, 0.1, 16)(512 - 2, 2, dctx)
        out = s.schedule()
        assert out.num_scheduled_tokens["long"] == min(want, 1900 - offset)
        budgets.append((offset, want, fresh))
        s.update_from_output(out, fake_model_output(out, s, target))
    assert budgets[0][1] == budgets[0][2] == 510  # the first chunk: the whole budget
    assert any(want < fresh for _, want, fresh in budgets[1:])  # later ones: less
    drive(s)
    check_done(s)


def test_parking_and_give_way_estimate_the_ttft_with_this_steps_prompt_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parking check runs before vLLM's step, with the prompt budget of the step about to
    run (as the simulator's), not the last step's: a step with no decodes has the whole budget,
    the next one, with four decodes, the TBT-bounded one."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.policies.ecoserve import EcoServeConfig

    cost = load_profile("llama3-8b-h100-80gb")
    monkeypatch.setenv("ECOSERVE_SLO_TBT", repr(cost.iteration_time(64, 64 * 32, 4, 4 * 40) / EcoServeConfig().iter_time_frac))
    monkeypatch.setenv("ECOSERVE_PROFILE", cost.name)
    monkeypatch.setenv("ECOSERVE_AMORTIZE", "0")  # the paced budget every step
    s = make(EcoServeVllmSyncScheduler, num_blocks=200)
    s.clock = lambda: 1.0
    seen: list[int] = []
    est = s._prefill_est_s
    monkeypatch.setattr(s, "_prefill_est_s", lambda r: seen.append(s._prefill_now) or est(r))
    for i in range(4):
        s.add_request(req(f"d{i}", 32, 60, arrival=0.0, rl_pred_tokens=60))
    out = s.schedule()
    assert s._prefill_now == 512  # nothing decoded: the whole budget
    s.update_from_output(out, fake_model_output(out, s, {f"d{i}": 60 for i in range(4)}))
    s.add_request(req("long", 1000, 8, arrival=1.0, rl_pred_tokens=8))
    seen.clear()
    out = s.schedule()
    assert seen and set(seen) == {out.num_scheduled_tokens["long"]} and seen[0] < 512 - 4


def test_auto_profile_is_the_served_model_on_this_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """ECOSERVE_PROFILE=auto builds the cost model from the engine's model config and the GPU
    vLLM's platform names; a platform that names none (this CPU machine), a GPU no shipped file
    describes, or more than one GPU is a one-line start-up error."""
    from vllm.platforms import current_platform

    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.vllm_scheduler import EcoServeSetupError, auto_cost_model

    def no_gpu(device_id: int = 0) -> str:
        raise RuntimeError("Found no NVIDIA driver on your system.\nPlease check ...")

    monkeypatch.setenv("ECOSERVE_PROFILE", "auto")
    monkeypatch.setattr(current_platform, "get_device_name", no_gpu)
    with pytest.raises(EcoServeSetupError, match="ECOSERVE_PROFILE=auto: vLLM's platform names no GPU") as e:
        make(EcoServeVllmSyncScheduler, num_blocks=200, dtype="bfloat16")
    assert "\n" not in str(e.value) and str(e.value).count("ecoserve calibrate") == 1
    monkeypatch.setattr(current_platform, "get_device_name", lambda device_id=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(current_platform, "get_device_total_memory", lambda device_id=0: 85520809984)
    s = make(EcoServeVllmSyncScheduler, num_blocks=200, dtype="bfloat16")
    cfg = s.vllm_config.model_config.hf_config
    assert s.cost_model.name.endswith("-h100-80gb")
    assert (s.cost_model.spec["model"]["hidden"], s.cost_model.spec["model"]["n_layers"]) == \
        (cfg.hidden_size, cfg.num_hidden_layers)
    h100 = load_profile("llama3-8b-h100-80gb").spec
    assert s.cost_model.spec["gpu"] == h100["gpu"] and s.cost_model.spec["efficiency"] == h100["efficiency"]
    with pytest.raises(EcoServeSetupError, match="no shipped GPU profile describes 'NVIDIA L4'"):
        auto_cost_model(s.vllm_config, ("NVIDIA L4", 24152899584))
    with pytest.raises(EcoServeSetupError, match="describes 'NVIDIA H100 80GB HBM3' with 20 GiB"):
        auto_cost_model(s.vllm_config, ("NVIDIA H100 80GB HBM3", 20 * 2**30))  # a MIG slice
    monkeypatch.setattr(s.vllm_config.cache_config, "cache_dtype", "fp8")
    with pytest.raises(EcoServeSetupError, match="KV cache is stored as fp8"):
        auto_cost_model(s.vllm_config)
    # an unquantized KV cache of the weights' width is the profile's (was: "bfloat16" refused)
    monkeypatch.setattr(s.vllm_config.cache_config, "cache_dtype", "bfloat16")
    assert auto_cost_model(s.vllm_config).name == s.cost_model.name
    monkeypatch.setattr(s.vllm_config.cache_config, "cache_dtype", "float32")
    with pytest.raises(EcoServeSetupError, match="KV cache is stored as"):
        auto_cost_model(s.vllm_config)
    monkeypatch.setattr(s.vllm_config.cache_config, "cache_dtype", "auto")
    # float32 weights (was: the 16-bit profile, under its name): the GPU files' peak is the
    # 16-bit tensor-core rate
    monkeypatch.setattr(s.vllm_config.model_config, "dtype", torch.float32)
    with pytest.raises(EcoServeSetupError, match="the weights are float32, and the shipped GPU files describe 16-bit"):
        auto_cost_model(s.vllm_config)
    monkeypatch.setattr(s.vllm_config.model_config, "dtype", torch.bfloat16)
    monkeypatch.setattr(s.vllm_config.parallel_config, "tensor_parallel_size", 2)
    with pytest.raises(EcoServeSetupError, match="runs on 2 GPUs"):
        auto_cost_model(s.vllm_config)


def test_a_request_recomputing_after_preemption_is_not_a_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TBT budget counts as decodes only requests with at most their last token left to
    compute: one re-prefilling prompt + generated tokens after a preemption (computed past its
    prompt, far from its end) is a prefill, as in the simulator."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.policies import ecoserve_rules as rules
    from ecoserve_sched.policies.ecoserve import EcoServeConfig

    monkeypatch.setenv("ECOSERVE_PROFILE", "llama3-8b-h100-80gb")
    monkeypatch.setenv("ECOSERVE_SLO_TBT", "0.02")  # tight: the budget binds, so the decode count shows
    s = make(EcoServeVllmSyncScheduler, num_blocks=200)
    cost, frac = load_profile("llama3-8b-h100-80gb"), EcoServeConfig().iter_time_frac
    budget = rules.PrefillBudget(cost.iteration_time, frac * 0.02, min(cost.token_budget, 512))

    def running(computed: int, prompt: int, tokens: int) -> SimpleNamespace:
        return SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=prompt, num_tokens=tokens,
                               num_tokens_with_spec=tokens, num_output_placeholders=0,
                               request_id=f"r{computed}")

    decodes = [running(99, 40, 100), running(300, 200, 301)]
    resumed = running(150, 40, 400)  # preempted after 360 outputs: 250 tokens still to recompute
    s.running = [*decodes, resumed]
    want, _ = budget(510, 2, 99 + 300)
    assert 2 + want < 512 and 2 + want != 3 + budget(509, 3, 99 + 300 + 150)[0]  # a miscount would show
    assert s._step_budget(512) == 2 + want
    s.running = decodes
    assert s._step_budget(512) == 2 + want


def test_a_profile_of_another_model_is_said_at_start(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A shipped profile (or a calibrated one) of another model than the one served still runs,
    but start-up says which fields differ (was: taken without a word)."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.vllm_scheduler import other_model

    monkeypatch.setenv("ECOSERVE_PROFILE", "llama3-8b-h100-80gb")
    with caplog.at_level("WARNING", logger="ecoserve_sched.engines.vllm_scheduler"):
        s = make(EcoServeVllmSyncScheduler, num_blocks=200)
    assert s.cost_model.name == "llama3-8b-h100-80gb"
    assert "describes another model than the one served (n_layers 32 vs" in caplog.text
    served = s.vllm_config.model_config.hf_config
    same = load_profile("llama3-8b-h100-80gb")
    same.spec = {**same.spec, "model": {**same.spec["model"], "n_layers": served.num_hidden_layers,
                 "hidden": served.hidden_size, "n_heads": served.num_attention_heads,
                 "n_kv_heads": served.num_key_value_heads, "head_dim": served.head_dim,
                 "intermediate": served.intermediate_size, "vocab": served.vocab_size, "dtype_bytes": 4}}
    assert other_model(same, s.vllm_config) == ""


def test_a_bad_profile_is_a_startup_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from ecoserve_sched.engines.vllm_scheduler import EcoServeSetupError

    monkeypatch.setenv("ECOSERVE_PROFILE", "no-such-gpu-profile")
    with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_PROFILE='no-such-gpu-profile'.*shipped: "):
        make(EcoServeVllmSyncScheduler)
    if hasattr(os, "mkfifo"):  # a named pipe (was: the read hung start-up)
        os.mkfifo(tmp_path / "p.json")
        monkeypatch.setenv("ECOSERVE_PROFILE", str(tmp_path / "p.json"))
        with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_PROFILE=.*not a regular file \(a pipe or a device\)"):
            make(EcoServeVllmSyncScheduler)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_a_max_tokens_past_the_models_length_is_reserved_as_the_length(cls: type) -> None:
    """vLLM ends a request at the model's length whatever its max_tokens, and so serves 10^6
    as it serves 236 here; the plug-in reserved 10^6 (or a client's larger hint) past the model's
    length, and admitted 2 requests at a time where it admitted 4 (and a hint of 1,000: 1)."""
    def run(max_tokens: int, **hint: int) -> tuple[int, int]:
        s = build_vllm_scheduler(cls, num_blocks=64, block_size=BS, max_num_seqs=16, max_num_batched_tokens=512,
                                 max_model_len=256, async_scheduling=issubclass(cls, EcoServeVllmScheduler))
        for i in range(8):
            s.add_request(req(f"r{i}", 20, max_tokens, arrival=0.001 * i, **hint))
        most = 0
        outs = drive(s)
        for out in outs:
            most = max(most, len(out.num_scheduled_tokens))
        check_done(s)
        return len(outs), most

    assert run(10**6) == run(236) and run(10**6, rl_pred_tokens=1000, rl_reserve_tokens=1000) == run(236)


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_every_request_finishes_under_a_tbt_budget(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECOSERVE_PROFILE", "llama3-8b-h100-80gb")
    monkeypatch.setenv("ECOSERVE_SLO_TBT", "0.02")  # tight: most steps with decodes get the knee only
    s = make(cls, num_blocks=200)
    for i in range(10):
        s.add_request(req(str(i), 300 + 40 * i, 30 + 5 * i, arrival=0.01 * i, rl_pred_tokens=40))
    outs = drive(s)
    check_done(s)
    assert s.max_num_scheduled_tokens == 512
    assert max(sum(o.num_scheduled_tokens.values()) for o in outs) <= 512


@pytest.mark.parametrize("spare", [0, 1])
def test_a_victim_vllm_would_not_reach_is_preempted_only_while_short_of_its_blocks(spare: int) -> None:
    """Two 16-token prompts have run; each needs a new block for its next token. The step's
    budget is one token, which the first takes, so vLLM's loop would not reach the second, a
    victim (``_gone``, last in ``running``) whose chunk the search counted at 17 tokens (two
    new blocks). It is preempted before vLLM's loop if the block the first takes leaves it short
    of those two (``spare`` 0: 2 free), as the simulator preempts it, and stays, as vLLM would
    leave it, if not (``spare`` 1: 3 free)."""
    s = make(EcoServeVllmSyncScheduler, num_blocks=4 + spare)
    s.eco_cfg = EcoServeVllmConfig(trust_client_hints=True, park=False)
    for rid in ("a", "b"):
        s.add_request(req(rid, 16, 8, rl_pred_tokens=8, rl_reserve_tokens=8))
    out = s.schedule()  # both prompts, one block each
    s.update_from_output(out, fake_model_output(out, s, {"a": 8, "b": 8}))
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 2 + spare
    first, victim = s.running
    s._gone, s._charged = {victim.request_id: victim}, {victim.request_id: 17}
    s._preempt_unreached(1)
    assert s.running == ([first] if spare == 0 else [first, victim])
    assert (victim.status == RequestStatus.PREEMPTED) == (spare == 0)


def test_a_prompt_that_is_its_own_victim_is_preempted_before_vllms_loop() -> None:
    """P, 77 tokens into a 300-token prompt, has the largest victim key; Q is ahead of it, no
    block is free and the step's budget is 4 tokens, which Q takes. The search preempts P for
    its own chunk's blocks (it charges P no tokens); the plug-in judged P's need by one token,
    found it "not short" and left it neither scheduled nor preempted (a reviewer's case). It is
    preempted now, as the simulator preempts it, and nothing is admitted in that step."""
    s = build_vllm_scheduler(EcoServeVllmSyncScheduler, num_blocks=200, block_size=BS, max_num_seqs=16,
                             max_num_batched_tokens=97, max_model_len=2048)
    s.eco_cfg = EcoServeVllmConfig(trust_client_hints=True, park=False)
    s.scheduler_config.long_prefill_token_threshold = 77
    s.add_request(req("P", 300, 600, rl_pred_tokens=5, rl_reserve_tokens=500))
    s.add_request(req("Q", 300, 50, rl_pred_tokens=50, rl_reserve_tokens=50))
    out = s.schedule()
    assert dict(out.num_scheduled_tokens) == {"P": 77, "Q": 20}
    s.update_from_output(out, fake_model_output(out, s, {"P": 600, "Q": 50}))
    s.scheduler_config.long_prefill_token_threshold = 0
    s.max_num_scheduled_tokens = 4
    pool = s.kv_cache_manager.block_pool
    pool.get_new_blocks(pool.get_num_free_blocks())  # no block free
    s.add_request(req("R", 4, 4, rl_pred_tokens=4, rl_reserve_tokens=4))  # waits: nothing is admitted
    out = s.schedule()
    assert dict(out.num_scheduled_tokens) == {"Q": 4} and out.preempted_req_ids == {"P"}
    assert s.requests["P"].status == RequestStatus.PREEMPTED and s.requests["R"].status == RequestStatus.WAITING
    # where vLLM's loop spent less than the plug-in counted, its waiting loop would run: the
    # admission test refuses for the rest of the step, as vLLM admits nothing after a preemption
    assert s._hold and s._allocate_slots(s.requests["R"], 4) is None
