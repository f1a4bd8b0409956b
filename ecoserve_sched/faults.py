"""Fault injection for the simulator: which engine iterations raise.

An iteration is named by the scheduler's step counter when it starts (``Scheduler.step``: 0 for
the first iteration; every iteration, failed or not, advances it by one, and so does every step
of a decode-only stretch; under ``vllm-v0`` a prefill-only iteration, which stalls the decodes,
does not). Step k fails the first iteration that starts at step k or later. A failing iteration
takes its usual time, then produces nothing: the
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

from .request import CANCELLED, is_real, is_whole

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
        if isinstance(self.steps, str | bytes):  # was: "12" read as steps 1 and 2
            raise TypeError(f"fault steps must be iteration indices, got text {self.steps!r}")
        if bad := [s for s in self.steps if not (is_whole(s) and s >= 0)]:  # was: 2.5 read as 2, True as 1
            raise ValueError(f"fault steps must be whole numbers >= 0, got {bad[0]!r}")
        object.__setattr__(self, "steps", frozenset(int(s) for s in self.steps))
        if not (is_real(self.rate) and 0.0 <= self.rate < 1.0):
            raise ValueError(f"fault rate must be in [0, 1), got {self.rate!r}")
        if not (is_whole(self.seed) and self.seed >= 0):  # was: refused only when the plan was drawn
            raise ValueError(f"fault seed must be a whole number >= 0, got {self.seed!r}")
        if not (isinstance(self.error, str) and self.error.strip() and self.error != CANCELLED):
            # was: taken, None left failed requests without a reason, "cancelled" counted them as cancelled
            raise ValueError(f"fault error must be a reason (text other than {CANCELLED!r}), got {self.error!r}")

    @classmethod
    def of(cls, faults: Faults | Iterable[int] | None) -> Faults | None:
        """``faults`` as a ``Faults``: iteration indices become ``Faults(steps=...)``."""
        if faults is None or isinstance(faults, Faults):
            return faults
        if not isinstance(faults, Iterable):  # was: "'int' object is not iterable"
            raise TypeError(f"faults must be a Faults or iteration indices (a set), got {type(faults).__name__}")
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
