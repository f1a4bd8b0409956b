"""EcoServe's decisions on top of vLLM V1's own scheduler (``vllm serve M --scheduler-cls ...``).

Supported: vLLM ``>=0.32,<0.33`` (it reads a few internals, named below). vLLM's scheduler still
runs every step and owns the KV blocks; this subclass changes four of its decisions:

* **Predictions** are made once per request, at ``add_request`` (never inside ``schedule``):
  ``SamplingParams.extra_args`` keys ``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens``
  win; otherwise the predictor bundle named by ``ECOSERVE_PREDICTOR`` is run on the prompt
  text (decoded from the prompt token ids with the served model's tokenizer); otherwise (no
  bundle, or ``skip_tokenizer_init``) a constant reservation, ``ECOSERVE_DEFAULT_RESERVE``.
* **Ordering**: the waiting queue is a heap. Preempted (and skipped) requests come first, as in
  vLLM; then least TTFT slack, shorter predicted work earlier, aging built in - the same static
  key as ``policies/ecoserve.py``. vLLM's own ``kv_holding_waiting`` queue still goes first.
* **Exact allocation**: a request is admitted only if vLLM's ``KVCacheManager.allocate_slots``
  can hand it the blocks of ``prompt + reserve`` at once (the reservation is allocated as
  lookahead slots), keeping ``reserve_frac`` of the blocks free for top-ups. Admission stops at
  the first request that does not get its reservation (vLLM's loop breaks there).
* **Proactive top-up**: when a running request comes within ``topup_lead_tokens`` of the end of
  its blocks, it gets ``max(topup_min_tokens, topup_frac x reserve)`` more tokens' blocks, if
  the pool has them; else it keeps running and gets vLLM's on-demand block when it needs one.
* **Victim choice**: when blocks may run out this step, ``self.running`` is re-sorted so that
  vLLM's "preempt ``running[-1]``" takes, in order: a request ahead of its SLO pace (positive
  slack), from the longest predicted RL group, with the fewest computed tokens (least work to
  recompute), the latest arrival. Under ``--scheduling-policy priority`` vLLM's own victim rule
  (lowest priority, latest arrival) applies instead.

Running requests are kept in **groups** keyed by predicted RL bucket (``self.groups``); they
set the victim order. KVC pipelining (lending a request's reserved-but-unused tail blocks) is
not done: vLLM's block tables are append-only per request and a request's blocks return to the
pool only all together, so a block cannot be lent and given back (docs/engines.md).

vLLM internals read: ``Scheduler.waiting`` / ``running`` / ``_preempt_request`` /
``_free_request``, ``KVCacheManager.allocate_slots`` (wrapped on the instance) and the
single-type manager's ``req_to_blocks`` (the number of blocks a request holds).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

logger = logging.getLogger(__name__)

ENV_PREDICTOR = "ECOSERVE_PREDICTOR"
EXTRA_KEYS = ("rl_bucket", "rl_pred_tokens", "rl_reserve_tokens")
_ADMITTING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


@dataclass(slots=True)
class EcoServeVllmConfig:
    """Knobs of the vLLM scheduler; ``from_env`` reads ``ECOSERVE_<FIELD>`` (upper case)."""

    predictor: str | None = None  # predictor bundle folder (ECOSERVE_PREDICTOR)
    margin: float = 0.0  # predictor reservations x (1 + margin)
    default_reserve: int = 512  # reservation when no prediction is available (tokens)
    reserve_frac: float = 0.02  # share of blocks admissions leave free for top-ups
    topup_lead_tokens: int = 16  # top up this many tokens before the blocks run out
    topup_frac: float = 0.5
    topup_min_tokens: int = 64
    order_weight: float = 0.25
    slo_ttft: float = 5.0  # seconds
    slo_tbt: float = 0.2  # seconds
    prefill_s_per_token: float = 5e-5  # rough prefill cost, for the TTFT slack of the order key

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> EcoServeVllmConfig:
        env = os.environ if environ is None else environ
        cfg = cls()
        for f in fields(cls):
            raw = env.get(f"ECOSERVE_{f.name.upper()}")
            if raw is not None:
                kind = type(getattr(cfg, f.name)) if getattr(cfg, f.name) is not None else str
                setattr(cfg, f.name, kind(raw))
        return cfg


@dataclass(slots=True)
class RLPrediction:
    """What the scheduler knows of a request's response length (tokens)."""

    bucket: int
    pred_tokens: int
    reserve_tokens: int
    source: str  # "extra_args" | "predictor" | "default"
    topup_tokens: int = 0


class EcoServeRequestQueue(RequestQueue):
    """Waiting requests by ``(rank, key)``: prepended (preempted, skipped) ones first, then the
    smallest key. The key is computed once, at push (O(log n) push and pop)."""

    def __init__(self, key: Callable[[Request], tuple[float, float]]) -> None:
        self._key = key
        self._heap: list[tuple[int, float, float, int, Request]] = []
        self._seq = itertools.count()

    def _push(self, request: Request, rank: int) -> None:
        heapq.heappush(self._heap, (rank, *self._key(request), next(self._seq), request))

    def add_request(self, request: Request) -> None:
        self._push(request, 1)

    def prepend_request(self, request: Request) -> None:
        self._push(request, 0)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for r in requests:
            self._push(r, 0)

    def pop_request(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def peek_request(self) -> Request:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][-1]

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = {id(r) for r in requests}
        self._heap = [e for e in self._heap if id(e[-1]) not in drop]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[-1] for e in sorted(self._heap, key=lambda e: e[:4]))


class EcoServeMixin:
    """The EcoServe decisions; combine with vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eco_cfg = EcoServeVllmConfig.from_env()
        self.rl: dict[str, RLPrediction] = {}
        self.groups: dict[int, set[str]] = defaultdict(set)
        self.eco_counters = {"reserved_admissions": 0, "topups": 0, "topup_misses": 0,
                             "preemptions": 0, "predictions": 0}
        self.clock: Callable[[], float] = time.time  # the simulator swaps in its clock
        self.predictor: Any = _load_predictor(self.eco_cfg)
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self.waiting = EcoServeRequestQueue(self._order_key)
        groups = self.kv_cache_config.kv_cache_groups
        self._reserving = len(groups) == 1
        if not self._reserving:
            logger.warning("EcoServe: %d KV-cache groups (hybrid model): reservations, top-ups "
                           "and KV-based victim choice are off", len(groups))
        self._bs = groups[0].kv_cache_spec.block_size
        self._req_blocks = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        self._keep_free = int(self.eco_cfg.reserve_frac * self.kv_cache_config.num_blocks)
        self._allocate = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_slots

    # ---- predictions (once per request, at arrival) ---------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            self.rl[request.request_id] = self.predict(request)
        super().add_request(request)

    def predict(self, request: Request) -> RLPrediction:
        """The client's ``extra_args`` if given, else the predictor on the prompt, else the default."""
        cfg = self.eco_cfg
        sp = request.sampling_params
        extra = (sp.extra_args or {}) if sp is not None else {}
        cap = max(1, request.max_tokens)
        if any(k in extra for k in EXTRA_KEYS):
            reserve = int(extra.get("rl_reserve_tokens", extra.get("rl_pred_tokens", cfg.default_reserve)))
            pred = int(extra.get("rl_pred_tokens", reserve))
            p = RLPrediction(int(extra.get("rl_bucket", -1)), pred, reserve, "extra_args")
        elif self.predictor is not None and (text := self._prompt_text(request)) is not None:
            out = self.predictor.predict([text])[0]
            self.eco_counters["predictions"] += 1
            p = RLPrediction(int(out.bucket), int(out.pred_tokens), int(out.reserve_tokens), "predictor")
        else:
            p = RLPrediction(-1, cfg.default_reserve, cfg.default_reserve, "default")
        p.reserve_tokens = min(max(p.reserve_tokens, 1), cap)
        p.pred_tokens = min(max(p.pred_tokens, 1), cap)
        return p

    def _prompt_text(self, request: Request) -> str | None:
        """The prompt decoded with the served model's tokenizer (None without one)."""
        if not self._tokenizer_tried:
            self._tokenizer_tried = True
            mc = self.vllm_config.model_config
            if not mc.skip_tokenizer_init:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(
                        mc.tokenizer, trust_remote_code=mc.trust_remote_code)
                except Exception as e:
                    logger.warning("EcoServe: cannot load tokenizer %s (%s): default reservations",
                                   mc.tokenizer, e)
        if self._tokenizer is None or request.prompt_token_ids is None:
            return None
        return self._tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)

    # ---- ordering -------------------------------------------------------------------------------
    def _order_key(self, request: Request) -> tuple[float, float]:
        cfg = self.eco_cfg
        p = self.rl.get(request.request_id)
        pred = p.pred_tokens if p is not None else cfg.default_reserve
        key = (request.arrival_time + cfg.slo_ttft - cfg.prefill_s_per_token * request.num_prompt_tokens
               + cfg.order_weight * pred * cfg.slo_tbt)
        return float(request.priority), key

    # ---- reservations and top-ups (wraps KVCacheManager.allocate_slots) ---------------------------
    def reservation_tokens(self, request: Request) -> int:
        """Prompt + reserved RL + top-ups, never beyond ``max_tokens`` or the model length."""
        p = self.rl[request.request_id]
        limit = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        want = request.num_prompt_tokens + p.reserve_tokens + p.topup_tokens
        return min(max(want, request.num_tokens), limit)

    def held_blocks(self, request_id: str) -> int:
        return len(self._req_blocks.get(request_id, ()))

    def _allocate_slots(self, request: Request, num_new_tokens: int, **kw: Any) -> Any:
        p = self.rl.get(request.request_id)
        if p is None or not self._reserving:
            return self._allocate(request, num_new_tokens, **kw)
        look = kw.get("num_lookahead_tokens", 0)
        end = (request.num_computed_tokens + kw.get("num_new_computed_tokens", 0)
               + kw.get("num_external_computed_tokens", 0) + num_new_tokens)
        if request.status in _ADMITTING:  # admission: the whole reservation or nothing
            kw["num_lookahead_tokens"] = max(look, self.reservation_tokens(request) - end)
            if self.running:
                kw["reserved_blocks"] = kw.get("reserved_blocks", 0) + self._keep_free
            blocks = self._allocate(request, num_new_tokens, **kw)
            if blocks is not None:
                self.groups[p.bucket].add(request.request_id)
                self.eco_counters["reserved_admissions"] += 1
            return blocks
        held = self.held_blocks(request.request_id) * self._bs
        if end + look + self.eco_cfg.topup_lead_tokens <= held:
            return self._allocate(request, num_new_tokens, **kw)  # inside its reservation
        limit = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        extra = max(self.eco_cfg.topup_min_tokens, int(self.eco_cfg.topup_frac * p.reserve_tokens))
        grown = min(held + extra, limit)
        if grown > end + look:
            blocks = self._allocate(request, num_new_tokens, **{**kw, "num_lookahead_tokens": grown - end})
            if blocks is not None:
                p.topup_tokens += grown - held
                self.eco_counters["topups"] += 1
                return blocks
            self.eco_counters["topup_misses"] += 1
        return self._allocate(request, num_new_tokens, **kw)  # on demand; None: vLLM preempts

    # ---- victim choice ----------------------------------------------------------------------------
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._reserving and self.running and self._tight():
            now = self.clock()
            self.running.sort(key=lambda r: self._keep_key(r, now))
        return super().schedule(*args, **kwargs)

    def _tight(self) -> bool:
        """Blocks could run out this step: fewer free than one per running request + reserve."""
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        return free < len(self.running) + self._keep_free

    def _keep_key(self, r: Request, now: float) -> tuple[bool, int, int, float]:
        """Ascending: keep first; vLLM preempts from the end of ``running``."""
        cfg = self.eco_cfg
        p = self.rl.get(r.request_id)
        slack = r.arrival_time + cfg.slo_ttft + r.num_output_tokens * cfg.slo_tbt - now
        return slack > 0, p.bucket if p is not None else -1, -r.num_computed_tokens, r.arrival_time

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super()._preempt_request(request, *args, **kwargs)
        p = self.rl.get(request.request_id)
        if p is not None:
            self.groups[p.bucket].discard(request.request_id)
        self.eco_counters["preemptions"] += 1

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        p = self.rl.pop(request.request_id, None)
        if p is not None:
            self.groups[p.bucket].discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    def group_sizes(self) -> dict[int, int]:
        """Running requests per predicted RL bucket (non-empty groups only)."""
        return {b: len(ids) for b, ids in sorted(self.groups.items()) if ids}


class EcoServeVllmScheduler(EcoServeMixin, AsyncScheduler):
    """EcoServe over vLLM's ``AsyncScheduler`` (async scheduling kept: vLLM's default)."""


class EcoServeVllmSyncScheduler(EcoServeMixin, Scheduler):
    """EcoServe over vLLM's synchronous ``Scheduler`` (for ``--no-async-scheduling``)."""


def _load_predictor(cfg: EcoServeVllmConfig) -> Any:
    path = cfg.predictor or os.environ.get(ENV_PREDICTOR)
    if not path:
        return None
    from rlpredict.runtime import Predictor  # lazy: ONNX Runtime, no torch

    t0 = time.perf_counter()
    pred = Predictor.load(path, margin=cfg.margin, threads=1)
    logger.info("EcoServe: predictor %s loaded in %.2fs", path, time.perf_counter() - t0)
    return pred
