"""vLLM's own engine loop under the simulator's clock: the check on the engine replays' loop.

The engine replays (``vllm_sim``: ``vllm-real``, ``ecoserve-vllm-real`` and their ``async-``
forms) run vLLM's scheduler class in the serving loop with a model of vLLM's engine loop of
their own (one step at a time, or two queued). :func:`engine_core_run` runs the same requests
through vLLM's ``EngineCore`` itself (its ``step``, or ``step_with_batch_queue`` under async
scheduling), built from ``scheduler_cls`` as ``vllm serve`` builds it, with a stand-in executor
that times each step by the cost model on a simulated clock: a step starts when it is submitted
or when the step before it ends, whichever is later, and reading its output moves the clock to
its end. Each request is added once the clock passes its arrival and stops at its true length
(its stop token). The plug-in's classes read the same clock (``clock``) and get each request's
prediction as a client's hints, as in the replay. What remains different from a served engine is
the executor (no model runs: this vLLM install has no CPU platform) and the host time between
steps, which neither side counts.

``differential.engine_core_differences`` compares the two, request by request
(``benchmarks/sim_vs_vllm_fuzz.py --against engine-core``).
"""

from __future__ import annotations

import gc
import logging
from concurrent.futures import Future
from functools import cache
from typing import Any

from ..request import SLO, Request, State
from .vllm_sim import RealSimResult

#: The engine policies (``vllm_sim.REAL_POLICIES``) and how each is built: (async scheduling,
#: the plug-in).
POLICIES = {"vllm-real": (False, False), "async-vllm-real": (True, False),
            "ecoserve-vllm-real": (False, True), "ecoserve-async-vllm-real": (True, True)}


def model_length(kv_blocks: int, block_size: int, longest: int) -> int:
    """The ``max_model_len`` of the engine: the replay's (``longest`` prompt plus
    ``max_tokens``, at least 2048) where the cache holds it; vLLM refuses a longer one than the
    cache holds, so a request must stay below this to be served alike by both."""
    return min(max(longest, 2048), kv_blocks * block_size)


class _Clock:
    """The simulated time of one run: ``now``, and when the steps submitted so far end."""

    def __init__(self) -> None:
        self.now = 0.0
        self.gpu_free = 0.0


class _Timed(Future):
    """A done future whose reading moves the clock to its step's ``end`` (``value``: a function
    that makes the step's output then)."""

    def __init__(self, clock: _Clock, value: Any, end: float) -> None:
        super().__init__()
        self.set_result(value)
        self.clock, self.end = clock, end

    def result(self, timeout: float | None = None) -> Any:
        self.clock.now = max(self.clock.now, self.end)
        value = super().result()
        return value() if callable(value) else value


@cache
def _executor_class() -> type:
    """The stand-in executor (a subclass of vLLM's ``Executor``, so built on first use)."""
    from vllm.v1.executor.abstract import Executor

    from .vllm_sim import fake_model_output, step_shape

    class ClockedExecutor(Executor):
        """One "worker" with one attention layer of ``spec``; each step timed by ``cost`` on
        ``clock``, its tokens made as the replay makes them (``fake_model_output``)."""

        run: Any = None  # the run being served (``_Run``): set before the engine is built

        def _init_executor(self) -> None:
            self.pending: Any = None
            self.end = 0.0

        @classmethod
        def supports_async_scheduling(cls) -> bool:
            return True

        def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                           kwargs: dict | None = None, non_block: bool = False) -> Any:
            out = getattr(self, f"_rpc_{method}", lambda *a, **k: None)(*args, **(kwargs or {}))
            if not non_block:
                return [out]
            fut: Future = Future()
            fut.set_result(out)
            return [fut]

        def _rpc_get_kv_cache_spec(self) -> dict:
            return {"model.layers.0.self_attn.attn": type(self).run.spec}

        def _rpc_determine_available_memory(self) -> int:  # the cache's size: num_gpu_blocks_override
            return (type(self).run.kv_blocks + 1) * type(self).run.spec.page_size_bytes

        def _rpc_get_supported_kv_cache_layouts(self) -> list[str]:
            return ["NHD"]

        def check_health(self) -> None:
            return None

        def compile_or_warm_up_model(self) -> None:
            return None

        def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
            run = type(self).run
            s, so, clock = run.sched, scheduler_output, run.clock
            for rid in so.preempted_req_ids:
                run.sampled.discard(rid)
                run.by_id[rid].preemptions += 1
            shape, samples = step_shape(so, s, run.sampled)  # as ``VllmExecutor`` times a step
            self.pending = lambda: fake_model_output(so, s, run.targets, samples)
            if not so.total_num_scheduled_tokens:  # an empty step answers at once
                return _Timed(clock, self.pending, clock.now)
            start = max(clock.now, clock.gpu_free)
            dt = run.cost.iteration_time(*shape)
            clock.gpu_free = self.end = start + dt
            run.steps.append((self.end, dt, so.total_num_scheduled_tokens))
            return _Timed(clock, None, self.end)

        def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
            done = _Timed(type(self).run.clock, self.pending, self.end)
            return done if non_block else done.result()  # ``EngineCore.step``: the output itself

    return ClockedExecutor


class _Run:
    """One run's state, read by the executor."""

    def __init__(self, cost: Any, kv_blocks: int, spec: Any, targets: dict[str, int],
                 by_id: dict[str, Request]) -> None:
        self.cost, self.kv_blocks, self.spec, self.targets, self.by_id = cost, kv_blocks, spec, targets, by_id
        self.clock = _Clock()
        self.sampled: set[str] = set()  # the requests whose last step samples a token
        self.steps: list[tuple[float, float, int]] = []  # each step run: (end, duration, tokens scheduled)
        self.sched: Any = None


def engine_core_run(requests: list[Request], policy: str, cost: Any, *, slo: SLO | None = None,
                    kv_blocks: int, token_budget: int, max_running: int, block_size: int = 16,
                    plugin: dict[str, Any] | None = None, steps: int = 10_000_000) -> RealSimResult:
    """Serve copies of ``requests`` (their lengths and predictions: ``predictions.apply_predictions``
    sets these) through vLLM's ``EngineCore`` with ``policy``'s scheduler (:data:`POLICIES`) under the
    simulated clock; every request must stay below :func:`model_length`. The result carries
    each request's first token, finish, tokens and preemptions, the preemption (parks,
    amortized chunks: the plug-in's) counters, and a log row and ``iter_tokens`` entry for each
    step run (its end and duration; the KV columns are not recorded, 0). ``plugin``: ``EcoServeVllmConfig`` settings.
    One run at a time in a process: vLLM builds the executor from its class, which holds the run."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ..request import check_servable
    from .vllm_scheduler import EcoServeVllmConfig
    from .vllm_sim import (
        TINY_LLAMA,
        check_plugin,
        replay_plugin_class,
        tiny_model_dir,
        vllm_request,
    )

    if policy not in POLICIES:
        raise ValueError(f"unknown engine policy {policy!r}; choose from {', '.join(POLICIES)}")
    asynchronous, eco = POLICIES[policy]
    check_plugin(policy, plugin)  # (was: ignored for vllm-real; the SLO's a TypeError)
    slo = slo or SLO()
    try:
        out = [Request(r.rid, r.arrival_s, r.prompt_tokens, r.max_tokens, r.true_output_tokens, r.pred_bucket,
                       r.pred_tokens, r.reserve_tokens, r.slo) for r in requests]  # fresh: served ones may be given
    except TypeError:  # a length that is no number (a copy compares two): the simulator's words for it
        check_servable(list(requests))
        raise
    check_servable(out)  # the simulator's checks, first (was: vLLM's bare AssertionError on an id given
    # twice or an empty prompt, and a TypeError for a missing length)
    out = sorted(out, key=lambda r: (r.arrival_s, r.rid))
    length = model_length(kv_blocks, block_size, max((r.prompt_tokens + r.max_tokens for r in out), default=0))
    if too_long := [r.rid for r in out if r.prompt_tokens + r.target_tokens >= length]:
        raise ValueError(f"request {too_long[0]}: prompt and output reach the engine's model length {length}")
    cls = (replay_plugin_class(asynchronous) if eco else AsyncScheduler if asynchronous else Scheduler)
    sc = SchedulerConfig(max_num_seqs=max_running, max_num_batched_tokens=token_budget, max_model_len=length,
                         enable_chunked_prefill=True, is_encoder_decoder=False, async_scheduling=asynchronous,
                         scheduler_cls=cls)
    mc = ModelConfig(model=tiny_model_dir(max(length, TINY_LLAMA["max_position_embeddings"])), skip_tokenizer_init=True,
                     dtype="float32", max_model_len=length)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, device_config=DeviceConfig(device="cpu"),
                    cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=False,
                                             num_gpu_blocks_override=kv_blocks + 1))
    by_id = {str(r.rid): r for r in out}
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    run = _Run(cost, kv_blocks, spec, {rid: r.target_tokens for rid, r in by_id.items()}, by_id)
    executor = _executor_class()
    executor.run = run
    plugin_log = logging.getLogger(__name__.rpartition(".")[0] + ".vllm_scheduler")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)  # its "no predictor" warning: each request carries its prediction
    try:
        core = EngineCore(vc, executor, log_stats=False)
    finally:
        plugin_log.setLevel(level)
    s = run.sched = core.scheduler
    if eco:  # as ``vllm_sim.run_real`` sets it up: the SLO, the cost model, the simulated clock
        s.eco_cfg = EcoServeVllmConfig(trust_client_hints=True, slo_ttft=slo.ttft_s, slo_tbt=slo.tbt_s,
                                       **(plugin or {}))
        s.cost_model = cost
        s.clock = lambda: run.clock.now
    clock = run.clock
    i, stalled = 0, 0
    try:
        for _ in range(steps):
            while i < len(out) and out[i].arrival_s <= clock.now:
                core.add_request(vllm_request(out[i], eco))
                i += 1
            if not s.has_requests() and not core.batch_queue:
                if i == len(out):
                    break
                clock.now = out[i].arrival_s  # idle until the next arrival
                continue
            outputs, executed = core.step_fn()
            stalled = 0 if executed or outputs else stalled + 1
            if stalled > 4:  # nothing runs until a request arrives
                if i == len(out):
                    raise RuntimeError(f"{policy}: EngineCore stuck with {s.get_num_unfinished_requests()} requests")
                clock.now, stalled = max(clock.now, out[i].arrival_s), 0
            for eco_out in (outputs or {}).values():
                for o in eco_out.outputs:
                    r = by_id[o.request_id]
                    if o.new_token_ids and r.first_token_s < 0:
                        r.first_token_s = clock.now
                    r.generated += len(o.new_token_ids)
                    if o.finish_reason is not None:
                        r.state, r.finish_s = State.FINISHED, clock.now
        else:
            raise RuntimeError(f"{policy}: EngineCore still running after {steps} steps")
    finally:
        s.shutdown()  # (EngineCore.shutdown's distributed clean-up needs an accelerator)
        gc.unfreeze()  # EngineCore's start-up froze the heap (for a server's lifetime)
    res = RealSimResult(policy, getattr(cost, "label", ""), "", out, kv_blocks * block_size, block_size)
    res.log = [(end, dt, 1, 0, 0.0, 0.0) for end, dt, _ in run.steps]
    res.iter_tokens = [tokens for _, _, tokens in run.steps]
    res.counters = {"preemptions": sum(r.preemptions for r in out)}
    if eco:
        res.counters["parks"], res.counters["amortized"] = s.eco_counters["parks"], s.eco_counters["amortized"]
    return res
