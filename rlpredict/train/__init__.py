"""The training path: configs, fine-tuning, baselines, metrics, evaluation and ONNX export.

Needs the ``[train]`` extra (torch, transformers, ...); the serving path never imports it.
"""
