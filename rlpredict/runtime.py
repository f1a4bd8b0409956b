"""The torch-free predictor runtime: ONNX Runtime + ``tokenizers`` over a bundle.

>>> from rlpredict import Predictor
>>> p = Predictor.load()                          # the default bundle
>>> p.predict("Write a haiku about the sea")[0]   # Prediction(bucket=..., pred_tokens=..., ...)

A request is a prompt string or an OpenAI-style message list; the model sees the text that
``rlpredict.inputs.build_text`` makes of it, exactly as in training, tokenized with the bundle's
``tokenizer.json`` and truncated to the input spec. Batches are sorted by token length and
padded per batch into reused buffers.

``pred_tokens`` is the median of the predicted length distribution (the MAE-optimal point);
``reserve_tokens`` is the predicted bucket's reservation, or, with ``reserve_quantile``, that
quantile of the predicted distribution (wider when the model is unsure); both reservations are
then padded by ``margin`` (x (1 + margin), rounded up).

A ``Predictor`` may be shared between threads (batches are serialised by a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from rlpredict.buckets import BucketScheme
from rlpredict.bundle import Bundle, load_bundle
from rlpredict.inputs import InputSpec, build_text, messages_from_prompt

Request = str | Sequence[Mapping[str, Any]]
"""A prompt string, or the conversation before the response as ``[{role, content}, ...]``."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """One request's prediction: bucket index into the bundle's scheme, the bucket
    probabilities, the point prediction and the KV-cache reservation (both in RL tokens)."""

    bucket: int
    probs: np.ndarray
    pred_tokens: int
    reserve_tokens: int

    @property
    def confidence(self) -> float:
        return float(self.probs[self.bucket])


class PredictionArrays(NamedTuple):
    """Predictions for n requests as arrays (the bulk path used by ``annotate``)."""

    bucket: np.ndarray  # (n,) int64
    probs: np.ndarray  # (n, n_buckets) float32
    pred_tokens: np.ndarray  # (n,) int64
    reserve_tokens: np.ndarray  # (n,) int64


class Predictor:
    """Response-length predictor over a verified bundle. Build it with ``Predictor.load``."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, tokenizer: Tokenizer, *,
                 reserve_quantile: float | None = None, margin: float = 0.0, batch_size: int = 32):
        if reserve_quantile is not None and not 0.0 < reserve_quantile <= 1.0:
            raise ValueError(f"reserve_quantile must be in (0, 1], got {reserve_quantile}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.reserve_quantile = reserve_quantile
        self.margin = float(margin)
        self.batch_size = int(batch_size)
        self._session = session
        self._tokenizer = tokenizer
        self._inputs = [i.name for i in session.get_inputs()]
        self._output = session.get_outputs()[0].name
        self._reserve = np.asarray(bundle.buckets.reserve_tokens, dtype=float)
        n = self.batch_size * bundle.input.max_length
        self._ids = np.empty(n, dtype=np.int64)
        self._mask = np.empty(n, dtype=np.int64)
        self._zeros = np.zeros(n, dtype=np.int64)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None = None, *, reserve_quantile: float | None = None,
             margin: float = 0.0, threads: int | None = None, batch_size: int = 32,
             verify: bool = True) -> Predictor:
        """Load a bundle folder (``None``: the default bundle).

        ``threads``: ONNX Runtime intra-op threads (``None``: ORT's default, one per core).
        ``verify=False`` skips the sha256 check of the bundle's files.
        """
        bundle = load_bundle(path, verify=verify)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        tokenizer.no_padding()
        tokenizer.enable_truncation(bundle.input.max_length, direction=bundle.input.truncation_side)
        return cls(bundle, session, tokenizer, reserve_quantile=reserve_quantile, margin=margin,
                   batch_size=batch_size)

    # ---- what the model sees -------------------------------------------------------------------
    @property
    def scheme(self) -> BucketScheme:
        return self.bundle.buckets

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def texts(self, requests: Request | Sequence[Request],
              generators: str | Sequence[str | None] | None = None) -> list[str]:
        """The model's input text for each request (``build_text`` of its messages)."""
        reqs = as_requests(requests)
        gens = _as_generators(generators, len(reqs))
        out = []
        for i, (r, g) in enumerate(zip(reqs, gens, strict=True)):
            if isinstance(r, str):
                messages = messages_from_prompt(r)
            elif isinstance(r, Sequence) and all(isinstance(m, Mapping) for m in r):
                messages = r
            else:
                raise TypeError(f"request {i}: expected a prompt string or a list of "
                                f"{{role, content}} messages, got {type(r).__name__}")
            out.append(build_text(messages, self.bundle.input, g))
        return out

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated per the input spec (no padding)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    # ---- inference -----------------------------------------------------------------------------
    def logits_of_ids(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (n, n_buckets) for token id lists: sorted by length, padded per batch."""
        n = len(encoded)
        out = np.empty((n, self.scheme.n_buckets), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        bs = self.batch_size
        with self._lock:
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                out[idx] = self._run([encoded[i] for i in idx], int(lengths[idx[-1]]))
        return out

    def _run(self, batch: list[Sequence[int]], width: int) -> np.ndarray:
        b = len(batch)
        ids = self._ids[:b * width].reshape(b, width)
        mask = self._mask[:b * width].reshape(b, width)
        ids.fill(self.bundle.pad_token_id)
        mask.fill(0)
        for row, e in enumerate(batch):
            ids[row, :len(e)] = e
            mask[row, :len(e)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = self._zeros[:b * width].reshape(b, width)
        return self._session.run([self._output], feed)[0]

    def logits(self, requests: Request | Sequence[Request],
               generators: str | Sequence[str | None] | None = None) -> np.ndarray:
        return self.logits_of_ids(self.encode(self.texts(requests, generators)))

    def predict_arrays(self, requests: Request | Sequence[Request],
                       generators: str | Sequence[str | None] | None = None) -> PredictionArrays:
        return self.from_logits(self.logits(requests, generators))

    def predict(self, requests: Request | Sequence[Request],
                generators: str | Sequence[str | None] | None = None) -> list[Prediction]:
        """Predictions for a prompt, a message list, or a list of either (always a list)."""
        a = self.predict_arrays(requests, generators)
        return [Prediction(int(b), p, int(t), int(r))
                for b, p, t, r in zip(a.bucket, a.probs, a.pred_tokens, a.reserve_tokens, strict=True)]

    def predict_one(self, request: Request, generator: str | None = None) -> Prediction:
        """One request, without sorting or batching overhead."""
        text = self.texts([request], [generator])[0]
        ids = self._tokenizer.encode(text).ids
        with self._lock:
            logits = self._run([ids], len(ids))
        a = self.from_logits(logits)
        return Prediction(int(a.bucket[0]), a.probs[0], int(a.pred_tokens[0]), int(a.reserve_tokens[0]))

    def from_logits(self, logits: np.ndarray) -> PredictionArrays:
        """Bucket, probabilities, point prediction and reservation from logits."""
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z, dtype=np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        bucket = probs.argmax(axis=1).astype(np.int64)
        if len(probs) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return PredictionArrays(bucket, probs, empty, empty)
        pred = np.rint(self.scheme.predictive_quantile(probs, 0.5)).astype(np.int64)
        if self.reserve_quantile is None:
            reserve = self._reserve[bucket]
        else:
            reserve = self.scheme.predictive_quantile(probs, self.reserve_quantile)
        # round() first so that float noise (300.0000001) does not add a token
        reserve = np.ceil(np.round(reserve * (1.0 + self.margin), 6)).astype(np.int64)
        return PredictionArrays(bucket, probs, pred, reserve)


def as_requests(requests: Request | Sequence[Request]) -> list[Request]:
    """Normalise a prompt, a message list, or a list of either to a list of requests."""
    if isinstance(requests, str):
        return [requests]
    reqs = list(requests)
    if reqs and isinstance(reqs[0], Mapping):
        return [reqs]  # one conversation
    return reqs


def _as_generators(generators: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if generators is None or isinstance(generators, str):
        return [generators] * n
    gens = list(generators)
    if len(gens) != n:
        raise ValueError(f"got {len(gens)} generators for {n} requests")
    return gens
