"""EcoServe's decisions on top of vLLM V1's own scheduler (``vllm serve M --scheduler-cls ...``).

Supported: vLLM 0.32 and 0.33 (checked at import, see :data:`SUPPORTED_VLLM`; it reads a few
internals, named below). vLLM's scheduler still runs every step and owns the KV blocks; this
subclass changes four of its decisions:

* **Predictions** are made once per request, at ``add_request`` (never inside ``schedule``),
  by the predictor bundle named by ``ECOSERVE_PREDICTOR`` on the prompt text (decoded from the
  prompt token ids with vLLM's own tokenizer, loaded when the scheduler is built); else a
  constant reservation, ``ECOSERVE_DEFAULT_RESERVE``. Client hints
  (``SamplingParams.extra_args`` keys ``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens``)
  are used only with ``ECOSERVE_TRUST_CLIENT_HINTS=1``, and only when every one is an integer in
  range (:func:`parse_hints`). Nothing a client sends, and no predictor failure, raises out of
  ``add_request`` (that would be a fatal engine error in vLLM): bad input is ignored and counted
  in ``eco_counters``.
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

Classes: :class:`EcoServeVllmScheduler` (over vLLM's ``AsyncScheduler``, for async scheduling,
vLLM's default), :class:`EcoServeVllmSyncScheduler` (over ``Scheduler``, for
``--no-async-scheduling``); each refuses to be built by an engine of the other kind, naming the
class to use. :class:`EcoServeVllmAutoScheduler` builds whichever one the engine's
``scheduler_config.async_scheduling`` needs.

Set-up is eager: settings (``ECOSERVE_*``, parsed by :func:`parse_setting`), the predictor
bundle and the tokenizer are loaded and checked when the scheduler is built, and one log line
says what is active. vLLM builds the scheduler only after loading the model, so
``python -m ecoserve_sched.engines.vllm_scheduler`` runs the same checks in seconds beforehand.

vLLM internals read: ``Scheduler.waiting`` / ``running`` / ``_preempt_request`` /
``_free_request`` / ``structured_output_manager.tokenizer``, ``KVCacheManager.allocate_slots``
(wrapped on the instance) and the single-type manager's ``req_to_blocks`` (the number of blocks
a request holds).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import operator
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import vllm

logger = logging.getLogger(__name__)

#: vLLM minor releases this module is tested against (``major.minor``; any patch release).
SUPPORTED_VLLM = ("0.32", "0.33")
ENV_PREFIX = "ECOSERVE_"
ENV_PREDICTOR = "ECOSERVE_PREDICTOR"
ENV_ALLOW_UNSUPPORTED_VLLM = "ECOSERVE_ALLOW_UNSUPPORTED_VLLM"
ENV_VLLM_OPTIONAL = "ECOSERVE_VLLM_OPTIONAL"  # read by tests/engines/conftest.py
EXTRA_KEYS = ("rl_bucket", "rl_pred_tokens", "rl_reserve_tokens")
#: Accepted range of each client hint (inclusive); anything else is ignored and counted.
HINT_LIMITS: dict[str, tuple[int, int]] = {
    "rl_bucket": (-1, 1023), "rl_pred_tokens": (1, 10_000_000), "rl_reserve_tokens": (1, 10_000_000)}
DEFAULT_BUNDLE = "default"  # ECOSERVE_PREDICTOR=default: the bundle shipped with rlpredict


class EcoServeSetupError(ValueError):
    """A setting, the predictor bundle, the tokenizer or the vLLM install is unusable."""


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is one (not a bool) or a finite float with an integer value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _short(value: Any) -> str:
    """A log-safe, bounded description of a client value (huge ints cannot even be ``repr``-ed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


# ---- settings: one parser for every ECOSERVE_* variable -------------------------------------------
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_setting(name: str, raw: str, kind: type, lo: float | None = None,
                  hi: float | None = None) -> Any:
    """``raw`` (the text of environment variable ``name``) as ``kind`` (bool, int, float, str)
    within ``[lo, hi]``; raises :class:`EcoServeSetupError` naming the variable and what it
    accepts."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise EcoServeSetupError(f"{name}={raw!r}: expected 1 or 0 (also true/false, yes/no, on/off)")
    if kind is str:
        return text or None
    accepted = ("an integer" if kind is int else "a finite number") + _range_text(lo, hi)
    try:
        value = kind(text)
    except ValueError:
        raise EcoServeSetupError(f"{name}={raw!r}: expected {accepted}") from None
    if (kind is float and not math.isfinite(value)) or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        raise EcoServeSetupError(f"{name}={raw!r}: expected {accepted}")
    return value


def _range_text(lo: float | None, hi: float | None) -> str:
    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    if lo is not None and hi is not None:
        return f" in [{num(lo)}, {num(hi)}]"
    if lo is not None:
        return f" >= {num(lo)}"
    return f" <= {num(hi)}" if hi is not None else ""


def _env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


@dataclass(slots=True)
class EcoServeVllmConfig:
    """Knobs of the vLLM scheduler; ``from_env`` reads ``ECOSERVE_<FIELD>`` (upper case).
    Ranges: :data:`_LIMITS`; values are checked at construction too."""

    predictor: str | None = None  # predictor bundle folder, or "default" (ECOSERVE_PREDICTOR)
    require_predictor: bool = False  # no usable predictor is a start-up error
    trust_client_hints: bool = False  # use the rl_* keys of SamplingParams.extra_args
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

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EcoServeVllmConfig:
        """The settings in ``environ`` (default ``os.environ``); every value goes through
        :func:`parse_setting`. Unknown ``ECOSERVE_*`` names are logged (typos)."""
        env = os.environ if environ is None else environ
        known = {_env_name(f.name) for f in fields(cls)} | {ENV_ALLOW_UNSUPPORTED_VLLM, ENV_VLLM_OPTIONAL}
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            logger.warning("EcoServe: unknown setting(s) %s ignored; known: %s",
                           ", ".join(unknown), ", ".join(sorted(known)))
        values = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None:
                values[f.name] = parse_setting(_env_name(f.name), raw, *_LIMITS[f.name])
        return cls(**values)

    def describe(self) -> str:
        """Every setting as ``ECOSERVE_X=value`` (for the start-up log line)."""
        return " ".join(f"{_env_name(f.name)}={getattr(self, f.name)}" for f in fields(self))


#: (type, lowest, highest) of each setting; None: unbounded (str: a path).
_LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "predictor": (str, None, None), "require_predictor": (bool, None, None),
    "trust_client_hints": (bool, None, None), "margin": (float, 0.0, 10.0),
    "default_reserve": (int, 1, 10_000_000), "reserve_frac": (float, 0.0, 0.5),
    "topup_lead_tokens": (int, 0, 1_000_000), "topup_frac": (float, 0.0, 100.0),
    "topup_min_tokens": (int, 1, 1_000_000), "order_weight": (float, 0.0, 1000.0),
    "slo_ttft": (float, 1e-3, 86_400.0), "slo_tbt": (float, 1e-4, 3_600.0),
    "prefill_s_per_token": (float, 0.0, 1.0),
}


def _checked(name: str, value: Any) -> Any:
    """A setting given as a Python value (not text), checked against :data:`_LIMITS`."""
    kind, lo, hi = _LIMITS[name]
    if kind is str:
        if value is None or isinstance(value, str):
            return value or None
        raise EcoServeSetupError(f"{name}={_short(value)} ({_env_name(name)}): expected a folder (str) or None")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise EcoServeSetupError(f"{name}={_short(value)} ({_env_name(name)}): expected True or False")
    accepted = ("an integer" if kind is int else "a finite number") + _range_text(lo, hi)
    try:
        n = _as_int(value) if kind is int else (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None)
        ok = n is not None and math.isfinite(n) and (lo is None or n >= lo) and (hi is None or n <= hi)
    except OverflowError:
        ok = False
    if not ok:
        raise EcoServeSetupError(f"{name}={_short(value)} ({_env_name(name)}): expected {accepted}")
    return n


# ---- the vLLM version ---------------------------------------------------------------------------
def check_vllm_version(version: str, environ: Mapping[str, str] | None = None) -> bool:
    """Raise :class:`EcoServeSetupError` unless vLLM ``version`` is a supported ``major.minor``
    (:data:`SUPPORTED_VLLM`); with ``ECOSERVE_ALLOW_UNSUPPORTED_VLLM=1`` log a warning instead.
    Returns whether the version is supported."""
    env = os.environ if environ is None else environ
    allow = parse_setting(ENV_ALLOW_UNSUPPORTED_VLLM, env.get(ENV_ALLOW_UNSUPPORTED_VLLM, "0"), bool)
    m = re.match(r"(\d+)\.(\d+)(?:\D|$)", version)
    if m and f"{int(m[1])}.{int(m[2])}" in SUPPORTED_VLLM:
        return True
    msg = (f"EcoServe's vLLM scheduler supports vLLM {' and '.join(SUPPORTED_VLLM)} (any patch "
           f"release); this is vLLM {version!r}. Install one, e.g. `pip install "
           f"'vllm>={SUPPORTED_VLLM[0]},<0.{int(SUPPORTED_VLLM[-1].split('.')[1]) + 1}'`, or set "
           f"{ENV_ALLOW_UNSUPPORTED_VLLM}=1 to try anyway (it reads vLLM internals that change "
           "between releases)")
    if allow:
        logger.warning("%s", msg)
        return False
    raise EcoServeSetupError(msg)


VLLM_VERSION = str(getattr(vllm, "__version__", "unknown"))
check_vllm_version(VLLM_VERSION)

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.request_queue import RequestQueue  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

_ADMITTING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


# ---- client hints ----------------------------------------------------------------------------------
def parse_hints(extra: Any) -> tuple[dict[str, int], str | None]:
    """The client's hints in ``extra`` (``SamplingParams.extra_args``), checked against
    :data:`HINT_LIMITS`: ``(hints, None)`` (``{}`` when none is given) or ``({}, why)`` when any
    given one is not an integer in range (then none of them is used). Never raises."""
    if extra is None:
        return {}, None
    if not isinstance(extra, Mapping):
        return {}, f"extra_args is a {type(extra).__name__}, not a mapping"
    out: dict[str, int] = {}
    for key in EXTRA_KEYS:
        try:
            if key not in extra:
                continue
            value = extra[key]
        except Exception as e:  # an in-process caller's odd mapping
            return {}, f"extra_args raised {type(e).__name__} on look-up"
        n = _as_int(value)
        lo, hi = HINT_LIMITS[key]
        if n is None or not lo <= n <= hi:
            return {}, f"{key}={_short(value)}: expected an integer in [{lo}, {hi}]"
        out[key] = n
    return out, None


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


def _predicted(out: Any, name: str) -> int:
    """Field ``name`` of a predictor's output as an int in [-1, 1e7] (numpy ints accepted)."""
    value = getattr(out, name)
    try:
        n: int | None = operator.index(value)
    except TypeError:
        n = _as_int(value)
    if n is None or not -1 <= n <= 10_000_000:
        raise ValueError(f"the predictor returned {name}={_short(value)}")
    return n


def _log_through_vllm() -> None:
    """Inside ``vllm serve`` the "vllm" logger has the only handler and does not propagate: log
    through its handlers too, else the start-up line (INFO) would be lost. No-op elsewhere."""
    vllm_logger = logging.getLogger("vllm")
    if vllm_logger.handlers and not vllm_logger.propagate and not logger.handlers:
        for handler in vllm_logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(vllm_logger.level)
        logger.propagate = False


def _vllm_config_arg(args: tuple, kwargs: dict) -> Any:
    """The ``vllm_config`` a scheduler is built with (vLLM passes it by keyword)."""
    return kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]


class EcoServeMixin:
    """The EcoServe decisions; combine with vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _log_through_vllm()
        _check_engine_kind(type(self), _vllm_config_arg(args, kwargs))
        eco_cfg = EcoServeVllmConfig.from_env()  # before vLLM's set-up: settings errors first
        super().__init__(*args, **kwargs)
        self.eco_cfg = eco_cfg
        self.rl: dict[str, RLPrediction] = {}
        self.groups: dict[int, set[str]] = defaultdict(set)
        self.eco_counters = {
            "reserved_admissions": 0, "topups": 0, "topup_misses": 0, "preemptions": 0,
            "predictions": 0,  # requests the predictor bundle predicted
            "predictor_errors": 0,  # the predictor (or the prompt's decoding) failed: default used
            "hints_used": 0,  # requests whose client hints were used
            "hints_ignored": 0,  # requests with hints while ECOSERVE_TRUST_CLIENT_HINTS is off
            "hints_invalid": 0,  # requests with a hint of the wrong type or out of range: not used
            "default_reservations": 0,  # requests that got ECOSERVE_DEFAULT_RESERVE
        }
        self._logged: set[str] = set()
        self.clock: Callable[[], float] = time.time  # the simulator swaps in its clock
        self.predictor, self.tokenizer, self.eco_mode = self._setup_prediction()
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
        logger.info("EcoServe ready: vLLM %s, %s (async_scheduling=%s); predictions: %s; client "
                    "hints: %s; settings: %s", VLLM_VERSION, type(self).__name__,
                    bool(self.scheduler_config.async_scheduling), self.eco_mode,
                    "trusted" if self.eco_cfg.trust_client_hints else "ignored",
                    self.eco_cfg.describe())

    # ---- set-up (eager: every failure here is a start-up error or an explicit mode) -------------
    def _setup_prediction(self) -> tuple[Any, Any, str]:
        """``(predictor, tokenizer, mode)``: the bundle and vLLM's tokenizer, loaded now; or no
        predictor (``ECOSERVE_REQUIRE_PREDICTOR=1`` makes that an error)."""
        cfg = self.eco_cfg
        fallback = f"default reservation of {cfg.default_reserve} tokens"
        if not cfg.predictor:
            self._no_predictor(f"{ENV_PREDICTOR} is not set")
            return None, None, fallback + " (no predictor)"
        predictor, detail = load_predictor(cfg)  # a bundle that is named but unusable: error
        mc = self.vllm_config.model_config
        if mc.skip_tokenizer_init:
            self._no_predictor("vLLM runs with skip_tokenizer_init, so the scheduler sees token "
                               "ids only and cannot give the predictor the prompt text")
            return None, None, fallback + " (skip_tokenizer_init)"
        tokenizer = getattr(self.structured_output_manager, "tokenizer", None)
        source = "vLLM's tokenizer"
        if tokenizer is None:  # not loaded by vLLM here (newer vLLM?): vLLM's own cached loader
            try:
                from vllm.tokenizers import cached_tokenizer_from_config

                tokenizer = cached_tokenizer_from_config(mc)
            except Exception as e:
                self._no_predictor(f"cannot load the tokenizer {mc.tokenizer!r} "
                                   f"(revision {mc.tokenizer_revision}): {e}")
                return None, None, fallback + " (no tokenizer)"
            source = "vLLM's cached_tokenizer_from_config"
        try:
            tokenizer.decode([0], skip_special_tokens=True)
        except Exception as e:
            self._no_predictor(f"the tokenizer {mc.tokenizer!r} cannot decode: {e}")
            return None, None, fallback + " (tokenizer cannot decode)"
        mode = (f"predictor {cfg.predictor} ({detail}) on the prompt decoded by {source} "
                f"{mc.tokenizer!r} revision {mc.tokenizer_revision}; {fallback} on failure")
        return predictor, tokenizer, mode

    def _no_predictor(self, why: str) -> None:
        if self.eco_cfg.require_predictor:
            raise EcoServeSetupError(f"ECOSERVE_REQUIRE_PREDICTOR=1 but no predictor can run: {why}")
        logger.warning("EcoServe: %s; every request without a usable hint gets the default "
                       "reservation (%d tokens). ECOSERVE_REQUIRE_PREDICTOR=1 makes this an error",
                       why, self.eco_cfg.default_reserve)

    def _log_once(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("EcoServe: " + msg + " (logged once; counted in eco_counters)", *args,
                           exc_info=exc_info)

    def eco_stats(self) -> dict[str, Any]:
        """The counters, the prediction mode and the running groups (a copy)."""
        return {**self.eco_counters, "mode": self.eco_mode,
                "client_hints": self.eco_cfg.trust_client_hints, "groups": self.group_sizes()}

    # ---- predictions (once per request, at arrival; never raises) ---------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            self.rl[request.request_id] = self.predict(request)
        super().add_request(request)

    def predict(self, request: Request) -> RLPrediction:
        """Trusted, valid client hints; else the predictor on the prompt; else the default.
        Never raises: every failure ends in the default reservation and a counter."""
        cfg = self.eco_cfg
        p = None
        try:
            p = self._from_hints(request)
        except Exception:  # a hostile extra_args (e.g. a mapping that raises): ignore it
            self.eco_counters["hints_invalid"] += 1
            self._log_once("hints-raise", "reading a request's extra_args raised", exc_info=True)
        if p is None and self.predictor is not None and self.tokenizer is not None:
            try:
                p = self._from_predictor(request)
            except Exception:
                self.eco_counters["predictor_errors"] += 1
                self._log_once("predictor", "the predictor failed on request %s; it gets the "
                               "default reservation", request.request_id, exc_info=True)
        if p is None:
            self.eco_counters["default_reservations"] += 1
            p = RLPrediction(-1, cfg.default_reserve, cfg.default_reserve, "default")
        cap = max(1, request.max_tokens)
        p.reserve_tokens = min(max(p.reserve_tokens, 1), cap)
        p.pred_tokens = min(max(p.pred_tokens, 1), cap)
        return p

    def _from_hints(self, request: Request) -> RLPrediction | None:
        sp = request.sampling_params
        extra = sp.extra_args if sp is not None else None
        if not extra or (isinstance(extra, Mapping) and not any(k in extra for k in EXTRA_KEYS)):
            return None
        if not self.eco_cfg.trust_client_hints:
            self.eco_counters["hints_ignored"] += 1
            self._log_once("hints-off", "request %s carries rl_* hints in extra_args; ignored "
                           "because ECOSERVE_TRUST_CLIENT_HINTS is off", request.request_id)
            return None
        hints, why = parse_hints(extra)
        if why is not None:
            self.eco_counters["hints_invalid"] += 1
            self._log_once("hints-invalid", "request %s: invalid hint ignored: %s",
                           request.request_id, why)
            return None
        self.eco_counters["hints_used"] += 1
        reserve = hints.get("rl_reserve_tokens", hints.get("rl_pred_tokens", self.eco_cfg.default_reserve))
        return RLPrediction(hints.get("rl_bucket", -1), hints.get("rl_pred_tokens", reserve),
                            reserve, "extra_args")

    def _from_predictor(self, request: Request) -> RLPrediction | None:
        if request.prompt_token_ids is None:  # prompt embeddings: no text to read
            return None
        text = self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
        out = self.predictor.predict([text])[0]
        values = [_predicted(out, k) for k in ("bucket", "pred_tokens", "reserve_tokens")]
        self.eco_counters["predictions"] += 1
        return RLPrediction(*values, "predictor")

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
    """EcoServe over vLLM's ``AsyncScheduler``, for engines with async scheduling (vLLM's default,
    kept as vLLM's maintainers advise)."""


class EcoServeVllmSyncScheduler(EcoServeMixin, Scheduler):
    """EcoServe over vLLM's synchronous ``Scheduler``, for ``--no-async-scheduling``."""


class EcoServeVllmAutoScheduler:
    """Builds :class:`EcoServeVllmScheduler` or :class:`EcoServeVllmSyncScheduler`, whichever the
    engine's ``scheduler_config.async_scheduling`` needs (vLLM builds the ``--scheduler-cls``
    class whatever that setting is)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        sc = _vllm_config_arg(args, kwargs).scheduler_config
        target = EcoServeVllmScheduler if sc.async_scheduling else EcoServeVllmSyncScheduler
        return target(*args, **kwargs)


_MODULE = __name__ if __name__ != "__main__" else "ecoserve_sched.engines.vllm_scheduler"


def _check_engine_kind(cls: type, vllm_config: Any) -> None:
    """vLLM uses the ``--scheduler-cls`` class whatever ``async_scheduling`` is: refuse a class
    of the other kind (an ``AsyncScheduler`` in a synchronous engine or the reverse)."""
    engine_async = bool(vllm_config.scheduler_config.async_scheduling)
    if issubclass(cls, AsyncScheduler) == engine_async:
        return
    use = EcoServeVllmScheduler if engine_async else EcoServeVllmSyncScheduler
    raise EcoServeSetupError(
        f"{cls.__name__} is built on vLLM's {'AsyncScheduler' if not engine_async else 'Scheduler'}"
        f" but this engine runs with async_scheduling={engine_async}: use --scheduler-cls "
        f"{_MODULE}.{use.__name__}, or {_MODULE}.EcoServeVllmAutoScheduler (picks the right one)")


def load_predictor(cfg: EcoServeVllmConfig) -> tuple[Any, str]:
    """The bundle named by ``cfg.predictor`` (``"default"``: the shipped one), loaded, checked
    and run once; raises :class:`EcoServeSetupError` naming ``ECOSERVE_PREDICTOR``."""
    from rlpredict.runtime import Predictor  # lazy: ONNX Runtime, no torch

    path = None if cfg.predictor == DEFAULT_BUNDLE else cfg.predictor
    t0 = time.perf_counter()
    try:
        pred = Predictor.load(path, margin=cfg.margin, threads=1)
        t1 = time.perf_counter()
        out = pred.predict(["Hello"])[0]
        _predicted(out, "reserve_tokens")
    except Exception as e:
        raise EcoServeSetupError(
            f"{ENV_PREDICTOR}={cfg.predictor!r}: cannot use this predictor bundle ({e}); expected "
            f"a folder written by `rlpredict export`, or {DEFAULT_BUNDLE!r} for the shipped one") from e
    detail = f"loaded in {t1 - t0:.2f} s, first prediction {1000 * (time.perf_counter() - t1):.1f} ms"
    logger.info("EcoServe: predictor %s: %s", cfg.predictor, detail)
    return pred, detail


def preflight(environ: Mapping[str, str] | None = None) -> str:
    """The start-up checks that need no engine: vLLM version (at import), settings, bundle.
    Returns a summary; raises :class:`EcoServeSetupError`."""
    cfg = EcoServeVllmConfig.from_env(environ)
    if cfg.predictor:
        _, detail = load_predictor(cfg)
        pred = f"predictor {cfg.predictor} ({detail}); the tokenizer is checked at engine start"
    elif cfg.require_predictor:
        raise EcoServeSetupError(f"ECOSERVE_REQUIRE_PREDICTOR=1 but {ENV_PREDICTOR} is not set")
    else:
        pred = f"no predictor: default reservation of {cfg.default_reserve} tokens"
    return (f"vLLM {VLLM_VERSION}: supported. {pred}. Client hints "
            f"{'trusted' if cfg.trust_client_hints else 'ignored'}. Settings: {cfg.describe()}")


if __name__ == "__main__":  # python -m ecoserve_sched.engines.vllm_scheduler: check before serving
    logging.basicConfig(level=logging.WARNING)
    try:
        print(preflight())
    except EcoServeSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
