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
from typing import Any

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


@pytest.mark.parametrize("blocks", [48, 13])  # the cache holds them all; it does not (preemptions)
def test_the_async_replay_schedules_the_steps_of_vllms_engine_core(blocks: int) -> None:
    """``async-vllm-real``'s loop (``VllmExecutor(in_flight=2)``) against vLLM's own
    ``EngineCore.step_with_batch_queue`` over the same requests, all there from the start (so
    no clock matters): the same ``SchedulerOutput``s, step by step."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.vllm_sim import build_vllm_scheduler, replay
    from ecoserve_sched.request import Request as EcoRequest

    lengths = [(40 + 13 * i, 6 + 5 * (i % 4)) for i in range(10)]  # (prompt, output) tokens
    sc = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64, max_model_len=192, enable_chunked_prefill=True,
                         is_encoder_decoder=False, async_scheduling=True)
    mc = ModelConfig(model=tiny_model_dir(), skip_tokenizer_init=True, dtype="float32", max_model_len=192)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, device_config=DeviceConfig(device="cpu"),
                    cache_config=CacheConfig(block_size=BS, enable_prefix_caching=False, num_gpu_blocks_override=blocks + 1))
    core = EngineCore(vc, FakeExecutor, log_stats=False)
    s = core.scheduler
    assert type(s) is AsyncScheduler
    FakeExecutor.scheduler, FakeExecutor.steps = s, 0
    engine_steps: list[dict] = []
    schedule = s.schedule
    s.schedule = lambda *a, **k: engine_steps.append(dict((out := schedule(*a, **k)).num_scheduled_tokens)) or out
    for i, (prompt, out) in enumerate(lengths):
        sp = SamplingParams(max_tokens=out, stop_token_ids=[2])
        core.add_request(Request(request_id=str(i), prompt_token_ids=[1] * prompt, sampling_params=sp,
                                 pooling_params=None, arrival_time=0.0))
    for _ in range(3000):
        if not s.has_requests():
            break
        core.step_fn()
    s.shutdown()

    sched = build_vllm_scheduler(AsyncScheduler, num_blocks=blocks, block_size=BS, max_num_seqs=6,
                                 max_num_batched_tokens=64, max_model_len=192, async_scheduling=True)
    replay_steps: list[dict] = []
    schedule2 = sched.schedule
    sched.schedule = lambda *a, **k: replay_steps.append(dict((out := schedule2(*a, **k)).num_scheduled_tokens)) or out
    reqs = [EcoRequest(i, 0.0, prompt, out, out) for i, (prompt, out) in enumerate(lengths)]
    res = replay(reqs, sched, load_profile("llama2-13b-a100-80gb"), policy="async-vllm-real", in_flight=2)
    assert all(r.generated == r.target_tokens for r in res.requests)
    assert [st for st in replay_steps if st] == [st for st in engine_steps if st]
    assert (res.counters["preemptions"] > 0) == (blocks < 48)
