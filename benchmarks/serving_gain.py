"""Serving gain vs predictor quality: how much EcoServe capacity and JCT each predictor buys.

    python benchmarks/serving_gain.py --shared ../shared/data --out runs/serving_gain

Predictors, all over the shipped bundle's bucket scheme and scored on the same held-out ShareGPT
turns (the conversations the shipped model never trained on: split by conversation id,
test_frac 0.1, seed 0): constant (the training distribution), prompt-length regression, TF-IDF +
logistic regression (both trained on ``--train-rows`` turns of the training side), the shipped
bundle (``--model``; int8 ONNX MiniLM, stacked with TF-IDF since December 2026; the row is named
``minilm``), and the oracle (true length). Each gives, per request, a predicted
bucket, a point prediction (predictive median) and a KV reservation: the predicted bucket's
reservation (``bucket``, the default) or a quantile q of the predicted distribution (``q90``...).

Two traces, each replayed on ``--profile`` under vLLM and EcoServe:

- ``azure``: the Azure 2023 conversation trace (real arrivals and prompt lengths, no text). Each
  request takes the held-out ShareGPT turn whose real response length is closest to its own
  (ties broken at random, with replacement): that turn's length is the request's response length
  and that turn's predictions are its predictions, so the prediction/length relation is real.
- ``sharegpt``: the held-out ShareGPT turns themselves, context (history) lengths in Llama-3
  tokens, Poisson arrivals.

For every (trace, predictor): EcoServe's capacity (largest rate scale with SLO attainment >= 0.9)
and mean JCT at vLLM's capacity load, both relative to vLLM, beside the predictor's metrics; and
per trace the saturation ceiling (``compare.ceiling``: the rate scale at which arrivals equal a
flooded server's throughput), with vLLM's and EcoServe's capacity as shares of it: how much room
was left. The capacity searches run in ``--workers`` parallel processes.
Writes results.json, results.md and serving_gain.png under ``--out``; ``--report DIR DIR ...``
combines finished runs (e.g. two KV-cache sizes) into the one plot of docs/results.md.

``--hybrid`` asks which use of the shipped bundle's predictions costs what: the true length is
put into one use at a time (the point prediction that orders the queue, the reservation that
sizes the admission projection, or only where it is larger or smaller than the reservation),
and each mix gets EcoServe's capacity, its mean SLO attainment over a finer grid of loads
(``--loads LO:HI``, default the predicted capacity -8% ... +8%) and its preemptions there.
Writes hybrid.json and hybrid.md under ``--out`` (``--traces`` picks the traces, ``--workers``
runs the mixes in parallel processes):

    python benchmarks/serving_gain.py --shared ../shared/data --out runs/hybrid --hybrid --traces sharegpt
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOL = "benchmarks/serving_gain.py"
sys.path.insert(0, str(REPO))

from ecoserve_sched.compare import RunSpec, capacity, capacity_text, ceiling  # noqa: E402
from ecoserve_sched.cost_model import load_profile  # noqa: E402
from ecoserve_sched.metrics import summarize  # noqa: E402
from ecoserve_sched.request import SLO  # noqa: E402
from ecoserve_sched.simulator import run  # noqa: E402
from ecoserve_sched.trace import Trace, poisson_arrivals, read_trace  # noqa: E402
from rlpredict import Predictor  # noqa: E402
from rlpredict.cli_boundary import (  # noqa: E402
    SHARED_AZURE_CONV,
    ScriptParser,
    arg_file,
    arg_number,
    arg_path,
    run_script,
    worker_pool,
)
from rlpredict.data import attach_rl, load_samples  # noqa: E402
from rlpredict.outputs import (  # noqa: E402
    check_file_output,
    check_paths,
    work_folder,
    write_bytes_atomic,
    write_owned,
)
from rlpredict.records import is_plain_number  # noqa: E402
from rlpredict.rl_tokenizers import count_tokens, same_rl_tokenizer  # noqa: E402
from rlpredict.splits import RECORDLESS_RULE, check_same_split, recorded_split, split_by_group  # noqa: E402
from rlpredict.train.baselines import PromptLength, TfidfLogistic  # noqa: E402
from rlpredict.train.evaluate import baseline_texts  # noqa: E402
from rlpredict.train.metrics import decode as decode_probs  # noqa: E402
from rlpredict.train.metrics import quantile_tag, rl_metrics  # noqa: E402

PREDICTORS = ("constant", "prompt_length", "tfidf_logreg", "minilm", "oracle")
QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


#: The held-out side: the shipped recipe's split (training/rl-minilm-l6-llama3.toml), and its RL tokenizer.
SPLIT, RL_TOKENIZER = {"test_frac": 0.1, "seed": 0, "rule": RECORDLESS_RULE}, "llama3"


def check_bundle(predictor: Predictor, model: Path | None) -> None:
    """``ValueError`` if the bundle recorded another split or RL tokenizer than the held-out side
    is drawn with: it would be scored on rows it trained on, or against lengths in other tokens
    (was: scored without a word; a reviewer's find)."""
    fix = (f"this script scores on the shipped recipe's held-out ShareGPT conversations (test_frac "
           f"{SPLIT['test_frac']}, seed {SPLIT['seed']}, rule {SPLIT['rule']}) in {RL_TOKENIZER} tokens")
    check_same_split(recorded_split(predictor.bundle.manifest),
                     {k: (f"this script's split {k}", v) for k, v in SPLIT.items()}, f"give a bundle trained so: {fix}")
    if not same_rl_tokenizer(RL_TOKENIZER, predictor.bundle.rl_tokenizer):
        raise ValueError(f"bundle {model or 'shipped'} counts response lengths in {predictor.bundle.rl_tokenizer!r}: {fix}")


def load_heldout(shared: Path, train_rows: int, seed: int) -> tuple[list, list]:
    samples, report = load_samples([shared / "sharegpt_v3" / "sharegpt_v3.jsonl.gz"], on_error="skip")
    train, test = split_by_group(samples, SPLIT["test_frac"], SPLIT["seed"], SPLIT["rule"])
    rng = np.random.default_rng(seed)
    train = [train[i] for i in sorted(rng.choice(len(train), min(train_rows, len(train)), replace=False))]
    attach_rl(train + test, RL_TOKENIZER)
    print(f"ShareGPT: {report.rows} rows, {len(samples)} turns ({sum(report.skipped.values())} skipped); "
          f"{len(test)} held-out, {len(train)} training turns for the baselines", flush=True)
    return train, test


def predictor_probs(train: list, test: list, predictor: Predictor, baselines: bool = True) -> dict[str, np.ndarray]:
    scheme, spec = predictor.scheme, predictor.input_spec
    tr_texts, te_texts = baseline_texts(train, spec), baseline_texts(test, spec)
    tr_rl = np.array([s.rl_tokens for s in train], dtype=float)
    probs: dict[str, np.ndarray] = {}
    prior = np.bincount(scheme.bucket_of(tr_rl), minlength=scheme.n_buckets) / len(tr_rl)
    probs["constant"] = np.tile(prior, (len(test), 1))
    for name, cls in (("prompt_length", PromptLength), ("tfidf_logreg", TfidfLogistic))[:2 if baselines else 0]:
        t = time.perf_counter()
        probs[name] = cls().fit(tr_texts, tr_rl, scheme).predict_proba(te_texts)
        print(f"  {name}: fitted and predicted in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    arr = predictor.predict_arrays([s.messages for s in test], [s.generator for s in test])
    probs["minilm"] = arr.probs.astype(float)
    print(f"  minilm: {len(test)} prompts in {time.perf_counter() - t:.0f} s", flush=True)
    return probs


def decode(name: str, probs: dict[str, np.ndarray], rl: np.ndarray, scheme, mode: str) -> np.ndarray:
    """(n, 3) int rows (bucket, point tokens, reservation tokens) for one predictor and mode."""
    if name == "oracle":
        b = scheme.bucket_of(rl)
        return np.stack([b, rl, rl], axis=1).astype(np.int64)
    d = decode_probs(probs[name], scheme, 0.9 if mode == "bucket" else float(mode[1:]) / 100)
    b, point = d.bucket, d.pred_tokens
    res = d.reserve_bucket if mode == "bucket" else d.reserve_quantile
    return np.stack([b, np.maximum(point, 1), np.maximum(res, 1)], axis=1).astype(np.int64)


def azure_path(shared: Path) -> Path:
    return shared / SHARED_AZURE_CONV


def azure_trace(azure: Trace, rl: np.ndarray, seed: int) -> tuple[Trace, np.ndarray]:
    """The Azure trace (``read_trace``, cut to ``--azure-requests``) with each request mapped to
    the held-out turn of closest RL."""
    n = len(azure)
    arr, inp, want = azure.arrival_s, azure.input_tokens, azure.output_tokens
    order = np.argsort(rl, kind="stable")
    srt = rl[order]
    rng = np.random.default_rng(seed)
    idx = np.empty(n, dtype=np.int64)
    for i, w in enumerate(want.tolist()):
        lo, hi = np.searchsorted(srt, w, "left"), np.searchsorted(srt, w, "right")
        if hi > lo:  # exact matches: pick one at random
            idx[i] = order[rng.integers(lo, hi)]
        else:
            cands = [k for k in (lo - 1, lo) if 0 <= k < len(srt)]
            idx[i] = order[min(cands, key=lambda k: abs(srt[k] - w))]
    out = rl[idx].astype(np.int64)
    gap = np.abs(out - want)
    print(f"Azure: {n} requests over {arr[-1] - arr[0]:.0f} s; |matched RL - Azure RL| median "
          f"{np.median(gap):.0f}, p90 {np.quantile(gap, 0.9):.0f} tokens", flush=True)
    tr = Trace("azure_llm_2023_conv (RL-matched held-out ShareGPT turns)", arr, inp, out,
               np.full(n, MAX_TOKENS, dtype=np.int64))
    say_cut(tr)
    return tr, idx


#: Every request's max_tokens: a longer response stops there, as a server's limit stops it.
MAX_TOKENS = 2048


def say_cut(tr: Trace) -> None:
    """One line on the responses ``MAX_TOKENS`` stops (was: cut without a word; a reviewer's find:
    2 of the 6,434 held-out turns, the longest 20,307 tokens). Predictor metrics count them whole."""
    if n := int((tr.output_tokens > tr.max_tokens).sum()):
        print(f"  {n} response(s) longer than max_tokens {MAX_TOKENS} stop there in the replays (longest "
              f"{int(tr.output_tokens.max())} tokens); the predictors' metrics count them whole", flush=True)


def sharegpt_trace(test: list, rl: np.ndarray, rate: float, seed: int) -> Trace:
    ctx = np.array([sum(count_tokens([m["content"] for m in s.messages], RL_TOKENIZER)) for s in test])
    ctx = np.maximum(ctx, 1)
    print(f"ShareGPT trace: {len(test)} requests, Poisson {rate:g}/s, context median "
          f"{np.median(ctx):.0f} tokens, RL median {np.median(rl):.0f}", flush=True)
    tr = Trace("sharegpt_v3 held-out turns", poisson_arrivals(len(test), rate, seed), ctx.astype(np.int64),
               np.maximum(rl, 1).astype(np.int64), np.full(len(test), MAX_TOKENS, dtype=np.int64))
    say_cut(tr)
    return tr


def _serve_job(job: tuple) -> dict:
    return serve(*job)


def _found(c: dict, policy: str, trace: Trace) -> float:
    """A capacity search's capacity, or one line naming what bounded it (a trace too light or
    too heavy for this server: every ratio here needs both ends)."""
    if c["max_rate_scale"] is None:
        raise ValueError(f"{trace.path}: {policy}'s capacity search found no capacity ({capacity_text(c)}: "
                         f"{c.get('note') or c.get('search')}); try other --azure-requests, --sharegpt-rate or "
                         "--profile")
    return c["max_rate_scale"]


def vllm_at_capacity(spec: RunSpec) -> dict:
    """vLLM's capacity on ``spec`` and its mean JCT, KV use and preemptions there."""
    vcap = _found(capacity(spec, "vllm"), "vllm", spec.trace)
    vs = summarize(run(spec.trace.scaled(vcap), "vllm", spec.cost, slo=spec.slo, predictions="annotated"), spec.slo)
    return {"capacity": vcap, "mean_jct_s": vs["mean_jct_s"], "kv_alloc_mean": vs["kv_alloc_mean"],
            "preemptions": vs["preemptions"]}


def baseline(spec: RunSpec, workers: int) -> tuple[dict, dict]:
    """vLLM at its capacity (``vllm_at_capacity``) and the saturation ceiling
    (``compare.ceiling``: ``ceiling_rate_scale``, ``saturated``, ``note``), the ceiling in a
    worker process beside vLLM's search when ``workers`` > 1."""
    if workers > 1:
        with worker_pool(1) as ex:
            top = ex.submit(ceiling, spec)
            vllm = vllm_at_capacity(spec)
            roof = top.result()
    else:
        vllm, roof = vllm_at_capacity(spec), ceiling(spec)
    return vllm, {k: roof.get(k) for k in ("ceiling_rate_scale", "saturated", "note")}


def serve_cases(tr: Trace, rows_of: dict[str, np.ndarray], cost, slo: SLO, vllm: dict, roof: float | None,
                workers: int, log=print) -> dict[str, dict]:
    """``serve`` for every case of ``rows_of`` (name: prediction rows), in ``workers``
    processes, each logged in order as it comes; with coverage, KV reserved over generated
    and the share of the ceiling ``roof`` (a rate scale, or None)."""
    true = tr.output_tokens
    runs = {}
    with worker_pool(workers) as ex:
        jobs = [(tr, rows, cost, slo, vllm) for rows in rows_of.values()]
        for (key, rows), r in zip(rows_of.items(), ex.map(_serve_job, jobs), strict=True):
            r["coverage"] = float((rows[:, 2] >= true).mean())
            r["reserved_over_actual"] = float(rows[:, 2].sum() / true.sum())
            r["vs_ceiling"] = r["capacity"] / roof if roof else None
            runs[key] = r
            name, _, mode = key.partition("/")
            log(f"{name:>13} {mode:>6}: capacity x{r['capacity_x_vllm']:.3f} vLLM{_share(r['vs_ceiling'])}, "
                f"JCT x{r['jct_x_vllm']:.3f}, coverage {r['coverage']:.3f}, reserved/actual "
                f"{r['reserved_over_actual']:.2f}")
    return runs


def serve(trace: Trace, rl_rows: np.ndarray, cost, slo: SLO, vllm: dict) -> dict:
    """EcoServe's capacity and mean JCT at vLLM's capacity load, given these predictions."""
    tr = Trace(trace.path, trace.arrival_s, trace.input_tokens, trace.output_tokens, trace.max_tokens, rl_rows)
    spec = RunSpec(tr, cost, slo, predictions="annotated")
    cap = _found(capacity(spec, "ecoserve"), "ecoserve", trace)
    s = summarize(run(tr.scaled(vllm["capacity"]), "ecoserve", cost, slo=slo, predictions="annotated"), slo)
    return {"capacity": cap, "capacity_x_vllm": cap / vllm["capacity"],
            "mean_jct_s": s["mean_jct_s"], "jct_x_vllm": s["mean_jct_s"] / vllm["mean_jct_s"],
            "kv_alloc_mean": s["kv_alloc_mean"], "preemptions": s["preemptions"]}


#: The mixes of ``--hybrid``: each takes the shipped bundle's rows and puts the true length into
#: one use of the prediction (column 1: the point prediction, which orders the queue; column 2:
#: the reservation, which sizes the admission projection).
HYBRIDS = ("predicted", "oracle order", "oracle projection", "projection max(reservation, true)",
           "projection min(reservation, true)", "median projection", "median projection, max(median, true)",
           "oracle")


def hybrid_rows(pred: np.ndarray, true: np.ndarray, name: str) -> np.ndarray:
    """(n, 3) rows (bucket, point, reservation) of mix ``name`` (``HYBRIDS``) of ``pred`` (the
    shipped bundle's rows) and the true lengths."""
    rows = pred.copy()
    point, res = pred[:, 1], pred[:, 2]
    cols = {"predicted": {}, "oracle order": {1: true}, "oracle projection": {2: true},
            "projection max(reservation, true)": {2: np.maximum(res, true)},
            "projection min(reservation, true)": {2: np.minimum(res, true)},
            "median projection": {2: point}, "median projection, max(median, true)": {2: np.maximum(point, true)},
            "oracle": {1: true, 2: true}}[name]
    for c, v in cols.items():
        rows[:, c] = v
    return rows


def hybrid_case(tr: Trace, rows: np.ndarray, cost, slo: SLO, vllm: dict,
                loads: np.ndarray | None) -> dict:
    """One mix: capacity and JCT against vLLM (``serve``), and attainment and preemptions at each
    of ``loads`` (rate scales; None: only the capacity)."""
    r = serve(tr, rows, cost, slo, vllm)
    if loads is not None:
        annotated = Trace(tr.path, tr.arrival_s, tr.input_tokens, tr.output_tokens, tr.max_tokens, rows)
        at = [summarize(run(annotated.scaled(float(x)), "ecoserve", cost, slo=slo, predictions="annotated"), slo)
              for x in loads]
        r["loads"] = [float(x) for x in loads]
        r["attainment"] = [s["slo_attainment"] for s in at]
        r["mean_attainment"] = float(np.mean(r["attainment"]))
        r["preemptions_at_loads"] = [s["preemptions"] for s in at]
    return r


def _hybrid_job(job: tuple) -> dict:
    return hybrid_case(*job)


def run_hybrids(tr: Trace, pred: np.ndarray, cost, slo: SLO, vllm: dict, loads: tuple[float, float] | None,
                points: int, workers: int) -> dict:
    """Every mix of ``HYBRIDS`` on one trace: capacities first (the predicted one sets the
    default load grid), then the attainment over the grid."""
    true = tr.output_tokens.astype(np.int64)
    rows = {n: hybrid_rows(pred, true, n) for n in HYBRIDS}
    with worker_pool(workers) as ex:
        if loads is None:
            cap = serve(tr, rows["predicted"], cost, slo, vllm)["capacity"]
            loads = (0.92 * cap, 1.08 * cap)
        grid = np.linspace(loads[0], loads[1], points)
        out = dict(zip(HYBRIDS, ex.map(_hybrid_job, [(tr, rows[n], cost, slo, vllm, grid) for n in HYBRIDS]),
                       strict=True))
    return out


def hybrid_markdown(res: dict) -> str:
    lines = [f"Profile {res['profile']} (KV cache {res['kv_cache_tokens']} tokens), SLO TTFT {res['slo'][0]:g} s / "
             f"mean TBT {res['slo'][1]:g} s; the shipped bundle's predictions with the true length in one use at a "
             "time (point: orders the queue; reservation: sizes the admission projection).", ""]
    for tname, t in res["traces"].items():
        loads = next(iter(t["ecoserve"].values()))["loads"]
        roof = f"; saturation ceiling {_scale(t['ceiling'], t)}" if "ceiling" in t else ""
        lines += [f"{tname} ({t['requests']} requests; vLLM capacity x{t['vllm']['capacity']:.3f}{roof}); attainment "
                  f"at {len(loads)} loads {loads[0]:.3f}-{loads[-1]:.3f}, preemptions summed over them:", "",
                  "| mix | capacity x vLLM | mean attainment | preemptions |", "|---|---:|---:|---:|"]
        for name, r in t["ecoserve"].items():
            lines.append(f"| {name} | {r['capacity_x_vllm']:.3f} | {r['mean_attainment']:.4f} | "
                         f"{sum(r['preemptions_at_loads'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=arg_path, metavar="DIR",
                    help="the shared data folder (../shared/data); needed unless --report")
    ap.add_argument("--out", type=arg_path, default=REPO / "runs" / "serving_gain", help="output folder (default: runs/serving_gain)")
    ap.add_argument("--profile", default="llama2-13b-a100-80gb", help="cost-model profile (default: llama2-13b-a100-80gb)")
    ap.add_argument("--gpu-memory-utilization", type=arg_number(float, 0, 1, low_open=True), default=None,
                    help="override the profile's (0.9): lower values leave less HBM for the KV cache")
    ap.add_argument("--train-rows", type=arg_number(int, 1), default=20000, help="training turns for the baselines")
    ap.add_argument("--azure-requests", type=arg_number(int, 2), default=None, help="first N Azure requests (default all)")
    ap.add_argument("--sharegpt-rate", type=arg_number(float, 0, low_open=True), default=1.0, help="Poisson requests/s at rate scale 1")
    ap.add_argument("--slo-ttft", type=arg_number(float, 0, low_open=True), default=5.0, help="TTFT SLO, s (default 5)")
    ap.add_argument("--slo-tbt", type=arg_number(float, 0, low_open=True), default=0.2, help="mean TBT SLO, s (default 0.2)")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="seed of the draws: the baselines' training turns, the Azure matching, the Poisson "
                    "arrivals (default 0; the held-out split is the shipped recipe's, seed 0)")
    ap.add_argument("--model", type=arg_path, default=None,
                    help="the predictor bundle of the 'minilm' row (default: the shipped bundle)")
    ap.add_argument("--report", type=arg_path, nargs="+", default=None, metavar="RUN_DIR",
                    help="only combine finished runs into one plot (written to --plot)")
    ap.add_argument("--plot", type=arg_file, default=REPO / "docs" / "img" / "serving_gain.png",
                    help="--report: the figure to write (default: docs/img/serving_gain.png)")
    ap.add_argument("--force", action="store_true", help="--report: replace an existing --plot file")
    ap.add_argument("--traces", default="azure,sharegpt", help="comma-separated: azure, sharegpt")
    ap.add_argument("--hybrid", action="store_true",
                    help="the shipped bundle's predictions with the true length in one use at a time (HYBRIDS)")
    ap.add_argument("--loads", default=None, metavar="LO:HI",
                    help="--hybrid: rate scales of the attainment grid (default: the predicted capacity +-8%%)")
    ap.add_argument("--points", type=arg_number(int, 1), default=6, help="--hybrid: loads in the attainment grid")
    ap.add_argument("--workers", type=arg_number(int, 1), default=2, help="parallel processes (the capacity searches, or "
                    "--hybrid's mixes; default 2)")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.plot, force=args.force)
        return
    if args.shared is None:
        ap.error("--shared DIR is needed (the shared data folder, e.g. ../shared/data) unless --report")
    check_paths([args.shared] + ([args.model] if args.model else []), [("--out", args.out)],
                apart=[args.shared, *([args.model] if args.model else [])])  # (was: --out inside --shared)
    work_folder(args.out, tool=TOOL, option="--out")  # before the work: a new folder or this script's
    cost, slo = load_profile(args.profile), SLO(args.slo_ttft, args.slo_tbt)  # a bad name: now, not later
    tnames = [t for t in args.traces.split(",") if t]
    if not tnames or set(tnames) - {"azure", "sharegpt"}:
        ap.error(f"--traces: expected a comma-separated subset of azure,sharegpt, got {args.traces!r}")
    loads = None
    if args.loads is not None:
        try:
            loads = tuple(float(x) if is_plain_number(x) else float("nan") for x in args.loads.split(":"))
            ok = len(loads) == 2 and 0 < loads[0] <= loads[1]
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"--loads: expected LO:HI with 0 < LO <= HI, got {args.loads!r}")
    if "azure" in tnames:  # read (and checked) before the predictors' work
        azure = read_trace(azure_path(args.shared))
        azure = azure.head(args.azure_requests) if args.azure_requests else azure
    t0 = time.perf_counter()

    predictor = Predictor.load(args.model)
    check_bundle(predictor, args.model)
    scheme = predictor.scheme
    train, test = load_heldout(args.shared, args.train_rows, args.seed)
    rl = np.array([s.rl_tokens for s in test], dtype=np.int64)
    probs = predictor_probs(train, test, predictor, baselines=not args.hybrid)
    metrics = {n: rl_metrics(rl, probs[n], scheme, 0.9) for n in probs}
    for q in QUANTILES:
        m = rl_metrics(rl, probs["minilm"], scheme, q)
        metrics["minilm"][f"coverage_{quantile_tag(q)}"] = m[f"coverage_{quantile_tag(q)}"]
        metrics["minilm"][f"reserve_ratio_total_{quantile_tag(q)}"] = m[f"reserve_ratio_total_{quantile_tag(q)}"]

    if args.gpu_memory_utilization is not None:
        cost.gpu_memory_utilization = args.gpu_memory_utilization
    kv_tokens = cost.kv_blocks(16) * 16
    print(f"profile {cost.name}: KV cache {kv_tokens} tokens at gpu_memory_utilization "
          f"{cost.gpu_memory_utilization:g}", flush=True)
    traces = {}
    if "azure" in tnames:
        traces["azure"] = azure_trace(azure, rl, args.seed)
    if "sharegpt" in tnames:
        traces["sharegpt"] = (sharegpt_trace(test, rl, args.sharegpt_rate, args.seed), np.arange(len(test)))
    results: dict = {"profile": cost.name, "gpu_memory_utilization": cost.gpu_memory_utilization,
                     "kv_cache_tokens": kv_tokens, "slo": [slo.ttft_s, slo.tbt_s], "predictor_metrics": metrics,
                     "heldout_turns": len(test), "baseline_train_turns": len(train), "traces": {}}
    for tname, (tr, idx) in traces.items():
        true = tr.output_tokens
        sub = {k: v[idx] for k, v in probs.items()}
        base_rows = decode("oracle", sub, true, scheme, "bucket")
        spec = RunSpec(Trace(tr.path, tr.arrival_s, tr.input_tokens, true, tr.max_tokens, base_rows), cost, slo,
                       predictions="annotated")
        vllm, top = baseline(spec, args.workers)
        roof = top["ceiling_rate_scale"]
        vllm["vs_ceiling"] = vllm["capacity"] / roof if roof else None
        print(f"[{tname}] vLLM capacity x{vllm['capacity']:.3f} trace rate, mean JCT there "
              f"{vllm['mean_jct_s']:.1f} s; saturation ceiling {_scale(roof, top)}"
              + (f", vLLM{_share(vllm['vs_ceiling'])}" if roof else ""), flush=True)
        ceiling_fields = {"ceiling": roof, "ceiling_saturated": top["saturated"], "ceiling_note": top["note"]}
        if args.hybrid:
            runs = run_hybrids(tr, decode("minilm", sub, true, scheme, "bucket"), cost, slo, vllm, loads,
                               args.points, args.workers)
            for name, r in runs.items():
                print(f"[{tname}] {name:>38}: capacity x{r['capacity_x_vllm']:.3f} vLLM, mean attainment "
                      f"{r['mean_attainment']:.4f}, preemptions {sum(r['preemptions_at_loads'])}", flush=True)
            results["traces"][tname] = {"requests": len(tr), **ceiling_fields, "vllm": vllm, "ecoserve": runs}
            continue
        cases = [(n, "bucket") for n in PREDICTORS] + [("minilm", quantile_tag(q)) for q in QUANTILES]
        rows_of = {f"{n}/{m}": decode(n, sub, true, scheme, m) for n, m in cases}
        runs = serve_cases(tr, rows_of, cost, slo, vllm, roof, args.workers,
                           log=lambda line, t=tname: print(f"[{t}] {line}", flush=True))
        results["traces"][tname] = {"requests": len(tr), **ceiling_fields, "vllm": vllm, "ecoserve": runs}
    results["seconds"] = time.perf_counter() - t0
    if args.hybrid:
        table = hybrid_markdown(results)  # made before either file is written
        write_owned(args.out, "hybrid.json", json.dumps(results, indent=1) + "\n", tool=TOOL)
        write_owned(args.out, "hybrid.md", table, tool=TOOL)
        print(table)
        print(f"wrote {args.out}/hybrid.json, hybrid.md ({results['seconds']:.0f} s)")
        return
    # every file made before the first is written: a failure (a plot) leaves the last run's files
    # together, not this run's results beside the last run's figure (a reviewer's find)
    # (matplotlib comes with the [train] extra this script needs for its TF-IDF predictor)
    files = {"results.json": json.dumps(results, indent=1) + "\n", "results.md": markdown(results),
             "serving_gain.png": plot([results])}
    for name, data in files.items():
        write_owned(args.out, name, data, tool=TOOL)
    print(files["results.md"])
    print(f"wrote {args.out}/{', '.join(files)} ({results['seconds']:.0f} s)")


def markdown(res: dict) -> str:
    m = res["predictor_metrics"]
    lines = [f"Profile {res['profile']} (KV cache {res['kv_cache_tokens']} tokens, gpu_memory_utilization "
             f"{res['gpu_memory_utilization']:g}), SLO TTFT {res['slo'][0]:g} s / mean TBT {res['slo'][1]:g} s; "
             f"predictor metrics on {res['heldout_turns']} held-out ShareGPT turns.", "",
             "| predictor | acc | ±1 | MAE | tau | " + " | ".join(
                 f"{t}: capacity x vLLM | {t}: JCT x vLLM" for t in res["traces"]) + " |",
             "|---|---:|---:|---:|---:|" + "---:|---:|" * len(res["traces"])]
    for name in PREDICTORS:
        mm = m.get(name)
        head = (f"| {name} | {mm['bucket_acc']:.3f} | {mm['within1_acc']:.3f} | {mm['mae']:.1f} | "
                f"{mm['kendall_tau']:.3f} |") if mm else "| oracle | 1 | 1 | 0 | 1 |"
        cells = [f" {t['ecoserve'][f'{name}/bucket']['capacity_x_vllm']:.3f} | "
                 f"{t['ecoserve'][f'{name}/bucket']['jct_x_vllm']:.3f} |" for t in res["traces"].values()]
        lines.append(head + "".join(cells))
    lines += ["", "Reservation rule (MiniLM): coverage, KV reserved / generated tokens, EcoServe capacity x vLLM", "",
              "| reservation | " + " | ".join(f"{t}: coverage | {t}: reserved/actual | {t}: capacity x vLLM | "
                                               f"{t}: JCT x vLLM" for t in res["traces"]) + " |",
              "|---|" + "---:|---:|---:|---:|" * len(res["traces"])]
    for mode in ["bucket"] + [quantile_tag(q) for q in QUANTILES]:
        cells = []
        for t in res["traces"].values():
            r = t["ecoserve"][f"minilm/{mode}"]
            cells.append(f" {r['coverage']:.3f} | {r['reserved_over_actual']:.2f} | {r['capacity_x_vllm']:.3f} | "
                         f"{r['jct_x_vllm']:.3f} |")
        label = "predicted bucket's p90" if mode == "bucket" else f"predictive quantile {mode[1:]}%"
        lines.append(f"| {label} |" + "".join(cells))
    lines += ["", "vLLM at its capacity: " + "; ".join(
        f"{n}: x{t['vllm']['capacity']:.3f} trace rate, mean JCT {t['vllm']['mean_jct_s']:.1f} s, "
        f"{t['vllm']['preemptions']} preemptions" for n, t in res["traces"].items())]
    if all("ceiling" in t for t in res["traces"].values()):  # results.json files before it had none
        lines += ["", "Saturation ceiling (the rate scale at which arrivals equal a flooded server's throughput, "
                  "`compare.ceiling`) and each capacity as a share of it (above 1 where a policy defers requests "
                  "whose TTFT is lost past the end of a finite trace): " + "; ".join(
                      f"{n}: {_scale(t['ceiling'], t)}" + (
                          f"; vLLM {_share(t['vllm']['capacity'] / t['ceiling'], lead='')}, EcoServe with the "
                          f"shipped bundle (minilm) {_share(t['ecoserve']['minilm/bucket']['capacity'] / t['ceiling'], lead='')}"
                          f", with the oracle {_share(t['ecoserve']['oracle/bucket']['capacity'] / t['ceiling'], lead='')}"
                          if t["ceiling"] else "")
                      for n, t in res["traces"].items())]
    return "\n".join(lines) + "\n"


def _scale(x: float | None, top: dict | None = None) -> str:
    """A ceiling as a rate scale; ``top`` (``ceiling``'s fields, or a trace of results.json):
    why there is none, or that it is only a lower bound."""
    top = top or {}
    note = top.get("note") or top.get("ceiling_note")
    if not x:
        return f"none ({note or 'no request finished on the flooded server'})"
    lower = top.get("saturated", top.get("ceiling_saturated", True)) is False
    return f"x{x:.3f} trace rate" + (f" (a lower bound: {note})" if lower else "")


def _share(share: float | None, lead: str = ", ") -> str:
    """A share of the ceiling, after ``lead``; nothing without one."""
    return "" if share is None else f"{lead}{share:.2f} of the ceiling"


def _label(res: dict, trace: str) -> str:
    return f"{trace}, KV {res['kv_cache_tokens'] // 1000}k tok"


def plot(results: list[dict]) -> bytes:
    """One figure, as PNG: capacity and JCT vs vLLM per predictor, and capacity vs reservation
    coverage."""
    from matplotlib.figure import Figure  # the object API: never switches the process's backend

    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    x = np.arange(len(PREDICTORS))
    series = [(res, t) for res in results for t in res["traces"]]
    width = 0.8 / len(series)
    seen: dict[str, list[float]] = {"capacity_x_vllm": [1.0], "jct_x_vllm": [1.0]}
    for i, (res, tname) in enumerate(series):
        t = res["traces"][tname]
        for ax, key in zip(axes[:2], ("capacity_x_vllm", "jct_x_vllm"), strict=True):
            ys = [t["ecoserve"][f"{n}/bucket"][key] for n in PREDICTORS]
            seen[key] += ys
            ax.bar(x + i * width, ys, width, label=_label(res, tname))
        modes = [quantile_tag(q) for q in QUANTILES]
        axes[2].plot([t["ecoserve"][f"minilm/{m}"]["coverage"] for m in modes],
                     [t["ecoserve"][f"minilm/{m}"]["capacity_x_vllm"] for m in modes], marker="o",
                     label=_label(res, tname))
    for ax, key, ylabel in zip(axes[:2], seen, ("EcoServe capacity / vLLM capacity",
                                                "EcoServe mean JCT / vLLM's, at vLLM's capacity"), strict=True):
        ax.set_xticks(x + width * (len(series) - 1) / 2, PREDICTORS, rotation=20, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        lo, hi = min(seen[key]), max(seen[key])  # the bars' range (and 1.0), with a margin
        pad = 0.1 * (hi - lo) + 0.02
        ax.set_ylim(lo - pad, hi + pad)
    axes[2].set_xlabel("reservation coverage (MiniLM, predictive quantile 0.5 ... 0.99)", fontsize=8)
    axes[2].set_ylabel("EcoServe capacity / vLLM capacity", fontsize=8)
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Serving gain vs predictor quality ({results[0]['profile']}, SLO TTFT "
                 f"{results[0]['slo'][0]:g} s / TBT {results[0]['slo'][1]:g} s)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def report(dirs: list[Path], out: Path, *, force: bool) -> None:
    """Combine finished runs (their results.json) into one plot, and print their tables."""
    files = [d / "results.json" for d in dirs]
    check_file_output(out, force=force, option="--plot", inputs=files)
    results = []
    for f in files:
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        traces = r.get("traces") if isinstance(r, dict) else None
        if not traces or not isinstance(traces, dict) or \
                not all(isinstance(t, dict) and {"vllm", "ecoserve"} <= t.keys() for t in traces.values()):
            raise ValueError(f"{f}: not a results.json of this script (no 'traces' with vLLM and EcoServe runs)")
        results.append(r)
    try:
        png, text = plot(results), "\n\n".join(markdown(r) for r in results)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{', '.join(map(str, files))}: not results.json files of this script "
                         f"({type(e).__name__}: {e})") from None
    write_bytes_atomic(out, png)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(main)
