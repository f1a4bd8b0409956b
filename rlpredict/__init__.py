"""rlpredict: predict the response length (RL) of a prompt, for LLM serving.

The base install (numpy, onnxruntime, tokenizers) is the serving path and never imports torch;
training and evaluation need the ``[train]`` extra.
"""

from rlpredict.buckets import DEFAULT_EDGES, BucketScheme

__version__ = "0.1.0"
__all__ = ["DEFAULT_EDGES", "BucketScheme", "__version__"]
