"""Predictor speed: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, same prompts, same run.

    python benchmarks/predictor_speed.py --model runs/model --n 1000 --threads 2

Prompts are ShareGPT request contexts (the conversation before each response), turned into the
model's input text by its input spec. For each backend it prints batched throughput (prompts/s,
tokenization included, length-sorted batches), single-prompt latency p50/p99 (one request at a
time, tokenization included), argmax agreement with torch, and the ratios to torch.

Without ``--model`` it measures an untrained all-MiniLM-L6-v2 10-bucket classifier (same
architecture and size, so the same speed; agreement is then about near-uniform logits and says
little). Without ``--bundle-fp32``/``--bundle-int8`` it exports them to a temporary folder.
Needs the ``[train]`` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sharegpt_v3" / "sharegpt_v3.jsonl.gz"


def load_requests(path: Path, n: int, seed: int = 0) -> list[list[dict]]:
    """A seeded sample of ``n`` request contexts: each row's conversation minus the response."""
    rng = random.Random(seed)
    picked: list[list[dict]] = []
    seen = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            conv = json.loads(line).get("conversation") or []
            if len(conv) < 2 or conv[-1].get("role") != "assistant":
                continue
            ctx = conv[:-1]
            seen += 1
            if len(picked) < n:  # reservoir sampling: bounded memory over the whole file
                picked.append(ctx)
            elif (j := rng.randrange(seen)) < n:
                picked[j] = ctx
    if not picked:
        sys.exit(f"{path}: no rows with a conversation ending in an assistant response")
    return picked


def untrained_model(out: Path, mode: str, max_length: int) -> Path:
    """all-MiniLM-L6-v2 with a fresh 10-bucket head, saved as ``rlpredict train`` would."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlpredict.buckets import BucketScheme
    from rlpredict.encoders import encoder_path
    from rlpredict.inputs import InputSpec
    from rlpredict.model_meta import ModelMeta

    src = encoder_path()
    scheme = BucketScheme.default()
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=scheme.n_buckets).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    ModelMeta(scheme, InputSpec(mode=mode, max_length=max_length), "llama3").save(out)
    return out


def percentile_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


class TorchBackend:
    """The trained model in torch, tokenized by its HF tokenizer, batched like the runtime."""

    name = "torch fp32"

    def __init__(self, model_dir: Path, batch_size: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlpredict.model_meta import ModelMeta

        self.torch = torch
        self.meta = ModelMeta.load(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.truncation_side = self.meta.input.truncation_side
        self.batch_size = batch_size

    def _text(self, request: list[dict]) -> str:
        from rlpredict.inputs import build_text

        return build_text(request, self.meta.input)

    def _logits(self, texts: list[str]) -> np.ndarray:
        enc = self.tok(texts, truncation=True, max_length=self.meta.input.max_length, padding=True,
                       return_tensors="pt", return_token_type_ids=False)
        with self.torch.inference_mode():
            return self.model(**enc).logits.float().numpy()

    def predict_many(self, requests: list[list[dict]]) -> np.ndarray:
        texts = [self._text(r) for r in requests]
        lengths = [len(x) for x in self.tok(texts, truncation=True, max_length=self.meta.input.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.meta.buckets.n_buckets), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s:s + self.batch_size]
            out[idx] = self._logits([texts[i] for i in idx])
        return out.argmax(1)

    def predict_one(self, request: list[dict]) -> None:
        self._logits([self._text(request)]).argmax(1)


class OrtBackend:
    def __init__(self, name: str, bundle: Path, threads: int, batch_size: int):
        from rlpredict.runtime import Predictor

        self.name = name
        self.p = Predictor.load(bundle, threads=threads, batch_size=batch_size)

    def predict_many(self, requests: list[list[dict]]) -> np.ndarray:
        return np.array([x.bucket for x in self.p.predict(requests)])

    def predict_one(self, request: list[dict]) -> None:
        self.p.predict_one(request)


def measure(backend, requests: list[list[dict]], latency_n: int) -> dict:
    backend.predict_many(requests[:16])  # warm-up
    t = time.perf_counter()
    pred = backend.predict_many(requests)
    thr = len(requests) / (time.perf_counter() - t)
    lat = []
    for r in requests[:latency_n]:
        t = time.perf_counter()
        backend.predict_one(r)
        lat.append(time.perf_counter() - t)
    return {"backend": backend.name, "prompts_per_s": thr, "p50_ms": percentile_ms(lat, 50),
            "p99_ms": percentile_ms(lat, 99), "pred": pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="Trained model folder (default: untrained MiniLM, same speed).")
    ap.add_argument("--mode", choices=["history", "last_user"], default="history",
                    help="Input mode of the untrained model (a trained model brings its own).")
    ap.add_argument("--max-length", type=int, default=128, help="Max tokens of the untrained model.")
    ap.add_argument("--bundle-fp32", type=Path, help="fp32 bundle of --model (default: export one).")
    ap.add_argument("--bundle-int8", type=Path, help="int8 bundle of --model (default: export one).")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ShareGPT JSONL(.gz) with 'conversation'.")
    ap.add_argument("--n", type=int, default=1000, help="Prompts for the batched throughput run.")
    ap.add_argument("--latency-n", type=int, default=200, help="Prompts for single-prompt latency.")
    ap.add_argument("--threads", type=int, default=2, help="Threads for torch and ONNX Runtime.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="Also print the rows as JSON.")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rlpredict-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    from rlpredict.export import export_bundle
    from rlpredict.inputs import build_text
    from rlpredict.model_meta import ModelMeta

    model = args.model or untrained_model(tmp / "untrained-minilm", args.mode, args.max_length)
    meta = ModelMeta.load(model)
    fp32, int8 = args.bundle_fp32, args.bundle_int8
    if fp32 is None:
        fp32 = tmp / "fp32"
        export_bundle(model, fp32)
    if int8 is None:
        int8 = tmp / "int8"
        export_bundle(model, int8, int8=True)

    requests = load_requests(args.data, args.n)
    texts = [build_text(r, meta.input) for r in requests]
    backends = [TorchBackend(model, args.batch_size),
                OrtBackend("ORT fp32", fp32, args.threads, args.batch_size),
                OrtBackend("ORT int8", int8, args.threads, args.batch_size)]
    lengths = [len(x) for x in backends[1].p.encode(texts)]
    rows = [measure(b, requests, min(args.latency_n, len(texts))) for b in backends]
    ref = rows[0]

    print(f"\nmodel: {'untrained MiniLM-L6 (speed only)' if args.model is None else model}; "
          f"{len(texts)} ShareGPT prompts, input '{meta.input.mode}' max {meta.input.max_length} tokens "
          f"(tokens: mean {np.mean(lengths):.0f}, p50 {np.median(lengths):.0f}, "
          f"{np.mean(np.asarray(lengths) >= meta.input.max_length):.0%} truncated); "
          f"{args.threads} threads, batch {args.batch_size}; latency over {min(args.latency_n, len(texts))} prompts\n")
    print("| backend | prompts/s (batched) | p50 ms (1 prompt) | p99 ms (1 prompt) | argmax agreement vs torch | throughput x torch | p50 latency x torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        agree = float((r["pred"] == ref["pred"]).mean())
        print(f"| {r['backend']} | {r['prompts_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{agree:.3f} | {r['prompts_per_s'] / ref['prompts_per_s']:.2f} | "
              f"{r['p50_ms'] / ref['p50_ms']:.2f} |")
    sizes = {name: (b / "model.onnx").stat().st_size / 2**20 for name, b in (("fp32", fp32), ("int8", int8))}
    print(f"\nmodel.onnx size: fp32 {sizes['fp32']:.1f} MiB, int8 {sizes['int8']:.1f} MiB")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "pred"} for r in rows], indent=2))


if __name__ == "__main__":
    main()
