"""A request as the scheduler sees it: lengths, predicted response length (RL), SLOs, state.

The true response length (``true_output_tokens``) is known only to the simulator; policies read
the predicted fields (``pred_bucket``, ``pred_tokens``, ``reserve_tokens``) and never the truth.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from enum import IntEnum


class State(IntEnum):
    WAITING = 0  # queued, holds no KV (new, or preempted by recompute)
    PREFILL = 1  # admitted, holds KV, prompt (or recompute context) partly computed
    DECODE = 2  # generating one token per iteration
    SWAPPED = 3  # preempted by swap: KV lives in host memory
    FINISHED = 4
    ERRORED = 5  # ended by an engine error or a cancel (``Request.error`` says which); holds no KV


#: ``Request.error`` of a request its client cancelled (``Scheduler.cancel``): ERRORED, but
#: not an error (``metrics.summarize`` counts these apart)
CANCELLED = "cancelled"


def is_real(v: object) -> bool:
    """A finite int or float (numpy's too), not a bool: what an API argument that is a number
    must be (``is_whole``: an integer)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_whole(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(slots=True, frozen=True)
class SLO:
    """Latency targets: time to first token, mean time between tokens, optional JCT deadline."""

    ttft_s: float = 5.0
    tbt_s: float = 0.2
    deadline_s: float | None = None

    def __post_init__(self) -> None:  # the CLI checks its options; this, the API's (was: attainment 0)
        for name, v in (("ttft_s", self.ttft_s), ("tbt_s", self.tbt_s), ("deadline_s", self.deadline_s)):
            if v is None and name == "deadline_s":
                continue
            if not (is_real(v) and v > 0):
                raise ValueError(f"SLO {name} must be a finite number > 0, got {v!r}")


@dataclass(slots=True, eq=False)
class Request:
    rid: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    true_output_tokens: int  # simulator only: policies must not read it
    pred_bucket: int = -1
    pred_tokens: int = 0
    reserve_tokens: int = 0
    slo: SLO = SLO()
    # ---- dynamic state (owned by the scheduler) ----
    state: State = State.WAITING
    generated: int = 0  # output tokens produced so far (exact while not decoding)
    prefilled: int = 0  # tokens of the current prefill target already computed
    prefill_target: int = 0  # prompt (+ generated tokens when recomputing after preemption)
    dec_step0: int = 0  # global step at which the current decode run started
    reserved_extra: int = 0  # tokens added to the reservation by top-ups
    alarm_step: int = -1  # next step at which the scheduler must look at this request
    epoch: int = 0  # bumped on preemption: invalidates stale finish events
    seq: int = 0  # admission order (vLLM preempts the highest)
    first_token_s: float = -1.0
    finish_s: float = -1.0
    last_token_s: float = -1.0
    preemptions: int = 0
    swapped_tokens: int = 0
    error: str | None = None  # why the request ended ERRORED
    # Output length the simulator stops at (the truth, capped by ``max_tokens``), set once at
    # construction: the lengths never change, and the simulator reads this on every finish.
    target_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.prefill_target = self.prompt_tokens
        self.target_tokens = min(self.true_output_tokens, self.max_tokens)

    def generated_at(self, step: int) -> int:
        """Output tokens produced after ``step`` iterations (decoding advances one per step)."""
        if self.state == State.DECODE:
            return self.generated + step - self.dec_step0
        return self.generated

    def context_at(self, step: int) -> int:
        """Tokens whose KV the request holds after ``step`` iterations."""
        if self.state == State.DECODE:
            return self.prompt_tokens + self.generated + step - self.dec_step0
        if self.state == State.PREFILL:
            return self.prefilled
        return 0

    @property
    def reservation_tokens(self) -> int:
        """Prompt plus reserved response tokens (predicted reservation plus top-ups)."""
        return self.prompt_tokens + max(self.reserve_tokens, 1) + self.reserved_extra


#: The lengths a request needs (each a whole number >= 1) and the predictions it may carry
#: (whole numbers; a missing prediction is 0, or -1 for the bucket).
_LENGTHS = ("prompt_tokens", "true_output_tokens", "max_tokens")
_PREDICTIONS = ("pred_bucket", "pred_tokens", "reserve_tokens")


def check_servable(requests: list[Request]) -> None:
    """Raise ``ValueError`` naming the first request that cannot be served as given: an arrival
    that is no finite number >= 0, a length that is no whole number >= 1, a prediction that is
    no whole number (NaN, 2.5), an ``slo`` that is no :class:`SLO`, a request already served (a list reused from an earlier run: it
    finished again in no time), or an id given twice. Whole numbers of other types (numpy's)
    become ``int``, the same values. ``read_trace`` and ``Trace`` check their columns; this is
    the API's check."""
    for r in requests:
        a = r.arrival_s
        if not (is_real(a) and a >= 0):  # a NaN arrival would never arrive
            raise ValueError(f"request {r.rid}: arrival_s must be a finite number >= 0, got {a!r}")
        if not (type(r.prompt_tokens) is type(r.true_output_tokens) is type(r.max_tokens) is int
                and min(r.prompt_tokens, r.true_output_tokens, r.max_tokens) >= 1
                and type(r.pred_bucket) is type(r.pred_tokens) is type(r.reserve_tokens) is int):
            _whole_numbers(r)  # the slow path: anything but plain ints
        if type(r.slo) is not SLO and not isinstance(r.slo, SLO):  # (was: transformers' manager failed every
            # request of the run with "'NoneType' object has no attribute 'ttft_s'")
            raise ValueError(f"request {r.rid}: slo must be an SLO(ttft_s, tbt_s), got {type(r.slo).__name__}")
        if r.state != State.WAITING or r.generated or r.prefilled or r.epoch or r.first_token_s >= 0:
            raise ValueError(f"request {r.rid}: already served (state {r.state.name}, {r.generated} tokens "
                             "generated); give fresh Request objects (Trace.requests makes them)")
    if len({r.rid for r in requests}) != len(requests):
        seen: set[int] = set()
        twice = next(r.rid for r in requests if r.rid in seen or seen.add(r.rid))
        raise ValueError(f"request id {twice!r} is given twice: ids must be unique")


def _whole_numbers(r: Request) -> None:
    for name in _LENGTHS + _PREDICTIONS:
        v = getattr(r, name)
        if not (is_whole(v) and (v >= 1 or name in _PREDICTIONS)):
            need = "a whole number >= 1" if name in _LENGTHS else "a whole number"
            raise ValueError(f"request {r.rid}: {name} must be {need}, got {v!r}")
        setattr(r, name, int(v))
    if is_whole(r.rid):
        r.rid = int(r.rid)
    r.target_tokens = min(r.true_output_tokens, r.max_tokens)
