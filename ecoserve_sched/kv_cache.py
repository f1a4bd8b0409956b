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

**Lazy on-demand growth** (``grow``): a decoding request that takes one block each time its
context crosses a block boundary need not be handed each block. While it *grows*, it owns
``blocks_for(x + s + 1)`` blocks once the steps up to ``s`` are applied (``x + s``: its context
after step ``s``), and ``advance(t)`` applies the growth of every grower through step ``t`` in
one subtraction from the free pool: growers are grouped by ``x mod block_size`` (a group crosses
a boundary every ``block_size`` steps), so the blocks they take in any run of steps, and a step
by which the free pool may not cover them (``growth_limit``), cost O(``block_size``).
``free_blocks`` is exact through ``grown_step``; a grower's ``Alloc.own`` is brought up to date
when read (``usable``, ``owned``, ``check``) or when it stops growing (``stop_growing``,
``release``, ``take_due``: the group crossing at a step where the pool runs dry leaves, to take
its blocks one request at a time). Blocks of a grower change only through these.

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
        self.grown_step = 0  # growers' growth is applied through this step (module docstring)
        self.growers: dict[int, int] = {}  # rid -> x (its context after step s is x + s); read-only
        self._groups: list[dict[int, int]] = [{} for _ in range(block_size)]  # growers by x % block_size

    # ---- queries ------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def usable(self, rid: int) -> int:
        a = self.allocs.get(rid)
        if a is None:
            return 0
        if rid in self.growers:
            self._sync_own(rid)
        return a.usable

    def owned(self, rid: int) -> int:
        a = self.allocs.get(rid)
        if a is None:
            return 0
        if rid in self.growers:
            self._sync_own(rid)
        return a.own

    def lendable(self, rid: int, keep: int) -> int:
        """Blocks ``rid`` can lend if it needs ``keep`` blocks itself for the loan's duration
        (none while it grows lazily)."""
        a = self.allocs.get(rid)
        if a is None or a.borrowed or rid in self.growers:
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

    def growth(self, t: int) -> int:
        """Blocks the growers take in steps ``grown_step + 1 .. t``."""
        k = t - self.grown_step
        if k <= 0 or not self.growers:
            return 0
        bs, groups = self.block_size, self._groups
        if k == 1:  # a group crosses at step s when (x + s) % bs == 0
            return len(groups[-t % bs])
        full, rem = divmod(k, bs)
        n = full * len(self.growers)
        for s in range(t - rem + 1, t + 1):
            n += len(groups[-s % bs])
        return n

    def growth_limit(self, keep_free: int = 0) -> int:
        """A step by which the growth may outrun the free pool less ``keep_free`` (1 << 62
        without growers): the first step it does if that is within ``block_size`` steps, else
        the step after the last whole cycle of ``block_size`` steps the pool covers (every
        grower crosses once a cycle), which is earlier but O(1), and usually far enough."""
        n = len(self.growers)
        if not n:
            return 1 << 62
        free = self.free_blocks - keep_free
        if free >= n:
            return self.grown_step + free // n * self.block_size + 1
        if free < 0:
            return self.grown_step + 1
        bs, groups = self.block_size, self._groups
        s, need = self.grown_step, 0
        while need <= free:
            s += 1
            need += len(groups[-s % bs])
        return s

    def held_blocks(self, t: int) -> int:
        """The sum, over steps ``s`` in ``[grown_step, t)``, of the allocated blocks once the growth
        through ``s`` is applied (applies nothing): block-steps of a run of decode-only steps."""
        s0, bs, groups = self.grown_step, self.block_size, self._groups
        if t <= s0:
            return 0
        total = (t - s0) * (self.num_blocks - self.free_blocks)
        if not self.growers:
            return total
        if t - s0 <= bs:  # each step's crossings, held to t
            for u in range(s0 + 1, t):
                total += len(groups[-u % bs]) * (t - u)
            return total
        for j, g in enumerate(groups):
            if g:
                u = s0 + 1 + (-j - s0 - 1) % bs  # the group's first crossing after s0
                if u < t:
                    m = (t - 1 - u) // bs + 1  # crossings at u, u + bs, ... < t; each held to t
                    total += len(g) * (m * (t - u) - bs * m * (m - 1) // 2)
        return total

    def run_steps(self, t: int) -> int:
        """Steps ``grown_step`` to ``t - 1`` ran without alarms: apply their growth (through
        ``t - 1``) and return their ``held_blocks``."""
        s0 = self.grown_step
        if t <= s0:
            return 0
        if not self.growers:
            self.grown_step = t - 1
            return (t - s0) * (self.num_blocks - self.free_blocks)
        held = self.held_blocks(t)
        if not self.advance(t - 1):
            raise AssertionError(f"growth through step {t - 1} overruns the free pool")
        return held

    # ---- changes ------------------------------------------------------------------------------
    def allocate(self, rid: int, n: int, keep_free: int = 0) -> bool:
        """Give ``rid`` ``n`` more blocks from the pool, leaving at least ``keep_free`` free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.free_blocks - keep_free:
            return False
        if rid in self.growers:
            self._not_growing(rid)
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
        self._not_growing(rid)
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

    def grow(self, rid: int, x: int) -> bool:
        """Let ``rid``, whose context after step ``s`` is ``x + s``, grow lazily from now on
        (module docstring), if it owns exactly the blocks that implies at ``grown_step`` and has
        no loans; else False."""
        a = self.allocs.get(rid)
        if (a is None or a.lent or a.borrowed or rid in self.growers
                or a.own != self.blocks_for(x + self.grown_step + 1)):
            return False
        self.growers[rid] = x
        self._groups[x % self.block_size][rid] = x
        return True

    def advance(self, t: int, keep_free: int = 0) -> bool:
        """Apply the growth through step ``t``; False (nothing changes) if the free pool cannot
        cover it leaving ``keep_free`` blocks."""
        n = self.growth(t)
        if n > self.free_blocks - keep_free:
            return False
        self.free_blocks -= n
        if t > self.grown_step:
            self.grown_step = t
        return True

    def take_due(self, t: int) -> list[int]:
        """Apply the growth through step ``t - 1``, then stop the growth of the growers that
        cross a block boundary at step ``t`` (each owning its blocks before the crossing: the
        caller gives them their block one at a time) and return them; the others' growth is
        then applied through ``t`` (they take nothing at ``t``)."""
        if t <= self.grown_step:
            raise ValueError(f"growth through step {t} is already applied")
        if not self.advance(t - 1):
            raise AssertionError(f"growth through step {t - 1} overruns the free pool")
        j = -t % self.block_size
        group, self._groups[j] = self._groups[j], {}
        growers, allocs = self.growers, self.allocs
        for rid, x in group.items():
            del growers[rid]
            allocs[rid].own = self.blocks_for(x + t)
        self.grown_step = t
        return list(group)

    def stop_growing(self, rid: int) -> None:
        """End ``rid``'s lazy growth (if any): it keeps the blocks it owns at ``grown_step``."""
        x = self.growers.pop(rid, None)
        if x is not None:
            del self._groups[x % self.block_size][rid]
            self.allocs[rid].own = self.blocks_for(x + self.grown_step + 1)

    def _sync_own(self, rid: int) -> None:
        """Bring grower ``rid``'s ``Alloc.own`` up to date (it keeps growing)."""
        self.allocs[rid].own = self.blocks_for(self.growers[rid] + self.grown_step + 1)

    def _not_growing(self, rid: int) -> None:
        if rid in self.growers:
            raise ValueError(f"request {rid} grows lazily: stop_growing first")

    def release(self, rid: int) -> int:
        """Free everything ``rid`` holds (finish or preemption); returns blocks back in the pool."""
        if rid in self.growers:
            self.stop_growing(rid)
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
        for rid in self.growers:
            self._sync_own(rid)
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
