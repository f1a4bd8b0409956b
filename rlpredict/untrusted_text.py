"""Checks on text from users' files, shared by the training loader (``data``) and ``annotate``."""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Iterable

#: Characters the shipped encoder's tokenizer (BERT's normalizer: ``clean_text``, accents
#: stripped) deletes or splits on: blank space, control, format, private-use and surrogate
#: characters, combining marks, and U+FFFD (what ``errors="replace"`` leaves). Not unassigned
#: ones: the tokenizer reads them as [UNK], and Python's Unicode tables call emoji newer than
#: them unassigned (a reviewer's find: a message of one Unicode 15 emoji counted as blank).
_INVISIBLE = frozenset(("Cc", "Cf", "Co", "Cs", "Zs", "Zl", "Zp", "Mn"))


def holds_no_text(text: str) -> bool:
    """Whether ``text`` is blank to the encoder: only characters its tokenizer deletes (was:
    ``str.strip`` alone, so a prompt of zero-width spaces, or of U+FFFD, was predicted as an
    empty one without a note). Stops at the first other character."""
    return not text.strip() or all(c == "\ufffd" or unicodedata.category(c) in _INVISIBLE for c in text)


def bad_utf8_at(raw: bytes, e: UnicodeDecodeError, sig: bool = True) -> tuple[int, int]:
    """(line, byte within that line) of ``e``, an error decoding ``raw`` as UTF-8 (``sig``: as
    ``utf-8-sig``, whose error counts from after a BOM: was, 3 bytes short and no line)."""
    bad = e.start + (len(codecs.BOM_UTF8) if sig and raw.startswith(codecs.BOM_UTF8) else 0)
    return raw.count(b"\n", 0, bad) + 1, bad - (raw.rfind(b"\n", 0, bad) + 1)


def is_valid_unicode(texts: str | Iterable[str]) -> bool:
    """False if a string holds a surrogate: bytes that were not UTF-8 (decoded with
    ``surrogateescape``) or a lone surrogate from a JSON escape ("\\ud800"), which no tokenizer
    and no UTF-8 file accepts."""
    try:
        (texts if isinstance(texts, str) else "".join(texts)).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_problem(e: ValueError | RecursionError) -> str:
    """A short reason for JSON that parses but cannot be held (deep nesting, huge integers)."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]


def library_error(e: BaseException, limit: int = 200) -> str:
    """A third-party library's error about a user's file as one line of at most ``limit``
    characters, led by its type (onnxruntime's and safetensors' messages run to pages)."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
