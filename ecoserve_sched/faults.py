"""Fault injection for the simulator: which engine iterations raise.

An iteration is named by the scheduler's step counter when it starts (``Scheduler.step``: 0 for
the first iteration; every iteration, failed or not, advances it by one, and so does every step
of a decode-only stretch). A failing iteration takes its usual time, then produces nothing: the
requests in its batch (every decode and the prefill chunks) end ERRORED through
``Scheduler.fail_batch``, their KV blocks go back, and the run goes on for everyone else.

``Faults(steps={10, 250})`` makes exactly those iterations raise; ``Faults(rate=0.01, seed=3)``
makes each iteration raise with probability 1%; ``simulate(..., faults=...)`` takes either, or
a plain set of iteration indices.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

NEVER = 1 << 62  # a step no run reaches


@dataclass(frozen=True)
class Faults:
    """Failing iterations: the ``steps`` listed, plus each iteration with probability ``rate``
    (Bernoulli, drawn from ``seed``); ``error`` is recorded on the failed requests."""

    steps: frozenset[int] = frozenset()
    rate: float = 0.0
    seed: int = 0
    error: str = "injected engine fault"

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", frozenset(int(s) for s in self.steps))
        if any(s < 0 for s in self.steps):
            raise ValueError(f"fault steps must be >= 0, got {sorted(self.steps)[:3]}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"fault rate must be in [0, 1), got {self.rate}")

    @classmethod
    def of(cls, faults: Faults | Iterable[int] | None) -> Faults | None:
        """``faults`` as a ``Faults``: iteration indices become ``Faults(steps=...)``."""
        if faults is None or isinstance(faults, Faults):
            return faults
        return cls(steps=frozenset(faults))

    def plan(self) -> Iterator[int]:
        """The failing iterations in increasing order (endless when ``rate > 0``)."""
        sources: list[Iterator[int]] = [iter(sorted(self.steps))]
        if self.rate > 0.0:
            sources.append(_bernoulli(self.rate, self.seed))
        last = -1
        for step in heapq.merge(*sources):
            if step != last:
                yield step
                last = step


def _bernoulli(rate: float, seed: int) -> Iterator[int]:
    """Steps of a Bernoulli(``rate``) process from step 0: geometric gaps, drawn 1024 at a time."""
    rng = np.random.default_rng(seed)
    step = -1
    while True:
        for gap in rng.geometric(rate, 1024).tolist():
            step += gap
            yield step
