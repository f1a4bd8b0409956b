"""rlpredict: predict the response length (RL) of a prompt, for LLM serving.

The base install (numpy, onnxruntime, tokenizers) is the serving path and never imports torch;
training and evaluation need the ``[train]`` extra.
"""

from rlpredict.buckets import DEFAULT_EDGES, BucketScheme

__version__ = "0.1.0"
__all__ = ["DEFAULT_EDGES", "BucketScheme", "Prediction", "Predictor", "__version__"]

_LAZY = {"Predictor": "rlpredict.serve.runtime", "Prediction": "rlpredict.serve.runtime"}


def __getattr__(name: str):
    """``Predictor``/``Prediction`` load onnxruntime on first use, so ``import rlpredict`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlpredict' has no attribute {name!r}")
