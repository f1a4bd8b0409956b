"""Check the roofline cost model against DistServe's measured vLLM iteration latencies.

DistServe (LLMServe/DistServe, simdistserve/estimators) fitted closed forms to vLLM on
A100-80GB, in ms: prefill = a + b*sum(len) + c*sum(len^2); decode = a + b*sum(ctx) + c*batch
(``decoding_smallbs`` below the batch threshold, ``decoding_largebs`` from it on). This script
prints ours vs theirs over a grid of batch shapes, with the relative error per row and overall.

    python benchmarks/sim_cost_model_check.py --shared ../shared/data          # compare the shipped profile
    python benchmarks/sim_cost_model_check.py --shared ../shared/data --fit    # least-squares fit of the efficiencies
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecoserve_sched.cost_model import FIT_FIELDS, CostModel, fit_profile, load_profile  # noqa: E402
from rlpredict.cli_boundary import ScriptParser, add_shared_input, run_script  # noqa: E402

PREFILL_GRID = [(b, n) for b in (1, 2, 4, 8) for n in (128, 256, 512, 1024)]
DECODE_GRID = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) for c in (256, 512, 1024, 2048)]


def anchor_rows(coef: dict) -> list[tuple[str, tuple[int, int, int, int], float]]:
    """(label, cost-model inputs, measured seconds) for every grid point."""
    rows = []
    a, b, c = coef["prefill"]
    for bs, n in PREFILL_GRID:
        ms = a + b * bs * n + c * bs * n * n
        rows.append((f"prefill {bs}x{n}", (bs * n, bs * n * n, 0, 0), ms / 1e3))
    for bs, ctx in DECODE_GRID:
        key = "decoding_smallbs" if bs < coef["decoding_large_small_bs_threshold"] else "decoding_largebs"
        a, b, c = coef[key]
        ms = a + b * bs * ctx + c * bs
        rows.append((f"decode {bs}x{ctx}", (0, 0, bs, bs * ctx), ms / 1e3))
    return rows


def compute_time(m: CostModel, x: tuple[int, int, int, int]) -> float:
    p, pc, d, dc = x
    flops = (m.flops_per_token * (p + d) + m.flops_per_logit * d + m.flops_per_prefill_ctx * pc
             + m.flops_per_decode_ctx * dc)
    return flops / (m.spec["gpu"]["peak_flops"] * m.spec["efficiency"]["mfu"])


def memory_time(m: CostModel, x: tuple[int, int, int, int]) -> float:
    nbytes = m.weight_bytes_read + m.kv_bytes_per_token * (x[0] + x[3])
    return nbytes / (m.spec["gpu"]["hbm_bw"] * m.spec["efficiency"]["mbu"])


def main() -> int:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    profiles_input = add_shared_input(ap, "--profiles-dir", "distserve_a100_profiles",
                                      "folder with profiler-a100-80g.<engine>.json")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "distserve"],
                    help="which DistServe measurement to compare against")
    ap.add_argument("--profile", default="opt-13b-a100-80gb", help="cost-model profile name or JSON path")
    ap.add_argument("--fit", action="store_true",
                    help="fit mfu, mbu and the overheads to the anchor grid (least squares on "
                         "relative error), print them as JSON, and compare with the fitted model")
    ap.add_argument("--cv", action="store_true",
                    help="with --fit: also fit on every other shape and score the rest, both ways "
                         "(a held-out error for the in-sample fit)")
    args = ap.parse_args()
    profiles_input(args)
    if args.cv and not args.fit:
        ap.error("--cv needs --fit")

    path = args.profiles_dir / f"profiler-a100-80g.{args.engine}.json"
    try:
        rows = anchor_rows(json.loads(path.read_text())["facebook/opt-13b"]["1"])  # OPT-13B, tensor parallel 1
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: not a DistServe profile with OPT-13B at tensor parallel 1 "
                         f"({type(e).__name__}: {e})") from None
    if bad := [label for label, _, y in rows if not y > 0]:
        raise ValueError(f"{path}: the profile gives {bad[0]} no positive time")
    model = load_profile(args.profile)
    if args.cv:
        for half in (0, 1):  # fit on rows i % 2 == half, score the others
            fit = fit_profile([(*x, y) for i, (_, x, y) in enumerate(rows) if i % 2 == half], model, "cv")
            err = [abs(fit.iteration_time(*x) / y - 1) for i, (_, x, y) in enumerate(rows) if i % 2 != half]
            print(f"fit on {'even' if half == 0 else 'odd'} shapes, held-out {'odd' if half == 0 else 'even'}: "
                  f"mean |error| {100 * sum(err) / len(err):.1f}%, max {100 * max(err):.1f}%")
    if args.fit:
        model = fit_profile([(*x, y) for _, x, y in rows], model, f"{model.name}-fit")
        print(json.dumps({f: round(model.spec["efficiency"][f], 6) for f in FIT_FIELDS}, indent=2))
        print(json.dumps(model.fit_error))

    print(f"\n{model.name} vs DistServe-measured {args.engine} (OPT-13B, A100-80GB, TP=1)\n")
    print("| batch shape | measured ms | roofline ms | error % | bound |")
    print("|---|---:|---:|---:|---|")
    errs: dict[str, list[float]] = {"prefill": [], "decode": []}
    for label, x, y in rows:
        t = model.iteration_time(*x)
        err = 100.0 * (t - y) / y
        errs[label.split()[0]].append(abs(err))
        bound = "compute" if compute_time(model, x) > memory_time(model, x) else "memory"
        print(f"| {label} | {y * 1e3:.1f} | {t * 1e3:.1f} | {err:+.1f} | {bound} |")
    allerr = errs["prefill"] + errs["decode"]
    for k, v in errs.items():
        print(f"\n{k}: mean |error| {sum(v) / len(v):.1f}%, max {max(v):.1f}%", end="")
    print(f"\noverall: mean |error| {sum(allerr) / len(allerr):.1f}% over {len(allerr)} shapes, "
          f"max {max(allerr):.1f}%")
    return 0


if __name__ == "__main__":
    run_script(main)
