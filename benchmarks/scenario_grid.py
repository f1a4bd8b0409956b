"""Where scheduling can win: every policy's capacity against the saturation ceiling, per scenario.

    python benchmarks/scenario_grid.py --shared ../shared/data --out runs/scenario_grid

A cell is a trace x profile x KV size x SLO. For each cell it prints the saturation ceiling (the
rate scale at which arrivals equal a flooded server's throughput, `ecoserve_sched.compare.ceiling`:
past it queues grow without bound; on a finite trace a policy can pass it by leaving a backlog
at the trace's end, which `--sustained` counts only up to 1% of the requests, and a short trace's
drain lowers the ceiling itself, so a sustained capacity can pass it too), then each policy's capacity (largest rate scale with
SLO attainment >= 0.9) as a fraction of the ceiling, x vLLM V1 and x vLLM V0, and mean JCT and
normalized latency at vLLM V1's capacity load (ratios to vLLM V1). All policies of a cell replay
the same requests with the same predictions (sampled from the shipped predictor's confusion
matrix; `ecoserve-oracle` gets the true lengths). Cells and policies run in parallel processes.

Baselines: vLLM V1 as configured by default (`vllm`: 2,048 batched tokens per iteration) and
with its token budget tuned per cell (`vllm-tuned`: the best capacity over
max_num_batched_tokens 512 ... 8,192, ``TUNED_BUDGETS``; the budget it chose is printed
beside it; its loads past capacity and its sustained capacity run at that budget), vLLM V0,
Sarathi-Serve, Orca, S3 and SJF. ``vllm@B`` names vLLM V1 with a budget of B tokens,
``vllm@B/S`` also with max_num_seqs S (``vllm@8192/1024``: `vllm serve`'s defaults on an H100 or H200).

Other slices and seeds (to check that a result is not tuned to one): ``--skip N`` replays requests
N+1 ... N+``--requests`` of each trace (arrivals shifted to start at 0), ``--seed S`` draws the
predictions (and the synthetic arrivals of the poisson and burst8 cells) with seed S; both 0 by
default (the first requests, seed 0). ``--confusion FILE`` draws the predictions from another
confusion matrix (``benchmarks/confusion_minilm_encoder.json``: the encoder-only bundle's, with
which the figures of docs/results.md dated before the stacked bundle were measured).
``--overload`` adds a table: mean JCT (split into time to first token and decode), the share of
requests whose TTFT was lost and SLO attainment of every policy at 1x and 1.25x vLLM V1's
capacity load (JCT ratios to vLLM V1), and the share of requests finished: the means count only
those (vLLM V0 ignores prompts over its limit, and its mean covers the rest).

``--sustained`` adds a table with a stricter capacity: a load passes only if, besides the SLO
attainment, the server keeps up with every request: at most 1% of the requests are *deferred*,
still waiting for their first token at the last arrival although they arrived more than a TTFT
SLO before it. A policy that gives up on requests whose TTFT is lost and serves them only when
nothing else waits can meet 90% attainment above the saturation ceiling by never catching up
with the other 10% (they run after the trace ends); the deferred share at its capacity shows it.

With ``--out``, ``results.json`` holds one row per cell and policy: capacity, its ratios, and,
with ``--overload``, ``overload_1x`` and ``overload_1.25x`` (mean JCT, its ratio to V1's, SLO
attainment, ...), with ``--sustained``, ``sustained_capacity``. ``benchmarks/grid_summary.py``
sums several such folders up (the figures README's "Results at a glance" quotes).

``--resolution F`` stops each capacity search once its passing and failing loads are within F
of each other (relative; 0.02 by default): a capacity is known to F, a ratio of two to about
twice that. Each halving of F takes one more run a search (``--resolution 0.003``: three).

``--max-normalized-latency S`` takes capacity at a normalized latency (the vLLM and Orca papers'
metric) instead of SLO attainment; ``--max-p99-tbt S`` also requires the p99 time between tokens
to stay within S seconds (``slo``: within the cell's TBT SLO; Sarathi-Serve's P99-TBT SLO). Both
apply to every capacity the grid reports (the sustained one and the budget ``vllm-tuned`` picks
included).

Cells (first ``--requests`` requests of each trace):
- azure: Azure 2023 conversations, Llama-2-13B on A100-80GB, TTFT 5 s / TBT 0.2 s;
  azure-kv50: the same at gpu_memory_utilization 0.5 (a KV-starved server);
  azure-tbt100: the same with a tight 0.1 s TBT SLO;
- mooncake: Kimi conversations (long prompts), Llama-3-8B on H100, TTFT 10 s / TBT 0.2 s;
- sharegpt-opt13b: the paper's era: ShareGPT turns (context and response lengths in Llama-3
  tokens: decode-heavy), Poisson arrivals, OPT-13B on an A100-40GB (13k KV tokens), TTFT 5 s /
  TBT 0.2 s;
- azure-burst: Azure lengths with bursty arrivals (groups of 8 simultaneous requests, the groups
  gamma arrivals with cv 2), Llama-2-13B on A100-80GB, TTFT 5 s / TBT 0.2 s.

Held-out cells (``--cells heldout``), on which no constant of any policy was chosen:
- alpaca-llama3-h200: AlpacaEval answers (short instructions, 40 generators pooled), Poisson
  arrivals, Llama-3-8B on H200 (892k KV tokens: the 256 sequence slots bind, not the KV cache),
  TTFT 5 s / TBT 0.1 s;
- mooncake-burst: Mooncake lengths in groups of 8 simultaneous requests, Llama-3-8B on H100,
  TTFT 10 s / TBT 0.2 s;
- sharegpt-llama2-7b-gamma: ShareGPT turns, gamma arrivals with cv 3, Llama-2-7B on A100-40GB,
  TTFT 5 s / TBT 0.2 s;
- azure-llama2-7b-a100-40gb: the Azure trace on Llama-2-7B on A100-40GB, TTFT 3 s / TBT 0.15 s.

Synthetic cells (``--cells synthetic``): code completion, the workload of the Azure 2023 code
trace, which is a hidden hold-out: a synthetic trace of its published shape (``code_trace``,
``CODE_SHAPE``: prompts of 1,500 tokens and answers of 13 at the median), on which, too, nothing
was chosen:
- code-synth: gamma arrivals (cv 2), Llama-2-13B on A100-80GB, TTFT 5 s / TBT 0.2 s;
  code-synth-tbt100: the same with a 0.1 s TBT SLO; code-synth-burst: groups of 8;
- code-synth-llama3-h100: gamma arrivals (cv 2), Llama-3-8B on H100, TTFT 2 s / TBT 0.1 s.

Random cells (``--cells random:N``, drawn with ``--cell-seed S``; names start ``rS.i-``): N
scenarios drawn uniformly from the four traces x the models whose context window holds them x
four GPUs (A100-40GB, A100-80GB, H100, H200) x TTFT SLOs 2-10 s x TBT SLOs 0.1-0.3 s x trace,
gamma (cv 2, 4) or burst8 (cv 1, 2) arrivals x vLLM's default KV size or
gpu_memory_utilization 0.6 (``random_cells``). Nothing was chosen on them: a check that a result
holds beyond the named cells. A draw can be infeasible for every policy (Mooncake's long prompts
with a 3 s TTFT on an A100): its capacities then read ``no_passing_load``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOL = "benchmarks/scenario_grid.py"
sys.path.insert(0, str(REPO))

from ecoserve_sched.compare import (  # noqa: E402
    CAPACITY_MAX_RUNS,
    CAPACITY_REL_TOL,
    MAX_DEFERRED,
    RunSpec,
    Server,
    capacity,
    capacity_number,
    ceiling,
    deferred_share,
    sustained,
)
from ecoserve_sched.cost_model import load_profile  # noqa: E402
from ecoserve_sched.policies import policy_names  # noqa: E402
from ecoserve_sched.policies.interface import (  # noqa: E402
    DEFAULT_MAX_RUNNING,
    DEFAULT_TOKEN_BUDGET,
    serve_defaults,
)
from ecoserve_sched.predictions import load_confusion  # noqa: E402
from ecoserve_sched.request import SLO  # noqa: E402
from ecoserve_sched.trace import Trace, burst_arrivals, gamma_arrivals, poisson_arrivals, read_trace  # noqa: E402
from rlpredict.cli_boundary import (  # noqa: E402
    SHARED_AZURE_CONV,
    ScriptParser,
    arg_list,
    arg_number,
    arg_path,
    run_script,
    worker_pool,
)
from rlpredict.data import LoadReport  # noqa: E402
from rlpredict.outputs import check_new_dir, check_paths, output_dir  # noqa: E402
from rlpredict.records import is_plain_number  # noqa: E402

#: ``--cells random:N``: at most this many (each cell is minutes of work on two cores)
MAX_RANDOM_CELLS = 1000
POLICIES = ("vllm", "vllm-tuned", "vllm-v0", "sarathi", "orca", "s3", "sjf", "ecoserve", "ecoserve-oracle")

#: ``vllm-tuned``: vLLM V1 with the best of these token budgets (max_num_batched_tokens) per cell,
#: the largest capacity any of them reaches (2048, vLLM's default, is the ``vllm`` row).
TUNED_BUDGETS = (512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Cell:
    name: str
    trace: str  # azure | mooncake | sharegpt | alpaca | code (synthetic, ``code_trace``)
    profile: str
    slo: SLO
    server: Server = field(default_factory=Server)
    arrivals: str = "trace"  # trace | burst8 | poisson | gamma
    cv: float = 2.0  # burst8, gamma: coefficient of variation of the (groups') arrival gaps


CELLS = (
    Cell("azure", "azure", "llama2-13b-a100-80gb", SLO(5.0, 0.2)),
    Cell("azure-kv50", "azure", "llama2-13b-a100-80gb", SLO(5.0, 0.2), Server(gpu_memory_utilization=0.5)),
    Cell("azure-tbt100", "azure", "llama2-13b-a100-80gb", SLO(5.0, 0.1)),
    Cell("mooncake", "mooncake", "llama3-8b-h100-80gb", SLO(10.0, 0.2)),
    Cell("sharegpt-opt13b", "sharegpt", "opt-13b-a100-40gb", SLO(5.0, 0.2), arrivals="poisson"),
    Cell("azure-burst", "azure", "llama2-13b-a100-80gb", SLO(5.0, 0.2), arrivals="burst8"),
)

#: Cells no constant of any policy was chosen on (``--cells heldout``): other models, GPUs, SLOs,
#: arrival processes and one trace (AlpacaEval) the grid above never used.
HELDOUT_CELLS = (
    Cell("alpaca-llama3-h200", "alpaca", "llama3-8b-h200", SLO(5.0, 0.1), arrivals="poisson"),
    Cell("mooncake-burst", "mooncake", "llama3-8b-h100-80gb", SLO(10.0, 0.2), arrivals="burst8"),
    Cell("sharegpt-llama2-7b-gamma", "sharegpt", "llama2-7b-a100-40gb", SLO(5.0, 0.2), arrivals="gamma", cv=3.0),
    Cell("azure-llama2-7b-a100-40gb", "azure", "llama2-7b-a100-40gb", SLO(3.0, 0.15)),
)
#: Code completion (``--cells synthetic``): the companion of the Azure conversation trace, the
#: Azure 2023 *code* trace, is a hidden hold-out (../shared/data/azure_llm_2023_conv/README.md);
#: these cells draw its shape instead (``code_trace``): long prompts, very short answers.
SYNTHETIC_CELLS = (
    Cell("code-synth", "code", "llama2-13b-a100-80gb", SLO(5.0, 0.2), arrivals="gamma"),
    Cell("code-synth-tbt100", "code", "llama2-13b-a100-80gb", SLO(5.0, 0.1), arrivals="gamma"),
    Cell("code-synth-burst", "code", "llama2-13b-a100-80gb", SLO(5.0, 0.2), arrivals="burst8"),
    Cell("code-synth-llama3-h100", "code", "llama3-8b-h100-80gb", SLO(2.0, 0.1), arrivals="gamma"),
)
ALL_CELLS = CELLS + HELDOUT_CELLS + SYNTHETIC_CELLS

#: ``code_trace``'s shape: the medians Splitwise (Patel et al., ISCA 2024) reports for the Azure
#: code trace (1,500 prompt and 13 output tokens; its conversation medians, 1,020 and 129, are
#: those of ../shared's trace), log-normal spreads that are ours (the published tails are not),
#: and the conversation trace's largest prompt and output (14,050 and 1,000 tokens) as caps. Like
#: the conversation cells, they ignore the model's context window.
CODE_SHAPE = {"prompt_median": 1500, "prompt_sigma": 0.9, "output_median": 13, "output_sigma": 1.1,
              "max_prompt": 14050, "max_output": 1000}

#: ``--cells random:N``: what a random cell is drawn from (traces with the models whose context
#: holds them: Mooncake's long prompts only with Llama-3-8B's 8k window, OPT-13B's 2k window only
#: with the chat turns, which ``_turns_trace`` keeps within 2,048 tokens).
RANDOM_MODELS = {"azure": ("llama2-7b", "llama2-13b", "llama3-8b"), "mooncake": ("llama3-8b",),
                 "sharegpt": ("llama2-7b", "llama2-13b", "llama3-8b", "opt-13b"),
                 "alpaca": ("llama2-7b", "llama2-13b", "llama3-8b", "opt-13b")}
RANDOM_GPUS = ("a100-40gb", "a100-80gb", "h100-80gb", "h200")
RANDOM_TTFT_S = (2.0, 3.0, 5.0, 10.0)
RANDOM_TBT_S = (0.1, 0.15, 0.2, 0.3)
RANDOM_ARRIVALS = (("trace", 0.0), ("gamma", 2.0), ("gamma", 4.0), ("burst8", 1.0), ("burst8", 2.0))
RANDOM_KV_SHARE = (None, 0.6)  # gpu_memory_utilization: vLLM's default (0.9) or a smaller cache


def random_cells(n: int, seed: int) -> tuple[Cell, ...]:
    """``n`` cells drawn uniformly from the product above with ``seed``: scenarios no constant
    of any policy was chosen on, to check that a result generalizes beyond the named cells.
    A draw whose KV cache at its memory share holds fewer than 16k tokens is redrawn."""
    rng = np.random.default_rng(seed)
    out: list[Cell] = []
    while len(out) < n:
        trace = str(rng.choice(sorted(RANDOM_MODELS)))
        profile = f"{rng.choice(RANDOM_MODELS[trace])}-{rng.choice(RANDOM_GPUS)}"
        slo = SLO(float(rng.choice(RANDOM_TTFT_S)), float(rng.choice(RANDOM_TBT_S)))
        arrivals, cv = RANDOM_ARRIVALS[rng.integers(len(RANDOM_ARRIVALS))]
        util = RANDOM_KV_SHARE[rng.integers(len(RANDOM_KV_SHARE))]
        try:
            if load_profile(profile).kv_blocks(16, util) < 1024:  # 16k tokens: the longest prompts fit
                continue
        except ValueError:
            continue
        arr = "" if arrivals == "trace" else f"-{arrivals}-cv{cv:g}"
        kv = "" if util is None else f"-kv{round(util * 100)}"
        name = f"r{seed}.{len(out)}-{trace}-{profile}{kv}{arr}-{slo.ttft_s:g}s-{slo.tbt_s:g}s"
        out.append(Cell(name, trace, profile, slo, Server(gpu_memory_utilization=util),
                        "poisson" if arrivals == "trace" and trace in ("sharegpt", "alpaca") else arrivals,
                        cv or 2.0))
    return tuple(out)


def find_cell(name: str) -> Cell | None:
    """The named cell, or a random draw's cell by its full name or its ``rS.I`` prefix (cell
    ``I`` of ``random_cells(I + 1, S)``, as ``--cells random:N --cell-seed S`` names it); None
    if there is no such cell."""
    for c in ALL_CELLS:
        if c.name == name:
            return c
    head = name.split("-", 1)[0]
    seed, _, index = head.removeprefix("r").partition(".")
    if not (head.startswith("r") and seed.isdigit() and index.isdigit()) or int(index) > 10_000:
        return None
    cell = random_cells(int(index) + 1, int(seed))[-1]
    return cell if name in (head, cell.name) else None


def load_trace(cell: Cell, shared: Path, n: int, skip: int = 0, seed: int = 0) -> Trace:
    if cell.trace == "azure":
        tr = _slice(read_trace(shared / SHARED_AZURE_CONV), skip, n)
    elif cell.trace == "mooncake":
        tr = _slice(read_trace(shared / "mooncake_conversation_trace" / "mooncake_conversation_trace.jsonl.gz"),
                    skip, n)
    elif cell.trace == "alpaca":
        tr = alpaca_trace(shared, n, skip, seed)
    elif cell.trace == "code":
        tr = code_trace(n, skip)
    else:
        tr = sharegpt_trace(shared, n, skip, seed)
    span = float(tr.arrival_s[-1] - tr.arrival_s[0])
    if not span > 0:  # was: ZeroDivisionError (Mooncake's first ten requests all arrive at 0)
        raise SystemExit(f"{tr.path}: its first {len(tr)} requests all arrive at once, so they "
                         "have no mean rate to keep; give more --requests")
    rate = (len(tr) - 1) / span  # keep the trace's mean rate
    if cell.arrivals == "burst8":
        tr = tr.with_arrivals(burst_arrivals(len(tr), rate, cv=cell.cv, burst=8, seed=seed))
    elif cell.arrivals == "gamma":
        tr = tr.with_arrivals(gamma_arrivals(len(tr), rate, cv=cell.cv, seed=seed))
    elif cell.arrivals == "poisson" and cell.trace not in ("sharegpt", "alpaca"):
        tr = tr.with_arrivals(poisson_arrivals(len(tr), rate, seed=seed))
    return tr


def _slice(tr: Trace, skip: int, n: int) -> Trace:
    """Requests ``skip`` ... ``skip + n - 1``, arrivals shifted to start at 0 (skip 0: ``head``)."""
    if not skip:
        return tr.head(n)
    cut = replace(tr, **{f: (None if v is None else v[skip:skip + n]) for f, v in (
        ("arrival_s", tr.arrival_s), ("input_tokens", tr.input_tokens), ("output_tokens", tr.output_tokens),
        ("max_tokens", tr.max_tokens), ("rl", tr.rl), ("prompts", tr.prompts), ("generators", tr.generators))})
    if len(cut.arrival_s) < 2:
        raise SystemExit(f"--skip {skip}: fewer than 2 requests left in {tr.path}")
    return cut.with_arrivals(cut.arrival_s - cut.arrival_s[0])


def sharegpt_trace(shared: Path, n: int, skip: int = 0, seed: int = 0) -> Trace:
    """ShareGPT turns as requests: context (history) and response lengths in Llama-3 tokens,
    Poisson arrivals at 1 request/s (the grid scales the rate)."""
    from rlpredict.data import load_samples

    samples, report = load_samples([shared / "sharegpt_v3" / "sharegpt_v3.jsonl.gz"], max_rows=skip + n,
                                   on_error="skip")
    _say_skipped(report)
    return _turns_trace("sharegpt_v3 turns", samples[skip:], seed)


def alpaca_trace(shared: Path, n: int, skip: int = 0, seed: int = 0) -> Trace:
    """AlpacaEval answers as requests (single-turn instructions, 40 generators pooled, shuffled
    with a fixed seed so that a slice mixes generators), lengths in Llama-3 tokens, Poisson
    arrivals at 1 request/s."""
    from rlpredict.data import load_samples

    samples, report = load_samples([shared / "alpaca_eval_outputs" / "alpaca_eval_outputs.jsonl.gz"], on_error="skip")
    _say_skipped(report)
    order = np.random.default_rng(0).permutation(len(samples))[skip:skip + n]
    return _turns_trace("alpaca_eval answers", [samples[i] for i in order], seed)


#: Draws skipped at a time by ``code_trace`` (its memory is bounded by this, not by ``--skip``).
CODE_SKIP_CHUNK = 1 << 16


def code_trace(n: int, skip: int = 0) -> Trace:
    """Requests ``skip`` ... ``skip + n - 1`` of a synthetic code-completion trace: prompt and
    output lengths drawn independently (seed 0) from log-normals with ``CODE_SHAPE``'s medians and
    spreads (request i from the i-th pair of draws, whatever ``n`` and ``skip``), rounded and
    clipped to its caps; Poisson arrivals at 1 request/s (the cells replace them)."""
    c = CODE_SHAPE
    rng = np.random.default_rng(0)
    for start in range(0, skip, CODE_SKIP_CHUNK):  # the draws skipped, a chunk at a time: the same
        rng.standard_normal((min(CODE_SKIP_CHUNK, skip - start), 2))  # stream (was: all held, 352 MB
    z = rng.standard_normal((n, 2))  # at --skip 20,000,000)
    inp = np.exp(math.log(c["prompt_median"]) + c["prompt_sigma"] * z[:, 0])
    out = np.exp(math.log(c["output_median"]) + c["output_sigma"] * z[:, 1])
    return Trace("synthetic code completion", poisson_arrivals(n, 1.0),
                 np.clip(np.rint(inp), 1, c["max_prompt"]).astype(np.int64),
                 np.clip(np.rint(out), 1, c["max_output"]).astype(np.int64), np.full(n, 2048, dtype=np.int64))


def _say_skipped(report: LoadReport) -> None:
    """Bad rows of a data file are skipped, and said so on stderr (was: dropped without a word)."""
    if report.n_skipped:
        print(f"note: {report.summary()}", file=sys.stderr, flush=True)


def _turns_trace(name: str, samples: list, seed: int) -> Trace:
    """Chat turns as requests: context (history) and response in Llama-3 tokens, turns longer
    than OPT's 2,048-token window left out, Poisson arrivals at 1 request/s."""
    from rlpredict.data import attach_rl
    from rlpredict.rl_tokenizers import count_tokens

    if len(samples) < 2:
        raise SystemExit(f"{name}: fewer than 2 requests left (--skip and --requests)")
    attach_rl(samples, "llama3")
    ctx = count_tokens(["\n".join(m["content"] for m in s.messages) for s in samples], "llama3")
    inp = np.maximum(np.asarray(ctx, dtype=np.int64), 1)
    out = np.maximum(np.asarray([s.rl_tokens for s in samples], dtype=np.int64), 1)
    keep = inp + out <= 2048  # OPT's context window
    return Trace(name, poisson_arrivals(int(keep.sum()), 1.0, seed=seed), inp[keep], out[keep],
                 np.full(int(keep.sum()), 2048, dtype=np.int64))


_SPECS: dict[str, RunSpec] = {}
_SLICE: dict = {"skip": 0, "seed": 0, "confusion": None, "kv_scale": 1.0, "serve_defaults": False}  # set in every worker


def _init_worker(skip: int, seed: int, confusion: Path | None = None, kv_scale: float = 1.0,
                 serve: bool = False) -> None:
    """--skip, --seed, --confusion, --kv-scale and --serve-defaults, in every worker process."""
    _SLICE.update(skip=skip, seed=seed, confusion=load_confusion(confusion) if confusion else None,
                  kv_scale=kv_scale, serve_defaults=serve)


def engine_of(cell: Cell, serve: bool, cost: Any = None) -> tuple[int, int]:
    """vLLM V1's token budget and max running requests in ``cell``: its A100 defaults (2,048 and
    256), or with ``serve`` (``--serve-defaults``) those ``vllm serve`` picks for the cell's GPU
    (``serve_defaults``: 8,192 and 1,024 on an H100 or H200), which ``spec_of`` gives every policy
    but ``OWN_DEFAULTS``."""
    if not serve:
        return DEFAULT_TOKEN_BUDGET, DEFAULT_MAX_RUNNING
    cost = cost or load_profile(cell.profile)  # a shipped profile's name names its GPU
    return serve_defaults(cost.name, cost.spec["gpu"]["hbm_bytes"])


#: Baselines that stand for other systems, with defaults of their own that ``--serve-defaults``
#: leaves: Sarathi-Serve's 512-token chunks; vLLM V0's max(max_model_len, 2048) tokens and 256
#: sequences on every GPU (vLLM's per-GPU defaults are V1's alone).
OWN_DEFAULTS = frozenset({"sarathi", "vllm-v0"})


def spec_of(cell: Cell, shared: Path, n: int, policy: str = "vllm") -> RunSpec:
    """The cell's RunSpec for ``policy`` (the trace read once per worker process): with
    ``--serve-defaults``, at the token budget and max running requests ``vllm serve`` picks for
    the cell's GPU where they are not the A100's (each policy's own default there, as without
    the option), unless ``policy`` keeps its own (``OWN_DEFAULTS``)."""
    if cell.name not in _SPECS:
        skip, seed = _SLICE["skip"], _SLICE["seed"]
        cost, server = load_profile(cell.profile), cell.server
        if _SLICE["kv_scale"] != 1.0:  # the cell's KV blocks times --kv-scale
            blocks = server.policy_kw(cost).get("kv_blocks") or cost.kv_blocks(server.block_size)
            server = replace(server, num_gpu_blocks_override=max(1, round(blocks * _SLICE["kv_scale"])))
        _SPECS[cell.name] = RunSpec(load_trace(cell, shared, n, skip, seed), cost, cell.slo,
                                    server=server, seed=seed, confusion=_SLICE["confusion"])
    spec = _SPECS[cell.name]
    if _SLICE["serve_defaults"] and policy not in OWN_DEFAULTS:
        budget, seqs = engine_of(cell, True, spec.cost)  # (the spec's profile: not read again per task)
        if (budget, seqs) != (DEFAULT_TOKEN_BUDGET, DEFAULT_MAX_RUNNING):  # (was: every policy of every
            # cell at these two, Sarathi-Serve's 512 tokens and V0's prompt limit included; a reviewer's find)
            spec = replace(spec, server=replace(spec.server, token_budget=budget, max_running=seqs))
    return spec


def resolve(cell: Cell, policy: str, shared: Path, n: int) -> tuple[RunSpec, str]:
    """The spec and registered policy a grid policy name runs: ``vllm@B`` is vLLM V1 with a
    token budget of B (``Server.token_budget``), ``vllm@B/S`` also with at most S running
    requests (``Server.max_running``; else the cell's), any other name runs as is."""
    spec = spec_of(cell, shared, n, "vllm" if policy.startswith("vllm@") else policy)
    if policy.startswith("vllm@"):
        budget, _, seqs = policy[5:].partition("/")
        server = replace(spec.server, token_budget=int(budget), max_running=int(seqs) if seqs else spec.server.max_running)
        return replace(spec, server=server), "vllm"
    return spec, policy


def budget_policy(name: str, max_running: int = DEFAULT_MAX_RUNNING) -> str | None:
    """None if ``name`` is a valid ``vllm@B`` or ``vllm@B/S`` (B a whole number of tokens above
    max_num_seqs, S or else ``max_running``, which every iteration's decodes may take; S a whole
    number >= 1) or no such name; else why not."""
    if not name.startswith("vllm@"):
        return None
    b, slash, s = name[5:].partition("/")
    if slash and not (s.isascii() and s.isdigit() and int(s) >= 1):  # (was: '²' a ValueError, '١٠٠' 100)
        return f"'{name}': vllm@B/S needs a whole number of running requests S >= 1"
    seqs = int(s) if slash else max_running
    return None if b.isascii() and b.isdigit() and int(b) > seqs else \
        f"'{name}': vllm@B needs a whole number of tokens B > {seqs} (vLLM's max_num_seqs{'' if slash else ', or name it: vllm@B/S'})"


def unknown_policy(name: str, tuned: bool = True) -> str | None:
    """Why ``name`` is no policy the grid runs (None if it is one): a registered policy,
    ``vllm@B`` (``budget_policy``; run through ``resolve``), vLLM's own scheduler
    (``*vllm-real``) or, with ``tuned`` (the grid's search itself), ``vllm-tuned``."""
    if (tuned and name == "vllm-tuned") or name.endswith("vllm-real"):
        return None
    if name.startswith("vllm@"):
        return budget_policy(name)
    names = policy_names()
    return None if name in names else f"unknown policy {name!r}; choose from {', '.join(sorted(names))}, " \
        f"vllm@B{', vllm-tuned' if tuned else ''}"


#: --resolution's default: ``compare.capacity``'s own.
RESOLUTION = CAPACITY_REL_TOL


def _search(rel_tol: float) -> dict:
    """``compare.capacity``'s search settings at resolution ``rel_tol``: a finer one gets the
    runs its extra bisection steps take."""
    extra = max(0, math.ceil(math.log2(CAPACITY_REL_TOL / rel_tol)))
    return {"rel_tol": rel_tol, "max_runs": CAPACITY_MAX_RUNS + extra}


def task_ceiling(cell: Cell, shared: Path, n: int) -> tuple[str, dict]:
    spec = spec_of(cell, shared, n)
    kv_blocks = spec.server.policy_kw(spec.cost).get("kv_blocks") or spec.cost.kv_blocks(spec.server.block_size)
    return cell.name, {**ceiling(spec), "kv_tokens": kv_blocks * spec.server.block_size,
                       "requests": len(spec.trace.arrival_s)}


def task_capacity(cell: Cell, policy: str, shared: Path, n: int, hi: float,
                  max_nl: float | None = None, max_p99_tbt: float | str | None = None,
                  rel_tol: float = RESOLUTION) -> tuple[str, str, dict]:
    spec, run_as = resolve(cell, policy, shared, n)
    return cell.name, policy, capacity(spec, run_as, hi=hi, max_normalized_latency=max_nl,
                                       max_p99_tbt=p99_tbt_of(cell, max_p99_tbt), **_search(rel_tol))


def p99_tbt_of(cell: Cell, max_p99_tbt: float | str | None) -> float | None:
    """``--max-p99-tbt`` for ``cell``: seconds, or ``"slo"``: the cell's own TBT SLO."""
    return cell.slo.tbt_s if max_p99_tbt == "slo" else max_p99_tbt


def task_at_load(cell: Cell, policy: str, shared: Path, n: int, scale: float) -> tuple[str, str, dict]:
    spec, run_as = resolve(cell, policy, shared, n)
    s, _ = spec.run(run_as, scale)
    return cell.name, policy, {k: s[k] for k in ("mean_jct_s", "normalized_latency_s", "slo_attainment")}


def task_sustained(cell: Cell, policy: str, shared: Path, n: int, hi: float, cap: float | None,
                   max_nl: float | None = None, max_p99_tbt: float | str | None = None,
                   rel_tol: float = RESOLUTION) -> tuple[str, str, dict]:
    """The sustained capacity, under the same criterion (and resolution) as ``task_capacity``'s."""
    spec, run_as = resolve(cell, policy, shared, n)
    out = capacity(sustained(spec), run_as, hi=hi, max_normalized_latency=max_nl,
                   max_p99_tbt=p99_tbt_of(cell, max_p99_tbt), **_search(rel_tol))
    out["deferred_at_capacity"] = deferred_share(spec.run(run_as, cap)[1], spec.slo) if cap else None
    return cell.name, policy, out


#: --overload: loads as multiples of vLLM V1's capacity.
OVERLOAD_FACTORS = (1.0, 1.25)


def task_overload(cell: Cell, policy: str, shared: Path, n: int, factor: float,
                  scale: float) -> tuple[str, str, float, dict]:
    spec, run_as = resolve(cell, policy, shared, n)
    s, _ = spec.run(run_as, scale)
    keys = ("mean_jct_s", "mean_ttft_s", "ttft_lost_share", "slo_attainment", "p99_ttft_s")
    # the means count finished requests: a policy that ends some unserved (vLLM V0 ignores prompts
    # over its limit) averages over fewer, which this share shows beside them
    return cell.name, policy, factor, {**{k: s[k] for k in keys}, "finished_share": s["finished"] / s["requests"]}


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=arg_path, required=True, help="the shared data folder (../shared/data)")
    ap.add_argument("--out", type=arg_path, help="folder for results.json and results.md (an earlier run's is "
                    "replaced)")
    ap.add_argument("--force", action="store_true", help="accepted for older command lines: this script's earlier --out is replaced "
                    "without it, another tool's folder never")
    ap.add_argument("--requests", type=arg_number(int, 2), default=6000, help="first N requests of each trace")
    ap.add_argument("--cells", default=",".join(c.name for c in CELLS), help="comma-separated cell names; "
                    "'heldout': the cells no policy constant was chosen on; 'synthetic': code completion "
                    "(a synthetic trace of the hidden Azure code trace's shape); 'random:N': N cells drawn "
                    "with --cell-seed from other traces x models x GPUs x SLOs x arrivals x KV sizes; "
                    "'rS.I': the random cell I drawn with seed S (as docs/results.md names them)")
    ap.add_argument("--cell-seed", type=arg_number(int, 0), default=0, help="seed of the cells 'random:N' draws")
    ap.add_argument("--policies", type=arg_list(str), default=list(POLICIES), help="comma-separated policy names")
    ap.add_argument("--workers", type=arg_number(int, 1), default=2, help="parallel processes")
    ap.add_argument("--skip", type=arg_number(int, 0), default=0, help="skip the first N requests of each trace")
    ap.add_argument("--seed", type=arg_number(int, 0), default=0, help="seed of the predictions and synthetic arrivals")
    ap.add_argument("--confusion", type=arg_path, help="confusion matrix the predictions are drawn from (a "
                    "confusion.json or a bundle; default: the shipped bundle's)")
    ap.add_argument("--kv-scale", type=arg_number(float, 0, low_open=True), default=1.0, metavar="F",
                    help="every cell's KV cache times F (vLLM's num_gpu_blocks_override): what KV binds")
    ap.add_argument("--resolution", type=arg_number(float, 0.001, 0.5), default=RESOLUTION, metavar="F",
                    help="stop each capacity search once the passing and failing loads are within F "
                         "of each other (relative; default 0.02)")
    ap.add_argument("--serve-defaults", action="store_true",
                    help="every policy runs at the token budget and max running requests `vllm serve` "
                         "picks for the cell's GPU (8192 and 1024 on an H100 or H200; on an A100 its 2048 "
                         "and 256, as without the option), but sarathi and vllm-v0, which keep their own")
    ap.add_argument("--overload", action="store_true",
                    help="also report mean JCT and SLO attainment at 1x and 1.25x vLLM V1's capacity load")
    ap.add_argument("--sustained", action="store_true",
                    help="also report the capacity at which at most 1%% of requests are deferred past the trace")
    ap.add_argument("--max-normalized-latency", type=arg_number(float, 0, low_open=True), metavar="S",
                    help="capacity = the largest load whose normalized latency (mean end-to-end s per "
                         "output token, the vLLM and Orca papers' metric) stays <= S with every request "
                         "finished, instead of SLO attainment >= 0.9")
    ap.add_argument("--max-p99-tbt", metavar="S|slo",
                    help="a load passes only if, besides its criterion, the p99 time between tokens (over "
                         "all tokens, preemption stalls included) is <= S seconds, or with 'slo' <= the "
                         "cell's TBT SLO: Sarathi-Serve's P99-TBT SLO")
    args = ap.parse_args()
    nl = args.max_normalized_latency
    p99: float | str | None = args.max_p99_tbt
    if p99 is not None and p99 != "slo":
        try:
            p99 = float(p99) if is_plain_number(p99) else math.nan
        except ValueError:
            p99 = math.nan
        if not (p99 > 0 and math.isfinite(p99)):
            ap.error(f"--max-p99-tbt must be a positive number of seconds or 'slo', got {args.max_p99_tbt}")
    drawn: tuple[Cell, ...] = ()
    names: list[str] = []
    if "" in (toks := [t.strip() for t in args.cells.split(",")]):  # (was: "--cells:  given twice")
        ap.error(f"--cells: an empty cell name in {args.cells!r}")
    for tok in toks:
        if tok == "heldout":
            names += [c.name for c in HELDOUT_CELLS]
        elif tok == "synthetic":
            names += [c.name for c in SYNTHETIC_CELLS]
        elif tok.startswith("random:"):
            count = tok.removeprefix("random:")
            if not count.isdigit() or not 1 <= int(count) <= MAX_RANDOM_CELLS:
                ap.error(f"--cells: 'random:N' needs a whole number 1 <= N <= {MAX_RANDOM_CELLS}, got {tok!r}")
            drawn += random_cells(int(count), args.cell_seed)
            names += [c.name for c in drawn[-int(count):]]
        elif (c := find_cell(tok)) is not None and c not in ALL_CELLS:  # one random cell: rS.I
            drawn += (c,)
            names.append(c.name)
        else:
            names.append(tok)
    if args.cell_seed and not any(tok.startswith("random:") for tok in toks):  # (was: taken, and the
        ap.error("--cell-seed: seeds the cells 'random:N' draws, and --cells draws none "  # cells run as
                 "(a cell rS.I names its own seed)")  # named; a reviewer's find)
    if twice := sorted({n for n in names if names.count(n) > 1}):  # was: run and written twice
        ap.error(f"--cells: {', '.join(twice)} given twice (random:N draws the same cells for the same "
                 "--cell-seed: give it once, or another --cell-seed)")
    known = ALL_CELLS + drawn
    if unknown := set(names) - {c.name for c in known}:
        ap.error(f"--cells: unknown cell(s) {', '.join(sorted(unknown))}; known: "
                 f"{', '.join(c.name for c in ALL_CELLS)}, heldout, synthetic, random:N, rS.I")
    cells = [c for c in known if c.name in names]
    policies = args.policies  # ``arg_list``: none twice (was: run twice, then refused by grid_summary)
    if "vllm" not in policies:
        ap.error("--policies must include vllm: every ratio is to vLLM V1")
    if bad := [m for m in map(unknown_policy, policies) if m]:
        ap.error(f"--policies: {bad[0]}")
    if args.out:  # checked before the work, written at its end
        check_paths([args.shared] + ([args.confusion] if args.confusion else []), [("--out", args.out)],
                    apart=[args.shared])  # results are not written into the data (was: --out inside it)
        check_new_dir(args.out, force=args.force, option="--out", rerun=TOOL, only=TOOL)
    if args.confusion:
        load_confusion(args.confusion)  # a bad file: one line here, not a worker's traceback
    confusion_id = _digest(args.confusion) if args.confusion else None  # before the work (a bundle: its manifest)
    engine = {c.name: engine_of(c, args.serve_defaults) for c in cells}
    for c in cells:  # vllm@B under a cell's max running requests (was: a worker's traceback)
        if bad := [m for p in policies if (m := budget_policy(p, engine[c.name][1]))]:
            ap.error(f"--policies: cell {c.name} runs {engine[c.name][1]} requests at most: {bad[0]}")
    # vllm-tuned: vLLM V1 at each of TUNED_BUDGETS above the cell's max running requests (its
    # default budget is the vllm run)
    sweep = {c.name: [f"vllm@{b}" for b in TUNED_BUDGETS if b != engine[c.name][0] and b > engine[c.name][1]]
             if "vllm-tuned" in policies else [] for c in cells}
    searched = {c.name: [p for p in policies if p != "vllm-tuned"] + [p for p in sweep[c.name] if p not in policies]
                for c in cells}
    t0 = time.time()
    overload: dict[tuple[str, str, float], dict] = {}
    sustained: dict[tuple[str, str], dict] = {}
    with worker_pool(args.workers, _init_worker,
                     (args.skip, args.seed, args.confusion, args.kv_scale, args.serve_defaults)) as pool:
        def starmap(fn, jobs: list[tuple]) -> list:
            return list(pool.map(fn, *zip(*jobs, strict=True), chunksize=1)) if jobs else []

        ceilings = dict(starmap(task_ceiling, [(c, args.shared, args.requests) for c in cells]))
        caps = {(name, p): c for name, p, c in starmap(task_capacity, [
            (c, p, args.shared, args.requests, max(ceilings[c.name]["ceiling_rate_scale"] or 1.0, 1e-3), nl, p99,
             args.resolution) for c in cells for p in searched[c.name]])}
        tuned: dict[str, str] = {}  # cell -> the vllm@B (or vllm) run that vllm-tuned's loads run
        for c in cells if "vllm-tuned" in policies else ():
            tuned[c.name] = max(["vllm", *sweep[c.name]], key=lambda p: _rank(caps[c.name, p]))
            budget = engine[c.name][0] if tuned[c.name] == "vllm" else int(tuned[c.name][5:])
            caps[c.name, "vllm-tuned"] = {**caps[c.name, tuned[c.name]], "token_budget": budget}
        at_load = {(name, p): s for name, p, s in starmap(_as_row(task_at_load, tuned), [
            (c, p, args.shared, args.requests, caps[c.name, "vllm"]["max_rate_scale"])
            for c in cells for p in policies if caps[c.name, "vllm"]["max_rate_scale"]])}
        if args.overload:
            overload = {(name, p, f): s for name, p, f, s in starmap(_as_row(task_overload, tuned), [
                (c, p, args.shared, args.requests, f, f * caps[c.name, "vllm"]["max_rate_scale"])
                for c in cells for p in policies for f in OVERLOAD_FACTORS
                if caps[c.name, "vllm"]["max_rate_scale"]])}
        if args.sustained:
            sustained = {(name, p): c for name, p, c in starmap(_as_row(task_sustained, tuned), [
                (c, p, args.shared, args.requests, max(ceilings[c.name]["ceiling_rate_scale"] or 1.0, 1e-3),
                 caps[c.name, p]["max_rate_scale"], nl, p99, args.resolution) for c in cells for p in policies])}
    criterion = "SLO attainment >= 0.9" if nl is None else \
        f"normalized latency <= {nl:g} s per output token and every request finished"
    if p99 is not None:
        criterion += " and p99 time between tokens <= " + ("the TBT SLO" if p99 == "slo" else f"{p99:g} s")
    # how the run was made, in every row: grid_summary.py refuses to pool runs made differently
    settings = {"criterion": criterion, "kv_scale": args.kv_scale, "seed": args.seed, "skip": args.skip,
                "confusion": confusion_id, "engine_defaults": "vllm serve" if args.serve_defaults else "a100"}
    rows = []
    for c in cells:
        ceil = ceilings[c.name]["ceiling_rate_scale"]
        v1 = caps[c.name, "vllm"]["max_rate_scale"]
        v0 = caps.get((c.name, "vllm-v0"), {}).get("max_rate_scale")
        base = at_load.get((c.name, "vllm"))
        for p in policies:
            cap = caps[c.name, p]["max_rate_scale"]
            load = at_load.get((c.name, p))
            rows.append({
                "cell": c.name, "profile": c.profile, "slo_ttft_s": c.slo.ttft_s, "slo_tbt_s": c.slo.tbt_s,
                "kv_tokens": ceilings[c.name]["kv_tokens"], "requests": ceilings[c.name]["requests"],
                "ceiling": ceil, "policy": p, "capacity": cap, "search": caps[c.name, p]["search"],
                "resolution": args.resolution,
                "vs_ceiling": _ratio(cap, ceil), "x_v1": _ratio(cap, v1), "x_v0": _ratio(cap, v0),
                "jct_x_v1": _ratio(load and load["mean_jct_s"], base and base["mean_jct_s"]),
                "norm_latency_x_v1": _ratio(load and load["normalized_latency_s"], base and base["normalized_latency_s"]),
                "attainment_at_v1_load": load and load["slo_attainment"],
                "token_budget": caps[c.name, p].get("token_budget"), **settings,
            })
            for f in OVERLOAD_FACTORS if args.overload else ():  # "overload_1x", "overload_1.25x": null
                # where V1 has no capacity (was: left out, with the table, where no cell had one)
                s = overload.get((c.name, p, f))
                rows[-1][f"overload_{f:g}x"] = s and {**s, "jct_x_v1": _jct_x_v1(overload, c.name, p, f)}
            if sustained:
                rows[-1]["sustained_capacity"] = _found(sustained[c.name, p])
                rows[-1]["sustained_search"] = sustained[c.name, p]["search"]  # why null, where it is
                rows[-1]["deferred_at_capacity"] = sustained[c.name, p]["deferred_at_capacity"]
    if args.resolution != RESOLUTION:
        criterion += f" (searched to {args.resolution:.2%})"
    text = markdown(rows, args.requests, time.time() - t0, criterion)
    if args.skip or args.seed:
        text += f"\n\n(requests {args.skip + 1} to {args.skip + args.requests} of each trace; seed {args.seed})"
    if args.serve_defaults:
        moved = [f"{c.name} {b}/{r}" for c in cells for b, r in [engine[c.name]]
                 if (b, r) != (DEFAULT_TOKEN_BUDGET, DEFAULT_MAX_RUNNING)]
        text += ("\n\n(--serve-defaults: every policy but " + " and ".join(sorted(OWN_DEFAULTS)) + " at `vllm serve`'s "
                 "token budget and max running requests for the cell's GPU, where they are not the A100's: "
                 + ("; ".join(moved) or "no cell here") + ")")
    if overload:
        text += "\n\n" + overload_markdown(overload, [c.name for c in cells], policies)
    elif args.overload:  # (was: no table and no word)
        text += ("\n\nPast capacity: no cell has a vLLM V1 capacity to load past (its search found none: "
                 "see the capacity column), so no load was run")
    if sustained:
        text += "\n\n" + sustained_markdown(sustained, caps, ceilings, [c.name for c in cells], policies, criterion)
    print(text)
    if args.out:
        from rlpredict.json_file import dumps

        with output_dir(args.out, force=args.force, tool=TOOL, rerun=True) as tmp:
            (tmp / "results.json").write_text(dumps(rows, indent=1) + "\n")
            (tmp / "results.md").write_text(text + "\n")


class _as_row:
    """A task whose ``vllm-tuned`` rows run the cell's best budget (``tuned``: cell -> ``vllm@B``),
    its result keyed by the row's name. Picklable for the process pool."""

    def __init__(self, task: Any, tuned: dict[str, str]) -> None:
        self.task, self.tuned = task, tuned

    def __call__(self, cell: Cell, policy: str, *args: Any) -> tuple:
        out = self.task(cell, self.tuned[cell.name] if policy == "vllm-tuned" else policy, *args)
        return (out[0], policy, *out[2:])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _digest(path: str | Path) -> str:
    """A confusion file, or a bundle (its manifest, where ``load_confusion`` reads it), named by
    its name and the first 16 hex digits of its SHA-256 (two files of one name, ``confusion.json``
    in two folders, are told apart; a path is not written)."""
    import hashlib

    p = Path(path)
    data = (p / "manifest.json" if p.is_dir() else p).read_bytes()  # (was: a bundle failed after the work)
    return f"{p.name} sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def _found(search: dict) -> float | None:
    """A capacity search's result: its rate scale if it found one."""
    return search["max_rate_scale"] if search["search"] == "found" else None


def _jct_x_v1(res: dict[tuple[str, str, float], dict], cell: str, policy: str, factor: float) -> float | None:
    """``--overload``: ``policy``'s mean JCT over vLLM V1's in ``cell`` at ``factor`` x V1's capacity load."""
    base = res.get((cell, "vllm", factor))
    return _ratio(res[cell, policy, factor]["mean_jct_s"], base and base["mean_jct_s"])


def _rank(cap: dict) -> float:
    """A budget's place in ``vllm-tuned``'s choice: its capacity, above all if no load failed
    (was: last, so a budget that failed was picked over one that never did; a reviewer's find),
    below all if none passed."""
    if cap.get("search") == "no_failing_load":
        return math.inf
    return cap["max_rate_scale"] or -1.0


def sustained_markdown(sus: dict, caps: dict, ceilings: dict, cells: list[str], policies: list[str],
                       criterion: str = "SLO attainment >= 0.9") -> str:
    """Capacity, deferred share at it, and the sustained capacity (at most 1% deferred)."""
    def f(v: float | None, d: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    out = [f"Sustained capacity: {criterion} and at most {MAX_DEFERRED:.0%} of requests deferred "
           "past the last arrival", "",
           "| cell | ceiling | policy | capacity | deferred @cap | sustained capacity | / ceiling |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for c in cells:
        ceil = ceilings[c]["ceiling_rate_scale"]
        for p in policies:
            s = sus[c, p]
            cap = _found(s)
            given = caps[c, p]["max_rate_scale"]
            out.append(f"| {c} | {'n/a' if ceil is None else capacity_number(ceil)} | {p} | {'n/a' if given is None else capacity_number(given)} | "
                       f"{f(s['deferred_at_capacity'])} | {capacity_number(cap) if cap else s['search']} | "
                       f"{f(_ratio(cap, ceil), 2)} |")
    return "\n".join(out)


def overload_markdown(res: dict[tuple[str, str, float], dict], cells: list[str], policies: list[str]) -> str:
    """Mean JCT (and its ratio to vLLM V1's; split into time to first token and decode) and SLO
    attainment at multiples of V1's capacity. An ordering moves the TTFT part only. The means are
    over the finished requests, whose share is the last column."""
    out = ["Past capacity: load = factor x vLLM V1's capacity", "",
           "| cell | factor | policy | mean JCT s | JCT x V1 | mean TTFT s | mean decode s | TTFT lost "
           "| SLO attainment | p99 TTFT s | finished |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        for f in OVERLOAD_FACTORS:
            for p in policies:
                s = res.get((c, p, f))
                if s is None:
                    continue
                ratio = _jct_x_v1(res, c, p, f)
                out.append(f"| {c} | {f:g} | {p} | {s['mean_jct_s']:.2f} | "
                           f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {s['mean_ttft_s']:.2f} | "
                           f"{s['mean_jct_s'] - s['mean_ttft_s']:.2f} | {s['ttft_lost_share']:.3f} | "
                           f"{s['slo_attainment']:.3f} | {s['p99_ttft_s']:.2f} | "
                           f"{s['finished_share']:.3f} |")
    return "\n".join(out)


def markdown(rows: list[dict], n: int, seconds: float, criterion: str = "SLO attainment >= 0.9") -> str:
    def f(v: float | None, d: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    counts = sorted({r["requests"] for r in rows if isinstance(r.get("requests"), int)})
    first = f"first {n} requests per trace"
    if counts and counts != [n]:  # a trace shorter than --requests: say how many each cell replayed
        first += f" ({counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "") + " in these cells)"
    out = [f"Scenario grid: {first}; capacity = largest rate scale with {criterion}; "
           f"({seconds:.0f} s on this machine)", "",
           "| cell | ceiling | policy | capacity | / ceiling | x V1 | x V0 | JCT x V1 @V1 cap | norm. lat. x V1 | SLO @V1 cap |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cap = capacity_number(r["capacity"]) if r["search"] == "found" else r["search"]
        policy = r["policy"] + (f" ({r['token_budget']})" if r.get("token_budget") else "")
        out.append(f"| {r['cell']} | {'n/a' if r['ceiling'] is None else capacity_number(r['ceiling'])} | {policy} | {cap} | {f(r['vs_ceiling'])} | "
                   f"{f(r['x_v1'])} | {f(r['x_v0'])} | {f(r['jct_x_v1'])} | {f(r['norm_latency_x_v1'])} | "
                   f"{f(r['attainment_at_v1_load'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    run_script(main)
