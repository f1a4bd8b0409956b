"""Annotate throughput and memory: the local path vs Ray Data with 1 and 2 workers, in one run.

    python benchmarks/annotate_scale.py --rows 10000

Builds ``trace-N.jsonl.gz`` (the bundled ShareGPT/AlpacaEval sample prompts, whole, cycled, each
with its row number; 1 in 100 rows bad), then annotates it with the shipped bundle, each
configuration in its own subprocess:

- ``local``: ``annotate_file`` with ``--threads`` = all cores (the baseline);
- ``ray-1``: a local Ray on all cores, 1 worker x all cores threads;
- ``ray-2``: 2 workers x (cores / 2) threads.

``seconds`` is the annotate call (for Ray: starting the actors and loading one predictor each,
reading, predicting, writing; Ray's own start is ``ray start s``). Peak memory is the largest
sum of PSS (proportional set size: shared pages split between the processes that map them, so
Ray's shared object store is counted once) over the subprocess and all its descendants (Ray's
GCS, raylet and workers), sampled every 0.1 s. Every Ray output is compared with the local one.
Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from rlpredict.serve.annotate import default_rejects_path

REPO = Path(__file__).resolve().parents[1]
TOOL = "benchmarks/annotate_scale.py"
CONFIGS = {"local": 0, "ray-1": 1, "ray-2": 2}


def build(path: Path, rows: int) -> None:
    from rlpredict.samples import SAMPLE_FILES

    prompts = []
    for sample in SAMPLE_FILES.values():
        with gzip.open(sample, "rt", encoding="utf-8") as f:
            prompts += [p for line in f if isinstance(p := json.loads(line).get("prompt"), str) and p.strip()]
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(rows):
            row = {"id": i, "arrival_time_s": i / 12} if i % 100 == 99 else \
                {"id": i, "prompt": f"{prompts[i % len(prompts)]} (request {i})", "arrival_time_s": i / 12}
            f.write(json.dumps(row) + "\n")
    mark_owned(path.parent, TOOL, [path.name])


def child(config: str, src: Path, dst: Path) -> dict:
    """One configuration, in this (fresh) process."""
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    if config == "local":
        from rlpredict.serve.annotate import annotate_file
        from rlpredict.serve.runtime import Predictor

        p = Predictor.load(None, threads=cores)
        t1 = time.perf_counter()
        s = annotate_file(p, src, dst, on_error="skip", force=True, owner=TOOL)  # into its own folder
        return {"start_s": t1 - t0, "seconds": time.perf_counter() - t1, "rows_in": s.rows_in,
                "rows_out": s.rows_out, "workers": 0, "threads": p.threads}
    import ray

    from rlpredict.serve.annotate_ray import annotate_path

    # a Ray of its own, never a `ray start` cluster on this machine (as `ray_session` starts one)
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t1 = time.perf_counter()
    workers = CONFIGS[config]
    s = annotate_path(src, dst, on_error="skip", num_workers=workers, threads=max(1, cores // workers),
                      force=True, owner=TOOL)
    seconds = time.perf_counter() - t1
    ray.shutdown()
    return {"start_s": t1 - t0, "seconds": seconds, "rows_in": s.rows_in, "rows_out": s.rows_out,
            "workers": s.workers, "threads": s.threads_per_worker}


# ---- memory of a process tree -------------------------------------------------------------------
def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def run_child(config: str, src: Path, dst: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--src", str(src), "--dst", str(dst)]
    peak = 0
    done = threading.Event()
    with child_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) as proc:

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.1):
                peak = max(peak, sum(_pss_kib(p) for p in _descendants(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, err = proc.communicate()
        finally:
            done.set()
            sampler.join()
    if proc.returncode:
        child_failed(config, proc.returncode, err)
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": peak / 1024}


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=arg_number(int, 1), default=10_000)
    ap.add_argument("--configs", type=arg_list(str), default=",".join(CONFIGS),
                    help="comma-separated, from " + ",".join(CONFIGS))
    ap.add_argument("--dir", type=arg_path, default=REPO / "runs" / "annotate_scale")
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--src", type=arg_path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=arg_path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.src, args.dst)))
        return
    if unknown := set(args.configs) - set(CONFIGS):
        ap.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    args.dir = resolved(args.dir)  # absolute: the configurations run as children in the repository's folder
    work_folder(args.dir, tool=TOOL, option="--dir")  # a new folder or this script's
    src = args.dir / f"trace-{args.rows}.jsonl.gz"
    if not src.exists():
        build(src, args.rows)
    results = {}
    for config in args.configs:
        dst = args.dir / f"trace-{args.rows}.{config}.jsonl.gz"
        mark_owned(args.dir, TOOL, [dst.name, default_rejects_path(dst).name])  # before the child writes them
        results[config] = r = run_child(config, src, dst)
        base = args.dir / f"trace-{args.rows}.local.jsonl.gz"
        r["same"] = (gzip.decompress(dst.read_bytes()) == gzip.decompress(base.read_bytes())
                     if config != "local" and base.exists() else None)
        print(f"{config}: {r}", file=sys.stderr, flush=True)
    base_rate = results["local"]["rows_in"] / results["local"]["seconds"] if "local" in results else None
    print(f"\n{args.rows:,} rows, {os.cpu_count()} cores\n")
    print("| engine | workers x threads | seconds | rows/s | vs local | peak PSS MiB | start s | output = local |")
    print("|---|---|---|---|---|---|---|---|")
    for config, r in results.items():
        rate = r["rows_in"] / r["seconds"]
        ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
        shape = f"{r['workers']} x {r['threads']}" if r["workers"] else f"1 process x {r['threads']}"
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        print(f"| {config} | {shape} | {r['seconds']:.1f} | {rate:,.0f} | {ratio} | {r['peak_mib']:,.0f} | "
              f"{r['start_s']:.1f} | {same} |")


if __name__ == "__main__":
    run_script(main)
