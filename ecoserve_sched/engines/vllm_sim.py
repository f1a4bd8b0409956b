"""Replay a trace through vLLM's own scheduler class under the simulator's clock and cost model.

Policies ``vllm-real`` (vLLM's ``Scheduler``) and ``ecoserve-vllm-real``
(:class:`~ecoserve_sched.engines.vllm_scheduler.EcoServeVllmSyncScheduler`) run here instead of
over our KV manager: each iteration calls the real ``schedule()``, times the resulting
``SchedulerOutput`` with ``cost.iteration_time`` (prefill tokens and their context, decodes and
their context), then feeds a fake ``ModelRunnerOutput`` back (one token per request whose
prompt is done; the request's stop token when it reaches its true length, so vLLM never sees
the true length). These are the synchronous schedulers, the simulator's model of a step.

``async-vllm-real`` (vLLM's ``AsyncScheduler``) and ``ecoserve-async-vllm-real``
(:class:`~ecoserve_sched.engines.vllm_scheduler.EcoServeVllmScheduler`) replay vLLM's default
engine loop instead, as its ``EngineCore.step_with_batch_queue`` runs it: two steps in the
queue, so each step is scheduled while the one before it runs, before that one's tokens come
back (a request that finishes in a step before its ``max_tokens`` is scheduled once more, its
token dropped; a step starts when the one before it ends, or when it is scheduled after an
idle spell, and is scheduled when the one before that ends). The
simulator has no such mode: the ``vllm-async`` and ``ecoserve-async`` pairs of
``benchmarks/sim_vs_vllm.py`` measure what the overlap changes. The cost model counts no host
time between steps, which is what the overlap hides on a real engine, so a replay shows the
loop's cost (decisions a step stale) and not its gain.

:class:`VllmExecutor` is the serving loop's executor (``serving.py``: arrivals, drop rule,
stuck check and log are the loop's); the result is a :class:`~ecoserve_sched.serving.SimResult`,
so ``metrics.summarize`` reports it exactly as it reports the simulator's own policies.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..cost_model import prefill_ctx_tokens
from ..policies.interface import DEFAULT_TOKEN_BUDGET
from ..request import SLO, Request, State
from ..serving import Executor, LogRow, SimResult, serve

STOP_TOKEN = 2
TOKEN = 1
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 65536,
              "rms_norm_eps": 1e-6, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
REAL_POLICIES = ("vllm-real", "ecoserve-vllm-real", "async-vllm-real", "ecoserve-async-vllm-real")
#: The engine policies that get predictions (vLLM's own schedulers read none).
PREDICTING_POLICIES = ("ecoserve-vllm-real", "ecoserve-async-vllm-real")
#: The engine policies replayed with vLLM's asynchronous engine loop (one step in flight).
ASYNC_POLICIES = ("async-vllm-real", "ecoserve-async-vllm-real")
#: ``EcoServeVllmConfig`` fields a replay passes on (``run_real(plugin=...)``): the policy's own
PLUGIN_POLICY_SETTINGS = ("default_reserve", "reserve_frac", "aging", "give_way", "park", "scale_predictions",
                          "amortize")


@dataclass
class RealSimResult(SimResult):
    """A :class:`SimResult` plus the tokens vLLM scheduled in each iteration."""

    iter_tokens: list[int] = field(default_factory=list)


@cache
def tiny_model_dir(positions: int = TINY_LLAMA["max_position_embeddings"]) -> str:
    """A folder with a tiny Llama ``config.json`` (vLLM's scheduler only reads the config), of
    ``positions`` positions: vLLM refuses a ``max_model_len`` above the model's."""
    d = Path(tempfile.mkdtemp(prefix="ecoserve-tiny-llama-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "max_position_embeddings": positions}))
    return str(d)


def build_vllm_scheduler(cls: type | None = None, *, num_blocks: int = 256, block_size: int = 16,
                         max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                         max_model_len: int = 4096, async_scheduling: bool = False,
                         model_dir: str | None = None, dtype: str = "float32") -> Any:
    """A real vLLM V1 scheduler of class ``cls`` (default: vLLM's ``Scheduler``) on CPU over
    ``num_blocks`` usable KV blocks; no tokenizer, no prefix caching. ``dtype``: the model
    config's (what ``ECOSERVE_PROFILE=auto`` reads)."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    cls = cls or Scheduler
    total = num_blocks + 1  # vLLM keeps one null block out of the pool
    sched_cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, enable_chunked_prefill=True,
                                is_encoder_decoder=False, async_scheduling=async_scheduling)
    # a trace's longest request may pass the tiny model's 65,536 positions (was: vLLM's
    # ValidationError, naming max_position_embeddings)
    model_cfg = ModelConfig(model=model_dir or tiny_model_dir(max(max_model_len, TINY_LLAMA["max_position_embeddings"])),
                            skip_tokenizer_init=True,
                            dtype=dtype, max_model_len=max_model_len)
    cache_cfg = CacheConfig(block_size=block_size, enable_prefix_caching=False)
    cache_cfg.num_gpu_blocks = total
    vc = VllmConfig(scheduler_config=sched_cfg, model_config=model_cfg, cache_config=cache_cfg,
                    device_config=DeviceConfig(device="cpu"))
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cfg = KVCacheConfig(num_blocks=total, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return cls(vllm_config=vc, kv_cache_config=kv_cfg, block_size=block_size,
               structured_output_manager=StructuredOutputManager(vc), log_stats=False)


@cache
def replay_plugin_class(asynchronous: bool) -> type:
    """The plug-in's class (``EcoServeVllmScheduler``, or its synchronous form) reading a run's
    settings, not the serving ``ECOSERVE_*`` ones (was: an ``ECOSERVE_PROFILE=auto`` in the shell
    aborted a replay): what a replay and ``engine_core.engine_core_run`` build."""
    from .vllm_scheduler import EcoServeVllmScheduler, EcoServeVllmSyncScheduler

    base = EcoServeVllmScheduler if asynchronous else EcoServeVllmSyncScheduler
    return type(f"Replay{base.__name__}", (base,), {"eco_environ": MappingProxyType({})})


def vllm_request(r: Request, with_prediction: bool) -> Any:
    """The vLLM request for a trace request: dummy prompt ids, the trace's ``max_tokens``, the
    stop token (emitted at the true length) and, for EcoServe, the prediction in ``extra_args``."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request as VRequest

    from ..policies.ecoserve_rules import prediction_within
    from .vllm_scheduler import parse_hints

    extra = None
    if with_prediction:  # as the simulator's EcoServe takes them: within max_tokens (``rules``)
        extra = {"rl_bucket": r.pred_bucket, "rl_pred_tokens": prediction_within(r.pred_tokens, r.max_tokens),
                 "rl_reserve_tokens": prediction_within(r.reserve_tokens, r.max_tokens)}
        if why := parse_hints(extra)[1]:  # was: every hint of the request dropped, the default used
            raise ValueError(f"request {r.rid}: the vLLM plug-in would not take its prediction ({why}); "
                             "the simulator's policies do")
    sp = SamplingParams(max_tokens=r.max_tokens, stop_token_ids=[STOP_TOKEN], extra_args=extra)
    return VRequest(request_id=str(r.rid), prompt_token_ids=[TOKEN] * r.prompt_tokens,
                    sampling_params=sp, pooling_params=None, arrival_time=r.arrival_s)


def fake_model_output(out: Any, sched: Any, target: dict[str, int], samples: set[str] | None = None) -> Any:
    """One sampled token per request whose scheduled tokens reach the end of its sequence
    (``samples``: the requests whose step was not a prompt chunk when it was scheduled, where a
    later step was scheduled since: vLLM's ``is_prefill_chunk`` then)."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        req = sched.requests.get(rid)
        # finished while this step was in flight (async: vLLM drops its token), or a prefill
        # chunk short of the end
        if req is None or (rid not in samples if samples is not None else req.num_computed_tokens < req.num_tokens):
            sampled.append([])
        else:
            last = req.num_output_tokens + 1 >= target[rid]
            sampled.append([STOP_TOKEN if last else TOKEN])
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=sampled)


def step_shape(out: Any, sched: Any, sampled: set[str]) -> tuple[tuple[int, int, int, int], set[str]]:
    """What the cost model times of a step vLLM scheduled (``out``): (prefill tokens, their
    context, decodes, their context), and the requests it samples a token for. ``sampled``: the
    requests whose last step sampled one (vLLM's ``is_prefill_chunk`` False), brought up to date
    here; the caller drops preempted and finished requests from it."""
    p_tok = p_ctx = d_req = d_ctx = 0
    samples = set()
    for rid, k in out.num_scheduled_tokens.items():
        req = sched.requests[rid]
        before = req.num_computed_tokens - k
        # one token right after a step of the request that samples one: a decode (was: a
        # 1-token prompt or last chunk, then a recompute's last chunk of one token, timed
        # without the prefill's cost)
        if k == 1 and rid in sampled:
            d_req += 1
            d_ctx += before + 1
        else:
            p_tok += k
            p_ctx += prefill_ctx_tokens(k, before)
        if req.is_prefill_chunk:
            sampled.discard(rid)
        else:
            samples.add(rid)
            sampled.add(rid)
    return (p_tok, p_ctx, d_req, d_ctx), samples


class VllmExecutor(Executor):
    """vLLM's scheduler ``sched`` under the loop's clock; each iteration timed by ``cost``;
    ``in_flight=2``: vLLM's asynchronous engine loop (the module's docstring)."""

    def __init__(self, sched: Any, cost: Any, *, name: str = "vllm-real", with_prediction: bool = False,
                 in_flight: int = 1) -> None:
        self.sched, self.cost, self.name = sched, cost, name
        self.with_prediction = with_prediction
        self.block_size = sched.block_size
        self.kv_blocks = sched.kv_cache_config.num_blocks - 1  # vLLM's null block is not usable
        self.pool = sched.kv_cache_manager.block_pool
        self.by_id: dict[str, Request] = {}
        self.target: dict[str, int] = {}  # the true output length, by vLLM request id
        # requests whose last step scheduled samples a token (vLLM's ``is_prefill_chunk`` is
        # False): a one-token step of theirs is a decode (a recompute's last chunk of one token
        # is not: it follows a chunk that samples none)
        self.sampled: set[str] = set()
        self.iter_tokens: list[int] = []
        self.stall_gaps: list[float] = []
        self.preemptions = 0
        self.prefill_iterations = 0  # steps with prompt tokens, as the simulator counts them
        self.sched_s = 0.0
        self.now = 0.0
        self.in_flight = in_flight
        # the scheduled steps not yet run to their end, oldest first (at most ``in_flight``):
        # (output, the requests it samples for, start, end, duration), and when the last ends
        self.queue: deque[tuple[Any, set[str], float, float, float]] = deque()
        self.busy_until = 0.0
        if hasattr(sched, "clock"):
            sched.clock = lambda: self.now

    def add(self, r: Request, now: float) -> None:
        rid = str(r.rid)
        self.by_id[rid] = r
        self.target[rid] = r.target_tokens
        self.sched.add_request(vllm_request(r, self.with_prediction))

    def has_work(self) -> bool:
        # a step in flight runs to its end even when every request has finished (async: the
        # step scheduled after a request's last one, whose token vLLM drops): vLLM's engine
        # waits for it before it takes new requests (was: the loop went idle past it, and the
        # next arrival's step was scheduled before it had run, the clock set back to its end)
        return bool(self.queue) or bool(self.sched.get_num_unfinished_requests())

    def waiting(self) -> int:
        return self.sched.get_num_unfinished_requests()

    def _schedule(self, now: float) -> Any:
        self.now = now
        t0 = time.perf_counter()
        out = self.sched.schedule()
        self.sched_s += time.perf_counter() - t0
        self.preemptions += len(out.preempted_req_ids)
        for rid in out.preempted_req_ids:  # each request's count, as the simulator keeps it
            self.by_id[rid].preemptions += 1
        self.sampled.difference_update(out.preempted_req_ids)
        return out

    def run(self, now: float, until: float) -> LogRow | None:
        """vLLM's engine loop: fill its queue of ``in_flight`` steps (each scheduled at ``now``,
        before the tokens of the steps ahead of it come back; one step: the synchronous loop),
        then run the oldest step to its end."""
        queue = self.queue
        while len(queue) < self.in_flight and self.sched.has_requests():
            if not self._queue_step(now):  # nothing to run: until a step ends or a request arrives
                break
        if not queue:
            return None
        out, samples, start, end, dt = queue.popleft()
        sched = self.sched
        # the KV columns as the simulator takes them: before the step's finished requests free
        # their blocks (was: after, so a request's last step counted none of its cache)
        kv = sum(q.num_computed_tokens for q in sched.running), self.kv_blocks - self.pool.get_num_free_blocks()
        outputs = sched.update_from_output(out, fake_model_output(out, sched, self.target, samples))
        return self._delivered(outputs, start, end, dt, kv)

    def _queue_step(self, now: float) -> bool:
        """Schedule a step at ``now`` and queue it behind the steps in flight; False if it
        scheduled nothing (its output goes back at once)."""
        sched = self.sched
        out = self._schedule(now)
        if out.total_num_scheduled_tokens == 0:
            sched.update_from_output(out, fake_model_output(out, sched, self.target, set()))
            return False
        shape, samples = step_shape(out, sched, self.sampled)
        self.iter_tokens.append(out.total_num_scheduled_tokens)
        self.prefill_iterations += shape[0] > 0  # (was: 0 in every replay; a reviewer's find)
        dt = self.cost.iteration_time(*shape)
        start = max(now, self.busy_until)
        self.busy_until = start + dt
        self.queue.append((out, samples, start, start + dt, dt))
        return True

    def _delivered(self, outputs: Any, prev: float, now: float, dt: float, kv: tuple[int, int]) -> LogRow:
        """Record the tokens of a step that ran from ``prev`` to ``now``: its log row, with
        ``kv`` (tokens held, blocks allocated) taken before the step's output was read."""
        steady = 0
        for eco in outputs.values():
            for o in eco.outputs:
                r = self.by_id[o.request_id]
                for _ in o.new_token_ids:
                    if r.first_token_s < 0:
                        r.first_token_s = now
                    elif r.last_token_s >= prev - 1e-12:
                        steady += 1  # decoded in the previous iteration too: gap = dt
                    else:
                        self.stall_gaps.append(now - r.last_token_s)
                    r.last_token_s = now
                    r.generated += 1
                if o.finish_reason is not None:
                    r.state = State.FINISHED
                    r.finish_s = now
                    self.sampled.discard(o.request_id)
        return (now, dt, 1, steady, *kv)

    def close(self, res: SimResult) -> None:
        res.counters = {"preemptions": self.preemptions}
        eco = getattr(self.sched, "eco_counters", None)
        if eco is not None:
            res.counters["parks"], res.counters["amortized"] = eco["parks"], eco["amortized"]
        res.stall_gaps = self.stall_gaps
        res.sched_s = self.sched_s
        res.prefill_iterations = self.prefill_iterations
        if isinstance(res, RealSimResult):
            res.iter_tokens = self.iter_tokens


def replay(requests: list[Request], sched: Any, cost: Any, *, policy: str = "vllm-real",
           with_prediction: bool = False, profile: str = "", predictions: str = "",
           in_flight: int = 1) -> RealSimResult:
    """Replay ``requests`` through the vLLM scheduler ``sched``; timed by ``cost``
    (``in_flight=2``: vLLM's asynchronous engine loop, for an asynchronous ``sched``)."""
    ex = VllmExecutor(sched, cost, name=policy, with_prediction=with_prediction, in_flight=in_flight)
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    res = RealSimResult(policy, profile, predictions, reqs, ex.kv_blocks * ex.block_size, ex.block_size)
    serve(ex, res)
    return res


def replay_requests(trace: Any, policy: str, slo: SLO, *, predictions: str | None = None,
                    confusion: Any = None, bundle: str | None = None, seed: int = 0) -> tuple[list[Request], str]:
    """The requests an engine replay of ``trace`` under ``policy`` serves, with the predictions
    it hands them (``predictions``, else the trace's default source; none for vLLM's own
    policies), and how those predictions are described."""
    from ..predictions import NO_PREDICTIONS, apply_predictions, default_source

    reqs = trace.requests(slo)
    if policy not in PREDICTING_POLICIES:
        return reqs, NO_PREDICTIONS  # as the simulator's vLLM says it (was: "none")
    source = predictions or default_source(trace)
    return reqs, apply_predictions(reqs, trace, source, seed=seed, confusion=confusion, bundle=bundle)


def check_plugin(policy: str, plugin: Mapping[str, Any] | None) -> None:
    """Refuse ``plugin`` settings a replay of ``policy`` would not read: any for vLLM's own
    schedulers, the SLO (the replay's own), and what the replay sets itself (the predictor, the
    cost model). Both replays (``run_real``, ``engine_core.engine_core_run``) check them here."""
    options = dict(plugin or {})
    if options and policy not in PREDICTING_POLICIES:
        raise ValueError(f"{policy}: plugin settings are for {', '.join(PREDICTING_POLICIES)}")
    if taken := {"slo_ttft", "slo_tbt", "trust_client_hints"} & options.keys():
        raise ValueError(f"{policy}: plugin setting {sorted(taken)[0]!r} is the replay's own (give slo=SLO(...))")
    if unread := sorted(options.keys() - set(PLUGIN_POLICY_SETTINGS)):  # (was: accepted, and ignored:
        # the replay builds no predictor and hands the plug-in its cost model)
        raise ValueError(f"{policy}: the replay reads no plugin setting {unread[0]!r}; it takes "
                         f"{', '.join(PLUGIN_POLICY_SETTINGS)}")


def run_real(trace: Any, policy: str, cost: Any, *, slo: SLO | None = None,
             predictions: str | None = None, confusion: Any = None, bundle: str | None = None,
             seed: int = 0, kv_blocks: int | None = None, block_size: int = 16,
             token_budget: int | None = None, max_running: int = 256, plugin: Mapping[str, Any] | None = None,
             **unread: Any) -> RealSimResult:
    """``simulator.run`` for ``REAL_POLICIES`` (``vllm-real``, ``ecoserve-vllm-real`` and their
    ``async-`` forms): same trace, predictions,
    KV capacity, token budget and ``max_running`` as the simulator's policies. ``plugin``:
    ``EcoServeVllmConfig`` fields for the EcoServe ones (``{"scale_predictions": True}``
    beside the simulator's ``ecoserve-scaled``), the settings a served engine reads from
    ``ECOSERVE_*``; the SLO is the replay's."""
    from .vllm_scheduler import (
        EcoServeSetupError,
        EcoServeVllmConfig,
        EcoServeVllmSyncScheduler,
    )

    if policy not in REAL_POLICIES:
        raise ValueError(f"unknown engine policy {policy!r}; choose from {', '.join(REAL_POLICIES)}")
    if unread:  # (was: taken and ignored, so `reserve_full_prompt=False` or a misspelt `kv_block`
        # compared vLLM's default run with a policy's other one; a reviewer's find)
        raise TypeError(f"{policy}: the replay of vLLM's own scheduler takes no setting {sorted(unread)[0]!r} "
                        "(it takes kv_blocks, block_size, token_budget, max_running, plugin)")
    check_plugin(policy, plugin)
    options = dict(plugin or {})
    slo = slo or SLO()
    reqs, desc = replay_requests(trace, policy, slo, predictions=predictions, confusion=confusion,
                                 bundle=bundle, seed=seed)
    eco = policy in PREDICTING_POLICIES
    blocks = kv_blocks if kv_blocks is not None else cost.kv_blocks(block_size)
    longest = max((r.prompt_tokens + r.max_tokens for r in reqs), default=2048)
    plugin_log = logging.getLogger(EcoServeVllmSyncScheduler.__module__)
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)  # its "no predictor" warning: the replay hands each request its prediction
    asynchronous = policy in ASYNC_POLICIES
    try:
        if eco:
            cls = replay_plugin_class(asynchronous)
        else:
            from vllm.v1.core.sched.async_scheduler import AsyncScheduler

            cls = AsyncScheduler if asynchronous else None
        sched = build_vllm_scheduler(
            cls, num_blocks=blocks, block_size=block_size, async_scheduling=asynchronous,
            max_num_seqs=max_running, max_model_len=max(longest, 2048),
            max_num_batched_tokens=int(max(cost.token_budget, DEFAULT_TOKEN_BUDGET) if token_budget is None
                                       else token_budget))
    finally:
        plugin_log.setLevel(level)
    if eco:
        try:
            sched.eco_cfg = EcoServeVllmConfig(trust_client_hints=True, slo_ttft=slo.ttft_s, slo_tbt=slo.tbt_s,
                                               **options)
        except EcoServeSetupError as e:  # was: named the ECOSERVE_* variable, which a replay never reads
            raise ValueError(f"{policy}: the vLLM plug-in takes no such {'setting' if options else 'SLO'}: "
                             + re.sub(r" \(ECOSERVE_\w+\)", "", str(e))) from None
        sched.cost_model = cost  # every number the simulator's EcoServe takes from the cost model
    return replay(reqs, sched, cost, policy=policy, with_prediction=eco, in_flight=2 if asynchronous else 1,
                  profile=getattr(cost, "label", getattr(cost, "name", "")), predictions=desc)
