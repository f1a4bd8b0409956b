"""Paged KV-cache block accounting: the one place where blocks change hands.

Every block is either in the free pool or *owned* by exactly one request. A running request's
*usable* blocks are ``own - lent + borrowed``:

- **Reservation** ("exact allocation"): a policy asks for ``blocks_for(prompt + R)`` blocks up
  front with ``allocate``; on-demand policies (vLLM) ask for one block at a time.
- **KVC pipelining**: a lender lends unused tail blocks of its reservation to one borrower
  (``borrow``). The blocks stay owned by the lender; the policy only lends blocks the lender will
  not reach before the borrower is predicted to finish, plus a margin. When the lender comes close
  to them, the loan is *settled* (``settle``): the borrower takes the same number of blocks from
  the free pool, or the policy preempts someone. A lender never borrows and a borrower never
  lends, so a loan is one edge between two requests.
- **Release** (finish or preemption): owned blocks go back to the pool, except blocks lent out,
  whose ownership passes to their borrowers (who are still using them); borrowed blocks go back
  to their lender's unlent tail.

Invariants (``check``): ``free + sum(own) == num_blocks`` (nothing over-allocated, nothing
leaked), ``0 <= lent <= own``, loans are consistent on both sides, and, given each request's
current KV length, ``used <= own - lent + borrowed`` (a request fits its blocks; in particular a
lender is never starved of its reservation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Alloc:
    own: int = 0
    lent: int = 0  # owned blocks currently lent out
    borrowed: int = 0
    lender: int = -1  # rid of the lender while borrowed > 0
    borrowers: dict[int, int] = field(default_factory=dict)  # lender side: rid -> blocks

    @property
    def usable(self) -> int:
        return self.own - self.lent + self.borrowed


class KVCacheManager:
    """Block pool with reservations, loans (KVC pipelining) and release."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = num_blocks
        self.allocs: dict[int, Alloc] = {}
        self.loans = 0  # loans made (KVC pipelining events)
        self.loaned_blocks = 0
        self.settlements = 0  # loans turned into owned blocks before the lender needed them

    # ---- queries ------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def usable(self, rid: int) -> int:
        a = self.allocs.get(rid)
        return a.usable if a is not None else 0

    def owned(self, rid: int) -> int:
        a = self.allocs.get(rid)
        return a.own if a is not None else 0

    def lendable(self, rid: int, keep: int) -> int:
        """Blocks ``rid`` can lend if it needs ``keep`` blocks itself for the loan's duration."""
        a = self.allocs.get(rid)
        if a is None or a.borrowed:
            return 0
        return max(0, a.own - a.lent - keep)

    def is_borrower(self, rid: int) -> bool:
        a = self.allocs.get(rid)
        return a is not None and a.borrowed > 0

    def loans_of(self, rid: int) -> dict[int, int]:
        """Borrowers of ``rid`` and the blocks each holds (empty if none)."""
        a = self.allocs.get(rid)
        return a.borrowers if a is not None else {}

    @property
    def allocated_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    # ---- changes ------------------------------------------------------------------------------
    def allocate(self, rid: int, n: int, keep_free: int = 0) -> bool:
        """Give ``rid`` ``n`` more blocks from the pool, leaving at least ``keep_free`` free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.free_blocks - keep_free:
            return False
        a = self.allocs.get(rid)
        if a is None:
            a = self.allocs[rid] = Alloc()
        a.own += n
        self.free_blocks -= n
        return True

    def borrow(self, rid: int, lender: int, n: int, lender_keep: int) -> bool:
        """Lend ``n`` of ``lender``'s unused tail blocks to ``rid`` (see module docstring)."""
        if n <= 0 or rid == lender or n > self.lendable(lender, lender_keep):
            return False
        a = self.allocs.get(rid)
        if a is None:
            a = self.allocs[rid] = Alloc()
        if a.borrowers or (a.borrowed and a.lender != lender):
            return False  # a lender does not borrow; one lender per borrower
        la = self.allocs[lender]
        la.lent += n
        la.borrowers[rid] = la.borrowers.get(rid, 0) + n
        a.borrowed += n
        a.lender = lender
        self.loans += 1
        self.loaned_blocks += n
        return True

    def settle(self, rid: int) -> bool:
        """Replace ``rid``'s borrowed blocks by blocks from the free pool; False if too few."""
        a = self.allocs.get(rid)
        if a is None or a.borrowed == 0:
            return True
        if a.borrowed > self.free_blocks:
            return False
        self.free_blocks -= a.borrowed
        a.own += a.borrowed
        self._return_loan(rid, a)
        self.settlements += 1
        return True

    def release(self, rid: int) -> int:
        """Free everything ``rid`` holds (finish or preemption); returns blocks back in the pool."""
        a = self.allocs.pop(rid, None)
        if a is None:
            return 0
        if a.borrowed:
            self._return_loan(rid, a)
        for b, n in a.borrowers.items():  # lent blocks now belong to their users
            ba = self.allocs[b]
            ba.borrowed -= n
            ba.own += n
            a.own -= n
            if ba.borrowed == 0:
                ba.lender = -1
        self.free_blocks += a.own
        return a.own

    def _return_loan(self, rid: int, a: Alloc) -> None:
        la = self.allocs[a.lender]
        la.lent -= a.borrowed
        del la.borrowers[rid]
        a.borrowed = 0
        a.lender = -1

    # ---- invariants ---------------------------------------------------------------------------
    def check(self, used: Mapping[int, int] | None = None) -> None:
        """Raise AssertionError if block accounting is inconsistent.

        ``used`` maps request id to the blocks its KV occupies right now.
        """
        own = sum(a.own for a in self.allocs.values())
        assert 0 <= self.free_blocks <= self.num_blocks, f"free={self.free_blocks}"
        assert self.free_blocks + own == self.num_blocks, (
            f"leak/over-allocation: free {self.free_blocks} + owned {own} != {self.num_blocks}")
        lent = borrowed = 0
        for rid, a in self.allocs.items():
            assert 0 <= a.lent <= a.own and a.borrowed >= 0, f"request {rid}: {a}"
            assert not (a.borrowed and a.borrowers), f"request {rid} both lends and borrows"
            assert a.lent == sum(a.borrowers.values()), f"request {rid}: lent {a.lent} != {a.borrowers}"
            for b, n in a.borrowers.items():
                ba = self.allocs[b]
                assert n > 0 and ba.lender == rid and ba.borrowed == n, f"loan {rid}->{b} inconsistent"
            assert (a.borrowed > 0) == (a.lender >= 0), f"request {rid}: lender {a.lender}"
            lent += a.lent
            borrowed += a.borrowed
        assert lent == borrowed, f"lent {lent} != borrowed {borrowed}"
        if used is not None:
            for rid, u in used.items():
                assert u <= self.usable(rid), f"request {rid} uses {u} blocks but may use {self.usable(rid)}"
