"""``ecoserve``: simulate a policy on a trace, compare policies across loads, find capacity.

Every command runs inside one error boundary (``rlpredict.cli_boundary``): a known failure is
one line, ``error: FILE[:LINE]: what is wrong``, exit 2; a bad option is refused by name where
it is parsed, exit 2; ``--debug`` shows the traceback. JSON output is strict (NaN -> null).
Outputs follow ``rlpredict.outputs``: written atomically, never onto an input, and an existing
one is replaced only with ``--force``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rlpredict.cli_boundary import (
    BoundaryGroup,
    err,
    in_range,
    nonblank_path,
    positive,
    root_callback,
    run_cli,
    thread_count,
)
from rlpredict.json_file import dumps
from rlpredict.records import is_plain_number, no_generator_note

from .compare import Server, load_text, table_cell
from .cost_model import DEFAULT_PROFILE, MAX_TOKEN_BUDGET
from .policies.interface import DEFAULT_MAX_RUNNING
from .predictions import SOURCES
from .request import SLO
from .trace import (
    CV_RANGE,
    MAPPABLE,
    MAX_COUNT,
    MAX_RATE_SCALE,
    RATE_RANGE,
    TIME_UNITS,
    TraceFormat,
)

if TYPE_CHECKING:
    from .compare import RunSpec

ARRIVALS = ("trace", "poisson", "gamma", "burst8")
_SLO = SLO()  # the SLO options' defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, cls=BoundaryGroup, rich_markup_mode=None,
                  callback=root_callback("ecoserve"),
                  help="EcoServe-style scheduling: replay request traces under policies in the simulator, "
                       "find capacities, calibrate a real engine's cost model (docs/simulator.md).")


# ---- option validation (one message naming the option) -----------------------------------------
def _choice(what: str, *allowed: str) -> Callable[[str | None], str | None]:
    """Option callback: one of ``allowed`` (None passes)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"unknown {what} {value!r}; choose from: {', '.join(allowed)}")
        return value

    return check


def _names(text: str, option: str) -> list[str]:
    """A comma-separated list of names: at least one, none empty or twice (as the benchmarks'
    ``arg_list``; was: an empty one dropped unsaid, where --rate-scales refused it)."""
    names = [p.strip() for p in text.split(",")]
    if not any(names):
        raise typer.BadParameter("give at least one name", param_hint=f"'{option}'")
    if not all(names):
        raise typer.BadParameter(f"an empty name in {text!r}", param_hint=f"'{option}'")
    _no_repeats(names, option)
    return names


def _policy_names(text: str, option: str) -> list[str]:
    """``_names``, each a registered policy or a vLLM engine policy: all checked before any runs."""
    from .engines.vllm_sim import REAL_POLICIES
    from .policies import policy_names, registry

    names, known = _names(text, option), set(policy_names()) | set(REAL_POLICIES)
    if unknown := [n for n in names if n not in known]:
        import difflib

        near = [m for n in unknown for m in difflib.get_close_matches(n, sorted(known), n=1)]
        raise typer.BadParameter(f"unknown polic{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                                 + (f"(did you mean {', '.join(near)}? " if near else "(")
                                 + "see `ecoserve policies`)" + "".join(f"; {why}" for why in registry.plugin_error),
                                 param_hint=f"'{option}'")
    return names


def _policy(value: str) -> str:
    """Option callback of ``--policy``: one known policy (``_policy_names``), before any work."""
    names = _policy_names(value, "--policy")
    if len(names) > 1:
        raise typer.BadParameter("takes one policy name (`ecoserve compare --policies` takes several)",
                                 param_hint="'--policy'")
    return names[0]


def _scales(text: str, option: str) -> list[float]:
    """A comma-separated list of rate multipliers: numbers in (0, MAX_RATE_SCALE], none twice."""
    scales = []
    for item in text.split(","):
        try:
            if not is_plain_number(item):
                raise ValueError(item)
            x = float(item)
        except ValueError:
            raise typer.BadParameter(f"{item.strip()!r} is not a number (give e.g. 0.5,1,2)",
                                     param_hint=f"'{option}'") from None
        if not (math.isfinite(x) and 0 < x <= MAX_RATE_SCALE):
            raise typer.BadParameter(f"rate scales must be numbers in (0, {MAX_RATE_SCALE:g}], got {item.strip()}",
                                     param_hint=f"'{option}'")
        scales.append(x)
    _no_repeats(scales, option)
    return scales


def _no_repeats(items: list[Any], option: str) -> None:
    twice = sorted({str(x) for x in items if items.count(x) > 1})
    if twice:
        raise typer.BadParameter(f"{', '.join(twice)} listed twice", param_hint=f"'{option}'")


def _named(value: str | None) -> str | None:
    """Option callback: not empty (None passes): an empty name would mean the default, silently."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty: give a profile name or a JSON file, or leave the option out")
    return value


TraceOpt = Annotated[Path, typer.Option("--trace", help="CSV/JSONL(.gz) or Parquet trace: arrival_time_s, input_tokens, output_tokens[, rl_*]")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", callback=_named, help=f"cost-model profile: a shipped name or a JSON file (default: {DEFAULT_PROFILE})")]
PredOpt = Annotated[str | None, typer.Option("--predictions", callback=_choice("prediction source", *SOURCES), help=f"{' | '.join(SOURCES)} (default: annotated if the trace has rl_* fields, else confusion)")]
ConfOpt = Annotated[str | None, typer.Option("--confusion", callback=nonblank_path("a confusion file or a bundle folder"), help="confusion.json, manifest.json with a 'confusion' key, or a bundle directory")]
BundleOpt = Annotated[str | None, typer.Option("--bundle", help="predictor bundle for --predictions bundle")]
TTFTOpt = Annotated[float, typer.Option("--slo-ttft", callback=positive, help="TTFT SLO in seconds (> 0)")]
TBTOpt = Annotated[float, typer.Option("--slo-tbt", callback=positive, help="mean time-between-tokens SLO in seconds (> 0)")]
DeadlineOpt = Annotated[float | None, typer.Option("--slo-deadline", callback=positive, help="optional JCT deadline in seconds (> 0)")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", min=1, max=MAX_COUNT, help="max_tokens for rows without one, never below their output_tokens (Orca reserves it)")]
MaxReqOpt = Annotated[int | None, typer.Option("--max-requests", min=1, help="use only the first N requests (N >= 1)")]
ArrOpt = Annotated[str, typer.Option("--arrivals", callback=_choice("arrival process", *ARRIVALS), help="trace | poisson | gamma | burst8: keep the trace's arrival times or draw new ones (burst8: groups of 8 simultaneous requests, the groups gamma arrivals)")]
RateOpt = Annotated[float | None, typer.Option("--rate", callback=in_range(*RATE_RANGE), help=f"requests/s for poisson/gamma/burst8 arrivals, in [{RATE_RANGE[0]:g}, {RATE_RANGE[1]:g}]")]
CvOpt = Annotated[float | None, typer.Option("--cv", callback=in_range(*CV_RANGE), help=f"coefficient of variation of the gamma inter-arrival gaps (burst8: of the gaps between groups), in [{CV_RANGE[0]:g}, {CV_RANGE[1]:g}] (default 1)")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="seed (>= 0) for prediction sampling and synthetic arrivals")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output (a folder only if ecoserve wrote it)")]
GpuMemOpt = Annotated[float | None, typer.Option("--gpu-memory-utilization", callback=in_range(0, 1, low_open=True), help="HBM share for weights + KV cache, in (0, 1] (default: the profile's, 0.9): sets the KV size")]
BudgetOpt = Annotated[int | None, typer.Option("--token-budget", min=2, max=MAX_TOKEN_BUDGET, help="tokens per iteration (vLLM's max_num_batched_tokens), 2 to 1048576; default: each policy's (max(2048, the profile's token_budget or roofline knee); sarathi 512; vllm-v0 max(2048, max_model_len))")]
MaxRunOpt = Annotated[int | None, typer.Option("--max-running", min=1, max=1 << 16, help="running requests at most (vLLM's max_num_seqs; default 256)")]
BlockOpt = Annotated[int, typer.Option("--block-size", min=1, max=1024, help="KV block size in tokens")]
ColumnsOpt = Annotated[str | None, typer.Option("--columns", help="the trace's own column names: FIELD=COLUMN,... (e.g. arrival_time_s=TIMESTAMP,input_tokens=ContextTokens,output_tokens=GeneratedTokens)")]
TimeUnitOpt = Annotated[str, typer.Option("--time-unit", callback=_choice("time unit", *TIME_UNITS), help=f"unit of the arrival column: {' | '.join(TIME_UNITS)} (iso: ISO 8601 date-times, UTC unless they say otherwise)")]
OnErrorOpt = Annotated[str, typer.Option("--on-error", callback=_choice("--on-error", "fail", "skip"), help="bad trace rows: fail (stop at the first, naming its line) or skip (count them and name the first)")]


def _trace_format(columns: str | None, time_unit: str, on_error: str) -> TraceFormat:
    """The ``TraceFormat`` of ``--columns``, ``--time-unit`` and ``--on-error``."""
    if columns is not None and not columns.strip():
        raise typer.BadParameter("is empty: give FIELD=COLUMN pairs or leave the option out", param_hint="'--columns'")
    mapping: dict[str, str] = {}
    for item in (columns or "").split(","):
        if not item.strip():
            continue
        key, eq, column = item.partition("=")
        key = key.strip()
        if not eq:
            raise typer.BadParameter(f"{item.strip()!r} is not FIELD=COLUMN (fields: {', '.join(MAPPABLE)})",
                                     param_hint="'--columns'")
        if key in mapping:
            raise typer.BadParameter(f"{key} is mapped twice", param_hint="'--columns'")
        mapping[key] = column.strip()
    if columns is not None and not mapping:
        raise typer.BadParameter("names no FIELD=COLUMN pair", param_hint="'--columns'")
    try:
        return TraceFormat(mapping, time_unit, on_error == "skip")
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--columns'") from None


def _spec(trace: Path, policies: Sequence[str], profile: str | None, predictions: str | None,
          confusion: str | None, bundle: str | None, slo: SLO, max_tokens: int,
          max_requests: int | None, seed: int, arrivals: str = "trace", rate: float | None = None,
          cv: float | None = None, outputs: tuple[tuple[str, Path], ...] = (),
          server: Server | None = None, fmt: TraceFormat | None = None,
          check_outputs: Callable[[], None] | None = None) -> RunSpec:
    """The RunSpec of the options for running ``policies``; refuses options that would be
    ignored, and ``outputs`` that collide with an input or (``check_outputs``) exist, before the
    trace is read."""
    from rlpredict.outputs import check_paths

    from .compare import RunSpec, ServerSettingError
    from .cost_model import load_profile
    from .predictions import load_confusion
    from .trace import burst_arrivals, check_trace_file, describe, gamma_arrivals, read_trace

    if bundle is not None and predictions != "bundle":
        raise typer.BadParameter("is used only with --predictions bundle", param_hint="'--bundle'")
    if predictions == "bundle" and bundle is None:
        raise typer.BadParameter("bundle needs --bundle PATH", param_hint="'--predictions'")
    if confusion is not None and predictions in ("annotated", "bundle", "oracle"):
        raise typer.BadParameter(f"is not used with --predictions {predictions}", param_hint="'--confusion'")
    if arrivals == "trace" and (rate is not None or cv is not None):
        raise typer.BadParameter("--rate and --cv need --arrivals poisson|gamma|burst8", param_hint="'--arrivals'")
    if arrivals != "trace" and rate is None:
        raise typer.BadParameter(f"{arrivals} arrivals need --rate R (requests/s)", param_hint="'--rate'")
    if arrivals == "poisson" and cv is not None:
        raise typer.BadParameter("poisson arrivals have cv 1; use --arrivals gamma", param_hint="'--cv'")
    inputs = [trace, *(p for p in (confusion, bundle, profile) if p is not None and Path(p).exists())]
    # nor inside a bundle read (was: compare's folder written into the bundle it predicted with)
    check_paths(inputs, outputs, apart=[p for p in (confusion, bundle) if p is not None])
    server = server or Server()
    # the KV room is checked with the server's settings (was: at the profile's own utilization,
    # before --gpu-memory-utilization or --num-gpu-blocks-override could make room)
    cost = load_profile(profile or DEFAULT_PROFILE, kv_room=server.gpu_memory_utilization is None
                        and server.num_gpu_blocks_override is None and server.block_size == Server().block_size)
    try:  # a KV size that leaves no room is refused before any run
        kw = server.policy_kw(cost)
    except ServerSettingError as e:
        raise typer.BadParameter(str(e), param_hint=f"'{e.option}'") from None
    _refuse_unbuildable(policies, cost, slo, kw)  # first: the next builds them too, and would fail unnamed
    _refuse_unused_predictions(policies, predictions, confusion, cost, kw)

    # drawn arrival times: the file's own, if any, are not read (a conversation log's lengths have none)
    fmt = replace(fmt or TraceFormat(), drawn_arrivals=arrivals != "trace")
    if fmt.drawn_arrivals and (fmt.time_unit != "s" or "arrival_time_s" in fmt.columns):
        raise typer.BadParameter(f"{arrivals} arrivals draw the times: the trace's arrival column is not read, "
                                 "so --time-unit and --columns arrival_time_s=... have no use",
                                 param_hint="'--arrivals'")
    check_trace_file(trace)  # before an existing --out is named
    if check_outputs is not None:  # the options and inputs first, then the output, then the read
        check_outputs()
    # --max-requests: only the earliest in memory, whatever the file's size (was: every row held)
    tr = read_trace(trace, max_tokens=max_tokens, keep_prompts=predictions == "bundle", fmt=fmt,
                    keep=max_requests)
    if confusion is not None and predictions is None and tr.has_rl:
        raise typer.BadParameter(f"is not used: {trace} has rl_* fields, so predictions default to "
                                 "annotated; pass --predictions confusion to use it", param_hint="'--confusion'")
    drawn = ""
    if arrivals != "trace":
        assert rate is not None
        tr = tr.with_arrivals(burst_arrivals(len(tr), rate, cv or 1.0, 8, seed) if arrivals == "burst8"
                              else gamma_arrivals(len(tr), rate, cv or 1.0, seed))
        drawn = (f"; arrival times drawn ({arrivals}, {rate:g} requests/s, seed {seed}; the file's own, if "
                 "any, not read: requests in the file's order)")
    # what runs: a millisecond column read as seconds shows here
    read = describe(tr) + (f"; the first {len(tr)} of {len(tr) + tr.unused_rows} requests used (--max-requests)"
                           if tr.unused_rows else "") + drawn
    typer.echo(f"read {read}", err=True)
    if tr.raised_max_tokens:  # (was: silent)
        typer.echo(f"note: {trace}: {tr.raised_max_tokens} rows without max_tokens have output_tokens above "
                   f"--max-tokens {max_tokens}; their max_tokens is their output_tokens (a trace's response "
                   "is never cut short of its true length; a max_tokens field cuts it)", err=True)
    capped = int((tr.output_tokens > tr.max_tokens).sum())
    if capped:  # the request's own limit ends its response: said, not done silently
        typer.echo(f"note: {trace}: {capped} rows have output_tokens above their max_tokens; their "
                   "responses stop at max_tokens", err=True)
    conf = load_confusion(confusion) if confusion else None
    return RunSpec(tr, cost, slo, predictions, conf, bundle, seed, server, read=read)


#: The server settings a policy is built with, and their options (``_refuse_unbuildable``).
SETTING_OPTIONS = {"block_size": "--block-size", "max_running": "--max-running", "token_budget": "--token-budget"}


def _refuse_unbuildable(policies: Sequence[str], cost: Any, slo: SLO, policy_kw: dict[str, Any],
                        whose: str = "") -> None:
    """Build each policy once with the server's settings, so that a setting one of them cannot
    take (``--max-running`` above its own token budget) is refused before any run, naming the
    policy (was: after the runs before it, naming no option)."""
    from .policies import get_policy

    for p in policies:
        if p.endswith("vllm-real"):  # vLLM's own class: built per run (engines/vllm_sim.py)
            continue
        try:
            built = get_policy(p, cost, slo=slo, **policy_kw)
        except ValueError as e:
            budget = "token_budget" not in policy_kw and "max_running" in str(e)
            # the option the message is about (was: --max-running whenever it was given, also for
            # vllm-v0's one-token blocks)
            named = next((o for k, o in SETTING_OPTIONS.items() if k in policy_kw and k in str(e)), None)
            raise typer.BadParameter(f"{p}{f' ({whose})' if whose else ''}: {e}"
                                     + ("; pass --token-budget above it" if budget else ""),
                                     param_hint=f"'{named}'" if named else None) from None
        if getattr(built, "max_model_len", 0) > built.token_budget:  # vLLM V0 refuses it at start-up; here
            # the prompts over the budget are ignored (was: said nowhere, every one an error)
            typer.echo(f"note: {p}: token budget {built.token_budget} below its max_model_len {built.max_model_len} "
                       f"(vLLM V0 refuses this without chunked prefill): prompts over {built.token_budget} tokens "
                       "are ignored, each an error", err=True)


def _refuse_unused_predictions(policies: Sequence[str], predictions: str | None, confusion: str | None,
                               cost: Any, policy_kw: dict[str, Any]) -> None:
    """Refuse ``--predictions`` and ``--confusion`` when every policy runs on predictions of its
    own (``simulator.fixed_predictions``)."""
    from .simulator import fixed_predictions

    if predictions is None and confusion is None:
        return
    fixed = {p: fixed_predictions(p, cost, **policy_kw) for p in policies}
    if all(fixed.values()):
        why = "; ".join(f"{p} reads no predictions" if f == "none" else f"{p} always runs on {f} predictions"
                        for p, f in fixed.items())
        raise typer.BadParameter(f"is not used: {why}",
                                 param_hint=f"'{'--predictions' if predictions is not None else '--confusion'}'")


def _server(gpu_memory_utilization: float | None, token_budget: int | None, max_running: int | None,
            block_size: int) -> Server:
    if token_budget is not None and token_budget <= (max_running or DEFAULT_MAX_RUNNING):
        raise typer.BadParameter(f"must exceed --max-running ({max_running or DEFAULT_MAX_RUNNING}): "
                                 "every running request decodes in every iteration", param_hint="'--token-budget'")
    return Server(gpu_memory_utilization, token_budget, max_running, block_size)


@app.command()
def simulate(
    trace: TraceOpt,
    policy: Annotated[str, typer.Option("--policy", callback=_policy, help="policy name (see `ecoserve policies`)")] = "ecoserve",
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None,
    rate_scale: Annotated[float, typer.Option("--rate-scale", callback=in_range(0, MAX_RATE_SCALE, low_open=True), help=f"arrival rate multiplier, in (0, {MAX_RATE_SCALE:g}]")] = 1.0,
    slo_ttft: TTFTOpt = _SLO.ttft_s, slo_tbt: TBTOpt = _SLO.tbt_s, slo_deadline: DeadlineOpt = None,
    max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None, arrivals: ArrOpt = "trace",
    rate: RateOpt = None, cv: CvOpt = None, seed: SeedOpt = 0,
    gpu_memory_utilization: GpuMemOpt = None, token_budget: BudgetOpt = None,
    max_running: MaxRunOpt = None, block_size: BlockOpt = 16,
    columns: ColumnsOpt = None, time_unit: TimeUnitOpt = "s", on_error: OnErrorOpt = "fail",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Replay a trace under one policy and print its metrics."""
    spec = _spec(trace, [policy], profile, predictions, confusion, bundle,
                 SLO(slo_ttft, slo_tbt, slo_deadline), max_tokens, max_requests, seed, arrivals, rate, cv,
                 server=_server(gpu_memory_utilization, token_budget, max_running, block_size),
                 fmt=_trace_format(columns, time_unit, on_error))
    if arrivals != "trace" and rate is not None and not rate * rate_scale <= RATE_RANGE[1]:
        raise typer.BadParameter(f"--rate {rate:g} x --rate-scale {rate_scale:g} is over {RATE_RANGE[1]:g} "
                                 "requests/s", param_hint="'--rate-scale'")  # (was: "arrivals at inf")
    if arrivals != "trace" and rate_scale != 1:
        assert rate is not None
        typer.echo(f"note: arrivals at {rate * rate_scale:g} requests/s (--rate {rate:g} x --rate-scale "
                   f"{rate_scale:g})", err=True)
    s, _ = spec.run(policy, rate_scale)
    if s["dropped"]:  # (was: said by `capacity` alone)
        typer.echo(f"note: {s['dropped']} of {s['requests']} requests dropped (longer than the whole KV cache): "
                   "they count against the SLO attainment", err=True)
    if as_json:
        typer.echo(dumps(s))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{policy} on {trace.name} x{rate_scale:g} ({s['predictions']})"))
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        if k not in ("policy", "predictions"):
            t.add_row(k, table_cell(v, 4))
    Console().print(t)


@app.command()
def compare(
    trace: TraceOpt,
    policies: Annotated[str, typer.Option("--policies", help="comma-separated policy names")] = "vllm,sarathi,orca,s3,sjf,ecoserve,ecoserve-oracle",
    rate_scales: Annotated[str, typer.Option("--rate-scales", help=f"comma-separated rate multipliers, each in (0, {MAX_RATE_SCALE:g}]")] = "0.5,1,2",
    out: Annotated[Path, typer.Option("--out", help="output folder (results.json, table.md, plots); must not hold an input")] = Path("runs/compare"),
    force: ForceOpt = False,
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None, slo_ttft: TTFTOpt = _SLO.ttft_s, slo_tbt: TBTOpt = _SLO.tbt_s,
    slo_deadline: DeadlineOpt = None, max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None,
    seed: SeedOpt = 0, gpu_memory_utilization: GpuMemOpt = None, token_budget: BudgetOpt = None,
    max_running: MaxRunOpt = None, block_size: BlockOpt = 16,
    columns: ColumnsOpt = None, time_unit: TimeUnitOpt = "s", on_error: OnErrorOpt = "fail",
) -> None:
    """Every policy at every load: a Markdown table and plots."""
    from rlpredict.outputs import check_new_dir, output_dir

    from .compare import NO_PLOTS, can_plot, predictions_of, slo_text, sweep, write_report

    names, scales = _policy_names(policies, "--policies"), _scales(rate_scales, "--rate-scales")
    spec = _spec(trace, names, profile, predictions, confusion, bundle,
                 SLO(slo_ttft, slo_tbt, slo_deadline), max_tokens, max_requests, seed, outputs=(("--out", out),),
                 server=_server(gpu_memory_utilization, token_budget, max_running, block_size),
                 fmt=_trace_format(columns, time_unit, on_error),
                 check_outputs=lambda: check_new_dir(out, force=force, option="--out", only="ecoserve compare"))
    for x in scales:  # one too small for the trace's clock: refused before the first run
        try:
            spec.trace.scaled(x)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="'--rate-scales'") from None
    if not can_plot():
        typer.echo(NO_PLOTS, err=True)
    with output_dir(out, force=force, tool="ecoserve compare") as tmp:
        rows = sweep(spec, names, scales, progress=lambda s: typer.echo(
            f"{s['policy']:>18} x{s['rate_scale']:<6g} attainment {s['slo_attainment']:.3f}", err=True))
        title = f"trace {trace.name}, profile {spec.cost.name}, {slo_text(spec.slo)}"
        header = (f"trace {trace.name}, profile {spec.cost.label}, {slo_text(spec.slo)}, "
                  f"predictions: {predictions_of(rows)}\n\nread {spec.read}; {spec.server.describe(spec.cost)}")
        files = [out / f.relative_to(tmp) for f in write_report(rows, tmp, header, title)]
    typer.echo((out / "table.md").read_text())
    typer.echo("wrote " + ", ".join(str(f) for f in files), err=True)


@app.command()
def capacity(
    trace: TraceOpt,
    policy: Annotated[str, typer.Option("--policy", callback=_policy, help="policy name (see `ecoserve policies`)")] = "ecoserve",
    slo_ttft: TTFTOpt = _SLO.ttft_s, slo_tbt: TBTOpt = _SLO.tbt_s, slo_deadline: DeadlineOpt = None,
    target: Annotated[float | None, typer.Option("--target", callback=in_range(0, 1, low_open=True), help="required SLO attainment, in (0, 1] (default 0.9)")] = None,
    profile: ProfileOpt = None, predictions: PredOpt = None, confusion: ConfOpt = None,
    bundle: BundleOpt = None, max_tokens: MaxTokOpt = 2048, max_requests: MaxReqOpt = None,
    seed: SeedOpt = 0, gpu_memory_utilization: GpuMemOpt = None, token_budget: BudgetOpt = None,
    max_running: MaxRunOpt = None, block_size: BlockOpt = 16,
    max_normalized_latency: Annotated[float | None, typer.Option("--max-normalized-latency", callback=positive, help="criterion: normalized latency (s per output token, the vLLM/Orca papers' metric) at most this, every request finished; replaces the attainment target")] = None,
    slo_p99_tbt: Annotated[float | None, typer.Option("--slo-p99-tbt", callback=positive, help="also require the p99 time between tokens (over all tokens) at most this many seconds")] = None,
    ceiling: Annotated[bool, typer.Option("--ceiling/--no-ceiling", help="also compute the saturation ceiling (2 flooded runs, more on a light trace) and capacity / ceiling")] = True,
    sustained: Annotated[bool, typer.Option("--sustained", help="count a load only if, besides the criterion, at most 1% of the requests are deferred past the trace's end (the load the server keeps up with)")] = False,
    columns: ColumnsOpt = None, time_unit: TimeUnitOpt = "s", on_error: OnErrorOpt = "fail",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Largest rate scale at which SLO attainment stays >= target, beside the saturation ceiling.

    A bisection; null, with a note, when the search finds no failing (or no passing) load."""
    from .compare import CEILING_DRAIN_NOTE, CEILING_POLICIES, MAX_DEFERRED, slo_text
    from .compare import capacity as find_capacity
    from .compare import ceiling as find_ceiling
    from .compare import sustained as sustained_spec

    if target is not None and max_normalized_latency is not None:
        raise typer.BadParameter("is the attainment criterion; --max-normalized-latency replaces it: "
                                 "pass one of the two", param_hint="'--target'")
    target = 0.9 if target is None else target
    spec = _spec(trace, [policy], profile, predictions, confusion, bundle,
                 SLO(slo_ttft, slo_tbt, slo_deadline), max_tokens, max_requests, seed,
                 server=_server(gpu_memory_utilization, token_budget, max_running, block_size),
                 fmt=_trace_format(columns, time_unit, on_error))
    if ceiling:  # its flooded runs build these too: refused up front (was: after the whole search,
        # "token budget 2048 must exceed max_running 4000", naming no option)
        _refuse_unbuildable(CEILING_POLICIES, spec.cost, spec.slo, spec.server.policy_kw(spec.cost),
                            whose="the saturation ceiling's; --no-ceiling skips it")
    res = find_capacity(sustained_spec(spec) if sustained else spec, policy, target=target,
                        max_normalized_latency=max_normalized_latency, max_p99_tbt=slo_p99_tbt)
    res["profile"] = spec.cost.label
    res["sustained"] = sustained
    res["skipped_rows"] = spec.trace.skipped_rows  # bad rows of the file, set aside (was: on stderr only)
    # the same keys on every run (was: the ceiling's left out with --no-ceiling, above_ceiling
    # only when it applied): null where they do not apply
    res.update(ceiling=None, ceiling_rate_scale=None, capacity_vs_ceiling=None, above_ceiling=None)
    if ceiling:
        c = find_ceiling(spec)
        res["ceiling_rate_scale"] = c["ceiling_rate_scale"]
        res["capacity_vs_ceiling"] = (res["max_rate_scale"] / c["ceiling_rate_scale"]
                                      if res["max_rate_scale"] is not None and c["ceiling_rate_scale"] else None)
        res["ceiling"] = c
        vs = res["capacity_vs_ceiling"]
        held = res["lower_bound"] if res["search"] == "no_failing_load" else None
        if c.get("saturated") and c["ceiling_rate_scale"] and held and held > c["ceiling_rate_scale"]:
            times = held / c["ceiling_rate_scale"]
            res["above_ceiling"] = (f"the criterion held up to x{held:g}, "
                                    f"{f'{times:,.0f}' if 1000 <= times < 1e15 else f'{times:.3g}'}x "
                                    "the ceiling: on a trace this short the backlog a load above the ceiling "
                                    "builds ends with the trace; more requests"
                                    + ("" if sustained else " (or --sustained)") + " load the server")
        if c.get("saturated") and vs is not None and vs > 1:  # two causes; which one holds here is not measured
            res["above_ceiling"] = ("" if sustained else (
                f"on a finite trace a policy can meet the criterion by deferring requests whose TTFT "
                f"is lost past the trace's end (--sustained counts a load only if at most "
                f"{MAX_DEFERRED:.0%} of the requests are deferred); ")) + CEILING_DRAIN_NOTE
    if as_json:
        typer.echo(dumps(res))
        return
    if res["max_rate_scale"] is None:
        typer.echo(f"{policy}: no capacity found: {res['note']}")
    else:
        what = (f"normalized latency <= {max_normalized_latency:g}s/token" if max_normalized_latency
                else f"SLO attainment >= {target:g} at {slo_text(spec.slo)}")
        typer.echo(f"{policy}: max_rate_scale {load_text(res['max_rate_scale'])} ({what}"
                   + (f", p99 TBT <= {slo_p99_tbt:g}s" if slo_p99_tbt else "")
                   + (f", at most {MAX_DEFERRED:.0%} of requests deferred" if sustained else "") + ")")
        if res["search"] == "found" and not res["converged"]:
            typer.echo(f"  {res['note']}")
    if res["dropped"]:
        typer.echo(f"  {res['dropped']} of {res['requests']} requests dropped at every load (longer than the "
                   "whole KV cache): they count against the criterion")
    if ceiling and res["ceiling_rate_scale"] is None:
        typer.echo(f"saturation ceiling: none ({res['ceiling']['note']})")
    elif ceiling:
        vs = res["capacity_vs_ceiling"]
        typer.echo(f"saturation ceiling: rate scale {res['ceiling_rate_scale']:.4g} "
                   f"(flooded-server throughput, best of {', '.join(res['ceiling']['flood_throughput_rps'])})"
                   + (f"; capacity / ceiling {vs:.2f}" if vs is not None else ""))
        if not res["ceiling"]["saturated"]:  # a lower bound: capacity above it says nothing
            typer.echo(f"  {res['ceiling']['note']}")
        elif res["above_ceiling"]:
            typer.echo(f"  above the ceiling: {res['above_ceiling']}")


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", help="config.json, a directory holding one, or a preset (tiny-llama, small-llama); weights are random")],
    out: Annotated[str, typer.Option("--out", callback=nonblank_path("a profile JSON file"),
                                     help="profile JSON to write (load it with --profile)")],
    force: ForceOpt = False,
    engine: Annotated[str, typer.Option("--engine", callback=_choice("engine", "transformers"), help="engine to measure (transformers)")] = "transformers",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
    grid: Annotated[str, typer.Option("--grid", help="test | small | replay | full: batch-shape grid (replay adds chat-like replays)")] = "small",
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=100, help="runs per grid point, 1 to 100 (median time per iteration)")] = 3,
    token_budget: Annotated[int, typer.Option("--token-budget", min=16, max=1 << 20, help="engine token budget per iteration, 16 to 1048576 (use the serving one: it bounds the measured prefill shapes)")] = 2048,
    threads: Annotated[int | None, typer.Option("--threads", callback=thread_count, help="torch CPU threads (1 to the usable cores)")] = None,
    name: Annotated[str | None, typer.Option("--name", help="profile name (default: <model>-transformers-<device>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the fit error as one JSON object")] = False,
) -> None:
    """Measure a real engine's iteration latency over a grid of batch shapes and fit a profile."""
    from rlpredict.outputs import check_new_file, check_paths

    from . import calibrate as cal_mod

    check_paths(cal_mod.model_inputs(model), [("--out", out)])
    check_new_file(out, force=force, option="--out")  # the text as typed: a trailing '/' is refused
    cal = cal_mod.calibrate(model, device, grid, name=name, dtype=dtype, token_budget=token_budget,
                            repeats=repeats, threads=threads)
    cal_mod.save(cal, out)
    if as_json:
        typer.echo(dumps({"profile": str(out), "fit": cal.profile.fit_error, "holdout": cal.holdout}))
    else:
        typer.echo(cal.report())
        typer.echo(f"wrote {out}", err=True)


@app.command()
def policies() -> None:
    """List the policies: the simulator's, then vLLM's own scheduler classes (they need vLLM)."""
    from .engines.vllm_sim import REAL_POLICIES
    from .policies import policy_names, registry

    for name in [*policy_names(), *REAL_POLICIES]:  # one name a line, for scripts
        typer.echo(name)
    for why in registry.plugin_error:
        typer.echo(f"warning: {why}", err=True)
    typer.echo(f"({', '.join(REAL_POLICIES)} need vLLM: replayed through a vLLM scheduler class, the "
               "async- ones with vLLM's asynchronous engine loop, docs/engines.md)", err=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the annotated trace and the report")] = Path("runs/demo"),
    force: ForceOpt = False,
    profile: ProfileOpt = None,
    bundle: Annotated[str | None, typer.Option("--bundle", help="predictor bundle (default: the shipped one)")] = None,
    sample: Annotated[Path | None, typer.Option("--trace", help="trace with prompts (default: the bundled Azure + ShareGPT sample)")] = None,
    policies: Annotated[str | None, typer.Option(
        "--policies", help="comma-separated policy names (default: vLLM V0 and V1, EcoServe, EcoServe-oracle)")] = None,
    rate_scales: Annotated[str | None, typer.Option("--rate-scales", help=f"comma-separated rate multipliers, each in (0, {MAX_RATE_SCALE:g}] (default 0.2 to 0.6)")] = None,
    slo_ttft: TTFTOpt = _SLO.ttft_s, slo_tbt: TBTOpt = _SLO.tbt_s,
    headroom: Annotated[bool, typer.Option(
        "--headroom/--no-headroom", help="also the capacities on Llama-3-8B / H200, where the KV cache is no constraint")] = True,
) -> None:
    """The main job: EcoServe against vLLM V1 and V0 on a real request sample, with plots.

    Annotates the sample with the predictor, replays it under vLLM's 2024 scheduler (V0, the
    EcoServe paper's baseline), vLLM V1, EcoServe and EcoServe-oracle, and writes a report with
    plots: each policy's capacity against the saturation ceiling, x V1 and x V0."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from . import demo as demo_mod
    from .compare import NO_PLOTS, can_plot, capacity_text

    names = _policy_names(policies, "--policies") if policies is not None else list(demo_mod.POLICIES)
    scales = _scales(rate_scales, "--rate-scales") if rate_scales is not None else demo_mod.RATE_SCALES
    if not can_plot():
        err.print(NO_PLOTS, markup=False)
    total = 4 if headroom else 3
    n_steps = iter(range(1, total + 1))

    def step(msg: str) -> None:
        err.print(f"[bold]{next(n_steps)}/{total}[/bold] {escape(msg)}")

    def progress(s: dict) -> None:
        err.print(f"    {s['policy']:>16} x{s['rate_scale']:<4g} SLO attainment {s['slo_attainment']:.3f}, "
                  f"mean JCT {table_cell(s['mean_jct_s'])} s, preemptions {s['preemptions']}", markup=False)

    res = demo_mod.run_demo(out, sample=sample or demo_mod.SAMPLE, profile=profile or demo_mod.PROFILE,
                            bundle=bundle, policies=names, rate_scales=scales,
                            slo=SLO(slo_ttft, slo_tbt), force=force, step=step, progress=progress,
                            headroom_profile=demo_mod.HEADROOM_PROFILE if headroom else None)
    if res.annotate["rows_replaced"]:  # said, as `rlpredict annotate` says it
        err.print(f"    {res.annotate['rows_replaced']} row(s) of the trace already had rl_* fields: their values "
                  "were replaced by this bundle's predictions", markup=False)
    if n := res.annotate.get("rows_without_generator"):  # was: in results.json only
        err.print("    " + no_generator_note(f"{n} row(s)"), markup=False)
    if n := res.annotate.get("rows_without_user_text"):
        err.print(f"    {n} row(s) have no text where this bundle reads it: predicted as an empty prompt, which "
                  "training never saw", markup=False)
    q = res.predictor
    err.print(f"    predictor on the sample: bucket accuracy {q['bucket_accuracy']:.3f}, +-1 bucket "
              f"{q['within_1_bucket']:.3f}, MAE {q['mae_tokens']:.0f} tokens, reservation covers "
              f"{q['reserve_coverage']:.3f}")
    regimes = [(res.rows[0]["profile"], res.capacity)]
    if res.headroom:
        regimes.append((f"{res.headroom['profile']} (the KV cache is no constraint)", res.headroom["capacity"]))
    for server, caps in regimes:
        # whole words in 80 columns: `ecoserve-oracle` and `sustained` were cut to `ecoserve…`, `sustai…`
        t = Table(title=escape(f"capacity (SLO attainment >= 0.9) on {server}"),
                  caption="max load: x the trace's rate; sustained: at most 1% of requests deferred "
                          "past the trace's end")
        cells = [[capacity_text(c), *(f"{c[k]:.2f}" if c.get(k) else "-" for k in (
            "vs_ceiling", "x_vllm", "x_vllm_v0", "sustained_vs_ceiling", "sustained_x_vllm"))] for c in caps]
        widths = [max(len("policy"), *(len(c["policy"]) for c in caps))]
        t.add_column("policy", no_wrap=True, min_width=widths[0])
        for j, c in enumerate(("max load", "/ ceiling", "x vLLM V1", "x vLLM V0", "sustained / ceiling",
                               "sustained x vLLM V1")):
            head = 6 if "vLLM" in c and len(c) < 10 else max(5, *map(len, c.split()))
            # as wide as its longest figure (was: 5, so "21.40" and "2" on two lines read as two numbers)
            widths.append(max(head, *(len(row[j]) for row in cells)))
            t.add_column(c, justify="right", width=widths[-1], overflow="fold")
        for c, row in zip(caps, cells, strict=True):
            t.add_row(escape(c["policy"]), *row)
        console = Console()  # wider than the console where the figures need it (was: Rich cropped
        if (need := sum(widths) + 3 * len(widths) + 1) > console.width:  # the right edge and cut
            console = Console(width=need)  # headers mid-word; a reviewer's find)
        console.print(t)
        if line := demo_mod.ceiling_line(caps):  # (was: "no policy sustains a load above it" under
            err.print(f"    {line}", markup=False)  # sustained loads above it, and for a lower bound)
        for c in caps:
            if c.get("note"):
                err.print(f"    {c['policy']}: {c['note']}", markup=False)
    if reading := demo_mod.regimes_reading(res.capacity, res.headroom, res.rows[0]["profile"], above="(the first server)"):
        err.print(f"    {reading}", markup=False)
    typer.echo((out / "table.md").read_text())
    if note := demo_mod.errors_note(res.rows):
        err.print(f"    {note}", markup=False)
    beside = "plots and results.json" if can_plot() else "results.json"
    err.print(f"[green]report written to[/green] {escape(str(res.files[0]))} ({beside} beside it)")


def main() -> None:
    run_cli(app, prog_name="ecoserve")


if __name__ == "__main__":
    main()
