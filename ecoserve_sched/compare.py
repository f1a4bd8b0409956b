"""Sweeps over policies and loads, capacity bisection, a Markdown table and plots."""

from __future__ import annotations

import importlib.util
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.json_file import dumps

from .metrics import summarize
from .predictions import NO_PREDICTIONS, Confusion
from .request import SLO, is_real, is_whole
from .simulator import SimResult, iteration_table, run
from .trace import Trace

TABLE_COLUMNS = ("policy", "rate_scale", "throughput_rps", "mean_jct_s", "p50_ttft_s", "p99_ttft_s",
                 "p99_tbt_s", "slo_attainment", "goodput_rps", "preemptions", "kv_util_mean")


class ServerSettingError(ValueError):
    """A server setting that leaves no KV cache; ``option`` is its ``ecoserve`` option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Server:
    """The engine's settings in a scenario (None: the policy's default, as in vLLM)."""

    gpu_memory_utilization: float | None = None  # KV size: HBM share the KV cache may fill up to
    token_budget: int | None = None  # vLLM's max_num_batched_tokens
    max_running: int | None = None  # vLLM's max_num_seqs
    block_size: int = 16
    num_gpu_blocks_override: int | None = None  # vLLM's: the KV size in blocks, whatever the HBM

    def __post_init__(self) -> None:  # the rest is checked where the policy is built (``Scheduler``)
        g = self.gpu_memory_utilization
        if g is not None and not (is_real(g) and 0 < g <= 1):
            raise ServerSettingError("--gpu-memory-utilization", f"gpu_memory_utilization must be in (0, 1], got {g!r}")
        # whole numbers, checked here too: ``policy_kw`` divides by the block size and compares
        # the block count (was: ZeroDivisionError for block_size=0, TypeError for '5')
        for option, name, v in (("--block-size", "block_size", self.block_size),
                                ("--num-gpu-blocks-override", "num_gpu_blocks_override", self.num_gpu_blocks_override)):
            if v is not None and not (is_whole(v) and v >= 1):
                raise ServerSettingError(option, f"{name} must be a whole number >= 1, got {v!r}")

    def describe(self, cost: Any) -> str:
        """The settings a report states: KV cache size, and the rest (each policy's default
        where not set)."""
        kw = self.policy_kw(cost)
        blocks = kw.get("kv_blocks", cost.kv_blocks(self.block_size))
        return (f"KV cache {blocks:,} blocks of {self.block_size} tokens"
                + (f" (--gpu-memory-utilization {self.gpu_memory_utilization:g})" if self.gpu_memory_utilization else "")
                + f", token budget {self.token_budget or 'each policy default'}"
                + f", max running {self.max_running or 'each policy default'}")

    def policy_kw(self, cost: Any) -> dict[str, Any]:
        """Keyword arguments for ``get_policy`` / ``simulator.run``."""
        kw: dict[str, Any] = {"block_size": self.block_size}
        if self.num_gpu_blocks_override is not None:
            if self.num_gpu_blocks_override < 1:
                raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
            kw["kv_blocks"] = self.num_gpu_blocks_override
        elif self.gpu_memory_utilization is not None:
            kw["kv_blocks"] = cost.kv_blocks(self.block_size, self.gpu_memory_utilization)
            if kw["kv_blocks"] < 1:
                util = self.gpu_memory_utilization
                if cost.kv_blocks(1, util) >= 1:  # room for tokens, not a block (was: "no room", a reviewer's find)
                    raise ServerSettingError("--block-size", f"block size {self.block_size}: not one block of that "
                                             f"many tokens fits in the KV cache of {cost.name} at "
                                             f"gpu_memory_utilization {util:g}; use a smaller --block-size")
                raise ServerSettingError("--gpu-memory-utilization", f"gpu_memory_utilization {util:g} leaves no "
                                         f"room for a KV cache with {cost.name}")
        elif cost.kv_blocks(self.block_size) < 1:
            if cost.kv_blocks(1) < 1:  # no block size helps (was: "use a smaller --block-size")
                raise ServerSettingError("--profile", f"{cost.name}: no room for a KV cache at its "
                                         f"gpu_memory_utilization {cost.gpu_memory_utilization:g}: the weights and the "
                                         "activation reserve fill it; give --gpu-memory-utilization or another profile")
            raise ServerSettingError("--block-size", f"block size {self.block_size}: not one block of that "
                                     f"many tokens fits in the KV cache of {cost.name}; use a smaller --block-size")
        if self.token_budget is not None:
            kw["token_budget"] = self.token_budget
        if self.max_running is not None:
            kw["max_running"] = self.max_running
        return kw


@dataclass
class RunSpec:
    """Everything but the policy and the load: what one comparison holds fixed."""

    trace: Trace
    cost: Any
    slo: SLO
    predictions: str | None = None
    confusion: Confusion | None = None
    bundle: str | None = None
    seed: int = 0
    server: Server = field(default_factory=Server)
    read: str = ""  # what was read: the CLI's ``read`` line (rows, rate, skipped, used), for reports

    def __post_init__(self) -> None:
        # the types ``run`` checks, checked once here (was: a path string taken for the trace,
        # and slo=None an AttributeError at the first summary)
        if not isinstance(self.trace, Trace):
            raise TypeError(f"RunSpec: trace must be a Trace (read_trace(path)), got {type(self.trace).__name__}")
        if not isinstance(self.slo, SLO):
            raise TypeError(f"RunSpec: slo must be an SLO(ttft_s, tbt_s), got {type(self.slo).__name__}")
        if not isinstance(self.server, Server):
            raise TypeError(f"RunSpec: server must be a Server, got {type(self.server).__name__}")
        if not len(self.trace):  # was: a capacity search of 9 runs, "failed at every load"
            raise ValueError(f"{self.trace.path}: the trace has no requests")

    def run(self, policy: str, rate_scale: float) -> tuple[dict, SimResult]:
        trace = self.trace.scaled(rate_scale)
        res = run(trace, policy, self.cost, slo=self.slo,
                  predictions=self.predictions, confusion=self.confusion, bundle=self.bundle,
                  seed=self.seed, **self.server.policy_kw(self.cost))
        s = summarize(res, self.slo)
        s["rate_scale"] = rate_scale
        s["skipped_rows"] = self.trace.skipped_rows  # bad rows of the file, set aside (was: on stderr only)
        return s, res


#: The sustained criterion: the largest share of requests that may be deferred past the end of
#: the trace (``deferred_share``) for a load to count as held.
MAX_DEFERRED = 0.01


def deferred_share(res: SimResult, slo: SLO) -> float:
    """Share of requests still waiting for their first token at the last arrival although they
    arrived more than the TTFT SLO before it (requests that never fit the cache left out): what
    a policy that serves hopeless requests after the others defers past the end of a finite trace."""
    reqs = res.requests
    if not reqs:
        return 0.0
    end = max(r.arrival_s for r in reqs)
    late = sum(1 for r in reqs if r.finish_s >= 0 and r.arrival_s < end - slo.ttft_s
               and not 0 <= r.first_token_s <= end)
    return late / len(reqs)


@dataclass
class SustainedSpec(RunSpec):
    """A RunSpec whose runs also record ``deferred_share``, which ``meets`` holds to at most
    ``MAX_DEFERRED`` under any criterion: ``capacity`` over it is the *sustained* capacity, the
    load a server keeps up with. On a finite trace a policy that gives up on
    requests whose TTFT is lost can pass 90% attainment above the saturation ceiling by never
    catching up with the other 10%; this criterion does not let it."""

    def run(self, policy: str, rate_scale: float) -> tuple[dict, SimResult]:
        s, res = RunSpec.run(self, policy, rate_scale)
        s["deferred_share"] = deferred_share(res, self.slo)  # (the attainment is kept as measured)
        return s, res


def sustained(spec: RunSpec) -> SustainedSpec:
    """``spec`` under the sustained criterion."""
    return SustainedSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})


def kv_timeline(res: SimResult, points: int = 400) -> tuple[list[float], list[float]]:
    """KV utilization (used / capacity) over time as steps: each logged iteration's from its
    start, and 0 from the end of one after which the server idled (was: a line from one
    iteration's end to the next's, across idle gaps); at most ``points`` steps, each the mean
    over an equal share of the span when there are more. The last point repeats the last
    step's value at the last iteration's end, so that a ``steps-post`` plot draws that step to
    its end (was: the last step had no width; a lone request's decodes did not show)."""
    log = iteration_table(res)
    if not len(log):  # nothing ran (every request dropped)
        return [], []
    end, start, u = log[:, 0], log[:, 0] - log[:, 1] * log[:, 2], log[:, 4] / res.kv_capacity_tokens
    idle = np.flatnonzero(start[1:] > end[:-1] * (1 + 1e-9) + 1e-9)  # (times are float sums)
    t = np.insert(start, idle + 1, end[idle])
    u = np.insert(u, idle + 1, 0.0)
    if len(t) <= points:
        return [*t.tolist(), float(end[-1])], [*u.tolist(), float(u[-1])]
    # more steps than points: each point the time-weighted mean over its share of the span
    # (was: every k-th step, so a sampled idle zero held until the next sample)
    edges = np.linspace(t[0], end[-1], points + 1)
    area = np.concatenate([[0.0], np.cumsum(u * np.diff(np.append(t, end[-1])))])  # exact at each t
    at = np.interp(edges, np.append(t, end[-1]), area)  # the step function's integral is piecewise linear
    mean = (np.diff(at) / np.diff(edges)).tolist()
    return edges.tolist(), [*mean, mean[-1]]


def sweep(spec: RunSpec, policies: Sequence[str], rate_scales: Sequence[float],
          progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One summary per (policy, rate scale), each with a thinned KV-utilization timeline."""
    rows = []
    for scale in rate_scales:
        for p in policies:
            s, res = spec.run(p, scale)
            s["kv_timeline"] = kv_timeline(res)
            rows.append(s)
            if progress:
                progress(s)
    return rows


#: What each capacity probe records.
PROBE_METRICS = ("slo_attainment", "normalized_latency_s", "p99_tbt_s", "mean_jct_s")
#: The flooded server of the saturation ceiling: the trace replayed this many times faster,
#: and, while that does not saturate the server, ``FLOOD_STEP`` times more, up to the maximum.
FLOOD_SCALE = 50.0
FLOOD_STEP = 8.0
MAX_FLOOD_SCALE = FLOOD_SCALE * FLOOD_STEP**4
#: Policies whose flooded throughput is the ceiling (the best of them).
CEILING_POLICIES = ("vllm", "ecoserve-oracle")


#: Why a capacity held without deferral can pass the ceiling (said wherever it does).
CEILING_DRAIN_NOTE = ("on a short trace the flooded run ends with its last requests draining at a small "
                      "batch, which lowers the ceiling itself: it bounds capacity on long traces")


def ceiling(spec: RunSpec, policies: Sequence[str] = CEILING_POLICIES, flood: float = FLOOD_SCALE) -> dict:
    """The saturation ceiling: the rate scale at which the trace's arrival rate equals the
    throughput of a flooded server (the trace replayed ``flood`` times faster, best of
    ``policies``). Above it requests arrive faster than the server can finish them, queues and
    TTFTs grow without bound, and no policy holds a TTFT SLO for long: an upper bound on any
    policy's capacity (up to the edge effects of a finite trace, docs/results.md, and to what
    another policy flooded would finish faster than the best of ``policies``: 0.4% on the
    demo's trace, docs/simulator.md).

    The arrival rate counts the requests the server can hold (those longer than the whole KV
    cache are dropped at every load and finish at no rate). A light trace that ``flood`` does
    not saturate (the flooded server finished at over half the rate requests arrived) is
    flooded ``FLOOD_STEP`` times harder, up to ``MAX_FLOOD_SCALE``; ``saturated`` says whether
    it was."""
    arr = spec.trace.arrival_s
    n = len(arr)
    if n < 2 or not arr[-1] > arr[0]:
        return {"ceiling_rate_scale": None, "note": "needs at least two distinct arrival times"}
    base_rps = (n - 1) / float(arr[-1] - arr[0])  # the trace's arrival rate at scale 1
    while True:
        summaries = {p: spec.run(p, flood)[0] for p in policies}
        runs = {p: s["throughput_rps"] for p, s in summaries.items()}
        if not any(math.isfinite(x) for x in runs.values()):
            return {"ceiling_rate_scale": None, "flood_throughput_rps": runs,
                    "note": "no request finished on the flooded server: every one was dropped, longer "
                            "than the whole KV cache"}
        best = max((p for p in runs if math.isfinite(runs[p])), key=lambda p: runs[p])
        held = 1.0 - summaries[best]["dropped"] / summaries[best]["requests"]  # the same at every load
        saturated = runs[best] < 0.5 * flood * base_rps * held
        if saturated or flood >= MAX_FLOOD_SCALE:
            break
        flood *= FLOOD_STEP
    out = {"ceiling_rate_scale": runs[best] / (base_rps * held), "flood_scale": flood, "ceiling_policy": best,
           "flood_throughput_rps": runs, "trace_rps": base_rps, "saturated": saturated, "note": None}
    if not saturated:
        out["note"] = (f"the server kept up with the trace even {flood:g} times faster: the ceiling is at "
                       "least this")
    return out


def meets(s: dict, target: float = 0.9, max_normalized_latency: float | None = None,
          max_p99_tbt: float | None = None) -> bool:
    """The capacity criterion on one run's summary: SLO attainment >= ``target`` (or, with
    ``max_normalized_latency``, normalized latency <= it: the papers' criterion), the p99 time
    between tokens <= ``max_p99_tbt`` when given (a run without any gap between tokens, every
    request one token long, has none to break it), and, on a ``SustainedSpec`` run (with
    ``deferred_share``), at most ``MAX_DEFERRED`` of the requests deferred."""
    if max_normalized_latency is not None:
        good = s["normalized_latency_s"] <= max_normalized_latency and s["finished"] == s["requests"]
    else:
        good = s["slo_attainment"] >= target
    tbt_ok = max_p99_tbt is None or not s["p99_tbt_s"] > max_p99_tbt  # NaN: no gap at all
    return bool(good and tbt_ok and s.get("deferred_share", 0.0) <= MAX_DEFERRED)


#: ``capacity``'s search: it stops once the passing and failing loads are within this share of
#: the failing one, or after this many runs (enough to double up to x8192 and then bisect to
#: 2%; a search stopped short says so: ``converged``).
CAPACITY_REL_TOL = 0.02
CAPACITY_MAX_RUNS = 20


def capacity(spec: RunSpec, policy: str, target: float = 0.9, lo: float = 0.0,
             hi: float = 1.0, rel_tol: float = CAPACITY_REL_TOL, max_runs: int = CAPACITY_MAX_RUNS,
             max_normalized_latency: float | None = None, max_p99_tbt: float | None = None) -> dict:
    """Largest rate scale that ``meets`` the criterion (SLO attainment >= ``target`` by default;
    see ``meets`` for the normalized-latency and p99-TBT variants): double from ``hi`` until it
    breaks, then bisect (``lo``: the assumed-passing lower end) to ``rel_tol``, in at most
    ``max_runs`` runs; attainment is assumed to fall with load.

    ``max_rate_scale`` is the largest passing scale probed, given only when a failing one was
    found above it (``search``: ``found``). Otherwise it is None, ``search`` says why and
    ``note`` explains: ``no_failing_load`` (the trace is too small or light to load the server;
    ``lower_bound`` is the largest passing scale), ``no_passing_load`` (``upper_bound`` is the
    smallest failing one), ``unattainable`` (the requests dropped at every load alone break the
    criterion: one run) or ``load_independent`` (every request arrives at once, so the scale
    does not change the load). Every probe is listed; ``dropped`` counts the requests longer
    than the whole KV cache, dropped at every load (misses for the criterion)."""
    # numbers, not bools or strings (was: target="0.9" a TypeError from the comparison, True taken as 1)
    for name, v in (("target", target), ("lo", lo), ("hi", hi), ("rel_tol", rel_tol),
                    ("max_normalized_latency", max_normalized_latency), ("max_p99_tbt", max_p99_tbt)):
        if v is not None and not is_real(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if not 0 <= lo < hi or not np.isfinite(hi) or isinstance(max_runs, bool) \
            or not isinstance(max_runs, int | np.integer) or max_runs < 1:
        raise ValueError(f"need 0 <= lo < hi (finite) and max_runs a whole number >= 1, got {lo}, {hi}, {max_runs}")
    if not (np.isfinite(rel_tol) and rel_tol > 0):
        raise ValueError(f"rel_tol must be a finite number > 0, got {rel_tol}")
    for name, bound in (("max_normalized_latency", max_normalized_latency), ("max_p99_tbt", max_p99_tbt)):
        if bound is not None and not (np.isfinite(bound) and bound > 0):  # was: every load failed
            raise ValueError(f"{name} must be a finite number > 0 (seconds), got {bound}")
    probes: list[dict] = []
    seen: dict[str, Any] = {}
    passing: list[float] = []
    failing: list[float] = []

    def ok(scale: float) -> bool:
        s, _ = spec.run(policy, scale)
        seen["predictions"], seen["dropped"] = s["predictions"], s["dropped"]  # the same at every load
        probes.append({"rate_scale": scale, **{k: s[k] for k in (*PROBE_METRICS, "deferred_share") if k in s}})
        passed = meets(s, target, max_normalized_latency, max_p99_tbt)
        (passing if passed else failing).append(scale)
        return passed

    def unattainable() -> bool:
        """The requests dropped at every load (longer than the whole KV cache) alone break the
        criterion: no load can meet it (was: halved down 8 times to a false "below x0.0039")."""
        d, n = seen.get("dropped", 0), len(arrivals)
        return bool(d) and (max_normalized_latency is not None or (n - d) / n < target)

    arrivals = spec.trace.arrival_s
    simultaneous = len(arrivals) > 0 and arrivals[0] == arrivals[-1]  # sorted
    if simultaneous:
        ok(hi)  # every scale is the same load
    else:
        while len(probes) < max_runs and ok(hi) and math.isfinite(2 * hi):  # grow until the SLO breaks
            hi *= 2  # (and stop short of inf: was "rate scale must be a number > 0, got inf" from hi=1e308)
        floor = hi / 256
        while failing and len(probes) < max_runs and not unattainable():
            low, high = max(passing, default=lo), min(failing)
            if high - low <= rel_tol * high or (not passing and high <= floor):
                break
            ok((low + high) / 2)
    best = max(passing, default=None)
    search = ("load_independent" if simultaneous else "no_failing_load" if not failing
              else "unattainable" if unattainable() and not passing
              else "no_passing_load" if not passing else "found")
    upper = min(failing, default=None)
    # within rel_tol: only a found capacity can be (the others have no bracket)
    converged = search == "found" and upper - best <= rel_tol * upper  # type: ignore[operator]
    out: dict[str, Any] = {
        "policy": policy, "max_rate_scale": best if search == "found" else None, "search": search,
        "converged": converged,
        "lower_bound": best, "upper_bound": upper,
        "target_attainment": None if max_normalized_latency is not None else target,  # (replaced)
        "max_normalized_latency_s": max_normalized_latency, "max_p99_tbt_s": max_p99_tbt,
        "slo_ttft_s": spec.slo.ttft_s, "slo_tbt_s": spec.slo.tbt_s, "slo_deadline_s": spec.slo.deadline_s,
        "predictions": seen.get("predictions", ""), "requests": len(arrivals),
        "dropped": seen.get("dropped", 0), "probes": probes, "note": None}  # every key, null where it does not apply
    if search == "load_independent":
        out["note"] = (f"every request arrives at the same time, so the rate scale does not change "
                       f"the load: SLO attainment is {probes[0]['slo_attainment']:.3g} at any scale; "
                       "no capacity")
    elif search == "no_failing_load":
        out["note"] = (f"the criterion held at every load probed, up to x{best:g}: the capacity is "
                       "above that, not found (the trace is too small or too light to load the server)")
    elif search == "unattainable":
        d, n = out["dropped"], len(arrivals)
        out["note"] = (f"{d} of {n} requests are longer than the whole KV cache and are dropped at every load, "
                       + (f"so SLO attainment is at most {(n - d) / n:.3g}, below the target {target:g}"
                          if max_normalized_latency is None else
                          "and the normalized-latency criterion needs every request finished")
                       + ": no load meets it (a larger KV cache, or a trace without them)")
    elif search == "no_passing_load":
        out["note"] = (f"the criterion failed at every load probed, down to x{out['upper_bound']:g}: "
                       "the capacity is below that, not found")
    elif not converged:
        out["note"] = (f"the search stopped after {len(probes)} runs with the capacity between x{best:g} and "
                       f"x{upper:g}, not within {rel_tol:.0%} (max_rate_scale is the lower end)")
    return out


def slo_text(slo: SLO) -> str:
    """The SLO as reports state it (the deadline only when there is one)."""
    return (f"SLO TTFT {slo.ttft_s:g}s / TBT {slo.tbt_s:g}s"
            + (f" / deadline {slo.deadline_s:g}s" if slo.deadline_s is not None else ""))


def capacity_number(x: float) -> str:
    """A capacity in a table: three decimals, or three significant digits below 0.1 (0.00355 was
    0.004; the grid's tables too, where 0.01053 was 0.011 beside its exact ratios)."""
    return f"{x:.3f}" if x >= 0.1 else f"{x:.3g}"


def load_text(x: float) -> str:
    """A load to be read back (``simulate --rate-scale``): four significant digits where they
    give it back, else every digit it needs (was: 0.5156 for 0.515625, and attainment near the
    target can change within 0.005% of a load: 0.877 there against 0.903)."""
    short = f"{x:.4g}"
    return short if float(short) == x else repr(float(x))


def capacity_text(c: dict) -> str:
    """``max_rate_scale`` for a table: the number, else what the search bounded it by."""
    search = c.get("search", "found")
    if search == "found":
        text = capacity_number
        return text(c["max_rate_scale"]) + ("" if c.get("converged", True) else f" to {text(c['upper_bound'])}")
    if search == "no_failing_load":
        return f"> {c['lower_bound']:.3g}"
    return f"< {c['upper_bound']:.3g}" if search == "no_passing_load" else "none" if search == "unattainable" else "n/a"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """``rows`` as a markdown table; a ``dropped`` column is added when a run dropped requests
    (longer than the whole KV cache), an ``errors`` column when a run ended requests with an
    error (an engine fault, a prompt vllm-v0 ignores): the other columns count only the requests
    served (was: errors were in results.json only)."""
    for extra in ("dropped", "errors"):
        if any(r.get(extra) for r in rows) and extra not in columns:
            columns = (*columns, extra)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.15g}" if c == "rate_scale" and isinstance(r.get(c), float)  # exact:
                                else table_cell(r.get(c, "")) for c in columns) + " |" for r in rows]  # 1.231, 1.234
    return "\n".join(lines)


def predictions_of(rows: Sequence[dict]) -> str:
    """What a sweep's predictions were: the distinct descriptions of its runs whose policy reads
    predictions (vLLM's, Sarathi's and Orca's read none), in order."""
    seen = dict.fromkeys(r["predictions"] for r in rows if r["predictions"] != NO_PREDICTIONS)
    return "; ".join(seen) or NO_PREDICTIONS


def table_cell(v: Any, digits: int = 3) -> str:
    """A value for a text table: a float to ``digits`` significant digits (whole from 1000 up);
    n/a for None, NaN and infinities (a metric no request gave: JSON has null)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        text = f"{v:.{digits}g}"
        return text if "e" not in text or abs(v) < 1 else f"{v:.0f}"  # 999.6 was 1e+03
    return str(v)


#: What ``ecoserve compare`` and ``ecoserve demo`` say when they write no plots.
NO_PLOTS = "matplotlib is not installed: no plots (the [plot] extra adds them: pip install -e '.[plot]' in a checkout)"


def can_plot() -> bool:
    """True if matplotlib is installed (the ``[plot]`` extra): the base install writes the
    results and tables without plots."""
    return importlib.util.find_spec("matplotlib") is not None


def write_report(rows: Sequence[dict], out: Path, header: str = "", title: str = "") -> list[Path]:
    """results.json (strict JSON), table.md and three plots (if ``can_plot``) into the folder
    ``out``; returns the files written. The CLI gives it the temporary folder of
    ``rlpredict.outputs.output_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "table.md"]
    files[0].write_text(dumps(list(rows), indent=1) + "\n")
    files[1].write_text((header + "\n\n" if header else "") + markdown_table(rows) + "\n")
    return files + (plot(rows, out, title) if can_plot() else [])


def plot(rows: Sequence[dict], out: Path, title: str = "") -> list[Path]:
    from matplotlib.figure import Figure  # the object API: never switches the process's backend

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    written = []
    for metric, fname, ylabel in (("p99_ttft_s", "latency_vs_load.png", "p99 TTFT (s)"),
                                  ("slo_attainment", "slo_vs_load.png", "SLO attainment")):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for p in policies:
            pts = sorted((r["rate_scale"], r[metric]) for r in rows if r["policy"] == p)
            ax.plot(*zip(*pts, strict=True), marker="o", label=p)
        ax.set_xlabel("rate scale (x trace arrival rate)")
        ax.set_ylabel(ylabel)
        if metric == "p99_ttft_s":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _title(ax, title)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        written.append(out / fname)
    top = max(r["rate_scale"] for r in rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        if r["rate_scale"] == top and "kv_timeline" in r:
            # held from one iteration to the next (was: lines across idle gaps, an empty cache)
            ax.plot(*r["kv_timeline"], label=r["policy"], lw=0.8, drawstyle="steps-post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"KV cache used / capacity (rate scale {top:g})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _title(ax, title)
    fig.tight_layout()
    fig.savefig(out / "kv_util_over_time.png", dpi=120)
    return [*written, out / "kv_util_over_time.png"]


def _title(ax: Any, title: str) -> None:
    """The run's conditions (trace, profile, SLO), wrapped to the plot's width."""
    if title:
        ax.set_title(textwrap.fill(title, 80), fontsize=7)
