"""Sweeps over policies and loads, capacity bisection, a Markdown table and plots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.json_file import dumps

from .metrics import summarize
from .predictions import Confusion
from .request import SLO
from .simulator import SimResult, iteration_table, run
from .trace import Trace

TABLE_COLUMNS = ("policy", "rate_scale", "throughput_rps", "mean_jct_s", "p50_ttft_s", "p99_ttft_s",
                 "p99_tbt_s", "slo_attainment", "goodput_rps", "preemptions", "kv_util_mean")


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

    def run(self, policy: str, rate_scale: float) -> tuple[dict, SimResult]:
        with np.errstate(over="ignore"):
            trace = self.trace.scaled(rate_scale)
        if not np.isfinite(trace.arrival_s).all():
            raise ValueError(f"{self.trace.path}: arrival times at rate scale {rate_scale:g} are not "
                             "finite numbers (too small a rate scale or --rate)")
        res = run(trace, policy, self.cost, slo=self.slo,
                  predictions=self.predictions, confusion=self.confusion, bundle=self.bundle,
                  seed=self.seed)
        s = summarize(res, self.slo)
        s["rate_scale"] = rate_scale
        return s, res


def kv_timeline(res: SimResult, points: int = 400) -> tuple[list[float], list[float]]:
    """KV utilization (used / capacity) over time, thinned to about ``points`` samples."""
    log = iteration_table(res)
    t, u = log[:, 0], log[:, 4] / res.kv_capacity_tokens
    idx = np.linspace(0, len(t) - 1, min(points, len(t))).astype(int) if len(t) else np.array([], int)
    return t[idx].tolist(), u[idx].tolist()


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


def capacity(spec: RunSpec, policy: str, target: float = 0.9, lo: float = 0.0,
             hi: float = 1.0, rel_tol: float = 0.02, max_runs: int = 14) -> dict:
    """Largest rate scale with SLO attainment >= ``target``: double from ``hi`` until the SLO
    breaks, then bisect (``lo``: the assumed-passing lower end) to ``rel_tol``, in at most
    ``max_runs`` runs; attainment is assumed to fall with load.

    ``max_rate_scale`` is the largest passing scale probed, given only when a failing one was
    found above it (``search``: ``found``). Otherwise it is None, ``search`` says why and
    ``note`` explains: ``no_failing_load`` (the trace is too small or light to load the server;
    ``lower_bound`` is the largest passing scale), ``no_passing_load`` (``upper_bound`` is the
    smallest failing one) or ``load_independent`` (every request arrives at once, so the scale
    does not change the load). Every probe is listed."""
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if not 0 <= lo < hi or not np.isfinite(hi) or max_runs < 1:
        raise ValueError(f"need 0 <= lo < hi (finite) and max_runs >= 1, got {lo}, {hi}, {max_runs}")
    probes: list[tuple[float, float]] = []
    seen: dict[str, str] = {}
    passing: list[float] = []
    failing: list[float] = []

    def ok(scale: float) -> bool:
        s, _ = spec.run(policy, scale)
        seen["predictions"] = s["predictions"]
        probes.append((scale, s["slo_attainment"]))
        passed = s["slo_attainment"] >= target
        (passing if passed else failing).append(scale)
        return passed

    arrivals = spec.trace.arrival_s
    simultaneous = len(arrivals) > 0 and arrivals[0] == arrivals[-1]  # sorted
    if simultaneous:
        ok(hi)  # every scale is the same load
    else:
        while len(probes) < max_runs and ok(hi):  # grow until the SLO breaks
            hi *= 2
        floor = hi / 256
        while failing and len(probes) < max_runs:
            low, high = max(passing, default=lo), min(failing)
            if high - low <= rel_tol * high or (not passing and high <= floor):
                break
            ok((low + high) / 2)
    best = max(passing, default=None)
    search = ("load_independent" if simultaneous else "no_failing_load" if not failing
              else "no_passing_load" if not passing else "found")
    out: dict[str, Any] = {
        "policy": policy, "max_rate_scale": best if search == "found" else None, "search": search,
        "lower_bound": best, "upper_bound": min(failing, default=None), "target_attainment": target,
        "slo_ttft_s": spec.slo.ttft_s, "slo_tbt_s": spec.slo.tbt_s,
        "predictions": seen.get("predictions", ""),
        "probes": [{"rate_scale": a, "slo_attainment": b} for a, b in probes]}
    if search == "load_independent":
        out["note"] = (f"every request arrives at the same time, so the rate scale does not change "
                       f"the load: SLO attainment is {probes[0][1]:.3g} at any scale; no capacity")
    elif search == "no_failing_load":
        out["note"] = (f"SLO attainment stayed >= {target:g} at every load probed, up to "
                       f"x{best:g}: the capacity is above that, not found (the trace is too small "
                       "or too light to load the server)")
    elif search == "no_passing_load":
        out["note"] = (f"SLO attainment stayed below {target:g} at every load probed, down to "
                       f"x{out['upper_bound']:g}: the capacity is below that, not found")
    return out


def capacity_text(c: dict) -> str:
    """``max_rate_scale`` for a table: the number, else what the search bounded it by."""
    search = c.get("search", "found")
    if search == "found":
        return f"{c['max_rate_scale']:.3f}"
    if search == "no_failing_load":
        return f"> {c['lower_bound']:.3g}"
    return f"< {c['upper_bound']:.3g}" if search == "no_passing_load" else "n/a"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: Sequence[dict], out: Path, header: str = "") -> list[Path]:
    """results.json (strict JSON), table.md and three plots into the folder ``out``; returns the
    files written. The CLI gives it the temporary folder of ``rlpredict.outputs.output_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "table.md"]
    files[0].write_text(dumps(list(rows), indent=1) + "\n")
    files[1].write_text((header + "\n\n" if header else "") + markdown_table(rows) + "\n")
    return files + plot(rows, out)


def plot(rows: Sequence[dict], out: Path) -> list[Path]:
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
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        written.append(out / fname)
    top = max(r["rate_scale"] for r in rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        if r["rate_scale"] == top and "kv_timeline" in r:
            ax.plot(*r["kv_timeline"], label=r["policy"], lw=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"KV cache used / capacity (rate scale {top:g})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "kv_util_over_time.png", dpi=120)
    return [*written, out / "kv_util_over_time.png"]
