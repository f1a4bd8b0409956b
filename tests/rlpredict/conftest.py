"""Shared fixtures: a tiny randomly initialised BERT classifier folder and its exported bundles.

The model has the real MiniLM tokenizer (so texts tokenize as in production) but 2 layers of
width 32, so export and inference take well under a second. Session-scoped: exported once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MAX_LENGTH = 48


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A trained-model folder as ``rlpredict train`` writes it, with random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from rlpredict.buckets import BucketScheme
    from rlpredict.inputs import InputSpec
    from rlpredict.train.encoders import encoder_path
    from rlpredict.train.model_meta import ModelMeta

    src = encoder_path()
    out = tmp_path_factory.mktemp("tiny_model")
    scheme = BucketScheme.default().fit(np.random.default_rng(0).lognormal(5.0, 1.0, 2000).astype(int) + 1)
    base = transformers.BertConfig.from_pretrained(src)
    cfg = transformers.BertConfig(
        vocab_size=base.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=scheme.n_buckets,
        pad_token_id=base.pad_token_id, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # spread the logits so argmaxes are not near-ties
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    ModelMeta(scheme, InputSpec(mode="history", max_length=TINY_MAX_LENGTH), "llama3").save(out)
    (out / "training_summary.json").write_text('{"format": "rlpredict.training_summary/1"}\n')
    return out


@pytest.fixture(scope="session")
def bundle_fp32(tiny_model_dir, tmp_path_factory) -> Path:
    from rlpredict.train.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle(tiny_model_dir, out, parity_n=48)
    return out


@pytest.fixture(scope="session")
def bundle_int8(tiny_model_dir, tmp_path_factory) -> Path:
    from rlpredict.train.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-int8"
    export_bundle(tiny_model_dir, out, int8=True, parity_n=48)
    return out
