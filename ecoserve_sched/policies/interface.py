"""What the serving loop calls on a scheduling policy, and when (the engine's side of a policy).

One iteration, as the serving loop (``serving.py``) and its executors drive it::

    add(req, now)                 a request arrived (and passed the loop's drop rule)
    decode_only_step(now=now)     top of the iteration, before ``schedule`` (cost-model executor
                                  only): True lets the engine run every decode without a batch
    next_alarm_step(), recheck    during a run of decode-only iterations: when to ask again
    batch = schedule(now)         otherwise: decide the iteration (alarms, prefill chunks,
                                  admissions, preemptions)
    ... the engine runs the batch; the clock advances by its iteration time ...
    joined = complete(batch, now) after the batch ran: prefills advance; finished prompts decode
    fail_batch(batch, error)      instead of ``complete`` when running the batch raised
    finish(req, now)              the engine saw the request's last token

No separate prefill and decode phases: a :class:`Batch` is prefill chunks (token counts) plus
every decoding request, as in vLLM V1's ``SchedulerOutput``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..cost_model import prefill_ctx_tokens
from ..request import SLO, Request

#: vLLM V1's default ``max_num_batched_tokens`` for online serving; the roofline knee of the
#: cost model is often far smaller (128 tokens for a 13B model on A100), too small for prompts.
DEFAULT_TOKEN_BUDGET = 2048
#: vLLM's default ``max_num_seqs``.
DEFAULT_MAX_RUNNING = 256
#: ``vllm serve``'s defaults (``max_num_batched_tokens``, ``max_num_seqs``; vLLM 0.33's
#: ``EngineArgs``) on a GPU of 160 GiB or more (a B200), and on one of 70 GiB or more that is not an
#: A100 nor a GB10 (an H100, an H200); the two above elsewhere.
HUGE_GPU_DEFAULTS, LARGE_GPU_DEFAULTS = (16384, 1024), (8192, 1024)


def serve_defaults(gpu_name: str, gpu_bytes: float, capability: tuple[int, int] | None = None) -> tuple[int, int]:
    """The token budget and max running requests ``vllm serve`` picks on a GPU named
    ``gpu_name`` with ``gpu_bytes`` of memory and CUDA ``capability``: vLLM's own rule (a large
    budget cost an A100 throughput; a GB10, capability 12.1, has the memory but not the compute)."""
    if gpu_bytes >= 160 * 2**30:
        return HUGE_GPU_DEFAULTS
    if gpu_bytes >= 70 * 2**30 and "a100" not in gpu_name.lower() and capability != (12, 1):
        return LARGE_GPU_DEFAULTS
    return DEFAULT_TOKEN_BUDGET, DEFAULT_MAX_RUNNING


@dataclass(slots=True)
class Batch:
    """One iteration's work: prefill chunks plus every decoding request."""

    prefill: list[tuple[Request, int, int]] = field(default_factory=list)  # (req, chunk, epoch)
    prefill_tokens: int = 0
    prefill_ctx_tokens: int = 0  # sum of cost_model.prefill_ctx_tokens over the chunks
    decode_requests: int = 0
    decode_ctx_tokens: int = 0
    extra_s: float = 0.0  # swap transfers done in this iteration
    stall_decodes: bool = False  # prefill-only (vLLM V0): the decodes wait, the decode clock stays
    late_decodes: int = 0  # decodes whose last token came before the previous iteration (gaps in stall_gaps)

    def add_prefill(self, r: Request, chunk: int) -> None:
        self.prefill.append((r, chunk, r.epoch))
        self.prefill_tokens += chunk
        self.prefill_ctx_tokens += prefill_ctx_tokens(chunk, r.prefilled)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode_requests


#: The empty batch ``admission_blocked`` asks ``_next_admission`` with: read, never written.
NO_BATCH = Batch()


class SchedulerInterface(ABC):
    """The methods an engine calls on a policy (see the module docstring for the order).

    ``kv`` is the policy's ``KVCacheManager`` (the ledger the engine's blocks follow), ``step``
    the number of decode steps run so far, ``decoding`` the requests in DECODE state by id;
    ``counters`` and ``stall_gaps`` end up in the run's result.
    """

    name: str
    prediction_override: str | None  # "oracle": the engine must give true RLs; "none": reads none
    cost: Any
    slo: SLO
    step: int
    decoding: dict[int, Request]
    counters: dict[str, int]
    stall_gaps: list[float]
    recheck: tuple[int, float]  # see ``decode_only_step``

    @abstractmethod
    def add(self, r: Request, now: float) -> None:
        """Called when ``r`` arrives: queue it (or drop it: ``r.state`` FINISHED or ERRORED)."""

    @abstractmethod
    def has_work(self) -> bool:
        """Called at the top of every iteration: anything running or waiting?"""

    @abstractmethod
    def waiting_count(self) -> int:
        """Requests queued for admission (the stuck check reports it)."""

    @abstractmethod
    def decode_only_step(self, recheck_admission: bool = True, now: float | None = None) -> bool:
        """Called at the top of an iteration instead of ``schedule`` by engines that can skip
        decisions (the cost-model executor). True if this iteration needs no decision: due
        alarms were easy (and are now handled), no prefill runs, and nothing can be admitted
        until the next alarm, finish or arrival, or until ``recheck``. The engine then runs every
        decoding request one step (the batch ``schedule`` would have built), and more steps up
        to the next finish, arrival or ``next_alarm_step``, asking again there with
        ``recheck_admission`` False: since the last True answer only easy alarms ran, which only
        take free blocks, so a blocked admission is still blocked. A True answer with requests
        waiting also sets ``recheck`` = (step, time): an admission blocked only for now (a
        waiting request that will give way as time passes, say) must be asked again at that
        step, or at the first iteration starting at or after that time, whichever comes first
        (``base.NO_RECHECK``: not before the next alarm, finish or arrival). ``now``: the
        iteration's start time (the engine passes it when it rechecks the admission)."""

    @abstractmethod
    def next_alarm_step(self) -> int:
        """Called during decode-only iterations: the step of the earliest pending alarm."""

    @abstractmethod
    def schedule(self, now: float) -> Batch:
        """Called at the start of every iteration the engine does not skip: handle due alarms
        (grow, preempt), continue partial prefills, admit waiting requests; return the batch.
        An empty batch means nothing can run until the next arrival."""

    @abstractmethod
    def complete(self, batch: Batch, now: float) -> list[Request]:
        """Called once the engine ran ``batch`` (at ``now``): apply its prefill progress and
        advance the decode step; returns the requests that started (or resumed) decoding."""

    @abstractmethod
    def fail_batch(self, batch: Batch, error: str = "engine error") -> list[Request]:
        """Called instead of ``complete`` when running ``batch`` raised: its requests end
        ERRORED and their KV goes back; returns them."""

    @abstractmethod
    def finish(self, r: Request, now: float) -> None:
        """Called when the engine saw ``r``'s last token: free its KV."""

    @abstractmethod
    def kv_used_tokens(self) -> int:
        """KV tokens held by running requests (the engine logs it after each iteration)."""

    @abstractmethod
    def used_blocks_after(self, batch: Batch | None = None) -> dict[int, int]:
        """Blocks each running request occupies once ``batch`` ran (the engine's KV check)."""
