"""Lazy on-demand block growth (``KVCacheManager.grow``, ``Scheduler.lazy_blocks``): the same
blocks at the same steps, the same preemptions and the same iteration log as one alarm per
request per block."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sim_helpers import FlatCost, make_req

from ecoserve_sched.kv_cache import KVCacheManager
from ecoserve_sched.policies import get_policy
from ecoserve_sched.policies.base import GROWING
from ecoserve_sched.simulator import simulate

ON_DEMAND = ("vllm", "sarathi", "sjf", "orca", "vllm-v0", "ecoserve", "ecoserve-oracle", "ecoserve-latest")


def _run(policy: str, rows, blocks: int, *, lazy: bool = True, stepwise: bool = False, check: bool = False,
         swap: bool = False, bs: int = 4, budget: int = 64, easy_calls: list | None = None):
    """Replay ``rows`` (arrival, prompt, output[, prediction]); returns the requests, the policy,
    the result and the (step, victim) of every preemption (``easy_calls`` collects the requests
    of the easy alarms handled)."""
    reqs = [make_req(i, row[0], row[1], row[2], pred=row[3] if len(row) > 3 else None, max_tokens=max(row[2], 64))
            for i, row in enumerate(rows)]
    cost = FlatCost(blocks=blocks, iter_s=0.01)
    cost.iteration_time = lambda p, pc, d, dc: 0.01 + 1e-6 * p + 1e-7 * dc  # grows with context
    if swap:
        cost.swap_time = lambda t: 1e-9 * t
    sched = get_policy(policy, cost, block_size=bs, max_running=6, token_budget=budget)
    assert sched.lazy_blocks
    sched.lazy_blocks = lazy
    victims: list[tuple[int, int]] = []
    preempt = sched.preempt

    def spy(r, now):
        victims.append((sched.step, r.rid))
        preempt(r, now)

    sched.preempt = spy
    if easy_calls is not None:
        easy = sched.easy_alarm

        def count(r):
            easy_calls.append(r.rid)
            return easy(r)

        sched.easy_alarm = count
    res = simulate(reqs, sched, stepwise=stepwise, check=check)
    return reqs, sched, res, victims


def _times(reqs):
    return [(r.first_token_s, r.finish_s, r.generated, r.preemptions, r.state) for r in reqs]


# ---- the block pool ---------------------------------------------------------------------------
def test_growth_is_one_block_per_boundary_crossing():
    kv = KVCacheManager(20, block_size=4)
    kv.allocate(0, 2)  # KV after step s: 5 + s tokens, so 6 at step 0 needs 2 blocks
    kv.allocate(1, 1)  # KV after step s: 2 + s tokens, so 3 at step 0 needs 1 block
    assert kv.grow(0, 5) and kv.grow(1, 2)
    assert not kv.grow(0, 5)  # already growing
    kv.allocate(2, 3)
    assert not kv.grow(2, 0)  # owns more than its context needs: keeps a heap alarm
    # crossings: request 0 at steps 3, 7, 11 (5 + s a multiple of 4), request 1 at 2, 6, 10
    assert [kv.growth(t) for t in range(1, 8)] == [0, 1, 2, 2, 2, 3, 4]
    free = kv.free_blocks  # 20 - 2 - 1 - 3
    # 7 whole cycles of 4 steps are covered (one crossing each per cycle): ask again at step 29
    # (the pool runs dry at 30, request 1's eighth crossing)
    assert free == 14 and kv.growth_limit() == 29
    # block-steps of steps 0..5 once each step's growth is applied: 6, 6, 7, 8, 8, 8 held
    assert kv.held_blocks(6) == 6 * 6 + 1 * 4 + 1 * 3
    assert kv.held_blocks(40) == sum(6 + kv.growth(s) for s in range(40))  # the long-run formula
    assert kv.advance(6) and kv.free_blocks == free - 3 and kv.grown_step == 6
    assert kv.owned(0) == 3 and kv.owned(1) == 3  # brought up to date when read
    kv.check({0: 3, 1: 3})
    assert kv.run_steps(7) == 9 and kv.grown_step == 6  # step 6 ran (no crossing at 7 applied)
    assert kv.take_due(7) == [0] and kv.owned(0) == 3  # its step-7 block is the caller's to give
    assert kv.grown_step == 7 and kv.free_blocks == free - 3
    kv.stop_growing(1)  # KV of 10 tokens after step 7
    assert kv.owned(1) == 3 and kv.release(1) == 3 and kv.release(0) == 3
    kv.check()


def test_advance_refuses_growth_beyond_the_free_pool():
    kv = KVCacheManager(4, block_size=4)
    kv.allocate(0, 1)
    kv.allocate(1, 1)
    assert kv.grow(0, 0) and kv.grow(1, 0)  # both cross at steps 4, 8, ...
    assert kv.growth_limit() == 5  # one whole cycle covered (step 4 takes the last 2 blocks)
    assert not kv.advance(8) and kv.grown_step == 0 and kv.free_blocks == 2
    assert kv.advance(5) and kv.free_blocks == 0
    assert kv.growth_limit() == 8 and kv.growth_limit(keep_free=1) == 6  # exact within a cycle
    assert kv.advance(7) and not kv.advance(8) and kv.grown_step == 7


# ---- hand-checked replays where the pool runs dry in a decode-only stretch -------------------
def test_pool_runs_dry_mid_stretch_vllm_preempts_the_latest_at_the_same_step():
    """Three 4-token prompts in 7 blocks of 4: step 0 prefills them (one block each), step 1
    computes each one's first sampled token and gives it its second block (KV of 5 tokens); all
    three cross a boundary again at step 5 (KV of 9), where only one block is free: request 0
    takes it, request 1 finds none, and vLLM preempts the latest admitted, request 2, whose two
    blocks let request 1 grow."""
    rows = [(0.0, 4, 20), (0.0, 4, 20), (0.0, 4, 20)]
    runs = [_run("vllm", rows, 7, lazy=lazy, stepwise=stepwise) for lazy in (True, False) for stepwise in (False, True)]
    for _, _, _, victims in runs:
        assert victims[0] == (5, 2)
    assert len({repr((_times(reqs), victims)) for reqs, _, _, victims in runs}) == 1
    assert runs[0][2].log == runs[2][2].log  # fast path: the same rows with and without lazy growth
    assert runs[1][2].log == runs[3][2].log  # stepwise too


def test_growers_cross_at_their_own_steps():
    """KV of 5 and 7 tokens after step 1 (prompts 4 and 6): request 1 crosses a block boundary
    at steps 3, 7, 11 and request 0 at 5, 9, 13. Of 7 blocks, 3 are free after step 1 and steps
    3, 5 and 7 take them: at step 9 request 0 finds the pool empty and vLLM preempts the latest
    admitted, request 1."""
    rows = [(0.0, 4, 20), (0.0, 6, 20)]
    runs = [_run("vllm", rows, 7, lazy=lazy, stepwise=stepwise) for lazy in (True, False) for stepwise in (False, True)]
    for _, _, _, victims in runs:
        assert victims[0] == (9, 1)
    assert len({repr((_times(reqs), victims)) for reqs, _, _, victims in runs}) == 1
    assert runs[0][2].log == runs[2][2].log


def test_sjf_victim_and_self_preemption_match():
    """SJF preempts the longest predicted remaining work (request 0 here, predicted 90 tokens)
    when request 1 is refused a block at step 5; with equal predictions it would be the latest."""
    rows = [(0.0, 4, 20, 90), (0.0, 4, 20, 10), (0.0, 4, 20, 10)]
    runs = [_run("sjf", rows, 7, lazy=lazy, stepwise=stepwise) for lazy in (True, False) for stepwise in (False, True)]
    for _, _, _, victims in runs:
        assert victims[0] == (5, 0)
    assert len({repr((_times(reqs), victims)) for reqs, _, _, victims in runs}) == 1


def test_lazy_growth_replaces_per_block_alarms():
    """Without pool pressure every request grows lazily from the start (its prompt's blocks are
    exactly what its KV needs, a full one included), where one alarm per block takes over 140
    alarms. The log is the same."""
    rows = [(0.0, 4, 200), (0.0, 9, 200), (0.0, 14, 200)]
    lazy_calls: list[int] = []
    eager_calls: list[int] = []
    lazy = _run("vllm", rows, 200, easy_calls=lazy_calls)
    eager = _run("vllm", rows, 200, lazy=False, easy_calls=eager_calls)
    assert lazy_calls == [] and len(eager_calls) > 140
    assert lazy[2].log == eager[2].log and not lazy[3]


def test_a_growing_request_has_no_heap_alarm():
    rows = [(0.0, 4, 50), (0.0, 5, 50)]
    reqs = [make_req(i, a, p, o, max_tokens=64) for i, (a, p, o) in enumerate(rows)]
    sched = get_policy("vllm", FlatCost(blocks=40), block_size=4, max_running=6, token_budget=64)
    for r in reqs:
        sched.add(r, 0.0)
    batch = sched.schedule(0.0)
    sched.complete(batch, 0.01)
    assert sched.decode_only_step()
    assert all(r.alarm_step == GROWING for r in reqs) and not sched._alarms
    assert sched.next_alarm_step() == sched.kv.growth_limit() > 10


# ---- random traces ----------------------------------------------------------------------------
REQ = st.tuples(st.floats(0, 2.0), st.integers(1, 60), st.integers(1, 80), st.integers(1, 120))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(REQ, min_size=1, max_size=20), blocks=st.integers(12, 80),
       policy=st.sampled_from(ON_DEMAND), swap=st.booleans(), bs=st.sampled_from((1, 2, 4, 16)))
def test_lazy_growth_changes_no_decision(rows, blocks, policy, swap, bs):
    """Fast path with lazy growth (KV checked every iteration) == fast path with per-block alarms
    (the same log, row for row) == ``stepwise`` with per-block alarms (the reference)."""
    if bs == 16:
        blocks = max(4, blocks // 4)
    assume(not (policy == "vllm-v0" and bs == 1))  # refused: its first decode needed two blocks
    lazy = _run(policy, rows, blocks, check=True, swap=swap, bs=bs)
    eager = _run(policy, rows, blocks, lazy=False, swap=swap, bs=bs)
    ref = _run(policy, rows, blocks, lazy=False, stepwise=True, swap=swap, bs=bs)
    assert _times(lazy[0]) == _times(eager[0]) == _times(ref[0])
    assert lazy[3] == eager[3] == ref[3]  # the same victims at the same steps
    assert lazy[2].log == eager[2].log
    assert lazy[2].counters == eager[2].counters == ref[2].counters
    assert lazy[2].stall_gaps == ref[2].stall_gaps
    assert lazy[1].kv.free_blocks == blocks and not lazy[1].kv.allocs
