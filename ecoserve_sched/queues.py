"""Waiting queues: FCFS, static-priority (heap), and EcoServe's GT groups keyed by predicted RL bucket."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator

from .request import Request


class FCFSQueue(deque):
    """Arrival order; preempted requests go back to the front (vLLM V1 semantics). A deque
    (``len`` in C: the serving loop asks it every iteration) whose ``pop`` takes the front."""

    push = deque.append
    push_front = deque.appendleft
    pop = deque.popleft  # type: ignore[assignment]

    def peek(self) -> Request:
        return self[0]


class PriorityQueue:
    """Smallest ``key(r)`` first; the key is computed once, at push (O(log n) push/pop).

    Requeued (preempted) requests keep their key, so they come back at their old position.
    ``items`` is the heap of ``(key, rid, request)`` itself, for hot loops (``len(q.items)``); a
    writer keeps it a heap (EcoServe moves entries between two queues with the same key).
    """

    def __init__(self, key: Callable[[Request], float]) -> None:
        self._key = key
        self.items: list[tuple[float, int, Request]] = []

    def __len__(self) -> int:
        return len(self.items)

    def push(self, r: Request, key: float | None = None) -> None:
        """``key``: ``key(r)`` if the caller already has it."""
        heapq.heappush(self.items, (self._key(r) if key is None else key, r.rid, r))

    push_front = push

    def peek(self) -> Request:
        return self.items[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self.items)[2]


class GTGroups:
    """Decoding requests (generation tasks) grouped by predicted RL bucket.

    Bookkeeping: EcoServe fills it, and no shipped decision reads it since its KV pipelining
    became an admission test (``ecoserve_rules.Projection``; ``ecoserve-nogroup`` equals
    ``ecoserve``, docs/scheduler.md). ``longest_first`` walks the groups from the longest
    predicted RL down, for a policy that searches them (physical loans' lenders).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._groups: dict[int, dict[int, Request]] = {}

    def add(self, r: Request) -> None:
        key = r.pred_bucket if self.enabled else 0
        self._groups.setdefault(key, {})[r.rid] = r

    def remove(self, r: Request) -> None:
        key = r.pred_bucket if self.enabled else 0
        g = self._groups.get(key)
        if g is not None and g.pop(r.rid, None) is not None and not g:
            del self._groups[key]

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    @property
    def n_groups(self) -> int:
        return len(self._groups)

    def longest_first(self, above_bucket: int = -1) -> Iterator[Request]:
        """Members of groups with a predicted bucket above ``above_bucket``, longest group first.

        Without grouping, every decoding request is a candidate, in admission order.
        """
        if not self.enabled:
            yield from self._groups.get(0, {}).values()
            return
        for key in sorted(self._groups, reverse=True):
            if key <= above_bucket:
                return
            yield from self._groups[key].values()
