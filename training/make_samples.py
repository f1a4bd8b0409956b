"""Rebuild the small real-data samples bundled in ``rlpredict/samples/`` from ../shared/data.

    python training/make_samples.py --shared ../shared/data

Deterministic: picks whole conversations (ShareGPT) / whole prompts (AlpacaEval) by a hash of
their id, keeps rows whose context is short, and writes gzip JSONL with mtime 0.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "rlpredict" / "samples"


def _h(s: str) -> float:
    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16) / 16**12


def _write(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        for r in rows:
            g.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    path.write_bytes(buf.getvalue())
    print(f"{path.name}: {len(rows)} rows, {len(buf.getvalue()) / 1024:.0f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared/data", help="folder holding sharegpt_v3/ and alpaca_eval_outputs/")
    args = ap.parse_args()
    shared = Path(args.shared)

    rows = []
    with gzip.open(shared / "sharegpt_v3" / "sharegpt_v3.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if _h("s:" + r["conversation_id"]) < 0.012 and sum(len(m["content"]) for m in r["conversation"]) < 6000:
                rows.append(r)
    _write(OUT / "sharegpt_sample.jsonl.gz", rows[:400])

    rows = []
    with gzip.open(shared / "alpaca_eval_outputs" / "alpaca_eval_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if _h("a:" + r["prompt_id"]) < 0.04 and _h("g:" + r["model_dir"]) < 0.25:
                r.pop("conversation", None)  # prompt/response carry the same text
                rows.append(r)
    _write(OUT / "alpaca_sample.jsonl.gz", rows[:300])


if __name__ == "__main__":
    main()
