"""The simulator against vLLM's own scheduler, case by case: the differential check.

A :class:`Case` is a small trace with its serving settings (KV blocks, token budget, sequence
slots, SLO, cost-model profile). :func:`differences` replays it twice, under the simulator's
policy and under vLLM's own scheduler class (``vllm_sim``: the same loop, clock and cost model),
and lists what differs: each request's first-token and finish times, generated tokens and
preemptions, and the counters (preemptions, parks, amortized chunks). The two pairs
(``PAIRS``): ``vllm``, the simulator's vLLM policy against vLLM's ``Scheduler``; ``ecoserve``,
the simulator's EcoServe without swapping (``ecoserve-recompute``: vLLM V1 only recomputes)
against EcoServe inside vLLM's scheduler (``ecoserve-vllm-real``, the plug-in, which shares the
simulator's rules module).

:func:`random_case` draws the small adversarial cases that ``benchmarks/sim_vs_vllm_fuzz.py``
runs (a few requests to a few hundred; caches of one block to thousands; budgets down to one
token a sequence; bursts; predictions exact, short, long or missing), and :func:`shrink`
reduces one that differs to fewer requests and plainer numbers. Cases are JSON objects
(``Case.to_json``), one per line in the fuzzer's files and in the tests' kept cases.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from ..cost_model import MAX_TOKEN_BUDGET

#: The simulator's policy and the one inside vLLM's scheduler, by pair name.
PAIRS = {"vllm": ("vllm", "vllm-real"), "ecoserve": ("ecoserve-recompute", "ecoserve-vllm-real")}
#: EcoServe settings both sides read (``EcoServeConfig`` fields, the plug-in's ``ECOSERVE_*``).
SETTINGS = {"amortize": bool, "scale_predictions": bool, "park": bool, "give_way": bool,
            "aging": float, "reserve_frac": float}
PROFILES = ("llama2-13b-a100-80gb", "llama3-8b-a100-80gb")
_COLUMNS = ("arrivals_s", "prompt_tokens", "output_tokens", "max_tokens")


#: A token count's largest value in a case (a trace's columns take the same).
MAX_TOKENS = 1 << 53
#: Each server setting's largest value in a case: the CLI's bounds (``--token-budget``,
#: ``--max-running``, ``--block-size``), and 2^22 blocks (the simulator holds a list of them).
LIMITS = {"kv_blocks": 1 << 22, "token_budget": MAX_TOKEN_BUDGET, "max_running": 1 << 16, "block_size": 1024}


@dataclass(frozen=True)
class Case:
    """One trace and its serving settings. ``predictions``: each request's (bucket, predicted
    tokens, reserved tokens), a bucket of -1 for none; None: drawn from the default confusion
    matrix (the same draw on both sides)."""

    arrivals_s: tuple[float, ...]
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]
    predictions: tuple[tuple[int, int, int], ...] | None = None
    pair: str = "ecoserve"
    settings: Mapping[str, Any] = field(default_factory=dict)
    slo_ttft_s: float = 5.0
    slo_tbt_s: float = 0.2
    kv_blocks: int = 4000
    token_budget: int = 2048
    max_running: int = 256
    profile: str = PROFILES[0]
    block_size: int = 16

    def __post_init__(self) -> None:
        n = len(self.arrivals_s)
        if not n:
            raise ValueError("field 'arrivals_s': at least one request expected")
        for name in _COLUMNS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"field {name!r}: {len(getattr(self, name))} values, arrivals_s has {n}")
            if any(not _whole(v) or not 1 <= v <= MAX_TOKENS for v in getattr(self, name)):
                raise ValueError(f"field {name!r}: whole numbers from 1 to 2^53 expected")  # (a trace's)
        if any(not _real(v) or v < 0 for v in self.arrivals_s) or list(self.arrivals_s) != sorted(self.arrivals_s):
            raise ValueError("field 'arrivals_s': finite times >= 0 in arrival order expected")
        if self.predictions is not None and (
                len(self.predictions) != n or any(len(p) != 3 or not all(_whole(x) for x in p) or p[0] < -1
                                                  or min(p[1:]) < 0 or max(p) > MAX_TOKENS for p in self.predictions)):
            raise ValueError(f"field 'predictions': {n} rows of [bucket >= -1, predicted >= 0, reserved >= 0] "
                             "whole numbers up to 2^53 expected")  # (was: past 2^63, an internal error)
        if not isinstance(self.pair, str) or self.pair not in PAIRS:
            raise ValueError(f"field 'pair': one of {', '.join(PAIRS)} expected, got {self.pair!r}")
        for k, v in self.settings.items():
            if k not in SETTINGS:
                raise ValueError(f"field 'settings': {k!r} is not one of {', '.join(SETTINGS)}")
            if not (isinstance(v, bool) if SETTINGS[k] is bool else _real(v) and not isinstance(v, bool)):
                raise ValueError(f"field 'settings': {k!r} must be a {SETTINGS[k].__name__}, got {v!r}")
        if self.settings and self.pair != "ecoserve":
            raise ValueError("field 'settings': EcoServe's settings, for pair 'ecoserve' only")
        for name in ("slo_ttft_s", "slo_tbt_s"):
            if not _real(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"field {name!r}: a number > 0 expected")
        for name, most in LIMITS.items():  # (was: no upper bound: 1e8 blocks took 3.2 GB, then "disagreed")
            if not _whole(getattr(self, name)) or not 1 <= getattr(self, name) <= most:
                raise ValueError(f"field {name!r}: a whole number from 1 to {most:,} expected")
        from ..cost_model import list_profiles

        if self.profile not in list_profiles():
            raise ValueError(f"field 'profile': one of the shipped profiles expected ({', '.join(list_profiles())}), "
                             f"got {self.profile!r}")
        # the plug-in's own ranges (``EcoServeVllmConfig``), which the simulator does not check
        from .vllm_scheduler import EcoServeSetupError, EcoServeVllmConfig

        try:
            EcoServeVllmConfig(trust_client_hints=True, slo_ttft=self.slo_ttft_s, slo_tbt=self.slo_tbt_s,
                               **self.settings)
        except EcoServeSetupError as e:
            name = str(e).split("=")[0]
            raise ValueError(f"field {({'slo_ttft': 'slo_ttft_s', 'slo_tbt': 'slo_tbt_s'}.get(name, 'settings'))!r}: "
                             f"{e}") from None
        if self.token_budget <= self.max_running and self.pair == "ecoserve":
            # (vLLM refuses a budget below max_num_seqs only with chunked prefill off; the plug-in
            # needs a token for each running sequence and one for a prompt)
            raise ValueError("field 'token_budget': more than max_running expected")

    @classmethod
    def from_json(cls, obj: Any) -> Case:
        """A case from its JSON object; ValueError naming the field if it is not one."""
        if not isinstance(obj, dict):
            raise ValueError(f"a case is a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(obj.keys() - known):
            raise ValueError(f"field {unknown[0]!r}: not a case field ({', '.join(sorted(known))})")
        if missing := [k for k in _COLUMNS if k not in obj]:
            raise ValueError(f"field {missing[0]!r}: missing")
        kw = dict(obj)
        for k in _COLUMNS:
            if not isinstance(kw[k], list):
                raise ValueError(f"field {k!r}: a list expected")
            kw[k] = tuple(kw[k])
        if kw.get("predictions") is not None:
            if not isinstance(kw["predictions"], list) or not all(isinstance(p, list) for p in kw["predictions"]):
                raise ValueError("field 'predictions': a list of [bucket, predicted, reserved] expected")
            kw["predictions"] = tuple(tuple(p) for p in kw["predictions"])
        if not isinstance(kw.get("settings", {}), dict):
            raise ValueError("field 'settings': an object expected")
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: list(getattr(self, k)) for k in _COLUMNS}
        out["predictions"] = None if self.predictions is None else [list(p) for p in self.predictions]
        for f in fields(self):
            if f.name not in out:
                v = getattr(self, f.name)
                out[f.name] = dict(v) if f.name == "settings" else v
        return out

    def __len__(self) -> int:
        return len(self.arrivals_s)

    def keep(self, rows: list[int]) -> Case:
        """The case with only the requests ``rows`` (indices, in order)."""
        kw = {k: tuple(getattr(self, k)[i] for i in rows) for k in _COLUMNS}
        if self.predictions is not None:
            kw["predictions"] = tuple(self.predictions[i] for i in rows)
        return replace(self, **kw)

    def trace(self) -> Any:
        from ..trace import Trace

        rl = None if self.predictions is None else np.array(self.predictions, dtype=np.int64).reshape(-1, 3)
        return Trace("case", np.array(self.arrivals_s, dtype=float), np.array(self.prompt_tokens),
                     np.array(self.output_tokens), np.array(self.max_tokens), rl=rl)


def _real(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past a float's range (was: "internal error", exit 1)
        return False


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def replay(case: Case) -> tuple[Any, Any]:
    """The case's two results (``SimResult``), the simulator's and vLLM's; either may be the
    exception its replay raised."""
    from ..cost_model import load_profile
    from ..policies.ecoserve import EcoServeConfig
    from ..request import SLO
    from ..simulator import run

    cost, trace = load_profile(case.profile), case.trace()
    slo = SLO(case.slo_ttft_s, case.slo_tbt_s)
    kw: dict[str, Any] = dict(slo=slo, kv_blocks=case.kv_blocks, token_budget=case.token_budget,
                              max_running=case.max_running, block_size=case.block_size)
    sim_policy, real_policy = PAIRS[case.pair]
    out: list[Any] = []
    for policy, extra in ((sim_policy, {"config": EcoServeConfig(swap=False, **case.settings)}
                           if case.pair == "ecoserve" else {}),
                          (real_policy, {"plugin": dict(case.settings)} if case.settings else {})):
        try:
            out.append(run(trace, policy, cost, **kw, **extra))
        except Exception as e:  # an error is a result to compare
            out.append(e)
    return out[0], out[1]


def differences(case: Case, rel: float = 1e-9) -> list[str]:
    """What differs between the simulator's replay of ``case`` and vLLM's, one line each (empty:
    they agree). Times agree within ``rel`` (relative) or 1 ns."""
    sim, real = replay(case)
    if isinstance(sim, Exception) or isinstance(real, Exception):
        a, b = (f"{type(x).__name__}: {x}" if isinstance(x, Exception) else "no error" for x in (sim, real))
        return [] if a == b else [f"error: simulator {a}; vLLM {b}"]
    return results_apart(sim, real, case.pair == "ecoserve", rel)


def results_apart(sim: Any, real: Any, ecoserve: bool, rel: float = 1e-9) -> list[str]:
    """What differs between two results of the same requests (``SimResult``s: the simulator's
    and vLLM's), one line each: each request's first-token and finish times (within ``rel``,
    relative, or 1 ns), generated tokens and preemptions; the preemptions counter, and with
    ``ecoserve`` the parks and amortized chunks; the requests dropped."""
    out = []
    real_by_id = {r.rid: r for r in real.requests}
    for a in sorted(sim.requests, key=lambda r: r.rid):
        b = real_by_id[a.rid]
        for name, what in (("first_token_s", "first token"), ("finish_s", "finish")):
            x, y = getattr(a, name), getattr(b, name)
            if (x < 0) != (y < 0) or abs(x - y) > rel * max(abs(x), abs(y)) + 1e-9:
                out.append(f"request {a.rid}: {what} at {_t(x)} (simulator), {_t(y)} (vLLM)")
        for name in ("generated", "preemptions"):
            if getattr(a, name) != getattr(b, name):
                out.append(f"request {a.rid}: {name} {getattr(a, name)} (simulator), {getattr(b, name)} (vLLM)")
    for k in ("preemptions", "parks", "amortized") if ecoserve else ("preemptions",):
        x, y = sim.counters.get(k, 0), real.counters.get(k, 0)
        if x != y:
            out.append(f"{k}: {x} (simulator), {y} (vLLM)")
    if sim.dropped != real.dropped:
        out.append(f"dropped: {sim.dropped} (simulator), {real.dropped} (vLLM)")
    return out


def engine_core_case(case: Case) -> Case | None:
    """``case`` with only the requests vLLM's ``EngineCore`` can serve on the case's cache, those
    whose prompt and output (up to ``max_tokens``) stay below its model length (``engine_core.model_length``: vLLM
    refuses a model length longer than the cache holds), each ``max_tokens`` within that length
    (what such an engine serves, and what the plug-in reserves for, whichever side replays it), or
    None if none can."""
    from .engine_core import model_length

    rows = list(range(len(case)))
    while rows:  # the length follows the longest request kept (the replay's rule): until none drops out
        length = model_length(case.kv_blocks, case.block_size,
                              max(case.prompt_tokens[i] + case.max_tokens[i] for i in rows))
        kept = [i for i in rows if case.prompt_tokens[i] + min(case.output_tokens[i], case.max_tokens[i]) < length]
        if kept == rows:
            kept_case = case.keep(rows)
            return replace(kept_case, max_tokens=tuple(min(m, length - p) for m, p in zip(
                kept_case.max_tokens, kept_case.prompt_tokens, strict=True)))
        rows = kept
    return None


def engine_core_differences(case: Case, asynchronous: bool, rel: float = 1e-9) -> list[str]:
    """What differs between the engine replay of ``case`` (its pair's ``vllm-real`` policy, or
    its ``async-`` form) and vLLM's own ``EngineCore`` loop over the same requests and
    predictions (``engine_core.engine_core_run``), one line each: what :func:`results_apart`
    compares ("simulator" there is the replay), then the steps run (how many, and each one's
    end and scheduled tokens); or the two sides' errors, if they differ. Every request must fit
    (:func:`engine_core_case`)."""
    from ..cost_model import load_profile
    from ..request import SLO
    from ..simulator import run
    from .engine_core import engine_core_run
    from .vllm_sim import replay_requests

    policy = PAIRS[case.pair][1]
    if asynchronous:
        policy = policy.replace("vllm-real", "async-vllm-real")
    cost, slo = load_profile(case.profile), SLO(case.slo_ttft_s, case.slo_tbt_s)
    kw: dict[str, Any] = dict(kv_blocks=case.kv_blocks, token_budget=case.token_budget,
                              max_running=case.max_running, block_size=case.block_size)
    trace = case.trace()
    reqs, _ = replay_requests(trace, policy, slo)  # the requests and predictions the replay serves
    out: list[Any] = []
    for side in (lambda: run(trace, policy, cost, slo=slo, **kw,
                             **({"plugin": dict(case.settings)} if case.settings else {})),
                 lambda: engine_core_run(reqs, policy, cost, slo=slo, plugin=dict(case.settings), **kw)):
        try:
            out.append(side())
        except Exception as e:  # an error is a result to compare
            out.append(e)
    replay, core = out
    if isinstance(replay, Exception) or isinstance(core, Exception):
        a, b = (f"{type(x).__name__}: {x}" if isinstance(x, Exception) else "no error" for x in (replay, core))
        return [] if a == b else [f"error: replay {a}; EngineCore {b}"]
    diffs = [d.replace("(simulator)", "(replay)").replace("(vLLM)", "(EngineCore)")
             for d in results_apart(replay, core, case.pair == "ecoserve", rel)]
    if len(replay.log) != len(core.log):
        return [*diffs, f"steps: {len(replay.log)} (replay), {len(core.log)} (EngineCore)"]
    for k, (a, b, ta, tb) in enumerate(zip(replay.log, core.log, replay.iter_tokens, core.iter_tokens, strict=True)):
        if ta != tb or abs(a[0] - b[0]) > rel * max(abs(a[0]), abs(b[0])) + 1e-9:
            return [*diffs, f"step {k}: ends at {_t(a[0])} with {ta} tokens (replay), {_t(b[0])} with {tb} (EngineCore)"]
    return diffs


def _t(x: float) -> str:
    return "never" if x < 0 else f"{x:.6f} s"


def random_case(rng: random.Random, pair: str | None = None, max_requests: int = 200,
                block_sizes: tuple[int, ...] = (16,)) -> Case:
    """A random small case (its pair drawn unless given; its KV block size among
    ``block_sizes``, drawn first where there are several, so that with one a seed's case does
    not depend on its size): see the module's docstring."""
    bs = rng.choice(block_sizes) if len(block_sizes) > 1 else block_sizes[0]
    n = rng.choice([1, 2, 3, rng.randint(1, 8), rng.randint(1, 30), rng.randint(1, 200)])
    kv = rng.choice([1, 2, 3, rng.randint(1, 10), rng.randint(5, 60), rng.randint(50, 400), 4000])
    cap = kv * bs  # the cache's tokens
    slots = rng.choice([1, 2, 3, rng.randint(1, 16), 256])
    budget = rng.choice([slots + 1, rng.randint(slots + 1, slots + 64), 2048, rng.randint(max(slots + 1, 16), 4096)])
    mode = rng.choice(["zero", "burst", "sparse", "mixed"])
    if mode == "zero":
        arr = [0.0] * n
    elif mode == "burst":
        arr, t = [], 0.0
        while len(arr) < n:
            t += rng.expovariate(1.0) * rng.choice([0.1, 1, 5])
            arr += [round(t, 3)] * rng.randint(1, 8)
        arr = arr[:n]
    elif mode == "sparse":
        arr = sorted(round(rng.uniform(0, 100), 3) for _ in range(n))
    else:
        arr = sorted(round(rng.uniform(0, 3), 3) for _ in range(n))
    inp, out, most, rl = [], [], [], []
    pmode = rng.choice(["exact", "short", "long", "missing", "mixed"])
    for _ in range(n):
        p = rng.choice([1, rng.randint(1, 16), rng.randint(1, 200), rng.randint(1, max(1, cap)),
                        max(1, cap - rng.randint(0, 20)), cap + rng.randint(1, 50)])
        o = rng.choice([1, 2, rng.randint(1, 50), rng.randint(1, 500), rng.randint(500, 3000)])
        m = rng.choice([2048, 2048, o, max(1, o - rng.randint(1, 100)), rng.randint(1, 4000)])
        inp.append(max(1, p))
        out.append(o)
        most.append(m)
        pm = pmode if pmode != "mixed" else rng.choice(["exact", "short", "long", "missing"])
        if pm == "exact":
            pr = (min(o // 64, 1023), o, o)
        elif pm == "short":
            q = max(1, o // rng.randint(2, 10))
            pr = (min(q // 64, 1023), q, q + rng.randint(0, 10))
        elif pm == "long":
            q = o * rng.randint(2, 10) + rng.randint(0, 100)
            pr = (min(q // 64, 1023), q, int(q * 1.5))
        else:
            pr = (-1, 0, 0)
        rl.append(pr)
    predictions = None if pmode == "missing" and rng.random() < 0.5 else tuple(rl)  # None: drawn
    pair = pair or rng.choice(list(PAIRS))
    settings: dict[str, Any] = {}
    if pair == "ecoserve":
        for k in ("amortize", "scale_predictions", "park", "give_way"):
            if rng.random() < 0.3:
                settings[k] = rng.random() < 0.5
        if rng.random() < 0.2:
            settings["aging"] = rng.choice([0.0, 0.5, 10.0])
        if rng.random() < 0.2:
            settings["reserve_frac"] = rng.choice([0.0, 0.1, 0.5])
    ttft = rng.choice([5.0, 0.05, 0.5, 2.0, rng.uniform(0.01, 10)])
    tbt = rng.choice([0.2, 0.02, 0.05, 0.1, 1.0, rng.uniform(0.001, 1)])
    profile = rng.choice([PROFILES[0], PROFILES[0], PROFILES[1]])
    case = Case(tuple(arr), tuple(inp), tuple(out), tuple(most), predictions, pair, settings, ttft, tbt, kv,
                budget, slots, profile, bs)
    return case.keep(list(range(min(n, max_requests))))


def shrink(case: Case, differs: Callable[[Case], bool]) -> Case:
    """A smaller case for which ``differs`` still holds (it must hold for ``case``): fewer
    requests (halves, then quarters ... of them dropped at a time), EcoServe's settings at
    their defaults, plainer SLO, profile, budget, slots and block size, smaller numbers, fewer
    KV blocks."""
    if not differs(case):
        raise ValueError("shrink: the case does not differ")

    def attempt(c: Case | None) -> bool:
        nonlocal case
        if c is None or c == case or not differs(c):
            return False
        case = c
        return True

    chunk = max(1, len(case) // 2)
    while chunk >= 1:  # drop runs of requests, largest first
        i, changed = 0, False
        while i < len(case):
            rows = [j for j in range(len(case)) if not i <= j < i + chunk]
            if rows and attempt(case.keep(rows)):
                changed = True
                continue
            i += chunk
        if not changed:
            chunk //= 2
    for k in list(case.settings):
        attempt(replace(case, settings={s: v for s, v in case.settings.items() if s != k}))
    for name, plain in (("slo_ttft_s", [5.0]), ("slo_tbt_s", [0.2]), ("profile", [PROFILES[0]]),
                        ("max_running", [256, 1, 2, 3]), ("token_budget", [2048, 256, 64, 16]), ("block_size", [16])):
        for v in plain:
            try:
                if attempt(replace(case, **{name: v})):
                    break
            except ValueError:  # e.g. a budget no larger than the slots
                continue
    for _ in range(3):  # smaller numbers, one at a time
        for name in _COLUMNS:
            for i in range(len(case)):
                v = getattr(case, name)[i]
                tries = [0.0, round(v, 1), float(round(v))] if name == "arrivals_s" else [1, v // 2, v - 1]
                for t in tries:
                    col = list(getattr(case, name))
                    col[i] = t
                    try:
                        if t != v and attempt(replace(case, **{name: tuple(col)})):
                            break
                    except ValueError:
                        continue
        if case.predictions is not None:
            for i in range(len(case)):
                for j in (1, 2):
                    for t in (case.predictions[i][j] // 2, case.predictions[i][1]):
                        rows = [list(p) for p in case.predictions]
                        rows[i][j] = t
                        if t != case.predictions[i][j] and attempt(
                                replace(case, predictions=tuple(tuple(p) for p in rows))):
                            break
        while case.kv_blocks > 1 and attempt(replace(case, kv_blocks=case.kv_blocks // 2)):
            pass
        while case.kv_blocks > 1 and attempt(replace(case, kv_blocks=case.kv_blocks - 1)):
            pass
    return case
