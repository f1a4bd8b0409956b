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

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch
from test_vllm_scheduler import BS, clear_eco_env
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.core import EngineCore
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from ecoserve_sched.engines.engine_core import _executor_class
from ecoserve_sched.engines.vllm_scheduler import EcoServeVllmScheduler, EcoServeVllmSyncScheduler
from ecoserve_sched.engines.vllm_sim import fake_model_output, tiny_model_dir

SPEC = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32)
KV_BLOCKS = 48  # the memory the executor reports: this many blocks


class FakeExecutor(_executor_class()):  # the stand-in of ``engines/engine_core.py``, without its clock
    """One "worker" with one attention layer; ``execute_model`` fakes the model's tokens."""

    scheduler: Any = None  # set once the engine has built it
    steps = 0

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

    def _rpc_get_kv_cache_spec(self) -> dict:
        return {"model.layers.0.self_attn.attn": SPEC}

    def _rpc_determine_available_memory(self) -> int:
        return KV_BLOCKS * SPEC.page_size_bytes


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


CASES = [
    (_idle_gap_trace, 400, 2048, 16),
    (lambda: _random_trace(0), 400, 64, 4),
    (lambda: _random_trace(1), 24, 64, 16),  # KV pressure: preemptions
    (lambda: _random_trace(2), 30, 2048, 2),
]


@pytest.mark.parametrize("policy", ["vllm-real", "async-vllm-real", "ecoserve-vllm-real", "ecoserve-async-vllm-real"])
@pytest.mark.parametrize(("trace", "blocks", "budget", "seqs"), CASES)
def test_each_replay_gives_each_request_vllms_engine_core_times(policy: str, trace: Any, blocks: int, budget: int,
                                                                seqs: int) -> None:
    """Each engine replay (``VllmExecutor``: ``in_flight=2`` for the asynchronous ones) against
    vLLM's own ``EngineCore`` loop (``step``, or ``step_with_batch_queue``) with a stand-in
    executor under the same simulated clock (``engines/engine_core.py``), vLLM's scheduler or
    the plug-in inside it: each request's first token, finish, tokens and preemptions, and the
    counters. The first trace: two requests arrive while the step after a lone request's last
    one runs, which vLLM drops under async scheduling; vLLM takes them when that step ends (the
    replay took them at once, its clock set back: a reviewer's case)."""
    from dataclasses import replace

    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.differential import results_apart
    from ecoserve_sched.engines.engine_core import engine_core_run, model_length
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run

    cost = load_profile("llama2-13b-a100-80gb")
    tr = trace()  # each max_tokens within the engine's model length (the cache's, on 24 blocks), as
    length = model_length(blocks, 16, int((tr.input_tokens + tr.max_tokens).max()))  # engine_core_case has it
    tr = replace(tr, max_tokens=np.minimum(tr.max_tokens, length - tr.input_tokens))
    res = run(tr, policy, cost, slo=SLO(), kv_blocks=blocks, token_budget=budget, max_running=seqs)
    core = engine_core_run(res.requests, policy, cost, slo=SLO(), kv_blocks=blocks, token_budget=budget,
                           max_running=seqs)  # the replay's requests carry its predictions
    assert results_apart(res, core, policy.startswith("ecoserve")) == []
    assert all(r.finish_s > 0 and r.generated == r.target_tokens for r in core.requests)
    assert len(res.iter_tokens) == len(res.log)
    assert res.iter_tokens == core.iter_tokens  # the same steps, each ending at the same time
    assert [row[0] for row in res.log] == pytest.approx([row[0] for row in core.log], rel=1e-12, abs=1e-12)


def test_random_cases_give_each_request_vllms_engine_core_times() -> None:
    """Twelve draws of the differential fuzzer's ``random_case`` (tiny caches and budgets,
    bursts, every kind of prediction, the plug-in's settings) with at least 3 requests an engine
    can take on the case's cache (``engine_core_case``), each through one engine loop (``benchmarks/
    sim_vs_vllm_fuzz.py --against engine-core`` runs both)."""
    import random

    from ecoserve_sched.engines.differential import (
        engine_core_case,
        engine_core_differences,
        random_case,
    )

    checked, seed = 0, 0
    while checked < 12:
        case = engine_core_case(random_case(random.Random(seed), max_requests=40, block_sizes=(8, 16, 32)))
        seed += 1
        if case is None or len(case) < 3:
            continue
        assert engine_core_differences(case, asynchronous=bool(checked % 2)) == [], seed - 1
        checked += 1


def test_engine_core_run_refuses_what_an_engine_cannot_take() -> None:
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.engines.engine_core import engine_core_run
    from ecoserve_sched.request import Request

    cost = load_profile("llama2-13b-a100-80gb")
    with pytest.raises(ValueError, match="unknown engine policy 'vllm'"):
        engine_core_run([Request(0, 0.0, 10, 10, 5)], "vllm", cost, kv_blocks=8, token_budget=64, max_running=4)
    with pytest.raises(ValueError, match="request 0: prompt and output reach the engine's model length 128"):
        engine_core_run([Request(0, 0.0, 100, 40, 30)], "vllm-real", cost, kv_blocks=8, token_budget=64,
                        max_running=4)
    # the simulator's and run_real's checks (were: vLLM's bare AssertionError, a setting ignored, a TypeError)
    kw: dict[str, Any] = dict(kv_blocks=8, token_budget=64, max_running=4)
    with pytest.raises(ValueError, match="request id 1 is given twice"):
        engine_core_run([Request(1, 0.0, 10, 10, 5), Request(1, 0.1, 10, 10, 5)], "vllm-real", cost, **kw)
    for prompt in (0, None):  # (None: was a TypeError, the lengths summed before the check)
        with pytest.raises(ValueError, match="request 0: prompt_tokens must be a whole number >= 1"):
            engine_core_run([Request(0, 0.0, prompt, 10, 5)], "vllm-real", cost, **kw)
    for name in ("max_tokens", "true_output_tokens"):  # (were: a TypeError from the copy)
        r = Request(0, 0.0, 10, 10, 5)
        setattr(r, name, None)
        with pytest.raises(ValueError, match=f"request 0: {name} must be a whole number >= 1"):
            engine_core_run([r], "vllm-real", cost, **kw)
    with pytest.raises(ValueError, match="vllm-real: plugin settings are for ecoserve-vllm-real"):
        engine_core_run([Request(0, 0.0, 10, 10, 5)], "vllm-real", cost, plugin={"park": False}, **kw)
    with pytest.raises(ValueError, match="plugin setting 'slo_tbt' is the replay's own"):
        engine_core_run([Request(0, 0.0, 10, 10, 5)], "ecoserve-vllm-real", cost, plugin={"slo_tbt": 0.1}, **kw)


def test_engine_core_case_keeps_what_an_engine_on_the_cache_can_take() -> None:
    """A request fits if its prompt and output up to ``max_tokens`` stay below the model length
    (the cache's tokens here): one that stops at ``max_tokens`` is kept however long its true
    output (was: left out); the length follows the requests kept."""
    from ecoserve_sched.engines.differential import Case, engine_core_case

    case = Case(arrivals_s=(0.0, 0.0, 0.1), prompt_tokens=(50, 50, 120), output_tokens=(3000, 20, 20),
                max_tokens=(10, 2048, 2048), kv_blocks=8, block_size=16)
    kept = engine_core_case(case)  # each max_tokens within the model length (the cache's 128 tokens)
    assert kept is not None and kept.prompt_tokens == (50, 50) and kept.max_tokens == (10, 78)
    assert engine_core_case(Case(arrivals_s=(0.0,), prompt_tokens=(200,), output_tokens=(5,), max_tokens=(5,),
                                 kv_blocks=8, block_size=16)) is None
