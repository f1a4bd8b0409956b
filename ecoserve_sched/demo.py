"""The main job: predictor -> annotated trace -> simulated serving under vLLM and EcoServe.

``run_demo(out)`` runs the whole story on the embedded defaults:

1. the shipped predictor bundle annotates the bundled request sample (real Azure conversation
   arrival times and prompt lengths, real held-out ShareGPT prompts with their real response
   lengths; see ``samples/README.md``) with ``rlpredict annotate``;
2. the predictor's accuracy on that sample (bucket accuracy, +-1 bucket, MAE, reservation
   coverage) and its confusion matrix;
3. the simulator replays the annotated trace under each policy (default ``POLICIES``: vLLM V0
   and V1, EcoServe, EcoServe-oracle) at several loads over a named GPU profile, and finds each
   policy's capacity (the largest load that keeps SLO attainment >= 0.9) and its sustained
   capacity (also at most 1% of the requests deferred past the trace's end,
   ``compare.SustainedSpec``) beside the saturation ceiling (no policy keeps up above it) and the
   ratio to vLLM's 2024 scheduler (``vllm-v0``, the paper's baseline);
4. the same capacities on a second server, ``HEADROOM_PROFILE`` (Llama-3-8B on an H200: the KV
   cache is no constraint there), where vLLM V1 already keeps up with the ceiling: the regime
   where no scheduler can win, beside the one where EcoServe does;
5. ``report.md`` with the tables and four plots (latency vs load, SLO attainment vs load, KV
   utilization over time, the confusion matrix), ``results.json``.

The folder is built atomically (``rlpredict.outputs.output_dir``): an existing one is replaced
only with ``force`` and only if this tool wrote it; an interrupted run leaves it as it was.

The annotation step needs ``rlpredict``'s runtime (numpy, onnxruntime, tokenizers; no torch);
the rest is the scheduler and the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.json_file import dumps
from rlpredict.outputs import check_paths, output_dir

from .compare import (
    CEILING_DRAIN_NOTE,
    NO_PLOTS,
    RunSpec,
    can_plot,
    capacity,
    capacity_text,
    ceiling,
    markdown_table,
    plot,
    sustained,
    sweep,
)
from .cost_model import CostModel, load_profile
from .predictions import load_confusion
from .request import SLO
from .trace import Trace, read_trace

SAMPLE = Path(__file__).resolve().parent / "samples" / "azure_conv_sharegpt.jsonl.gz"
PROFILE = "llama2-13b-a100-80gb"
POLICIES = ("vllm-v0", "vllm", "ecoserve", "ecoserve-oracle")
#: The regime where nothing can win: the same requests on a server whose KV cache is no
#: constraint, where vLLM V1 already keeps up with the saturation ceiling.
HEADROOM_PROFILE = "llama3-8b-h200"
RATE_SCALES = (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
DEFAULT_SLO = SLO()
TABLE = ("policy", "rate_scale", "throughput_rps", "mean_jct_s", "p50_ttft_s", "p99_ttft_s",
         "p99_tbt_s", "slo_attainment", "preemptions", "kv_util_mean")


class DemoError(ValueError):
    """The demo cannot run here (rlpredict's runtime is missing)."""


@dataclass
class DemoResult:
    out: Path
    annotate: dict[str, Any]
    predictor: dict[str, Any]
    rows: list[dict]
    capacity: list[dict]
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    headroom: dict[str, Any] | None = None  # {"profile": ..., "capacity": [...]}: the second regime


def predictor_quality(trace: Trace, edges: np.ndarray) -> dict[str, Any]:
    """The annotated predictions of ``trace`` against its true response lengths."""
    true_b = np.searchsorted(edges, trace.output_tokens, side="left")
    assert trace.rl is not None, "predictor_quality needs an annotated trace"
    pred_b, point, reserve = (trace.rl[:, i] for i in range(3))
    k = len(edges)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (true_b, pred_b), 1)
    out = trace.output_tokens.astype(float)
    return {
        "requests": len(trace),
        "bucket_accuracy": float((true_b == pred_b).mean()),
        "within_1_bucket": float((np.abs(true_b - pred_b) <= 1).mean()),
        "mae_tokens": float(np.abs(point - out).mean()),
        "reserve_coverage": float((reserve >= out).mean()),
        "reserved_over_actual": float(reserve.sum() / out.sum()),
        "bucket_edges": [None if not np.isfinite(e) else int(e) for e in edges],
        "confusion": matrix.tolist(),
    }


def _annotate(sample: Path, out: Path, bundle: str | None) -> tuple[Path, dict, Path]:
    try:
        from rlpredict.serve.annotate import annotate_file
        from rlpredict.serve.runtime import Predictor
    except ImportError as e:
        raise DemoError(f"the demo's annotation step needs rlpredict's runtime ({e})") from None
    from rlpredict.serve.annotate import AnnotateError, detect_format

    fmt, _ = detect_format(sample)
    if fmt not in ("jsonl", "csv"):
        raise DemoError(f"{sample}: the demo reads a .jsonl or .csv trace (optionally .gz)")
    predictor = Predictor.load(bundle)
    annotated = out / f"trace.annotated.{fmt}.gz"  # annotate keeps the input's format
    try:
        summary = annotate_file(predictor, sample, annotated)
    except AnnotateError as e:  # its advice names an option of `rlpredict annotate`, not of the demo
        raise DemoError(str(e).replace(" (use --on-error skip to set bad rows aside)", "")) from None
    return annotated, summary.to_dict(), predictor.bundle.path


def run_demo(out: Path, *, sample: Path = SAMPLE, profile: str = PROFILE, bundle: str | None = None,
             policies: Sequence[str] = POLICIES, rate_scales: Sequence[float] = RATE_SCALES,
             slo: SLO = DEFAULT_SLO, target: float = 0.9, force: bool = False,
             headroom_profile: str | None = HEADROOM_PROFILE,
             step: Callable[[str], None] = lambda _: None,
             progress: Callable[[dict], None] | None = None) -> DemoResult:
    """Run the main job and write its report into the folder ``out`` (see the module docstring);
    ``out`` must not hold an input, and an existing ``out`` is replaced only with ``force``.
    ``headroom_profile`` None (or ``profile`` itself): no second regime."""
    from rlpredict.serve.bundle import default_bundle_path

    inputs = [sample, Path(bundle) if bundle else default_bundle_path()]
    # (apart: was refused only once annotate had begun to write inside the bundle, naming its temporary folder)
    check_paths(inputs + ([Path(profile)] if Path(profile).is_file() else []), [("--out", out)], apart=inputs[1:])
    tr = read_trace(sample)  # a bad row, prompt or profile is refused naming it, before any work
    if tr.prompts is None:
        raise DemoError(f"{tr.prompt_problem} (the demo annotates every row's prompt)")
    for x in rate_scales:  # one too small for the trace's clock too, as `compare` (was: after annotating)
        tr.scaled(x)
    cost = load_profile(profile)
    cost2 = load_profile(headroom_profile) if headroom_profile else None
    with output_dir(out, force=force, tool="ecoserve demo") as tmp:
        result = _run(tmp, out, sample, cost, bundle, policies, rate_scales, slo, target,
                      cost2, step, progress)
    result.files = [out / f.relative_to(tmp) for f in result.files]
    return result


def _run(tmp: Path, out: Path, sample: Path, cost: CostModel, bundle: str | None,
         policies: Sequence[str], rate_scales: Sequence[float], slo: SLO, target: float,
         cost2: CostModel | None, step: Callable[[str], None],
         progress: Callable[[dict], None] | None) -> DemoResult:
    """``run_demo``'s work, written into ``tmp`` (which becomes ``out``)."""
    clock: dict[str, float] = {}
    t = time.perf_counter()
    step(f"annotate {sample.name} with the predictor bundle")
    annotated, ann, bundle_path = _annotate(sample, tmp, bundle)
    ann["output"] = str(out / annotated.name)  # where it will be (it named the temporary folder)
    clock["annotate_s"] = time.perf_counter() - t

    trace = replace(read_trace(annotated), path=str(out / annotated.name))  # where it will be
    edges = load_confusion(bundle_path).edges
    quality = predictor_quality(trace, edges)
    files = []
    if can_plot():
        from rlpredict.confusion_plot import plot_confusion

        files.append(plot_confusion(np.array(quality["confusion"]), quality["bucket_edges"],
                                    f"{bundle_path.name} on {sample.name} ({len(trace)} requests)",
                                    tmp / "confusion.png"))

    t = time.perf_counter()
    spec = RunSpec(trace, cost, slo, predictions="annotated")
    step(f"simulate {', '.join(policies)} at load x{', x'.join(f'{s:g}' for s in rate_scales)} "
         f"on {cost.name}")
    rows = sweep(spec, policies, rate_scales, progress=progress)
    clock["sweep_s"] = time.perf_counter() - t

    t = time.perf_counter()
    step(f"capacity: the largest load with SLO attainment >= {target:g}, and the largest the "
         "server keeps up with")
    caps = capacities(spec, policies, target)
    clock["capacity_s"] = time.perf_counter() - t
    headroom = None
    if cost2 is not None and cost2.name != cost.name:
        t = time.perf_counter()
        step(f"the same capacities on {cost2.name}, where the KV cache is no constraint")
        headroom = {"profile": cost2.name, "capacity": capacities(replace(spec, cost=cost2), policies, target)}
        clock["headroom_s"] = time.perf_counter() - t

    if can_plot():
        files += plot(rows, tmp)
    table = tmp / "table.md"
    table.write_text(_header(trace, cost.name, slo) + "\n\n" + markdown_table(rows, TABLE) + "\n")
    result = DemoResult(out, ann, quality, rows, caps, [], clock, headroom)
    (tmp / "results.json").write_text(dumps(
        {"annotate": ann, "predictor": quality, "runs": rows, "capacity": caps, "headroom": headroom,
         "seconds": clock}, indent=1) + "\n")
    report = tmp / "report.md"
    report.write_text(markdown(result, sample, bundle_path, cost.name, slo))
    result.files = [report, tmp / "results.json", table, annotated, *files]
    return result


def capacities(spec: RunSpec, policies: Sequence[str], target: float) -> list[dict]:
    """Each policy's capacity (``compare.capacity``) and sustained capacity (the same search
    under ``compare.SustainedSpec``), against the saturation ceiling, vLLM V1 and vLLM V0."""
    trace = spec.trace
    flooded = ceiling(spec)
    ceil = flooded["ceiling_rate_scale"]
    # a server the flood never saturated gives a lower bound (was: shown as the ceiling, "no
    # policy sustains a load above it", under loads 500,000x higher; a reviewer's find)
    bound = flooded["note"] if ceil is not None and not flooded.get("saturated", True) else None
    caps = [capacity(spec, p, target=target, hi=ceil or 1.0) for p in policies]
    sus = sustained(spec)
    searches = {p: capacity(sus, p, target=target, hi=ceil or 1.0) for p in policies}
    held = {p: r["max_rate_scale"] for p, r in searches.items()}
    found_by = {c["policy"]: c["max_rate_scale"] for c in caps}
    for c in caps:
        found, kept = c["max_rate_scale"], held[c["policy"]]
        # how the sustained search ended, for the table (was: its lower end shown as exact when it
        # stopped short, and "-" without a word when it found none)
        c["sustained_search"] = {k: searches[c["policy"]][k]
                                 for k in ("search", "converged", "max_rate_scale", "lower_bound", "upper_bound")}
        # the trace's rate as the ceiling takes it: n - 1 gaps over the span (n / span was high)
        c["requests_per_s"] = None if found is None else found * (len(trace) - 1) / _span(trace)
        c["ceiling_rate_scale"] = ceil
        c["ceiling_lower_bound"] = bound
        c["vs_ceiling"] = _ratio(found, ceil)
        c["x_vllm"] = _ratio(found, found_by.get("vllm"))
        c["x_vllm_v0"] = _ratio(found, found_by.get("vllm-v0"))
        c["sustained_rate_scale"] = kept
        c["sustained_vs_ceiling"] = _ratio(kept, ceil)
        c["sustained_x_vllm"] = _ratio(kept, held.get("vllm"))
    return caps


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _span(trace: Trace) -> float:
    return max(float(trace.arrival_s[-1] - trace.arrival_s[0]), 1e-9)


def _header(trace: Trace, profile: str, slo: SLO) -> str:
    return (f"trace {Path(trace.path).name} ({len(trace)} requests over {_span(trace):.0f} s), "
            f"profile {profile}, SLO TTFT {slo.ttft_s:g} s / mean TBT {slo.tbt_s:g} s")


def sustained_above_ceiling(caps: Sequence[dict]) -> bool:
    """Some policy sustains a load above the ceiling (a short trace's drain lowers the ceiling)."""
    return any((c.get("sustained_vs_ceiling") or 0) > 1 for c in caps)


def ceiling_line(caps: Sequence[dict]) -> str | None:
    """One sentence on the capacities' ceiling: a lower bound where the flood never saturated the
    server, one that a sustained load passed on a short trace, or the bound no policy passes."""
    ceil = next((c.get("ceiling_rate_scale") for c in caps), None)
    if not ceil:
        return None
    if bound := next((c.get("ceiling_lower_bound") for c in caps), None):
        return f"saturation ceiling at least x{ceil:.3f} ({bound}): each / ceiling is an upper bound"
    if sustained_above_ceiling(caps):
        return f"saturation ceiling x{ceil:.3f}; here a sustained load is above it: {CEILING_DRAIN_NOTE}"
    return f"saturation ceiling x{ceil:.3f}: no policy sustains a load above it"


def capacity_table(caps: Sequence[dict], explain: bool = True) -> str:
    """The capacities as a markdown table, the ceiling under it (``explain``: and what the
    columns mean)."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def load(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    def sustained_text(c: dict) -> str:
        s = c.get("sustained_search")
        if s is None or (s["search"] == "found" and s["converged"]):
            return load(c.get("sustained_rate_scale"))
        return capacity_text(s)  # "L to U", "> L", "< U" or "none"

    ceil = next((c.get("ceiling_rate_scale") for c in caps), None)
    lines = ["| policy | max load (x trace rate) | requests/s | / ceiling | x vLLM (V1) | x vLLM V0 "
             "| sustained load (/ ceiling) | sustained x vLLM (V1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in caps:
        lines.append(f"| {c['policy']} | {capacity_text(c)} | {load(c.get('requests_per_s'))} | "
                     f"{f(c.get('vs_ceiling'))} | {f(c.get('x_vllm'))} | {f(c.get('x_vllm_v0'))} | "
                     f"{sustained_text(c)} ({f(c.get('sustained_vs_ceiling'))}) | "
                     f"{f(c.get('sustained_x_vllm'))} |")
    bound = next((c.get("ceiling_lower_bound") for c in caps), None)
    if ceil and bound:
        lines += ["", f"Saturation ceiling: at least x{ceil:.3f} ({bound}): each `/ ceiling` is an upper bound."]
    elif ceil and not explain:
        lines += ["", f"Saturation ceiling: x{ceil:.3f}."]
        if sustained_above_ceiling(caps):
            lines[-1] += f" Here a sustained load is above the ceiling: {CEILING_DRAIN_NOTE}."
    elif ceil:
        lines += ["", f"Saturation ceiling: x{ceil:.3f}, the load at which requests arrive as fast as a "
                      "flooded server finishes them (best of vllm and ecoserve-oracle replayed 50x "
                      "faster): above it no policy keeps up. `/ ceiling` is how much of that room each "
                      "policy uses. On a finite trace a policy that serves requests whose TTFT is lost "
                      "after the others can pass 90% attainment above the ceiling by never catching up "
                      "with the rest; the *sustained* load also requires that at most 1% of the "
                      "requests are still waiting for their first token at the last arrival although "
                      "they arrived more than a TTFT SLO before it."]
        if sustained_above_ceiling(caps):
            lines[-1] += f" Here a sustained load is above the ceiling: {CEILING_DRAIN_NOTE}."
    notes = [f"- {c['policy']}: {c['note']}" for c in caps if c.get("note")]
    return "\n".join(lines + (["", *notes] if notes else []))


def regimes_reading(caps: Sequence[dict], headroom: dict[str, Any] | None, profile: str,
                    above: str = "above") -> str:
    """What the two regimes say side by side ("" without both): how much of the ceiling vLLM V1
    keeps up with in each, and EcoServe's load against V1's (``ecoserve demo`` prints it too)."""
    if not headroom:
        return ""

    def kept(cs: Sequence[dict], policy: str, key: str) -> float | None:
        return next((c.get(key) for c in cs if c["policy"] == policy), None)

    v1_here = kept(headroom["capacity"], "vllm", "sustained_vs_ceiling")
    v1_main = kept(caps, "vllm", "sustained_vs_ceiling")
    eco_here = kept(headroom["capacity"], "ecoserve", "sustained_x_vllm")
    eco_main = kept(caps, "ecoserve", "sustained_x_vllm")
    if not (v1_here and v1_main and eco_here and eco_main):
        return ""
    room = ("little room is left for any scheduler" if v1_here >= 0.95 else  # (was: "no room", beside
            f"a scheduler could keep up with at most {1 / v1_here:.2f}x its load")  # EcoServe's 1.12x)
    return (f"On `{headroom['profile']}` vLLM V1 already keeps up with {v1_here:.2f} of the ceiling: {room} "
            f"(EcoServe keeps up with {eco_here:.2f}x V1's load). On `{profile}` {above}, V1 keeps "
            f"up with {v1_main:.2f} of the ceiling, and EcoServe with {eco_main:.2f}x V1's load.")


def errors_note(rows: Sequence[dict]) -> str:
    """What the ``errors`` column counts, when some row has errors ("" otherwise)."""
    policies = sorted({r["policy"] for r in rows if r.get("errors")})
    if not policies:
        return ""
    v0 = (" `vllm-v0` ignores a prompt longer than its `max_model_len`, as vLLM V0 did."
          if "vllm-v0" in policies else "")
    return (f"`errors`: requests a policy ended without serving them ({', '.join(policies)}); each counts "
            f"as an SLO miss.{v0}")


def headroom_section(caps: Sequence[dict], headroom: dict[str, Any] | None, profile: str) -> str:
    """The second regime's table, with what the two regimes (``profile``'s ``caps`` and
    ``headroom``) say side by side."""
    if not headroom:
        return ""
    reading = regimes_reading(caps, headroom, profile)
    reading = f"\n\n{reading}" if reading else ""
    return f"""
## The same requests on `{headroom['profile']}`, where the KV cache is no constraint

{capacity_table(headroom['capacity'], explain=False)}{reading}
"""


def markdown(r: DemoResult, sample: Path, bundle: Path, profile: str, slo: SLO) -> str:
    q = r.predictor
    plots = can_plot()
    confusion = "![confusion matrix](confusion.png)" if plots else f"(No plots: {NO_PLOTS}.)"
    figures = ("![latency vs load](latency_vs_load.png) ![SLO attainment vs load](slo_vs_load.png)\n\n"
               "![KV utilization over time](kv_util_over_time.png)") if plots else f"(No plots: {NO_PLOTS}.)"
    errors = f"\n{note}\n" if (note := errors_note(r.rows)) else ""
    n = r.annotate["rows_replaced"]
    replaced = f"; {n} already had `rl_*` fields, replaced by this bundle's predictions" if n else ""
    headroom_time = (f", the second server's {r.seconds.get('headroom_s', 0):.1f} s" if r.headroom else "")
    return f"""# EcoServe demo: {sample.name}

Predictor `{bundle.name}` annotated {r.annotate['rows_out']} requests
({r.annotate['rows_per_s']:.0f} requests/s{replaced}); the simulator replayed them on `{profile}` with
SLO TTFT {slo.ttft_s:g} s / mean TBT {slo.tbt_s:g} s. Rate scale x1 is the trace's own arrival
rate. Written by `ecoserve demo`.

## Predictor on this sample

| requests | bucket acc. | +-1 bucket | MAE (tokens) | reservation covers | reserved / actual tokens |
|---:|---:|---:|---:|---:|---:|
| {q['requests']} | {q['bucket_accuracy']:.3f} | {q['within_1_bucket']:.3f} | {q['mae_tokens']:.1f} | {q['reserve_coverage']:.3f} | {q['reserved_over_actual']:.2f} |

The bundle's {len(q['bucket_edges'])} buckets are response-length ranges; *reservation covers* is the share of
requests whose true length is within their reservation. The bundled sample's prompts are held-out
ShareGPT turns matched to Azure's response lengths (`ecoserve_sched/samples/README.md`), so these
figures differ from the held-out test in `docs/predictor.md`, where the predictor is compared
with its baselines.

{confusion}

## Capacity (SLO attainment >= 0.9)

{capacity_table(r.capacity)}
{headroom_section(r.capacity, r.headroom, profile)}
## Policies across loads

{markdown_table(r.rows, TABLE)}
{errors}
{figures}

Times: annotate {r.seconds.get('annotate_s', 0):.1f} s, load sweep {r.seconds.get('sweep_s', 0):.1f} s,
capacity search {r.seconds.get('capacity_s', 0):.1f} s{headroom_time}.
"""
