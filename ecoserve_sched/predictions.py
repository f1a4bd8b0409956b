"""Where a simulated request's predicted RL comes from: annotated, confusion, oracle or bundle.

- ``annotated``: the trace's own ``rl_bucket``/``rl_pred_tokens``/``rl_reserve_tokens``.
- ``confusion``: for true bucket b, draw the predicted bucket from row b of a predictor's measured
  confusion matrix (rows with no counts predict b), then take that bucket's point and
  reservation tokens. The honest choice for traces that carry only lengths.
- ``oracle``: the true length as point and reservation (an upper bound, never a claim).
- ``bundle``: run a predictor bundle on the trace's prompt texts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlpredict.buckets import DEFAULT_EDGES
from rlpredict.json_file import read_json
from rlpredict.records import no_generator_note

from .request import Request
from .trace import Trace

SOURCES = ("annotated", "confusion", "oracle", "bundle")
#: A run's ``predictions`` when its policy reads none (``prediction_override = "none"``).
NO_PREDICTIONS = "none (the policy reads no predictions)"
CONFUSION_FORMAT = "rlpredict.confusion/1"


@dataclass(frozen=True)
class Confusion:
    """A predictor's measured confusion matrix (rows: true bucket, columns: predicted)."""

    edges: np.ndarray  # upper edges, inf last
    point_tokens: np.ndarray
    reserve_tokens: np.ndarray
    matrix: np.ndarray
    source: str
    path: str

    def bucket_of(self, tokens: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, np.asarray(tokens, dtype=float), side="left")

    @property
    def accuracy(self) -> float:
        m = self.matrix
        return float(np.trace(m) / m.sum()) if m.sum() else float("nan")


def load_confusion(path: str | Path) -> Confusion:
    """Read a confusion.json, a manifest.json with a "confusion" key, or a bundle directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        d = read_json(p)  # a key given twice is refused (was: the last value, without a word)
    except OSError as e:
        raise ValueError(f"{p}: cannot read confusion matrix ({e.strerror})") from None
    if isinstance(d, dict) and "confusion" in d and d.get("format") != CONFUSION_FORMAT:
        d = d["confusion"]
    if isinstance(d, dict) and str(d.get("format", "")).startswith("rlpredict.bundle/"):
        # a bundle exported without MODEL/eval (was: "not a confusion matrix", as for any file)
        raise ValueError(f"{p}: this bundle carries no confusion matrix: run `rlpredict eval --model MODEL` "
                         "before `rlpredict export`, or give a confusion.json")
    if not isinstance(d, dict) or d.get("format") != CONFUSION_FORMAT:
        raise ValueError(f"{p}: not a confusion matrix (expected format {CONFUSION_FORMAT!r})")
    try:
        raw_edges = d["bucket_edges"]
        for name in ("bucket_edges", "point_tokens", "reserve_tokens", "matrix"):
            _numbers(d[name], name, null_ok=name == "bucket_edges")
        edges = np.array([math.inf if e is None else float(e) for e in raw_edges])
        k = len(edges)
        point_raw, reserve_raw = d["point_tokens"], d["reserve_tokens"]
        point = np.asarray(point_raw, dtype=float)
        reserve = np.asarray(reserve_raw, dtype=float)
        rows = d["matrix"]
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == k for r in rows):
            raise ValueError(f"{p}: field 'matrix' must be {k}x{k} finite counts >= 0 (rows of {k})")
        matrix = np.asarray(rows, dtype=float)
    except KeyError as e:
        raise ValueError(f"{p}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(str(e) if str(e).startswith(f"{p}: ") else f"{p}: bad confusion matrix ({e})") from None
    if not k:
        raise ValueError(f"{p}: field 'bucket_edges' is empty")
    if np.isnan(edges).any() or (edges[:-1] <= 0).any() or (np.diff(edges) <= 0).any() or edges[-1] != math.inf:
        raise ValueError(f"{p}: field 'bucket_edges' must be increasing positive upper edges ending in "
                         f"null (infinity), got {d['bucket_edges']}")
    if point.shape != (k,) or reserve.shape != (k,):
        raise ValueError(f"{p}: fields 'point_tokens' and 'reserve_tokens' need {k} values (one per bucket)")
    # as rlpredict's BucketScheme bounds them: a point estimate may be 0 (a bucket whose median
    # response is empty; the policies use it as 1), a reservation holds a token (was: the
    # confusion.json `rlpredict eval` writes for such a bucket was refused here)
    for name, a, raw, low in (("point_tokens", point, point_raw, 0), ("reserve_tokens", reserve, reserve_raw, 1)):
        if not np.isfinite(a).all() or (a != np.round(a)).any() or (a < low).any() or (a > 2**53).any():
            raise ValueError(f"{p}: field {name!r} must be whole token counts >= {low}, got {raw}")
    if matrix.shape != (k, k) or not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f"{p}: field 'matrix' must be {k}x{k} finite counts >= 0")
    with np.errstate(over="ignore"):
        finite_rows = np.isfinite(matrix.sum()) and np.isfinite(matrix.sum(axis=1)).all()
    if not finite_rows:  # the draws divide by them
        raise ValueError(f"{p}: field 'matrix' has counts too large to add up (a row sums to infinity)")
    if not matrix.sum():
        raise ValueError(f"{p}: field 'matrix' has no counts")
    return Confusion(edges, point.astype(np.int64), reserve.astype(np.int64), matrix,
                     str(d.get("source", "")), str(p))


def _numbers(value: object, name: str, null_ok: bool = False) -> None:
    """``value`` is a (nested) list of JSON numbers (and nulls if ``null_ok``): ``float`` and
    numpy would take ``true`` and ``"64"`` as numbers."""
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} must be a list, got {type(value).__name__}")
    for v in value:
        if isinstance(v, list):
            _numbers(v, name, null_ok)
        elif isinstance(v, bool) or not (isinstance(v, int | float) or (v is None and null_ok)):
            raise ValueError(f"field {name!r} must hold numbers{' (null last)' if null_ok else ''}, got {v!r}"[:200])


def default_confusion_path(root: Path | None = None) -> Path:
    """The default predictor bundle's confusion matrix: the first ``manifest.json`` with a
    "confusion" key among ``$RLPREDICT_MODEL``'s bundle (if set) and the shipped bundle (the
    checkout's ``models/rl-minilm-l6-llama3``, or the copy a wheel installs; was: the
    checkout's alone, so an installed package found none); with ``root``, the first
    ``root/models/*/manifest.json``. The runs say which file they used."""
    if root is None:
        from rlpredict.serve.bundle import ENV_MODEL, MANIFEST, shipped_bundle_paths

        env = os.environ.get(ENV_MODEL, "").strip()
        candidates = [p / MANIFEST for p in ([Path(env).expanduser()] if env else []) + shipped_bundle_paths()]
        where = " or ".join(str(c.parent) for c in candidates)
    else:
        candidates = sorted((root / "models").glob("*/manifest.json"))
        where = f"{root / 'models'}"
    for manifest in candidates:
        try:
            if "confusion" in json.loads(manifest.read_text(encoding="utf-8")):
                return manifest
        except (OSError, json.JSONDecodeError):
            continue
    raise FileNotFoundError(
        f"no confusion matrix in {where}; "
        "pass --confusion FILE (a confusion.json from `rlpredict eval`, or a bundle)")


def default_source(trace: Trace) -> str:
    return "annotated" if trace.has_rl else "confusion"


def apply_predictions(requests: list[Request], trace: Trace, source: str, *, seed: int = 0,
                      confusion: Confusion | None = None, bundle: str | None = None) -> str:
    """Fill each request's predicted RL from ``source``; returns a one-line description.
    ``none``: a policy that reads no predictions (``prediction_override``) gets none."""
    if source == "none":
        return NO_PREDICTIONS
    if source == "annotated":
        if not trace.has_rl:
            raise ValueError(f"{trace.path}: --predictions annotated needs rl_* fields "
                             "(run `rlpredict annotate`), or use --predictions confusion")
        return f"annotated ({trace.path} rl_* fields)"
    if source == "oracle":
        edges = confusion.edges if confusion is not None else np.asarray(DEFAULT_EDGES, dtype=float)
        for r in requests:
            r.pred_tokens = r.reserve_tokens = r.target_tokens
            r.pred_bucket = int(np.searchsorted(edges, r.target_tokens, side="left"))
        return "oracle (true response lengths; upper bound only)"
    if source == "confusion":
        c = confusion if confusion is not None else load_confusion(default_confusion_path())
        true_b = c.bucket_of(np.array([r.target_tokens for r in requests]))
        rng = np.random.default_rng(seed)
        m = c.matrix
        rows = m.sum(axis=1)
        cdf = np.cumsum(m, axis=1) / np.where(rows > 0, rows, 1)[:, None]
        u = rng.random(len(requests))
        # the row's inverse CDF at u (``searchsorted(cdf[b], u, side="right")``: the entries <= u);
        # a bucket never seen in evaluation keeps its true bucket
        seen = rows[true_b] > 0
        pred = np.where(seen, (cdf[true_b] <= u[:, None]).sum(axis=1), true_b)
        pred = np.minimum(pred, len(c.edges) - 1)
        for r, b, p, q in zip(requests, pred.tolist(), c.point_tokens[pred].tolist(), c.reserve_tokens[pred].tolist(),
                              strict=True):
            r.pred_bucket, r.pred_tokens, r.reserve_tokens = b, p, q
        unseen = len(requests) - int(seen.sum())  # said (was: silent, under the matrix's accuracy)
        note = (f"; {unseen:,} of {len(requests):,} requests are in buckets the matrix has no row for "
                "and kept their true bucket") if unseen else ""
        return f"confusion ({c.path}, seed {seed}, accuracy {c.accuracy:.3f}; {c.source}{note})"
    if source == "bundle":
        from .predictor import load_predictor

        if bundle is None:
            raise ValueError("--predictions bundle needs --bundle PATH")
        if trace.prompts is None:
            raise ValueError(f"{trace.prompt_problem or trace.path} (--predictions bundle needs a prompt "
                             "string or a messages list on every row)")
        predictor = load_predictor(bundle)
        # a bundle trained with the generator as an input needs it: pass the trace's column
        preds = (predictor.predict(trace.prompts, trace.generators) if trace.generators is not None
                 else predictor.predict(trace.prompts))
        for r, pr in zip(requests, preds, strict=True):
            r.pred_bucket, r.pred_tokens, r.reserve_tokens = int(pr.bucket), int(pr.pred_tokens), int(pr.reserve_tokens)
        spec = getattr(predictor, "input_spec", None)
        notes = []
        if getattr(spec, "include_generator", False):  # said, as `rlpredict annotate` says it (was: silent)
            lacking = len(requests) if trace.generators is None else sum(g is None for g in trace.generators)
            if lacking:
                notes.append(no_generator_note(f"{lacking} of {len(requests)} rows"))
        if spec is not None:  # said, as `rlpredict annotate` says it (was: silent)
            from rlpredict.serve.runtime import lacks_user_text

            if blank := sum(lacks_user_text(t, spec) for t in trace.prompts):
                notes.append(f"{blank} of {len(requests)} rows have no text where this bundle reads it: "
                             "predicted as an empty prompt, which training never saw")
        return f"bundle ({'; '.join([str(bundle), *notes])})"
    raise ValueError(f"unknown prediction source {source!r}; choose from {', '.join(SOURCES)}")
