"""Predictor speed and determinism: the old batched runtime vs the runtime, same prompts, same run.

    python benchmarks/predictor_speed.py --shared ../shared/data --bundle models/rl-minilm-l6-llama3 --n 1000 --threads 2
    python benchmarks/predictor_speed.py --shared ../shared/data --model runs/model --n 1000 --threads 2   # + torch, fp32

Prompts are ShareGPT request contexts (the conversation before each response), turned into the
model's input text by its input spec. For each ONNX bundle two runtimes are measured:

- old: the runtime before per-prompt inference (an inline copy below): length-sorted batches of
  ``--batch-size`` padded to their longest prompt, one session with ``--threads`` intra-op
  threads; a lone prompt runs as a batch of one;
- new: ``rlpredict.serve.runtime.Predictor`` (each prompt alone, spread over ``--threads`` workers).

Printed per runtime: bulk throughput (prompts/s, tokenization included; the best and the
median of ``--repeat`` rounds, old and new interleaved: on a shared machine the best is the
least disturbed), single-prompt latency p50/p99 (``predict_one``, tokenization included, old
and new alternating in blocks of 25 prompts), argmax agreement with the old
runtime (and with torch), and the fraction of prompts whose prediction differs between batch
size 1 (each prompt alone) and 32 (bulk calls of 32 prompts): the bucket, and any of bucket,
probabilities, point and reservation. ``--labelled FILE`` (chat rows with responses, e.g. the
held-out rows of ``training/heldout_rows.py``) adds bucket accuracy on those prompts, and
``--fp32-reference`` (int8 bundles, needs ``onnx``) the accuracy of the bundle's weights
dequantized to fp32, a stand-in for the fp32 model.

``--long-prompt-mb 10`` adds, per runtime, the time and peak memory of ``predict_one`` on one
prompt of that size (each in a fresh process; ``--long-kinds``: English prose, CJK without
spaces, a run of spaces).

``--check-cut`` checks that cutting long texts before tokenizing (``TextEncoder``) gives the ids
of tokenizing them whole, on every request context of ``--data``, in both input modes.

``--bundle`` needs only the runtime. Without it, ``--model`` (or, without that, an untrained
all-MiniLM-L6-v2 10-bucket classifier: same size, same speed) is exported to fp32 and int8
bundles and torch is measured too (the ``[train]`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rlpredict.cli_boundary import (
    ScriptParser,
    add_shared_input,
    arg_list,
    arg_number,
    arg_path,
    run_script,
)
from rlpredict.serve.runtime import usable_cores

REPO = Path(__file__).resolve().parents[1]


def load_requests(path: Path, n: int, seed: int = 0) -> list[list[dict]]:
    """A seeded sample of ``n`` request contexts: each row's conversation minus the response."""
    rng = random.Random(seed)
    picked: list[list[dict]] = []
    seen = 0
    from rlpredict.records import RecordError, iter_rows

    for _, row in iter_rows(path):
        if isinstance(row, RecordError):
            raise row
        conv = (row.get("conversation") if isinstance(row, dict) else None) or []
        if not isinstance(conv, list) or len(conv) < 2 or not isinstance(conv[-1], dict) \
                or conv[-1].get("role") != "assistant":
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
    from rlpredict.inputs import InputSpec
    from rlpredict.train.encoders import encoder_path
    from rlpredict.train.model_meta import ModelMeta

    src = encoder_path()
    scheme = BucketScheme.default()
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=scheme.n_buckets).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    ModelMeta(scheme, InputSpec(mode=mode, max_length=max_length), "llama3").save(out)
    return out


def _load() -> float:
    """The 1-minute load average (other work on the cores slows every row)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def percentile_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


# ---- the runtimes ------------------------------------------------------------------------------
class OldRuntime:
    """The runtime as it was before per-prompt inference (rlpredict 0.1.0), kept here to compare:
    length-sorted batches padded per batch into reused buffers, one session whose intra-op threads
    all work on each batch, a lock around batches; a lone prompt is a batch of one."""

    def __init__(self, bundle: Path, threads: int, batch_size: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from rlpredict.serve.runtime import Predictor

        self.p = Predictor.load(bundle, threads=1)  # texts() and from_logits() only
        spec = self.p.input_spec
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.p.bundle.model_path), opts, providers=["CPUExecutionProvider"])
        self.tok = Tokenizer.from_file(str(self.p.bundle.tokenizer_path))
        self.tok.no_padding()
        self.tok.enable_truncation(spec.max_length, direction=spec.truncation_side)
        self.batch_size = batch_size
        n = batch_size * spec.max_length
        self._ids, self._mask = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        self._lock = threading.Lock()

    def logits(self, requests: Sequence, generators: Sequence | None = None) -> np.ndarray:
        encoded = [e.ids for e in self.tok.encode_batch(self.p.texts(requests, generators))]
        n = len(encoded)
        out = np.empty((n, self.p.scheme.n_buckets), dtype=np.float32)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        with self._lock:
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx] = self._run([encoded[i] for i in idx], int(lengths[idx[-1]]))
        return out

    def _run(self, batch: list[Sequence[int]], width: int) -> np.ndarray:
        b = len(batch)
        ids = self._ids[:b * width].reshape(b, width)
        mask = self._mask[:b * width].reshape(b, width)
        ids.fill(self.p.bundle.pad_token_id)
        mask.fill(0)
        for row, e in enumerate(batch):
            ids[row, :len(e)] = e
            mask[row, :len(e)] = 1
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def predict_arrays(self, requests: Sequence, generators: Sequence | None = None):
        return self.p.from_logits(self.logits(requests, generators))

    def predict_one(self, request) -> tuple:
        ids = self.tok.encode(self.p.texts([request])[0]).ids
        with self._lock:
            logits = self._run([ids], len(ids))
        return _rows(self.p.from_logits(logits))[0]


class NewRuntime:
    def __init__(self, bundle: Path, threads: int):
        from rlpredict.serve.runtime import Predictor

        self.p = Predictor.load(bundle, threads=threads)

    def predict_arrays(self, requests: Sequence, generators: Sequence | None = None):
        return self.p.predict_arrays(requests, generators)

    def predict_one(self, request) -> tuple:
        x = self.p.predict_one(request)
        return x.bucket, x.probs.tobytes(), x.pred_tokens, x.reserve_tokens


class TorchRuntime:
    """The trained model in torch, tokenized by its HF tokenizer, in length-sorted batches."""

    def __init__(self, model_dir: Path, batch_size: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlpredict.train.model_meta import ModelMeta

        self.torch = torch
        self.meta = ModelMeta.load(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.truncation_side = self.meta.input.truncation_side
        self.batch_size = batch_size

    def _logits(self, texts: list[str]) -> np.ndarray:
        enc = self.tok(texts, truncation=True, max_length=self.meta.input.max_length, padding=True,
                       return_tensors="pt", return_token_type_ids=False)
        with self.torch.inference_mode():
            return self.model(**enc).logits.float().numpy()

    def argmax(self, requests: Sequence) -> np.ndarray:
        from rlpredict.inputs import build_text

        texts = [build_text(r, self.meta.input) for r in requests]
        lengths = [len(x) for x in self.tok(texts, truncation=True, max_length=self.meta.input.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.meta.buckets.n_buckets), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s:s + self.batch_size]
            out[idx] = self._logits([texts[i] for i in idx])
        return out.argmax(1)

    def one(self, request) -> None:
        from rlpredict.inputs import build_text

        self._logits([build_text(request, self.meta.input)])


def _rows(a) -> list[tuple]:
    """Per-prompt (bucket, probability bytes, point, reservation) of PredictionArrays."""
    return [(int(b), p.tobytes(), int(t), int(r))
            for b, p, t, r in zip(a.bucket, a.probs, a.pred_tokens, a.reserve_tokens, strict=True)]


def _in_chunks(predict: Callable, requests: Sequence, size: int) -> list[tuple]:
    return [row for s in range(0, len(requests), size) for row in _rows(predict(requests[s:s + size]))]


# ---- measuring ---------------------------------------------------------------------------------
def compare(bundle: Path, requests: list, args: argparse.Namespace) -> list[dict]:
    """Old vs new runtime on one bundle: throughput, latency, agreement, batch dependence."""
    old, new = OldRuntime(bundle, args.threads, args.batch_size), NewRuntime(bundle, args.threads)
    rts = {"old": old, "new": new}
    for rt in rts.values():
        rt.predict_arrays(requests[:64])  # warm-up
    lat: dict[str, list[float]] = {k: [] for k in rts}
    timed = requests[:args.latency_n]
    for s in range(0, len(timed), 25):  # blocks: one runtime's spinning threads do not slow the other's
        for k, rt in rts.items():
            for r in timed[s:s + 25]:
                t = time.perf_counter()
                rt.predict_one(r)
                lat[k].append(time.perf_counter() - t)
    rates: dict[str, list[float]] = {k: [] for k in rts}
    bulk: dict[str, list[tuple]] = {}
    for _ in range(args.repeat):
        for k, rt in rts.items():
            t = time.perf_counter()
            bulk[k] = _rows(rt.predict_arrays(requests))
            rates[k].append(len(requests) / (time.perf_counter() - t))
    rows = []
    for k, rt in rts.items():
        alone = [rt.predict_one(r) for r in requests]
        by32 = _in_chunks(rt.predict_arrays, requests, 32)
        rows.append({
            "bundle": bundle.name, "runtime": k, "prompts_per_s": max(rates[k]),
            "prompts_per_s_median": statistics.median(rates[k]),
            "prompts_per_s_rounds": [round(x) for x in rates[k]],
            "p50_ms": percentile_ms(lat[k], 50), "p99_ms": percentile_ms(lat[k], 99),
            "argmax_vs_old": float(np.mean([a[0] == b[0] for a, b in zip(bulk[k], bulk["old"], strict=True)])),
            "bucket_differs_b1_b32": float(np.mean([a[0] != b[0] for a, b in zip(alone, by32, strict=True)])),
            "any_differs_b1_b32": float(np.mean([a != b for a, b in zip(alone, by32, strict=True)])),
            "any_differs_b1_bulk": float(np.mean([a != b for a, b in zip(alone, bulk[k], strict=True)])),
            "buckets": np.array([x[0] for x in bulk[k]]),
        })
    if args.labelled:
        labelled_accuracy(rows, rts, bundle, args)
    return rows


def lexical_cost(bundle: Path, requests: list, args: argparse.Namespace) -> None:
    """For a bundle with a lexical head (``rlpredict stack``): what the head adds to one prompt.
    The encoder path (text, tokenize, the lone ONNX run) and the head (TF-IDF + stacker) are
    timed on the same prompts, alternating, so machine load hits both alike."""
    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(bundle, threads=args.threads)
    head = p.bundle.lexical
    if head is None:
        return
    enc_ms, head_ms = [], []
    for r in requests:
        t0 = time.perf_counter()
        texts = p.texts([r])
        logits = p._run(p._lone, p.encoder.encode(texts[0]))[None]
        t1 = time.perf_counter()
        head.stack(logits, texts)
        t2 = time.perf_counter()
        enc_ms.append(t1 - t0)
        head_ms.append(t2 - t1)
    e50, h50 = percentile_ms(enc_ms, 50), percentile_ms(head_ms, 50)
    print(f"\nLexical head of {bundle.name} ({len(head.vocabulary)} terms), {len(requests)} prompts one at a time: "
          f"encoder path p50 {e50:.2f} ms / p99 {percentile_ms(enc_ms, 99):.2f} ms; head (TF-IDF + stacker) "
          f"p50 {h50:.3f} ms / p99 {percentile_ms(head_ms, 99):.3f} ms = {h50 / e50:.1%} of the encoder's p50 "
          "(the 'old' runtime above has no lexical head: its agreement column does not apply)")


def labelled_accuracy(rows: list[dict], rts: dict, bundle: Path, args: argparse.Namespace) -> None:
    """Bucket accuracy of each runtime (and of the fp32 reference) on labelled prompts."""
    from rlpredict.data import attach_rl, load_samples
    from rlpredict.serve.runtime import Predictor

    p = rts["new"].p
    samples, load = load_samples([str(args.labelled)], on_error="skip")
    if load.n_skipped:  # counted and shown, as every reader of logs does
        print("\n".join(load.lines()), file=sys.stderr)
    attach_rl(samples, p.bundle.rl_tokenizer)
    samples = [s for s in samples if s.rl_tokens is not None]
    if not samples:
        raise ValueError(f"{args.labelled}: no chat rows with a response (--labelled needs them)")
    labels = p.scheme.bucket_of([s.rl_tokens for s in samples])
    gens = [s.generator for s in samples]
    for row, rt in zip(rows, rts.values(), strict=True):
        row["accuracy"] = float(np.mean(rt.predict_arrays([s.messages for s in samples], gens).bucket == labels))
        row["labelled"] = len(samples)
    if args.fp32_reference and p.bundle.precision == "int8":
        with tempfile.TemporaryDirectory(prefix="rlpredict-fp32ref-") as tmp:
            ref = Predictor.load(dequantized_bundle(bundle, Path(tmp)), threads=args.threads)
            acc = float(np.mean(ref.predict_arrays([s.messages for s in samples], gens).bucket == labels))
        for row in rows:
            row["fp32_reference_accuracy"] = acc


def dequantized_bundle(bundle: Path, out: Path) -> Path:
    """A copy of an int8 bundle whose MatMulInteger weights are dequantized to fp32 MatMuls: the
    int8 model without activation quantization (an fp32 stand-in when the fp32 model is gone)."""
    import onnx
    from onnx import helper, numpy_helper

    from rlpredict.serve.bundle import MODEL_FILE, load_bundle, write_manifest

    b = load_bundle(bundle)
    model = onnx.load(str(b.model_path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def const(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name] if name in inits else made[name].attribute[0].t)

    replace, drop = {}, set()
    for n in g.node:
        if n.op_type != "MatMulInteger":
            continue
        a_q, w_q, _, w_zp = n.input
        quant = made[a_q]  # DynamicQuantizeLinear(x) -> x_q, x_scale, x_zp
        (cast,) = users[n.output[0]]
        (mul,) = users[cast.output[0]]  # Mul(Cast(MatMulInteger), x_scale * w_scale)
        scales = made[next(i for i in mul.input if i != cast.output[0])]
        w_scale = next(i for i in scales.input if i != quant.output[1])
        w = (const(w_q).astype(np.float32) - const(w_zp).astype(np.float32)) * const(w_scale).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(w, w_q + "_fp32"))
        replace[id(mul)] = helper.make_node("MatMul", [quant.input[0], w_q + "_fp32"], [mul.output[0]])
        drop.update((id(n), id(cast)))
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)  # the DynamicQuantizeLinear nodes left unused are pruned by ORT
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / MODEL_FILE))
    # every other file the bundle lists (the tokenizer, a stacked bundle's lexical head: was
    # left out, and loading the copy failed)
    others = [n for n in b.manifest["files"] if n != b.model_path.name]
    for name in others:
        shutil.copyfile(b.path / name, out / name)
    write_manifest(out, {**b.manifest, "model": {**b.manifest["model"], "file": MODEL_FILE,
                                                 "precision": "fp32 (dequantized int8)"},
                         "files": [MODEL_FILE, *others]})
    return out


def measure_torch(model: Path, requests: list, args: argparse.Namespace) -> dict:
    t = TorchRuntime(model, args.batch_size)
    t.argmax(requests[:16])
    start = time.perf_counter()
    pred = t.argmax(requests)
    rate = len(requests) / (time.perf_counter() - start)
    lat = []
    for r in requests[:args.latency_n]:
        start = time.perf_counter()
        t.one(r)
        lat.append(time.perf_counter() - start)
    return {"bundle": "-", "runtime": "torch fp32", "prompts_per_s": rate, "prompts_per_s_median": rate,
            "p50_ms": percentile_ms(lat, 50),
            "p99_ms": percentile_ms(lat, 99), "buckets": pred}


LONG_KINDS = ("prose", "cjk", "spaces")


def long_text(kind: str, chars: int) -> str:
    """A prompt of ``chars`` characters: English prose, CJK without spaces, or spaces."""
    if kind == "prose":
        line = "The compiler reads source code, checks its types and emits machine code. "
        return (line * (chars // len(line) + 1))[:chars]
    if kind == "cjk":
        return ("你好世界" * (chars // 4 + 1))[:chars]
    if kind == "spaces":
        return " " * (chars - 5) + "hello"
    raise ValueError(f"unknown long prompt kind {kind!r}")


_LONG = """
import resource, sys, time
sys.path.insert(0, {here!r})
from predictor_speed import NewRuntime, OldRuntime, long_text
rt = OldRuntime({bundle!r}, {threads}, 32) if {which!r} == "old" else NewRuntime({bundle!r}, {threads})
text = long_text({kind!r}, {chars})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
rt.predict_one(text)
print(time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def long_prompts(bundle: Path, args: argparse.Namespace) -> list[dict]:
    """``predict_one`` on one huge prompt, old and new runtime, each in a fresh process."""
    import subprocess

    rows = []
    for kind in args.long_kinds:
        for which in ("old", "new"):
            code = _LONG.format(here=str(Path(__file__).parent), bundle=str(bundle), threads=args.threads,
                                which=which, kind=kind, chars=int(args.long_prompt_mb * 1e6))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
            rows.append({"bundle": bundle.name, "prompt": f"{args.long_prompt_mb:g} MB {kind}", "runtime": which,
                         "seconds": float(out[0]), "peak_rss_growth_mib": float(out[1])})
    return rows


def check_cut(bundle: Path, data: Path) -> None:
    """``TextEncoder`` ids == whole-text ids for every request context of ``data``, both modes."""
    from tokenizers import Tokenizer

    from rlpredict.inputs import InputSpec, build_text
    from rlpredict.serve.bundle import load_bundle
    from rlpredict.serve.runtime import TextEncoder

    b = load_bundle(bundle)
    contexts = load_requests(data, 10**9)
    for mode in ("last_user", "history"):
        spec = InputSpec(mode=mode, max_length=b.input.max_length, include_generator=True)
        texts = [build_text(c, spec, "chatgpt") for c in contexts]
        enc = TextEncoder(Tokenizer.from_file(str(b.tokenizer_path)), spec.max_length, spec.truncation_side)
        whole = Tokenizer.from_file(str(b.tokenizer_path))
        whole.no_padding()
        whole.enable_truncation(spec.max_length, direction=spec.truncation_side)
        t = time.perf_counter()
        want = [e.ids for e in whole.encode_batch(texts)]
        t_whole = time.perf_counter() - t
        t = time.perf_counter()
        got = enc.encode_batch(texts)
        t_cut = time.perf_counter() - t
        cut = sum(len(x) > enc.window for x in texts)
        bad = sum(a != w for a, w in zip(got, want, strict=True))
        print(f"cut check, {mode}: {len(texts)} contexts, {cut} longer than {enc.window} characters (cut); "
              f"{bad} differ from tokenizing whole; {t_whole:.1f} s whole, {t_cut:.1f} s cut")


# ---- report ------------------------------------------------------------------------------------
def report(rows: list[dict], requests: list, args: argparse.Namespace, spec, lengths: list[int]) -> None:
    torch_row = next((r for r in rows if r["runtime"] == "torch fp32"), None)
    lengths_a = np.asarray(lengths)
    print(f"\n{len(requests)} ShareGPT prompts, input '{spec.mode}' max {spec.max_length} tokens "
          f"(tokens: mean {lengths_a.mean():.0f}, p50 {np.median(lengths_a):.0f}, "
          f"{np.mean(lengths_a >= spec.max_length):.0%} truncated); {args.threads} threads; old runtime "
          f"in padded batches of {args.batch_size}; throughput: best (median) of {args.repeat} rounds; "
          f"latency over {min(args.latency_n, len(requests))} prompts; load average "
          f"{args.load_before:.2f} before, {_load():.2f} after\n")
    acc = any("accuracy" in r for r in rows)
    head = ["bundle", "runtime", "prompts/s bulk: best (median)", "p50 ms (1 prompt)", "p99 ms (1 prompt)",
            "argmax agreement vs old", "bucket differs b1 vs b32", "any output differs b1 vs b32"]
    if torch_row:  # the baseline, measured in the same run (was: named in the docs, not printed)
        head += ["prompts/s bulk x torch", "argmax agreement vs torch"]
    if acc:
        head.append(f"bucket accuracy ({rows[-1]['labelled']} labelled)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    for r in rows:
        cells = [r["bundle"], r["runtime"], f"{r['prompts_per_s']:.0f} ({r['prompts_per_s_median']:.0f})",
                 f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        if r["runtime"] == "torch fp32":
            cells += ["-", "-", "-"]
        else:
            cells += [f"{r['argmax_vs_old']:.3f}", f"{r['bucket_differs_b1_b32']:.3f}", f"{r['any_differs_b1_b32']:.3f}"]
        if torch_row:
            cells += [f"{r['prompts_per_s'] / torch_row['prompts_per_s']:.2f}x",
                      f"{np.mean(r['buckets'] == torch_row['buckets']):.3f}"]
        if acc:
            cells.append(f"{r['accuracy']:.4f}" if "accuracy" in r else "-")
        print("| " + " | ".join(cells) + " |")
    ref = next((r["fp32_reference_accuracy"] for r in rows if "fp32_reference_accuracy" in r), None)
    if ref is not None:
        print(f"\nfp32 reference (int8 weights dequantized, each prompt alone): bucket accuracy {ref:.4f}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "buckets"} for r in rows], indent=2))


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=arg_path, action="append",
                    help="Measure this existing bundle (repeatable; no torch needed).")
    ap.add_argument("--model", type=arg_path, help="Trained model folder to export and compare with torch "
                                                "(default without --bundle: untrained MiniLM, same speed).")
    ap.add_argument("--mode", choices=["history", "last_user"], default="history",
                    help="Input mode of the untrained model (a trained model brings its own).")
    ap.add_argument("--max-length", type=arg_number(int, 8, 512), default=128, help="Max tokens of the untrained model (8 to 512, the encoder's positions).")
    data_input = add_shared_input(ap, "--data", "sharegpt_v3/sharegpt_v3.jsonl.gz",
                                  "ShareGPT JSONL(.gz) with 'conversation'")
    ap.add_argument("--n", type=arg_number(int, 1), default=1000, help="Prompts for the bulk run.")
    ap.add_argument("--latency-n", type=arg_number(int, 1), default=200, help="Prompts for single-prompt latency.")
    ap.add_argument("--threads", type=arg_number(int, 1, usable_cores()), default=min(2, usable_cores()),
                    help="Threads for torch and ONNX Runtime, 1 to this machine's usable cores (as the CLIs take).")
    ap.add_argument("--batch-size", type=arg_number(int, 1), default=32, help="Batch size of the old runtime and torch.")
    ap.add_argument("--repeat", type=arg_number(int, 1), default=5, help="Bulk rounds per runtime (interleaved).")
    ap.add_argument("--labelled", type=arg_path, help="Chat rows with responses: adds bucket accuracy.")
    ap.add_argument("--fp32-reference", action="store_true",
                    help="With --labelled and an int8 bundle: accuracy of its dequantized fp32 copy (needs onnx).")
    ap.add_argument("--long-prompt-mb", type=arg_number(float, 0, low_open=True), help="Also time predict_one on one prompt this big.")
    ap.add_argument("--long-kinds", type=arg_list(str), default="prose", help="Long prompts: prose,cjk,spaces.")
    ap.add_argument("--check-cut", action="store_true",
                    help="Also check cut-before-tokenizing against whole texts on all of --data.")
    ap.add_argument("--json", action="store_true", help="Also print the rows as JSON.")
    args = ap.parse_args()
    data_input(args)
    if args.bundle and args.model:  # (was: --model ignored without a word; a reviewer's find)
        ap.error("--model and --bundle: give one (--model exports a trained model and times it against torch; "
                 "--bundle times bundles as they are)")
    for path in (args.data, args.labelled, args.model, *(args.bundle or [])):  # checked before the timing runs
        if path is not None and not path.exists():
            sys.exit(f"{path}: no such file or folder")
    if args.labelled:  # rows with a response, or the accuracy would be NaN after the timing runs
        from rlpredict.data import load_samples

        if not any(s.rl_tokens is not None or s.response for s in load_samples([str(args.labelled)],
                                                                             on_error="skip")[0]):
            sys.exit(f"{args.labelled}: no chat rows with a response (--labelled needs them)")
    if unknown := set(args.long_kinds) - set(LONG_KINDS):
        ap.error(f"--long-kinds: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LONG_KINDS)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args.load_before = _load()
    requests = load_requests(args.data, args.n)
    with tempfile.TemporaryDirectory(prefix="rlpredict-bench-") as tmp:
        rows: list[dict] = []
        if args.bundle:
            bundles = list(args.bundle)
        else:
            import torch

            from rlpredict.train.export import export_bundle

            torch.set_num_threads(args.threads)
            model = args.model or untrained_model(Path(tmp) / "untrained-minilm", args.mode, args.max_length)
            bundles = [Path(tmp) / "fp32", Path(tmp) / "int8"]
            export_bundle(model, bundles[0])
            export_bundle(model, bundles[1], int8=True)
            rows.append(measure_torch(model, requests, args))
        for b in bundles:
            rows += compare(b, requests, args)
        from rlpredict.serve.runtime import Predictor

        p = Predictor.load(bundles[0], threads=1)
        lengths = [len(x) for x in p.encode(p.texts(requests))]
        report(rows, requests, args, p.input_spec, lengths)
        for b in bundles:
            lexical_cost(b, requests[:args.latency_n], args)
        if args.check_cut:
            check_cut(bundles[0], args.data)
        if args.long_prompt_mb:
            long_rows = [r for b in bundles for r in long_prompts(b, args)]
            print("\n| bundle | prompt | runtime | seconds | peak memory growth MiB |\n|---|---|---|---:|---:|")
            for r in long_rows:
                print(f"| {r['bundle']} | {r['prompt']} | {r['runtime']} | {r['seconds']:.3f} | "
                      f"{r['peak_rss_growth_mib']:.0f} |")


if __name__ == "__main__":
    run_script(main)
