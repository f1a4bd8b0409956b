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


def test_loan_returns_to_lender_when_borrower_ends():
    kv = KVCacheManager(10)
    kv.allocate(1, 8)
    assert kv.borrow(2, 1, 5, lender_keep=3)
    assert kv.usable(1) == 3 and kv.usable(2) == 5 and kv.free_blocks == 2
    kv.check({1: 3, 2: 5})
    with pytest.raises(AssertionError):
        kv.check({1: 4})  # the lender may not grow into lent blocks
    assert kv.release(2) == 0  # borrowed blocks go back to the lender, not the pool
    assert kv.usable(1) == 8
    kv.check()


def test_lender_release_hands_lent_blocks_to_borrower():
    kv = KVCacheManager(10)
    kv.allocate(1, 8)
    kv.borrow(2, 1, 4, lender_keep=2)
    assert kv.release(1) == 4
    assert kv.owned(2) == 4 and kv.usable(2) == 4 and not kv.is_borrower(2)
    kv.check({2: 4})
    kv.release(2)
    assert kv.free_blocks == 10


def test_settle_and_refusals():
    kv = KVCacheManager(10)
    kv.allocate(1, 6)
    assert not kv.borrow(2, 1, 5, lender_keep=2)  # only 4 lendable
    assert kv.borrow(2, 1, 4, lender_keep=2)
    assert not kv.borrow(1, 2, 1, lender_keep=0)  # a borrower does not lend
    assert not kv.borrow(3, 1, 1, lender_keep=2)  # the rest of 1's tail is needed by 1
    assert kv.settle(2) and kv.owned(2) == 4 and kv.usable(1) == 6
    assert kv.owned(2) == 4 and kv.settle(2) and kv.owned(2) == 4  # nothing left to settle: a no-op
    kv.check()


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "borrow", "settle", "release"]),
                         st.integers(0, 7), st.integers(0, 7), st.integers(0, 12)),
               min_size=1, max_size=60)


@settings(max_examples=2000, deadline=None)
@given(n_blocks=st.integers(1, 40), ops=OPS)
def test_random_operation_sequences_keep_invariants(n_blocks, ops):
    kv = KVCacheManager(n_blocks)
    for op, a, b, n in ops:
        if op == "alloc":
            ok = kv.allocate(a, n)
            assert ok == (n <= kv.free_blocks + (n if ok else 0))
        elif op == "borrow":
            before = kv.lendable(b, 0)
            if kv.borrow(a, b, n, lender_keep=0):
                assert n <= before
        elif op == "settle":
            kv.settle(a)
        else:
            kv.release(a)
        kv.check()
    for rid in list(kv.allocs):
        kv.release(rid)
        kv.check()
    assert kv.free_blocks == n_blocks and not kv.allocs
