"""``ecoserve``: simulate a policy on a trace, compare policies across loads, find capacity."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .request import SLO

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="EcoServe-style scheduling simulator: replay request traces under policies.")

TraceOpt = Annotated[Path, typer.Option("--trace", help="CSV/JSONL(.gz) trace: arrival_time_s, input_tokens, output_tokens[, rl_*]")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="cost-model profile name or JSON file (default: the cost model's DEFAULT_PROFILE)")]
PredOpt = Annotated[str | None, typer.Option("--predictions", help="annotated|confusion|oracle|bundle (default: annotated if the trace has rl_* fields, else confusion)")]
ConfOpt = Annotated[Path | None, typer.Option("--confusion", help="confusion.json, manifest.json with a 'confusion' key, or a bundle directory")]
BundleOpt = Annotated[str | None, typer.Option("--bundle", help="predictor bundle for --predictions bundle")]
TTFTOpt = Annotated[float, typer.Option("--slo-ttft", help="TTFT SLO in seconds")]
TBTOpt = Annotated[float, typer.Option("--slo-tbt", help="mean time-between-tokens SLO in seconds")]
DeadlineOpt = Annotated[float | None, typer.Option("--slo-deadline", help="optional JCT deadline in seconds")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", help="max_tokens for rows without one (Orca reserves it)")]
MaxReqOpt = Annotated[int | None, typer.Option("--max-requests", help="use only the first N requests")]
ArrOpt = Annotated[str, typer.Option("--arrivals", help="trace|poisson|gamma: keep the trace's arrival times or draw new ones")]
RateOpt = Annotated[float | None, typer.Option("--rate", help="requests/s for poisson/gamma arrivals")]
CvOpt = Annotated[float, typer.Option("--cv", help="coefficient of variation of gamma inter-arrival gaps")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for prediction sampling and synthetic arrivals")]


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _spec(trace: Path, profile: str | None, predictions: str | None, confusion: Path | None,
          bundle: str | None, slo_ttft: float, slo_tbt: float, deadline: float | None,
          max_tokens: int, max_requests: int | None, arrivals: str, rate: float | None,
          cv: float, seed: int):
    from .compare import RunSpec
    from .cost_model import DEFAULT_PROFILE, load_profile
    from .predictions import load_confusion
    from .trace import gamma_arrivals, read_trace

    try:
        tr = read_trace(trace, max_tokens=max_tokens)
        if max_requests:
            tr = tr.head(max_requests)
        if arrivals != "trace":
            if arrivals not in ("poisson", "gamma") or rate is None:
                _fail("--arrivals poisson|gamma needs --rate R (requests/s)")
            tr = tr.with_arrivals(gamma_arrivals(len(tr), rate, cv if arrivals == "gamma" else 1.0, seed))
        cost = load_profile(profile or DEFAULT_PROFILE)
        conf = load_confusion(confusion) if confusion else None
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    return RunSpec(tr, cost, SLO(slo_ttft, slo_tbt, deadline), predictions, conf, bundle, seed)


@app.command()
def simulate(
    trace: TraceOpt,
    policy: Annotated[str, typer.Option("--policy", help="policy name (see `ecoserve policies`)")] = "ecoserve",
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None,
    rate_scale: Annotated[float, typer.Option("--rate-scale", help="arrival rate multiplier")] = 1.0,
    slo_ttft: TTFTOpt = 5.0, slo_tbt: TBTOpt = 0.2, slo_deadline: DeadlineOpt = None,
    max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None, arrivals: ArrOpt = "trace",
    rate: RateOpt = None, cv: CvOpt = 1.0, seed: SeedOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Replay a trace under one policy and print its metrics."""
    spec = _spec(trace, profile, predictions, confusion, bundle, slo_ttft, slo_tbt, slo_deadline,
                 max_tokens, max_requests, arrivals, rate, cv, seed)
    try:
        s, _ = spec.run(policy, rate_scale)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(s))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{policy} on {trace.name} x{rate_scale:g} ({s['predictions']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        if k not in ("policy", "predictions"):
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(t)


@app.command()
def compare(
    trace: TraceOpt,
    policies: Annotated[str, typer.Option("--policies", help="comma-separated policy names")] = "vllm,sarathi,orca,s3,sjf,ecoserve,ecoserve-oracle",
    rate_scales: Annotated[str, typer.Option("--rate-scales", help="comma-separated rate multipliers")] = "0.5,1,2",
    out: Annotated[Path, typer.Option("--out", help="output directory (results.json, table.md, plots)")] = Path("out/compare"),
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None, slo_ttft: TTFTOpt = 5.0, slo_tbt: TBTOpt = 0.2,
    slo_deadline: DeadlineOpt = None, max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Every policy at every load: a Markdown table and plots."""
    from .compare import sweep, write_report

    spec = _spec(trace, profile, predictions, confusion, bundle, slo_ttft, slo_tbt, slo_deadline,
                 max_tokens, max_requests, "trace", None, 1.0, seed)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    scales = [float(x) for x in rate_scales.split(",")]
    try:
        rows = sweep(spec, names, scales, progress=lambda s: typer.echo(
            f"{s['policy']:>18} x{s['rate_scale']:<6g} attainment {s['slo_attainment']:.3f}", err=True))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    header = (f"trace {trace.name}, profile {spec.cost.name}, SLO TTFT {slo_ttft:g}s / TBT {slo_tbt:g}s, "
              f"predictions: {rows[0]['predictions']}")
    files = write_report(rows, out, header)
    typer.echo((out / "table.md").read_text())
    typer.echo("wrote " + ", ".join(str(f) for f in files), err=True)


@app.command()
def capacity(
    trace: TraceOpt,
    policy: Annotated[str, typer.Option("--policy", help="policy name")] = "ecoserve",
    slo_ttft: TTFTOpt = 5.0, slo_tbt: TBTOpt = 0.2, slo_deadline: DeadlineOpt = None,
    target: Annotated[float, typer.Option("--target", help="required SLO attainment")] = 0.9,
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None, max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None,
    seed: SeedOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Largest rate scale at which SLO attainment stays >= target (bisection)."""
    from .compare import capacity as find_capacity

    spec = _spec(trace, profile, predictions, confusion, bundle, slo_ttft, slo_tbt, slo_deadline,
                 max_tokens, max_requests, "trace", None, 1.0, seed)
    try:
        res = find_capacity(spec, policy, target=target)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    res["profile"] = spec.cost.name
    if as_json:
        typer.echo(json.dumps(res))
    else:
        typer.echo(f"{policy}: max_rate_scale {res['max_rate_scale']:.4g} "
                   f"(SLO attainment >= {target:g} at TTFT {slo_ttft:g}s, TBT {slo_tbt:g}s)")


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", help="config.json, a directory holding one, or a preset (tiny-llama, small-llama); weights are random")],
    out: Annotated[Path, typer.Option("--out", help="profile JSON to write (load it with --profile)")],
    engine: Annotated[str, typer.Option("--engine", help="engine to measure (transformers)")] = "transformers",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda[:N]")] = "cpu",
    grid: Annotated[str, typer.Option("--grid", help="test|small|replay|full: batch-shape grid (replay adds chat-like replays)")] = "small",
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32|bfloat16|float16 (default: float32 on CPU, bfloat16 on GPU)")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="runs per grid point (median time per iteration)")] = 3,
    token_budget: Annotated[int, typer.Option("--token-budget", min=16, help="engine token budget per iteration (use the serving one: it bounds the measured prefill shapes)")] = 2048,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads")] = None,
    name: Annotated[str | None, typer.Option("--name", help="profile name (default: <model>-transformers-<device>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the fit error as one JSON object")] = False,
) -> None:
    """Measure a real engine's iteration latency over a grid of batch shapes and fit a profile."""
    if engine != "transformers":
        _fail(f"unknown engine {engine!r}; supported: transformers")
    from . import calibrate as cal_mod

    if grid not in cal_mod.GRIDS:
        _fail(f"unknown grid {grid!r}; choose from: {', '.join(cal_mod.GRIDS)}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        cal = cal_mod.calibrate(model, device, grid, name=name, dtype=dtype,
                                token_budget=token_budget, repeats=repeats)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    cal_mod.save(cal, out)
    if as_json:
        typer.echo(json.dumps({"profile": str(out), "fit": cal.profile.fit_error, "holdout": cal.holdout}))
    else:
        typer.echo(cal.report())
        typer.echo(f"wrote {out}", err=True)


@app.command()
def policies() -> None:
    """List the registered policies."""
    from .policies import policy_names

    for name in policy_names():
        typer.echo(name)


def main() -> None:
    app(prog_name="ecoserve")




@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the annotated trace and the report")] = Path("runs/demo"),
    profile: ProfileOpt = None,
    bundle: Annotated[str | None, typer.Option("--bundle", help="predictor bundle (default: the shipped one)")] = None,
    sample: Annotated[Path | None, typer.Option("--trace", help="trace with prompts (default: the bundled Azure + ShareGPT sample)")] = None,
    policies: Annotated[str, typer.Option("--policies", help="comma-separated policy names")] = "vllm,ecoserve,ecoserve-oracle",
    rate_scales: Annotated[str | None, typer.Option("--rate-scales", help="comma-separated rate multipliers (default 0.2 to 0.6)")] = None,
    slo_ttft: TTFTOpt = 5.0, slo_tbt: TBTOpt = 0.2,
) -> None:
    """The main job: annotate a real request sample with the predictor, replay it under vLLM,
    EcoServe and EcoServe-oracle, and write a report with plots."""
    from rich.console import Console
    from rich.table import Table

    from . import demo as demo_mod

    err = Console(stderr=True)
    n_steps = iter(range(1, 4))

    def step(msg: str) -> None:
        err.print(f"[bold]{next(n_steps)}/3[/bold] {msg}")

    def progress(s: dict) -> None:
        err.print(f"    {s['policy']:>16} x{s['rate_scale']:<4g} SLO attainment {s['slo_attainment']:.3f}, "
                  f"mean JCT {s['mean_jct_s']:.1f} s, preemptions {s['preemptions']}")

    try:
        res = demo_mod.run_demo(out, sample=sample or demo_mod.SAMPLE, profile=profile or demo_mod.PROFILE,
                                bundle=bundle, policies=[p.strip() for p in policies.split(",") if p.strip()],
                                rate_scales=([float(x) for x in rate_scales.split(",")] if rate_scales
                                             else demo_mod.RATE_SCALES),
                                slo=SLO(slo_ttft, slo_tbt), step=step, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    q = res.predictor
    err.print(f"    predictor on the sample: bucket accuracy {q['bucket_accuracy']:.3f}, +-1 bucket "
              f"{q['within_1_bucket']:.3f}, MAE {q['mae_tokens']:.0f} tokens, reservation covers "
              f"{q['reserve_coverage']:.3f}")
    t = Table(title=f"capacity (SLO attainment >= 0.9) on {res.rows[0]['profile']}")
    for c in ("policy", "max load (x trace rate)", "requests/s", "x vLLM"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for c in res.capacity:
        t.add_row(c["policy"], f"{c['max_rate_scale']:.3f}", f"{c['requests_per_s']:.2f}",
                  f"{c['x_vllm']:.2f}" if c.get("x_vllm") else "-")
    Console().print(t)
    typer.echo((out / "table.md").read_text())
    err.print(f"[green]report written to[/green] {res.files[0]} (plots and results.json beside it)")


if __name__ == "__main__":
    sys.exit(main())
