"""The plug-in inside vLLM's ``EngineCore`` on CPU: the engine builds the scheduler from
``scheduler_cls`` (the string ``--scheduler-cls`` passes), profiles the KV cache through its
executor and runs its own step loop (``step`` / ``step_with_batch_queue`` for async scheduling).

The executor is a stand-in: this vLLM install has no CPU platform (``vllm._C`` is absent, the
platform is ``UnspecifiedPlatform``), so no model can run here; it reports one full-attention
layer and a memory budget, and answers each step with one token per request whose prompt is
done. Everything between the engine and the scheduler is vLLM's own code.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, ClassVar

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch
from test_vllm_scheduler import BS, clear_eco_env
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.core import EngineCore
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from ecoserve_sched.engines.vllm_scheduler import EcoServeVllmScheduler, EcoServeVllmSyncScheduler
from ecoserve_sched.engines.vllm_sim import fake_model_output, tiny_model_dir

SPEC = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32)
KV_BLOCKS = 48  # the memory the executor reports: this many blocks


class FakeExecutor(Executor):
    """One "worker" with one attention layer; ``execute_model`` fakes the model's tokens."""

    scheduler: Any = None  # set once the engine has built it
    steps = 0

    def _init_executor(self) -> None:
        self.targets: dict[str, int] = {}

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None, non_block: bool = False) -> Any:
        out = getattr(self, f"_rpc_{method}", lambda *a, **k: None)(*args, **(kwargs or {}))
        return [_done(out)] if non_block else [out]

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        """Like vLLM's model runner: the tokens come from ``sample_tokens`` (or at once when
        nothing was scheduled)."""
        type(self).steps += 1
        s = type(self).scheduler
        targets = {rid: r.max_tokens for rid, r in s.requests.items()}
        self._pending = fake_model_output(scheduler_output, s, targets)
        ready = None if scheduler_output.total_num_scheduled_tokens else self.sample_tokens(None)
        return _done(ready) if non_block else ready  # an empty step answers at once

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        out, self._pending = self._pending, None
        return _done(out) if non_block else out

    def check_health(self) -> None:
        return None

    def compile_or_warm_up_model(self) -> None:
        return None

    def _rpc_get_kv_cache_spec(self) -> dict:
        return {"model.layers.0.self_attn.attn": SPEC}

    def _rpc_determine_available_memory(self) -> int:
        return KV_BLOCKS * SPEC.page_size_bytes

    def _rpc_get_supported_kv_cache_layouts(self) -> list[str]:
        return ["NHD"]


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


@pytest.fixture(autouse=True)
def eco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_eco_env(monkeypatch)
    monkeypatch.setenv("ECOSERVE_TRUST_CLIENT_HINTS", "1")


@pytest.mark.parametrize(("async_scheduling", "want"), [(False, EcoServeVllmSyncScheduler),
                                                         (True, EcoServeVllmScheduler)])
def test_engine_core_runs_the_plugin(async_scheduling: bool, want: type) -> None:
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
                         enable_chunked_prefill=True, is_encoder_decoder=False,
                         async_scheduling=async_scheduling,
                         scheduler_cls="ecoserve_sched.engines.vllm_scheduler.EcoServeVllmAutoScheduler")
    mc = ModelConfig(model=tiny_model_dir(), skip_tokenizer_init=True, dtype="float32", max_model_len=512)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=CacheConfig(block_size=BS),
                    device_config=DeviceConfig(device="cpu"))
    core = EngineCore(vc, FakeExecutor, log_stats=False)
    s = core.scheduler
    FakeExecutor.scheduler, FakeExecutor.steps = s, 0
    assert type(s) is want and s._usable_blocks == vc.cache_config.num_gpu_blocks - 1 <= KV_BLOCKS
    assert vc.cache_config.enable_prefix_caching  # vLLM's default, kept
    prefix = list(range(10, 74))
    for i in range(24):  # a shared 64-token prefix; under-predicted; more than the cache holds at once
        sp = SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True, extra_args={"rl_pred_tokens": 8})
        core.add_request(Request(request_id=f"e{i}", prompt_token_ids=prefix + [200 + i] * (8 + i),
                                 sampling_params=sp, pooling_params=None, arrival_time=0.001 * i,
                                 block_hasher=core.request_block_hasher))
    finished: set[str] = set()
    for _ in range(3000):
        if not s.has_requests():
            break
        outputs, _ = core.step_fn()
        for eco in (outputs or {}).values():  # None: the batch queue is still filling
            finished |= {o.request_id for o in eco.outputs if o.finish_reason is not None}
    assert finished == {f"e{i}" for i in range(24)}
    assert s.kv_cache_manager.usage == 0.0 and not s.running and not len(s.waiting)
    assert s.eco_counters["admissions"] >= 24 and s.eco_counters["topups"] > 0
    assert FakeExecutor.steps > 0
    s.shutdown()  # EngineCore.shutdown's distributed clean-up needs an accelerator



class _Clock:
    """The simulated time of an ``EngineCore`` run: a step's output is read at its end."""

    now = 0.0
    gpu_free = 0.0  # when the steps submitted so far are done


class _Timed(Future):
    """A done future whose reading moves the clock to its step's end (``value``: a function
    that makes the step's model output then, as the replay's loop makes it)."""

    def __init__(self, value: Any, end: float) -> None:
        super().__init__()
        self.set_result(value)
        self.end = end

    def result(self, timeout: float | None = None) -> Any:
        _Clock.now = max(_Clock.now, self.end)
        value = super().result()
        return value() if callable(value) else value


class ClockedExecutor(FakeExecutor):
    """``FakeExecutor`` under ``_Clock``: each step takes the cost model's time from when it is
    submitted or the step before it ends, whichever is later; each request stops at its true
    length (``targets``)."""

    targets: ClassVar[dict[str, int]] = {}
    samples_next: ClassVar[dict[str, bool]] = {}  # whether the request's last step submitted samples a token

    def _rpc_determine_available_memory(self) -> int:
        return 4096 * SPEC.page_size_bytes  # the cache's size comes from num_gpu_blocks_override

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        from ecoserve_sched.cost_model import load_profile, prefill_ctx_tokens

        s, so, after = type(self).scheduler, scheduler_output, type(self).samples_next
        for rid in so.preempted_req_ids:
            after.pop(rid, None)
        p_tok = p_ctx = d_req = d_ctx = 0
        samples = set()
        for rid, k in so.num_scheduled_tokens.items():
            req = s.requests[rid]
            before = req.num_computed_tokens - k
            if k == 1 and after.get(rid, False):
                d_req, d_ctx = d_req + 1, d_ctx + before + 1
            else:
                p_tok, p_ctx = p_tok + k, p_ctx + prefill_ctx_tokens(k, before)
            after[rid] = not req.is_prefill_chunk
            if after[rid]:
                samples.add(rid)
        self._pending = lambda: fake_model_output(so, s, type(self).targets, samples)
        if not so.total_num_scheduled_tokens:
            return _Timed(self._pending, _Clock.now)
        start = max(_Clock.now, _Clock.gpu_free)
        _Clock.gpu_free = self._end = start + load_profile("llama2-13b-a100-80gb").iteration_time(p_tok, p_ctx, d_req, d_ctx)
        return _Timed(None, self._end)

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        return _Timed(self._pending, self._end)


def _engine_core_times(trace: Any, blocks: int, budget: int, seqs: int) -> dict[str, tuple]:
    """Each request's (first token, finish, tokens) from vLLM's ``EngineCore`` with its
    default ``AsyncScheduler`` under ``_Clock``, each request added once the clock passes its
    arrival."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from ecoserve_sched.engines.vllm_sim import vllm_request
    from ecoserve_sched.request import SLO

    reqs = sorted(trace.requests(SLO()), key=lambda r: (r.arrival_s, r.rid))
    # vLLM wants the cache to hold one request of max_model_len (the replay's is 2048: no request
    # here is near either, so neither bounds a step)
    length = min(2048, blocks * BS)
    assert max(r.prompt_tokens + r.target_tokens for r in reqs) <= length
    sc = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=length,
                         enable_chunked_prefill=True, is_encoder_decoder=False, async_scheduling=True)
    mc = ModelConfig(model=tiny_model_dir(), skip_tokenizer_init=True, dtype="float32", max_model_len=length)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, device_config=DeviceConfig(device="cpu"),
                    cache_config=CacheConfig(block_size=BS, enable_prefix_caching=False,
                                             num_gpu_blocks_override=blocks + 1))
    core = EngineCore(vc, ClockedExecutor, log_stats=False)
    s = core.scheduler
    assert type(s) is AsyncScheduler
    _Clock.now = _Clock.gpu_free = 0.0
    ClockedExecutor.scheduler, ClockedExecutor.samples_next = s, {}
    ClockedExecutor.targets = {str(r.rid): r.target_tokens for r in reqs}
    times: dict[str, list] = {}
    i, stalled = 0, 0
    while True:
        while i < len(reqs) and reqs[i].arrival_s <= _Clock.now:
            core.add_request(vllm_request(reqs[i], False))
            i += 1
        if not s.has_requests() and not core.batch_queue:
            if i == len(reqs):
                break
            _Clock.now = reqs[i].arrival_s  # idle until the next arrival
            continue
        outputs, executed = core.step_fn()
        stalled = 0 if executed or outputs else stalled + 1
        if stalled > 4:  # nothing runs until a request arrives
            assert i < len(reqs), "stuck"
            _Clock.now, stalled = max(_Clock.now, reqs[i].arrival_s), 0
        for eco in (outputs or {}).values():
            for o in eco.outputs:
                t = times.setdefault(o.request_id, [-1.0, -1.0, 0])
                if o.new_token_ids and t[0] < 0:
                    t[0] = _Clock.now
                t[2] += len(o.new_token_ids)
                if o.finish_reason is not None:
                    t[1] = _Clock.now
    s.shutdown()
    return {rid: tuple(t) for rid, t in times.items()}


def _idle_gap_trace() -> Any:
    """A request alone, finished (its dropped-token step still in flight) when two arrive."""
    from ecoserve_sched.trace import Trace

    return Trace("gap", np.array([0.0, 0.08, 0.09]), np.array([100, 100, 100]), np.array([3, 3, 3]),
                 np.full(3, 2048))


def _random_trace(seed: int) -> Any:
    from ecoserve_sched.trace import Trace

    rng = np.random.default_rng(seed)
    n = 14
    out = rng.integers(1, 40, n)
    most = np.where(rng.random(n) < 0.3, out, 2048)  # some stop at max_tokens, vLLM's foreseen end
    return Trace(f"r{seed}", np.sort(rng.choice([0.0, 0.05, 0.3, 0.31, 1.0], n) + rng.uniform(0, 0.2, n)),
                 rng.integers(1, 300, n), out, most)


@pytest.mark.parametrize(("trace", "blocks", "budget", "seqs"), [
    (_idle_gap_trace, 400, 2048, 16),
    (lambda: _random_trace(0), 400, 64, 4),
    (lambda: _random_trace(1), 24, 64, 16),  # KV pressure: preemptions
    (lambda: _random_trace(2), 30, 2048, 2),
])
def test_the_async_replay_gives_each_request_vllms_engine_core_times(trace: Any, blocks: int, budget: int,
                                                                      seqs: int) -> None:
    """``async-vllm-real`` (``VllmExecutor(in_flight=2)``) against vLLM's own ``EngineCore``
    loop (``step_with_batch_queue``) with a stand-in executor under the same simulated clock:
    each request's first token, finish and tokens. The first trace: two requests arrive while
    the step after a lone request's last one runs, which vLLM drops; vLLM takes them when that
    step ends (the replay took them at once, its clock set back: a reviewer's case)."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run

    tr = trace()
    res = run(tr, "async-vllm-real", load_profile("llama2-13b-a100-80gb"), slo=SLO(), kv_blocks=blocks,
              token_budget=budget, max_running=seqs)
    want = _engine_core_times(tr, blocks, budget, seqs)
    got = {str(r.rid): (r.first_token_s, r.finish_s, r.generated) for r in res.requests}
    assert got.keys() == want.keys()
    for rid, (first, finish, tokens) in want.items():
        assert got[rid][2] == tokens, rid
        assert got[rid][:2] == pytest.approx((first, finish), rel=1e-12, abs=1e-12), rid
    assert len(res.iter_tokens) == len(res.log)
