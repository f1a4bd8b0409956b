"""The torch-free serving path: bundles, the ONNX Runtime ``Predictor``, trace annotation,
quantile calibration and drift checks. Nothing here imports torch or ``rlpredict.train``.

``Predictor``/``Prediction`` load onnxruntime on first use, so importing a submodule such as
``rlpredict.serve.bundle`` stays light.
"""

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str):
    if name in __all__:
        from rlpredict.serve import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'rlpredict.serve' has no attribute {name!r}")
