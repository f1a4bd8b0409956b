"""Paged KV-cache block accounting: the one place where blocks change hands.

Every block is either in the free pool or *owned* by exactly one request:

- **Reservation** ("exact allocation"): a policy asks for ``blocks_for(prompt + R)`` blocks up
  front with ``allocate``; on-demand policies (vLLM, EcoServe) ask for each prefill chunk's
  blocks as the chunk is scheduled, then for one block at a time.
- **Release** (finish or preemption): a request's blocks go back to the pool.

KV-cache pipelining is not done here: EcoServe overlaps reservations in its admission test
(``policies/ecoserve_rules.Projection``), with blocks taken on demand. Physical loans of a
reservation's unused tail to another request (the paper's mechanism, and this manager's until
December 2026) were taken out once no policy took them (docs/scheduler.md).

**Lazy on-demand growth** (``grow``): a decoding request that takes one block each time its
context crosses a block boundary need not be handed each block. While it *grows*, it owns
``blocks_for(x + s + 1)`` blocks once the steps up to ``s`` are applied (``x + s``: the tokens
whose KV it holds after step ``s``, its context less the token sampled last), and
``advance(t)`` applies the growth of every grower through step ``t`` in one subtraction from the
free pool: growers are grouped by ``x mod block_size`` (a group crosses a boundary every
``block_size`` steps), so the blocks they take in any run of steps, and a step by which the free
pool may not cover them (``growth_limit``), cost O(``block_size``).
``free_blocks`` is exact through ``grown_step``; a grower's ``Alloc.own`` is brought up to date
when read (``owned``, ``check``) or when it stops growing (``stop_growing``,
``release``, ``take_due``: the group crossing at a step where the pool runs dry leaves, to take
its blocks one request at a time). Blocks of a grower change only through these.

Invariants (``check``): ``free + sum(own) == num_blocks`` (nothing over-allocated, nothing
leaked), ``own >= 0``, and, given each request's current KV length, ``used <= own`` (a request
fits its blocks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class Alloc:
    own: int = 0  # blocks the request holds (a grower's: as of ``grown_step``, when synced)


class KVCacheManager:
    """Block pool with reservations, on-demand and lazy growth, and release."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = num_blocks
        self.allocs: dict[int, Alloc] = {}
        self.grown_step = 0  # growers' growth is applied through this step (module docstring)
        self.growers: dict[int, int] = {}  # rid -> x (its KV after step s is x + s tokens); read-only
        self._groups: list[dict[int, int]] = [{} for _ in range(block_size)]  # growers by x % block_size

    # ---- queries ------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def owned(self, rid: int) -> int:
        a = self.allocs.get(rid)
        if a is None:
            return 0
        if rid in self.growers:
            self._sync_own(rid)
        return a.own

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

    def grow(self, rid: int, x: int) -> bool:
        """Let ``rid``, whose KV after step ``s`` holds ``x + s`` tokens, grow lazily from now on
        (module docstring), if it owns exactly the blocks that implies at ``grown_step``; else
        False."""
        a = self.allocs.get(rid)
        if a is None or rid in self.growers or a.own != self.blocks_for(x + self.grown_step + 1):
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
        self.free_blocks += a.own
        return a.own

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
        for rid, a in self.allocs.items():
            assert a.own >= 0, f"request {rid}: {a}"
        if used is not None:
            for rid, u in used.items():
                assert u <= self.owned(rid), f"request {rid} uses {u} blocks but owns {self.owned(rid)}"
