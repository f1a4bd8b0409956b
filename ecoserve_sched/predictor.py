"""The interface a response-length predictor offers the scheduler (``--predictions bundle``).

The implementation is ``rlpredict.serve.runtime.Predictor`` (ONNX runtime, no torch); the scheduler
only needs this protocol, so any object with the same shape works (tests use a stub).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Prediction(Protocol):
    bucket: int
    pred_tokens: int
    reserve_tokens: int
    probs: np.ndarray


class LengthPredictor(Protocol):
    def predict(self, requests: list[Any], generators: list[str | None] | None = None) -> list[Prediction]:
        """One prediction per request: a prompt string or an OpenAI message list, and optionally
        the served model's name per request (for bundles trained with it as an input)."""
        ...


def load_predictor(path: str) -> LengthPredictor:
    """Load a predictor bundle with ``rlpredict.serve.runtime.Predictor.load`` (imported lazily)."""
    try:
        from rlpredict.serve.runtime import Predictor  # type: ignore[import-not-found]
    except ImportError as e:
        raise ValueError(
            "--predictions bundle needs rlpredict's runtime (rlpredict.serve.runtime.Predictor), which "
            f"could not be imported ({e}); use --predictions confusion or annotated instead") from None
    p: Any = Predictor.load(path)
    return p
