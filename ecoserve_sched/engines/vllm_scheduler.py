"""EcoServe's decisions on top of vLLM V1's own scheduler (``vllm serve M --scheduler-cls ...``).

Supported: vLLM 0.32 and 0.33 (checked at import, see :data:`SUPPORTED_VLLM`; it reads a few
internals, named below). vLLM's scheduler still runs every step and owns the KV blocks (allocated
as tokens are written, vLLM's default); this subclass changes four of its decisions, and with
``ECOSERVE_PROFILE`` each step's token budget, with the rules of the simulator's EcoServe
(``policies/ecoserve_rules.py``, the same functions and the same defaults as
``policies/ecoserve.py``, and with a profile the same numbers from the same cost model):

* **Predictions** are made once per request, at ``add_request`` (never inside ``schedule``),
  by the predictor bundle named by ``ECOSERVE_PREDICTOR`` on the prompt text (decoded from the
  prompt token ids with vLLM's own tokenizer, loaded when the scheduler is built); else a
  constant, ``ECOSERVE_DEFAULT_RESERVE``. Client hints (``SamplingParams.extra_args`` keys
  ``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens``) are used only with
  ``ECOSERVE_TRUST_CLIENT_HINTS=1``, and only when every one is an integer in range
  (:func:`parse_hints`). Nothing a client sends, and no predictor failure, raises out of
  ``add_request`` (that would be a fatal engine error in vLLM): bad input is ignored and counted
  in ``eco_counters``.
* **Order**: the waiting queue is a heap on ``rules.priority_key`` (arrival + ``aging`` x
  predicted service seconds: shortest predicted work first, with aging). Requests put back
  (preempted, skipped) with their first token (async: or with it in flight, delivered after)
  come first, in the order they were put back;
  one put back before its first token waits by its key (the simulator's queues); a request
  whose TTFT SLO is lost
  (``rules.ttft_lost``) gives way to those that can still meet it. Under ``--scheduling-policy
  priority`` the request's priority comes before all of that. vLLM's own
  ``kv_holding_waiting`` queue still goes first.
* **Admission**: besides vLLM's own block check, a request that holds no KV is admitted only if
  the projected peak (``rules.Projection``) of the admitted requests and it stays within the
  cache, less ``reserve_frac`` of it: each request grows one token per step up to its
  reservation (``rules.reservation_tokens``: the prediction's reservation, its upper quantile,
  doubled each time it is outgrown: the top-up), and reservations overlap in time (aggregate
  KVC pipelining).
  Admission stops at the first request that does not fit (vLLM's loop breaks there). Blocks
  shared through prefix caching count once; block sizes are the KV manager's (``block_size``
  x decode-context-parallel size). The test wraps ``allocate_slots`` only while vLLM takes
  waiting requests: its call for each running request goes straight to vLLM.
* **Victims**: before each step, if the blocks that the step's running requests need exceed
  the free pool, the simulator's preemptions are found (the decodes' blocks first, then the
  partial prefills' chunks at the step's budget, each preempting the largest
  ``rules.victim_key``: TTFT SLO lost, then the longest predicted remaining work, then the
  latest admitted), and ``running`` is put in the simulator's order (decodes first) with
  those victims last, so that vLLM's "preempt ``running[-1]``" takes them and hands its token
  budget out as the simulator does; when an upper bound on that need fits, nothing is counted
  per request. Under ``--scheduling-policy priority`` vLLM's own victim rule (lowest priority,
  latest arrival) applies.
* **Prediction scale** (``ECOSERVE_SCALE_PREDICTIONS``, off by default, as in the simulator):
  a new request's predicted RL is multiplied by ``rules.PredictionScale`` (the median of
  generated / predicted tokens over the last finished requests; only those that stopped or hit
  their length cap count), for a predictor trained on other traffic.
* **Parking** (``ECOSERVE_PARK``, on by default): before each step, while the waiting head is
  a new request that can still meet its TTFT, would not after another quarter TTFT SLO, and does
  not fit, and the offered load (``rules.OfferedLoad``) is below ``rules.PARK_MAX_LOAD``, the
  running request with the most slack on its mean-TBT SLO (``rules.tbt_slack_s``) is preempted
  as ``reset_prefix_cache`` preempts between steps; the queue holds it behind the new requests
  until it is due (``rules.park_due_s``), then it goes first like any request put back. The head
  is tested as vLLM's waiting loop tests it: with its prefix-cache hit, not for the skips of
  vLLM's that ``_vllm_takes`` foresees nor for a request vLLM skipped in the step before (any
  reason), only with one of vLLM's admission slots (``--max-num-active-seqs``) free. The TTFT
  estimates (give-way, parking) count the tokens vLLM would compute: not a cached prefix.
* **Prefill budget** (with ``ECOSERVE_PROFILE``, a cost-model profile): each step with decodes
  gets ``max_num_scheduled_tokens`` = its decodes + ``rules.PrefillBudget`` (the most prompt
  tokens that keep the step within ``iter_time_frac`` x ``ECOSERVE_SLO_TBT`` by the cost model,
  at least its roofline knee), for that step only; without a profile, vLLM's static budget.
  With ``ECOSERVE_AMORTIZE`` (on by default: a mean-TBT SLO), while prompts wait beyond that
  budget, the whole budget (or ``rules.amortized_chunk``'s cut of it) where
  ``rules.amortized_chunk_pays``, then no prompt tokens for ``rules.repay_steps`` steps (the
  simulator's amortized chunks).

No block is allocated ahead of the tokens written (no lookahead slots of ours: vLLM's speculative
and asynchronous-KV-load lookahead is passed through unchanged), so a top-up is a larger
projected reservation, never a run of blocks. Running requests are kept in **groups** keyed by
predicted RL bucket (``self.groups``, for statistics). Models with more than one KV-cache group
(hybrid: sliding window, Mamba), or one that is not full attention, are refused at start-up;
speculative decoding and pipeline parallelism run, untested, with a start-up warning saying so.

Classes: :class:`EcoServeVllmScheduler` (over vLLM's ``AsyncScheduler``, for async scheduling,
vLLM's default), :class:`EcoServeVllmSyncScheduler` (over ``Scheduler``, for
``--no-async-scheduling``); each refuses to be built by an engine of the other kind, naming the
class to use. :class:`EcoServeVllmAutoScheduler` builds whichever one the engine's
``scheduler_config.async_scheduling`` needs.

Set-up is eager: settings (``ECOSERVE_*``, parsed by :func:`parse_setting`), the predictor
bundle and the tokenizer are loaded and checked when the scheduler is built, and one log line
says what is active. vLLM builds the scheduler only after loading the model, so
``python -m ecoserve_sched.engines.vllm_scheduler`` runs the same checks in seconds beforehand.

vLLM internals read: ``Scheduler.waiting`` / ``kv_holding_waiting`` / ``running`` / ``policy`` /
``max_num_scheduled_tokens`` / ``num_lookahead_tokens`` / ``_preempt_request`` /
``_free_request`` / ``structured_output_manager.tokenizer`` / ``max_num_active_reqs`` /
``num_waiting_for_streaming_input`` / ``lora_config``, the ``Request`` fields vLLM's loops test
(``num_output_placeholders``, ``num_stale_output_tokens``, ``drop_stale_output``,
``structured_output_request``), ``KVCacheManager.allocate_slots``
(wrapped on the instance while vLLM takes waiting requests, which it does through the queue's
``peek_request`` / ``pop_request``; its ``new_computed_blocks`` and ``reserved_blocks``
arguments), ``get_computed_blocks`` (the waiting head's prefix-cache hit) and
``enable_kv_cache_events`` (off for that call), the block pool's
free count and the single-type manager's ``block_size`` and ``req_to_blocks``.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import math
import operator
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import vllm
except ModuleNotFoundError as e:  # the set-up check (``python -m``) says it in one line
    if __name__ != "__main__" or e.name != "vllm":
        raise
    from rlpredict.cli_boundary import missing_module

    print(f"error: {missing_module(e)}", file=sys.stderr)
    sys.exit(2)

from ..cost_model import prefill_ctx_tokens
from ..policies import ecoserve_rules as rules
from ..policies.ecoserve import EcoServeConfig
from ..request import SLO
from .chat_prompt import TurnMarkers, turn_markers
from .vllm_middleware import SETTINGS as MIDDLEWARE_SETTINGS  # the standard library only

logger = logging.getLogger(__name__)

#: vLLM minor releases this module is tested against (``major.minor``; any patch release).
SUPPORTED_VLLM = ("0.32", "0.33")
ENV_PREFIX = "ECOSERVE_"
ENV_PREDICTOR = "ECOSERVE_PREDICTOR"
ENV_ALLOW_UNSUPPORTED_VLLM = "ECOSERVE_ALLOW_UNSUPPORTED_VLLM"
ENV_VLLM_OPTIONAL = "ECOSERVE_VLLM_OPTIONAL"  # read by tests/engines/conftest.py
EXTRA_KEYS = ("rl_bucket", "rl_pred_tokens", "rl_reserve_tokens")
#: Accepted range of each client hint (inclusive); anything else is ignored and counted. A
#: length of 0 is taken, as the simulator takes it (a bundle whose shortest bucket's median
#: response is empty predicts 0), and used as 1 (``rules.prediction_within``).
HINT_LIMITS: dict[str, tuple[int, int]] = {
    "rl_bucket": (-1, 1023), "rl_pred_tokens": (0, 10_000_000), "rl_reserve_tokens": (0, 10_000_000)}
DEFAULT_BUNDLE = "default"  # ECOSERVE_PREDICTOR=default: the bundle shipped with rlpredict
#: The simulator policy's defaults (``policies/ecoserve.py``): the plug-in's are these.
_SIM: dict[str, Any] = {f.name: f.default for f in fields(EcoServeConfig)}


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
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def hints_mode(trusted: bool) -> str:
    """How client hints are read, as the start-up lines say it. Under trust, the warning that
    only the middleware makes that safe: this process cannot see whether it is in front."""
    if not trusted:
        return "ignored"
    return ("trusted (safe only behind the EcoServe middleware, which strips clients' rl_* keys: "
            "vllm serve --middleware ecoserve_sched.engines.vllm_middleware.EcoServePredictMiddleware)")


def parse_setting(name: str, raw: str, kind: type, lo: float | None = None,
                  hi: float | None = None) -> Any:
    """``raw`` (the text of environment variable ``name``) as ``kind`` (bool, int, float, str)
    within ``[lo, hi]``; raises :class:`EcoServeSetupError` naming the variable and what it
    accepts (the value shortened, as a hint is: was, a 5,000-digit value repeated whole)."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise EcoServeSetupError(f"{name}={_short(raw)}: expected 1 or 0 (also true/false, yes/no, on/off)")
    if kind is str:
        return text or None
    accepted = ("an integer" if kind is int else "a finite number") + _range_text(lo, hi)
    try:
        value = kind(text)
    except ValueError:
        raise EcoServeSetupError(f"{name}={_short(raw)}: expected {accepted}") from None
    if (kind is float and not math.isfinite(value)) or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        raise EcoServeSetupError(f"{name}={_short(raw)}: expected {accepted}")
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
    """Settings of the vLLM scheduler; ``from_env`` reads ``ECOSERVE_<FIELD>`` (upper case).
    Ranges: :data:`_LIMITS`; values are checked at construction too. The policy's defaults
    (``aging``, ``reserve_frac``, ``give_way``) are the simulator policy's
    (``policies/ecoserve.py``), read from its config so that the two cannot drift apart."""

    predictor: str | None = None  # predictor bundle folder, or "default" (ECOSERVE_PREDICTOR)
    generator: str | None = None  # the model name the predictor sees; None: vLLM's served model name
    require_predictor: bool = False  # no usable predictor is a start-up error
    trust_client_hints: bool = False  # use the rl_* keys of SamplingParams.extra_args
    default_reserve: int = 512  # predicted RL (reservation base) when no prediction is available
    reserve_frac: float = _SIM["reserve_frac"]  # share of blocks admissions leave free (global reserve)
    aging: float = _SIM["aging"]  # waiting order: arrival + aging x predicted service seconds
    give_way: bool = _SIM["give_way"]  # requests whose TTFT SLO is lost wait behind the others
    park: bool = _SIM["park"]  # preempt decodes with TBT slack for a new request that can meet its TTFT
    scale_predictions: bool = _SIM["scale_predictions"]  # predicted RL x rules.PredictionScale
    amortize: bool = _SIM["amortize"]  # amortized chunks (a mean-TBT SLO; 0 for a P99-TBT SLO)
    slo_ttft: float = SLO().ttft_s  # seconds: give-way and TTFT-missed victims
    slo_tbt: float = SLO().tbt_s  # seconds: parking's slack; x iter_time_frac: the step time target (budget)
    # Without a profile only (with one, the cost model's, as the simulator's EcoServe):
    prefill_s_per_token: float = 5e-5  # prefill seconds per prompt token (service time)
    step_s: float = 0.05  # seconds of a decode step that reads the whole KV cache (service time)
    profile: str | None = None  # cost-model profile (name or JSON file): the TBT-aware token budget

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EcoServeVllmConfig:
        """The settings in ``environ`` (default ``os.environ``); every value goes through
        :func:`parse_setting`. Unknown ``ECOSERVE_*`` names are logged (typos, or settings of
        an older release); the API-server middleware's (``vllm_middleware.SETTINGS``: ``vllm
        serve`` passes one environment to both processes) are known."""
        env = os.environ if environ is None else environ
        known = {_env_name(f.name) for f in fields(cls)} | {ENV_ALLOW_UNSUPPORTED_VLLM, ENV_VLLM_OPTIONAL}
        known |= set(MIDDLEWARE_SETTINGS)
        ours = [k for k in env if k.startswith(ENV_PREFIX)]
        retired = sorted(k for k in ours if k in _RETIRED)
        if retired:
            logger.warning("EcoServe: retired setting(s) %s ignored: %s", ", ".join(retired),
                           "; ".join(f"{k}: {_RETIRED[k]}" for k in retired))
        unknown = sorted(k for k in ours if k not in known and k not in _RETIRED)
        if unknown:
            logger.warning("EcoServe: unknown setting(s) %s ignored; known: %s",
                           ", ".join(unknown), ", ".join(sorted(known)))
        values = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None and raw.strip():  # blank is unset (was: a blank boolean turned a feature off)
                values[f.name] = parse_setting(_env_name(f.name), raw, *_LIMITS[f.name])
        return cls(**values)

    def describe(self) -> str:
        """Every setting as ``ECOSERVE_X=value`` (for the start-up log line)."""
        return " ".join(f"{_env_name(f.name)}={getattr(self, f.name)}" for f in fields(self))


#: Settings of earlier releases that the shared rules left nothing to set, and why.
_RETIRED = {
    "ECOSERVE_TOPUP_LEAD_TOKENS": "a top-up is the rules' doubling of the projected reservation",
    "ECOSERVE_TOPUP_FRAC": "a top-up is the rules' doubling of the projected reservation",
    "ECOSERVE_TOPUP_MIN_TOKENS": "a top-up is the rules' doubling of the projected reservation",
    "ECOSERVE_ORDER_WEIGHT": "the waiting order is rules.priority_key; see ECOSERVE_AGING",
    "ECOSERVE_MARGIN": "the reservation base is rl_reserve_tokens (the prediction's upper quantile), "
                       "doubled when outgrown, with no margin on top",
}

#: (type, lowest, highest) of each setting; None: unbounded (str: a path).
_LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "predictor": (str, None, None), "generator": (str, None, None), "require_predictor": (bool, None, None),
    "trust_client_hints": (bool, None, None), "default_reserve": (int, 1, 10_000_000),
    "reserve_frac": (float, 0.0, 0.5), "aging": (float, 0.0, 1000.0), "give_way": (bool, None, None),
    "park": (bool, None, None), "scale_predictions": (bool, None, None), "amortize": (bool, None, None),
    "slo_ttft": (float, 1e-3, 86_400.0), "slo_tbt": (float, 1e-4, 3_600.0),
    "prefill_s_per_token": (float, 0.0, 1.0), "step_s": (float, 1e-6, 60.0), "profile": (str, None, None),
}


def _checked(name: str, value: Any) -> Any:
    """A setting given as a Python value (not text), checked against :data:`_LIMITS`."""
    kind, lo, hi = _LIMITS[name]
    if kind is str:
        if value is None or isinstance(value, str):
            return value or None
        raise EcoServeSetupError(f"{name}={_short(value)} ({_env_name(name)}): expected a name or path (str) or None")
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
    allow = parse_setting(ENV_ALLOW_UNSUPPORTED_VLLM, env.get(ENV_ALLOW_UNSUPPORTED_VLLM, "").strip() or "0", bool)
    m = re.match(r"(\d+)\.(\d+)(?:\D|$)", version)
    if m and f"{int(m[1])}.{int(m[2])}" in SUPPORTED_VLLM:
        return True
    msg = (f"EcoServe's vLLM scheduler supports vLLM {' and '.join(SUPPORTED_VLLM)} (any patch "
           f"release); this is vLLM {version!r}. Install one, e.g. `pip install "
           f"'vllm>={SUPPORTED_VLLM[0]},<0.{int(SUPPORTED_VLLM[-1].split('.')[1]) + 1}'`, or set "
           f"{ENV_ALLOW_UNSUPPORTED_VLLM}=1 to try anyway (it reads vLLM internals that change "
           "between releases)")
    if allow:
        logger.warning("%s", msg.split("; this is")[0] + f"; this is vLLM {version!r}, tried anyway "
                       f"({ENV_ALLOW_UNSUPPORTED_VLLM}=1): it reads vLLM internals that change between releases")
        return False
    raise EcoServeSetupError(msg)


VLLM_VERSION = str(getattr(vllm, "__version__", "unknown"))
try:
    VLLM_SUPPORTED = check_vllm_version(VLLM_VERSION)
except EcoServeSetupError as e:  # `python -m` runs this before its own error handling below
    if __name__ != "__main__":
        raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.interface import PauseState  # noqa: E402
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

_ADMITTING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
#: Finished requests whose output length says how long such a response runs (not aborted,
#: ignored or failed: those were cut short).
_RAN_TO_THE_END = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


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
    """What the scheduler knows of a request's response length (tokens). ``pred_tokens`` (the
    predictive median) orders the waiting queue; ``reserve_tokens`` (the bundle's upper
    quantile, or the client's ``rl_reserve_tokens``) is the reservation base, as in the
    simulator's EcoServe."""

    bucket: int
    pred_tokens: int
    reserve_tokens: int
    source: str  # "extra_args" | "predictor" | "default" | "max_tokens" (at most one token)
    predicted: int = 0  # with ECOSERVE_SCALE_PREDICTIONS: pred_tokens before the scale


class EcoServeRequestQueue(RequestQueue):
    """Waiting requests in EcoServe's order: by ``(priority, rank, lost, key)``.

    ``priority`` is the request's own under ``--scheduling-policy priority`` (0 otherwise), so
    a request put back never passes one of a higher priority; ``rank`` 0 for requests put back
    (preempted, or skipped in a step) that have their first token, or whose first token is in
    flight and will be delivered (``first_in_flight``, async scheduling): they go first, in the
    order they were first put back (the simulator's resume queue, a FIFO); 1 for the others,
    new or put back before their first token, which wait by their key and may give way (the
    simulator's prompt heap); ``lost`` 1 once the request's TTFT SLO is lost (``lost(request)``,
    checked lazily at the head: give-way); ``key`` is ``rules.priority_key``, computed once at
    push (rank 0: the put-back order). O(log n) push and pop.
    Parked requests (parking) wait in a second heap by the time they must resume: taken after
    the new requests that can meet their TTFT, before those whose TTFT is lost, and put back
    once that time (``clock``) comes.
    ``on_take`` is called before every ``peek_request`` and ``pop_request`` (the scheduler
    turns its admission test on there: vLLM's waiting loop takes requests only through them).
    A ``pop_request`` right after a ``peek_request`` returns the request peeked: vLLM allocates
    KV for the peeked request and then runs the popped one, and the clock (give-way, parked
    requests falling due) must not swap them in between."""

    def __init__(self, key: Callable[[Request], float], lost: Callable[[Request], bool] | None = None,
                 by_priority: bool = False, on_take: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._key, self._lost, self._by_priority, self._on_take = key, lost, by_priority, on_take
        self._heap: list[tuple[int, int, int, float, int, Request]] = []
        self._seq = itertools.count()
        # Parked requests (``rules.park_due_s``): ``(due, seq, request)``, taken after the new
        # requests that can meet their TTFT, before those whose TTFT is lost; put back once
        # due. ``parking``: the request being preempted to be parked, and its due time.
        self._parked: list[tuple[float, int, Request]] = []
        self.parking: tuple[Request, float] | None = None
        # the request being preempted whose first token is in the step in flight: vLLM delivers
        # it after the put-back (stale output), so the client has it (see ``_put_back``)
        self.first_in_flight: Request | None = None
        self._clock = clock
        # request id -> when it was put back with its first token; inf for a parked request put
        # back when due: after every preempted one, as the simulator resumes them
        self._back: dict[str, float] = {}
        self._arrived: dict[str, int] = {}  # request id -> its place in arrival order (ties)
        self._peeked = False  # the last call was a peek, and nothing changed the queue since
        self.skipped: set[str] = set()  # ids vLLM skipped (``prepend_requests``); the scheduler resets it

    def _push(self, request: Request, rank: int, lost: int = 0) -> None:
        self._peeked = False
        prio = request.priority if self._by_priority else 0
        rid = request.request_id
        if rank:  # ties in arrival order, kept when it is put back or gives way, as the
            # simulator's request id (was: the order pushed, so a prompt preempted before its
            # first token went behind those of its key that had waited all along)
            key, seq = self._key(request), self._arrived.setdefault(rid, next(self._seq))
        else:
            key, seq = self._back[rid], next(self._seq)
        heapq.heappush(self._heap, (prio, rank, lost, key, seq, request))

    def _put_back(self, request: Request, again: bool) -> None:
        """Rank 0 (first, in put-back order) if it has its first token (or it is in flight:
        ``first_in_flight``; once ranked 0 a request stays so), else among the new ones.
        ``again``: skipped within a step, it keeps the place it was put back at."""
        rid = request.request_id
        # (was: the token count alone: a request preempted while its first token was in flight
        # waited as a new prompt, by its key and subject to give-way, after that token came)
        if request.num_output_tokens > 0 or rid in self._back or self.first_in_flight is request:
            if not again or rid not in self._back:
                self._back[rid] = next(self._seq)
            self._push(request, 0)
        else:
            self._push(request, 1)

    def forget(self, request_id: str) -> None:
        """The request left the scheduler."""
        self._back.pop(request_id, None)
        self._arrived.pop(request_id, None)

    def _settle(self) -> None:
        """Put parked requests that are due back (rank 0); move head requests whose TTFT is lost
        behind the others (once each)."""
        self._settle_parked()
        heap, lost = self._heap, self._lost
        while lost is not None and heap and heap[0][1] == 1 and not heap[0][2] and lost(heap[0][-1]):
            prio, rank, _, key, seq, r = heap[0]
            heapq.heapreplace(heap, (prio, rank, 1, key, seq, r))

    def _settle_parked(self) -> None:
        """Put parked requests that are due back (rank 0)."""
        parked = self._parked
        if parked:
            now = self._clock()
            while parked and parked[0][0] <= now:  # after the preempted requests, even those
                # preempted later (was: by the time it fell due, so ahead of them)
                r = heapq.heappop(parked)[2]
                self._back[r.request_id] = math.inf
                self._push(r, 0)

    def _from_parked(self) -> bool:
        """The next request is the earliest-due parked one (nothing else that can meet its TTFT
        waits); call after ``_settle``."""
        return bool(self._parked) and (not self._heap or self._heap[0][2] == 1)

    def head_new(self, may_settle: Callable[[], bool] | None = None) -> Request | None:
        """The head if it is a new request that can still meet its TTFT, else None (no side
        effects on the scheduler: parking asks this before vLLM's step). A head whose TTFT is
        lost goes behind the others only if ``may_settle()`` says so (else the queue stays as it
        is and the answer is None): the simulator tests a head only when its admission runs."""
        self._peeked = False
        h = self._heap[0] if self._heap else None
        if may_settle is None or h is None or self._lost is None or h[1] != 1 or h[2]:
            self._settle()
        elif self._lost(h[-1]):  # (asked once: the settle below asks it again only then)
            if not may_settle():
                return None
            self._settle()
        else:  # the head can meet its TTFT: only due parked requests move (rank 0: ahead of it)
            self._settle_parked()
        h = self._heap[0] if self._heap else None
        return h[-1] if h is not None and h[1] == 1 and not h[2] else None

    def add_request(self, request: Request) -> None:
        self._push(request, 1)

    def prepend_request(self, request: Request) -> None:
        if self.parking is not None and self.parking[0] is request:
            self._peeked = False
            heapq.heappush(self._parked, (self.parking[1], next(self._seq), request))
        else:
            self._put_back(request, again=False)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for r in requests:  # skipped in this step
            self.skipped.add(r.request_id)
            self._put_back(r, again=True)

    def pop_request(self) -> Request:
        if self._on_take is not None:
            self._on_take()
        if not self._peeked:  # else the order is the one the peek saw (see the class docstring)
            self._settle()
        self._peeked = False
        if self._from_parked():
            return heapq.heappop(self._parked)[-1]
        return heapq.heappop(self._heap)[-1]

    def peek_request(self) -> Request:
        if not self:
            raise IndexError("peek from an empty queue")
        if self._on_take is not None:
            self._on_take()
        self._settle()
        self._peeked = True
        return self._parked[0][-1] if self._from_parked() else self._heap[0][-1]

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = {id(r) for r in requests}
        self._peeked = False
        self._heap = [e for e in self._heap if id(e[-1]) not in drop]
        heapq.heapify(self._heap)
        if self._parked:
            self._parked = [e for e in self._parked if id(e[-1]) not in drop]
            heapq.heapify(self._parked)

    def __bool__(self) -> bool:
        return bool(self._heap) or bool(self._parked)

    def __len__(self) -> int:
        return len(self._heap) + len(self._parked)

    def __iter__(self) -> Iterator[Request]:
        """Put back and new requests in order, then the parked ones, then those whose TTFT is lost."""
        main = sorted(self._heap, key=lambda e: e[:5])
        lost = [e[-1] for e in main if e[1] == 1 and e[2]]
        return itertools.chain((e[-1] for e in main if not (e[1] == 1 and e[2])),
                               (e[-1] for e in sorted(self._parked, key=lambda e: e[:2])), lost)


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


def log_through_vllm(log: logging.Logger = logger) -> None:
    """Inside ``vllm serve`` the "vllm" logger has the only handler and does not propagate: log
    ``log`` through its handlers too, else the start-up line (INFO) would be lost. No-op
    elsewhere. Also used by the middleware (``vllm_middleware.py``) for its own logger."""
    vllm_logger = logging.getLogger("vllm")
    if vllm_logger.handlers and not vllm_logger.propagate and not log.handlers:
        for handler in vllm_logger.handlers:
            log.addHandler(handler)
        log.setLevel(vllm_logger.level)
        log.propagate = False


def _vllm_config_arg(args: tuple, kwargs: dict) -> Any:
    """The ``vllm_config`` a scheduler is built with (vLLM passes it by keyword)."""
    return kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]


class EcoServeMixin:
    """The EcoServe decisions; combine with vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    #: Skip the per-step work that cannot change a decision (see ``schedule``); False does all
    #: of it every step, the same decisions more slowly (the tests compare the two).
    fast_steps: bool = True
    #: Where the ``ECOSERVE_*`` settings are read (None: the process environment); the
    #: simulator's replay reads none: a trace replay is not configured by the serving settings.
    eco_environ: Mapping[str, str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        log_through_vllm()
        _check_engine_kind(type(self), _vllm_config_arg(args, kwargs))
        _check_kv_groups(kwargs["kv_cache_config"] if "kv_cache_config" in kwargs else args[1])
        environ = os.environ if self.eco_environ is None else self.eco_environ
        eco_cfg = EcoServeVllmConfig.from_env(environ)  # before vLLM's set-up: settings errors first
        super().__init__(*args, **kwargs)
        mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
        self._bs = mgr.block_size  # vLLM's block_size x decode-context-parallel size
        self._req_blocks = mgr.req_to_blocks  # request id -> the blocks it holds
        self._usable_blocks = self.kv_cache_manager.block_pool.num_gpu_blocks - 1  # less the null block
        self.eco_cfg = eco_cfg
        self.rl: dict[str, RLPrediction] = {}
        self.groups: dict[int, set[str]] = defaultdict(set)
        self._last_prediction: tuple[list[int], list[int]] | None = None  # (prompt ids, values)
        self.eco_counters = {
            "admissions": 0,  # requests admitted by the projected-peak test
            "admission_waits": 0,  # admissions refused by it (the queue waits)
            "topups": 0,  # doublings of finished requests' reservations
            "victim_sorts": 0,  # steps whose blocks do not suffice: the rules' victims put last
            "preemptions": 0,
            "predictions": 0,  # requests the predictor bundle predicted
            "predictions_shared": 0,  # of them, a prompt's next sample (n > 1): the last prediction taken
            "whole_prompts": 0,  # of them, predicted from the whole decoded prompt: no user turn found
            "predictor_errors": 0,  # the predictor (or the prompt's decoding) failed: default used
            "hints_used": 0,  # requests whose client hints were used
            "hints_ignored": 0,  # requests with hints while ECOSERVE_TRUST_CLIENT_HINTS is off
            "hints_invalid": 0,  # requests with a hint of the wrong type or out of range: not used
            "hints_bucket_only": 0,  # requests whose hints hold rl_bucket alone: the predictor's used
            "default_reservations": 0,  # requests that got ECOSERVE_DEFAULT_RESERVE
            "known_lengths": 0,  # requests of at most one token (pooling ones too): not predicted
            "parks": 0,  # running requests preempted for a new one that can meet its TTFT (parking)
            "amortized": 0,  # steps given the whole budget as an amortized chunk
            "decodes_first": 0,  # paced steps whose running decodes were put before a prefill ahead of them
        }
        # Amortized chunks: no prompt tokens before this step while prompts wait
        self._repay_until = 0
        # a step's victim search (``_before_step``): the running requests by victim key (the
        # last is preempted next), those preempted (in that order), the blocks each request
        # took, the budget each prefill took, and the free blocks after the decodes' (the
        # simulator's alarms)
        self._keyed: list[Request] = []
        self._gone: dict[str, Request] = {}
        self._taken: dict[str, int] = {}
        self._charged: dict[str, int] = {}  # the budget each prefill walked took (``_prefills_preempt``)
        self._own: dict[str, int] = {}  # the tokens a victim preempted for its own blocks would have taken
        self._hold = False  # a step whose victims the plug-in preempted before vLLM's loop: no admission
        self._free_after = 0
        self._paced: tuple[int, float, float] | None = None  # (paced budget, its time, decode-only time)
        self._logged: set[str] = set()
        self.clock: Callable[[], float] = time.time  # the simulator swaps in its clock
        self.generator: str | None = None  # the model name given to the predictor (_setup_prediction)
        self.turns: TurnMarkers | None = None  # the chat template's user-turn markers (_setup_prediction)
        self.predictor, self.tokenizer, self.eco_mode = self._setup_prediction()
        self._by_priority = self.policy == SchedulingPolicy.PRIORITY
        if idle := idle_settings(eco_cfg, environ, self.predictor is not None, self.generator is not None):
            logger.warning("EcoServe: setting(s) with no effect here: %s", "; ".join(idle))
        if self._by_priority and self.eco_cfg.park and environ.get("ECOSERVE_PARK", "").strip():
            # set, and never done (was: said nowhere)
            logger.warning("EcoServe: ECOSERVE_PARK has no effect under --scheduling-policy priority "
                           "(vLLM's priorities choose the victims)")
        self.waiting = EcoServeRequestQueue(self._order_key, self._ttft_lost, self._by_priority,
                                            self._admissions_on, lambda: self.clock())
        self.load = rules.OfferedLoad()  # predicted service seconds arriving per second (parking)
        # the step from which each running request decodes (its prefill, or its recompute's,
        # complete at its start: the simulator's ``dec_step0``), and the admitted ones not there
        # yet, with the tokens their prefill computes (its prompt, or a recompute's whole context)
        self._decode_step: dict[str, int] = {}
        self._prefilling: dict[str, tuple[Request, int]] = {}
        # Admitted requests' KV growth (running requests and async KV loads); ``_entries`` keeps
        # what was entered, to move it into a larger projection when the slots run out.
        self._slots = 2 * self.max_num_running_reqs + 16
        self.proj = rules.Projection(self._slots)
        self._entries: dict[str, tuple[int, int, int, int]] = {}
        self._step = 0  # schedule() calls: the projection's clock
        # request id -> (step, hit blocks, hit tokens): ``_prefix_hit``'s look-up of that step
        self._hits: dict[str, tuple[int, Any, int]] = {}
        # the waiting requests vLLM skipped in the step before (no parking for them: see _park)
        self._skipped_before: set[str] = set()
        self._seq: dict[str, int] = {}  # admission order (the victim key's tie-break)
        self._next_seq = itertools.count(1)
        self._no_token: dict[str, Request] = {}  # admitted, first token not seen yet
        self._first_token: dict[str, float] = {}  # clock when the first token was seen
        # blocks the projection counts per request less the blocks it covers in use: positive when
        # requests share blocks (prefix caching), negative when blocks are held outside it
        # (a KV connector's finished requests, frees vLLM defers past the step in flight)
        self._held_offset = 0
        # streaming-input sessions between two chunks: out of the projection (they do not
        # grow), their blocks still held (``_fits`` counts them)
        self._idle_sessions: set[str] = set()
        self._allocate = self.kv_cache_manager.allocate_slots  # vLLM's (see _admissions_on)
        self.kv_cache_manager.allocate_slots = self._allocate_slots
        logger.info("EcoServe ready: vLLM %s%s, %s (async_scheduling=%s, scheduling policy %s, "
                    "KV block %d tokens x %d blocks); predictions: %s; client hints: %s; "
                    "settings: %s", VLLM_VERSION, "" if VLLM_SUPPORTED else " (UNSUPPORTED)", type(self).__name__,
                    bool(self.scheduler_config.async_scheduling), self.policy.name.lower(),
                    self._bs, self._usable_blocks, self.eco_mode,
                    hints_mode(self.eco_cfg.trust_client_hints), self.eco_cfg.describe())
        if untested := untested_features(self.vllm_config):  # (was: taken without a word)
            logger.warning("EcoServe: not tested with this scheduler, so not claimed: %s", "; ".join(untested))
        if self.cost_model is not None and (why := unchunked_prompts(self.vllm_config)):
            logger.warning("EcoServe: %s, so the TBT-aware prompt budget (ECOSERVE_PROFILE) is off: each step "
                           "takes vLLM's whole token budget", why)

    @property
    def eco_cfg(self) -> EcoServeVllmConfig:
        return self._eco_cfg

    @eco_cfg.setter
    def eco_cfg(self, cfg: EcoServeVllmConfig) -> None:
        """Settings and the numbers derived from them (a replay may swap them after set-up)."""
        self._eco_cfg = cfg
        self._keep_free = rules.keep_free_blocks(cfg.reserve_frac, self._usable_blocks)
        self._kv_tokens = self._usable_blocks * self._bs
        self._iter_s = _SIM["iter_time_frac"] * cfg.slo_tbt
        self.pscale = rules.PredictionScale() if cfg.scale_predictions else None
        self.cost_model = load_cost_model(cfg.profile, self.vllm_config) if cfg.profile else None

    @property
    def cost_model(self) -> Any:
        """The cost model (``ECOSERVE_PROFILE``) that sizes each step's prefill budget, or None:
        vLLM's fixed token budget. A replay may set its own after ``eco_cfg``."""
        return self._cost_model

    @cost_model.setter
    def cost_model(self, cost: Any) -> None:
        """With a cost model, the numbers the simulator's EcoServe takes from it: each step's
        prompt budget and time (``rules.PrefillBudget``; the TTFT estimate), a prompt's prefill
        seconds and the step over the whole cache (``rules.service_s``, parking's resume cost).
        Without one, vLLM's fixed budget, steps of ``iter_time_frac`` x ``slo_tbt`` and the
        linear ``prefill_s_per_token`` and ``step_s`` settings."""
        self._cost_model = cost
        cfg, full = self.eco_cfg, self.max_num_scheduled_tokens
        self._prefill_now = full  # this step's prompt budget (the TTFT estimate)
        if cost is None:
            self._prefill_budget = None
            self._step_now_s = self._iter_s  # this step's time (the TTFT estimate)
            self._prefill_s: Callable[[int], float] = lambda n: cfg.prefill_s_per_token * n
            self._cache_step_s = cfg.step_s
            return
        # Paced only where vLLM cuts every prompt to the step's budget (``unchunked_prompts``)
        self._prefill_budget = (None if unchunked_prompts(self.vllm_config) else
                                rules.PrefillBudget(cost.iteration_time, self._iter_s, rules.prefill_floor(cost, full)))
        self._step_now_s = cost.iteration_time(full, prefill_ctx_tokens(full), 0, 0)
        self._prefill_s = cost.recompute_time
        self._cache_step_s = rules.cache_step_s(cost, self._kv_tokens)

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
                f"{mc.tokenizer!r} revision {mc.tokenizer_revision}")
        if predictor.input_spec.include_generator:  # the bundle reads the served model's name
            self.generator = served_generator(cfg, mc)
            mode += f", as generated by {self.generator!r}"
        if predictor.input_spec.mode == "last_user":  # trained on the last user message: find it
            self.turns, why = turn_markers(tokenizer)
            mode += (f", cut to the last user turn ({self.turns.user_open!r} ... {self.turns.user_close!r})"
                     if self.turns else f", whole (no user turn to cut to: {why})")
        return predictor, tokenizer, f"{mode}; {fallback} on failure"

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
            p = self.rl[request.request_id] = self.predict(request)
            # rules.PredictionScale: this traffic's scale, once, and learnt only from requests
            # that had a prediction (was: the default reservation's and one-token requests' too,
            # so 24 requests without hints took the scale to 0.1 for every predicted one)
            if self.pscale is not None and p.source in ("extra_args", "predictor"):
                p.predicted = p.pred_tokens
                p.pred_tokens = rules.prediction_within(self.pscale.scaled(p.pred_tokens), self._max_out(request))
            if self.eco_cfg.park and not self._by_priority:  # (parking's offered load)
                self.load.add(request.arrival_time, self._service(request))
        super().add_request(request)

    def predict(self, request: Request) -> RLPrediction:
        """Trusted, valid client hints; else the predictor on the prompt; else the default.
        Never raises: every failure ends in the default reservation and a counter."""
        cfg = self.eco_cfg
        if rules.length_known(self._max_out(request)):  # a pooling request (vLLM sets 1) or a one-token generation:
            self.eco_counters["known_lengths"] += 1  # the length is known (was: predicted on the
            return RLPrediction(-1, 1, 1, "max_tokens")  # engine thread, then cut to 1)
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
        p.reserve_tokens = rules.prediction_within(p.reserve_tokens, self._max_out(request))
        p.pred_tokens = rules.prediction_within(p.pred_tokens, self._max_out(request))
        return p

    def _last_in_flight(self, request: Request) -> bool:
        """Async scheduling: the step in flight gives ``request`` its last token, whatever its
        drafts, so vLLM's running loop schedules no further step for it: its ``max_tokens``-th
        (vLLM's own test), or the one that reaches the model's length (its budget cut to 0;
        was: not foreseen, so such a request could be parked with its last token in flight)."""
        return (request.num_output_placeholders > 0 and (
            request.num_computed_tokens + 2 - request.num_output_placeholders
            >= request.num_prompt_tokens + request.max_tokens)) or (
            self.max_model_len - request.num_computed_tokens - getattr(self, "num_sampled_tokens_per_step", 1) <= 0)

    def _max_out(self, request: Request) -> int:
        """The most tokens ``request`` can generate: its ``max_tokens``, and no further than the
        model's length (vLLM's ``check_stop``; was: ``max_tokens`` alone, so a request asking for
        10^6 tokens was reserved past the model's length and admission ran one at a time)."""
        return max(min(request.max_tokens, self.max_model_len - request.num_prompt_tokens), 1)

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
        if "rl_pred_tokens" not in hints and "rl_reserve_tokens" not in hints:
            # a bucket alone says no length (was: the default reservation, as a used hint)
            self.eco_counters["hints_bucket_only"] += 1
            return None
        self.eco_counters["hints_used"] += 1
        reserve = hints.get("rl_reserve_tokens", hints.get("rl_pred_tokens", self.eco_cfg.default_reserve))
        return RLPrediction(hints.get("rl_bucket", -1), hints.get("rl_pred_tokens", reserve),
                            reserve, "extra_args")

    def _from_predictor(self, request: Request) -> RLPrediction | None:
        if request.prompt_token_ids is None:  # prompt embeddings: no text to read
            return None
        ids, last = request.prompt_token_ids, self._last_prediction
        if last is not None and last[0] == ids:  # vLLM splits a request of n
            self.eco_counters["predictions"] += 1  # samples into n with one prompt (was: the
            self.eco_counters["predictions_shared"] += 1  # predictor run n times; a reviewer's find)
            return RLPrediction(*last[1], "predictor")
        text = None
        if self.turns is not None:  # the text the bundle was trained on (engines/chat_prompt.py)
            text = self.turns.last_user(self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False))
            self.eco_counters["whole_prompts"] += text is None
        if text is None:
            text = self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
        out = self.predictor.predict([text], self.generator)[0]
        values = [_predicted(out, k) for k in ("bucket", "pred_tokens", "reserve_tokens")]
        self.eco_counters["predictions"] += 1
        self._last_prediction = (list(ids), values)  # a copy: a streaming session's next chunk
        # extends its prompt's list in place (was: kept by reference; a reviewer's find)
        return RLPrediction(*values, "predictor")

    # ---- ordering (rules.priority_key, rules.ttft_lost) -------------------------------------------
    def _base(self, request_id: str) -> int:
        """The ordering's length: the predicted median RL."""
        p = self.rl.get(request_id)
        return p.pred_tokens if p is not None else self.eco_cfg.default_reserve

    def _reserve(self, request_id: str) -> int:
        """The reservation base: the prediction's reservation (its upper quantile)."""
        p = self.rl.get(request_id)
        return p.reserve_tokens if p is not None else self.eco_cfg.default_reserve

    @property
    def _active_limit(self) -> int:
        """The most requests vLLM runs at once: its admission limit ``max_num_active_reqs``
        (``--max-num-active-seqs``, vLLM 0.33; by default ``max_num_seqs``)."""
        return getattr(self, "max_num_active_reqs", self.max_num_running_reqs)

    def _service(self, request: Request) -> float:
        n = request.num_prompt_tokens
        # the slots: vLLM's admission limit (was: max_num_seqs, also under --max-num-active-seqs)
        return rules.service_s(self._prefill_s(n), n, max(self._base(request.request_id), 1),
                               self._cache_step_s, self._kv_tokens, self._active_limit)

    def _order_key(self, request: Request) -> float:
        return rules.priority_key(request.arrival_time, self._service(request), self.eco_cfg.aging)

    def _ttft_lost(self, request: Request) -> bool:
        """Give way: ``request`` can no longer have its first token within the TTFT SLO
        (``_prefill_est_s``)."""
        cfg = self.eco_cfg
        if not cfg.give_way:
            return False
        return rules.ttft_lost(self.clock(), request.arrival_time, cfg.slo_ttft, self._prefill_est_s(request))

    def _prefill_est_s(self, request: Request) -> float:
        """Time to ``request``'s first token if it started now (``rules.ttft_est_s``): the steps
        of the tokens vLLM would compute (its context less its prefix-cache hit: the simulator's
        prefill target) at this step's prompt budget, each as long as this step by the cost
        model (without one, ``iter_time_frac x slo_tbt``)."""
        # (was: the whole context: a prompt with a long cached prefix was estimated at several
        # steps for one, gave way and missed a TTFT it would have met)
        todo = request.num_tokens - self._prefix_hit(request)[1]
        return rules.ttft_est_s(todo, max(self._prefill_now, 1), self._step_now_s)

    def _prefix_hit(self, request: Request) -> tuple[Any, int]:
        """The prefix-cache hit vLLM's waiting loop would find for ``request`` now: its blocks
        (as ``allocate_slots``' ``new_computed_blocks``) and tokens (at most all but the last);
        ``(None, 0)`` without prefix caching or for a request that holds KV. vLLM's own look-up
        (``get_computed_blocks``), once per request per step (memoized: was 2-4 look-ups a step
        for a waiting head), with the KV manager's events off for it: with KV-cache events in
        "full" report mode vLLM's look-up sends the hit blocks' BlockStored events, and only
        vLLM's own look-up should (was: sent again by each of ours)."""
        if request.num_computed_tokens or not self.kv_cache_manager.enable_caching:
            return None, 0
        rid = request.request_id
        memo = self._hits.get(rid)
        if memo is not None and memo[0] == self._step:
            return memo[1], memo[2]
        mgr = self.kv_cache_manager
        # vLLM's look-up itself rather than a copy of it (find_longest_cache_hit and the checks
        # around it differ between the supported releases); only its event switch is read here
        events = getattr(mgr, "enable_kv_cache_events", False)
        if events:
            mgr.enable_kv_cache_events = False
        try:
            found = mgr.get_computed_blocks(request)
        finally:
            if events:
                mgr.enable_kv_cache_events = True
        self._hits[rid] = (self._step, found[0], found[1])
        return found[0], found[1]

    # ---- admission: vLLM's block check plus the projected peak (wraps allocate_slots) -------------
    def _allocate_slots(self, request: Request, num_new_tokens: int, *args: Any, **kw: Any) -> Any:
        if self._hold and request.status != RequestStatus.RUNNING:
            return None  # a step that preempted admits nothing (vLLM's rule; ``_preempt_unreached``)
        rid = request.request_id
        if rid in self._idle_sessions:  # a session's next chunk: it holds its KV; projected again
            blocks = self._allocate(request, num_new_tokens, *args, **kw)
            if blocks is not None:
                self._admitted(request)
            return blocks
        if request.status not in _ADMITTING or rid in self.proj or self._req_blocks.get(rid):
            return self._allocate(request, num_new_tokens, *args, **kw)  # running, or holds KV
        hit = kw.get("new_computed_blocks")
        if not self._fits(request, hit):
            self.eco_counters["admission_waits"] += 1
            return None  # vLLM stops admitting for this step, as when blocks run out
        if self.running and self._keep_free:
            kw["reserved_blocks"] = kw.get("reserved_blocks", 0) + self._keep_free
        shared = _referenced(hit)  # before the allocation, which takes a reference of each
        blocks = self._allocate(request, num_new_tokens, *args, **kw)
        if blocks is not None:
            self._admitted(request)
            # its prefix blocks others hold are in its projected context and use no new KV (was:
            # counted once per request admitted in the step, so a burst sharing a system prompt
            # was admitted a few a step; a reviewer's find)
            self._held_offset += shared
        return blocks

    def _fits(self, request: Request, hit: Any) -> bool:
        """The projected peak of the admitted requests and ``request`` stays within the cache:
        each holds its context now, grows one token per step and ends at its reservation
        (``rules.reservation_tokens``: the prediction's reservation, doubled each time it is
        outgrown).
        Blocks held by several requests (prefix caching) count once."""
        if not len(self.proj):
            return True  # alone: a reservation larger than the cache must not block it forever
        bs, g = self._bs, request.num_output_tokens
        rem = rules.reservation_tokens(self._reserve(request.request_id), g, self._max_out(request)) - g
        ctx = -(-request.num_tokens // bs) * bs
        shared = self._held_offset + _referenced(hit)  # its prefix hits others hold: no new KV
        keep = self._keep_free if self.running else 0
        if self._idle_sessions:
            keep += sum(len(self._req_blocks.get(rid, ())) for rid in self._idle_sessions)
        cap = rules.admission_cap_tokens(self._usable_blocks - keep + shared, bs, len(self.proj) + 1)
        return self.proj.demand(self._step, (ctx, rem), True, cap) <= cap

    def _admitted(self, request: Request) -> None:
        rid, g, step = request.request_id, request.num_output_tokens, self._step
        entry = (request.num_tokens - step, g - step, self._reserve(rid), self._max_out(request))
        if len(self._entries) >= self._slots:  # more async loads than slots: a larger projection
            self._slots *= 2
            self.proj = rules.Projection(self._slots)
            for other, e in self._entries.items():
                self.proj.set(other, *e)
        self._entries[rid] = entry
        self.proj.set(rid, *entry)
        self._idle_sessions.discard(rid)
        self._seq[rid] = next(self._next_seq)
        self._decode_step.pop(rid, None)
        self._prefilling[rid] = (request, request.num_tokens)
        if rid not in self._first_token:
            self._no_token[rid] = request
        p = self.rl.get(rid)
        self.groups[p.bucket if p is not None else -1].add(rid)
        self.eco_counters["admissions"] += 1

    # ---- each step: first tokens, shared blocks, victim order (rules.victim_key) ----------------
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._step += 1
        self._hold = False
        self._hits.clear()  # the look-ups of the step before
        self._skipped_before, self.waiting.skipped = self.waiting.skipped, set()
        self._before_step()
        # vLLM calls allocate_slots once per running request, then for the waiting requests it
        # takes from a queue: the admission test (the wrapper) is switched on by the first take
        # from EcoServe's queue, or now if vLLM's queue of KV-holding waiting requests (drained
        # first) is not empty. The running requests' calls go straight to vLLM.
        full = self.max_num_scheduled_tokens
        budget = full if self._prefill_budget is None else self._step_budget(full)
        # not while vLLM is paused (a request parked then is no unfinished work for a pause that
        # waits for the in-flight ones: was, the pause ended with it half done)
        # nor in a step that preempts (the simulator admits nothing after a preemption, nor
        # does vLLM: was, the plug-in parked first)
        if self.eco_cfg.park and self.running and self.waiting and not self._by_priority \
                and not self._gone and not self._takes_a_kv_holder() \
                and getattr(self, "_pause_state", PauseState.UNPAUSED) == PauseState.UNPAUSED:
            # with this step's prompt budget (as the simulator: the budget before parking; a
            # parked request's decode token is not in the step any more)
            budget -= self._park(budget)
        # (not while vLLM is paused: its loop runs no request then, and preempts none)
        if self._gone and getattr(self, "_pause_state", PauseState.UNPAUSED) != PauseState.PAUSED_ALL:
            self._preempt_unreached(budget)
        direct = self.fast_steps and not getattr(self, "kv_holding_waiting", None)
        self.kv_cache_manager.allocate_slots = self._allocate if direct else self._allocate_slots
        if self._prefill_budget is None:
            out = super().schedule(*args, **kwargs)
        else:
            self.max_num_scheduled_tokens = budget  # read once, at the step's start
            try:
                out = super().schedule(*args, **kwargs)
            finally:
                self.max_num_scheduled_tokens = full
            if self._paced is not None:
                self._repay(out)
        return out

    def _repay(self, out: Any) -> None:
        """An amortized chunk ran if this step took more prompt tokens than its paced budget:
        no prompt tokens for ``rules.repay_steps`` steps, the step timed as it ran, each prompt's
        chunk after its own computed tokens and each decode over its context (as the simulator
        times its batch; was: every prompt token as one chunk after the first partial prefill's,
        which repaid a chunk that ended one prompt and began another for 11 steps, not 9)."""
        b, t0, decode_s = self._paced
        p_tok = p_ctx = d = dctx = 0
        spec = out.scheduled_spec_decode_tokens
        for rid, k in out.num_scheduled_tokens.items():
            done = self.requests[rid].num_computed_tokens  # vLLM's schedule counted this step's
            # a prompt's chunk, or more tokens than a decode and its drafts (a recompute after a
            # failed KV load, which vLLM starts without an admission)
            if rid in self._prefilling or k > 1 + len(spec.get(rid, ())):
                p_tok += k
                p_ctx += prefill_ctx_tokens(k, done - k)
            else:
                d += 1
                dctx += done
        if p_tok > b:
            t = self.cost_model.iteration_time(p_tok, p_ctx, d, dctx)
            self._repay_until = self._step + 1 + rules.repay_steps(t, t0, decode_s)
            self.eco_counters["amortized"] += 1

    # ---- parking (rules.tbt_slack_s, rules.park_due_s, rules.OfferedLoad) -------------------------
    def _left_for_waiting(self, budget: int) -> int:
        """The tokens of ``budget`` vLLM's step leaves for the waiting queue after its running
        requests (its running loop: each takes its tokens to compute, a prompt cut to
        ``--long-prefill-token-threshold``, as vLLM cuts it). Parking is for a waiting request
        the step reaches: the simulator parks only when admission gets prompt budget after the
        partial prefills (was: the plug-in parked while a running prompt took the whole budget,
        so the head got no token and often lost its TTFT anyway: 23 parks against the
        simulator's 20, 42 against 35, in the bursts of docs/engines.md, an audit's find)."""
        return self._running_take(budget)[0]

    def _running_take(self, budget: int, until: Container[str] = ()) -> tuple[int, int]:
        """vLLM's running loop in this step, ahead of its waiting queue (or of the first request
        in ``until``): the tokens of ``budget`` it leaves (``_left_for_waiting``) and the KV
        blocks it takes from the free pool, each request's next tokens within what is left of
        ``budget``. The simulator admits (and parks) after its decodes and partial prefills took
        this step's blocks."""
        cap, taken = self._prefill_cap(), 0
        for r in self.running:
            if r.request_id in until:
                break
            n = r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens
            if n <= 0 or self._last_in_flight(r):  # (vLLM skips it, its budget untouched; was: the
                continue  # tokens of a request whose last token is in flight were counted)
            n = min(n, cap) if 0 < cap < n else n
            taken += self._new_blocks(r, min(n, budget))
            budget -= n
            if budget <= 0:
                return 0, taken
        return budget, taken

    def _new_blocks(self, r: Request, n: int) -> int:
        """The KV blocks ``r`` takes from the free pool for its next ``n`` tokens (vLLM's
        ``allocate_slots``: its blocks cover its computed tokens, and the lookahead slots)."""
        return max(0, -(-(r.num_computed_tokens + n + self.num_lookahead_tokens) // self._bs)
                   - len(self._req_blocks.get(r.request_id, ())))

    def _prefill_cap(self) -> int:
        """vLLM's cut of a request's tokens in this step (``--long-prefill-token-threshold``; 0:
        none), as its ``schedule`` sets it: none with one eligible request (running or waiting),
        and under ``--long-prefill-token-threshold-adaptive`` at least the input budget's fair
        share (was: the adaptive floor alone, in ``_left_for_waiting``; the blocks a step needs
        were counted without any cut, so a cut spreading the budget over more requests needed
        more blocks than counted, and vLLM preempted its last request, not the rules' victim)."""
        cap = self.scheduler_config.long_prefill_token_threshold
        if cap <= 0:
            return 0
        counts = getattr(self, "get_request_counts", None)
        eligible = sum(counts()) if counts is not None else len(self.running) + len(self.waiting)
        if eligible <= 1:
            return 0
        if getattr(self, "adaptive_long_prefill_threshold", False):
            cap = max(cap, self.scheduler_config.max_num_batched_tokens // eligible)
        return cap

    def _park(self, budget: int) -> int:
        """The simulator's parking: while the waiting head is a new request that can still meet
        its TTFT, would not after ``rules.PARK_WITHIN_TTFTS`` more (``rules.park_for``), and does
        not fit (its whole prompt's blocks, and the projected peak), and the offered load is below
        ``rules.PARK_MAX_LOAD``, preempt the running request with the most
        slack on its mean-TBT SLO (at least ``rules.PARK_MIN_SLACK_TTFTS`` TTFT SLOs; decoding,
        first token seen, admitted before this step, last token not in flight). The queue holds
        it until it is due (``rules.park_due_s``) or nothing that can meet its TTFT waits.
        Preempted as ``reset_prefix_cache`` does between steps (in-flight output dropped, its
        tokens sent again if it resumes). The head is tested as vLLM will test it: with its
        prefix-cache hit, and only if vLLM will not skip it (``_vllm_takes``) and did not skip it
        in the step before, and vLLM's step reaches it: the running requests leave some of the
        step's ``budget`` (``_left_for_waiting``); a slot is one of vLLM's admission limit
        (``_active_limit``). The number of requests parked."""
        # (was: len(running) against max_num_seqs: under --max-num-active-seqs, or with streaming
        # sessions between chunks holding slots, it parked with no slot for the head)
        if len(self.running) + getattr(self, "num_waiting_for_streaming_input", 0) >= self._active_limit:
            return 0  # no slot for the head (the simulator's rule)
        now, cfg = self.clock(), self.eco_cfg
        if self.load.load(now) >= rules.PARK_MAX_LOAD:
            return 0
        # a head whose TTFT is lost goes behind the others only where the step leaves budget for
        # waiting requests, where the simulator's admission would test it (was: at every step,
        # with a step's small TBT-aware budget, so a prompt was given up as lost that the
        # simulator admitted a step later with the whole budget; a differential fuzzer's find)
        head = self.waiting.head_new(lambda: self._left_for_waiting(budget) > 0)
        # (was: any head: one vLLM skips, e.g. its grammar still compiling, had a decode parked
        # for it every other step, and the parked request re-admitted in the same step)
        if head is None or not self._vllm_takes(head):
            return 0
        # vLLM skipped it in the step before, whatever the reason (one ``_vllm_takes`` does not
        # mirror: a KV connector's look-up not done, an encoder budget, a skip added later):
        # its loop would go past it again, and re-admit the parked request in this very step
        # (was: a decode parked every other step, 13 times in 1.3 s, behind a pending look-up)
        if head.request_id in self._skipped_before:
            return 0
        if not rules.park_for(now, head.arrival_time, cfg.slo_ttft, self._prefill_est_s(head)) \
                or self._left_for_waiting(budget) <= 0:  # (its pass over the running requests last)
            return 0
        bs, pool = self._bs, self.kv_cache_manager.block_pool
        # its hit blocks that requests hold take no free block (those in the free pool do:
        # vLLM takes them out of it), and count once in the projection (was: tested without its
        # hit, a decode was parked for a head that vLLM admitted anyway, then re-admitted)
        hit = self._prefix_hit(head)[0]  # (memoized: the look-up the estimate above made)
        whole = -(-head.num_tokens // bs)
        parks, later = 0, 0  # later: blocks of parked requests whose free vLLM defers to the step's end
        # (re-read each time: a parked request may have held some of the head's hit blocks)
        # the free pool as vLLM's waiting loop will find it: after the running requests took this
        # step's blocks (was: before, so a head the decodes' new blocks left no room for was
        # deemed to fit and nothing parked, where the simulator parked; a differential fuzzer's find)
        # vLLM's watermark (``--watermark``) too, kept free while a request is scheduled before
        # the head (was: left out, so with one a head vLLM refused was deemed to fit and nothing parked)
        watermark = getattr(self.kv_cache_manager, "watermark_blocks", 0)
        while (whole - _referenced(hit) > pool.get_num_free_blocks() - self._running_take(budget)[1] + later
               - ((self._keep_free + watermark) if self.running else 0) or not self._fits(head, hit)):
            best, best_slack = self._park_victim(now)
            if best is None:
                break
            later += self._park_one(best, rules.park_due_s(now, best_slack, cfg.slo_ttft))
            self.eco_counters["parks"] += 1
            parks += 1
        return parks

    def _park_one(self, victim: Request, due: float) -> int:
        """Preempt running ``victim`` to be parked until ``due``; returns its blocks whose free
        vLLM defers to the step's end (a KV connector under async scheduling)."""
        pool = self.kv_cache_manager.block_pool
        blocks = self._req_blocks.get(victim.request_id, ())
        n_blocks = len(blocks)
        # its blocks no other request holds (a shared prefix block stays with the others)
        held = sum(b.ref_cnt == 1 for b in blocks)
        free = pool.get_num_free_blocks()
        self.running.remove(victim)
        self.waiting.parking = (victim, due)
        try:
            self._preempt_request(victim, time.monotonic(), **_DROP_STALE)
        finally:
            self.waiting.parking = None
        self.prev_step_scheduled_req_ids.discard(victim.request_id)
        freed = pool.get_num_free_blocks() - free
        # out of the projection: its blocks leave the held count, its own ones the blocks in use
        # (those whose free vLLM defers too, as ``later`` counts them; was: the offset of the
        # step's start, too large by its shared blocks for the rest of the step)
        self._held_offset -= n_blocks - held
        # a KV connector under async scheduling frees a preempted request's blocks after the
        # in-flight step: count them as freed (was: every decode with slack was parked)
        return max(0, held - freed)

    def _park_victim(self, now: float) -> tuple[Request | None, float]:
        """The running request with the most slack on its mean-TBT SLO (``rules.tbt_slack_s``),
        if more than ``rules.PARK_MIN_SLACK_TTFTS`` TTFT SLOs: decoding, first token seen, a step
        decoded since its prefill (or recompute) completed (not parked right away; was: admitted
        before the last step, so a prompt of two chunks could be parked before it decoded, where
        the simulator waits a step), its last token (``max_tokens``) not in flight (async
        scheduling: it ends with that step). ``(None, 0)`` if none."""
        cfg = self.eco_cfg
        best, best_slack = None, rules.PARK_MIN_SLACK_TTFTS * cfg.slo_ttft
        for r in self.running:
            rid = r.request_id
            first = self._first_token.get(rid)
            # (was: such a request could be parked: its last token dropped, its whole context
            # recomputed later to give the same token)
            if first is None or r.num_computed_tokens < r.num_tokens - 1 \
                    or self._decode_step.get(rid, self._step) >= self._step or self._last_in_flight(r):
                continue
            slack = rules.tbt_slack_s(now, first, r.num_output_tokens, self._base(rid), cfg.slo_tbt,
                                      self._iter_s, self._prefill_s(r.num_tokens))
            if slack > best_slack:
                best, best_slack = r, slack
        return (best, best_slack) if best is not None else (None, 0.0)

    def _takes_a_kv_holder(self) -> bool:
        """vLLM drains its queue of waiting requests that hold KV first: would it take one this
        step? Not a streaming session between chunks, nor an async KV load still in flight: it
        skips those and goes on to the waiting queue, so parking still applies (was: one idle
        session turned parking off for the whole server)."""
        q = getattr(self, "kv_holding_waiting", None)
        if not q:
            return False
        idle = getattr(RequestStatus, "WAITING_FOR_STREAMING_REQ", None)
        loaded = getattr(self, "finished_recving_kv_req_ids", ())
        return any(r.status != idle and not (r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                                             and r.request_id not in loaded) for r in q)

    def _vllm_takes(self, request: Request) -> bool:
        """vLLM's waiting loop would try to schedule waiting ``request`` now rather than skip it
        (``Scheduler.schedule``'s checks that do not depend on the step's budgets): not while its
        structured-output grammar is compiling (or failed), nor while output of a preemption is
        still in flight to be delivered, nor when its LoRA adapter would exceed ``max_loras``."""
        if request.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR:
            so = request.structured_output_request
            grammar = so.grammar if so is not None else None  # vLLM's own readiness test
            if grammar is None or isinstance(grammar, Exception):
                return False
        elif request.status not in _ADMITTING:
            return False
        if getattr(request, "num_stale_output_tokens", 0) and not getattr(request, "drop_stale_output", False):
            return False
        lora = request.lora_request
        if self.lora_config and lora:
            loras = {r.lora_request.lora_int_id for r in self.running
                     if r.lora_request and r.lora_request.lora_int_id > 0}
            if len(loras) == self.lora_config.max_loras and lora.lora_int_id not in loras:
                return False
        return True

    def _step_budget(self, full: int) -> int:
        """The TBT-aware token budget (``rules.PrefillBudget``, the simulator's rule): the
        decodes, plus the most prompt tokens that keep the step within ``iter_time_frac`` x
        ``ECOSERVE_SLO_TBT`` by the cost model (at least its roofline knee); ``full`` (vLLM's
        budget) when nothing decodes. The decodes' tokens include speculative drafts, so they
        never eat into each other's share. A request decodes when at most its last token is left
        to compute and its prefill's tokens are all computed (``_prefilling``; was: the first
        alone, so a prompt's last token in a chunk of its own counted as a decode, and the budget
        came out smaller than the simulator's); one re-computing its prompt and generated tokens after a preemption is a
        prefill, as in the simulator. The prompt tokens are timed as a chunk of the first running
        prefill (vLLM schedules the running requests in order), after its computed tokens. One
        pass over the running requests (0.45 ms at 1,024 on a 2-core CPU machine)."""
        d = dctx = tokens = left = 0
        offset = -1
        behind = False  # a decode after a prefill in vLLM's order
        prefilling, gone = self._prefilling, self._gone
        for r in self.running:
            if gone and r.request_id in gone:
                continue  # preempted for the decodes' blocks: the simulator's budget is after them
            n = r.num_computed_tokens
            # decoding (async scheduling: n may run ahead of num_tokens)
            if n >= r.num_tokens - 1 and r.request_id not in prefilling:
                d += 1
                dctx += n + 1  # the step attends to its computed tokens and the one it feeds
                tokens += max(1, r.num_tokens_with_spec + r.num_output_placeholders - n)
                behind = behind or offset >= 0
            else:
                left += r.num_tokens - n
                if offset < 0:
                    offset = n
        if behind and not self._gone:
            # vLLM hands the budget out in this order: a prefill ahead of a decode took the
            # decode's share (was: a decode got no token for 6 steps behind a 6,000-token prompt
            # under --long-prefill-token-threshold). Decodes first, as the simulator runs them
            # (a stable partition; in a step that preempts, ``_victims_last`` orders them so)
            self.running[:] = sorted(self.running, key=self._not_decoding)
            self.eco_counters["decodes_first"] += 1
        offset = max(offset, 0)
        if not d or tokens >= full:
            b, t = full, -1.0
        else:
            b, t = self._prefill_budget(full - tokens, d, dctx, offset)
        self._prefill_now = b
        # this step's time at that budget (the TTFT estimate, as the simulator's)
        it = self.cost_model.iteration_time
        self._step_now_s = t if t >= 0 else it(b, prefill_ctx_tokens(b, offset), d, dctx)
        self._paced = None
        out = min(full, tokens + b)
        if d and tokens < full and self.eco_cfg.amortize and (self.waiting or left > b):
            if self._step < self._repay_until:
                out = tokens  # an amortized chunk is being repaid: decodes only
            else:
                big = full - tokens if self.waiting else min(full - tokens, left)
                big, decode_s = self._amortized_chunk(big, b, d, dctx, offset)
                if big > b:
                    self._paced = (b, self._step_now_s, decode_s)
                    out = tokens + big
        if not (self._keyed or self._gone):  # (``_keyed`` is empty once every request is a victim)
            return out
        return max(out - self._prefills_preempt(max(out - tokens, 0)), 0)

    def _prefills_preempt(self, b: int) -> int:
        """In a step whose blocks do not suffice (``_before_step``): the partial prefills' chunks
        within the step's ``b`` prompt tokens take their blocks, preempting as the simulator
        does (``_preempted_for``); the victims go last (``_victims_last``). Returns the tokens
        to take off the step's budget: the simulator set its chunks before these victims went,
        so neither a decode preempted now nor a prompt preempted after its chunk was counted
        leaves its tokens to the others (vLLM walks the victims last, and would)."""
        gone = set(self._gone)
        walk = [(r, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens)
                for r in self.running if r.request_id not in gone and self._not_decoding(r)]
        self._preempted_for(walk, self._free_after, b)
        cut, charged = 0, self._charged
        for rid, r in self._gone.items():
            if rid in gone:
                continue
            if self._not_decoding(r):
                cut += charged.get(rid, 0)
            else:  # (as ``_step_budget`` counted it)
                cut += max(1, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens)
        self._victims_last()
        return cut

    def _amortized_chunk(self, big: int, b: int, d: int, dctx: int, offset: int) -> tuple[int, float]:
        """``rules.amortized_chunk`` against this step's paced ``b`` and its time (the
        simulator's amortized chunk)."""
        return rules.amortized_chunk(self.cost_model.iteration_time, big, b, self._step_now_s, d, dctx,
                                     offset, lambda: self._next_token_slack_s(self.clock()))

    def _next_token_slack_s(self, now: float) -> float:
        """The longest this step may take with every decoding request's mean TBT within
        ``ECOSERVE_SLO_TBT`` were its next token its last (``rules.tbt_slack_s`` at one more
        token, paced at 0; the simulator's ``_next_token_slack_s``)."""
        tbt, least = self.eco_cfg.slo_tbt, float("inf")
        for r in self.running:
            first = self._first_token.get(r.request_id)
            if first is not None and r.num_computed_tokens >= r.num_tokens - 1 and r.request_id not in self._prefilling:
                g = r.num_output_tokens
                least = min(least, rules.tbt_slack_s(now, first, g, g + 1, tbt, 0.0, 0.0))
        return least

    def _admissions_on(self) -> None:
        """Route allocate_slots through the admission test for the rest of this step."""
        self.kv_cache_manager.allocate_slots = self._allocate_slots

    def _count_held_offset(self) -> int:
        """Blocks held per request, less the blocks in use: what sharing saves. Requests outside
        the projection hold theirs until they free them (a KV connector still sending a finished
        request's KV): not counted, so their blocks are taken from the cap; an idle session's are
        counted here and kept free by ``_fits``."""
        blocks, free = self._req_blocks, self.kv_cache_manager.block_pool.get_num_free_blocks()
        held = sum(map(len, blocks.values()))
        if outside := blocks.keys() - self._entries.keys():  # (a length test missed a projected
            # request without an entry beside a holder outside: a failed async load, freed)
            held -= sum(len(blocks[rid]) for rid in outside - self._idle_sessions)
        return held - (self._usable_blocks - free)

    def _before_step(self) -> None:
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        if self._keyed or self._gone:  # the last step's victim search (nothing to reset in most steps)
            self._gone, self._keyed, self._taken, self._charged, self._own = {}, [], {}, {}, {}
        self._held_offset = self._count_held_offset()
        if not self.running:
            return
        now = self.clock()
        if self._no_token:
            for rid in [rid for rid, r in self._no_token.items() if r.num_output_tokens > 0]:
                del self._no_token[rid]
                self._first_token[rid] = now
        if self._prefilling:  # every token of its prefill computed, and running (was: a prompt's last
            # token left counted as decoding; a request whose async KV load set its count, still
            # waiting for the load, decoded from then on and was parkable a step early)
            for rid in [rid for rid, (r, target) in self._prefilling.items()
                        if r.status == RequestStatus.RUNNING and r.num_computed_tokens >= target]:
                del self._prefilling[rid]
                self._decode_step[rid] = self._step
        if self._by_priority or len(self.running) < 2:
            return  # under --scheduling-policy priority vLLM's own victim rule applies
        # The blocks the whole step needs (every running request's next tokens, in order, within
        # the token budget): if they exceed the free pool, vLLM will preempt ``running[-1]``
        # until they fit, so put EcoServe's victims last.
        bs, look, budget, need = self._bs, self.num_lookahead_tokens, self.max_num_scheduled_tokens, 0
        # A request's blocks cover its computed tokens, so n more tokens need at most
        # ceil((n + look) / bs) new blocks: when that bound over the whole token budget fits the
        # free pool, no request can be preempted and the loop below is skipped (the common case).
        if self.fast_steps and (budget + len(self.running) * (look + bs - 1)) // bs <= free:
            return
        # in the order vLLM will walk: decodes first where ``_step_budget`` puts them there (was:
        # the order before, so a step whose decodes moved ahead of a prefill could need more
        # blocks than counted, and vLLM preempted the prefill, not the rules' victim)
        order = self.running if self._prefill_budget is None else sorted(self.running, key=self._not_decoding)
        cap = self._prefill_cap()
        for r in order:
            n = r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens
            n = min(cap if 0 < cap < n else n, budget)
            if n > 0 and not self._last_in_flight(r):
                budget -= n
                need += self._new_blocks(r, n)
            if budget <= 0:
                break
        if need <= free:
            return
        # The simulator's preemptions: the decodes' blocks first (its alarms), then, with the
        # step's budget on the rest, the partial prefills' chunks (``_step_budget``), each
        # preempting the largest victim key until its blocks are free. vLLM is then handed the
        # survivors in the order it walks them, and those victims last, largest key last: it
        # preempts from the end as the blocks run out (was: all of ``running`` in victim order,
        # so vLLM handed the token budget out in that order, and a prompt took a decode's token)
        self._keyed = sorted(self.running, key=lambda r: self._victim_key(r, now))
        walk = [(r, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens) for r in order]
        if self._prefill_budget is None:  # vLLM's whole budget, in its running order
            self._free_after = self._preempted_for(walk, free, self.max_num_scheduled_tokens)
            self._victims_last()
        else:
            self._free_after = self._preempted_for([(r, n) for r, n in walk if not self._not_decoding(r)], free)

    def _preempted_for(self, walk: list[tuple[Request, int]], free: int, budget: int | None = None) -> int:
        """The simulator's preemptions for ``walk``'s requests, in turn, each taking the blocks
        of its next ``n`` tokens (within ``budget``, as vLLM's loop hands it out; a prompt cut at
        ``--long-prefill-token-threshold``): while they are not free, the running request of
        the largest victim key goes (``_keyed``'s last; itself, and then it takes none). Adds
        them to ``_gone``; returns the free blocks left."""
        blocks, gone, keyed = self._req_blocks, self._gone, self._keyed
        cap, taken = self._prefill_cap(), self._taken
        for r, n in walk:
            rid = r.request_id
            if budget is not None:
                if budget <= 0:
                    break
                n = min(cap if 0 < cap < n else n, budget)
            if n <= 0 or rid in gone or self._last_in_flight(r):  # (vLLM schedules no step for the last)
                continue
            need = self._new_blocks(r, n)
            while need > free and keyed:
                v = keyed.pop()
                vid = v.request_id
                gone[vid] = v  # its own blocks (a shared prefix block stays with the others)
                free += sum(b.ref_cnt == 1 for b in blocks.get(vid, ())) + taken.pop(vid, 0)
                if v is r:
                    self._own[rid] = n
                    need = n = 0
            if need <= free:
                free -= need
                taken[rid] = need
            if budget is not None:
                budget -= n
                self._charged[rid] = n
        return free

    def _preempt_unreached(self, budget: int) -> None:
        """In a step that preempts, vLLM reaches the victims (last in ``running``) only if the
        requests before them leave some of the step's token ``budget``; where they use it up, a
        victim that only its own next tokens needed preempting would stay unscheduled, holding its
        blocks, where the simulator preempts it (was: the one difference ``docs/engines.md`` said
        was left, a prompt's chunk taking a 3-token budget ahead of a decode short of a block).
        Then preempt the victims now, from the end as vLLM's loop does, and as it does, while the
        blocks the others take this step leave one short of its own (the tokens the search
        counted for it, else its next ones); one that is not short stays, as vLLM would leave it
        (a block shared with other victims, which the search does not count as freed), and so
        does one whose blocks vLLM would free only later (a KV connector's deferred frees). The
        rest of the step admits nothing (``_hold``), as vLLM admits nothing in a step that
        preempted."""
        gone = self._gone
        left, need = self._running_take(budget, gone)  # need: the blocks the requests ahead take
        if left > 0:
            return  # vLLM's loop reaches the victims with budget left and preempts them itself
        connector = getattr(self, "connector", None)
        if connector is not None and getattr(connector, "has_pending_block_frees", lambda: False)():
            return  # vLLM's loop preempts nobody while frees are pending
        can_free = getattr(self, "_request_blocks_can_be_freed", lambda _: True)
        free = self.kv_cache_manager.block_pool.get_num_free_blocks() - need
        when = time.monotonic()
        cap = self._prefill_cap()
        while self.running and (v := self.running[-1]).request_id in gone and can_free(v):
            rid = v.request_id
            n = v.num_tokens_with_spec + v.num_output_placeholders - v.num_computed_tokens
            n = self._own.get(rid) or self._charged.get(rid) or max(1, min(n, cap) if 0 < cap < n else n)
            if free >= self._new_blocks(v, n):
                break
            free += sum(b.ref_cnt == 1 for b in self._req_blocks.get(rid, ()))  # its own (a shared one stays)
            self._preempt_request(self.running.pop(), when, **_loop_drop(self))
            self.prev_step_scheduled_req_ids.discard(rid)
            self._hold = True

    def _victims_last(self) -> None:
        """Put this step's victims (``_gone``) at the end of ``running``, the largest victim key
        last (vLLM preempts from the end); the others keep their order, decodes first where the
        prefill budget is on (``_step_budget``'s order)."""
        gone = self._gone
        if not gone:
            return
        keep = [r for r in self.running if r.request_id not in gone]
        if self._prefill_budget is not None:
            keep.sort(key=self._not_decoding)
        self.running[:] = keep + list(reversed(gone.values()))  # (preempted largest key first)
        self.eco_counters["victim_sorts"] += 1

    def _not_decoding(self, r: Request) -> bool:
        """False for a request that decodes this step (``_step_budget``'s test): the sort key
        that puts decodes first, as the simulator runs them."""
        return r.num_computed_tokens < r.num_tokens - 1 or r.request_id in self._prefilling

    def _victim_key(self, r: Request, now: float) -> tuple[bool, int, int]:
        """Largest is preempted first: TTFT SLO missed, longest predicted remaining, latest admitted."""
        rid = r.request_id
        return rules.victim_key(self._first_token.get(rid, now), r.arrival_time, self.eco_cfg.slo_ttft,
                                self._reserve(rid), r.num_output_tokens, self._max_out(r), self._seq.get(rid, 0))

    # ---- leaving ----------------------------------------------------------------------------------
    def _forget(self, request: Request) -> None:
        rid = request.request_id
        self.proj.drop(rid)
        self._entries.pop(rid, None)
        self._no_token.pop(rid, None)
        self._prefilling.pop(rid, None)
        self._decode_step.pop(rid, None)
        p = self.rl.get(rid)
        self.groups[p.bucket if p is not None else -1].discard(rid)

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """vLLM's preemption; with async scheduling a request preempted while the step that
        samples its first token is in flight gets that token (vLLM delivers stale output unless
        told to drop it): it is put back as one with its first token (the queue's rank 0) and
        its first token's time is taken when the token comes."""
        drop = kwargs.get("drop_stale_output", args[1] if len(args) > 1 else False)
        first = not drop and request.num_output_tokens == 0 and request.num_output_placeholders > 0
        self.waiting.first_in_flight = request if first else None
        try:
            super()._preempt_request(request, *args, **kwargs)
        finally:
            self.waiting.first_in_flight = None
        self._forget(request)
        if first:  # (was: forgotten; its first token's time taken only after it resumed)
            self._no_token[request.request_id] = request
        self.eco_counters["preemptions"] += 1

    def _handle_stopped_request(self, request: Request) -> bool:
        """vLLM >= 0.33: a streaming-input session (``resumable``) that ends a chunk stays, its
        KV held, waiting for its next chunk (or is queued again at once with one that came
        early). It leaves the
        projection, which would grow it one token per step for as long as it waits (it did:
        after enough idle steps no request was admitted into an empty cache); its blocks are
        counted as held until its next chunk is admitted."""
        finished = super()._handle_stopped_request(request)
        if not finished:  # waiting for its next chunk, or queued again with it: either way,
            self._forget(request)  # out of running, its KV held, admitted again as a session
            self._idle_sessions.add(request.request_id)
        return finished

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._forget(request)
        rid = request.request_id
        self._idle_sessions.discard(rid)
        self.waiting.forget(rid)
        self._hits.pop(rid, None)
        if rid in self.rl:
            # at the tokens it was last scheduled at: its last token is never written (the simulator's count)
            self.eco_counters["topups"] += rules.topups(self._reserve(rid), request.num_output_tokens - 1,
                                                        self._max_out(request))
            p = self.rl[rid]
            if self.pscale is not None and p.predicted and request.status in _RAN_TO_THE_END:
                self.pscale.observe(p.predicted, request.num_output_tokens)  # (0: added unscaled)
        self.rl.pop(rid, None)
        self._seq.pop(rid, None)
        self._first_token.pop(rid, None)
        return super()._free_request(request, *args, **kwargs)

    def group_sizes(self) -> dict[int, int]:
        """Running requests per predicted RL bucket (non-empty groups only)."""
        return {b: len(ids) for b, ids in sorted(self.groups.items()) if ids}


#: ``_preempt_request``'s keyword to drop a parked request's in-flight output (vLLM >= 0.33).
_DROP_STALE = {"drop_stale_output": True} if "drop_stale_output" in inspect.signature(
    Scheduler._preempt_request).parameters else {}


def _loop_drop(sched: Any) -> dict[str, bool]:
    """``_preempt_request``'s keyword as vLLM's own scheduling loop passes it (vLLM >= 0.33)."""
    return {"drop_stale_output": bool(getattr(sched, "requires_kv_delivery", False))} if _DROP_STALE else {}




def unchunked_prompts(vllm_config: Any) -> str | None:
    """Why vLLM does not cut every prompt to a step's token budget, or None if it does. Then
    its loop stops at a prompt (or a multimodal item) longer than the step's budget, so a paced
    budget would hold such a prompt back while anything decodes (was: a 2,000-token prompt
    beside eight decodes started once they had all finished; vLLM's own scheduler took it at
    once)."""
    sc, mc = vllm_config.scheduler_config, vllm_config.model_config
    if not sc.enable_chunked_prefill:
        return "chunked prefill is off"
    if getattr(sc, "disable_chunked_mm_input", False) and getattr(mc, "is_multimodal_model", False):
        return "multimodal items are not chunked (--disable-chunked-mm-input)"
    return None


def untested_features(vllm_config: Any) -> list[str]:
    """vLLM features this engine runs with that the plug-in is not tested with (said at
    start-up): speculative decoding (its drafts are not in the projection), pipeline
    parallelism and a local prefill cadence."""
    out = []
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and getattr(spec, "num_speculative_tokens", 0):
        out.append(f"speculative decoding ({getattr(spec, 'method', None) or 'draft model'}, "
                   f"{spec.num_speculative_tokens} draft tokens a step: drafts are passed through "
                   "unchanged and are not in the admission projection)")
    pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1)
    if pp > 1:
        out.append(f"pipeline parallelism (size {pp})")
    cadence = getattr(getattr(vllm_config, "scheduler_config", None), "prefill_schedule_interval", 1)
    if isinstance(cadence, int) and cadence > 1:  # (vLLM 0.33; was: taken without a word)
        out.append(f"a prefill cadence (prefill_schedule_interval={cadence}: vLLM holds prompts back "
                   "between its cadence steps, which parking does not foresee: it may park a decode "
                   "steps before vLLM takes the prompt it was parked for)")
    return out


def _referenced(hit: Any) -> int:
    """Prefix-cache hit blocks (vLLM's ``new_computed_blocks``) that another request holds now
    (the others are evictable free blocks: taking them uses KV)."""
    if hit is None:
        return 0
    return sum(1 for b in hit.blocks[0] if b.ref_cnt > 0) if hit.blocks else 0


#: KV-cache specs whose vLLM manager keeps a block for every token of a request (what the
#: admission projection counts): full attention and MLA.
FULL_ATTENTION_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})


def _check_kv_groups(kv_cache_config: Any) -> None:
    """One KV-cache group of full attention (MLA too), or a start-up error: hybrid models, and a
    lone group of another kind (sliding window, chunked local, Mamba: vLLM frees or recycles
    their blocks behind the window, the projection counts every token's)."""
    groups = kv_cache_config.kv_cache_groups
    specs = {type(g.kv_cache_spec).__name__ for g in groups}
    if not groups:
        raise EcoServeSetupError("this model has no KV-cache group (an attention-free model?); EcoServe's "
                                 "vLLM scheduler projects KV-cache blocks. Serve this model without --scheduler-cls")
    if len(groups) != 1:
        raise EcoServeSetupError(
            f"this model has {len(groups)} KV-cache groups ({', '.join(sorted(specs))}: a hybrid "
            "model, e.g. sliding-window or Mamba layers next to full attention); EcoServe's vLLM "
            "scheduler projects one group's blocks and does not support it. Serve this model "
            "without --scheduler-cls")
    kind = specs.pop()
    if not _full_attention(groups[0].kv_cache_spec):
        raise EcoServeSetupError(
            f"this model's KV cache is {kind}, not full attention: vLLM frees or reuses its blocks "
            "behind the window, and EcoServe's vLLM scheduler projects a block for every token "
            "(admission would stall). Serve this model without --scheduler-cls")


def _full_attention(spec: Any) -> bool:
    """A spec whose vLLM manager keeps a block for every token: full attention or MLA, by exact
    class (subclasses, sinks and ring windows, manage blocks their own way); a group of layers of
    one type but different shapes (``UniformTypeKVCacheSpecs``: KV heads that differ by layer)
    when each of its layers' is."""
    inner = getattr(spec, "kv_cache_specs", None)
    if isinstance(inner, dict) and inner:
        return all(_full_attention(s) for s in inner.values())
    return type(spec).__name__ in FULL_ATTENTION_SPECS


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


def idle_settings(cfg: EcoServeVllmConfig, environ: Mapping[str, str], predictor: bool,
                  takes_generator: bool) -> list[str]:
    """The settings given in ``environ`` that this configuration never reads (said at start:
    were taken without a word)."""
    given = {k for k, v in environ.items() if k.startswith(ENV_PREFIX) and v.strip()}
    why = {"ECOSERVE_STEP_S": ("with ECOSERVE_PROFILE the cost model times a step", bool(cfg.profile)),
           "ECOSERVE_PREFILL_S_PER_TOKEN": ("with ECOSERVE_PROFILE the cost model times a prefill", bool(cfg.profile)),
           "ECOSERVE_AMORTIZE": ("amortized chunks need ECOSERVE_PROFILE", not cfg.profile),
           # the middleware reads it too (its predictor, in the API server's process)
           "ECOSERVE_GENERATOR": ("no predictor bundle reads a model name here",
                                  not (predictor and takes_generator)
                                  and not (environ.get("ECOSERVE_MIDDLEWARE_PREDICTOR", "").strip()
                                           and not environ.get("ECOSERVE_MIDDLEWARE_GENERATOR", "").strip()))}
    return [f"{name} ({reason})" for name, (reason, idle) in why.items() if idle and name in given]


#: ``ECOSERVE_PROFILE=auto``: the profile of the served model on this GPU (``auto_cost_model``).
AUTO_PROFILE = "auto"


def load_cost_model(profile: str, vllm_config: Any = None) -> Any:
    """The cost model of ``ECOSERVE_PROFILE`` (a shipped profile's name, a profile JSON file,
    e.g. one fitted by ``ecoserve calibrate``, or ``auto`` with the engine's ``vllm_config``),
    or :class:`EcoServeSetupError`."""
    from ..cost_model import list_profiles, load_profile

    if profile == AUTO_PROFILE:
        if vllm_config is None:  # preflight: no engine yet
            raise ValueError("ECOSERVE_PROFILE=auto is resolved when the engine starts")
        return auto_cost_model(vllm_config)
    try:
        cost = load_profile(profile)
    except Exception as e:
        listed = "shipped: " in str(e)  # an unknown name: the error lists them (was: twice)
        raise EcoServeSetupError(f"ECOSERVE_PROFILE={profile!r}: not a usable cost-model profile "
                                 f"({type(e).__name__}: {e})"
                                 f"{'' if listed else '; shipped: ' + ', '.join(list_profiles())}, "
                                 "or a profile JSON file") from None
    if vllm_config is not None and (other := other_model(cost, vllm_config)):
        logger.warning("EcoServe: ECOSERVE_PROFILE=%s describes another model than the one served (%s): "
                       "each step's prefill budget comes from that model's step times", profile, other)
    return cost


def other_model(cost: Any, vllm_config: Any) -> str:
    """How the profile's model differs from the one vLLM serves ("" if it does not, or if the
    served model's config says too little to tell)."""
    from ..cost_model import ProfileError, model_fields

    mc = getattr(vllm_config, "model_config", None)
    try:
        served = model_fields(mc.hf_config, mc.dtype.itemsize)
    except (ProfileError, AttributeError):  # a model type the roofline does not describe
        return ""
    have = cost.spec["model"]
    return ", ".join(f"{f} {have[f]} vs {served[f]}" for f in ("n_layers", "hidden", "n_heads", "n_kv_heads",
                     "head_dim", "intermediate", "vocab", "dtype_bytes") if have[f] != served[f])


#: Bytes per value of vLLM's unquantized ``--kv-cache-dtype`` names.
_UNQUANTIZED_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float": 4, "float32": 4}


def auto_cost_model(vllm_config: Any, device: tuple[str, int] | None = None) -> Any:
    """``ECOSERVE_PROFILE=auto``: the roofline profile of the model vLLM serves (its Hugging
    Face config and dtype) on the GPU it runs on (``device``: name and memory in bytes; default
    vLLM's platform, read through NVML), with the shipped GPU file's efficiency factors
    (``cost_model.profile_for``). One GPU, unquantized weights and KV cache; anything else is a
    one-line start-up error naming what to do instead."""
    from ..cost_model import ProfileError, profile_for

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    gpus = pc.tensor_parallel_size * pc.pipeline_parallel_size
    kv_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    # an unquantized KV cache of the weights' width is the profile's (was: bfloat16 refused)
    same_width = kv_dtype in (None, "auto") or _UNQUANTIZED_BYTES.get(str(kv_dtype)) == mc.dtype.itemsize
    why = (f"the engine runs on {gpus} GPUs (tensor x pipeline parallel)" if gpus > 1 else
           f"the weights are quantized ({mc.quantization})" if mc.quantization else
           # the GPU files' peak_flops is the 16-bit tensor-core rate (an A100's float32 is 1/16 of it)
           f"the weights are {str(mc.dtype).removeprefix('torch.')}, and the shipped GPU files describe "
           "16-bit weights" if mc.dtype.itemsize != 2 else
           f"the KV cache is stored as {kv_dtype}" if not same_width else "")
    if not why and device is None:
        try:
            from vllm.platforms import current_platform

            device = current_platform.get_device_name(0), current_platform.get_device_total_memory(0)
        except Exception as e:  # no GPU, no NVML: the platform cannot say
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"vLLM's platform names no GPU ({type(e).__name__}{f': {detail}' if detail else ''})"
    if not why:
        try:
            return profile_for(mc.hf_config, mc.dtype.itemsize, device[0], int(device[1]), Path(mc.model).name)
        except ProfileError as e:
            why = str(e)
    raise EcoServeSetupError(f"ECOSERVE_PROFILE=auto: {why}; name a shipped profile or a profile JSON "
                             "fitted by `ecoserve calibrate` instead")


def served_generator(cfg: EcoServeVllmConfig, model_config: Any) -> str:
    """The model name a bundle that takes one is given: ``ECOSERVE_GENERATOR``, else vLLM's
    served model name (``--served-model-name``, by default ``--model``: the name clients send,
    which ``rlpredict annotate`` and the API-server middleware give the predictor too)."""
    if cfg.generator:
        return cfg.generator
    name = getattr(model_config, "served_model_name", None)
    if isinstance(name, list | tuple):  # vLLM keeps the first of a list; older configs may not
        name = name[0] if name else None
    return str(name or model_config.model)


def load_predictor(cfg: EcoServeVllmConfig) -> tuple[Any, str]:
    """The bundle named by ``cfg.predictor`` (``"default"``: the shipped one), loaded, checked
    and run once; raises :class:`EcoServeSetupError` naming ``ECOSERVE_PREDICTOR``."""
    from rlpredict.serve.runtime import Predictor  # lazy: ONNX Runtime, no torch

    path = None if cfg.predictor == DEFAULT_BUNDLE else cfg.predictor
    t0 = time.perf_counter()
    try:
        pred = Predictor.load(path, threads=1)
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
    """The start-up checks that need no engine: vLLM version (at import), settings, bundle, and
    the API-server middleware's settings and bundle. Returns a summary; raises
    :class:`EcoServeSetupError`."""
    cfg = EcoServeVllmConfig.from_env(environ)
    predictor = None
    if cfg.predictor:
        predictor, detail = load_predictor(cfg)
        pred = f"predictor {cfg.predictor} ({detail}); the tokenizer is checked at engine start"
    elif cfg.require_predictor:
        raise EcoServeSetupError(f"ECOSERVE_REQUIRE_PREDICTOR=1 but {ENV_PREDICTOR} is not set")
    else:
        pred = f"no predictor: default reservation of {cfg.default_reserve} tokens"
    if cfg.profile == AUTO_PROFILE:
        pred += (". TBT-aware prefill budget from the served model's profile on this GPU, built at engine "
                 f"start (steps with decodes within {_SIM['iter_time_frac']} x {cfg.slo_tbt} s)")
    elif cfg.profile:
        cost = load_cost_model(cfg.profile)
        pred += (f". TBT-aware prefill budget from profile {getattr(cost, 'name', cfg.profile)} "
                 f"(steps with decodes within {_SIM['iter_time_frac']} x {cfg.slo_tbt} s)")
    from .vllm_middleware import MiddlewareConfig, load_bundle  # one environment for both processes

    mw = MiddlewareConfig.from_env(environ)  # was: not checked here; a bad value surfaced at serve
    if mw.predictor:
        load_bundle(mw.predictor)
    middleware = f"middleware predictor {mw.predictor}" if mw.predictor else "no middleware predictor"
    # the start-up warning's settings that this configuration never reads (was: said only when the
    # engine starts, after the model loaded; a reviewer's find)
    takes_generator = predictor is not None and predictor.input_spec.include_generator
    if idle := idle_settings(cfg, os.environ if environ is None else environ, predictor is not None, takes_generator):
        logger.warning("EcoServe: setting(s) with no effect here: %s", "; ".join(idle))
    support = "supported" if VLLM_SUPPORTED else f"UNSUPPORTED (allowed by {ENV_ALLOW_UNSUPPORTED_VLLM}=1)"
    return (f"vLLM {VLLM_VERSION}: {support}. {pred}. Client hints "
            f"{hints_mode(cfg.trust_client_hints)}; {middleware}. Settings: {cfg.describe()}")


if __name__ == "__main__":  # python -m ecoserve_sched.engines.vllm_scheduler: check before serving
    logging.basicConfig(level=logging.WARNING)
    # the module by its package name: the middleware imports that one, and its
    # EcoServeSetupError is not this __main__ module's (was: a traceback and exit 1)
    from ecoserve_sched.engines import vllm_scheduler as _module

    try:
        print(_module.preflight())
    except _module.EcoServeSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
