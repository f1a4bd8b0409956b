"""``rlpredict export``: a trained model folder -> a torch-free bundle (see ``rlpredict.serve.bundle``).

1. Trace the classifier to ONNX (``torch.onnx.export(dynamo=False)``; inputs ``input_ids`` and
   ``attention_mask`` with dynamic batch and sequence axes; output ``logits``).
2. Parity: run real prompts (the bundled ShareGPT/AlpacaEval sample, or ``parity_data``) through
   the torch model with the training tokenizer and through the bundle with the runtime
   (``rlpredict.serve.runtime.Predictor``, the exact serving path). Refuse to write the bundle when
   token ids differ, the max logit difference exceeds ``atol``, or an argmax differs other than on
   a near-tie.
3. ``int8``: ONNX Runtime dynamic quantization (per-channel QInt8 weights); its agreement with
   fp32 and, where the prompts have responses, the bucket accuracy of both are recorded. Both
   are computed by the runtime (``Predictor.logits_of_ids``: each prompt alone, so activation
   scales are per prompt), so the record is what users get.
4. The manifest also carries the eval report and confusion matrix of ``MODEL/eval`` if present.

The bundle is assembled in a temporary folder beside ``out`` and renamed into place at the end.
Needs the ``[train]`` extra (torch, transformers, onnx).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import rlpredict
from rlpredict.inputs import build_text
from rlpredict.json_file import read_json
from rlpredict.outputs import check_new_dir, check_paths, output_dir
from rlpredict.serve.bundle import (
    MODEL_FILE,
    TOKENIZER_FILE,
    confusion_problem,
    load_bundle,
    write_manifest,
)
from rlpredict.serve.runtime import Predictor
from rlpredict.train.encoders import check_positions
from rlpredict.train.evaluate import recorded_split
from rlpredict.train.model_meta import (
    ModelMeta,
    check_config,
    check_labels,
    load_trained,
    weights_sha256,
)
from rlpredict.untrusted_text import library_error

#: The tool named in its output folder's owner record (``rlpredict.outputs``): it replaces
#: only a folder of its own, never another tool's, even with --force.
EXPORT_TOOL = "rlpredict export"


DEFAULT_OPSET = 17
#: Max |logit(torch) - logit(onnx fp32)| that passes the parity check.
PARITY_ATOL = 1e-3
DEFAULT_PARITY_N = 256


class ExportError(ValueError):
    """The export cannot produce a faithful bundle (parity failed, bad model folder, ...)."""


def export_bundle(model_dir: str | Path, out: str | Path, *, int8: bool = False,
                  parity_data: Sequence[str | Path] | None = None, parity_n: int = DEFAULT_PARITY_N,
                  atol: float | None = None, opset: int = DEFAULT_OPSET, force: bool = False,
                  name: str | None = None, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Export ``model_dir`` (written by ``rlpredict train``) to the bundle folder ``out``.

    Returns the manifest. Raises ``ExportError`` (nothing written) when parity fails.
    """
    import onnx  # noqa: F401  # torch's exporter needs it (without, it failed after the model loaded)
    import torch  # noqa: F401

    model_dir, out = Path(model_dir), Path(out)
    atol = PARITY_ATOL if atol is None else atol
    meta = ModelMeta.load(model_dir)
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ExportError(f"{model_dir}: no {TOKENIZER_FILE} (the encoder's fast tokenizer); "
                          "the bundle needs it to tokenize without transformers")
    check_paths([model_dir, *(parity_data or ())], [("--out", out)], apart=[model_dir, *(parity_data or ())])
    check_new_dir(out, force=force, option="--out", only=EXPORT_TOOL)  # never another tool's folder
    try:
        check_config(model_dir)
        check_labels(model_dir, meta)  # before the parity data is read (and after loading, below)
    except ValueError as e:
        raise ExportError(str(e)) from None
    samples, read = _parity_samples(parity_data, parity_n, meta)
    fewer = f", of the {parity_n} asked for: the data holds no more" if len(samples) < parity_n else ""
    log(f"parity prompts: {len(samples)} from {_describe(parity_data)}{fewer} ({read.summary()})")
    from rlpredict.data import skipped_line

    for example in read.examples:  # the skipped rows' file:line (was: counted only)
        log(f"  {skipped_line(example)}")

    with output_dir(out, force=force, tool=EXPORT_TOOL) as tmp:
        manifest = _build(model_dir, tmp, meta, samples, int8=int8, atol=atol, opset=opset,
                          name=name or out.name, parity_source=_describe(parity_data), log=log)
    log(f"bundle written to {out}")
    return manifest


def _own_evaluation(model_dir: Path, scheme: Any) -> dict[str, Any]:
    """``MODEL/eval``'s report and confusion matrix for the manifest (absent keys where the files
    are: readers test ``"confusion" in manifest``), refused if they are another model's (was:
    embedded, or, for a matrix of another bucket scheme, a bundle that would not load)."""
    out = {}
    report = _read_json(model_dir / "eval" / "report.json")
    if report is not None:
        _check_own_report(model_dir, report)
    for key, name in (("evaluation", "report.json"), ("confusion", "confusion.json")):
        found = _read_json(model_dir / "eval" / name)
        if found is not None:
            out[key] = found
    conf, where = out.get("confusion"), model_dir / "eval" / "confusion.json"
    if isinstance(conf, dict):
        edges = [None if math.isinf(e) else e for e in scheme.edges]
        if conf.get("bucket_edges", edges) != edges:
            raise ExportError(f"{where}: bucket edges {conf.get('bucket_edges')}, for a model with {edges}: "
                              "another model's; run `rlpredict eval` on this one again")
        if problem := confusion_problem(conf.get("matrix"), scheme.n_buckets):
            raise ExportError(f"{where}: matrix: {problem}")
    return out


def _build(model_dir: Path, tmp: Path, meta: ModelMeta, samples: list, *, int8: bool, atol: float,
           opset: int, name: str, parity_source: str, log: Callable[[str], None]) -> dict:
    import onnxruntime
    import torch
    from transformers.utils import logging as hf_logging

    spec, scheme = meta.input, meta.buckets
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, hf_tok = load_trained(model_dir, attn_implementation="eager")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    cfg = model.config
    try:
        check_labels(model_dir, meta, cfg.num_labels)
        check_positions(model_dir, spec.max_length, str(model_dir))
    except ValueError as e:
        raise ExportError(str(e)) from None
    hf_tok.truncation_side = spec.truncation_side
    texts = [build_text(s.messages, spec, s.generator) for s in samples]
    evaluated = _own_evaluation(model_dir, scheme)  # checked before the ONNX export, as the loader will

    # 1. torch -> ONNX
    wrapper = _logits_only(model)
    dummy = hf_tok(texts[:2], truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
    onnx_path = tmp / MODEL_FILE
    log(f"exporting to ONNX (opset {opset})")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy["input_ids"], dummy["attention_mask"]), str(onnx_path),
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False)
    shutil.copyfile(model_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else (cfg.pad_token_id or 0)
    manifest = {
        "format": None,  # set by write_manifest
        "name": name,
        "created_by": f"rlpredict {rlpredict.__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"file": MODEL_FILE, "precision": "fp32", "opset": opset,
                  "inputs": ["input_ids", "attention_mask"], "output": "logits",
                  "num_labels": scheme.n_buckets, "architecture": (cfg.architectures or ["?"])[0],
                  "hidden_size": getattr(cfg, "hidden_size", None),
                  "num_layers": getattr(cfg, "num_hidden_layers", None),
                  "source": model_dir.name, "onnxruntime": onnxruntime.__version__},
        "tokenizer": {"file": TOKENIZER_FILE, "pad_token_id": int(pad_id)},
        "input": spec.to_dict(),
        "buckets": scheme.to_dict(),
        "rl_tokenizer": meta.rl_tokenizer,
        "parity": None,
        "quantization": None,
        "files": [MODEL_FILE, TOKENIZER_FILE],
    }
    manifest.update(evaluated)
    summary = _read_json(model_dir / "training_summary.json")
    if isinstance(summary, dict) and "split" in (summary.get("data") or {}):  # recorded, not a default
        # what `calibrate --split test` needs, with or without an `eval` report
        manifest["training_split"] = recorded_split(model_dir / "training_summary.json")
    manifest = write_manifest(tmp, manifest)

    # 2. parity: torch + training tokenizer vs bundle + runtime
    log("checking parity with the torch model")
    ref_ids = [hf_tok(t, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
    ref = _torch_logits(model, ref_ids, int(pad_id))
    fp32 = Predictor.load(tmp)
    run_ids = fp32.encode(texts)
    got = fp32.logits_of_ids(run_ids)
    labels = _labels(samples, meta, log)
    parity = _parity(ref, got, atol, labels)
    parity.update(prompts=len(texts), source=parity_source,
                  tokenization_mismatches=sum(a != list(b) for a, b in zip(run_ids, ref_ids, strict=True)))
    if parity["tokenization_mismatches"]:
        first = next(i for i, (a, b) in enumerate(zip(run_ids, ref_ids, strict=True)) if a != list(b))
        raise ExportError(f"parity failed: the bundle tokenizer differs from the training tokenizer "
                          f"on {parity['tokenization_mismatches']} of {len(texts)} prompts "
                          f"(first: prompt {first}, {texts[first][:80]!r})")
    if not parity["passed"]:
        raise ExportError(f"parity failed: max |logit difference| {parity['max_abs_logit_diff']:.3g} "
                          f"(tolerance {atol:g}), argmax agreement {parity['argmax_agreement']:.4f} "
                          f"over {len(texts)} prompts; the bundle was not written")
    manifest["parity"] = parity
    log(f"parity ok over {len(texts)} prompts: max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
        f"argmax agreement {parity['argmax_agreement']:.4f}")

    # 3. int8
    if int8:
        log("quantizing to int8 (dynamic, per-channel)")
        fp32_bytes = onnx_path.stat().st_size
        _quantize(onnx_path)
        manifest["model"]["precision"] = "int8"
        manifest = write_manifest(tmp, {**manifest, "files": [MODEL_FILE, TOKENIZER_FILE]})
        q = Predictor.load(tmp).logits_of_ids(run_ids)
        manifest["quantization"] = _int8_record(got, q, ref, labels, fp32_bytes,
                                                onnx_path.stat().st_size)
        rec = manifest["quantization"]
        log(f"int8: argmax agreement with fp32 {rec['argmax_agreement_vs_fp32']:.4f}, "
            f"max |prob diff| {rec['max_abs_prob_diff_vs_fp32']:.3g}"
            + (f", accuracy {rec['accuracy']['delta_points']:+.2f} points" if rec["accuracy"] else ""))
    manifest = write_manifest(tmp, {**manifest, "files": [MODEL_FILE, TOKENIZER_FILE]})
    load_bundle(tmp)  # what we wrote must load
    return manifest


def _logits_only(model):
    """``model`` as a module mapping (input_ids, attention_mask) to logits, for tracing."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(model).eval()


def _torch_logits(model, ids: list[list[int]], pad_id: int, batch_size: int = 16) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            width = max(len(x) for x in chunk)
            a = np.full((len(chunk), width), pad_id, dtype=np.int64)
            m = np.zeros_like(a)
            for r, x in enumerate(chunk):
                a[r, :len(x)] = x
                m[r, :len(x)] = 1
            out.append(model(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m))
                       .logits.float().numpy())
    return np.concatenate(out)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _parity(ref: np.ndarray, got: np.ndarray, atol: float, labels: np.ndarray | None) -> dict:
    diff = float(np.abs(ref - got).max()) if ref.size else 0.0
    a_ref, a_got = ref.argmax(1), got.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * atol
    bad_argmax = int(((a_ref != a_got) & ~near_tie).sum())
    rec = {"max_abs_logit_diff": diff, "argmax_agreement": float((a_ref == a_got).mean()),
           "tolerance": atol, "passed": bool(diff <= atol and bad_argmax == 0),
           "accuracy": None}
    if labels is not None:
        rec["accuracy"] = {"labelled": len(labels), "torch": float((a_ref == labels).mean()),
                           "onnx_fp32": float((a_got == labels).mean())}
    return rec


def _int8_record(fp32: np.ndarray, q: np.ndarray, ref: np.ndarray, labels: np.ndarray | None,
                 fp32_bytes: int, int8_bytes: int) -> dict:
    import onnxruntime

    rec = {"method": "onnxruntime.quantization.quantize_dynamic", "per_channel": True,
           "weight_type": "QInt8", "onnxruntime": onnxruntime.__version__,
           "prompts": len(q),
           "argmax_agreement_vs_fp32": float((fp32.argmax(1) == q.argmax(1)).mean()),
           "argmax_agreement_vs_torch": float((ref.argmax(1) == q.argmax(1)).mean()),
           "max_abs_prob_diff_vs_fp32": float(np.abs(_softmax(fp32) - _softmax(q)).max()),
           "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes, "accuracy": None}
    if labels is not None:
        a32, a8 = float((fp32.argmax(1) == labels).mean()), float((q.argmax(1) == labels).mean())
        rec["accuracy"] = {"labelled": len(labels), "fp32": a32, "int8": a8,
                           "delta_points": round(100 * (a8 - a32), 3)}
    return rec


def _quantize(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = path.with_suffix(".int8.onnx")
    logging.disable(logging.WARNING)  # ORT's quantizer logs advice to the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(path), str(q), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(q, path)


# ---- parity prompts ----------------------------------------------------------------------------
def _parity_samples(paths: Sequence[str | Path] | None, n: int, meta: ModelMeta) -> tuple[list, Any]:
    """A seeded random subset of real prompts (context messages, generator, response), and the
    read's ``LoadReport``: bad rows are set aside and counted (the log line says how many and why).
    At most ``n`` + 1 samples are held: a first read counts them, a second keeps the ones drawn,
    the same ones a draw over all of them in memory picked (was: every row of the file held,
    1.96 GB for 8 prompts of a 220k-row file; a reviewer's find)."""
    from rlpredict.data import LoadReport, iter_samples

    if not paths:
        from rlpredict.samples import SAMPLE_FILES

        paths = list(SAMPLE_FILES.values())
    files = [str(p) for p in paths]
    for f in files:  # (was: a pipe hung at the second read; a reviewer's find)
        if Path(f).exists() and not (Path(f).is_file() or Path(f).is_dir()):
            raise ExportError(f"{f}: not a regular file (a pipe or a device): the parity draw reads "
                              "--parity-data twice; write it to a file")
    report = LoadReport()
    first: list = []
    total = 0
    for s in iter_samples(files, report, on_error="skip"):
        total += 1
        if total <= n:
            first.append(s)
    if not total:
        raise ExportError(f"no usable prompts in {', '.join(map(str, paths))} for the parity check, which "
                          f"needs rows with a response ({report.summary()})")
    if total <= n:
        return first, report
    first.clear()
    drawn = random.Random(0).sample(range(total), n)  # positions, as sample() draws them from a list
    slot = {j: k for k, j in enumerate(drawn)}
    samples: list = [None] * n
    again = 0
    for again, s in enumerate(iter_samples(files, LoadReport(), on_error="skip"), 1):
        if again - 1 in slot:
            samples[slot[again - 1]] = s
    if again != total:  # (was: a file that shrank left holes, and an internal error; a reviewer's find)
        raise ExportError(f"{', '.join(files)}: changed while the parity draw read it ({total} samples, "
                          f"then {again}); leave --parity-data as it is while export runs")
    return samples, report


def _labels(samples: list, meta: ModelMeta, log: Callable[[str], None] = lambda m: None) -> np.ndarray | None:
    """True buckets of the parity prompts, when their responses can be counted in RL tokens."""
    from rlpredict.data import attach_rl

    try:
        attach_rl(samples, meta.rl_tokenizer)
    except (ImportError, OSError, ValueError) as e:  # RL tokenizer not installed: no accuracy, only agreement
        log(f"note: accuracy not recorded: the RL tokenizer {meta.rl_tokenizer!r} cannot count the parity "
            f"responses ({library_error(e)})")  # (was: dropped without a word; a reviewer's find)
        return None
    rl = [s.rl_tokens for s in samples]
    if any(r is None for r in rl):
        return None
    return meta.buckets.bucket_of(rl).astype(np.int64)


def _describe(paths: Sequence[str | Path] | None) -> str:
    if not paths:
        return "the bundled sample (rlpredict/samples: ShareGPT + AlpacaEval)"
    return ", ".join(Path(p).name for p in paths)


def _check_own_report(model_dir: Path, report: object) -> None:
    """``MODEL/eval`` must hold this model's evaluation (its weights' sha256; a report of an
    older release, which records none, is taken), else ``ExportError``: the
    manifest's evaluation and confusion matrix feed the simulator and ``drift``."""
    if not isinstance(report, dict):
        return
    recorded = report.get("model_weights_sha256")
    if recorded is not None and recorded != weights_sha256(model_dir):  # none: an older report
        raise ExportError(f"{model_dir / 'eval' / 'report.json'}: the evaluation of another model "
                          f"({report.get('model')}); rerun `rlpredict eval --model {model_dir} --out "
                          f"{model_dir / 'eval'} --force`, or move that folder away")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        raise ExportError(str(e)) from None
