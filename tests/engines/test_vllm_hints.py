"""The vLLM plug-in against hostile input and bad set-ups: client hints (off by default, checked
when on), predictor failures, ECOSERVE_* parse errors, strict predictor mode, eager predictor and
tokenizer loading, class vs engine (async/sync), the vLLM version check."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from test_vllm_scheduler import BS, check_done, clear_eco_env, drive, make, req
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

from ecoserve_sched.engines import vllm_scheduler as vs
from ecoserve_sched.engines.vllm_scheduler import (
    EcoServeSetupError,
    EcoServeVllmAutoScheduler,
    EcoServeVllmConfig,
    EcoServeVllmScheduler,
    EcoServeVllmSyncScheduler,
    check_vllm_version,
    parse_hints,
    parse_setting,
    preflight,
)
from ecoserve_sched.engines.vllm_sim import TINY_LLAMA, build_vllm_scheduler

ECO_CLASSES = [EcoServeVllmSyncScheduler, EcoServeVllmScheduler]
BUNDLE = Path(__file__).resolve().parents[2] / "models" / "rl-minilm-l6-llama3"
LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"  # a served model name the shipped bundle was trained with
LOGGER = "ecoserve_sched.engines.vllm_scheduler"


@pytest.fixture(autouse=True)
def eco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from no ECOSERVE_* setting (the defaults)."""
    clear_eco_env(monkeypatch)


class _Evil(dict):
    """A mapping that raises on every look-up (in-process callers can pass anything)."""

    def __contains__(self, key: object) -> bool:
        raise RuntimeError("boom")


# Not an integer in range for any hint key (-1 is valid for rl_bucket, so it is listed apart; 0
# is valid for every key: a length of 0 is used as 1).
GARBAGE = ["lots", "", "300", " 7", float("nan"), float("inf"), float("-inf"), -5, -1e9, 10**30,
           10**5000, 2**63, 3.5, 1e308, 1e-300, [1, 2], [], {"a": 1}, {}, None, True, False, b"12",
           complex(1, 2), {1, 2}, (3,), object(), SimpleNamespace(x=1)]
BAD_EXTRA = [[1, 2], "rl_bucket", _Evil(rl_bucket=1)]  # extra_args that is not a usable mapping


def garbage_requests() -> tuple[list[Request], int, int]:
    """~330 requests: every garbage value under every hint key (alone, next to valid keys),
    ``BAD_EXTRA``, and valid ones in between. Returns (requests, n_invalid, n_valid)."""
    extras: list[object] = []
    for key in vs.EXTRA_KEYS:
        for value in GARBAGE + ([-1] if key != "rl_bucket" else []):
            extras.append({key: value})
            other = "rl_bucket" if key != "rl_bucket" else "rl_reserve_tokens"
            extras.append({key: value, other: 3, "unrelated": value})
            extras.append({"rl_bucket": 2, "rl_pred_tokens": 40, "rl_reserve_tokens": 48, key: value})
    n_invalid = len(extras) + len(BAD_EXTRA)
    extras += BAD_EXTRA
    valid = [{"rl_reserve_tokens": 5}, {"rl_pred_tokens": 9.0, "rl_bucket": 0},
             {"rl_bucket": -1, "rl_reserve_tokens": 10_000_000}, {"other_plugin": "x"}, None]
    reqs = []
    for i, extra in enumerate(extras):
        # at least 2 tokens: a one-token request is not predicted (its length is known)
        reqs.append(_req_with(f"g{i}", 8 + i % 40, 2 + i % 12, 0.001 * i, extra))
        if i % 4 == 0:
            reqs.append(_req_with(f"v{i}", 8 + i % 30, 2 + i % 9, 0.001 * i, valid[(i // 4) % len(valid)]))
    n_valid = sum(1 for r in reqs if r.request_id[0] == "v" and r.sampling_params.extra_args
                  and any(k in r.sampling_params.extra_args for k in vs.EXTRA_KEYS))
    return reqs, n_invalid, n_valid


def _req_with(rid: str, prompt: int, max_tokens: int, arrival: float, extra: object) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    r = Request(request_id=rid, prompt_token_ids=[1] * prompt, sampling_params=sp,
                pooling_params=None, arrival_time=arrival)
    sp.extra_args = extra  # unchecked (vLLM's Request itself needs a dict: set it afterwards)
    return r


@pytest.mark.parametrize("trust", [True, False])
@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_garbage_hints_never_stop_the_scheduler(cls: type, trust: bool, monkeypatch, caplog) -> None:
    if trust:
        monkeypatch.setenv("ECOSERVE_TRUST_CLIENT_HINTS", "1")
    s = make(cls)
    reqs, n_invalid, n_valid = garbage_requests()
    assert len(reqs) >= 300
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for r in reqs:
            s.add_request(r)
    sources = {rid: p.source for rid, p in s.rl.items()}
    drive(s, max_steps=20_000)
    check_done(s)  # every request finished, KV usage back to 0
    c = s.eco_counters
    assert c["predictor_errors"] == 0
    if trust:
        assert c["hints_invalid"] == n_invalid and c["hints_used"] == n_valid
        assert c["hints_ignored"] == 0
        assert all(sources[r.request_id] == "default" for r in reqs if r.request_id[0] == "g")
        assert sum(v == "extra_args" for v in sources.values()) == n_valid
        assert len([m for m in caplog.messages if "invalid hint" in m]) == 1  # logged once
    else:
        assert c["hints_used"] == 0
        assert c["hints_invalid"] == 1  # the mapping that raises when looked into
        assert c["hints_ignored"] == n_invalid + n_valid - 1
        assert set(sources.values()) == {"default"}
        assert len([m for m in caplog.messages if "TRUST_CLIENT_HINTS is off" in m]) == 1
    assert c["default_reservations"] == len(reqs) - c["hints_used"]
    stats = s.eco_stats()
    assert stats["hints_invalid"] == c["hints_invalid"] and stats["client_hints"] is trust


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*vs.EXTRA_KEYS, "x"]), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5)))
def test_parse_hints_accepts_only_integers_in_range(extra: dict) -> None:
    hints, why = parse_hints(extra)
    given_keys = [k for k in vs.EXTRA_KEYS if k in extra]
    if why is None:
        assert set(hints) == set(given_keys)
        for k, v in hints.items():
            lo, hi = vs.HINT_LIMITS[k]
            assert type(v) is int and lo <= v <= hi and v == extra[k]
    else:
        assert hints == {} and why.split("=")[0] in given_keys


def test_hints_are_off_by_default_and_cannot_jump_the_queue(monkeypatch) -> None:
    def order(s) -> list[str]:
        s.add_request(req("early", 32, 100, arrival=0.0))
        s.add_request(req("cheater", 32, 100, arrival=0.1, rl_pred_tokens=1, rl_reserve_tokens=1))
        return [r.request_id for r in s.waiting]

    s = make(EcoServeVllmSyncScheduler)
    assert s.eco_cfg.trust_client_hints is False
    assert order(s) == ["early", "cheater"]
    assert s.rl["cheater"].source == "default" and s.eco_counters["hints_ignored"] == 1
    monkeypatch.setenv("ECOSERVE_TRUST_CLIENT_HINTS", "1")
    trusted = make(EcoServeVllmSyncScheduler)
    assert order(trusted) == ["cheater", "early"]  # why the operator must opt in
    assert trusted.rl["cheater"].source == "extra_args"
    # a bucket alone says no length: the predictor's (here the default) is used, and counted
    # (was: the default reservation, counted as a used hint)
    trusted.add_request(req("bucket", 32, 100, arrival=0.2, rl_bucket=3))
    assert trusted.rl["bucket"].source == "default" and trusted.eco_counters["hints_bucket_only"] == 1


def test_a_blank_setting_is_unset() -> None:
    """Was: a blank boolean was off (``ECOSERVE_PARK=`` turned parking off, a default-on feature);
    the version check and the middleware read blank the same way."""
    from ecoserve_sched.engines.vllm_middleware import MiddlewareConfig
    from ecoserve_sched.engines.vllm_scheduler import check_vllm_version

    cfg = EcoServeVllmConfig.from_env({"ECOSERVE_PARK": "", "ECOSERVE_GIVE_WAY": "  ", "ECOSERVE_SLO_TBT": " "})
    default = EcoServeVllmConfig()
    assert (cfg.park, cfg.give_way, cfg.slo_tbt) == (default.park, default.give_way, default.slo_tbt) == (True, True, 0.2)
    assert check_vllm_version("0.33.0", {"ECOSERVE_ALLOW_UNSUPPORTED_VLLM": ""})
    with pytest.raises(EcoServeSetupError, match="supports vLLM"):
        check_vllm_version("0.35.1", {"ECOSERVE_ALLOW_UNSUPPORTED_VLLM": " "})
    assert MiddlewareConfig.from_env({"ECOSERVE_TRUST_CLIENT_HINTS": "", "ECOSERVE_MIDDLEWARE_THREADS": ""}) \
        == MiddlewareConfig()


class _Failing:
    """Predictor failures: it raises, then returns garbage (NaN, a string, a negative size)."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, texts: list[str], generators: str | None = None) -> list[SimpleNamespace]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("ONNX Runtime fell over")
        bad = [float("nan"), "many", -7][(self.calls - 2) % 3]
        return [SimpleNamespace(bucket=1, pred_tokens=bad, reserve_tokens=bad)]


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_a_known_length_is_not_predicted(cls: type) -> None:
    """A pooling request (vLLM sets max_tokens 1) or a one-token generation is reserved one
    token without the predictor (was: a prediction on the engine thread, then cut to 1)."""
    from vllm.pooling_params import PoolingParams

    s = make(cls)
    s.predictor = _Failing()
    s.tokenizer = SimpleNamespace(decode=lambda ids, **_: "text")
    s.add_request(Request(request_id="emb", prompt_token_ids=[1] * 40, sampling_params=None,
                          pooling_params=PoolingParams(task="embed"), arrival_time=0))
    s.add_request(req("one", 40, 1))
    assert s.predictor.calls == 0 and s.eco_counters["known_lengths"] == 2
    assert {k: (p.pred_tokens, p.reserve_tokens, p.source) for k, p in s.rl.items()} == \
        {"emb": (1, 1, "max_tokens"), "one": (1, 1, "max_tokens")}
    s.add_request(req("two", 40, 2))
    assert s.predictor.calls == 1


@pytest.mark.parametrize("cls", ECO_CLASSES)
def test_predictor_failure_falls_back_to_the_default(cls: type, caplog) -> None:
    s = make(cls)
    s.predictor = _Failing()
    s.tokenizer = SimpleNamespace(decode=lambda ids, **_: "text")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(6):
            s.add_request(req(str(i), 20, 40))
        s.tokenizer = SimpleNamespace(decode=lambda ids, **_: 1 / 0)  # decoding fails too
        s.add_request(req("6", 20, 40))
    assert {p.source for p in s.rl.values()} == {"default"}
    assert {p.reserve_tokens for p in s.rl.values()} == {40}  # default 512, capped by max_tokens
    assert s.eco_counters["predictor_errors"] == 7 and s.eco_counters["default_reservations"] == 7
    assert len([m for m in caplog.messages if "predictor failed" in m]) == 1
    drive(s)
    check_done(s)


# ---- settings -------------------------------------------------------------------------------------
BAD_SETTINGS = {
    "ECOSERVE_DEFAULT_RESERVE": ["lots", "0", "1.5", "-3", "9" * 5000],
    "ECOSERVE_RESERVE_FRAC": ["0.9", "2%", "nan"],
    "ECOSERVE_AGING": ["heavy", "-1", "inf"],
    "ECOSERVE_GIVE_WAY": ["sometimes"],
    "ECOSERVE_PARK": ["often"],
    "ECOSERVE_SCALE_PREDICTIONS": ["rescale"],
    "ECOSERVE_AMORTIZE": ["sometimes"],
    "ECOSERVE_SLO_TTFT": ["0", "5s"],
    "ECOSERVE_SLO_TBT": ["-0.2"],
    "ECOSERVE_PREFILL_S_PER_TOKEN": ["fast"],
    "ECOSERVE_STEP_S": ["0", "x"],
    "ECOSERVE_TRUST_CLIENT_HINTS": ["maybe", "2"],
    "ECOSERVE_REQUIRE_PREDICTOR": ["si"],
}


def test_every_setting_is_covered() -> None:
    names = {f"ECOSERVE_{n.upper()}" for n in vs._LIMITS}
    # the two paths are checked when the scheduler is built (test_vllm_scheduler.py: a bad profile);
    # the generator is any model name
    assert set(BAD_SETTINGS) | {"ECOSERVE_PREDICTOR", "ECOSERVE_PROFILE", "ECOSERVE_GENERATOR"} == names


@pytest.mark.parametrize(("name", "raw"), [(n, v) for n, vals in BAD_SETTINGS.items() for v in vals])
def test_setting_errors_name_the_variable_and_accepted_values(name: str, raw: str) -> None:
    with pytest.raises(EcoServeSetupError) as e:
        EcoServeVllmConfig.from_env({name: raw})
    msg = str(e.value)
    assert msg.startswith(f"{name}=") and "expected" in msg
    assert ("1 or 0" in msg) if raw in ("maybe", "2", "si", "sometimes", "often", "rescale") else ("[" in msg or ">=" in msg)


def test_settings_parse_and_are_checked_when_given_directly(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = EcoServeVllmConfig.from_env({
            "ECOSERVE_DEFAULT_RESERVE": " 256 ", "ECOSERVE_SLO_TBT": "0.1", "ECOSERVE_PREDICTOR": "b/dir",
            "ECOSERVE_TRUST_CLIENT_HINTS": "Yes", "ECOSERVE_REQUIRE_PREDICTOR": "off",
            "ECOSERVE_DEFAULT_RESREVE": "9"})  # a typo: warned about, not fatal
    assert (cfg.default_reserve, cfg.slo_tbt, cfg.predictor) == (256, 0.1, "b/dir")
    assert cfg.trust_client_hints is True and cfg.require_predictor is False
    assert any("ECOSERVE_DEFAULT_RESREVE" in m for m in caplog.messages)
    assert EcoServeVllmConfig(default_reserve=300.0).default_reserve == 300
    for bad in ({"default_reserve": -1}, {"aging": math.nan}, {"slo_ttft": "5"},
                {"trust_client_hints": 1}, {"default_reserve": 10**400}, {"predictor": 3}):
        with pytest.raises(EcoServeSetupError, match=f"ECOSERVE_{next(iter(bad)).upper()}"):
            EcoServeVllmConfig(**bad)
    assert parse_setting("X", "on", bool) is True and parse_setting("X", "", str) is None


def test_retired_and_other_components_settings(caplog) -> None:
    """Settings the shared rules retired are named with the reason (``ECOSERVE_MARGIN`` too: it
    no longer changes a reservation); the middleware's own settings (one environment for both
    processes) are known, and a misspelled one is logged as unknown."""
    from ecoserve_sched.engines.vllm_middleware import SETTINGS

    env = {"ECOSERVE_TOPUP_FRAC": "0.5", "ECOSERVE_ORDER_WEIGHT": "1", "ECOSERVE_MARGIN": "0.1"}
    env |= dict.fromkeys(SETTINGS, "2")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        EcoServeVllmConfig.from_env(env)
    assert len(caplog.messages) == 1
    msg = caplog.messages[0]
    assert "retired" in msg and "ECOSERVE_TOPUP_FRAC" in msg and "ECOSERVE_AGING" in msg
    assert "ECOSERVE_MARGIN: the reservation base is rl_reserve_tokens" in msg and "MIDDLEWARE" not in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        EcoServeVllmConfig.from_env({"ECOSERVE_MIDDLEWARE_THRAEDS": "2"})
    assert len(caplog.messages) == 1 and "unknown setting(s) ECOSERVE_MIDDLEWARE_THRAEDS" in caplog.messages[0]
    assert "ECOSERVE_MIDDLEWARE_THREADS" in caplog.messages[0]  # listed among the known ones


def test_bad_setting_stops_the_scheduler_at_construction(monkeypatch) -> None:
    monkeypatch.setenv("ECOSERVE_AGING", "half")
    with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_AGING='half': expected a finite number in \[0, 1000\]"):
        make(EcoServeVllmSyncScheduler)
    monkeypatch.setenv("ECOSERVE_AGING", "9" * 5000)  # shortened, as a hint is (was: repeated whole)
    with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_AGING='9{36}\.\.\.: expected a finite number") as e:
        make(EcoServeVllmSyncScheduler)
    assert len(str(e.value)) < 120


# ---- the predictor: strict mode, eager loading -------------------------------------------------
def test_missing_predictor_is_an_error_in_strict_mode_and_explicit_otherwise(monkeypatch, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        s = make(EcoServeVllmSyncScheduler)
    assert s.predictor is None and "no predictor" in s.eco_mode
    assert any("ECOSERVE_PREDICTOR is not set" in m for m in caplog.messages)
    ready = [m for m in caplog.messages if m.startswith("EcoServe ready")]
    assert len(ready) == 1 and "default reservation of 512 tokens" in ready[0] and "UNSUPPORTED" not in ready[0]
    # a vLLM outside the supported ones, tried anyway: the ready line says so (docs/engines.md)
    import ecoserve_sched.engines.vllm_scheduler as plugin

    monkeypatch.setattr(plugin, "VLLM_SUPPORTED", False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        make(EcoServeVllmSyncScheduler)
    assert any(m.startswith(f"EcoServe ready: vLLM {plugin.VLLM_VERSION} (UNSUPPORTED), ") for m in caplog.messages)
    monkeypatch.setenv("ECOSERVE_REQUIRE_PREDICTOR", "1")
    with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_REQUIRE_PREDICTOR=1.*ECOSERVE_PREDICTOR is not set"):
        make(EcoServeVllmSyncScheduler)
    with pytest.raises(EcoServeSetupError, match="ECOSERVE_PREDICTOR is not set"):
        preflight(dict(os.environ))
    monkeypatch.setenv("ECOSERVE_PREDICTOR", str(BUNDLE))  # tests build with skip_tokenizer_init
    with pytest.raises(EcoServeSetupError, match="skip_tokenizer_init"):
        make(EcoServeVllmSyncScheduler)


def test_wrong_predictor_path_fails_at_construction_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("ECOSERVE_PREDICTOR", "/no/such/bundle")
    with pytest.raises(EcoServeSetupError, match=r"ECOSERVE_PREDICTOR='/no/such/bundle': cannot use"):
        make(EcoServeVllmSyncScheduler)
    with pytest.raises(EcoServeSetupError, match="ECOSERVE_PREDICTOR"):
        preflight(dict(os.environ))


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama config plus a real (local) tokenizer: the bundle's WordPiece one."""
    d = tmp_path_factory.mktemp("tiny-llama-tok")
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "vocab_size": 30522}))
    shutil.copy(BUNDLE / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return str(d)


def build_with_tokenizer(cls: type, model_dir: str, async_scheduling: bool = False) -> object:
    """``build_vllm_scheduler`` with the tokenizer on (vLLM's StructuredOutputManager loads it)."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048,
                         enable_chunked_prefill=True, is_encoder_decoder=False,
                         async_scheduling=async_scheduling)
    mc = ModelConfig(model=model_dir, skip_tokenizer_init=False, dtype="float32", max_model_len=2048)
    cc = CacheConfig(block_size=BS, enable_prefix_caching=False)
    cc.num_gpu_blocks = 65
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc,
                    device_config=DeviceConfig(device="cpu"))
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=65, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
    return cls(vllm_config=vc, kv_cache_config=kv, block_size=BS,
               structured_output_manager=StructuredOutputManager(vc), log_stats=False)


def test_predictor_and_tokenizer_load_when_the_scheduler_is_built(model_with_tokenizer, monkeypatch,
                                                                  caplog) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ECOSERVE_PREDICTOR", "default")  # the shipped bundle
    monkeypatch.setenv("ECOSERVE_REQUIRE_PREDICTOR", "1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        s = build_with_tokenizer(EcoServeVllmSyncScheduler, model_with_tokenizer)
    assert s.predictor is not None
    assert s.tokenizer is s.structured_output_manager.tokenizer  # vLLM's own, not a second copy
    ready = [m for m in caplog.messages if m.startswith("EcoServe ready")]
    assert len(ready) == 1 and "predictor default" in ready[0] and "vLLM's tokenizer" in ready[0]
    assert "client hints: ignored" in ready[0]
    ids = s.tokenizer.encode("Write a long essay about the history of Rome.")
    r = Request(request_id="p", prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=900),
                pooling_params=None, arrival_time=0.0)
    s.add_request(r)
    p = s.rl["p"]
    assert p.source == "predictor" and 1 <= p.reserve_tokens <= 900 and p.bucket >= 0
    assert s.eco_counters["predictions"] == 1
    # the shipped bundle reads the served model's name, as `rlpredict annotate` and the middleware
    # give it: vLLM's served model name (here the model folder), named in the ready line
    assert s.predictor.input_spec.include_generator and s.generator == model_with_tokenizer
    assert f"as generated by {model_with_tokenizer!r}" in ready[0]
    text = s.tokenizer.decode(ids, skip_special_tokens=True)
    want = s.predictor.predict([text], model_with_tokenizer)[0]
    assert (p.bucket, p.pred_tokens) == (want.bucket, want.pred_tokens)
    drive(s)
    check_done(s)


def test_the_predictor_sees_the_generator_setting_over_the_served_name(model_with_tokenizer,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ECOSERVE_PREDICTOR", "default")
    monkeypatch.setenv("ECOSERVE_GENERATOR", LLAMA3)
    s = build_with_tokenizer(EcoServeVllmSyncScheduler, model_with_tokenizer)
    assert s.generator == LLAMA3 and f"as generated by {LLAMA3!r}" in s.eco_mode
    prompts = ["Write a haiku about the sea", "List three fruits"]
    for i, prompt in enumerate(prompts):
        ids = s.tokenizer.encode(prompt)
        s.add_request(Request(request_id=str(i), prompt_token_ids=ids, pooling_params=None,
                              sampling_params=SamplingParams(max_tokens=400), arrival_time=0.0))
    texts = [s.tokenizer.decode(s.requests[str(i)].prompt_token_ids, skip_special_tokens=True)
             for i in range(len(prompts))]
    with_name = s.predictor.predict(texts, LLAMA3)
    assert [(s.rl[str(i)].pred_tokens, s.rl[str(i)].reserve_tokens) for i in range(len(prompts))] == [
        (min(w.pred_tokens, 400), min(w.reserve_tokens, 400)) for w in with_name]
    # what the plug-in predicted before it passed a name: not the same reservations
    assert [w.reserve_tokens for w in s.predictor.predict(texts)] != [w.reserve_tokens for w in with_name]
    drive(s)
    check_done(s)


def test_startup_line_goes_through_vllm_logging_when_configured() -> None:
    """In ``vllm serve`` only the (non-propagating) "vllm" logger has a handler."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger(LOGGER)
    saved = (vllm_logger.handlers[:], vllm_logger.propagate, vllm_logger.level)
    try:
        vllm_logger.handlers, vllm_logger.propagate = [handler], False
        vllm_logger.setLevel(logging.INFO)
        make(EcoServeVllmSyncScheduler)
    finally:
        vllm_logger.handlers, vllm_logger.propagate = saved[0], saved[1]
        vllm_logger.setLevel(saved[2])
        ours.handlers, ours.propagate = [], True
        ours.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in records if r.name == LOGGER and r.msg.startswith("EcoServe ready")]


# ---- class vs engine ------------------------------------------------------------------------------
def test_class_must_match_async_scheduling_and_auto_picks() -> None:
    with pytest.raises(EcoServeSetupError, match=r"async_scheduling=False: use --scheduler-cls "
                       r"ecoserve_sched\.engines\.vllm_scheduler\.EcoServeVllmSyncScheduler"):
        build_vllm_scheduler(EcoServeVllmScheduler, num_blocks=16, async_scheduling=False)
    with pytest.raises(EcoServeSetupError, match=r"async_scheduling=True: use --scheduler-cls "
                       r"ecoserve_sched\.engines\.vllm_scheduler\.EcoServeVllmScheduler"):
        build_vllm_scheduler(EcoServeVllmSyncScheduler, num_blocks=16, async_scheduling=True)
    for async_scheduling, want in ((True, EcoServeVllmScheduler), (False, EcoServeVllmSyncScheduler)):
        s = build_vllm_scheduler(EcoServeVllmAutoScheduler, num_blocks=16, async_scheduling=async_scheduling)
        assert type(s) is want
    from vllm.config import SchedulerConfig

    name = "ecoserve_sched.engines.vllm_scheduler.EcoServeVllmAutoScheduler"
    sc = SchedulerConfig(scheduler_cls=name, max_model_len=2048, is_encoder_decoder=False)
    assert sc.get_scheduler_cls() is EcoServeVllmAutoScheduler


def test_simulator_replay_uses_the_annotated_predictions(monkeypatch) -> None:
    import numpy as np

    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run
    from ecoserve_sched.trace import Trace

    sources: list[str] = []
    predict = vs.EcoServeMixin.predict

    def spy(self, request):
        p = predict(self, request)
        sources.append(p.source)
        return p

    monkeypatch.setattr(vs.EcoServeMixin, "predict", spy)
    rng = np.random.default_rng(1)
    out = rng.integers(1, 300, 40)
    tr = Trace("synthetic", np.sort(rng.uniform(0, 6, 40)), rng.integers(20, 900, 40), out,
               np.full(40, 2048), rl=np.stack([np.minimum(out // 64, 5), out, out + 32], axis=1))
    run(tr, "ecoserve-vllm-real", load_profile("llama2-13b-a100-80gb"), slo=SLO(5.0, 0.2), kv_blocks=160)
    assert sources and set(sources) == {"extra_args"}


def test_a_predicted_length_of_0_is_used_as_1_by_the_plug_in_as_by_the_simulator() -> None:
    """A bundle whose shortest bucket's median response is empty predicts 0 tokens. Was: the
    simulator used it as 1 and the plug-in refused the hint (the default 512-token reservation),
    so ``ecoserve`` and ``ecoserve-vllm-real`` ran one annotated trace on different predictions."""
    from types import MappingProxyType

    from ecoserve_sched.engines.vllm_middleware import _hints
    from ecoserve_sched.engines.vllm_sim import vllm_request
    from ecoserve_sched.policies import ecoserve_rules as rules
    from ecoserve_sched.request import SLO
    from ecoserve_sched.request import Request as SimRequest

    class Replay(EcoServeVllmSyncScheduler):
        eco_environ = MappingProxyType({})

    s = build_vllm_scheduler(Replay, num_blocks=256)
    s.eco_cfg = EcoServeVllmConfig(trust_client_hints=True)
    for rid, (b, pred, reserve) in enumerate([(0, 0, 29), (-1, 0, 0), (3, 161, 185)]):
        r = SimRequest(rid, 0.0, prompt_tokens=100, max_tokens=2048, true_output_tokens=50,
                       pred_bucket=b, pred_tokens=pred, reserve_tokens=reserve, slo=SLO())
        s.add_request(vllm_request(r, True))
        p = s.rl[str(rid)]
        assert p.source == "extra_args"
        assert (p.pred_tokens, p.reserve_tokens) == (rules.prediction_within(pred, 2048),
                                                     rules.prediction_within(reserve, 2048))
    assert s.eco_counters["hints_invalid"] == 0 and s.eco_counters["default_reservations"] == 0
    # the middleware passes such a prediction on as hints (was: a ValueError, and no hints)
    out = SimpleNamespace(bucket=0, pred_tokens=0, reserve_tokens=29)
    assert _hints(out, vs.HINT_LIMITS) == {"rl_bucket": 0, "rl_pred_tokens": 0, "rl_reserve_tokens": 29}


# ---- versions --------------------------------------------------------------------------------------
def test_vllm_version_check(caplog) -> None:
    import vllm

    assert vllm.__version__ == vs.VLLM_VERSION and check_vllm_version(vllm.__version__, {})
    for ok in ("0.32.0", "0.32.4", "0.33.0", "0.33.1rc2", "0.33.0.dev12+gabc123"):
        assert check_vllm_version(ok, {}) is True, ok
    for bad in ("0.31.9", "0.34.0", "0.3.2", "0.320.0", "1.0.0", "dev", "unknown"):
        with pytest.raises(EcoServeSetupError, match=r"supports vLLM 0\.32 and 0\.33.*ECOSERVE_ALLOW_UNSUPPORTED_VLLM=1"):
            check_vllm_version(bad, {})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_vllm_version("0.34.0", {"ECOSERVE_ALLOW_UNSUPPORTED_VLLM": "1"}) is False
    assert any("'0.34.0'" in m for m in caplog.messages)
    for version in ("0.34.0", "0.33.0"):
        with pytest.raises(EcoServeSetupError, match="ECOSERVE_ALLOW_UNSUPPORTED_VLLM='sure'"):
            check_vllm_version(version, {"ECOSERVE_ALLOW_UNSUPPORTED_VLLM": "sure"})


def test_preflight_summary() -> None:
    out = preflight({"ECOSERVE_PREDICTOR": str(BUNDLE), "ECOSERVE_TRUST_CLIENT_HINTS": "1"})
    assert out.startswith(f"vLLM {vs.VLLM_VERSION}: supported. predictor {BUNDLE}")
    assert "Client hints trusted (safe only behind the EcoServe middleware" in out
    assert "no predictor" in preflight({})
    assert "prefill budget from profile llama3-8b-h100-80gb" in preflight({"ECOSERVE_PROFILE": "llama3-8b-h100-80gb"})
    with pytest.raises(EcoServeSetupError, match="ECOSERVE_PROFILE='nope'") as e:
        preflight({"ECOSERVE_PROFILE": "nope"})
    assert str(e.value).count("shipped: ") == 1  # was: the list twice, over 1 KB
    assert "served model's profile on this GPU, built at engine start" in preflight({"ECOSERVE_PROFILE": "auto"})
    # the middleware's settings too: one environment reaches both processes (was: not checked)
    with pytest.raises(EcoServeSetupError, match="ECOSERVE_MIDDLEWARE_THREADS"):
        preflight({"ECOSERVE_MIDDLEWARE_THREADS": "0"})
    assert "middleware predictor default" in preflight({"ECOSERVE_MIDDLEWARE_PREDICTOR": "default"})


def test_preflight_names_the_settings_this_configuration_never_reads(caplog) -> None:
    """Were named only at engine start, after the model loaded (a reviewer's find)."""
    with caplog.at_level(logging.WARNING):
        preflight({"ECOSERVE_PROFILE": "llama3-8b-h100-80gb", "ECOSERVE_STEP_S": "0.05"})
        preflight({"ECOSERVE_AMORTIZE": "0"})
    said = [m for m in caplog.messages if "no effect here" in m]
    assert len(said) == 2 and "ECOSERVE_STEP_S" in said[0] and "ECOSERVE_AMORTIZE" in said[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # read: nothing said
        preflight({"ECOSERVE_PROFILE": "llama3-8b-h100-80gb", "ECOSERVE_AMORTIZE": "0"})
    assert not [m for m in caplog.messages if "no effect here" in m]


def test_preflight_command_reports_a_bad_version_setting_in_one_line() -> None:
    """The version check runs at import, before ``python -m``'s own error handling: a typo in
    ECOSERVE_ALLOW_UNSUPPORTED_VLLM was a traceback with exit 1."""
    import subprocess
    import sys

    env = {**os.environ, "ECOSERVE_ALLOW_UNSUPPORTED_VLLM": "maybe", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "ecoserve_sched.engines.vllm_scheduler"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "error: ECOSERVE_ALLOW_UNSUPPORTED_VLLM='maybe': expected 1 or 0" in p.stderr
    assert "Traceback" not in p.stderr


def test_settings_this_configuration_never_reads_are_named() -> None:
    """Were taken without a word: a step time beside a profile, amortized chunks without one, a
    generator name without a bundle that reads one."""
    from ecoserve_sched.engines.vllm_scheduler import idle_settings

    env = {"ECOSERVE_STEP_S": "0.01", "ECOSERVE_AMORTIZE": "0", "ECOSERVE_GENERATOR": "m", "ECOSERVE_PARK": "1"}
    with_profile = EcoServeVllmConfig(profile="llama3-8b-h100-80gb")
    assert [s.split(" ")[0] for s in idle_settings(with_profile, env, True, True)] == ["ECOSERVE_STEP_S"]
    assert [s.split(" ")[0] for s in idle_settings(EcoServeVllmConfig(), env, False, False)] == [
        "ECOSERVE_AMORTIZE", "ECOSERVE_GENERATOR"]
    assert idle_settings(EcoServeVllmConfig(), {"ECOSERVE_STEP_S": " "}, False, False) == []
    # the middleware's predictor reads the generator name too (docs/engines.md's set-up: no
    # scheduler predictor, the middleware's): not said to have no effect
    middleware = {**env, "ECOSERVE_MIDDLEWARE_PREDICTOR": "default"}
    assert [s.split(" ")[0] for s in idle_settings(EcoServeVllmConfig(), middleware, False, False)] == [
        "ECOSERVE_AMORTIZE"]
    own = {**middleware, "ECOSERVE_MIDDLEWARE_GENERATOR": "y"}  # the middleware's own name wins
    assert [s.split(" ")[0] for s in idle_settings(EcoServeVllmConfig(), own, False, False)] == [
        "ECOSERVE_AMORTIZE", "ECOSERVE_GENERATOR"]
