"""Rebuild the small real-data samples bundled in ``rlpredict/samples/`` from ../shared/data.

    python training/make_samples.py --shared ../shared/data --force    # replaces the bundled ones

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

from rlpredict.cli_boundary import ScriptParser, arg_path, run_script
from rlpredict.outputs import check_file_output, write_bytes_atomic
from rlpredict.records import rows_with

OUT = Path(__file__).resolve().parents[1] / "rlpredict" / "samples"


def _messages(row: dict) -> tuple[str, str] | None:
    """A conversation is a list of objects with a string ``content``."""
    if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in row["conversation"]):
        return None
    return "conversation", "every message must be an object with a string 'content'"


def _h(s: str) -> float:
    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16) / 16**12


def _write(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        for r in rows:
            g.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    write_bytes_atomic(path, buf.getvalue())
    print(f"{path.name}: {len(rows)} rows, {len(buf.getvalue()) / 1024:.0f} KiB")


def main() -> None:
    ap = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=arg_path, required=True, help="the shared data folder, holding sharegpt_v3/ and alpaca_eval_outputs/")
    ap.add_argument("--force", action="store_true", help="replace the bundled samples")
    args = ap.parse_args()
    shared = Path(args.shared)
    if not shared.is_dir():  # the input first (was: "exists; pass --force" for a wrong --shared)
        ap.error(f"--shared: {shared} is not a folder")
    for name in ("sharegpt_sample.jsonl.gz", "alpaca_sample.jsonl.gz"):
        check_file_output(OUT / name, force=args.force, option="the bundled sample")

    sharegpt = [r for r in rows_with(shared / "sharegpt_v3" / "sharegpt_v3.jsonl.gz",
                                     {"conversation_id": str, "conversation": list}, _messages)
                if _h("s:" + r["conversation_id"]) < 0.012 and sum(len(m["content"]) for m in r["conversation"]) < 6000]
    alpaca = []
    for r in rows_with(shared / "alpaca_eval_outputs" / "alpaca_eval_outputs.jsonl.gz",
                       {"prompt_id": str, "model_dir": str}):
        if _h("a:" + r["prompt_id"]) < 0.04 and _h("g:" + r["model_dir"]) < 0.25:
            r.pop("conversation", None)  # prompt/response carry the same text
            alpaca.append(r)
    _write(OUT / "sharegpt_sample.jsonl.gz", sharegpt[:400])  # both read before either is written
    _write(OUT / "alpaca_sample.jsonl.gz", alpaca[:300])


if __name__ == "__main__":
    run_script(main)
