"""vLLM's own scheduler under the simulated clock: agrees with our `vllm` policy, finishes all."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.metrics import summarize
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import Trace

SLO_ = SLO(5.0, 0.2)


def _trace(n: int = 120, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 300, n)
    rl = np.stack([np.minimum(out // 64, 5), out, out + 32], axis=1)  # annotated predictions
    return Trace("synthetic", np.sort(rng.uniform(0, 6, n)), rng.integers(20, 900, n), out,
                 np.full(n, 2048), rl=rl)


@pytest.mark.parametrize("blocks", [4000, 160])  # no KV pressure; heavy pressure (preemptions)
def test_real_vllm_matches_simulated_vllm_policy(blocks: int) -> None:
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace()
    sim_res = run(tr, "vllm", cost, slo=SLO_, kv_blocks=blocks)
    sim = summarize(sim_res, SLO_)
    real_res = run(tr, "vllm-real", cost, slo=SLO_, kv_blocks=blocks)
    real = summarize(real_res, SLO_)
    assert real_res.prefill_iterations == sim_res.prefill_iterations > 0  # (was: 0 for vllm-real)
    assert real["finished"] + real["dropped"] == len(tr) == sim["finished"] + sim["dropped"]
    assert len(real_res.iter_tokens) == real["iterations"]
    # the same decisions with and without KV pressure: the simulator counts a decode's blocks as
    # vLLM does (its context less the token sampled last), so the pool runs dry at the same step
    for k in ("iterations", "preemptions", "p50_ttft_s", "p99_ttft_s", "mean_jct_s"):
        assert real[k] == pytest.approx(sim[k], rel=1e-6), k
    for k in ("p50_tbt_s", "p99_tbt_s"):  # the simulator logs decode-only stretches as means
        assert real[k] == pytest.approx(sim[k], rel=1e-2), k
    assert (real["preemptions"] > 0) == (blocks < 1000)
    # the KV columns before the step's finished requests free their blocks, as the simulator's
    # (was: after, so a request's last step held none: 0 for a lone one-token request)
    assert real["kv_alloc_mean"] == pytest.approx(sim["kv_alloc_mean"], rel=1e-4)  # (stretches: means)
    assert real["kv_util_mean"] == pytest.approx(sim["kv_util_mean"], rel=3e-3)  # (one sampled token each)


def test_ecoserve_inside_vllm_matches_the_simulators_without_swapping() -> None:
    """Under KV pressure, EcoServe inside vLLM's scheduler and the simulator's EcoServe without
    swapping (``ecoserve-recompute``; vLLM V1 preempts by recompute only) make the same
    decisions: one rules module, vLLM's block count and parking for the step's first head."""
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace(seed=1)
    sim = summarize(run(tr, "ecoserve-recompute", cost, slo=SLO_, kv_blocks=160), SLO_)
    real = summarize(run(tr, "ecoserve-vllm-real", cost, slo=SLO_, kv_blocks=160), SLO_)
    assert real["preemptions"] == sim["preemptions"] > 0 and real["iterations"] == sim["iterations"]
    for k in ("p50_ttft_s", "p99_ttft_s", "mean_jct_s", "slo_attainment"):
        assert real[k] == pytest.approx(sim[k], rel=1e-3), k


def test_ecoserve_on_vllm_finishes_everything_and_reserves() -> None:
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace(seed=1)
    res = run(tr, "ecoserve-vllm-real", cost, slo=SLO_, kv_blocks=160)
    s = summarize(res, SLO_)
    assert s["finished"] + s["dropped"] == len(tr)
    assert s["predictions"].startswith("annotated")


def test_the_replay_reads_no_serving_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ECOSERVE_* settings configure a served engine, not a trace replay (were: a bad one
    aborted the replay, ECOSERVE_PROFILE=auto too; a valid one was read, then overwritten)."""
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace(n=30, seed=2)
    clean = summarize(run(tr, "ecoserve-vllm-real", cost, slo=SLO_, kv_blocks=160), SLO_)
    for name, value in (("ECOSERVE_AGING", "lots"), ("ECOSERVE_PROFILE", "auto"), ("ECOSERVE_REQUIRE_PREDICTOR", "1")):
        monkeypatch.setenv(name, value)
    dirty = summarize(run(tr, "ecoserve-vllm-real", cost, slo=SLO_, kv_blocks=160), SLO_)
    assert {k: v for k, v in dirty.items() if "wall" not in k and "per_s" not in k and "us" not in k} == \
        {k: v for k, v in clean.items() if "wall" not in k and "per_s" not in k and "us" not in k}


@pytest.mark.parametrize(("prompt", "budget"), [(1, None), (2049, 2048)])
def test_a_one_token_prefill_chunk_is_timed_as_a_prefill(prompt: int, budget: int | None) -> None:
    """A 1-token prompt, or a last chunk of one token, was timed as a decode (without the
    cost model's prefill overhead): TTFT 0.0194 s against the simulator's 0.0372 s (a fuzzer's find)."""
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("t", np.zeros(1), np.array([prompt]), np.array([3]), np.array([3]))
    kw = {"slo": SLO_, "kv_blocks": 4000, **({"token_budget": budget} if budget else {})}
    sim, real = (summarize(run(tr, p, cost, **kw), SLO_) for p in ("vllm", "vllm-real"))
    assert real["p50_ttft_s"] == pytest.approx(sim["p50_ttft_s"], rel=1e-9)


def test_a_recomputes_last_chunk_of_one_token_is_timed_as_a_prefill() -> None:
    """A request preempted for recompute re-prefills its 36 tokens in chunks of 7; the last, of
    one token, was timed as a decode (a differential fuzzer's find): it finished at 1.4563 s
    against the simulator's 1.4741 s."""
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("t", np.zeros(2), np.array([10, 35]), np.array([51, 7]), np.array([2048, 2048]))
    kw = {"slo": SLO_, "kv_blocks": 4, "token_budget": 7, "max_running": 2}
    sim, real = (sorted(run(tr, p, cost, **kw).requests, key=lambda r: r.rid) for p in ("vllm", "vllm-real"))
    assert [r.finish_s for r in real] == pytest.approx([r.finish_s for r in sim], rel=1e-9)
    assert [r.first_token_s for r in real] == pytest.approx([r.first_token_s for r in sim], rel=1e-9)


def _pair(tr: Trace, slo: SLO, scaled: bool = False, profile: str = "llama2-13b-a100-80gb",
          **kw: object) -> tuple[list, list]:
    """Each request of ``tr`` as the simulator's EcoServe without swapping and EcoServe inside
    vLLM's scheduler serve it, by request id."""
    from ecoserve_sched.policies.ecoserve import EcoServeConfig

    cost = load_profile(profile)
    sim = run(tr, "ecoserve-recompute", cost, slo=slo, config=EcoServeConfig(swap=False, scale_predictions=scaled), **kw)
    real = run(tr, "ecoserve-vllm-real", cost, slo=slo, plugin={"scale_predictions": True} if scaled else None, **kw)
    return [sorted(r.requests, key=lambda q: q.rid) for r in (sim, real)]


def _agree(sim: list, real: list) -> None:
    for f in ("first_token_s", "finish_s"):
        assert [getattr(r, f) for r in real] == pytest.approx([getattr(r, f) for r in sim], rel=1e-9), f


def test_the_plugin_parks_a_request_only_after_it_decoded_a_step() -> None:
    """A prompt of two chunks (91 tokens, a budget of 64) was parkable in the step after its
    first token, before it decoded, where the simulator waits a step (a differential fuzzer's
    find: the third request's first token 5.6043 s in vLLM against 5.6238 s)."""
    tr = Trace("t", np.array([0.0, 1.8, 1.8]), np.array([1, 91, 1]), np.array([362, 51, 1]),
               np.array([511, 511, 603]), rl=np.array([[227, 1821, 1821], [53, 425, 425], [302, 2420, 2420]]))
    _agree(*_pair(tr, SLO_, kv_blocks=23, token_budget=64, max_running=2))


def test_the_plugin_times_an_amortized_chunk_as_it_ran() -> None:
    """A chunk that ended one prompt and began another was timed as one chunk after the first
    one's computed tokens, and repaid over 11 decode-only steps, not the simulator's 9."""
    tr = Trace("t", np.array([20.4, 20.6, 24.0, 26.0, 26.0, 26.0]), np.array([1, 20953, 976, 1, 1, 1]),
               np.array([251, 1, 1, 1, 1, 1]), np.array([251, 2048, 2048, 1, 2048, 1]),
               rl=np.array([[1, 13, 13], [0, 1, 1], [8, 64, 64], [0, 0, 0], [0, 1, 1], [0, 4, 4]]))
    _agree(*_pair(tr, SLO(5.0, 0.05), kv_blocks=1401, token_budget=2048, max_running=3))


def test_a_prompts_last_token_in_a_chunk_of_its_own_is_no_decode() -> None:
    """The plug-in counted a prompt with its last token left as decoding: a smaller prompt
    budget than the simulator's (2 tokens, not 3), so the second request's TTFT estimate made it
    give way (its first token 0.634 s in vLLM against 0.447 s; a differential fuzzer's find)."""
    tr = Trace("t", np.zeros(3), np.array([4, 30, 1]), np.array([1, 1, 50]), np.array([1, 1, 50]),
               rl=np.array([[0, 1, 1], [0, 1, 1], [0, 50, 50]]))
    _agree(*_pair(tr, SLO(0.5, 0.2), kv_blocks=16, token_budget=3, max_running=2))


def test_a_due_parked_request_resumes_after_the_preempted_ones() -> None:
    """Request 5 is parked and falls due; request 7 is preempted after that. The simulator
    resumes the preempted one first (docs/scheduler.md, *Parking*); the plug-in's queue put the
    due parked request at its front (finishes 26.352 s and 34.163 s, against the simulator's
    30.667 s and 28.300 s; a differential fuzzer's find)."""
    tr = Trace("t", np.array([0, 0, 0, 0, 0, 2.5, 2.5, 2.6, 3.0]), np.ones(9, int),
               np.array([1, 1, 1, 1, 1, 380, 1, 447, 1283]), np.array([2048, 1, 2048, 2048, 1, 734, 2048, 509, 814]))
    _agree(*_pair(tr, SLO(2.0, 0.1), kv_blocks=51, token_budget=2048, max_running=256))


def test_no_admission_in_a_step_that_preempted() -> None:
    """vLLM admits nothing in a step whose running pass preempted (``if not preempted_reqs``);
    the simulator admitted there, so a request started a step early (finishes 3.6415 s against
    vLLM's 3.6608 s; a differential fuzzer's find)."""
    tr = Trace("t", np.zeros(4), np.array([20, 1, 1, 1]), np.array([159, 161, 116, 1]),
               np.array([321, 161, 194, 1]), rl=np.array([[0, 6, 13], [1, 13, 13], [0, 7, 7], [0, 1, 1]]))
    _agree(*_pair(tr, SLO(5.0, 0.02), kv_blocks=19, token_budget=2048, max_running=256))


def test_a_prompt_takes_its_blocks_chunk_by_chunk_as_in_vllm() -> None:
    """A 3,374-token prompt (211 of 217 blocks) prefilled 4 tokens a step. The simulator took
    all its blocks at admission, so the decode beside it ran out of blocks and was preempted
    (finishing at 39.66 s); vLLM takes each chunk's blocks as it is scheduled, and the decode
    finishes at 15.60 s in the blocks the prompt has not reached yet (a differential fuzzer's
    find)."""
    tr = Trace("t", np.array([0.0, 0.0, 0.221]), np.array([3374, 29, 1]), np.array([1, 1, 410]),
               np.array([1, 2048, 410]), rl=np.array([[0, 0, 0], [-1, 0, 0], [2, 22, 22]]))
    sim, real = _pair(tr, SLO(5.0, 0.2), kv_blocks=217, token_budget=4, max_running=2)
    _agree(sim, real)
    assert sim[2].finish_s == pytest.approx(15.600, abs=1e-3) and sim[2].preemptions == 0


def test_the_plugin_gives_a_prompt_up_as_lost_only_where_admission_runs() -> None:
    """Parking asked for the waiting head at every step, which settled EcoServe's queue: at a
    step with a decode and a prompt running (a TBT-aware budget of 3 tokens) the 200-token
    prompt's TTFT estimate passed its SLO and it gave way, though the simulator tests it only
    when its admission runs, a step later, with nothing running and the whole budget (4 tokens):
    request 4's first token came at 2.57 s in vLLM against 4.43 s (a differential fuzzer's find)."""
    tr = Trace("t", np.zeros(6), np.array([1, 1, 193, 200, 1, 51]), np.array([11, 1, 18, 1, 1, 1]),
               np.array([256, 1, 17, 256, 188, 105]),
               rl=np.array([[0, 1, 1], [0, 0, 0], [0, 2, 2], [3, 30, 30], [6, 54, 54], [1, 9, 9]]))
    sim, real = _pair(tr, SLO(5.0, 0.2), kv_blocks=25, token_budget=4, max_running=3)
    _agree(sim, real)
    assert sim[4].first_token_s == pytest.approx(4.4329, abs=1e-3)


def test_in_a_step_that_preempts_the_plugin_hands_decodes_their_tokens_first() -> None:
    """14 blocks, a 7-token budget: at 0.87 s five decodes run beside a 10-token prompt's chunks
    and a block runs out. The plug-in sorted all of ``running`` by the victim key for vLLM (which
    preempts from the end), and vLLM hands its token budget out in that order: the prompt, its key
    small, took 6 tokens and four decodes got none, so nothing was preempted; the simulator
    runs every decode first and preempts request 8 (the largest key) for the block, finishing
    it at 1.19 s where vLLM finished it at 0.95 s (a differential fuzzer's find). The victims
    go last now, the others in the order the simulator runs them."""
    tr = Trace("t", np.zeros(11), np.array([1, 1, 1, 5, 10, 1, 1, 5, 1, 8, 2]),
               np.array([40, 33, 1, 30, 1, 1, 52, 20, 34, 1, 1]),
               np.array([63, 63, 2048, 30, 1, 2048, 42, 62, 63, 2048, 1]),
               rl=np.array([[-1, 0, 0], [-1, 0, 0], [0, 0, 0], [-1, 0, 0], [0, 1, 0], [-1, 0, 0],
                            [-1, 0, 0], [-1, 0, 0], [-1, 0, 0], [-1, 0, 0], [1, 1, 1]]))
    sim, real = _pair(tr, SLO(5.0, 0.2), kv_blocks=14, token_budget=7, max_running=6)
    _agree(sim, real)
    assert sim[8].finish_s == pytest.approx(1.1895, abs=1e-3) and sim[8].preemptions == 1


def test_a_prompt_put_back_keeps_its_place_among_ties_as_in_vllm() -> None:
    """Requests 3 and 13, 14-token prompts arriving together, tie in EcoServe's order. Request 3
    is admitted, preempted before its first token, and both then give way (a 0.5 s TTFT SLO).
    The simulator breaks the tie by request id; the plug-in's queue broke it by the order
    pushed, so 3 went behind 13 and the two swapped first tokens (1.135 and 1.210 s; a
    differential fuzzer's find). Ties go in arrival order now."""
    tr = Trace("t", np.zeros(15), np.array([1, 1, 1, 14, 4, 11, 1, 1, 1, 1, 1, 1, 1, 14, 1]),
               np.array([1, 43, 36, 1, 30, 1, 1, 1, 1, 1, 55, 20, 37, 1, 1]),
               np.array([1, 256, 256, 1, 247, 1, 1, 1, 2048, 1, 45, 498, 256, 1, 2048]),
               rl=np.array([[-1, 0, 0], [-1, 0, 0], [-1, 0, 0], [0, 1, 1], [-1, 0, 0], [0, 7, 7], [0, 0, 0],
                            [-1, 0, 0], [0, 0, 0], [-1, 0, 0], [-1, 0, 0], [-1, 0, 0], [-1, 0, 0], [-1, 0, 0],
                            [1, 8, 8]]))
    sim, real = _pair(tr, SLO(0.5, 0.2), kv_blocks=13, token_budget=7, max_running=6)
    _agree(sim, real)
    assert sim[3].first_token_s == pytest.approx(1.1350, abs=1e-3)
    assert sim[13].first_token_s == pytest.approx(1.2099, abs=1e-3)


def test_a_step_that_preempts_parks_nothing_as_in_vllm() -> None:
    """Long prompts (3,000-5,900 tokens) into 370 blocks, no predictions: in steps whose blocks
    did not suffice the plug-in still parked decodes for the waiting head, where the simulator
    admits, and so parks, nothing after a preemption (vLLM admits nothing either): 25 parks
    against 19, and request 26's first token at 33.75 s against 48.32 s (a differential
    fuzzer's find, 154 requests reduced to 27)."""
    tr = Trace("t", np.array([4, 4.1, 5, 8, 8.6, 9, 9.4, 10, 11, 12, 13, 15, 16.8, 18, 20, 20, 20.3, 20.7, 21.6, 22.3, 25, 27, 27, 27.2, 29.4, 30, 32.244]),
               np.array([1, 5900, 1, 1, 1, 1, 9, 134, 1, 3080, 5914, 5545, 1, 1, 79, 131, 1, 1, 5656, 449, 1, 1, 1, 1, 1, 1, 5147]),
               np.array([1450, 1, 1, 1715, 2130, 1, 1679, 398, 1, 1, 1, 5, 1, 1, 866, 1, 160, 593, 212, 112, 1, 1, 1, 241, 299, 1, 1]),
               np.array([2045, 1, 1, 1690, 2045, 2048, 1592, 342, 1, 1, 2048, 256, 1, 1, 511, 1, 264, 511, 344, 256, 1, 1, 1, 358, 290, 1, 1]),
               rl=np.array([[-1, 0, 0]] * 27))
    sim, real = _pair(tr, SLO(2.0, 0.2), profile="llama3-8b-a100-80gb", kv_blocks=370, token_budget=584,
                      max_running=256)
    _agree(sim, real)
    assert sim[26].first_token_s == pytest.approx(48.317, abs=1e-2)


def test_the_plugin_preempts_the_rules_victim_after_moving_decodes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-token budget: request 1 decodes behind request 2's prompt, so the plug-in moves it
    first (``decodes_first``) and the step then needs more blocks than are free. The plug-in
    counted the blocks in the order before that move, found they fitted, left ``running``
    unsorted, and vLLM preempted the prompt (the last in line), not the rules' victim, request 1
    (``_victim_key``'s largest; a differential fuzzer's find)."""
    from ecoserve_sched.engines.vllm_scheduler import EcoServeVllmSyncScheduler

    preempted: list[str] = []
    base = EcoServeVllmSyncScheduler._preempt_request

    def record(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        preempted.append(request.request_id)
        return base(self, request, *args, **kwargs)

    monkeypatch.setattr(EcoServeVllmSyncScheduler, "_preempt_request", record)
    tr = Trace("t", np.array([2.0, 2.0, 29.9, 30.0]), np.array([1647, 1098, 3255, 1]), np.array([1, 1371, 1, 1]),
               np.array([1, 1324, 1, 2048]), rl=np.array([[1, 14, 14], [42, 343, 343], [0, 0, 0], [0, 6, 6]]))
    res = run(tr, "ecoserve-vllm-real", load_profile("llama2-13b-a100-80gb"), slo=SLO(2.0, 0.2), kv_blocks=317,
              token_budget=4, max_running=3)
    assert preempted == ["1"] and res.counters["preemptions"] == 1


def test_a_known_length_neither_scales_nor_teaches_the_prediction_scale() -> None:
    """One rule (``rules.length_known``) in both: 32 one-token requests (``max_tokens`` 1) taught
    the simulator's scale and not the plug-in's (scales 1.0 and 3.0, the last first token
    50.037 s against 50.123 s)."""
    n = 32
    rl1 = [[0, 1, 1]] * (2 * n)
    tr = Trace("t", np.r_[np.zeros(2 * n), 50.0, 50.0], np.r_[np.ones(2 * n, int), 400, 1],
               np.r_[np.ones(n, int), np.full(n, 3), 1, 1], np.r_[np.ones(n, int), np.full(n + 2, 2048)],
               rl=np.array([*rl1, [0, 1, 1], [0, 2, 2]]))
    _agree(*_pair(tr, SLO_, scaled=True, kv_blocks=4000, max_running=1))


def test_the_replay_takes_the_plugins_settings_by_name() -> None:
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("t", np.zeros(1), np.array([5]), np.array([3]), np.array([30]))
    for policy, plugin, says in (("ecoserve-vllm-real", {"bogus": 1}, "the replay reads no plugin setting 'bogus'"),
                                 # built with the scheduler, which the replay builds without them (was:
                                 # accepted and ignored)
                                 ("ecoserve-vllm-real", {"predictor": "/x", "require_predictor": True},
                                  "reads no plugin setting 'predictor'; it takes default_reserve"),
                                 ("ecoserve-vllm-real", {"slo_tbt": 1}, "'slo_tbt' is the replay's own"),
                                 ("ecoserve-vllm-real", {"aging": -5}, "takes no such setting: aging=-5"),
                                 ("vllm-real", {"park": False}, "plugin settings are for ecoserve-vllm-real")):
        with pytest.raises(ValueError, match=says):
            run(tr, policy, cost, plugin=plugin)


def test_a_request_past_the_tiny_models_positions_and_predictions_the_plugin_refuses() -> None:
    """A request of more than 65,536 tokens was vLLM's ValidationError (the tiny model's
    positions); a prediction past ``max_tokens`` is taken within it, as the simulator takes it,
    and one the plug-in refuses from a client is an error, not silently its default (was: 512)."""
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("t", np.array([0.0, 0.1]), np.array([100, 50]), np.array([10, 5]), np.array([200_000, 20]),
               rl=np.array([[3, 20_000_000, 20_000_000], [2, 5, 6]]))
    for policy in ("vllm-real", "ecoserve-vllm-real"):
        assert summarize(run(tr, policy, cost, slo=SLO_), SLO_)["finished"] == 2, policy
    bad = Trace("t", np.zeros(1), np.array([10]), np.array([5]), np.array([20]), rl=np.array([[1024, 5, 6]]))
    with pytest.raises(ValueError, match=r"request 0: the vLLM plug-in would not take its prediction \(rl_bucket=1024"):
        run(bad, "ecoserve-vllm-real", cost, slo=SLO_)


def test_an_slo_the_plugin_refuses_names_no_setting_the_replay_never_reads() -> None:
    """Was: "slo_tbt=5e-05 (ECOSERVE_SLO_TBT): ...", a variable the replay does not read."""
    tr = Trace("t", np.zeros(1), np.array([10]), np.array([5]), np.array([20]))
    with pytest.raises(ValueError, match=r"^ecoserve-vllm-real: the vLLM plug-in takes no such SLO: slo_tbt=5e-05: "
                                         r"expected a finite number in \[0.0001, 3600\]$"):
        run(tr, "ecoserve-vllm-real", load_profile("llama2-13b-a100-80gb"), slo=SLO(5.0, 5e-5), predictions="oracle")


@pytest.mark.parametrize("sync, asynchronous", [("vllm-real", "async-vllm-real"),
                                                ("ecoserve-vllm-real", "ecoserve-async-vllm-real")])
def test_a_lone_request_runs_alike_with_vllms_asynchronous_loop(sync: str, asynchronous: str) -> None:
    """With nothing else to decide, the asynchronous loop runs the same steps back to back (the
    step scheduled after the last token, whose token vLLM drops, is not run to its end)."""
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("one", np.array([0.5]), np.array([3000]), np.array([40]), np.array([2048]),
               rl=np.array([[0, 40, 64]]))
    a, b = (run(tr, p, cost, slo=SLO_).requests[0] for p in (sync, asynchronous))
    assert b.generated == a.generated == 40
    assert (b.first_token_s, b.finish_s) == pytest.approx((a.first_token_s, a.finish_s), rel=1e-12)


@pytest.mark.parametrize("policy", ["async-vllm-real", "ecoserve-async-vllm-real"])
def test_vllms_asynchronous_loop_decides_a_step_ahead(policy: str) -> None:
    """A request that arrives while a step runs is first scheduled when that step ends, for
    the step after the next: its first token comes one step later than in the synchronous
    loop, where the step that starts next takes it."""
    cost = load_profile("llama2-13b-a100-80gb")
    tr = Trace("two", np.array([0.0, 0.2]), np.array([100, 100]), np.array([400, 5]), np.array([2048, 2048]),
               rl=np.array([[6, 400, 450], [0, 5, 16]]))
    sync = run(tr, policy.replace("async-", ""), cost, slo=SLO_)
    res = run(tr, policy, cost, slo=SLO_)
    a, b = (sorted(r.requests, key=lambda r: r.rid) for r in (sync, res))
    decode_s = cost.iteration_time(0, 0, 1, 150)  # about one decode step of the first request
    assert b[1].first_token_s - a[1].first_token_s == pytest.approx(decode_s, rel=0.2)
    assert [r.generated for r in b] == [400, 5]
    assert summarize(res, SLO_)["finished"] == 2


def test_vllms_asynchronous_loop_finishes_everything_under_kv_pressure() -> None:
    """Preemptions while a step is in flight (its tokens delivered after the preemption),
    finished requests scheduled once more: every request finishes with its true length."""
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace(seed=1)
    for policy in ("async-vllm-real", "ecoserve-async-vllm-real"):
        res = run(tr, policy, cost, slo=SLO_, kv_blocks=160)
        s = summarize(res, SLO_)
        assert s["finished"] + s["dropped"] == len(tr) and res.counters["preemptions"] > 0, policy
        assert all(r.generated == r.target_tokens for r in res.requests if r.finish_s >= 0), policy


def test_the_replay_refuses_a_setting_it_does_not_read() -> None:
    """Was: taken and ignored (``**_``): ``reserve_full_prompt=False`` ran vLLM's default rule, and a
    misspelt ``kv_block`` the profile's whole cache, where the simulator's ``vllm`` refuses both."""
    cost, tr = load_profile("llama2-13b-a100-80gb"), _trace(20)
    for kw in ({"kv_block": 30}, {"reserve_full_prompt": False}):
        with pytest.raises(TypeError, match=f"takes no setting {next(iter(kw))!r}"):
            run(tr, "vllm-real", cost, slo=SLO_, **kw)
    with pytest.raises(ValueError, match="check=True checks an ecoserve_sched policy's KV ledger"):
        run(tr, "vllm-real", cost, slo=SLO_, check=True)
