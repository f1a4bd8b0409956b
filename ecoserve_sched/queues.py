"""Waiting queues: FCFS and static-priority (heap)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from .request import Request


class FCFSQueue(deque):
    """Arrival order; preempted requests go back to the front (vLLM V1 semantics). A deque
    (``len`` in C: the serving loop asks it every iteration) whose ``pop`` takes the front."""

    push = deque.append
    push_front = deque.appendleft
    pop = deque.popleft  # type: ignore[assignment]

    def peek(self) -> Request:
        return self[0]

    def discard(self, r: Request) -> bool:
        """Take ``r`` out wherever it waits (a cancel); False if it is not here. O(n)."""
        for i, q in enumerate(self):
            if q is r:
                del self[i]
                return True
        return False


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

    def discard(self, r: Request) -> bool:
        """Take ``r`` out wherever it waits (a cancel); False if it is not here. O(n)."""
        return discard_from_heap(self.items, r)


def discard_from_heap(heap: list[tuple], r: Request) -> bool:
    """Take the entry whose last field is ``r`` out of ``heap`` (kept a heap); False if none."""
    for i, item in enumerate(heap):
        if item[-1] is r:
            last = heap.pop()
            if i < len(heap):
                heap[i] = last
                heapq.heapify(heap)
            return True
    return False

