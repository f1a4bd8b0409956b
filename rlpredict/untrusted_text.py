"""Checks on text from users' files, shared by the training loader (``data``) and ``annotate``."""

from __future__ import annotations

from collections.abc import Iterable


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
