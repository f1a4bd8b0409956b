"""The predictor's own metadata, saved beside a trained Hugging Face model (``rlpredict.json``).

It says what the model predicts (bucket scheme), on which text (input spec) and in whose
tokens (the RL tokenizer). ``rlpredict export`` copies it into the bundle manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlpredict.buckets import BucketScheme
from rlpredict.inputs import InputSpec
from rlpredict.json_file import read_json
from rlpredict.outputs import write_text_atomic
from rlpredict.records import SHORT
from rlpredict.untrusted_text import library_error

FORMAT = "rlpredict.model/1"
#: the tool named as a trained model folder's writer (``rlpredict.outputs``)
TRAIN_TOOL = "rlpredict train"
FILENAME = "rlpredict.json"


@dataclass(frozen=True)
class ModelMeta:
    buckets: BucketScheme
    input: InputSpec
    rl_tokenizer: str
    """Name (``llama3``, ``qwen3``, ``deepseek``) or file name of the tokenizer RL was counted in."""

    def to_dict(self) -> dict:
        return {"format": FORMAT, "rl_tokenizer": self.rl_tokenizer,
                "input": self.input.to_dict(), "buckets": self.buckets.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, source: str = FILENAME) -> ModelMeta:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: unknown format {d.get('format')!r} (expected {FORMAT!r})")
        for name in ("buckets", "input"):
            if name in d and not isinstance(d[name], dict):
                raise ValueError(f"{source}: field {name!r} must be an object, got {type(d[name]).__name__}")
        try:
            buckets = BucketScheme.from_dict(d["buckets"], source=f"{source}: buckets")
            try:
                spec = InputSpec.from_dict(d["input"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: field 'input': {e}") from None
            if not isinstance(d["rl_tokenizer"], str) or not d["rl_tokenizer"].strip():  # was: str(5) -> "5"
                raise ValueError(f"{source}: field 'rl_tokenizer' must be a tokenizer's name, got "
                                 f"{SHORT.repr(d['rl_tokenizer'])}")
            return cls(buckets=buckets, input=spec, rl_tokenizer=d["rl_tokenizer"])
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None

    def save(self, model_dir: str | Path) -> None:
        write_text_atomic(Path(model_dir) / FILENAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelMeta:
        p = Path(model_dir) / FILENAME
        if not p.is_file():
            from rlpredict.serve.bundle import MANIFEST

            if (Path(model_dir) / MANIFEST).is_file():
                raise FileNotFoundError(f"{model_dir}: an exported bundle, not a model folder written by "
                                        "`rlpredict train` (the bundle's held-out scores are in its manifest's "
                                        "'evaluation')")
            if not Path(model_dir).exists():
                raise FileNotFoundError(f"{model_dir}: no such folder")
            raise FileNotFoundError(f"{model_dir}: no {FILENAME}; is this a model trained by `rlpredict train`?")
        return cls.from_dict(read_json(p), source=str(p))


#: Classifier heads' output weights in transformers' sequence-classification models (BERT,
#: DistilBERT, DeBERTa; RoBERTa; decoder models): their first dimension is the label count.
HEAD_WEIGHTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


def check_config(model_dir: str | Path) -> None:
    """Refuse a model folder without its ``config.json`` (was: transformers' "Should have a
    model_type key in its config.json", which named no missing file)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json (the encoder's transformers config); "
                         "give the folder `rlpredict train` wrote")


def check_labels(model_dir: str | Path, meta: ModelMeta, n_labels: int | None = None) -> None:
    """Refuse a model whose classifier has another label count than ``meta`` has buckets:
    ``n_labels`` (the loaded model's), else its ``config.json``'s (``id2label``, else
    ``num_labels``) and its weights' (the head's rows, from the safetensors header). ``eval``
    and ``export`` check before they read the data (was: ``eval`` after predicting, or a
    transformers load report), ``export`` again on the loaded model. What cannot be read is
    left to transformers, which names it when it loads."""
    k = meta.buckets.n_buckets
    found: list[tuple[str, int]] = []
    if n_labels is not None:
        found.append(("the model", n_labels))
    else:
        found += _config_labels(Path(model_dir)) + _weight_labels(Path(model_dir))
    for what, n in found:
        if n != k:
            raise ValueError(f"{model_dir}: {what} has {n} labels but {FILENAME} has {k} buckets")


def _config_labels(model_dir: Path) -> list[tuple[str, int]]:
    try:
        cfg = read_json(model_dir / "config.json")
    except (OSError, ValueError):
        return []
    if not isinstance(cfg, dict):
        return []
    labels, n = cfg.get("id2label"), cfg.get("num_labels")
    if isinstance(labels, dict):
        return [("the model", len(labels))]
    if isinstance(n, int) and not isinstance(n, bool):
        return [("the model", n)]
    return []


def _weight_labels(model_dir: Path) -> list[tuple[str, int]]:
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return []
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            for name in HEAD_WEIGHTS:
                if name in keys:
                    shape = f.get_slice(name).get_shape()
                    return [(f"the model's classifier ({name})", int(shape[0]))] if shape else []
    except Exception:  # a damaged file: the loader names it
        return []
    return []


class ModelLoadError(ValueError):
    """A trained model folder whose weights or tokenizer cannot be loaded."""


def load_trained(model_dir: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a trained folder (transformers' classes), or ``ModelLoadError``
    naming the folder: truncated weights, say, raise safetensors' own error type otherwise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar (was: on every eval, --json too)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # safetensors, tokenizers and transformers raise their own types
        raise ModelLoadError(f"{model_dir}: cannot load the trained model ({library_error(e)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, tok


def weights_sha256(model_dir: str | Path) -> str | None:
    """One sha256 over a trained folder's weight files (``*.safetensors``, ``*.bin``, by name):
    which model an ``eval`` report scored. None if the folder has none."""
    from rlpredict.serve.bundle import file_sha256

    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in Path(model_dir).glob(pattern))
    if not files:
        return None
    return file_sha256(files[0]) if len(files) == 1 else hashlib.sha256(
        "".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode()).hexdigest()
