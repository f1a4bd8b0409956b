"""Sweeps over policies and loads, capacity bisection, a Markdown table and plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
        res = run(self.trace.scaled(rate_scale), policy, self.cost, slo=self.slo,
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
    """Largest rate scale with SLO attainment >= ``target`` (bisection; attainment is assumed
    to fall with load). Returns ``max_rate_scale`` and every probe."""
    probes: list[tuple[float, float]] = []
    seen: dict[str, str] = {}

    def ok(scale: float) -> bool:
        s, _ = spec.run(policy, scale)
        seen["predictions"] = s["predictions"]
        probes.append((scale, s["slo_attainment"]))
        return s["slo_attainment"] >= target

    while ok(hi) and len(probes) < max_runs:  # grow until the SLO breaks
        lo, hi = hi, hi * 2
    floor = hi / 256
    while hi - lo > rel_tol * hi and len(probes) < max_runs and hi > floor:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    out = {"policy": policy, "max_rate_scale": lo, "target_attainment": target,
            "slo_ttft_s": spec.slo.ttft_s, "slo_tbt_s": spec.slo.tbt_s,
            "predictions": seen.get("predictions", ""),
            "probes": [{"rate_scale": a, "slo_attainment": b} for a, b in probes]}
    if lo == 0.0:
        out["note"] = "SLO attainment stayed below the target at every load probed"
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: Sequence[dict], out: Path, header: str = "") -> list[Path]:
    """results.json, table.md and three plots under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "table.md"]
    files[0].write_text(json.dumps(list(rows), indent=1) + "\n")
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
