"""Large-trace benchmark: build, annotate and simulate a request trace of a million rows.

    python benchmarks/large_trace.py --rows 100000,1000000 --stages annotate,simulate

Stages, each in its own subprocess (peak RSS = that process's ``ru_maxrss``):

- ``build``: writes ``trace-N-rateR-seedS.jsonl.gz`` row by row (streaming): ``prompt``,
  ``arrival_time_s`` (Poisson, ``--rate`` requests/s), ``input_tokens``, ``output_tokens``
  (seeded log-normal). Runs first whenever a stage needs the file and it is missing; a rebuild
  removes the file's annotated copy (it annotated the old rows).
- ``annotate``: ``rlpredict.serve.annotate.annotate_file`` with the shipped bundle, streaming, into
  ``trace-N-rateR-seedS.annotated.jsonl.gz``.
- ``simulate``: ``read_trace`` of the annotated trace (the raw one if it was not annotated, with
  ``confusion`` predictions), then ``simulator.run`` with each policy of ``--policies``.

The encoder runs ~350 prompts/s on 2 cores for ~40-token prompts (~50 minutes for 1M real
prompts), so prompts are SHORT: the first 3-8 words of the bundled sample prompts plus the row
number, about 8-16 encoder tokens. Prints one Markdown table: rows, seconds, rows/s, peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rlpredict.cli_boundary import (
    ScriptParser,
    arg_list,
    arg_number,
    arg_path,
    child_failed,
    child_process,
    run_script,
)
from rlpredict.outputs import atomic_path, mark_owned, resolved, work_folder
from rlpredict.serve.runtime import usable_cores

REPO = Path(__file__).resolve().parents[1]
TOOL = "benchmarks/large_trace.py"
STAGES = ("build", "annotate", "simulate")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _prompt_stems() -> list[str]:
    """Short prompt stems from the bundled real samples (ShareGPT + AlpacaEval)."""
    from rlpredict.samples import SAMPLE_FILES

    stems = []
    for path in SAMPLE_FILES.values():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                words = str(json.loads(line).get("prompt") or "").split()
                if words:
                    stems.append(words)
    return [" ".join(w[:3 + i % 6]) for i, w in enumerate(stems)]


def build(path: Path, rows: int, rate: float, seed: int) -> dict:
    """Write the trace in blocks of 10k rows: memory does not grow with ``rows``."""
    stems = _prompt_stems()
    rng = np.random.default_rng(seed)
    t, done = 0.0, 0
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        while done < rows:
            n = min(10_000, rows - done)
            arrivals = t + np.cumsum(rng.exponential(1.0 / rate, n))
            t = float(arrivals[-1])
            inp = np.clip(rng.lognormal(6.0, 0.9, n), 8, 8000).astype(int)
            out = np.clip(rng.lognormal(5.0, 1.0, n), 1, 4000).astype(int)
            f.writelines(
                json.dumps({"id": done + k, "prompt": f"{stems[(done + k) % len(stems)]} (request {done + k})",
                            "arrival_time_s": round(float(a), 4), "input_tokens": int(i),
                            "output_tokens": int(o)}) + "\n"
                for k, (a, i, o) in enumerate(zip(arrivals, inp, out, strict=True)))
            done += n
    return {"rows": rows}


def annotate(src: Path, dst: Path, threads: int) -> dict:
    from rlpredict.serve.annotate import annotate_file
    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(threads=threads)
    s = annotate_file(p, src, dst, force=True, owner=TOOL)  # the folder is this script's (``work_folder``)
    sample = p.encode(p.texts(_first_prompts(src, 2000)))
    return {"rows": s.rows_in, "rejected": s.rows_rejected,
            "tokens_per_prompt": round(float(np.mean([len(e) for e in sample])), 1)}


def _first_prompts(path: Path, n: int) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["prompt"])
            if len(out) >= n:
                break
    return out


def simulate(path: Path, policy: str, profile: str) -> dict:
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.metrics import summarize
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run
    from ecoserve_sched.trace import read_trace

    t0 = time.perf_counter()
    trace = read_trace(path, keep_prompts=False)  # no predictor reads them here
    read_s = time.perf_counter() - t0
    read_mib = _peak_mib()
    slo = SLO(5.0, 0.2)
    res = run(trace, policy, load_profile(profile), slo=slo,
              predictions="annotated" if trace.has_rl else "confusion")
    s = summarize(res, slo)
    return {"rows": len(trace), "read_s": round(read_s, 1), "read_peak_mib": round(read_mib),
            "sim_s": round(res.wall_s, 1), "log_rows": len(res.log), "finished": s["finished"],
            "p99_ttft_s": round(s["p99_ttft_s"], 2), "slo": round(s["slo_attainment"], 3),
            "predictions": res.predictions.split(" ")[0]}


def _stage(args: argparse.Namespace) -> None:
    """Run one stage in this process and print its result as JSON (the child side)."""
    t0 = time.perf_counter()
    start_mib = _peak_mib()
    path = Path(args.path)
    if args.stage == "build":
        out = build(path, args.n, args.rate, args.seed)
    elif args.stage == "annotate":
        out = annotate(path, annotated_path(path), args.threads)
    else:
        out = simulate(path, args.policy, args.profile)
    out.update(seconds=time.perf_counter() - t0, peak_mib=_peak_mib(), start_mib=start_mib)
    print(json.dumps(out))


def annotated_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".jsonl.gz", ".annotated.jsonl.gz"))


def _child(stage: str, path: Path, args: argparse.Namespace, n: int = 0, policy: str = "") -> dict:
    cmd = [sys.executable, __file__, "--_stage", stage, "--_path", str(path), "--_n", str(n),
           "--_policy", policy, "--rate", str(args.rate), "--seed", str(args.seed),
           "--threads", str(args.threads), "--profile", args.profile]
    with child_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) as proc:
        out, err = proc.communicate()
    if proc.returncode:
        child_failed(f"stage {stage}{' ' + policy if policy else ''}", proc.returncode, err)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=arg_list(arg_number(int, 1)), default="1000000",
                    help="trace sizes, comma-separated (e.g. 100000,1000000)")
    ap.add_argument("--stages", type=arg_list(str), default="annotate,simulate",
                    help="comma-separated: build, annotate, simulate")
    ap.add_argument("--policies", type=arg_list(str), default="vllm,ecoserve", help="policies for the simulate stage")
    ap.add_argument("--profile", default="llama3-8b-h100-80gb", help="cost-model profile")
    ap.add_argument("--rate", type=arg_number(float, 0, low_open=True), default=12.0, help="arrival rate, requests/s")
    ap.add_argument("--threads", type=arg_number(int, 1, usable_cores()), default=min(2, usable_cores()),
                    help="ONNX Runtime threads for annotate, at most the usable cores")  # (was: any, capped unsaid)
    ap.add_argument("--seed", type=arg_number(int, 0), default=0)
    ap.add_argument("--out", type=arg_path, default=str(REPO / "runs" / "large_trace"), help="folder for the traces")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    ap.add_argument("--_path", help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_policy", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stage:
        args.stage, args.path, args.n, args.policy = args._stage, args._path, args._n, args._policy
        _stage(args)
        return
    stages = args.stages
    if unknown := set(stages) - set(STAGES):
        ap.error(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    # absolute: the stages run as children in the repository's folder
    out_dir = work_folder(resolved(args.out), tool=TOOL, option="--out")  # a new folder or this script's
    if "simulate" in stages:  # a bad name: one line now, not after the build
        from ecoserve_sched.cost_model import load_profile
        from ecoserve_sched.policies import get_policy

        cost = load_profile(args.profile)
        for p in args.policies:
            get_policy(p, cost)
    print(f"## Large trace: {args.rate:g} requests/s, profile {args.profile}, annotate threads {args.threads}\n")
    print("Prompts are short on purpose: the first 3-8 words of the bundled sample prompts plus the "
          "row number, ~16 encoder tokens (real ~40-token prompts annotate ~3x slower).\n")
    print("| rows | stage | seconds | rows/s | peak RSS MiB | start RSS MiB | notes |")
    print("|---|---|---|---|---|---|---|")
    for n in args.rows:
        # the settings in the name: a run at another --rate or --seed never reads this one's rows
        trace = out_dir / f"trace-{n}-rate{args.rate:.17g}-seed{args.seed}.jsonl.gz"  # every digit of the rate
        mark_owned(out_dir, TOOL, [trace.name, annotated_path(trace).name])  # before a child writes them
        todo = [("build", "")] if "build" in stages or not trace.exists() else []
        if todo:
            annotated_path(trace).unlink(missing_ok=True)  # it annotated the rows a rebuild replaces
        if "annotate" in stages:
            todo.append(("annotate", ""))
        if "simulate" in stages:
            todo += [("simulate", p) for p in args.policies]
        for stage, policy in todo:
            src = annotated_path(trace) if stage == "simulate" and annotated_path(trace).exists() else trace
            r = _child(stage, src, args, n, policy)
            notes = {k: v for k, v in r.items() if k not in ("rows", "seconds", "peak_mib", "start_mib")}
            label = f"{stage} {policy}".strip()
            print(f"| {r['rows']:,} | {label} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
                  f"{r['peak_mib']:,.0f} | {r['start_mib']:,.0f} | "
                  f"{', '.join(f'{k}={v}' for k, v in notes.items())} |", flush=True)


if __name__ == "__main__":
    run_script(main)
