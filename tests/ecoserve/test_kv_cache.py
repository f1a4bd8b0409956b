"""KV block accounting: unit checks and property tests over random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoserve_sched.kv_cache import KVCacheManager


def test_allocate_respects_capacity_and_keep_free():
    kv = KVCacheManager(10, block_size=16)
    assert kv.blocks_for(1) == 1 and kv.blocks_for(16) == 1 and kv.blocks_for(17) == 2
    assert kv.allocate(1, 8, keep_free=2)
    assert not kv.allocate(2, 1, keep_free=2)
    assert kv.allocate(2, 2)
    assert not kv.allocate(3, 1)
    kv.check()
    assert kv.release(1) == 8 and kv.release(2) == 2 and kv.free_blocks == 10


def test_check_holds_each_request_to_its_blocks():
    kv = KVCacheManager(10)
    kv.allocate(1, 8)
    kv.check({1: 8})
    with pytest.raises(AssertionError):
        kv.check({1: 9})  # a request may not use more blocks than it owns
    with pytest.raises(AssertionError):
        kv.check({2: 1})  # nor one that owns none
    assert kv.release(1) == 8 and kv.release(1) == 0  # a second release frees nothing
    kv.check()


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "release"]), st.integers(0, 7), st.integers(0, 12)),
               min_size=1, max_size=60)


@settings(max_examples=2000, deadline=None)
@given(n_blocks=st.integers(1, 40), ops=OPS)
def test_random_operation_sequences_keep_invariants(n_blocks, ops):
    kv = KVCacheManager(n_blocks)
    for op, a, n in ops:
        if op == "alloc":
            free, held = kv.free_blocks, kv.owned(a)
            ok = kv.allocate(a, n)
            assert ok == (n <= free)
            assert kv.owned(a) == held + (n if ok else 0) and kv.free_blocks == free - (n if ok else 0)
        else:
            free, held = kv.free_blocks, kv.owned(a)
            assert kv.release(a) == held and kv.free_blocks == free + held
        kv.check({rid: al.own for rid, al in kv.allocs.items()})
    for rid in list(kv.allocs):
        kv.release(rid)
        kv.check()
    assert kv.free_blocks == n_blocks and not kv.allocs
